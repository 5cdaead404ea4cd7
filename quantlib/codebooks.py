"""Code tables (codebooks) of the non-uniform quantization formats, computed from their definitions.

Why computed and not typed in: a typed-in table can silently drift from the format it claims to
be (a wrong digit, a wrong order); computing it from the published recipe and testing it against
bitsandbytes' own tables pins both the numbers and our understanding of where they come from.

All tables are float32 and in *code-index order*: ``TABLE[i]`` is the value (in units of the
block's absmax) that the stored code ``i`` stands for. This is the order the packed bytes use,
which for FP4 is not sorted by value.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP4_LEVELS",
    "NF4_LEVELS",
    "dynamic_map",
    "fp4_levels",
    "nf4_levels",
]

# The outermost quantile of QLoRA's NF4 (bitsandbytes' create_normal_map default). It places the
# largest non-one level at ~1.845 standard deviations; the whole table is then scaled so that the
# extreme levels are exactly -1 and +1.
NF4_OFFSET = 0.9677083


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NormalFloat4 levels (QLoRA, Dettmers et al. 2023), sorted, which is also their code order.

    Why this shape: weights are roughly normal, so levels at equal-probability quantiles of
    N(0, 1) use each of the 16 codes about equally often. The type is asymmetric so that zero is
    exactly representable: 8 positive quantiles, 7 negative ones and an exact 0.

    Numerics follow bitsandbytes' ``create_normal_map(offset, use_extra_value=True)`` exactly so
    the table is bit-identical to the one its kernels use: the quantile *probabilities* are a
    float32 ``linspace`` (as torch's default dtype there), the inverse normal CDF is evaluated in
    float64 (``torch.special.ndtri``, no scipy), the levels are rounded to float32 and only then
    normalised by the largest one.
    """
    positive_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()
    negative_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double()
    positive = torch.special.ndtri(positive_p)
    negative = -torch.special.ndtri(negative_p)
    zero = torch.zeros(1, dtype=torch.float64)
    levels = torch.cat([positive, negative, zero]).float().sort().values
    return levels / levels.max()


def _fp4_magnitude(exponent: int, mantissa: int) -> float:
    """Magnitude of bitsandbytes' FP4 code with a 2-bit exponent field and a 1-bit mantissa.

    bitsandbytes' FP4 is e2m1-like but not OCP E2M1: its exponent field counts *down*
    (field 1 is the largest binade) and its single subnormal is 2**-4, so the magnitudes are
    0, 0.0625, 8, 12, 4, 6, 2, 3 for the 3-bit patterns 000..111 (absmax 12). We derive them from
    that layout: normal = (1 + m/2) * 2**(4 - e), subnormal (e == 0) = m * 2**-4.
    """
    if exponent == 0:
        return mantissa * 2.0**-4
    return (1.0 + mantissa / 2.0) * 2.0 ** (4 - exponent)


def fp4_levels() -> torch.Tensor:
    """bitsandbytes' FP4 levels in code-index order, normalised to [-1, 1].

    Code bit layout ``s e1 e0 m``: bit 3 is the sign, so codes 8..15 mirror codes 0..7 (code 8 is
    a "negative zero"). Normalisation divides by the largest magnitude (12), as bitsandbytes'
    ``get_4bit_type("fp4")`` does. Note: bitsandbytes' own ``create_fp8_map(True, 2, 1, 4)``,
    which its comments cite as the generator, yields a different subnormal (0.125/6, not
    0.0625/12); the kernels use the table reproduced here.
    """
    values = []
    for sign in (0, 1):
        for exponent in range(4):
            for mantissa in range(2):
                magnitude = _fp4_magnitude(exponent, mantissa)
                values.append(-magnitude if sign else magnitude)
    table = torch.tensor(values, dtype=torch.float32)
    return table / table.abs().max()


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 256-entry "dynamic" 8-bit code (Dettmers 2015) used for blockwise 8-bit quantization.

    Why: bitsandbytes' double quantization stores each 4-bit block's absmax as one byte in this
    code. It is a floating format with a *dynamic* exponent: a run of leading zero bits selects a
    decimal exponent 10**(i - 6), the remaining bits a linear fraction in (0.1, 1], so it covers
    about 7 decades with most codes near +-1. Sorted ascending; it contains 0 and 1.0 exactly.

    Numerics copy bitsandbytes' ``create_dynamic_map`` (float32 ``linspace`` midpoints times a
    Python-float power of ten), so the result is bit-identical to it.
    """
    non_sign_bits = total_bits - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        doubling = 0 if signed else 1
        n_fraction_edges = 2 ** (i + non_sign_bits - max_exponent_bits + doubling) + 1
        data += _dynamic_decade(i, max_exponent_bits, n_fraction_edges, signed)
    extra_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra_items > 0:
        data += _dynamic_decade(max_exponent_bits - 1, max_exponent_bits, extra_items + 1, signed)
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"dynamic map has {len(data)} values, expected {2 ** total_bits}")
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _dynamic_decade(i: int, max_exponent_bits: int, n_edges: int, signed: bool) -> list[float]:
    """Bin midpoints of the linear fraction in (0.1, 1], scaled to decade ``10**(i - E + 1)``."""
    edges = torch.linspace(0.1, 1, n_edges, dtype=torch.float32)
    means = (edges[:-1] + edges[1:]) / 2.0
    scale = 10 ** (-(max_exponent_bits - 1) + i)
    values = (scale * means).tolist()
    if signed:
        values += (-scale * means).tolist()
    return values


NF4_LEVELS: torch.Tensor = nf4_levels()
"""NF4 levels, float32, code order (= sorted)."""

FP4_LEVELS: torch.Tensor = fp4_levels()
"""bitsandbytes FP4 levels, float32, code order (not sorted; see :func:`fp4_levels`)."""
