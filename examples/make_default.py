"""Build the embedded default: a small Llama and a LoRA adapter for it, deterministically.

    python -m examples.make_default [DIR]      # from the repository root; default: examples/default

writes DIR/model (config.json + model.safetensors, and a byte-level BPE tokenizer of its 1024-token vocabulary
trained on two of Shakespeare's plays, so text works as calibration data) and DIR/adapter (PEFT LoRA on the
attention and MLP projections, with non-zero B so the adapter changes the outputs). The same torch and
tokenizers versions give the same bytes every time; the README's quickstart compiles these.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from examples.text import speeches

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE / "default"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(out: Path = DEFAULT_DIR) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out / "model", safe_serialization=True)
    make_tokenizer(out / "model", config.vocab_size)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=True)
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft initializes B to zero; a trained adapter is not
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out / "adapter", safe_serialization=True)
    return out


def make_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE (any text encodes; no unknown tokens) with Llama's <unk>/<s>/</s> as ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(speeches("comedies/as-you-like-it") + speeches("tragedies/hamlet"), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")
    fast.save_pretrained(model_dir)


if __name__ == "__main__":
    print(make(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
