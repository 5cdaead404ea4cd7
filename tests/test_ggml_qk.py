"""The numpy Q2_K, Q4_K and Q5_K quantizers give llama.cpp's bytes exactly, with and without an importance matrix,
where it is built, from the C harness itself on inputs where the summation order shows (the stored golden bytes are
checked in tests/test_ggml_golden.py); their speed on a layer."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from quantlib.methods._ggml_qk import quantize_q2_K
from quantlib.methods._ggml_qk import quantize_q4_K
from quantlib.methods._ggml_qk import quantize_q5_K
from tests.ggml_golden import HARNESS
from tests.ggml_golden import mismatch_text

QUANTIZERS = {"Q2_K": quantize_q2_K, "Q4_K": quantize_q4_K, "Q5_K": quantize_q5_K}


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
            assert np.array_equal(ours, want), f"{name}, imatrix={imatrix is not None}: " + mismatch_text(
                ours, want, want.shape[1] // (cols // 256))
