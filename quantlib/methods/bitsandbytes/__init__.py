"""bitsandbytes: the config, the 4-bit (NF4/FP4, double quant) and 8-bit (LLM.int8()) quantizers, and
their tensor formats with a pure-torch reference that reproduces bitsandbytes' CPU backend bit for bit.

One module each for what the method holds:

- `config`: `BitsAndBytesQuantConfig`, the keys of transformers' `BitsAndBytesConfig`.
- `formats`: the tensor formats (NF4/FP4 blockwise 4-bit with double quantization, blockwise 8-bit, LLM.int8()'s
  row-wise int8) and their pure-torch quantize/dequantize, next to bitsandbytes' own functions.
- `rounding`: the rounding of bitsandbytes' CPU quantizers reproduced bit for bit (code tables, lookups, packing).
- `exact`: bitsandbytes' CPU kernels mirrored: the LLM.int8() matmul and the exact simulation of its layers, with
  the workaround of its CPU kernels' bugs.
- `_bnb_cpu`: which CPU kernel bitsandbytes runs here, and its fused AVX512-BF16 4-bit GEMM mirrored.
- `quantizers`: the two quantizers (`@register`-marked), which load through transformers' `from_pretrained`.

The public names are imported here: the registry finds the quantizers as attributes of this package.
"""

from __future__ import annotations

from quantlib.methods.bitsandbytes.config import (BNB_COMPUTE_DTYPES, BNB_QUANT_TYPES, BNB_STORAGE_DTYPES,
                                                  DTYPE_KEYS, BitsAndBytesQuantConfig)
from quantlib.methods.bitsandbytes.exact import (WORKAROUND_4BIT, ExactLinear4bit, ExactLinear8bit,
                                                 exact_simulation_problem, int8_decomposed_matmul, keep_stored_4bit,
                                                 kernel_paths, outlier_columns, stored_4bit, stored_8bit,
                                                 stored_layers, to_exact_simulation, work_around_cpu_kernel_bugs)
from quantlib.methods.bitsandbytes.formats import (BLOCKSIZES_4BIT, BLOCKSIZES_8BIT, DQ_BLOCKSIZE, Backend,
                                                   Blockwise4bitTensor, Blockwise8bitTensor, DoubleQuantState,
                                                   QuantType4bit, RowwiseInt8Tensor, dequantize_4bit,
                                                   dequantize_blockwise_8bit, int8_vectorwise_quant, quantize_4bit,
                                                   quantize_blockwise_8bit, quantize_int8_weight)
from quantlib.methods.bitsandbytes.quantizers import Bnb4BitQuantizer, Bnb8BitQuantizer, BnbQuantizer

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 0

__all__ = [
    "BLOCKSIZES_4BIT", "BLOCKSIZES_8BIT", "BNB_COMPUTE_DTYPES", "BNB_QUANT_TYPES", "BNB_STORAGE_DTYPES", "DQ_BLOCKSIZE",
    "DTYPE_KEYS", "WORKAROUND_4BIT", "Backend", "BitsAndBytesQuantConfig", "Blockwise4bitTensor",
    "Blockwise8bitTensor", "Bnb4BitQuantizer", "Bnb8BitQuantizer", "BnbQuantizer", "DoubleQuantState",
    "ExactLinear4bit", "ExactLinear8bit", "QuantType4bit", "RowwiseInt8Tensor", "dequantize_4bit",
    "dequantize_blockwise_8bit", "exact_simulation_problem", "int8_decomposed_matmul", "int8_vectorwise_quant",
    "keep_stored_4bit", "kernel_paths", "outlier_columns", "quantize_4bit", "quantize_blockwise_8bit",
    "quantize_int8_weight", "stored_4bit", "stored_8bit", "stored_layers", "to_exact_simulation",
    "work_around_cpu_kernel_bugs",
]
