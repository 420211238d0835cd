"""effc.targets.triton_nf4, the NF4 dequant-GEMM for GPUs, without a GPU: its numerics in Triton's CPU
interpreter (tests/targets/triton_nf4_cases.py, run here in a child process with TRITON_INTERPRET=1),
and PTX/cubin compile checks for sm_80 and sm_90 (in a child process without it: the interpreter
patches triton.language in-process, after which triton.compile rejects the kernel)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="pip install triton (in the test and gpu extras)")
HERE = Path(__file__).resolve().parent


def test_numerics_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "triton_nf4_cases.py")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=HERE.parents[1])
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:]
    assert res.returncode == 0, res.stdout[-4000:]
    counts = {kind: int(n) for n, kind in (part.split()[:2] for part in summary.split(" in ")[0].split(", "))}
    assert counts.get("failed", 0) == 0 and counts["passed"] >= 100 and counts.get("xfailed", 0) <= 1, summary


# ------------------------------------------------------------------------------------------
# Compile checks: one child process without TRITON_INTERPRET, all configurations at once.
# ------------------------------------------------------------------------------------------

COMPILE_CASES = {
    "fp16_dq_bias_M64": dict(dtype="float16", M=64),
    "fp16_dq_bias_M1": dict(dtype="float16", M=1),
    "bf16_nodq_M64": dict(dtype="bfloat16", M=64, double_quant=False, has_bias=False),
    "fp32_ieee_M1": dict(dtype="float32", M=1),
}
_CHILD = """
import json, sys, torch
import effc.targets.triton_nf4 as nt
cases = json.loads(sys.argv[1])
out = {}
for arch in (80, 90):
    for name, kw in cases.items():
        kw = dict(kw, dtype=getattr(torch, kw["dtype"]))
        out[f"{arch}-{name}"] = nt.compile_check(arch, **kw)
print("RESULT " + json.dumps(out))
"""


def _ptxas_missing(arch):
    from triton import knobs
    try:
        (knobs.nvidia.ptxas if arch < 90 else knobs.nvidia.ptxas_blackwell).path
        return None
    except RuntimeError as e:
        return str(e)


@pytest.fixture(scope="module")
def compiled():
    missing = [m for m in (_ptxas_missing(80), _ptxas_missing(90)) if m]
    if missing:
        pytest.skip(f"ptxas unavailable: {missing[0]}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # silence the fp-fusion default warning
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(COMPILE_CASES)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("name", list(COMPILE_CASES))
@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_to_ptx_and_cubin(compiled, arch, name):
    r = compiled[f"{arch}-{name}"]
    assert r["ptx_has_entry"] and r["name"] == "nf4_linear_kernel"
    assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0
    # Tensor cores: mma.sync on sm_80 (and on sm_90 for 16-row tiles), wgmma on sm_90 for
    # 64-row tiles; the exact-fp32 ("ieee") dot is an FMA loop by design.
    kw = COMPILE_CASES[name]
    if kw["dtype"] != "float32":
        want = "wgmma" if (arch == 90 and kw["M"] >= 64) else "mma.sync"
        assert any(m.startswith(want) for m in r["mma"]), r["mma"]
    # Register spills would show as stack/local bytes (counts from the bundled cuobjdump).
    if "regs" in r:
        assert r["regs"] <= 255 and r["stack"] == 0 and r["local"] == 0, r
