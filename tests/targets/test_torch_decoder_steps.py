"""The torch target's decoder against an independent reference: a random Llama compiled to an AOTInductor
package, a prefill and five chained greedy decode steps through Session.run, each step's logits against a
no-cache forward of eager transformers over the same tokens. NF4 is checked against that eager model with
each quantized linear's weight replaced by its NF4 round trip (effc.formats.nf4, bitsandbytes-exact), so
effc's native NF4 kernel inside the cached program is held to fp32 tolerance, not only to itself.
(tests/targets/test_torch_decoder.py: the same artifact against generate, and the static cache.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import effc
from effc.formats.nf4 import dequantize_nf4, quantize_nf4
from effc.targets.pt2 import TorchTarget
from examples.models import build
from tests.test_decoder import _decode_logits

if (_why := TorchTarget().available()) is not None:
    pytest.skip(_why, allow_module_level=True)

ATOL = 1e-4
PROMPT, STEPS = 12, 5


def _nf4_round_trip(model: torch.nn.Module) -> torch.nn.Module:
    """What the nf4 pass's defaults store (block 64, double-quantized absmax, lm_head kept float), as float weights."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = dequantize_nf4(quantize_nf4(module.weight.detach(), 64, True))
    return model


# An AOTInductor compile each: ~25 s alone, 60-100 s on a shared machine. fp32 is also covered (against
# generate, slow) by test_torch_decoder.py, so only nf4 runs by default.
@pytest.mark.parametrize("passes", [pytest.param([], marks=pytest.mark.slow, id="fp32"), pytest.param(["nf4"], id="nf4")])
def test_cached_steps_match_full_forward(passes, tmp_path):
    build("llama").save_pretrained(tmp_path / "hf")
    report = effc.compile(str(tmp_path / "hf"), tmp_path / "art", target="torch", passes=passes)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"]["format"] == "aoti", manifest["target"].get("aoti_error")
    assert manifest["decoder"]["task"] == "text-generation-with-past"
    assert sum(s["input_ids"][1] == 1 for s in report.verification["shapes"]) >= 2  # compile verified decode steps
    if passes:
        assert report.ops["effc_native::nf4_linear"] == 14  # 7 linears in each of the 2 layers; lm_head float
    ids = np.random.default_rng(0).integers(3, 512, (2, PROMPT))
    with effc.runtime.open(tmp_path / "art") as session:
        got, tokens = _decode_logits(session, ids, STEPS)
    reference = build("llama")
    if passes:
        _nf4_round_trip(reference)
    with torch.no_grad():
        full = reference(torch.as_tensor(tokens), use_cache=False).logits.numpy()
    assert len(got) == STEPS + 1
    for step, logits in enumerate(got):
        err = float(np.abs(logits - full[:, PROMPT - 1 + step]).max())
        assert err <= ATOL, f"step {step} (position {PROMPT - 1 + step}): max |Δ| {err:.3g} > {ATOL}"
