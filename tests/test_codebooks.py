"""The computed code tables must equal the ones bitsandbytes' kernels use, bit for bit."""

import bitsandbytes.functional as bnbf
import torch

from quantlib.codebooks import FP4_LEVELS, NF4_LEVELS, dynamic_map, fp4_levels, nf4_levels


def test_nf4_equals_bitsandbytes_table():
    assert NF4_LEVELS.dtype == torch.float32 and NF4_LEVELS.shape == (16,)
    assert torch.equal(NF4_LEVELS, bnbf.get_4bit_type("nf4", device="cpu"))


def test_nf4_shape_of_definition():
    """Sorted, exact -1, 0 and 1, 8 positive and 7 negative levels."""
    assert torch.all(NF4_LEVELS[1:] > NF4_LEVELS[:-1])
    assert NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[15] == 1.0
    assert int((NF4_LEVELS > 0).sum()) == 8 and int((NF4_LEVELS < 0).sum()) == 7


def test_nf4_changes_with_offset():
    assert not torch.equal(nf4_levels(0.99), NF4_LEVELS)


def test_fp4_equals_bitsandbytes_table_in_code_order():
    assert torch.equal(FP4_LEVELS, bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(fp4_levels()[8:], -fp4_levels()[:8])  # sign bit is bit 3
    assert FP4_LEVELS.abs().max() == 1.0


def test_dynamic_map_equals_bitsandbytes():
    for signed in (True, False):
        ours = dynamic_map(signed=signed)
        assert ours.shape == (256,) and ours.dtype == torch.float32
        assert torch.equal(ours, bnbf.create_dynamic_map(signed=signed))
    signed_map = dynamic_map()
    assert torch.all(signed_map[1:] >= signed_map[:-1])
    assert signed_map.max() == 1.0 and (signed_map == 0).any()


def test_nf4_midpoints_are_the_cuda_kernels_thresholds() -> None:
    """bitsandbytes' CUDA NF4 tree (csrc/kernels.cu, dQuantizeNF4) splits at exactly our fp32 midpoints, so NF4
    codes agree on CUDA for every input; FP4's literals sit a few ulp off (tests/test_cuda.py checks the kernels)."""
    from quantlib.methods.bitsandbytes.rounding import _bucket_table
    from tests.test_cuda import FP4_CUDA_THRESHOLDS, NF4_CUDA_THRESHOLDS

    assert torch.equal(_bucket_table("nf4")[0], NF4_CUDA_THRESHOLDS)
    fp4 = _bucket_table("fp4")[0]
    positive = fp4[fp4 > 0]
    ulp = torch.nextafter(positive, torch.tensor(float("inf"))) - positive
    assert ((positive - FP4_CUDA_THRESHOLDS).abs() / ulp).max() == 14  # 0.00260417f against 0.0026041667
