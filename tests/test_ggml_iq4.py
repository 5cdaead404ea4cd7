"""quantlib.methods._ggml_iq4 against llama.cpp: IQ4_NL and IQ4_XS bytes identical to `ggml_quantize_chunk`'s, with
and without an importance matrix, on hard cases from the built C harness (the stored golden bytes are checked in
tests/test_ggml_golden.py); best_index_int8's tie rule; the speed on a layer."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from quantlib.methods._ggml_iq4 import best_index_int8, quantize_iq4_nl, quantize_iq4_xs
from tests.ggml_golden import HARNESS

TYPES = {"IQ4_NL": quantize_iq4_nl, "IQ4_XS": quantize_iq4_xs}


def test_best_index_tie_rule():
    values = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
    # Below/at the ends, exactly on a level, exactly half-way (a tie goes to the upper level), NaN -> 15.
    x = np.array([-1e9, -127, -127.5, -115.5, -115.6, -4.5, -4.6, 101, 113, 200, np.nan], np.float32)
    assert best_index_int8(x).tolist() == [0, 0, 0, 1, 0, 8, 7, 15, 15, 15, 15]
    assert best_index_int8(values).tolist() == list(range(16))


@pytest.mark.skipif(not HARNESS.is_file(), reason="llama.cpp golden harness not built (scripts/llamacpp_golden.py)")
def test_more_cases_against_built_llamacpp(tmp_path):
    """Ties (inputs on levels and half-way points), zero and near-GROUP_MAX_EPS blocks, fp16 overflow of d,
    sparse importance matrices: straight from the built ggml."""
    rng = np.random.default_rng(7)
    kv = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
    ties = np.concatenate([kv, (kv[1:] + kv[:-1]) / 2])
    cases = [
        rng.choice(ties, (3, 512)) * np.float32(0.5),
        rng.integers(-8, 9, (2, 768)).astype(np.float32),
        rng.standard_normal((3, 512)).astype(np.float32) * np.repeat(rng.random((3, 16)) < 0.5, 32, axis=1),
        (rng.standard_normal((2, 256)) * np.array([[3e-16], [1e20]])).astype(np.float32),
    ]
    for i, x in enumerate(cases):
        imatrix = rng.random(x.shape[1]).astype(np.float32) * (rng.random(x.shape[1]) < 0.7)
        x.astype("<f4").tofile(tmp_path / "x.f32")
        imatrix.astype("<f4").tofile(tmp_path / "im.f32")
        for qtype, quantize in TYPES.items():
            for im in (None, imatrix):
                args = [str(HARNESS), qtype, str(x.shape[0]), str(x.shape[1]), str(tmp_path / "x.f32"),
                        str(tmp_path / "out.bin")] + ([str(tmp_path / "im.f32")] if im is not None else [])
                subprocess.run(args, check=True, capture_output=True)
                expected = np.fromfile(tmp_path / "out.bin", np.uint8).reshape(x.shape[0], -1)
                with np.errstate(all="ignore"):
                    ours = quantize(x, im)
                assert np.array_equal(ours, expected), (i, qtype, im is not None)


def test_speed_576x1536():
    x = np.random.default_rng(0).standard_normal((576, 1536)).astype(np.float32)
    imatrix = np.random.default_rng(1).random(1536).astype(np.float32)
    for qtype, quantize in TYPES.items():
        for im in (None, imatrix):
            start = time.perf_counter()
            out = quantize(x, im)
            print(f"{qtype}{'+imatrix' if im is not None else ''} (576, 1536): {time.perf_counter() - start:.2f} s")
            assert out.shape[0] == 576
