"""The wheel carries every effc subpackage (a package missing from pyproject's list imports in an
editable install but is silently left out of the wheel), and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = {"effc": "compiler", "effc/formats": "compiler/formats", "effc/ops": "compiler/ops", "effc/passes": "passes",
               "effc/runtime": "runtime", "effc/targets": "targets"}


def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("effc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package, folder in SOURCE_DIRS.items():
        for source in (ROOT / folder).glob("*.py"):
            assert f"{package}/{source.name}" in names, f"{package}/{source.name} missing from the wheel"
    for source in (ROOT / "compiler" / "csrc").glob("*.cpp"):
        assert f"effc/csrc/{source.name}" in names, f"C++ source {source.name} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "effc = effc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_runtime_does_not_import_torch():
    code = "import effc.runtime, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "False"
