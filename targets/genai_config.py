"""genai_config.json for an ONNX decoder artifact, so onnxruntime-genai (`og.Model(artifact)`) runs effc's
model.onnx with its own search and KV cache. The keys are those onnxruntime-genai 0.18's builder writes
(onnxruntime_genai/models/builders/base.py make_genai_config); the names are effc's decoder contract, which
already uses genai's spelling (past_key_values.%d.key in, present.%d.key out). onnxruntime-genai reads the
tokenizer (tokenizer.json, tokenizer_config.json) from the directory holding genai_config.json: the
artifact root, where the pipeline copies them. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "genai_config.json"


def config(decoder: dict, model_file: str = "model.onnx", model_type: str | None = None,
           shared_buffer: bool = False) -> dict:
    """The genai_config document for manifest["decoder"] (effc.decoder.info) and the model's type
    (config.json's model_type: genai picks per-family handling by it; "decoder" is its generic one).
    shared_buffer: the graph takes a max-length cache buffer it writes in place (targets/kv_buffer.py)."""
    context = decoder.get("max_positions") or 2048
    eos = decoder.get("eos_token_id") or []
    pad = decoder.get("pad_token_id")
    return {
        "model": {
            "bos_token_id": decoder.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                # No spinning: a busy-waiting intra-op pool halves decode speed on a shared machine.
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    "session.intra_op.allow_spinning": "0"},
                "filename": model_file,
                "head_size": decoder["head_dim"],
                "hidden_size": decoder["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": decoder["heads"],
                "num_hidden_layers": decoder["layers"],
                "num_key_value_heads": decoder["kv_heads"],
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
            "type": model_type or "decoder",
            "vocab_size": decoder["vocab_size"],
        },
        "search": {  # greedy, as the builder writes it for a model without sampling defaults
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1,
            # On ort, GroupQueryAttention writes into a preallocated max-length buffer (targets/kv_buffer.py);
            # otherwise the graph concatenates past and new (present is past + sequence long).
            "past_present_share_buffer": shared_buffer,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }


def write(out_dir: Path, decoder: dict, model_type: str | None = None, model_file: str = "model.onnx",
          shared_buffer: bool = False) -> str:
    """Writes genai_config.json into out_dir; returns its file name (for the artifact's file list)."""
    doc = config(decoder, model_file, model_type, shared_buffer)
    (Path(out_dir) / FILE).write_text(json.dumps(doc, indent=4) + "\n")
    return FILE
