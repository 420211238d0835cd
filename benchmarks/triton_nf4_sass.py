"""Static cost of the Triton NF4 kernel's codebook-lookup strategies, without a GPU: each LUT mode is
compiled to a cubin for sm_80 and sm_90 (triton's bundled ptxas) and its SASS counted with cuobjdump:
instructions in the kernel, FSEL / LDS / LDG among them, registers, shared memory and spills. This is
what chose LUT_GATHER as the default (targets/triton_nf4.py); timing it needs a GPU.

    .venv/bin/python benchmarks/triton_nf4_sass.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from effc.targets import triton_nf4  # noqa: E402

MODES = {"select": triton_nf4.LUT_SELECT, "load": triton_nf4.LUT_LOAD, "gather": triton_nf4.LUT_GATHER}


def sass_ops(cubin: bytes) -> Counter:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True).stdout
    return Counter(m.split(".")[0] for m in re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)", text))


def main() -> None:
    print("| arch | LUT mode | SASS instructions | FSEL | LDS | LDG | LDGSTS | registers | shared bytes | spill (local) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in (80, 90):
        for label, mode in MODES.items():
            info = triton_nf4.compile_check(arch, torch.float16, lut_mode=mode, M=16, sass=True)
            ops = sass_ops(info["cubin"])
            print(f"| sm_{arch} | {label} | {sum(ops.values())} | {ops['FSEL']} | {ops['LDS']} | {ops['LDG']} | "
                  f"{ops['LDGSTS']} | {info.get('regs', '?')} | {info['shared_mem']} | {info.get('local', '?')} |")


if __name__ == "__main__":
    main()
