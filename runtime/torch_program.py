"""The runner for `torch` target artifacts (.pt2): effc's op library, then the AOTInductor package (or
the saved ExportedProgram). Only this module of the runtime imports torch, and only when such an
artifact is opened (runtime/backends.py)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from effc.errors import EffcError
from effc.runtime.kv_cache import PAST, PRESENT, internal, public
from effc.runtime.manifest import artifact_file, sha256_file


def checked(root: Path, manifest: dict, field: str, rel: str) -> Path:
    """root/rel after its sha256 matched the manifest's, checked right before it is loaded: the op
    library and an AOTInductor package are native code, so this holds even for a Session opened with
    verify_hashes=False."""
    path = artifact_file(root, manifest, rel, field)
    if sha256_file(path) != manifest["files"][rel]:
        raise EffcError(f"artifact {root} was tampered with: sha256 of {rel} does not match manifest.json; "
                        "not loading it, recompile the artifact")
    return path


class TorchProgram:
    taps: ClassVar[bool] = False  # an AOTInductor package computes its outputs only

    def __init__(self, root: Path, manifest: dict, threads: int | None = None, providers: list[str] | None = None,
                 taps: list[str] | tuple[str, ...] = (), verified: bool = False):
        """`verified`: every file's hash was checked when the manifest was read (the op library is hashed
        again anyway, right before it is loaded). `providers` are ONNX Runtime's; torch runs on the CPU."""
        import torch

        self.providers: list[str] = []
        info = manifest["target"]
        if info["torch"] != torch.__version__:
            # The op library and the AOTInductor package are built against one torch ABI.
            raise EffcError(f"{root} was built with torch {info['torch']}, this process has {torch.__version__}; "
                            f"install torch=={info['torch']} or recompile the artifact")
        # Inductor compiled its kernels with the build machine's vector ISA; on a CPU without it they
        # would die on an illegal instruction, so refuse instead.
        built_for = info.get("inductor_isa", "").split()[:1]
        have = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default", ...
        if built_for and built_for[0].startswith("avx") and not _at_least(have, built_for[0]):
            raise EffcError(f"{root} was compiled for {built_for[0].upper()} CPUs and this CPU has {have.upper()}; "
                            "recompile it with `effc compile --target torch` on a machine like this one")
        # A second copy of the library would register its ops again, which aborts the process.
        if info.get("native_library") and not registered("effc_native::nf4_linear"):
            torch.ops.load_library(str(checked(root, manifest, "target.native_library", info["native_library"])))
        if threads:
            torch.set_num_threads(threads)
        model = str(checked(root, manifest, "model_file", manifest["model_file"]) if not verified
                    else artifact_file(root, manifest, manifest["model_file"], "model_file"))
        try:
            if info["format"] == "aoti":
                self._call = torch._inductor.aoti_load_package(model)
            else:
                self._call = torch.export.load(model).module()
        except Exception as e:  # torch raises many types here
            raise EffcError(f"torch could not load {model}: {str(e).strip().splitlines()[0]}") from None
        # A static KV cache (targets/static_cache.py) serves runs that fit in it; the dynamic program the rest.
        self._static = None
        if info.get("static_cache"):
            static, meta = info["static_cache"], manifest["decoder"]
            package = checked(root, manifest, "target.static_cache", static["file"]) if not verified else \
                artifact_file(root, manifest, static["file"], "target.static_cache")
            self._static = StaticCache(torch._inductor.aoti_load_package(str(package)), meta["layers"],
                                       meta["kv_heads"], meta["head_dim"], static["max_cache"])
        self._torch = torch
        self._inputs = [i["name"] for i in manifest["inputs"]]
        self._outputs = [o["name"] for o in manifest["outputs"]]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._static is not None and self._static.fits(feeds):
            values = self._static.run(feeds)
            return [values[n] for n in names]
        torch = self._torch
        with torch.inference_mode():
            # The manifest's names are public (past_key_values.0.key); the program's kwargs are identifiers.
            outs = self._call(**{internal(n): torch.as_tensor(np.ascontiguousarray(feeds[n])) for n in self._inputs})
        values = dict(zip(self._outputs, outs))
        return [values[n].numpy() for n in names]


def registered(op: str) -> bool:
    """Whether this process already has a CPU kernel for `op` (e.g. "effc_native::nf4_linear")."""
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    except RuntimeError:  # no such operator
        return False


_ISA_ORDER = ("default", "avx2", "avx512")


def _at_least(have: str, need: str) -> bool:
    rank = {isa: i for i, isa in enumerate(_ISA_ORDER)}
    return rank.get(have, 0) >= rank.get(need, len(_ISA_ORDER))


class StaticCache:
    """The runner of a static-cache program (targets/static_cache.py): it owns the buffers [batch, kv_heads,
    max_cache, head_dim] the program writes in place, and keeps Session.run's contract: a fed past is copied
    into them unless it is the present this cache returned last (a view of the buffers, what generate feeds
    back), so a decode step copies no cache. Presents are views of the buffers, valid until a run is fed
    another past."""

    def __init__(self, program, layers: int, kv_heads: int, head_dim: int, max_cache: int):
        self.program, self.max_cache = program, max_cache
        self.shape = (kv_heads, head_dim)
        self.names = [f"{PAST}_{i}_{kv}" for i in range(layers) for kv in ("key", "value")]  # the program's
        self.past: dict = {}
        self.length = 0  # positions filled

    def fits(self, feeds: dict) -> bool:
        return np.shape(feeds["attention_mask"])[1] <= self.max_cache

    def _own(self, name: str, arr: np.ndarray) -> bool:
        buf = self.past.get(name)
        return (buf is not None and arr.shape == (buf.shape[0], buf.shape[1], self.length, buf.shape[3])
                and arr.__array_interface__["data"][0] == buf.data_ptr() and arr.strides == tuple(4 * s for s in buf.stride()))

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """Feeds by public name (past_key_values.N.key: [batch, kv_heads, past, head_dim]) -> logits and
        present.N.key/value."""
        import torch

        ids = torch.as_tensor(np.ascontiguousarray(feeds["input_ids"]))
        batch, seq = ids.shape
        pasts = {n: np.asarray(feeds[public(n)]) for n in self.names}
        past = next(iter(pasts.values())).shape[2]
        if past + seq > self.max_cache:
            raise EffcError(f"the static cache holds {self.max_cache} positions; this run needs {past + seq}")
        if not all(self._own(n, a) for n, a in pasts.items()):
            if not self.past or next(iter(self.past.values())).shape[0] != batch:
                self.past = {n: torch.zeros(batch, self.shape[0], self.max_cache, self.shape[1]) for n in self.names}
            for n, a in pasts.items():
                self.past[n][:, :, :past] = torch.from_numpy(np.ascontiguousarray(a))
        self.length = past
        mask = torch.zeros(batch, self.max_cache, dtype=torch.int64)
        mask[:, : past + seq] = torch.as_tensor(feeds["attention_mask"])
        with torch.inference_mode():
            out = self.program(input_ids=ids, attention_mask=mask,
                               position_ids=torch.as_tensor(np.ascontiguousarray(feeds["position_ids"])),
                               past_length=torch.tensor(past), **self.past)
        self.length = past + seq
        values = {"logits": (out[0] if isinstance(out, (tuple, list)) else out).numpy()}
        for n, buf in self.past.items():
            values[public(n.replace(PAST, PRESENT, 1))] = buf[:, :, : self.length].numpy()
        return values
