"""The rounding of bitsandbytes' CPU quantizers, reproduced bit for bit in torch: the NF4/FP4 code tables and
their nearest-level lookups, the blockwise scaling, nibble packing, and the 8-bit dynamic map's lookup table.
The tensor formats (`formats`) build on these."""

from __future__ import annotations

from functools import lru_cache

import torch

from quantlib.codebooks import FP4_LEVELS, NF4_LEVELS
from quantlib.formats import block_absmax, on_device

# bitsandbytes guards 1/absmax with this floor (a zero block would divide by zero).
_ABSMAX_FLOOR = 1e-38
_LUT_SIZE = 65536


def _levels(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return NF4_LEVELS
    if quant_type == "fp4":
        return FP4_LEVELS
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


@lru_cache(maxsize=None)
def _bucket_table(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between value-sorted levels and the sorted-position -> code-index map.

    Nearest-level rounding is then one ``bucketize`` (binary search over 15 midpoints) instead of
    an argmin over 16 distances. A value exactly on a midpoint goes to the *lower* level
    (``bucketize`` with ``right=False``), as in bitsandbytes. The sort is stable so FP4's +0
    (code 0) sorts before its -0 (code 8): values in (0, 0.0026] then get code 8, a quirk
    bitsandbytes has too (harmless: both mean 0).
    """
    levels = _levels(quant_type)
    order = torch.sort(levels, stable=True).indices
    sorted_levels = levels[order]
    midpoints = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    return midpoints, order.to(torch.uint8)


@lru_cache(maxsize=None)
def _pair_table(quant_type: str) -> torch.Tensor:
    """(256, 2) fp32: the two levels a packed byte stands for (high nibble first).

    Dequantizing with one gather per *byte* halves the number of gathers.
    """
    levels = _levels(quant_type)
    byte = torch.arange(256)
    return torch.stack([levels[byte >> 4], levels[byte & 0x0F]], dim=1).contiguous()


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bytes -> uint8 codes, high nibble first, trimmed to ``n`` (drops the pad nibble)."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return codes[:n]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (even length) -> bytes ``(first << 4) | second``, shape (n/2, 1) like bnb."""
    pairs = codes.view(-1, 2)
    packed = pairs[:, 0] << 4
    packed |= pairs[:, 1]
    return packed.unsqueeze(1)


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block to [-1, 1] exactly as bitsandbytes' reference quantizer does.

    Full blocks: ``x * (1 / max(absmax, 1e-38))`` (a reciprocal, then a multiply); the partial
    last block: ``x / max(absmax, 1e-38)`` (a true division), and its stored absmax is the
    *floored* one (1e-38 for an all-zero tail) while full blocks store the raw absmax. Matching
    these details is what makes the codes bit-identical. No clamp to [-1, 1] is needed: a value
    that rounds past +-1 lands in the outermost bucket anyway.
    """
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    pieces, absmaxes = [], []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        absmax = block_absmax(blocks)
        inv = torch.reciprocal(absmax.clamp(min=_ABSMAX_FLOOR))
        pieces.append(torch.mul(blocks, inv.unsqueeze(1)).view(-1))
        absmaxes.append(absmax)
    if rem:
        tail = flat[full:]
        tail_absmax = tail.abs().max().clamp(min=_ABSMAX_FLOOR)
        pieces.append(tail / tail_absmax)
        absmaxes.append(tail_absmax.reshape(1))
    scaled = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    return scaled, absmax


def _flat_float(w: torch.Tensor) -> torch.Tensor:
    """Flattened fp32 view/copy of ``w`` (a view when it already is contiguous fp32)."""
    return w.reshape(-1).float()


# --------------------------------------------------------------------------------------------
# Blockwise 8-bit with the dynamic map (used for double quantization)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _nearest_code_lut(code_key: tuple[float, ...]) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer: a 65536-entry lookup table over [-1, 1].

    The CPU kernel does not search the code for the nearest value; it maps the scaled value to
    one of 65536 evenly spaced grid points and returns the code nearest to *that grid point*
    (first code whose upper midpoint is >= it). This differs from exact nearest rounding for
    values close to a midpoint, so we reproduce the table to get identical codes.
    """
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32)
    grid = (2.0 * grid) / float(_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def _lut_index(scaled: torch.Tensor) -> torch.Tensor:
    """The kernel's grid index: ``uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`` in fp32."""
    idx = scaled.clamp(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5)
    return idx.to(torch.int64)


def _quantize_blockwise_flat(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit codes and fp32 absmax of a flat fp32 tensor, as bitsandbytes' CPU kernel.

    Per block: absmax = max |x| (stored as is, including 0), codes of an all-zero block are 0,
    otherwise ``lut[grid_index(x * (1 / absmax))]``.
    """
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    blocks = padded.view(-1, blocksize)
    absmax = block_absmax(blocks)
    inv = torch.where(absmax > 0, torch.reciprocal(absmax), torch.zeros_like(absmax))
    scaled = blocks * inv.unsqueeze(1)
    codes = on_device(_nearest_code_lut(tuple(code.tolist())), flat.device)[_lut_index(scaled)]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def _dequantize_blockwise_flat(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """fp32 ``code[codes] * absmax[block]`` over a flat code vector (last block may be partial)."""
    n = codes.numel()
    values = on_device(code, codes.device).index_select(0, codes.reshape(-1).int())
    pad = (-n) % blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.view(-1, blocksize).mul_(absmax.unsqueeze(1))
    return values.reshape(-1)[:n]


_CELLS = 1 << 16  # grid cells over [-1, 1] for the fast nearest-level lookup
_AMBIGUOUS = 255
_MAGIC = float(2**23)  # adding 2**23 to a float in [0, 2**17) leaves round(x) in its low bits
_CELL_MASK = 0x3FFFF  # 18 low bits; cells past _CELLS (only from inf/NaN) resolve exactly


@lru_cache(maxsize=None)
def _cell_table(quant_type: str) -> torch.Tensor:
    """uint8 code for each grid cell of [-1, 1], or 255 where a cell is near a midpoint.

    (Indices past the grid, reachable only from inf/NaN inputs, are 255 as well.)

    Why: ``bucketize`` (a binary search per element) dominated the reference quantizer. Instead
    we compute each value's grid cell with one fused multiply-add (folded into the per-block
    scale), read the code from this table, and resolve only values in the few cells within one
    cell of a midpoint exactly (about 0.05% of values). A cell is marked unambiguous only if the
    whole interval one cell wider on both sides holds no midpoint, so the rounding of the cell
    computation can never change a code: results equal ``bucketize`` bit for bit.
    """
    midpoints, order = _bucket_table(quant_type)
    cell = torch.arange(_CELLS + 1, dtype=torch.float64)
    lo = (cell - 1.5) * 2.0 / _CELLS - 1.0
    hi = (cell + 1.5) * 2.0 / _CELLS - 1.0
    mids = midpoints.double()
    first = torch.bucketize(lo, mids)
    last = torch.bucketize(hi, mids)
    table = torch.full((_CELL_MASK + 1,), _AMBIGUOUS, dtype=torch.uint8)
    table[: _CELLS + 1] = order[first.clamp(max=len(order) - 1)]
    table[: _CELLS + 1][first != last] = _AMBIGUOUS
    return table


def _nearest_codes_fast(
    blocks: torch.Tensor, inv: torch.Tensor, quant_type: str
) -> torch.Tensor:
    """Codes of ``blocks * inv`` (per row), equal to bucketize on the exactly scaled values."""
    midpoints, order = (on_device(t, blocks.device) for t in _bucket_table(quant_type))
    half = _CELLS / 2
    grid_scale = inv * half
    grid = torch.mul(blocks, grid_scale.unsqueeze(1)).add_(_MAGIC + half)
    cells = grid.view(torch.int32).bitwise_and_(_CELL_MASK).view(-1)
    codes = on_device(_cell_table(quant_type), cells.device).index_select(0, cells)
    del grid, cells
    fix = torch.nonzero(codes == _AMBIGUOUS).view(-1)
    if fix.numel():
        rows = torch.div(fix, blocks.shape[1], rounding_mode="floor")
        exact = blocks.reshape(-1)[fix] * inv[rows]
        codes[fix] = order[torch.bucketize(exact, midpoints).long()]
    # Blocks the grid cannot handle, redone exactly as bnb does: NaN or inf inside (NaN or 0
    # inverse) and zero or tiny absmax (below ~3e-34 the grid scale overflows to inf).
    bad = torch.nonzero(~torch.isfinite(grid_scale) | (grid_scale == 0)).view(-1)
    if bad.numel():
        exact = blocks[bad] * inv[bad].unsqueeze(1)
        codes.view(blocks.shape)[bad] = order[torch.bucketize(exact, midpoints).long()]
    return codes


def _quantize_4bit_torch(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes and fp32 absmax, bit-identical to ``bitsandbytes.functional.quantize_4bit``.

    Full blocks use the table lookup of :func:`_nearest_codes_fast`; the (at most one) partial
    block goes through :func:`_scaled_blocks` and ``bucketize`` exactly like bitsandbytes.
    """
    midpoints, order = (on_device(t, w.device) for t in _bucket_table(quant_type))
    flat = _flat_float(w)
    n = flat.numel()
    full = n - n % blocksize
    parts, absmaxes = [], []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        absmax = block_absmax(blocks)
        inv = torch.reciprocal(absmax.clamp(min=_ABSMAX_FLOOR))
        parts.append(_nearest_codes_fast(blocks, inv, quant_type))
        absmaxes.append(absmax)
    if full < n:
        scaled, tail_absmax = _scaled_blocks(flat[full:], blocksize)
        parts.append(order[torch.bucketize(scaled, midpoints).long()])
        absmaxes.append(tail_absmax)
    if n % 2:
        parts.append(order[torch.bucketize(torch.zeros(1, device=w.device), midpoints).long()])  # pad nibble = code of 0.0
    codes = parts[0] if len(parts) == 1 else torch.cat(parts)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    return _pack_nibbles(codes), absmax
