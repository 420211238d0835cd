"""effc.targets.triton_window_attention, the band flash-attention kernel for GPUs (and the TensorRT plugin
band_attention), without a GPU: its numerics in Triton's CPU interpreter (tests/targets/
triton_window_attention_cases.py, run in a child process with TRITON_INTERPRET=1), and the plugin kernel's
PTX/cubin for sm_80 and sm_90 (in a child process without it: the interpreter patches triton.language
in-process, after which triton.compile rejects the kernel)."""

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
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(HERE / "triton_window_attention_cases.py")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=HERE.parents[1])
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:]
    assert res.returncode == 0, res.stdout[-4000:]
    counts = {kind: int(n) for n, kind in (part.split()[:2] for part in summary.split(" in ")[0].split(", "))}
    assert counts.get("failed", 0) == 0 and counts["passed"] >= 70, summary


def test_max_head_matches_the_plugin_check():
    from effc.targets import triton_window_attention as twa
    from effc.targets import trt_plugins as tp

    assert twa.MAX_HEAD == tp.BAND_MAX_HEAD


# ------------------------------------------------------------------------------------------
# Compile checks: one child process without TRITON_INTERPRET, every configuration at once.
# ------------------------------------------------------------------------------------------

# name -> compile_check arguments (besides arch): both dtypes and tactics at head 64 (GQA 8 over 2, causal
# window 64), a dilated both-sides band, and a 128 head whose prefill tile needs the shared-memory fallback
COMPILE_CASES = {
    "fp16-t1": dict(dtype="float16", tactic=1), "fp16-t2": dict(dtype="float16", tactic=2),
    "fp32-t1": dict(dtype="float32", tactic=1), "fp32-t2": dict(dtype="float32", tactic=2),
    "fp16-t2-both-dil2": dict(dtype="float16", tactic=2, causal=False, dilation=2, window=32),
    "fp16-t2-head128": dict(dtype="float16", tactic=2, head=128, v_head=128),
}
_CHILD = """
import json, sys, torch
import effc.targets.triton_window_attention as twa
cases = json.loads(sys.argv[1])
out = {}
for arch in (80, 90):
    for name, kw in cases.items():
        kw = dict(kw, dtype=getattr(torch, kw["dtype"]))
        out[f"{arch}-{name}"] = twa.compile_check(arch, **kw)
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
def test_plugin_kernel_compiles_to_ptx_and_cubin(compiled, arch, name):
    from effc.targets import trt_plugins as tp
    from effc.targets.triton_window_attention import PLUGIN_TACTICS, SHARED_LIMIT

    r = compiled[f"{arch}-{name}"]
    kw = COMPILE_CASES[name]
    assert r["ptx_has_entry"] and r["name"] == "band_attention_plugin_kernel", r
    assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0 and r["scalars"] == ["S", "T"]
    # TensorRT's order: the plugin inputs, the SymInt32 scalars, the output; Triton appends two scratch
    # pointers, never read when the scratch sizes are 0
    assert r["params"] == len(tp.BAND.plugin_inputs) + 2 + 1 + 2 and r["scratch"] == [0, 0], r
    assert r["block_m"] <= PLUGIN_TACTICS[kw["tactic"]] and r["shared_mem"] <= SHARED_LIMIT, r
    # Tensor cores for fp16: mma.sync on sm_80 (and sm_90 for 16-row tiles), wgmma on sm_90 for 64-row
    # tiles; the exact fp32 ("ieee") dots are FMA loops by design.
    if kw["dtype"] == "float16":
        want = "wgmma.mma_async" if (arch == 90 and r["block_m"] >= 64) else "mma.sync"
        assert want in r["mma"], r["mma"]
    else:
        assert r["mma"] == [], r["mma"]
    # Register spills would show as stack/local bytes (counts from the bundled cuobjdump).
    if "regs" in r:
        assert r["regs"] <= 255 and r["stack"] == 0 and r["local"] == 0, r
