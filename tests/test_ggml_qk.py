"""The numpy Q2_K, Q4_K and Q5_K quantizers give llama.cpp's bytes exactly (tests/data/llamacpp_golden.npz,
made by scripts/llamacpp_golden.py with ggml_quantize_chunk), with and without an importance matrix."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from quantlib.methods._ggml_qk import quantize_q2_K
from quantlib.methods._ggml_qk import quantize_q4_K
from quantlib.methods._ggml_qk import quantize_q5_K

GOLDEN = Path(__file__).parent / "data" / "llamacpp_golden.npz"
QUANTIZERS = {"Q2_K": quantize_q2_K, "Q4_K": quantize_q4_K, "Q5_K": quantize_q5_K}
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


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_bytes_equal_llamacpp(golden, qtype: str, name: str, with_imatrix: bool) -> None:
    x = golden[f"input/{name}"]
    imatrix = golden[f"imatrix/{name}"] if with_imatrix else None
    want = golden[f"{qtype}{'+imatrix' if with_imatrix else ''}/{name}"]
    ours = QUANTIZERS[qtype](x, imatrix)
    assert ours.dtype == np.uint8 and ours.shape == want.shape
    assert np.array_equal(ours, want), _describe_mismatch(ours, want, want.shape[1] // (x.shape[1] // 256))


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_gguf_dequantizes_near_input(golden, qtype: str, with_imatrix: bool) -> None:
    """gguf's own dequantizer reads our blocks back to values near the input (a sanity bound on the layout)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    x = golden["input/normal_4x256"]
    imatrix = golden["imatrix/normal_4x256"] if with_imatrix else None
    back = dequantize(QUANTIZERS[qtype](x, imatrix), getattr(GGMLQuantizationType, qtype))
    assert back.shape == x.shape
    rel = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    bound = {"Q2_K": 0.45, "Q4_K": 0.12, "Q5_K": 0.06}[qtype]
    assert rel < bound, f"{qtype}: relative RMS error {rel:.3f}"


@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_speed_on_a_layer(qtype: str) -> None:
    """A (576, 1536) matrix, with and without an imatrix: prints the seconds (no timing assert)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((576, 1536)).astype(np.float32)
    imatrix = rng.uniform(0.1, 2.0, 1536).astype(np.float32)
    for label, im in (("plain", None), ("imatrix", imatrix)):
        start = time.perf_counter()
        out = QUANTIZERS[qtype](x, im)
        print(f"{qtype} {label} (576, 1536): {time.perf_counter() - start:.2f} s")
        assert out.shape == (576, 1536 // 256 * {"Q2_K": 84, "Q4_K": 144, "Q5_K": 176}[qtype])


def _harness_inputs() -> dict[str, np.ndarray]:
    """Larger inputs whose bytes depend on the summation order (the stored golden set is too small to show it):
    rare large outliers, and near-constant rows, where the searches' errors tie to the last bits."""
    rng = np.random.default_rng(1)
    outliers = rng.standard_normal((64, 1024))
    outliers[rng.random((64, 1024)) < 0.002] *= 300
    const = np.full((64, 1024), 0.3)
    const[::2, ::7] = -0.1
    return {"outliers": outliers.astype(np.float32), "const": const.astype(np.float32)}


@pytest.mark.skipif(not HARNESS.exists(), reason="llama.cpp harness not built (scripts/llamacpp_golden.py)")
@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_bytes_equal_llamacpp_harness(tmp_path: Path, qtype: str) -> None:
    """Against the built llama.cpp itself, on inputs where a pairwise sum would change the bytes."""
    rng = np.random.default_rng(2)
    for name, x in _harness_inputs().items():
        cols = x.shape[1]
        for imatrix in (None, rng.uniform(0, 3, cols).astype(np.float32)):
            x.tofile(tmp_path / "in.f32")
            args = [str(HARNESS), qtype, str(x.shape[0]), str(cols), str(tmp_path / "in.f32"), str(tmp_path / "out.bin")]
            if imatrix is not None:
                imatrix.tofile(tmp_path / "im.f32")
                args.append(str(tmp_path / "im.f32"))
            done = subprocess.run(args, capture_output=True, text=True, timeout=120)
            assert done.stdout.strip() == "ok", done
            want = np.fromfile(tmp_path / "out.bin", dtype=np.uint8).reshape(x.shape[0], -1)
            ours = QUANTIZERS[qtype](x, imatrix)
            assert np.array_equal(ours, want), f"{name}, imatrix={imatrix is not None}: " + _describe_mismatch(
                ours, want, want.shape[1] // (cols // 256))
