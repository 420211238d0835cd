"""effc's custom torch operators, one module each: schema and reference implementation (so a graph after
any pass still runs in PyTorch), fake (shape) function, run-time activation math, and the op's translation
for each target column (registry.py). Importing this package registers every op."""

from effc.ops import (cached_attention, int8_embedding, int8_linear_dynamic, int8_linear_per_token,  # noqa: F401
                      int8_linear_static, int8_linear_weight_only, nbits_embedding, nbits_linear, nf4_linear,
                      rms_norm, rotary, window_attention)
