"""error_metrics and code_histogram against hand-computed cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlib.metrics import code_histogram, error_metrics


def test_hand_computed_case():
    ref = torch.tensor([3.0, 4.0])
    approx = torch.tensor([3.0, 3.0])
    m = error_metrics(ref, approx)
    assert m["mse"] == pytest.approx(0.5)
    assert m["rel_fro_error"] == pytest.approx(1.0 / 5.0)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(25.0 / 1.0))
    assert m["max_abs_error"] == pytest.approx(1.0)
    assert m["cosine"] == pytest.approx(21.0 / (5.0 * math.sqrt(18.0)))


def test_exact_and_degenerate():
    x = torch.randn(4, 5)
    m = error_metrics(x, x.clone())
    assert m["mse"] == 0 and m["sqnr_db"] == math.inf and m["rel_fro_error"] == 0
    assert m["cosine"] == pytest.approx(1.0)
    z = torch.zeros(3)
    assert error_metrics(z, z)["cosine"] == 1.0
    m = error_metrics(z, torch.ones(3))
    assert m["sqnr_db"] == -math.inf and m["rel_fro_error"] == math.inf and m["cosine"] == 0.0


def test_sign_flip_and_dtypes():
    x = torch.randn(100)
    m = error_metrics(x, -x)
    assert m["cosine"] == pytest.approx(-1.0)
    assert m["rel_fro_error"] == pytest.approx(2.0)
    m16 = error_metrics(x.half(), x.bfloat16())
    assert 0 < m16["max_abs_error"] < 0.1


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        error_metrics(torch.zeros(3), torch.zeros(4))


def test_large_tensor_matches_float64():
    """Chunked fp32 dots agree with a float64 computation on 4M elements."""
    torch.manual_seed(0)
    ref = torch.randn(2048, 2048)
    approx = ref + 0.01 * torch.randn(2048, 2048)
    m = error_metrics(ref, approx)
    r, a = ref.double(), approx.double()
    noise = ((r - a) ** 2).sum().item()
    assert m["mse"] == pytest.approx(noise / r.numel(), rel=1e-5)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10((r * r).sum().item() / noise), abs=1e-4)
    cos = (r * a).sum() / (r.norm() * a.norm())
    assert m["cosine"] == pytest.approx(cos.item(), abs=1e-7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=50),
       st.floats(0.001, 10))
def test_properties(values, noise_scale):
    ref = torch.tensor(values)
    approx = ref + noise_scale
    m = error_metrics(ref, approx)
    diff = approx.double() - ref.double()  # the fp32 sums round, so compare with the real diff
    assert m["mse"] == pytest.approx(float((diff**2).mean()), rel=1e-5)
    assert m["max_abs_error"] == pytest.approx(float(diff.abs().max()), rel=1e-6)
    assert -1.0 <= m["cosine"] <= 1.0


def test_histogram_and_entropy():
    counts, h = code_histogram(torch.tensor([0, 1, 2, 3] * 10), 16)
    assert counts.dtype == torch.int64 and counts.shape == (16,)
    assert counts[:4].tolist() == [10] * 4 and counts[4:].sum() == 0
    assert h == pytest.approx(2.0)
    _, h1 = code_histogram(torch.full((7,), 5), 16)
    assert h1 == 0.0
    _, h_uniform = code_histogram(torch.arange(256).repeat(3), 256)
    assert h_uniform == pytest.approx(8.0)
    with pytest.raises(ValueError):
        code_histogram(torch.tensor([16]), 16)
    with pytest.raises(ValueError):
        code_histogram(torch.tensor([-1]), 16)
