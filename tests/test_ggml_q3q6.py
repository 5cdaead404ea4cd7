"""The speed of quantlib's Q3_K and Q6_K quantizers on a layer (their bytes are checked against llama.cpp's on the
stored golden tensors in tests/test_ggml_golden.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from quantlib.methods._ggml_q3q6 import quantize_q3_K
from quantlib.methods._ggml_q3q6 import quantize_q6_K

QUANTIZERS = {"Q3_K": quantize_q3_K, "Q6_K": quantize_q6_K}


@pytest.mark.parametrize("qtype", sorted(QUANTIZERS))
def test_speed_print(qtype: str) -> None:
    x = np.random.default_rng(0).standard_normal((576, 1536), dtype=np.float32)
    qw = np.random.default_rng(1).random(1536, dtype=np.float32)
    for imatrix in (None, qw):
        t = time.perf_counter()
        out = QUANTIZERS[qtype](x, imatrix)
        print(f"{qtype}{'+imatrix' if imatrix is not None else ''} (576, 1536): {time.perf_counter() - t:.2f} s")
        assert out.shape[0] == 576
