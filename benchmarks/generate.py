"""Greedy generation on the CPU, 2 threads: effc decoder artifacts (fp32 / int8 / int4 ort, nf4 torch)
against transformers generate and onnxruntime-genai's own builder (fp32, int4), all from one run.

Models: a random-weight Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads,
intermediate 1536, vocab 49152, tied embeddings) and the real SmolLM2-135M-Instruct (examples/smollm2.py).
Prompt 64 random token ids (seed 0), 128 new tokens, eos ignored so every candidate decodes 128. Each
measurement runs in its own subprocess (peak RSS is its own: VmHWM, load included); candidates
alternate round-robin over the repetitions, so machine load drifts across all of them alike; the median
repetition is reported. Quantized candidates report teacher-forced top-1 agreement: one forward over the
fp32 transformers sequence (prompt + its 128 tokens), argmax at each generated position against fp32's token.
The bound is the memory-bandwidth limit: weight bytes read per token / the read bandwidth a numpy sum over
512 MiB measures. OMP_WAIT_POLICY=PASSIVE for PyTorch; ONNX Runtime and genai without spinning.

    .venv/bin/python benchmarks/generate.py [--models llama135m,smollm2] [--reps 3] [--candidates ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path.home() / ".cache" / "effc" / "bench-generate"
THREADS, PROMPT, NEW = 2, 64, 128
EFFC = {  # candidate -> (target, compile options)
    "effc-fp32-ort": ("ort", {}),
    "effc-int8-ort": ("ort", {"passes": ["int8"], "pass_config": ["int8.mode=dynamic"]}),
    # lm_head in 4 bits too, as onnxruntime-genai's int4 builds it: the comparison is at equal precision
    "effc-int4-ort": ("ort", {"passes": ["int4"], "pass_config": ["int4.int8_activations=true", "int4.lm_head=true"]}),
    "effc-nf4-torch": ("torch", {"passes": ["nf4"], "pass_config": ["nf4.lm_head=true"]}),
}
GENAI = {"genai-fp32": "fp32", "genai-int4": "int4"}
CANDIDATES = ("transformers-fp32", *EFFC, *GENAI)


def llama135m() -> Path:
    out = WORK / "llama135m-hf"
    if not (out / "model.safetensors").is_file():
        import shutil

        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                          num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                          tie_word_embeddings=True, max_position_embeddings=2048,
                                          bos_token_id=1, eos_token_id=2)
        config.architectures = ["LlamaForCausalLM"]
        transformers.LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # genai's builder saves a tokenizer; ids unused
            shutil.copyfile(ROOT / "examples" / "default" / "model" / name, out / name)
    return out


def hf_dir(model: str) -> Path:
    if model == "smollm2":
        from examples.smollm2 import hf_dir as smollm2

        return smollm2()
    return llama135m()


def prepare(model: str, candidate: str) -> Path:
    """The artifact or model directory a candidate runs, built once and cached under WORK."""
    src = hf_dir(model)
    out = WORK / f"{model}-{candidate}"
    if candidate == "transformers-fp32" or out.is_dir():
        return src if candidate == "transformers-fp32" else out
    if candidate in EFFC:
        import effc

        target, options = EFFC[candidate]
        # Not verified here: the agreement column measures the artifact against fp32 instead.
        effc.compile(str(src), out, target=target, verify=False, **options)
    else:
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp),
                        "-p", GENAI[candidate], "-e", "cpu", "--extra_options", "hf_token=false",
                        "accuracy_level=4"], check=True)
        tmp.rename(out)
    return out


def prompt(vocab: int) -> list[int]:
    return np.random.default_rng(0).integers(3, min(vocab, 32000), PROMPT).tolist()


def weight_bytes(path: Path) -> int:
    if path.is_dir() and any(path.glob("*.onnx*")):
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"))
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".pt2", ".bin"))


# ---- one measurement (the subprocess) ----

def run_transformers(path: Path, ids: list[int]):
    import torch
    import transformers

    torch.set_num_threads(THREADS)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, **kw)[0, len(ids):].tolist()
        total = time.perf_counter() - t0
    return out, ttft, (NEW - 1) / (total - ttft), None


def run_effc(path: Path, ids: list[int], forced: list[int] | None):
    import effc.runtime

    session = effc.runtime.open(path, threads=THREADS)
    session.generate([ids], max_new_tokens=2, eos_token_id=-1)  # warm-up: first-run allocations
    g = session.generate([ids], max_new_tokens=NEW, eos_token_id=-1)
    agree = None
    if forced is not None:
        seq = np.array([ids + forced], dtype=np.int64)
        logits = session.run({"input_ids": seq, "attention_mask": np.ones_like(seq)})["logits"][0]
        agree = float(np.mean(logits[len(ids) - 1:-1].argmax(-1) == np.array(forced)))
    return g.tokens[0], g.ttft_s, g.decode_tokens_per_s, agree


def run_genai(path: Path, ids: list[int], forced: list[int] | None):
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": THREADS, "session.intra_op.allow_spinning": "0"}}}}))
    model = og.Model(config)

    def generate(new: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array([ids], dtype=np.int32))
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        return [int(t) for t in gen.get_sequence(0)[len(ids):]], ttft, time.perf_counter() - t0

    generate(2)
    tokens, ttft, decode = generate(NEW)
    agree = None
    if forced is not None:
        gen = og.Generator(model, og.GeneratorParams(model))
        gen.append_tokens(np.array([ids + forced], dtype=np.int32))
        logits = np.asarray(gen.get_output("logits"))[0]
        agree = float(np.mean(logits[len(ids) - 1:-1].argmax(-1) == np.array(forced)))
    return tokens, ttft, (len(tokens) - 1) / decode, agree


def worker(model: str, candidate: str, forced_file: str | None) -> dict:
    path = prepare(model, candidate)
    vocab = json.loads((hf_dir(model) / "config.json").read_text())["vocab_size"]
    ids = prompt(vocab)
    forced = json.loads(Path(forced_file).read_text()) if forced_file else None
    if candidate == "transformers-fp32":
        tokens, ttft, tps, agree = run_transformers(path, ids)
    elif candidate in EFFC:
        tokens, ttft, tps, agree = run_effc(path, ids, forced)
    else:
        tokens, ttft, tps, agree = run_genai(path, ids, forced)
    return {"tokens": tokens, "ttft_s": ttft, "tokens_per_s": tps, "agreement": agree,
            "rss_mib": peak_rss_mib(), "weight_bytes": weight_bytes(path)}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over fork and exec, so every worker
    would report the driver's own peak (its compiles)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the driver ----

def bandwidth() -> float:
    """Read bandwidth in bytes/s: the best of 5 numpy sums over 512 MiB."""
    a = np.ones(128 << 20, dtype=np.float32)
    best = min(_timed(a.sum) for _ in range(5))
    return a.nbytes / best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def measure(model: str, candidate: str, forced_file: Path | None) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, __file__, "--worker", candidate, "--models", model]
    if forced_file is not None:
        cmd += ["--forced", str(forced_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama135m,smollm2")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker")
    ap.add_argument("--forced")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.models, args.worker, args.forced)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    bw = bandwidth()
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (numpy sum, 512 MiB); load average {os.getloadavg()}")
    candidates = args.candidates.split(",")
    for model in args.models.split(","):
        for c in candidates:  # build everything first, so the timed runs are not mixed with compiles
            t0 = time.perf_counter()
            prepare(model, c)
            print(f"{model} {c}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        forced = WORK / f"{model}-fp32-tokens.json"
        runs: dict[str, list[dict]] = {c: [] for c in candidates}
        for rep in range(args.reps):
            for c in candidates:  # round-robin: each repetition runs every candidate once
                r = measure(model, c, forced if c != "transformers-fp32" and forced.is_file() else None)
                if c == "transformers-fp32" and "tokens" in r and not forced.is_file():
                    forced.write_text(json.dumps(r["tokens"]))
                runs[c].append(r)
                print(f"  rep {rep} {c}: " + (r.get("error") or f"{r['tokens_per_s']:.1f} tok/s"), flush=True)
        report(model, runs, bw, json.loads(forced.read_text()) if forced.is_file() else None)


def report(model: str, runs: dict, bw: float, reference: list[int] | None) -> None:
    base = None
    print(f"\n{model}: prompt {PROMPT}, {NEW} new tokens, {THREADS} threads, median of repetitions")
    print("| candidate | decode tok/s | x transformers | TTFT ms | peak RSS MiB | weights MiB | bound tok/s "
          "| greedy = fp32 | top-1 agree (teacher-forced) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            print(f"| {c} | failed: {rs[0]['error']} | | | | | | | |")
            continue
        tps = statistics.median(r["tokens_per_s"] for r in ok)
        base = tps if c == "transformers-fp32" else base
        r0 = ok[0]
        same = sum(1 for a, b in zip(r0["tokens"], reference or []) if a == b) if reference else None
        prefix = next((i for i, (a, b) in enumerate(zip(r0["tokens"], reference or [])) if a != b),
                      len(r0["tokens"])) if reference else None
        agree = "" if r0["agreement"] is None else f"{r0['agreement']:.3f}"
        print(f"| {c} | {tps:.1f} | {tps / base:.2f} | {statistics.median(r['ttft_s'] for r in ok) * 1e3:.0f} "
              f"| {max(r['rss_mib'] for r in ok):.0f} | {r0['weight_bytes'] / 2**20:.0f} "
              f"| {bw / r0['weight_bytes']:.0f} | {'' if same is None else f'{prefix} first ({same})'} | {agree} |"
              if base else f"| {c} | {tps:.1f} | | ... |")


if __name__ == "__main__":
    main()
