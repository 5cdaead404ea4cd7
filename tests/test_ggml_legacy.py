"""The numpy importance-weighted Q4_0, Q4_1, Q5_0 and Q5_1 quantizers give llama.cpp's bytes exactly, where it is
built, from the C harness itself on larger inputs (the stored golden bytes are checked in tests/test_ggml_golden.py),
and reject bad shapes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from quantlib.methods._ggml_legacy import quantize_q4_0_weighted
from quantlib.methods._ggml_legacy import quantize_q4_1_weighted
from quantlib.methods._ggml_legacy import quantize_q5_0_weighted
from quantlib.methods._ggml_legacy import quantize_q5_1_weighted
from tests.ggml_golden import HARNESS
from tests.ggml_golden import mismatch_text

QUANTIZERS = {"Q4_0": quantize_q4_0_weighted, "Q4_1": quantize_q4_1_weighted,
              "Q5_0": quantize_q5_0_weighted, "Q5_1": quantize_q5_1_weighted}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}


def test_rejects_bad_shapes() -> None:
    x = np.zeros((2, 64), dtype=np.float32)
    with pytest.raises(ValueError):
        quantize_q4_0_weighted(np.zeros((2, 48), dtype=np.float32), np.ones(48, dtype=np.float32))
    with pytest.raises(ValueError):
        quantize_q5_1_weighted(x, np.ones(32, dtype=np.float32))
    with pytest.raises(ValueError):
        quantize_q4_1_weighted(x, None)


def _harness_inputs() -> dict[str, np.ndarray]:
    """Larger inputs than the stored golden set: rows whose width is not a power of two, many of them, so that
    sigma2 (summed over the whole row, then divided by n_per_row) changes the bytes if summed pairwise or
    multiplied by 1/n_per_row instead; rare large outliers, near-constant and constant-negative blocks (make_qkx3_quants' degenerate
    `max <= min` case and its ties), magnitudes from tiny to past the fp16 range, and blocks of exact levels."""
    rng = np.random.default_rng(1)
    outliers = rng.standard_normal((128, 2880))
    outliers[rng.random((128, 2880)) < 0.003] *= 300
    const = np.full((64, 1024), 0.3)
    const[::2, ::7] = -0.1
    negconst = np.full((32, 512), -0.7)
    negconst[1::2, 5::32] = -0.7000001
    negconst[::3, :64] = 0
    scales = np.repeat(10.0 ** rng.integers(-20, 6, (16, 32)), 32, axis=1)
    levels = rng.integers(-8, 8, (32, 1024)) * 0.125
    levels[rng.random((32, 1024)) < 0.01] += 1e-7
    long = rng.standard_normal((16, 11008)) * rng.uniform(0.01, 10, (16, 1))
    ties = rng.standard_normal((16, 256))
    ties[:, ::32], ties[:, 1::32] = 2.0, -2.0
    return {name: a.astype(np.float32) for name, a in {
        "outliers": outliers, "const": const, "negconst": negconst, "levels": levels, "long": long, "ties": ties,
        "mixed_scales": rng.standard_normal((16, 1024)) * scales, "huge": rng.standard_normal((16, 512)) * 1e5,
        "positive": np.abs(rng.standard_normal((32, 1024))) + 0.5,
        "uniform": rng.uniform(-1, 1, (128, 1536))}.items()}


@pytest.mark.skipif(not HARNESS.exists(), reason="llama.cpp harness not built (scripts/llamacpp_golden.py)")
@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_bytes_equal_llamacpp_harness(tmp_path: Path, qtype: str) -> None:
    """Against the built llama.cpp itself, with imatrices that are uniform, partly zero and heavy-tailed."""
    rng = np.random.default_rng(2)
    for name, x in _harness_inputs().items():
        rows, cols = x.shape
        for kind, imatrix in (("uniform", rng.uniform(0, 3, cols)),
                              ("zeros", np.where(rng.random(cols) < 0.3, 0, rng.uniform(0, 3, cols))),
                              ("lognormal", rng.lognormal(0, 2, cols))):
            imatrix = imatrix.astype(np.float32)
            x.tofile(tmp_path / "in.f32")
            imatrix.tofile(tmp_path / "im.f32")
            args = [str(HARNESS), qtype, str(rows), str(cols), str(tmp_path / "in.f32"), str(tmp_path / "out.bin"),
                    str(tmp_path / "im.f32")]
            done = subprocess.run(args, capture_output=True, text=True, timeout=120)
            assert done.stdout.strip() == "ok", done
            want = np.fromfile(tmp_path / "out.bin", dtype=np.uint8).reshape(rows, -1)
            ours = QUANTIZERS[qtype](x, imatrix)
            assert np.array_equal(ours, want), f"{name}, imatrix {kind}: " + mismatch_text(
                ours, want, BLOCK_BYTES[qtype])
