"""The numpy importance-weighted Q4_0, Q4_1, Q5_0 and Q5_1 quantizers give llama.cpp's bytes exactly
(tests/data/llamacpp_golden.npz, made by scripts/llamacpp_golden.py with ggml_quantize_chunk, and, where it is
built, the C harness itself on larger inputs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from quantlib.methods._ggml_legacy import quantize_q4_0_weighted
from quantlib.methods._ggml_legacy import quantize_q4_1_weighted
from quantlib.methods._ggml_legacy import quantize_q5_0_weighted
from quantlib.methods._ggml_legacy import quantize_q5_1_weighted

GOLDEN = Path(__file__).parent / "data" / "llamacpp_golden.npz"
QUANTIZERS = {"Q4_0": quantize_q4_0_weighted, "Q4_1": quantize_q4_1_weighted,
              "Q5_0": quantize_q5_0_weighted, "Q5_1": quantize_q5_1_weighted}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
NAMES = ("normal_4x256", "heavy_2x512", "uniform_3x768", "edge_4x256")
#: The C harness scripts/llamacpp_golden.py builds (absent in CI: the test that needs it is skipped).
HARNESS = Path.home() / ".cache" / "quantlib" / "llamacpp" / "build" / "golden_harness"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as d:
        return {k: d[k] for k in d.files}


def _describe_mismatch(ours: np.ndarray, want: np.ndarray, block_bytes: int) -> str:
    diff = np.argwhere(ours != want)
    row, col = diff[0]
    return (f"{len(diff)} bytes differ; first at row {row}, block {col // block_bytes}, byte {col % block_bytes}: "
            f"ours {ours[row, col]}, llama.cpp {want[row, col]}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_bytes_equal_llamacpp(golden, qtype: str, name: str) -> None:
    x = golden[f"input/{name}"]
    want = golden[f"{qtype}+imatrix/{name}"]
    ours = QUANTIZERS[qtype](x, golden[f"imatrix/{name}"])
    assert ours.dtype == np.uint8 and ours.shape == want.shape
    assert ours.shape[1] == x.shape[1] // 32 * BLOCK_BYTES[qtype]
    assert np.array_equal(ours, want), _describe_mismatch(ours, want, BLOCK_BYTES[qtype])


@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_gguf_dequantizes_near_input(golden, qtype: str) -> None:
    """gguf's own dequantizer reads our blocks back to values near the input (a sanity bound on the layout)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    x = golden["input/normal_4x256"]
    back = dequantize(QUANTIZERS[qtype](x, golden["imatrix/normal_4x256"]), getattr(GGMLQuantizationType, qtype))
    assert back.shape == x.shape
    rel = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    bound = {"Q4_0": 0.15, "Q4_1": 0.12, "Q5_0": 0.08, "Q5_1": 0.06}[qtype]
    assert rel < bound, f"{qtype}: relative RMS error {rel:.3f}"


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
            assert np.array_equal(ours, want), f"{name}, imatrix {kind}: " + _describe_mismatch(
                ours, want, BLOCK_BYTES[qtype])
