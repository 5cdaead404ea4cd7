"""Memory: every tensor counted, planner equal to measurement, shapes from config.json."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantlib import parse_config
from quantlib.memory import plan_memory, plan_table
from quantlib.footprint import measure_footprint
from quantlib.methods.bitsandbytes import quantize_4bit, quantize_int8_weight
from quantlib.registry import QUANTIZER_MAPPING
from tests.conftest import tiny_llama_config

NF4_DQ = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": True}
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}


# Widths that are multiples of 64 so every block and group scheme fits; tied embeddings like SmolLM2.
TINY = dict(hidden_size=128, intermediate_size=384, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(tiny_llama_config(512, **TINY)).save_pretrained(folder, safe_serialization=True)
    return folder


def _load(folder, config=None):
    kwargs = {"dtype": torch.float32}
    if config is not None:
        kwargs.update(quantization_config=parse_config(config).to_transformers(), device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


@pytest.mark.parametrize("config", [NF4_DQ, NF4, INT8, {**NF4_DQ, "llm_int8_skip_modules": ["down_proj"]}])
def test_planner_equals_measured_footprint_for_bitsandbytes(tiny_folder, config: dict) -> None:
    model = _load(tiny_folder, config)
    measured = measure_footprint(model)
    planned = plan_memory(json.loads((tiny_folder / "config.json").read_text()), parse_config(config), "float32")
    for component, nbytes in measured.bytes_by_component.items():
        assert planned.bytes_by_component[component] == pytest.approx(nbytes, rel=1e-9, abs=0.5), component
    assert planned.total_params == measured.total_params


def test_double_quant_is_smaller_and_transformers_misses_it(tiny_folder) -> None:
    dq, plain, int8 = (measure_footprint(_load(tiny_folder, c)) for c in (NF4_DQ, NF4, INT8))
    fp32 = measure_footprint(_load(tiny_folder))
    assert dq.total_bytes < plain.total_bytes < int8.total_bytes < fp32.total_bytes
    assert fp32.total_bytes == _load(tiny_folder).get_memory_footprint()
    assert dq.quantized_bits_per_param < plain.quantized_bits_per_param


def test_analytic_storage_matches_packed_tensors() -> None:
    """The planner's per-layer formula equals what the real packed tensors hold (codes/scales/DQ)."""
    for out_f, in_f in [(576, 576), (1536, 576), (192, 576), (100, 33)]:
        w = torch.randn(out_f, in_f)
        for dq in (False, True):
            config = parse_config({**NF4, "bnb_4bit_use_double_quant": dq})
            analytic = QUANTIZER_MAPPING[config.quantizer_key].storage_bytes(config, out_f, in_f)
            packed = quantize_4bit(w, "nf4", 64, dq, backend="bitsandbytes").storage_bits
            assert analytic["codes"] == packed["codes"] / 8
            assert analytic["scales"] == packed["absmax"] / 8
            assert analytic["dq_constants"] == (packed.get("dq_absmax", 0) + packed.get("dq_offset", 0)) / 8
        config = parse_config(INT8)
        analytic = QUANTIZER_MAPPING[config.quantizer_key].storage_bytes(config, out_f, in_f)
        packed = quantize_int8_weight(w).storage_bits
        assert analytic["codes"] + analytic["scales"] == sum(packed.values()) / 8


def test_nf4_dq_bits_per_param_at_blocksize_64() -> None:
    config = parse_config(NF4_DQ)
    n_out, n_in = 4096, 4096
    parts = QUANTIZER_MAPPING[config.quantizer_key].storage_bytes(config, n_out, n_in)
    bits = 8 * (parts["codes"] + parts["scales"] + parts["dq_constants"]) / (n_out * n_in)
    # + one fp32 offset per tensor: 32 bits over 16.8M parameters.
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / (n_out * n_in), abs=1e-9)
    assert round(bits, 3) == 4.127


def test_plan_table_orders_schemes() -> None:
    cfg = tiny_llama_config(49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True).to_dict()
    table = plan_table(cfg, [parse_config(NF4_DQ), parse_config(INT8), None], "float32", available_bytes=1e12)
    totals = list(table["total MiB"])
    assert totals[0] < totals[1] < totals[2]
    assert table["fits"].all()


def test_int8_model_weights_and_scb_equal_the_quantizer(tiny_folder) -> None:
    """Every Linear8bitLt that from_pretrained built holds the int8 codes and row absmax (SCB) that the
    INT8 quantizer computes for its per-layer errors: bitsandbytes rounds the weight through fp16 first,
    even in an fp32 model (an fp32 reference differs in ~1% of the codes)."""
    import bitsandbytes as bnb

    from quantlib.registry import get_quantizer

    base = dict(_load(tiny_folder).named_modules())
    model = _load(tiny_folder, INT8)
    quantizer = get_quantizer(parse_config(INT8), device="cpu")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 14
    differs = 0
    for name, module in layers:
        weight = base[name].weight.data
        ours = quantizer.quantize_tensor(weight)
        assert torch.equal(module.weight.data, ours.codes), name
        assert torch.equal(module.weight.SCB, ours.row_absmax), name
        assert ours.dequantize().dtype == weight.dtype
        differs += int((quantize_int8_weight(weight).codes != ours.codes).sum())
    assert differs > 0  # the fp16 step matters: without it the codes would not match
