"""Small random-weight Hugging Face models built from configs, for tests, examples and the CLI:

    effc compile examples.models:tiny_gpt2 --target ort -o out/gpt2

Each is the real architecture (same modules and ops as the released checkpoints), just narrow and
shallow, with weights from a fixed seed so every run builds the same model.
"""

from __future__ import annotations

import torch
import transformers

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=64),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "phi3": lambda: transformers.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2),
    # Local (sliding-window 16) and global layers alternating, as in the released Gemma-3 checkpoints.
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                                    layer_types=["sliding_attention", "full_attention"]),
    "bert": lambda: transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, max_position_embeddings=256),
}
MODEL_CLASSES = {
    "gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
    "mixtral": transformers.MixtralForCausalLM, "phi3": transformers.Phi3ForCausalLM,
    "gemma3": transformers.Gemma3ForCausalLM, "bert": transformers.BertModel,
}
ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "bert")  # the six every target is tested on
DECODERS = ("llama", "mistral", "qwen2", "gpt2", "mixtral", "phi3", "gemma3")  # with their KV cache (issue 13)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.architectures = [MODEL_CLASSES[arch].__name__]
    return MODEL_CLASSES[arch](config).eval()


def tiny_gpt2():
    return build("gpt2")


def tiny_llama():
    return build("llama")


def tiny_mistral():
    return build("mistral")


def tiny_qwen2():
    return build("qwen2")


def tiny_mixtral():
    return build("mixtral")


def tiny_bert():
    return build("bert")
