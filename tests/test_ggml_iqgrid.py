"""llama.cpp's lattice quantizers IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS (quantlib/methods/_ggml_iqgrid.py) and
IQ1_M, IQ1_S (quantlib/methods/_ggml_iq1.py):
byte for byte what the built ggml writes on harder inputs than the stored goldens (tests/test_ggml_golden.py holds
them to the goldens in CI), refused without an importance matrix where llama.cpp refuses, and read back by the
gguf package's dequantizers near the input."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from quantlib.methods._ggml_iq1 import quantize_iq1
from quantlib.methods._ggml_iqgrid import GRIDS, SPECS, quantize_iq, requires_imatrix, tables
from tests.ggml_golden import HARNESS

TYPES = (*SPECS, "IQ1_M", "IQ1_S")


def _quantize(qtype, x, imatrix=None):
    return quantize_iq1(qtype, x, imatrix) if qtype.startswith("IQ1") else quantize_iq(qtype, x, imatrix)


def _needs_imatrix(qtype):
    """ggml's own quantizer asserts an importance matrix for these (llama-quantize wants one for more)."""
    return qtype == "IQ1_S" or (qtype in SPECS and requires_imatrix(qtype))


def _hard_cases(rng: np.random.Generator) -> list[np.ndarray]:
    """Sub-blocks of zeros between others (IQ3_S packs the grid bytes of its non-zero sub-blocks in turn),
    magnitudes at the groups' threshold, values on lattice points (ties of the rounding), an outlier per block,
    a super-block of zeros, and scales near fp16's limits."""
    sparse = rng.standard_normal((3, 512)).astype(np.float32) * np.repeat(rng.random((3, 32)) < 0.6, 16, axis=1)
    lattice = (rng.integers(0, 8, (2, 512)) * 2 + 1).astype(np.float32) * rng.choice([-1, 1], (2, 512))
    outliers = rng.standard_normal((2, 768)).astype(np.float32)
    outliers[:, ::97] *= 60
    tiny = (rng.standard_normal((3, 256)) * np.array([[2e-8], [5e-16], [1e-30]])).astype(np.float32)
    zeros = np.zeros((1, 512), np.float32)
    zeros[0, 300:310] = 0.5
    wide = (rng.standard_normal((2, 256)) * np.array([[1e4], [1e-5]])).astype(np.float32)
    return [sparse, lattice, outliers, tiny, zeros, wide]


@pytest.mark.skipif(not HARNESS.is_file(), reason="llama.cpp golden harness not built (scripts/llamacpp_golden.py)")
def test_hard_cases_against_built_llamacpp(tmp_path):
    rng = np.random.default_rng(11)
    for i, x in enumerate(_hard_cases(rng)):
        imatrix = (rng.random(x.shape[1]) * (rng.random(x.shape[1]) < 0.8)).astype(np.float32)
        x.astype("<f4").tofile(tmp_path / "x.f32")
        imatrix.astype("<f4").tofile(tmp_path / "im.f32")
        for qtype in TYPES:
            for im in ((imatrix,) if _needs_imatrix(qtype) else (None, imatrix)):
                args = [str(HARNESS), qtype, str(x.shape[0]), str(x.shape[1]), str(tmp_path / "x.f32"),
                        str(tmp_path / "out.bin")] + ([str(tmp_path / "im.f32")] if im is not None else [])
                subprocess.run(args, check=True, capture_output=True)
                expected = np.fromfile(tmp_path / "out.bin", np.uint8).reshape(x.shape[0], -1)
                with np.errstate(all="ignore"):
                    ours = _quantize(qtype, x, im)
                diff = np.argwhere(ours != expected)
                assert not len(diff), (i, qtype, im is not None, diff[:4].tolist())


@pytest.mark.parametrize("qtype", ["IQ2_XXS", "IQ2_XS", "IQ1_S"])
def test_refused_without_importance_matrix(qtype):
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    assert _needs_imatrix(qtype)
    with pytest.raises(ValueError, match="needs an importance matrix"):
        _quantize(qtype, x)


def test_row_length_and_imatrix_length_checked():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_iq("IQ3_S", np.zeros((2, 300), np.float32))
    with pytest.raises(ValueError, match="importance matrix has 128 values"):
        quantize_iq("IQ3_S", np.zeros((2, 256), np.float32), np.ones(128, np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_iq1("IQ1_M", np.zeros((2, 300), np.float32))
    with pytest.raises(ValueError, match="importance matrix has 128 values"):
        quantize_iq1("IQ1_M", np.zeros((2, 256), np.float32), np.ones(128, np.float32))


@pytest.mark.parametrize("grid", list(GRIDS))
def test_tables_as_llamacpp_builds_them(grid):
    """Every lattice point off the grid has neighbours, all of them on the grid, in (distance, index) order,
    holding exactly the nwant smallest distances; every grid point maps back to its index."""
    (group, bits, _, nwant), t = GRIDS[grid], tables(grid)
    shifts = bits * np.arange(group)
    assert np.array_equal(t.kmap[(t.levels << shifts).sum(axis=1)], np.arange(len(t.levels)))
    rng = np.random.default_rng(3)
    for u in rng.choice(np.flatnonzero(t.kmap < 0), 50, replace=False):
        pos = 2 * ((u >> shifts) & ((1 << bits) - 1)) + 1
        d2 = ((t.points.astype(int) - pos) ** 2).sum(axis=1)
        listed = t.neighbours(u)
        wanted = np.unique(d2)[:nwant]
        expected = sorted(np.flatnonzero(np.isin(d2, wanted)), key=lambda j: (d2[j], j))
        assert listed.tolist() == expected


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_reads_back_near_input(qtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    imatrix = rng.random(1024).astype(np.float32) + 0.1
    back = dequantize(_quantize(qtype, x, imatrix), GGMLQuantizationType[qtype])
    rel = np.sqrt(np.sum((back - x) ** 2) / np.sum(x ** 2))
    bound = {"IQ2_XXS": 0.4, "IQ2_XS": 0.36, "IQ2_S": 0.3, "IQ3_XXS": 0.23, "IQ3_S": 0.18, "IQ1_M": 0.58,
             "IQ1_S": 0.6}[qtype]
    assert back.shape == x.shape and rel < bound, f"{qtype}: relative RMS error {rel:.3f}"
