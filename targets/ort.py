"""ort: ONNX Runtime. The graph is optimized by ONNX Runtime at build time (may use com.microsoft
contrib ops) and saved, so sessions start fast; the execution providers it was built for are recorded."""

from __future__ import annotations

import tempfile
from pathlib import Path

from effc.runtime.onnxruntime_runner import available_providers
from effc.targets import kv_buffer, onnx_export, skip_rms_norm
from effc.targets.base import BuildResult, Target

# EXTENDED, not ALL: ALL adds layout transforms specific to this machine's CPU (NCHWc), which ORT's
# docs say not to save for use on other machines.
OPTIMIZATION_LEVEL = "ORT_ENABLE_EXTENDED"
# Measured on this CPU (ORT 1.32, 2 threads): SkipLayerNormalization ran 5-7x slower than the Add +
# LayerNormalization it replaces at [8, 128, 384]; without it int8 MiniLM took 0.78x the time.
CPU_DISABLED_FUSIONS = ["SkipLayerNormFusion"]


def fx_lowerings() -> tuple:
    """The fx rewrites OrtTarget.build applies before export, in order; each module has NAME and
    lower(program, keep) -> (program, how many fused, refused candidates by reason), `keep` naming the
    parameters the runtime overrides (they stay as they are). Not user passes: their ops have only an "ort"
    column or their rewrites only pay on ONNX Runtime, and the program verification compares against stays
    the one the passes made. sibling_linears last: the others match the per-projection graph."""
    from effc.passes import kv_attention, rms_norm, rotary, siblings

    return (kv_attention, rms_norm, rotary, siblings)


class OrtTarget(Target):
    name = "ort"
    summary = "ONNX Runtime: ORT-optimized graph, contrib ops allowed"
    column = "ort"

    def translations(self) -> dict:
        import torch

        from effc.targets.attention import sdpa_to_multihead_attention

        return {torch.ops.aten.scaled_dot_product_attention.default: sdpa_to_multihead_attention,
                **super().translations()}

    def build(self, program, inputs, output_names, dynamic, out_dir: Path,
              overridable: frozenset[str] = frozenset()) -> BuildResult:
        import onnxruntime as ort

        fused = {}
        for lowering in fx_lowerings():  # fx rewrites into ops only this target translates
            program, fused[lowering.NAME], _ = lowering.lower(program, overridable)
        model = onnx_export.export(program, inputs, output_names, dynamic, self.translations(),
                                   overridable=overridable)
        shared = bool(fused["kv_attention"]) and kv_buffer.past_length_from_mask(model)
        if fused["kv_attention"]:  # a decoder with its cache: per-token launches are the cost
            fused[skip_rms_norm.NAME] = skip_rms_norm.fuse(model)
        providers = available_providers()
        disabled = CPU_DISABLED_FUSIONS if providers == ["CPUExecutionProvider"] else []
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            raw = Path(tmp) / "raw.onnx"
            external = onnx_export.save(model, raw)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # overridable initializers are intended; don't warn about them
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVEL)
            opts.optimized_model_filepath = str(out_dir / "model.onnx")
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # as runtime/session.py
            files = ["model.onnx"]
            if len(external) > 1:
                data = "model.onnx" + onnx_export.DATA_SUFFIX
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
                opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
                files.append(data)
            ort.InferenceSession(str(raw), sess_options=opts, providers=providers, disabled_optimizers=disabled)
        onnx_export.reattach_provenance(model, out_dir / "model.onnx")  # ORT's optimizer drops node metadata
        return onnx_export.result(out_dir, files, {
            "opset": onnx_export.OPSET, "optimization_level": OPTIMIZATION_LEVEL, "providers": providers,
            "disabled_fusions": disabled, "fused": fused, "shared_kv_buffer": shared,
            "onnxruntime": ort.__version__,
        }, model, program)
