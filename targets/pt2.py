"""torch: the post-pass program for PyTorch itself, compiled ahead of time with AOTInductor into a .pt2
package, plus effc's C++ operator library (effc.native) when the graph uses it. It runs wherever the
same torch version is installed, without Python model code or a compiler: `effc.runtime.open` loads the
library, then the package. This is the target for kernels ONNX Runtime cannot host here (its C headers
are not obtainable, docs/ONNXRUNTIME.md): effc::nf4_linear runs as effc_native::nf4_linear, the exact NF4
GEMV that never builds the float weight.

When AOTInductor cannot compile the program, the ExportedProgram itself is saved (torch.export.save)
and the manifest says so; it runs eagerly through the same runtime.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch

from effc.decoder import TASK
from effc.errors import EffcError
from effc.passes.program import edit, rebuild
from effc.targets.base import BuildResult, Target

LIBRARY = "ops/effc_native.so"
STATIC = "model_static.pt2"


class TorchTarget(Target):
    name = "torch"
    summary = "PyTorch AOTInductor package (.pt2) with effc's C++ kernels (exact fast NF4)"
    column = "torch"
    # Positions of the static KV cache (targets/static_cache.py) a decoder is also built with, or None. It is
    # captured from the source model, so only for a compile without passes.
    static_cache: int | None = None
    _source = None

    def prepare(self, source, shape_ranges=None) -> None:
        self._source = source

    def available(self) -> str | None:
        # AOTInductor and effc.native both compile C++ at build time (running the artifact needs neither).
        from torch.utils.cpp_extension import get_cxx_compiler

        compiler = get_cxx_compiler()
        return None if shutil.which(compiler) else f"no C++ compiler ({compiler}); install g++ to build torch artifacts"

    def build(self, program, inputs, output_names, dynamic, out_dir: Path,
              overridable: frozenset[str] = frozenset()) -> BuildResult:
        if overridable:
            raise EffcError("switchable adapters are fed as ONNX graph inputs; use --target ort or onnx, "
                            "or merge_lora.mode=merge")
        program, native_ops = lower(program, self.translations())
        files, info = ["model.pt2"], {"torch": torch.__version__}
        if native_ops:
            from effc import native

            (out_dir / "ops").mkdir()
            shutil.copyfile(native.load(), out_dir / LIBRARY)
            files.append(LIBRARY)
            info.update(native_library=LIBRARY, native_ops=native_ops,
                        nf4_kernel_isa=torch.ops.effc_native.nf4_kernel_isa("auto"))
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / "model.pt2"))
            # Inductor vectorizes for the build machine's CPU; a host without that ISA needs a rebuild.
            info.update(format="aoti", inductor_isa=_inductor_isa())
        except Exception as e:  # Inductor raises many types; the fallback below is always valid
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            torch.export.save(program, str(out_dir / "model.pt2"))
            info.update(format="exported_program", aoti_error=f"{type(e).__name__}: {first[:300]}")
        if self.static_cache and info["format"] == "aoti" and getattr(self._source, "task", None) == TASK:
            info["static_cache"] = _build_static(self._source, self.static_cache, out_dir / STATIC)
            files.append(STATIC)
        ops = Counter(str(getattr(n.target, "name", lambda: n.target)()) for n in program.graph.nodes
                      if n.op == "call_function")
        return BuildResult("model.pt2", files, info, probes={}, inputs=_describe_inputs(inputs, dynamic),
                           outputs=_describe_outputs(program, inputs, dynamic, output_names), ops=dict(ops.most_common()),
                           runner="torch")


def _build_static(source, max_cache: int, path: Path) -> dict:
    """The static-cache program of the source decoder, AOT-compiled beside the dynamic one (which serves runs
    longer than max_cache)."""
    from effc import decoder
    from effc.targets import static_cache

    program = static_cache.export(source.model, decoder.info(source.model, source.config), max_cache)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return {"file": STATIC, "max_cache": max_cache}


def lower(program: torch.export.ExportedProgram,
          translations: dict) -> tuple[torch.export.ExportedProgram, dict[str, int]]:
    """effc ops -> their torch-column translations (effc.ops.registry; check_target has refused ops without
    one): a decomposition into aten ops, or the native kernel with the same schema, swapped in. Returns the
    new program and how many calls of each native kernel it has."""
    used = {n.target for n in program.graph.nodes if n.op == "call_function" and n.target in translations}
    decompose = {o: translations[o] for o in used if callable(translations[o])}
    if decompose:
        program = program.run_decompositions(decompose)
    native_ops = {o: translations[o] for o in used if isinstance(translations[o], str)}
    if not native_ops:
        return program, {}
    from effc import native

    native.load()
    gm, signature, state_dict, constants = edit(program)
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in native_ops:
            name = native_ops[node.target]
            namespace, _, op_name = name.partition("::")
            node.target = getattr(getattr(torch.ops, namespace), op_name).default
            counts[name] = counts.get(name, 0) + 1
    return rebuild(program, gm, signature, state_dict, constants), counts


def _inductor_isa() -> str:
    from torch._inductor import cpu_vec_isa

    return str(cpu_vec_isa.pick_vec_isa()) or "none"


def _describe_inputs(inputs: dict[str, torch.Tensor], dynamic: dict[str, dict[int, str]]) -> list[dict]:
    return [{"name": name, "dtype": str(t.numpy().dtype),
             "shape": [dynamic.get(name, {}).get(axis, size) for axis, size in enumerate(t.shape)]}
            for name, t in inputs.items()]


def _describe_outputs(program, inputs, dynamic, output_names: list[str]) -> list[dict]:
    """Output shapes from the graph's symbolic shapes, with each input symbol given its dim name."""
    names: dict[str, str] = {}
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for spec in program.graph_signature.input_specs:
        arg = getattr(spec.arg, "name", None)
        if spec.kind.name == "USER_INPUT" and arg in placeholders:
            val = placeholders[arg].meta.get("val")
            for axis, dim in enumerate(getattr(val, "shape", ())):
                if isinstance(dim, torch.SymInt) and axis in dynamic.get(arg, {}):
                    names[str(dim.node.expr)] = dynamic[arg][axis]
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    outputs = []
    for name, node in zip(output_names, out_node.args[0]):
        val = node.meta["val"]
        shape = [int(d) if not isinstance(d, torch.SymInt) else names.get(str(d.node.expr), str(d.node.expr))
                 for d in val.shape]
        outputs.append({"name": name, "dtype": str(torch.empty(0, dtype=val.dtype).numpy().dtype), "shape": shape})
    return outputs
