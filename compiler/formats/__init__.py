"""Weight storage formats, one codec module each: nf4 (bitsandbytes' NF4), nbits (ONNX Runtime's MatMulNBits
block layout), int8 (per-channel scales). Ops, passes, translations and kernels import them; nothing else
holds a table or a layout."""
