"""The float32 arithmetic every port of llama.cpp's quantizers relies on (quantlib/methods/_ggml_common.py)."""

from __future__ import annotations

import numpy as np
import pytest

from quantlib.methods._ggml_common import nearest_int, seq_sum


def _loop(values: np.ndarray, axis: int) -> np.ndarray:
    """C's `float sum = 0; for (...) sum += v[i];`, one numpy float32 addition per element."""
    values = np.moveaxis(values.astype(np.float32), axis, -1)
    total = np.zeros(values.shape[:-1], dtype=np.float32)
    for i in range(values.shape[-1]):
        total = total + values[..., i]
    return total


@pytest.mark.parametrize("shape,axis", [((32, 5000), 0), ((5000, 32), -1), ((7, 16, 33), 1), ((256, 3, 4), 0),
                                        ((9, 256), -1), ((300,), 0), ((1, 256), -1), ((4096, 1), 0),
                                        ((256, 1, 1), 0), ((256, 2), 0), ((2, 256), -1)])
def test_seq_sum_adds_in_c_s_order(shape, axis):
    """Values of wildly different magnitudes make any other order (numpy's pairwise sum) round differently."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 9, shape)).astype(np.float32)
    assert np.array_equal(seq_sum(values, axis=axis), _loop(values, axis))


def test_the_order_matters_on_these_values():
    """numpy's own sum along the fast axis (pairwise) differs from C's order on such values: the test above can
    fail."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((5000, 32)) * 10.0 ** rng.integers(-8, 9, (5000, 32))).astype(np.float32)
    assert not np.array_equal(values.sum(axis=-1, dtype=np.float32), _loop(values, -1))


def test_seq_sum_of_negative_zeros_is_positive_zero_as_in_c():
    values = np.full((4, 3), -0.0, dtype=np.float32)
    out = seq_sum(values, axis=0)
    assert np.array_equal(out, np.zeros(3, np.float32)) and not np.signbit(out).any()


def test_nearest_int_is_ggml_s_bit_trick():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.4999998, 4194303.0, -4194303.0], dtype=np.float32)
    assert nearest_int(x).tolist() == [0, 2, 2, 0, -2, 3, 4194303, -4194303]


def test_a_single_row_is_quantized_as_inside_many():
    """A slice of one row (by_rows' tail) sums each block alone: it must give the bytes that row gets among others
    (numpy would sum a lone row pairwise, which differs on a few of these rows)."""
    from quantlib.methods._ggml_iqgrid import quantize_iq
    from quantlib.methods._ggml_legacy import quantize_q4_0_weighted

    rng = np.random.default_rng(5)
    for _ in range(30):
        x = (rng.standard_normal((2, 4096)) * 10.0 ** rng.integers(-3, 3, (2, 4096))).astype(np.float32)
        imatrix = rng.random(4096).astype(np.float32)
        assert np.array_equal(quantize_q4_0_weighted(x[:1], imatrix), quantize_q4_0_weighted(x, imatrix)[:1])
        assert np.array_equal(quantize_iq("IQ2_S", x[:1, :256], imatrix[:256]),
                              quantize_iq("IQ2_S", x[:, :256], imatrix[:256])[:1])
