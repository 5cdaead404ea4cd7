"""The checks of the papers, on the real default model (SmolLM2-135M), on whatever backend is here.

One comparison run feeds every assertion, so the model is quantized and evaluated once per scheme.
"""

from __future__ import annotations

import pytest

from quantlib.compare import CompareSettings, run_comparison
from quantlib.memory import plan_memory
from quantlib.models import read_model_config
from quantlib.presets import preset

pytestmark = pytest.mark.slow

SCHEMES = ["nf4-dq", "nf4", "fp4", "int8"]


@pytest.fixture(scope="module")
def comparison(default_model, tmp_path_factory):
    # Two 512-token windows of natural news text: short windows of boilerplate can swap NF4 and FP4.
    settings = CompareSettings(max_tokens=1024, window=512, device="auto")
    result = run_comparison([preset(n) for n in SCHEMES], settings, base=default_model,
                            runs_folder=tmp_path_factory.mktemp("runs"))
    print("\n" + result.table.to_string(index=False))
    return result


def _row(result, label: str):
    table = result.table.set_index("scheme")
    return table.loc[label]


def test_nf4_beats_fp4_and_int8_is_close_to_the_baseline(comparison) -> None:
    base = comparison.table.iloc[0]
    nf4, fp4, int8 = _row(comparison, "NF4"), _row(comparison, "FP4"), _row(comparison, "INT8 (t=6)")
    assert nf4["perplexity"] < fp4["perplexity"]  # QLoRA: normal float beats float at 4 bits
    assert nf4["kl"] < fp4["kl"]
    assert abs(int8["perplexity"] / base["perplexity"] - 1) < 0.05  # LLM.int8(): no degradation to speak of
    assert int8["kl"] < nf4["kl"]
    assert int8["top1_agreement"] > nf4["top1_agreement"] > 0.5


def test_measured_memory_orders_and_planner_is_within_5_percent(comparison) -> None:
    mem = comparison.memory
    nf4_dq, nf4, int8, fp32 = (mem[k]["total_bytes"] for k in ("NF4+DQ", "NF4", "INT8 (t=6)", "baseline"))
    assert nf4_dq < nf4 < int8 < fp32
    model_config = read_model_config("default")
    for name, label in [("nf4-dq", "NF4+DQ"), ("nf4", "NF4"), ("fp4", "FP4"), ("int8", "INT8 (t=6)")]:
        planned = plan_memory(model_config, preset(name), "float32").total_bytes
        measured = mem[label]["total_bytes"]
        assert abs(planned / measured - 1) < 0.05, (label, planned, measured)
    assert abs(plan_memory(model_config, None, "float32").total_bytes / fp32 - 1) < 0.05


def test_every_number_names_its_backend(comparison) -> None:
    assert comparison.table["backend"].str.len().gt(0).all()
    assert comparison.run.settings["backend"]
    assert all(d["backend"]["device"] in ("cpu", "cuda") for d in comparison.details.values())
