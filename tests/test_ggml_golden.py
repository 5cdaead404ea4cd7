"""Every ported GGML type (tests/ggml_golden.PORTS: Q2_K to Q6_K, IQ4_NL, IQ4_XS, the lattice types IQ3_S to IQ1_S
and the importance-weighted Q4_0, Q4_1, Q5_0, Q5_1) gives llama.cpp's bytes exactly on the stored golden tensors
(tests/data/llamacpp_golden.npz, made by scripts/llamacpp_golden.py with `ggml_quantize_chunk`), with and without
an importance matrix, and gguf's own dequantizer reads those bytes back to values near the input."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from tests.ggml_golden import NAMES
from tests.ggml_golden import PORTS
from tests.ggml_golden import load_golden
from tests.ggml_golden import mismatch_text

IQ4 = ("IQ4_NL", "IQ4_XS")

#: Bound on the relative RMS error of gguf's dequantization of our bytes.
RMS_BOUND = {"Q2_K": 0.45, "Q3_K": 0.2, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03, "IQ4_NL": 0.15, "IQ4_XS": 0.15,
             "IQ3_S": 0.2, "IQ3_XXS": 0.25, "IQ2_S": 0.32, "IQ2_XS": 0.38, "IQ2_XXS": 0.42,
             "IQ1_M": 0.65, "IQ1_S": 0.6,
             "Q4_0": 0.15, "Q4_1": 0.12, "Q5_0": 0.08, "Q5_1": 0.06}


def _cases(qtypes, names) -> list:
    """(qtype, name, with_imatrix) for each golden entry of these types and inputs: with and without an imatrix,
    or with one only for the types that require it (the legacy types' plain golden bytes have no port)."""
    return [pytest.param(qtype, name, with_imatrix, id=f"{qtype}-{name}-{'imatrix' if with_imatrix else 'plain'}")
            for qtype in qtypes for name in names
            for with_imatrix in ((True,) if PORTS[qtype][1] else (False, True))]


def _quantize(qtype: str, name: str, with_imatrix: bool) -> tuple[np.ndarray, np.ndarray]:
    """The golden input and our bytes for it."""
    golden = load_golden()
    x = golden[f"input/{name}"]
    return x, PORTS[qtype][0](x, golden[f"imatrix/{name}"] if with_imatrix else None)


@pytest.mark.parametrize(("qtype", "name", "with_imatrix"), _cases(PORTS, NAMES))
def test_bytes_equal_llamacpp(qtype: str, name: str, with_imatrix: bool) -> None:
    x, ours = _quantize(qtype, name, with_imatrix)
    want = load_golden()[f"{qtype}{'+imatrix' if with_imatrix else ''}/{name}"]
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    assert ours.dtype == np.uint8 and ours.shape == want.shape == (x.shape[0], x.shape[1] // block_size * block_bytes)
    assert np.array_equal(ours, want), mismatch_text(ours, want, block_bytes)


def _iq4_weight_bound(qtype: str, x: np.ndarray) -> np.ndarray:
    """Every weight within a quarter of its 32-block's largest |x| (blocks under 1e-15 are stored as zeros); IQ4_XS
    adds the error of its 6-bit block scales, steps of 1/32 of the 256-weight super-block's largest scale."""
    bound = 0.25 * np.repeat(np.abs(x).reshape(x.shape[0], -1, 32).max(axis=-1), 32, axis=1) + 1e-14
    if qtype == "IQ4_XS":
        bound += 0.05 * np.repeat(np.abs(x).reshape(x.shape[0], -1, 256).max(axis=-1), 256, axis=1)
    return bound


@pytest.mark.parametrize(("qtype", "name", "with_imatrix"),
                         _cases([q for q in PORTS if q not in IQ4], NAMES[:1]) + _cases(IQ4, NAMES))
def test_gguf_dequantizes_near_input(qtype: str, name: str, with_imatrix: bool) -> None:
    """gguf's own dequantizer reads our blocks back to values near the input (a sanity bound on the layout): the
    relative RMS error under the type's bound, and for IQ4 (checked on every golden input) each weight's error
    under its block's bound."""
    x, ours = _quantize(qtype, name, with_imatrix)
    back = dequantize(ours, GGMLQuantizationType[qtype])
    assert back.shape == x.shape
    if qtype in IQ4:
        assert np.all(np.abs(back - x) <= _iq4_weight_bound(qtype, x))
    rel = np.sqrt(np.sum(np.square(back - x, dtype=np.float64)) / np.sum(np.square(x, dtype=np.float64)))
    assert rel < RMS_BOUND[qtype], f"{qtype}: relative RMS error {rel:.3f}"
