"""Histograms of block-normalized weights, the view that explains NF4 vs FP4.

bitsandbytes divides each block of 64 weights by the block's absmax before rounding to one of 16
levels, so what matters is the distribution of w / absmax(block) on [-1, 1]. NF4 places its levels
at normal quantiles, which suit that bell shape; FP4 spends levels near ±1 where few weights are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlib.codebooks import FP4_LEVELS, NF4_LEVELS


@dataclass
class BlockHistogram:
    """Counts of w/absmax over [-1, 1], and the code levels to draw over them."""

    edges: list[float]
    counts: list[int]
    blocksize: int
    numel: int
    levels: dict[str, list[float]]

    @property
    def centers(self) -> list[float]:
        return [(a + b) / 2 for a, b in zip(self.edges[:-1], self.edges[1:])]

    @property
    def density(self) -> list[float]:
        """Counts scaled to a probability density, so layers of any size compare on one axis."""
        width = self.edges[1] - self.edges[0]
        total = sum(self.counts) or 1
        return [c / total / width for c in self.counts]


def block_normalize(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """w / absmax of its block, on the flattened tensor as bitsandbytes blocks it (tail padded)."""
    flat = weight.detach().float().flatten()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (blocks / absmax).flatten()[: flat.numel()]


def block_normalized_histogram(weight: torch.Tensor, blocksize: int = 64, bins: int = 128) -> BlockHistogram:
    """Histogram of block-normalized weights with the NF4 and FP4 levels, ready for plotting."""
    normalized = block_normalize(weight, blocksize)
    counts = torch.histc(normalized, bins=bins, min=-1.0, max=1.0)
    edges = torch.linspace(-1.0, 1.0, bins + 1)
    return BlockHistogram(
        edges=[float(e) for e in edges],
        counts=[int(c) for c in counts.tolist()],  # one read of 128 numbers, not 128 (a sync each on a GPU)
        blocksize=blocksize,
        numel=normalized.numel(),
        levels={"NF4": [float(v) for v in NF4_LEVELS], "FP4": [float(v) for v in FP4_LEVELS]},
    )
