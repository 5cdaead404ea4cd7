"""llama.cpp's activation quantization in its CPU matmul, as the GGUF method simulates it (`_ggml_activations`).

The references are the C functions themselves, written out plainly per block here: `quantize_row_q8_0` (x86 AVX
path: d = amax/127 in fp16, q = round-half-even(x * 127/amax)) and `quantize_row_q8_K_ref` (iscale = -127/max,
q = min(127, nearest_int(iscale*x)), d = 1/iscale in float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlib.methods._ggml_activations import VEC_DOT_TYPE, quantize_activations


def _q8_0_by_block(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for s in range(0, len(x), 32):
        block = x[s:s + 32]
        amax = np.float32(np.abs(block).max())
        d = np.float32(amax / np.float32(127))
        inv = np.float32(127) / amax if amax != 0 else np.float32(0)
        q = np.round(block * inv)  # numpy rounds half to even
        out[s:s + 32] = q * np.float32(np.float16(d))
    return out


def _q8_K_by_block(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for s in range(0, len(x), 256):
        block = x[s:s + 256]
        amax, peak = np.float32(0), np.float32(0)
        for v in block:  # the C loop: strict >, the first of equal magnitudes
            if abs(v) > amax:
                amax, peak = abs(v), v
        if amax == 0:
            out[s:s + 256] = 0
            continue
        iscale = np.float32(-127) / peak
        q = np.minimum(127, np.round(iscale * block))
        out[s:s + 256] = q * (np.float32(1) / iscale)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_q8_0_and_q8_k_are_the_c_code_block_by_block(seed: int) -> None:
    g = np.random.default_rng(seed)
    x = (g.standard_t(3, 1024) * 0.3).astype(np.float32)
    x[:32] = 0.0  # a zero block
    x[300] = 9.0  # an outlier that sets its block's scale
    x[513], x[600] = -2.5, 2.5  # equal magnitudes: the first sets Q8_K's sign
    ours = quantize_activations(torch.from_numpy(x).reshape(2, 512), "Q8_0").reshape(-1).numpy()
    assert np.array_equal(ours, _q8_0_by_block(x))
    ours = quantize_activations(torch.from_numpy(x).reshape(2, 512), "Q8_K").reshape(-1).numpy()
    assert np.array_equal(ours, _q8_K_by_block(x))


def test_every_ported_weight_type_has_its_vec_dot_type() -> None:
    from quantlib.methods._gguf_tensor import GGUF_TYPES

    assert set(GGUF_TYPES) <= set(VEC_DOT_TYPE)
    assert VEC_DOT_TYPE["Q4_K"] == "Q8_K" and VEC_DOT_TYPE["Q4_1"] == "Q8_1" and VEC_DOT_TYPE["IQ4_NL"] == "Q8_0"


def test_the_floor_llama_cpp_adds_shows_in_a_comparison(tiny_llama_dir) -> None:
    """Q8_0 weights lose almost nothing; llama.cpp's Q8_0 activations add a floor of their own. The default config
    computes as llama.cpp does (its KL above the weights-only one, the same weight bytes); `activations: false`
    shows the weights' share alone."""
    from quantlib.compare import CompareSettings, run_comparison
    from quantlib.models import load_model

    base = load_model(str(tiny_llama_dir))
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=256, window=64, device="cpu")
    result = run_comparison([{"quant_method": "gguf", "quant_type": "Q8_0"},
                             {"quant_method": "gguf", "quant_type": "Q8_0", "activations": False}],
                            settings, base=base, save=False)
    table = result.table.set_index("scheme")
    both, weights = table.loc["GGUF Q8_0", "kl"], table.loc["GGUF Q8_0, weights only", "kl"]
    assert both > 1.5 * weights > 0  # 1.8x on this tiny random model; on the default model see RESULTS.md
    assert table.loc["GGUF Q8_0", "memory_mib"] == table.loc["GGUF Q8_0, weights only", "memory_mib"]
    paths = result.details["GGUF Q8_0"]["kernel_path"]
    assert any("vec_dot_type" in p for p in paths)
