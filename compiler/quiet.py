"""The known third-party noise a command would print, filtered one message at a time.

What remains on the terminal is effc's own progress and report. Each filter names the message it drops
(nothing else from the same library is hidden), and `--debug` installs none of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Iterator

# (category, message regex): deprecations inside our dependencies that a user cannot act on.
WARNINGS = [
    # torch.utils._pytree, each time torch.export's programs are deep-copied (passes, targets).
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # transformers 5, when peft reads the deprecated property while wrapping the base model.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]

# logger -> message regex of the records dropped.
LOGS = {
    # GPT-2's config keeps bos/eos 50256 even for a small vocabulary (examples.models:tiny_gpt2); effc
    # never generates, so these ids are unused.
    "transformers.configuration_utils": r"Model config: (bos|eos)_token_id must be `None` or an integer within the vocabulary",
    # bitsandbytes (imported by peft) looks for an optional kernel package effc does not use.
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Within: the WARNINGS and LOGS above are dropped and the Hugging Face progress bars (transformers'
    "Loading weights") are off; everything is as before afterwards. Nothing here imports transformers."""
    filters = [(logging.getLogger(name), _Drop(pattern)) for name, pattern in LOGS.items()]
    for logger, f in filters:
        logger.addFilter(f)  # a logger made now is the one the library gets when it is imported later
    bars = _ProgressBars()
    try:
        with warnings.catch_warnings():
            for category, message in WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            bars.off()
            yield
    finally:
        bars.restore()
        for logger, f in filters:
            logger.removeFilter(f)


class _ProgressBars:
    """Hugging Face's progress bars: huggingface_hub's switch, which transformers reads when it is imported,
    and transformers' own once it is. HF_HUB_DISABLE_PROGRESS_BARS set by the user wins."""

    def __init__(self):
        self.turned_off = False

    def off(self) -> None:
        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
            return
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        if are_progress_bars_disabled():
            return
        disable_progress_bars()
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].disable_progress_bar()
        self.turned_off = True

    def restore(self) -> None:
        if not self.turned_off:
            return
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
        if "transformers.utils.logging" in sys.modules:  # imported within: its bars started off
            sys.modules["transformers.utils.logging"].enable_progress_bar()
