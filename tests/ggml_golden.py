"""Shared setup for the tests that hold quantlib's numpy GGML quantizers to llama.cpp's bytes (a support module,
not a test file).

tests/data/llamacpp_golden.npz is made by scripts/llamacpp_golden.py with `ggml_quantize_chunk`: for each input
`input/<name>` and importance matrix `imatrix/<name>`, the bytes `<qtype>/<name>` (no imatrix) and
`<qtype>+imatrix/<name>`. The same script builds HARNESS, the C harness the fuzz tests run on larger inputs.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np

from quantlib.methods._ggml_iq4 import quantize_iq4_nl
from quantlib.methods._ggml_iq1 import quantize_iq1
from quantlib.methods._ggml_iq4 import quantize_iq4_xs
from quantlib.methods._ggml_iqgrid import quantize_iq2_s
from quantlib.methods._ggml_iqgrid import quantize_iq2_xs
from quantlib.methods._ggml_iqgrid import quantize_iq2_xxs
from quantlib.methods._ggml_iqgrid import quantize_iq3_s
from quantlib.methods._ggml_iqgrid import quantize_iq3_xxs
from quantlib.methods._ggml_legacy import quantize_q4_0_weighted
from quantlib.methods._ggml_legacy import quantize_q4_1_weighted
from quantlib.methods._ggml_legacy import quantize_q5_0_weighted
from quantlib.methods._ggml_legacy import quantize_q5_1_weighted
from quantlib.methods._ggml_q3q6 import quantize_q3_K
from quantlib.methods._ggml_q3q6 import quantize_q6_K
from quantlib.methods._ggml_qk import quantize_q2_K
from quantlib.methods._ggml_qk import quantize_q4_K
from quantlib.methods._ggml_qk import quantize_q5_K

GOLDEN = Path(__file__).resolve().parent / "data" / "llamacpp_golden.npz"
#: The golden inputs (each stored with its importance matrix).
NAMES = ("normal_4x256", "heavy_2x512", "uniform_3x768", "edge_4x256")
#: The C harness scripts/llamacpp_golden.py builds (absent in CI: the tests that need it are skipped).
HARNESS = Path.home() / ".cache" / "quantlib" / "llamacpp" / "build" / "golden_harness"

#: Every ported type: qtype -> (quantize(x, imatrix) -> uint8 bytes, imatrix_required). The legacy types are
#: ported only in their importance-weighted form, so they exist only with an imatrix.
PORTS: dict[str, tuple[Callable[..., np.ndarray], bool]] = {
    "Q2_K": (quantize_q2_K, False),
    "Q3_K": (quantize_q3_K, False),
    "Q4_K": (quantize_q4_K, False),
    "Q5_K": (quantize_q5_K, False),
    "Q6_K": (quantize_q6_K, False),
    "IQ4_NL": (quantize_iq4_nl, False),
    "IQ4_XS": (quantize_iq4_xs, False),
    "IQ3_S": (quantize_iq3_s, False),
    "IQ3_XXS": (quantize_iq3_xxs, False),
    "IQ2_S": (quantize_iq2_s, False),
    "IQ2_XS": (quantize_iq2_xs, True),
    "IQ2_XXS": (quantize_iq2_xxs, True),
    "IQ1_M": (lambda x, imatrix=None: quantize_iq1("IQ1_M", x, imatrix), False),
    "IQ1_S": (lambda x, imatrix=None: quantize_iq1("IQ1_S", x, imatrix), True),
    "Q4_0": (quantize_q4_0_weighted, True),
    "Q4_1": (quantize_q4_1_weighted, True),
    "Q5_0": (quantize_q5_0_weighted, True),
    "Q5_1": (quantize_q5_1_weighted, True),
}


@cache
def load_golden() -> dict[str, np.ndarray]:
    """The golden file as a dict of arrays, read once per session (read-only: every test shares them)."""
    with np.load(GOLDEN) as data:
        arrays = {key: data[key] for key in data.files}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def mismatch_text(ours: np.ndarray, want: np.ndarray, block_bytes: int | None = None) -> str:
    """How two equally shaped (rows, bytes) arrays differ: the count and the first differing byte (as row, block
    and byte in the block where block_bytes is given, else as row and byte in the row)."""
    diff = np.argwhere(ours != want)
    if not len(diff):
        return "no bytes differ"
    row, col = diff[0]
    where = f"row {row}, byte {col}" if block_bytes is None else \
        f"row {row}, block {col // block_bytes}, byte {col % block_bytes}"
    return f"{len(diff)} bytes differ; first at {where}: ours {ours[row, col]}, llama.cpp {want[row, col]}"
