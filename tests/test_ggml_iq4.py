"""quantlib.methods._ggml_iq4 against llama.cpp: IQ4_NL and IQ4_XS bytes identical to `ggml_quantize_chunk`'s
(tests/data/llamacpp_golden.npz, made by scripts/llamacpp_golden.py), with and without an importance matrix."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from quantlib.methods._ggml_iq4 import best_index_int8, quantize_iq4_nl, quantize_iq4_xs

GOLDEN = Path(__file__).resolve().parent / "data" / "llamacpp_golden.npz"
NAMES = ("normal_4x256", "heavy_2x512", "uniform_3x768", "edge_4x256")
TYPES = {"IQ4_NL": quantize_iq4_nl, "IQ4_XS": quantize_iq4_xs}
HARNESS = Path.home() / ".cache" / "quantlib" / "llamacpp" / "build" / "golden_harness"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("qtype", list(TYPES))
def test_bytes_match_llamacpp(golden, qtype, name, with_imatrix):
    x = golden[f"input/{name}"]
    imatrix = golden[f"imatrix/{name}"] if with_imatrix else None
    expected = golden[f"{qtype}{'+imatrix' if with_imatrix else ''}/{name}"]
    ours = TYPES[qtype](x, imatrix)
    assert ours.dtype == np.uint8 and ours.shape == expected.shape
    differing = np.argwhere(ours != expected)
    assert np.array_equal(ours, expected), f"{len(differing)} bytes differ, first at (row, byte) {differing[:5].tolist()}"


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("qtype", list(TYPES))
def test_dequantizes_near_input(golden, qtype, name, with_imatrix):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    x = golden[f"input/{name}"]
    imatrix = golden[f"imatrix/{name}"] if with_imatrix else None
    y = dequantize(TYPES[qtype](x, imatrix), GGMLQuantizationType[qtype])
    assert y.shape == x.shape
    err = np.abs(y - x)
    block_max = np.repeat(np.abs(x).reshape(x.shape[0], -1, 32).max(axis=-1), 32, axis=1)
    # Every weight within a quarter of its 32-block's largest |x| (blocks under 1e-15 are stored as zeros); IQ4_XS
    # adds the error of its 6-bit block scales, steps of 1/32 of the 256-weight super-block's largest scale.
    bound = 0.25 * block_max + 1e-14
    if qtype == "IQ4_XS":
        bound += 0.05 * np.repeat(np.abs(x).reshape(x.shape[0], -1, 256).max(axis=-1), 256, axis=1)
    assert np.all(err <= bound)
    assert np.sqrt(np.sum(np.square(y - x, dtype=np.float64)) / np.sum(np.square(x, dtype=np.float64))) < 0.15


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
