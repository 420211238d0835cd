"""`effc debug SOURCE ARTIFACT --data DATA`: run the float model and the compiled artifact on the same
inputs and rank the layers by the error each one adds (effc.layerwise)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from effc.errors import EffcError
from effc.layerwise import LayerComparison, LayerReport, attention_layers, graph_taps, probes, tap_names


def debug(source: str, artifact: str | Path, data: str, *, adapters=(), samples: int | None = 32,
          max_length: int = 128, batch_size: int = 8, progress_bar=None, sign_key=None,
          trust_remote_code: bool = False) -> LayerReport:
    from effc import dataset, sources
    from effc import decoder
    from effc.capture import capture_source, run_torch, source_example
    from effc.inputs import max_positions
    from effc.runtime.manifest import read_manifest
    from effc.runtime.session import Session

    manifest = read_manifest(Path(artifact), sign_key=sign_key)
    artifact_probes = manifest.get("probes")
    if not artifact_probes:
        raise EffcError(f"{artifact} records no layer probes (built by an older effc, or it has no layers); "
                        "compile it again with this effc")
    src = sources.load(source, adapters, trust_remote_code=trust_remote_code)
    built_from = manifest.get("source", {}).get("sha256")
    if built_from and built_from != src.sha256:
        raise EffcError(f"{artifact} was compiled from another model (sha256 {built_from[:12]}…, {source} is "
                        f"{src.sha256[:12]}…); give the SOURCE it was compiled from")
    example = source_example(src)
    captured = capture_source(src, example)
    module = captured.program.module()
    float_probes = probes(module, attention=True)
    comparison = LayerComparison(float_probes, artifact_probes, layer_rules(Path(artifact), manifest))
    if not comparison.layers:
        raise EffcError(f"no layer of {source} matches a probe of {artifact}; is it the model it was compiled from?")
    names = tap_names({k: float_probes[k] for k in comparison.layers})
    limit = max_positions(src.config)
    total = dataset.count(data, decoder.data_names(example), limit)
    total = total if samples is None else min(total, samples)
    if total == 0:
        raise EffcError(f"the dataset {data} is empty: give at least one sample")
    stream = decoder.filled(dataset.batches(data, decoder.data_names(example), src.spec if src.kind == "hf_dir" else None,
                                            max_length, batch_size, samples, max_positions=limit,
                                            trust_remote_code=trust_remote_code), example)
    taps = tap_names({k: artifact_probes[k] for k in comparison.layers})
    with Session(artifact, taps=taps, sign_key=sign_key) as session, (progress_bar or _no_bar)(total) as bar:
        for feeds in stream:
            np_feeds = {decoder.public(k): v.numpy() for k, v in feeds.items()}
            got = session.run(np_feeds)
            mask = np_feeds.get("attention_mask")
            comparison.add(graph_taps(module, names, feeds), got, mask)
            comparison.add_outputs(run_torch(captured.module, feeds, captured.output_names),
                                   {k: got[k] for k in captured.output_names}, mask)
            bar.update(len(next(iter(np_feeds.values()))))
    report = comparison.report()
    report.attention = attention_layers(module)
    return report


def layer_rules(artifact: Path, manifest: dict) -> dict[str, list[str]]:
    """layer -> the rewrite rules ("<pass>/<rule>", the effc.provenance node metadata) that made the
    model.onnx nodes between the layer's input and output probes."""
    import onnx

    from effc.runtime.manifest import artifact_file
    from effc.targets.onnx_nodes import provenance

    model = onnx.load(str(artifact_file(artifact, manifest, manifest["model_file"], "model_file")),
                      load_external_data=False)
    producer = {value: node for node in model.graph.node for value in node.output}
    layer_probes = manifest["probes"]
    boundary = {v for p in layer_probes.values() for v in (p["input"], p["output"]) if v}
    rules = {}
    for name, probe in layer_probes.items():
        made, seen, stack = set(), set(), [probe["output"]]
        while stack:  # back from the output, stopping at any layer's probe (its input or another layer's)
            node = producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            made.add(provenance(node))
            stack += [v for v in node.input if v and v not in boundary]
        rules[name] = sorted(made - {None})
    return rules


@contextlib.contextmanager
def _no_bar(_total: int):
    class Bar:
        def update(self, _n: int) -> None:
            pass

    yield Bar()
