"""The TensorRT build configuration a trt artifact carries (trt_build.json): optimization profiles,
strongly typed network, workspace limit, timing cache, optimization level and the oldest TensorRT that
can build it. `effc compile --target trt` writes it; `effc build-engine` and the TensorRT runner read it.
Torch-free: the runtime reads it on hosts without torch.

Profiles. One profile: a min/opt/max shape per graph input. A fixed dim is (d, d, d). A dynamic dim
takes the range --input-shapes gives it (`input_ids:1-4-8x1-128-512`, effc.preflight.parse_shape_ranges),
else a default by its name:
    batch     1 / example batch / max(8, 2 x example batch)
    sequence  1 / max(example, min(128, MAX)) / MAX, MAX = min(the config's positions, max(4096, 2 x
              example + 3)), max(512, 2 x example + 3) when the config names none
Inputs sharing a dim name (input_ids and attention_mask both [batch, sequence]) share its range, so a
range given for one input applies to the others. OPT is where TensorRT times its tactics: the capture
example (2x16, sized for torch.export) is no workload, so the default sequence OPT is 128, the
calibration's default length. MAX bounds the engine's activation memory (attention is quadratic in the
sequence), hence the 4096 cap; it stretches to hold the compile's second verification shape (batch + 1,
2 x sequence + 3), so the artifact's own checks run on its engine. One profile, not a second one for
short inputs: effc's graphs have no KV cache, so every call is a full forward and one range serves it,
while each profile adds build time and engine size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from effc.errors import EffcError

FILE = "trt_build.json"
FORMAT = "effc-trt-build"
VERSION = 1
TIMING_CACHE = "timing.cache"  # beside the artifact's files unless build-engine gets --timing-cache
# TensorRT's default workspace limit is the GPU's whole memory, so a tactic's scratch space may take what the
# weights and activations need; with a limit, TensorRT skips the tactics that need more. 4 GiB leaves most
# of a 16 GB card to the model and is ample for GEMM and attention scratch at these profiles' sizes.
WORKSPACE_BYTES = 4 << 30
OPTIMIZATION_LEVEL = 3  # TensorRT's default builder_optimization_level (0..5)
DEFAULT_BATCH_MAX = 8
SEQUENCE_OPT = 128  # effc calibrate's default --max-length
SEQUENCE_CAP = 4096
SEQUENCE_UNKNOWN = 512  # when the config names no position limit (BERT's)
# The oldest TensorRT with the features a graph uses, from NVIDIA/TensorRT's CHANGELOG.md:
#   10.0  ONNX parser: INT4 quantization (blocked DequantizeLinear); also the support matrix effc checks
#         every node against (docs: onnx-tensorrt 10.0 operators.md); strongly typed networks predate it.
#   10.9  ONNX parser: "Added support for Python AOT plugins" (the effc plugin nodes, aot=1).
MIN_VERSION = "10.0"
MIN_VERSION_PLUGINS = "10.9"

_REDO = "; recompile the artifact with `effc compile --target trt`"


def _default(dim: str, example: int, config) -> tuple[int, int, int] | None:
    # MAX also covers the compile's second verification shape (batch + 1, 2 x sequence + 3 or more; effc.pipeline
    # _verification_inputs), so an engine can verify the artifact it was built for.
    if dim == "batch":
        return 1, example, max(DEFAULT_BATCH_MAX, 2 * example)
    if dim == "sequence":
        from effc.inputs import max_positions  # effc.inputs imports torch; build_config runs in the compiler

        limit = max_positions(config) if config is not None else None
        top = min(limit, max(SEQUENCE_CAP, 2 * example + 3)) if limit else max(SEQUENCE_UNKNOWN, 2 * example + 3)
        top = max(top, example)
        return 1, max(example, min(SEQUENCE_OPT, top)), top
    return None


def _shown(r) -> str:
    return "-".join(map(str, r))


def dim_ranges(shapes: dict[str, list], ranges: dict[str, list[tuple[int, int, int]]]) -> dict[str, tuple]:
    """Dim name -> (min, opt, max) from the --input-shapes ranges of inputs with these shapes (dim names or
    ints): a range given for a named dim of one input holds for that dim name everywhere, so two different
    ranges for it, a range for a fixed dim, or a rank mismatch is an EffcError. Torch-free, so preflight can
    check text inputs ([batch, sequence]) before the capture. A None in place of a range leaves that dim
    to its default (or to another input's range for it)."""
    given: dict[str, tuple[tuple[int, int, int], str]] = {}
    for name, dims in ranges.items():
        shape = shapes[name]
        if len(dims) != len(shape):
            raise EffcError(f"--input-shapes {name}: {len(dims)} dims given, the input has {len(shape)} "
                            f"({'x'.join(map(str, shape))})")
        for axis, (dim, r) in enumerate(zip(shape, dims)):
            if r is None:  # the example's size only: the dim takes its default range
                continue
            r = tuple(r)
            if isinstance(dim, int):
                if r != (dim, dim, dim):
                    raise EffcError(f"--input-shapes {name}: dim {axis} is fixed at {dim} in the graph, "
                                    f"not the range {_shown(r)}; give {dim}")
                continue
            if dim in given and given[dim][0] != r:
                other = given[dim][1]
                raise EffcError(f"--input-shapes gives dim {dim!r} two ranges: {_shown(given[dim][0])} ({other}) "
                                f"and {_shown(r)} ({name}); the inputs share it: give one range")
            given[dim] = (r, name)
    return {dim: r for dim, (r, _) in given.items()}


def build_config(inputs: list[dict], example: dict[str, tuple[int, ...]],
                 shape_ranges: dict[str, list[tuple[int, int, int]]] | None, model_config,
                 plugins=(), workspace_bytes: int = WORKSPACE_BYTES) -> dict:
    """The build configuration of a graph with these inputs (BuildResult.inputs: name, dtype, shape of dim
    names or ints), captured at `example` shapes, with the --input-shapes ranges (or None) and the
    source's config (an HF config, a dict, or None). `plugins`: the effc plugins the graph calls."""
    if isinstance(model_config, dict):
        model_config = SimpleNamespace(**model_config)
    ranges = dict(shape_ranges or {})
    by_name = {i["name"]: i for i in inputs}
    unknown = sorted(set(ranges) - set(by_name))
    if unknown:
        raise EffcError(f"--input-shapes names {', '.join(unknown)}, which the TensorRT graph does not take "
                        f"(its inputs: {', '.join(by_name)})")
    for name in by_name:
        if name not in example:
            raise EffcError(f"no example shape for TensorRT graph input {name}; give it with --input-shapes")
    given = dim_ranges({name: by_name[name]["shape"] for name in ranges}, ranges)
    profile = {}
    for name, inp in by_name.items():
        shape, ex = inp["shape"], tuple(example[name])
        if len(ex) != len(shape):
            raise EffcError(f"TensorRT graph input {name} has rank {len(shape)}, its example shape "
                            f"{'x'.join(map(str, ex))} rank {len(ex)}; give a shape of that rank with --input-shapes")
        mins, opts, maxs = [], [], []
        for axis, (dim, size) in enumerate(zip(shape, ex)):
            if isinstance(dim, int):
                r = (dim, dim, dim)
            elif dim in given:
                r = given[dim]
            else:
                r = _default(dim, size, model_config)
                if r is None:
                    raise EffcError(f"TensorRT graph input {name} dim {axis} ({dim!r}) is dynamic and has no "
                                    f"default range; give one with --input-shapes {name}:MIN-OPT-MAX per dim")
            if not r[0] <= size <= r[2]:
                raise EffcError(f"--input-shapes {name}: dim {axis} ({dim}) range {_shown(r)} does not contain "
                                f"the example size {size}; widen the range or change the example shape")
            mins.append(r[0]), opts.append(r[1]), maxs.append(r[2])
        profile[name] = {"min": mins, "opt": opts, "max": maxs}
    return {"format": FORMAT, "version": VERSION, "profiles": [profile], "strongly_typed": True,
            "workspace_bytes": int(workspace_bytes), "timing_cache": TIMING_CACHE,
            "builder_optimization_level": OPTIMIZATION_LEVEL,
            "tensorrt_min_version": MIN_VERSION_PLUGINS if plugins else MIN_VERSION,
            "plugins": sorted(plugins)}


def write(out_dir: Path, config: dict) -> str:
    """Write FILE into out_dir (whole or not at all); returns its name."""
    _check(config, FILE)
    path = Path(out_dir) / FILE
    tmp = path.with_name(FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    tmp.replace(path)
    return FILE


def read(root: Path, manifest: dict) -> dict:
    """The artifact's build configuration, refused in one line when the manifest does not hash it or its
    content is not a valid configuration for the artifact's inputs."""
    from effc.runtime.manifest import artifact_file

    path = artifact_file(Path(root), manifest, FILE, "the TensorRT build configuration")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EffcError(f"cannot read {path}: {e}{_REDO}") from None
    _check(config, path, manifest.get("inputs"))
    return config


def _check(config, where, inputs: list[dict] | None = None) -> None:
    def bad(what: str):
        raise EffcError(f"{where}: {what}{_REDO}")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not isinstance(config, dict) or config.get("format") != FORMAT:
        bad(f"not an effc TensorRT build configuration (format {FORMAT!r})")
    if config.get("version") != VERSION:
        bad(f"build configuration version {config.get('version')!r}, this effc reads {VERSION}")
    if config.get("strongly_typed") is not True:
        bad("strongly_typed must be true (effc's graphs carry their precision in their types)")
    if not count(config.get("workspace_bytes")):
        bad(f"workspace_bytes {config.get('workspace_bytes')!r} is not a positive integer")
    level = config.get("builder_optimization_level")
    if not (isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= 5):
        bad(f"builder_optimization_level {level!r} is not an integer 0..5")
    cache = config.get("timing_cache")
    if not isinstance(cache, str) or not re.fullmatch(r"[\w.-]+", cache) or cache in (".", ".."):
        bad(f"timing_cache {cache!r} is not a plain file name")
    if not isinstance(config.get("tensorrt_min_version"), str) or not re.fullmatch(r"\d+\.\d+", config["tensorrt_min_version"]):
        bad(f"tensorrt_min_version {config.get('tensorrt_min_version')!r} is not MAJOR.MINOR")
    plugins = config.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        bad("plugins is not a list of plugin names")
    profiles = config.get("profiles")
    if not isinstance(profiles, list) or not profiles:
        bad("no optimization profiles")
    ranks = {i["name"]: i["shape"] for i in inputs} if inputs else None
    for k, profile in enumerate(profiles):
        if not isinstance(profile, dict) or not profile:
            bad(f"profile {k} is not an object of input -> min/opt/max")
        if ranks is not None and set(profile) != set(ranks):
            bad(f"profile {k} covers inputs {', '.join(sorted(profile))}, the artifact takes {', '.join(sorted(ranks))}")
        for name, r in profile.items():
            shapes = [r.get(key) for key in ("min", "opt", "max")] if isinstance(r, dict) else []
            if len(shapes) != 3 or not all(isinstance(s, list) and all(count(d) for d in s) for s in shapes) \
                    or len({len(s) for s in shapes}) != 1:
                bad(f"profile {k} input {name}: min/opt/max are not three shapes of positive sizes of one rank")
            if not all(lo <= opt <= hi for lo, opt, hi in zip(*shapes)):
                bad(f"profile {k} input {name}: not min <= opt <= max in every dim "
                    f"({shapes[0]}, {shapes[1]}, {shapes[2]})")
            if ranks is not None:
                graph = ranks[name]
                if len(graph) != len(shapes[0]) or any(isinstance(d, int) and not lo == hi == d
                                                       for d, lo, hi in zip(graph, shapes[0], shapes[2])):
                    bad(f"profile {k} input {name}: shape {shapes[0]}..{shapes[2]} does not fit the input's "
                        f"{'x'.join(map(str, graph))}")


def profile_for(config: dict, shapes: dict[str, tuple]) -> int | None:
    """Index of the first profile whose ranges contain these input shapes (every input of the profile
    given, of its rank, each dim within min..max), else None."""
    for k, profile in enumerate(config["profiles"]):
        if all(name in shapes and len(shapes[name]) == len(r["min"])
               and all(lo <= int(d) <= hi for d, lo, hi in zip(shapes[name], r["min"], r["max"]))
               for name, r in profile.items()):
            return k
    return None


def version_ok(config: dict, version: str) -> str | None:
    """None when TensorRT `version` ("10.9.0.34") can build this configuration, else why not (one line)."""
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:2])

    need = config["tensorrt_min_version"]
    if parts(version) >= parts(need):
        return None
    why = f" (effc plugins {', '.join(config['plugins'])})" if config.get("plugins") else ""
    return (f"this artifact needs TensorRT {need} or newer{why}, this machine has {version}; "
            f"install a newer tensorrt (pip install 'effc[gpu]')")
