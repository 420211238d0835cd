"""Golden outputs: record what eager PyTorch computes on some inputs, and check an artifact against it.

A golden file is a plain .npz (never pickled): `input/<name>` and `output/<name>` arrays plus an
`effc_golden` JSON string saying where the outputs came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from effc.errors import EffcError
from effc.runtime.compare import Comparison, Tolerance, compare

INPUT, OUTPUT, META = "input/", "output/", "effc_golden"


def save(path: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], meta: dict) -> None:
    arrays = {INPUT + k: v for k, v in inputs.items()}
    arrays.update({OUTPUT + k: v for k, v in outputs.items()})
    arrays[META] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    from effc.inputs import load_npz

    arrays = load_npz(path)
    inputs = {k[len(INPUT):]: v for k, v in arrays.items() if k.startswith(INPUT)}
    outputs = {k[len(OUTPUT):]: v for k, v in arrays.items() if k.startswith(OUTPUT)}
    if not inputs or not outputs:
        raise EffcError(f"{path} is not an effc golden file (no input/ and output/ arrays); make one with `effc golden record`")
    meta = json.loads(str(arrays[META])) if META in arrays else {}
    return inputs, outputs, meta


def record(source: str, output: str | Path, adapters=(), inputs_npz: str | None = None,
           input_shapes: dict | None = None, trust_remote_code: bool = False) -> dict[str, np.ndarray]:
    """Run the eager model on the inputs (given, or made from its config) and save inputs + outputs."""
    import torch

    from effc import inputs as inputs_mod
    from effc import sources
    from effc.capture import named_module

    src = sources.load(source, adapters, trust_remote_code=trust_remote_code)
    model = src.model
    if inputs_npz:
        arrays = inputs_mod.load_npz(inputs_npz)
        inputs_mod.check_token_ids(arrays, src.config, f"--inputs {inputs_npz}")
        feeds = {k: torch.from_numpy(v) for k, v in arrays.items()}
    else:
        example = inputs_mod.example_inputs(model, src.config, input_shapes, src.example_inputs)
        feeds = (inputs_mod.make_text_inputs(list(example), src.config, tuple(example["input_ids"].shape), seed=7, pad=True)
                 if "input_ids" in example and src.config is not None else example)
    try:
        _, outputs = named_module(model, feeds)
    except TypeError as e:
        raise EffcError(f"the inputs do not fit the model's forward ({e}); name the arrays as its arguments") from None
    np_inputs = {k: v.numpy() for k, v in feeds.items()}
    save(Path(output), np_inputs, outputs, {"source": src.describe(), "reference": "eager PyTorch (fp32)"})
    return outputs


def parse_per_output(items: list[str] | tuple[str, ...]) -> dict[str, Tolerance]:
    """['logits:atol=1e-3,rtol=1e-2'] -> {'logits': Tolerance(1e-3, 1e-2)}; both numbers are required."""
    out = {}
    for item in items:
        name, _, spec = item.partition(":")
        values = {}
        for part in filter(None, spec.split(",")):
            key, _, num = part.partition("=")
            try:
                values[key.strip()] = float(num)
            except ValueError:
                values[key.strip()] = None
        if not name or set(values) != {"atol", "rtol"} or None in values.values():
            raise EffcError(f"--per-output {item!r} must be NAME:atol=X,rtol=Y (both numbers)")
        out[name] = Tolerance(values["atol"], values["rtol"])
    return out


def check(artifact: str | Path, golden: str | Path, tolerance: Tolerance | None = None,
          per_output: dict[str, Tolerance] | None = None, sign_key: str | Path | bytes | None = None) -> Comparison:
    """Run the artifact on the golden inputs and compare against the golden outputs (with `sign_key`,
    only an artifact signed with it)."""
    from effc.runtime import open as open_artifact

    inputs, outputs, meta = load(golden)
    with open_artifact(artifact, sign_key=sign_key) as session:
        unknown = sorted(set(per_output or {}) - set(outputs))
        if unknown:
            raise EffcError(f"--per-output names {', '.join(unknown)}, which {golden} has no output for; outputs: {', '.join(outputs)}")
        _check_same_model(artifact, golden, session.manifest, meta)
        _check_shapes(golden, session, inputs, outputs)
        got = session.run(inputs)
    for name, ref in outputs.items():
        if got[name].shape != ref.shape:
            raise EffcError(f"{golden} has output {name} of shape {list(ref.shape)}, the artifact computes "
                            f"{list(got[name].shape)} from its inputs; the golden is of another model or shapes")
    return compare(outputs, got, tolerance, per_output, attention_mask=inputs.get("attention_mask"))


def _check_same_model(artifact, golden, manifest: dict, meta: dict) -> None:
    """A golden recorded from another base model (or other merged adapters) is bad input, not a regression."""
    recorded, built = meta.get("source") or {}, manifest.get("source") or {}
    if recorded.get("sha256") and built.get("sha256") and recorded["sha256"] != built["sha256"]:
        raise EffcError(f"{golden} was recorded from another model ({recorded.get('spec')}, sha256 "
                        f"{recorded['sha256'][:12]}…) than {artifact} was compiled from ({built.get('spec')}, sha256 "
                        f"{built['sha256'][:12]}…); record the golden from the artifact's source")
    if manifest.get("adapters") or "adapters" not in recorded:
        return  # switchable adapters are selected at run time: any one of them may be the golden's
    want = [a.get("sha256") for a in recorded["adapters"]]
    have = [a.get("sha256") for a in built.get("adapters", [])]
    if want != have:
        raise EffcError(f"{golden} was recorded with adapters {[a.get('path') for a in recorded['adapters']] or 'none'}, "
                        f"{artifact} was compiled with {[a.get('path') for a in built.get('adapters', [])] or 'none'}; "
                        "record the golden with the same --adapter options")


def _check_shapes(golden, session, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """The golden's outputs must be ones the artifact has, of its rank and fixed sizes, before running."""
    declared = {o.name: o for o in session.outputs}
    missing = sorted(set(outputs) - set(declared))
    if missing:
        raise EffcError(f"{golden} has outputs {', '.join(missing)}, which the artifact does not compute (it has "
                        f"{', '.join(declared)}); the golden is of another model")
    sizes = {dim: np.shape(inputs[i.name])[axis] for i in session.inputs if i.name in inputs
             for axis, dim in enumerate(i.shape) if isinstance(dim, str) and axis < np.ndim(inputs[i.name])}
    for name, ref in outputs.items():
        info = declared[name]
        want = [sizes.get(d) if isinstance(d, str) else (d or None) for d in info.shape]
        if ref.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, ref.shape)):
            raise EffcError(f"{golden} has output {name} of shape {list(ref.shape)}, but the artifact computes "
                            f"{info.describe()} for these inputs; the golden is of another model or shapes")
