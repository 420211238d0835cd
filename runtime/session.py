"""Run an effc artifact: validate inputs against its metadata, then execute it with the runner its
manifest names (runtime/backends.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effc.errors import EffcError
from effc.runtime import cpu
from effc.runtime.backends import runner_class
from effc.runtime.kv_cache import complete_feeds, pairs, shares_buffer
from effc.runtime.limits import check_feeds
from effc.runtime.manifest import artifact_file, read_manifest


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints for fixed dims, names (str) for dynamic ones

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(map(str, self.shape))}]"


class Session:
    """An opened artifact. Use `effc.runtime.open(path)`; it checks the artifact's hashes first."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 verify_hashes: bool = True, taps: list[str] | tuple[str, ...] = (),
                 sign_key: str | Path | bytes | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify_hashes, sign_key=sign_key)
        cpu.check(self.path, self.manifest)
        self.inputs = [TensorInfo(i["name"], i["dtype"], tuple(i["shape"])) for i in self.manifest["inputs"]]
        self.outputs = [TensorInfo(o["name"], o["dtype"], tuple(o["shape"])) for o in self.manifest["outputs"]]
        self._adapters = self.manifest.get("adapters") or {}
        self._weight_sets: dict[str, dict[str, np.ndarray]] = {}
        self.adapter = self._adapters.get("default")
        self.taps = list(taps)
        runner = runner_class(self.path, self.manifest)
        if taps and not runner.taps:
            raise EffcError(f"{self.path} runs on {self.manifest['runner']}, which cannot expose intermediate values; "
                            "the layer-wise debugger reads ONNX artifacts (compile with --target ort or onnx)")
        self._session = runner(self.path, self.manifest, threads=threads, providers=providers, taps=self.taps,
                               verified=verify_hashes)
        self.providers = self._session.providers
        # Which backend runs the artifact: the runner's own line when it can take more than one path (tensorrt).
        self.backend: str = getattr(self._session, "backend", " ".join([self.manifest["runner"], *self.providers[:1]]))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._session = None

    def input_metadata(self) -> list[TensorInfo]:
        return list(self.inputs)

    def output_metadata(self) -> list[TensorInfo]:
        return list(self.outputs)

    def adapter_names(self) -> list[str]:
        """The switchable adapters this artifact carries (empty for a merged or adapter-free artifact)."""
        return list(self._adapters.get("files", {}))

    def select_adapter(self, name: str) -> None:
        """Make `name` the adapter used by later runs. No new session: its weights are fed with each run."""
        self._weights(name)
        self.adapter = name

    def _weights(self, name: str | None) -> dict[str, np.ndarray]:
        if name is None:
            return {}
        files = self._adapters.get("files", {})
        if name not in files:
            have = ", ".join(files) or "none (this artifact has no switchable adapters)"
            raise EffcError(f"no adapter {name!r} in {self.path}; adapters: {have}")
        if name not in self._weight_sets:
            from safetensors.numpy import load_file

            self._weight_sets[name] = load_file(str(artifact_file(self.path, self.manifest, files[name], f"adapter {name}")))
        return self._weight_sets[name]

    def validate(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, dtypes, ranks and fixed dims; dynamic dims of the same name must agree. A decoder's
        feeds without the cache are a prefill: the empty cache and the positions are filled in."""
        expected = {i.name: i for i in self.inputs}
        decoder = self.manifest.get("decoder")
        if decoder:
            feeds = complete_feeds(feeds, decoder["kv_heads"], decoder["head_dim"], list(expected))
        missing = sorted(set(expected) - set(feeds))
        extra = sorted(set(feeds) - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected {', '.join(extra)}")
            raise EffcError(f"inputs do not match the model ({'; '.join(parts)}); it takes "
                            + ", ".join(i.describe() for i in self.inputs))
        sizes: dict[str, int] = {}
        out = {}
        for name, info in expected.items():
            arr = np.asarray(feeds[name])
            if str(arr.dtype) != info.dtype:
                raise EffcError(f"input {name} has dtype {arr.dtype}, the model takes {info.dtype}; convert it (e.g. arr.astype('{info.dtype}'))")
            if arr.ndim != len(info.shape):
                raise EffcError(f"input {name} has rank {arr.ndim} (shape {list(arr.shape)}), the model takes rank {len(info.shape)}: {info.describe()}")
            for axis, (got, want) in enumerate(zip(arr.shape, info.shape)):
                if isinstance(want, int) and got != want:
                    raise EffcError(f"input {name} has size {got} on axis {axis}, the model needs {want}: {info.describe()}")
                if isinstance(want, str) and sizes.setdefault(want, got) != got:
                    raise EffcError(f"input {name} has {want}={got} on axis {axis} but another input has {want}={sizes[want]}; they must agree")
            out[name] = arr
        check_feeds(self.path, self.manifest, out)  # token ids in the vocabulary, sequence within positions
        return out

    def run(self, feeds: dict[str, np.ndarray], adapter: str | None = None, checked: bool = True) -> dict[str, np.ndarray]:
        """Run once; `adapter` picks a switchable adapter for this run only (default: the selected one).
        checked=False skips the input and output checks, for feeds made from this artifact's own outputs
        (generate's decode steps, where the checks cost ~10% of a small model's step)."""
        if checked:
            feeds = self.validate(feeds)
        feeds = {**feeds, **self._weights(adapter or self.adapter)}
        names = [o.name for o in self.outputs] + self.taps
        values = dict(zip(names, self._session.run(names, feeds)))
        if checked:
            self.check_outputs(feeds, values)
        return values

    def check_outputs(self, feeds: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
        """Refuse an output whose dtype, rank or fixed dims differ from the manifest's, or whose dynamic
        dims disagree with the inputs' dims of the same name (batch, sequence)."""
        sizes = {dim: np.shape(feeds[i.name])[axis] for i in self.inputs
                 for axis, dim in enumerate(i.shape) if isinstance(dim, str)}
        for info in self.outputs:
            arr = np.asarray(values[info.name])
            ok = str(arr.dtype) == info.dtype and arr.ndim == len(info.shape)
            for got, want in zip(arr.shape, info.shape) if ok else ():
                if isinstance(want, str):
                    ok = ok and sizes.get(want, got) == got  # a name no input has is not checked
                else:
                    ok = ok and want in (0, got)  # ONNX records an unknown dim as 0
            if not ok:
                named = ", ".join(f"{k}={v}" for k, v in sizes.items())
                raise EffcError(f"output {info.name} came back as {arr.dtype}{list(arr.shape)}, but the artifact "
                                f"declares {info.dtype}[{', '.join(map(str, info.shape))}]"
                                + (f" for {named}" if named else "")
                                + f"; {self.path} does not compute what its manifest says, recompile it")

    def shared_cache(self, batch: int, length: int):
        """For a decode loop of `batch` rows and at most `length` positions: the runner's in-place cache
        (run(feeds) -> logits, the cache inputs left out of the feeds), or None where the artifact or its
        runner has none and each step's presents are fed back as the next past."""
        make = getattr(self._session, "shared_cache", None)
        if make is None or not shares_buffer(self.manifest):
            return None
        d = self.manifest["decoder"]
        return make(pairs(d["layers"]), (batch, d["kv_heads"], length, d["head_dim"]), "logits")

    def warmup(self, feeds: dict[str, np.ndarray], runs: int = 3) -> None:
        for _ in range(runs):
            self.run(feeds)

    def time(self, feeds: dict[str, np.ndarray], iters: int) -> list[float]:
        """Seconds per run, inputs validated once up front so only the model is timed."""
        feeds = self.validate(feeds)
        feeds.update(self._weights(self.adapter))
        names = [o.name for o in self.outputs]
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            self._session.run(names, feeds)
            times.append(time.perf_counter() - t)
        return times

    def generate(self, prompts, **options):
        """Generate on a decoder artifact: effc.runtime.generate.generate's options (max_new_tokens,
        temperature, top_k, top_p, seed, repetition_penalty, eos_token_id, stop, streamer, adapter)."""
        from effc.runtime.generate import generate

        return generate(self, prompts, **options)


def open(path: str | Path, providers: list[str] | None = None, threads: int | None = None,  # noqa: A001
         adapter: str | None = None, sign_key: str | Path | bytes | None = None) -> Session:
    """Open an artifact after checking every file against the sha256 in its manifest, and the manifest
    against its own hash; with `sign_key` (the key file's path, or its bytes), also its signature."""
    session = Session(path, providers=providers, threads=threads, sign_key=sign_key)
    if adapter is not None:
        session.select_adapter(adapter)
    return session
