"""quantlib's Q3_K and Q6_K quantizers are bit-identical to llama.cpp's (`ggml_quantize_chunk`), with and without
an importance matrix, on the stored golden tensors (tests/data/llamacpp_golden.npz, scripts/llamacpp_golden.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from quantlib.methods._ggml_q3q6 import quantize_q3_K
from quantlib.methods._ggml_q3q6 import quantize_q6_K

GOLDEN = Path(__file__).resolve().parent / "data" / "llamacpp_golden.npz"
NAMES = ("normal_4x256", "heavy_2x512", "uniform_3x768", "edge_4x256")
QUANTIZERS = {"Q3_K": quantize_q3_K, "Q6_K": quantize_q6_K}


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("qtype", sorted(QUANTIZERS))
def test_bit_identical_to_llamacpp(golden, qtype: str, name: str, imatrix: bool) -> None:
    x = golden[f"input/{name}"]
    qw = golden[f"imatrix/{name}"] if imatrix else None
    want = golden[f"{qtype}{'+imatrix' if imatrix else ''}/{name}"]
    ours = QUANTIZERS[qtype](x, qw)
    assert ours.dtype == np.uint8 and ours.shape == want.shape
    bad = np.argwhere(ours != want)
    assert np.array_equal(ours, want), f"{len(bad)} bytes differ, first at (row, byte) {bad[:5].tolist()}"


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", sorted(QUANTIZERS))
def test_dequantized_near_input(golden, qtype: str, imatrix: bool) -> None:
    from gguf.quants import GGMLQuantizationType
    from gguf.quants import dequantize

    x = golden["input/normal_4x256"]
    qw = golden["imatrix/normal_4x256"] if imatrix else None
    back = dequantize(QUANTIZERS[qtype](x, qw), getattr(GGMLQuantizationType, qtype))
    assert back.shape == x.shape
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))
    assert rel < {"Q3_K": 0.2, "Q6_K": 0.03}[qtype], rel


@pytest.mark.parametrize("qtype", sorted(QUANTIZERS))
def test_speed_print(qtype: str) -> None:
    x = np.random.default_rng(0).standard_normal((576, 1536), dtype=np.float32)
    qw = np.random.default_rng(1).random(1536, dtype=np.float32)
    for imatrix in (None, qw):
        t = time.perf_counter()
        out = QUANTIZERS[qtype](x, imatrix)
        print(f"{qtype}{'+imatrix' if imatrix is not None else ''} (576, 1536): {time.perf_counter() - t:.2f} s")
        assert out.shape[0] == 576
