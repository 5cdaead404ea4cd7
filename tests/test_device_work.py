"""Issue 29: tensor work runs where the model lives, and a comparison says where its time went.

A CPU-only machine cannot time a GPU, but it can see every read to the host: `HostTransfers` records each
`.cpu()`, `.numpy()` and `.tolist()` of a weight-sized tensor whatever its device (on the CPU those calls are
free, on a GPU each is a copy over the bus). These tests hold every scheme's quantizing, layer errors and layer
detail, and the recommender's per-layer measurement, to no such read; GGUF, whose math runs in numpy (llama.cpp's
own), to one read per weight. The CUDA figures themselves are tests/test_cuda.py's and the benchmark's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlib.formats import on_device
from quantlib.layers import layer_detail, layer_errors
from quantlib.models import load_model
from quantlib.presets import PRESETS, preset
from quantlib.registry import get_quantizer
from quantlib.transfers import HostTransfers


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def _runnable() -> list[str]:
    out = []
    for name in PRESETS:
        try:
            quantizer = get_quantizer(preset(name), device="cpu")
        except Exception:  # noqa: BLE001 - a method whose library is absent here (fbgemm, aqlm): not this test's
            continue
        if not quantizer.calibrated:
            out.append(name)
    return out


RUNNABLE = _runnable()


def test_the_audit_sees_host_reads_and_ignores_small_ones() -> None:
    big, small = torch.randn(64, 64), torch.randn(8)
    with HostTransfers() as audit:
        big.cpu()
        big.numpy()
        big.tolist()
        np.asarray(big)
        small.cpu()
        small.tolist()
        big.to(torch.float16)
    assert [t.call for t in audit.transfers] == ["cpu", "numpy", "tolist", "__array__"]
    assert audit.nbytes == 4 * 64 * 64 * 4


def test_the_runnable_presets_cover_every_kind_of_format() -> None:
    """The audit below runs on the presets this machine can run: reference formats, simulated torch formats,
    numpy (GGUF) and the library-backed ones; fewer would make it vacuous."""
    for name in ("nf4-dq", "fp4", "int8", "rtn-int4-g64", "gguf-q4_0", "gguf-q4_k_m", "hqq-int4-g64", "torchao-int8",
                 "quanto-int4", "fp8-block32", "ct-nvfp4", "ct-mxfp4", "ct-fp8-dynamic"):
        assert name in RUNNABLE, f"{name} did not build here"


@pytest.mark.parametrize("name", RUNNABLE)
def test_quantizing_and_layer_errors_read_no_weight_to_the_host(base, tiny_llama_dir, name) -> None:
    quantizer = get_quantizer(preset(name), device="cpu")
    with HostTransfers() as audit:
        qm = quantizer.quantize_model(base=base, source=str(tiny_llama_dir))  # bitsandbytes loads from the source
        errors = layer_errors(base.model, quantizer, quantized=qm)
        detail = layer_detail(base.model, quantizer, "model.layers.0.mlp.down_proj")
    assert len(errors) >= 14 and detail["metrics"]["mse"] > 0
    reads = [t for t in audit.transfers if t.call in ("cpu", "tolist")]
    if name.startswith("gguf"):
        # numpy's math: each weight crosses once to be quantized (the layer errors read the blocks kept), once
        # more for the detail's layer, in its own dtype
        assert len(reads) == len(errors) + 1, reads
        largest = max(p.numel() * p.element_size() for p in base.model.parameters() if p.dim() == 2)
        assert all(t.nbytes <= largest for t in reads)
    else:
        assert reads == [], reads
        assert [t for t in audit.transfers if t.call in ("numpy", "__array__")] == []


def test_the_audit_fails_a_scheme_that_reads_its_weights_to_the_host(base, monkeypatch) -> None:
    """What the test above would say of the code before issue 29 (each matrix read to the CPU first)."""
    from quantlib.methods.base.records import MatrixRef

    monkeypatch.setattr(MatrixRef, "read", lambda self: self.get().contiguous().cpu())
    quantizer = get_quantizer(preset("rtn-int4-g64"), device="cpu")
    with HostTransfers() as audit:
        quantizer.quantize_model(base=base)
    assert len([t for t in audit.transfers if t.call == "cpu"]) == 14


def test_the_recommender_measures_each_layer_without_reading_weights_to_the_host(base) -> None:
    from quantlib.baseline_cache import model_fingerprint
    from quantlib.recommend import measure_sensitivity

    model_fingerprint(base.model)  # once per model object, before the audit: the cache key hashes every byte
    with HostTransfers() as audit:
        sens = measure_sensitivity(base, "bitsandbytes", calib_tokens=64, check_layers=0, use_cache=False)
    assert len(sens.rows) > 0 and (sens.rows["error"] > 0).any()
    weights = {tuple(p.shape) for p in base.model.parameters() if p.dim() == 2}
    assert [t for t in audit.transfers if t.shape in weights] == []


def test_tables_are_copied_to_a_device_once() -> None:
    table = torch.arange(16.0)
    assert on_device(table, "cpu") is table
    first = on_device(table, "meta")
    assert first.device.type == "meta" and first.shape == table.shape
    assert on_device(table, "meta") is first


def test_gguf_blocks_come_back_where_the_weight_was() -> None:
    from quantlib.methods._gguf_tensor import GGUFTensor, quantize_gguf

    packed = quantize_gguf(torch.randn(4, 64), qtype="Q4_0")
    assert packed.device == "cpu" and packed.dequantize().device.type == "cpu"
    moved = GGUFTensor(data=packed.data, qtype=packed.qtype, shape=packed.shape, dtype=packed.dtype, device="meta")
    assert moved.dequantize().device.type == "meta"


def test_a_comparison_records_its_seconds_by_phase(tiny_llama_dir) -> None:
    from quantlib.compare import CompareSettings, run_comparison

    result = run_comparison([preset("nf4"), preset("gguf-q4_0")],
                            CompareSettings(source=str(tiny_llama_dir), max_tokens=200, window=64, device="cpu"),
                            save=False)
    phases = result.run.extra["phase_seconds"]
    assert list(phases) == ["load", "quantize", "crosscheck", "errors", "forwards", "output_head", "bookkeeping",
                            "total"]
    assert all(v >= 0 for v in phases.values())
    for phase in ("load", "quantize", "errors", "forwards", "output_head"):
        assert phases[phase] > 0, phase
    parts = sum(v for k, v in phases.items() if k != "total")
    assert parts == pytest.approx(phases["total"], rel=1e-9)
    assert phases["total"] <= result.run.settings["seconds"] + 1e-6
    # each scheme's own forward time is inside the forwards phase
    details = result.run.extra["details"]
    assert sum(d["kl"]["seconds"] for d in details.values()) <= phases["forwards"] + phases["output_head"] + 1e-6


def test_the_time_by_phase_reaches_the_page_caption_the_report_and_the_cli(tiny_llama_dir) -> None:
    from quantlib.compare import CompareSettings, run_comparison
    from quantlib.reports import phase_text, render_html

    run = run_comparison([preset("rtn-int4-g64")], CompareSettings(source=str(tiny_llama_dir), max_tokens=128,
                                                                   window=64, device="cpu"), save=False).run
    text = phase_text(run)
    assert text.startswith("load ") and "forward passes" in text  # (the tiny model's head takes under 5 ms)
    assert "Time by phase" in render_html(run) and text in render_html(run)
    run.extra.pop("phase_seconds")
    assert phase_text(run) == ""  # a run saved before phases were recorded says nothing, not zeros
