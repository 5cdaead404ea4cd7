"""GPTQ, AWQ and AQLM: exact interchange with transformers and real checkpoints, shapes, storage."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AqlmConfig, AwqConfig, GPTQConfig, LlamaConfig

from quantlib import CONFIG_MAPPING, BackendUnavailableError, ConfigError, parse_config
from quantlib.registry import preflight
from quantlib.cli import main
from quantlib.methods._gptqmodel_config import (AWQ_BACKENDS, AWQ_FORMATS, GPTQ_BACKENDS, GPTQ_DATASET_NAMES,
                                                GPTQ_FORMATS)
from quantlib.methods.aqlm import AqlmQuantConfig, AqlmQuantizer
from quantlib.methods.awq import AwqQuantConfig, AwqQuantizer
from quantlib.methods.gptq import GPTQQuantConfig, GPTQQuantizer
from quantlib.memory import plan_memory
from quantlib.models import read_model_config
from quantlib.presets import PRESETS, preset, runnable_presets
from quantlib.registry import get_quantizer, QUANTIZER_MAPPING

logging.getLogger("transformers").setLevel(logging.ERROR)

HF = {"gptq": GPTQConfig, "awq": AwqConfig, "aqlm": AqlmConfig}

# ----------------------------------------------------------------------------------------
# real checkpoint blocks, verbatim
# ----------------------------------------------------------------------------------------

#: TheBloke/Llama-2-7B-Chat-GPTQ config.json (AutoGPTQ), as quoted in intel/neural-compressor's
#: `change_config_to_hf_format` ("Refer to https://huggingface.co/TheBloke/Llama-2-7B-Chat-GPTQ/blob/main/config.json").
THEBLOKE_LLAMA2_GPTQ = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "sym": True,
                        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
                        "quant_method": "gptq"}
#: Qwen/Qwen2.5-Coder-1.5B-Instruct-GPTQ-Int4 config.json (optimum via transformers 4.39), quoted
#: verbatim from its resolve/main/config.json in a public benchmarking repo's model-selection notes.
QWEN25_CODER_GPTQ = {"batch_size": 1, "bits": 4, "block_name_to_quantize": None, "cache_block_outputs": True,
                     "damp_percent": 0.01, "dataset": None, "desc_act": False, "exllama_config": {"version": 1},
                     "group_size": 128, "max_input_length": None, "model_seqlen": None,
                     "module_name_preceding_first_block": None, "modules_in_block_to_quantize": None,
                     "pad_token_id": None, "quant_method": "gptq", "sym": True, "tokenizer": None,
                     "true_sequential": True, "use_cuda_fp16": False, "use_exllama": True}
#: config.json written by gptqmodel 5.7.0 (MiniCPM-SALA int4 quantization log in a public repo).
GPTQMODEL_570 = {
    "bits": 4, "checkpoint_format": "gptq", "desc_act": False,
    "dynamic": {"-:.*self_attn\\.o_gate.*": {}, "-:.*self_attn\\.z_proj.*": {}},
    "format": "gptq", "group_size": 128, "lm_head": False,
    "meta": {"act_group_aware": True, "auto_forward_data_parallel": True, "damp_auto_increment": 0.01,
             "damp_percent": 0.05,
             "failsafe": {"smooth": {"group_size_threshold": 128, "k": 2.75, "type": "mad"}, "strategy": "rtn",
                          "threshold": "0.5%"},
             "gc_mode": "interval", "gptaq": None,
             "hessian": {"chunk_bytes": None, "chunk_size": None, "staging_dtype": "float32"},
             "mock_quantization": False, "mse": 0.0, "offload_to_disk": True,
             "offload_to_disk_path": "./gptqmodel_offload/hqdpgrum-rkaakpxx/", "pack_impl": "cpu",
             "quantizer": ["gptqmodel:5.7.0"], "static_groups": False, "true_sequential": True,
             "uri": "https://github.com/modelcloud/gptqmodel", "vram_strategy": "exclusive",
             "wait_for_submodule_finalizers": False},
    "pack_dtype": "int32", "quant_method": "gptq", "sym": True,
}
#: config.json written by gptqmodel 7.6.0 quantizing a 2-layer Llama (hidden 128) on CPU, in this
#: project's feasibility probe (throwaway venv); its q_proj tensors are pinned below.
GPTQMODEL_760 = {'bits': 4,
                 'checkpoint_format': 'gptq',
                 'desc_act': False,
                 'format': 'gptq',
                 'group_size': 64,
                 'lm_head': False,
                 'meta': {'act_group_aware': True,
                          'auto_forward_data_parallel': True,
                          'damp_auto_increment': 0.01,
                          'damp_percent': 0.05,
                          'dense_vram_strategy': 'exclusive',
                          'dense_vram_strategy_devices': None,
                          'fallback': {'smooth': None, 'strategy': 'rtn', 'threshold': '0.5%'},
                          'foem': None,
                          'gc_mode': 'interval',
                          'gptaq': None,
                          'hessian': {'chunk_bytes': None,
                                      'chunk_size': None,
                                      'dedup_shared_inputs': True,
                                      'staging_dtype': 'float32'},
                          'mock_quantization': False,
                          'moe_vram_strategy': 'exclusive',
                          'moe_vram_strategy_devices': None,
                          'mse': 0.0,
                          'offload_to_disk': True,
                          'offload_to_disk_path': '/tmp/gptqmodel_9ntlh10q',
                          'pack_impl': 'cpu',
                          'quantizer': ['gptqmodel:7.6.0'],
                          'static_groups': False,
                          'telemetry': {'device': False},
                          'True_sequential': True,
                          'uri': 'https://github.com/modelcloud/gptqmodel',
                          'wait_for_submodule_finalizers': False},
                 'method': 'gptq',
                 'pack_dtype': 'int32',
                 'quant_method': 'gptq',
                 'sym': True}
#: TheBloke/zephyr-7B-alpha-AWQ config.json (AutoAWQ), as shown in transformers' AWQ docs.
THEBLOKE_ZEPHYR_AWQ = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm"}
#: BlackSamorez/Llama-2-7b-AQLM-2Bit-1x16-hf config.json, as quoted in vLLM's AQLM config comments.
AQLM_LLAMA2_1X16 = {"in_group_size": 8, "nbits_per_codebook": 16, "num_codebooks": 1, "out_group_size": 1,
                    "quant_method": "aqlm",
                    "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"]}
REAL_BLOCKS = [THEBLOKE_LLAMA2_GPTQ, QWEN25_CODER_GPTQ, GPTQMODEL_570, GPTQMODEL_760, THEBLOKE_ZEPHYR_AWQ,
               AQLM_LLAMA2_1X16]


@pytest.mark.parametrize("block", REAL_BLOCKS, ids=lambda b: f"{b['quant_method']}-{len(b)}keys")
def test_real_checkpoint_blocks_import_unchanged(block: dict) -> None:
    model_config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "quantization_config": block}
    for source in (model_config, json.dumps(model_config), block):
        exported = parse_config(source).to_dict()
        # Every key of the file comes back with its value; nothing silently dropped.
        assert {k: exported[k] for k in block} == block
    # What transformers makes of the same block is ours minus the extra keys it drops.
    hf = json.loads(json.dumps(HF[block["quant_method"]].from_dict(dict(block)).to_dict()))
    assert {k: exported[k] for k in hf} == hf
    # And the export re-imports to the same config.
    assert parse_config(json.dumps(exported)) == parse_config(block)


def test_real_blocks_have_labels_and_plan() -> None:
    assert parse_config(THEBLOKE_LLAMA2_GPTQ).label == "GPTQ int4 g128 act-order"
    assert parse_config(THEBLOKE_ZEPHYR_AWQ).label == "AWQ int4 g128"
    assert parse_config(AQLM_LLAMA2_1X16).label == "AQLM 1x16 g8"
    assert any("dynamic" in w for w in parse_config(GPTQMODEL_570).warnings())
    assert parse_config(GPTQMODEL_570).extras()["pack_dtype"] == "int32"


# ----------------------------------------------------------------------------------------
# hypothesis round trips through transformers
# ----------------------------------------------------------------------------------------

names = st.text(st.sampled_from("abcxyz_."), min_size=1, max_size=8)
module_lists = st.none() | st.lists(st.sampled_from(["lm_head", "mlp.gate", "visual", "layers.0"]), unique=True,
                                    max_size=3)


def _common(draw: st.DrawFn, d: dict, bits: list[int], backends: tuple, formats: tuple) -> None:
    optional = {
        "bits": st.sampled_from(bits),
        "tokenizer": st.none() | names,
        "dataset": st.none() | st.sampled_from(GPTQ_DATASET_NAMES) | st.lists(names, min_size=1, max_size=3),
        "group_size": st.sampled_from([-1, 32, 64, 128]) | st.integers(1, 4096),
        "damp_percent": st.floats(min_value=1e-6, max_value=0.999, allow_nan=False),
        "desc_act": st.booleans(),
        "sym": st.booleans(),
        "true_sequential": st.booleans(),
        "format": st.sampled_from(formats),
        "meta": st.none() | st.fixed_dictionaries({"quantizer": st.lists(names, max_size=2)}),
        "backend": st.sampled_from(backends),
        "model_seqlen": st.none() | st.integers(1, 8192),
        "block_name_to_quantize": st.none() | names,
        "module_name_preceding_first_block": st.none() | st.lists(names, max_size=2),
        "batch_size": st.integers(1, 64),
        "pad_token_id": st.none() | st.integers(0, 50000),
        "max_input_length": st.none() | st.integers(1, 8192),
        "cache_block_outputs": st.booleans(),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            d[key] = draw(strategy)
    if (d.get("desc_act") is not True or d["quant_method"] == "awq") and draw(st.booleans()):
        d["act_group_aware"] = draw(st.booleans())


@st.composite
def valid_gptq_dicts(draw: st.DrawFn) -> dict:
    d: dict = {"quant_method": "gptq"}
    _common(draw, d, [2, 3, 4, 8], GPTQ_BACKENDS, GPTQ_FORMATS)
    return d


@st.composite
def valid_awq_dicts(draw: st.DrawFn) -> dict:
    d: dict = {"quant_method": "awq"}
    _common(draw, d, [4], AWQ_BACKENDS, AWQ_FORMATS)
    if draw(st.booleans()):
        d["zero_point"] = draw(st.booleans())
    if draw(st.booleans()):
        d["modules_to_not_convert"] = draw(module_lists)
    return d


@st.composite
def valid_aqlm_dicts(draw: st.DrawFn) -> dict:
    d: dict = {"quant_method": "aqlm"}
    optional = {"in_group_size": st.sampled_from([8, 16]) | st.integers(1, 64),
                "out_group_size": st.sampled_from([1, 2]) | st.integers(1, 16),
                "num_codebooks": st.integers(1, 8), "nbits_per_codebook": st.integers(1, 16),
                "linear_weights_not_to_quantize": st.none() | st.lists(names, max_size=3)}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            d[key] = draw(strategy)
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_gptq_dicts(), valid_awq_dicts(), valid_aqlm_dicts()))
def test_valid_configs_round_trip_through_transformers(d: dict) -> None:
    config = parse_config(d)
    exported = json.loads(config.to_json())
    hf_cls = HF[d["quant_method"]]
    # from_dict(exported).to_dict() == exported: the export loads in transformers unchanged ...
    assert json.loads(json.dumps(hf_cls.from_dict(dict(exported)).to_dict())) == exported
    # ... equals what transformers makes of the same settings (GPTQConfig has no default bits) ...
    same = {**({"bits": 4} if d["quant_method"] == "gptq" else {}), **d}
    assert json.loads(json.dumps(hf_cls.from_dict(same).to_dict())) == exported
    assert json.loads(json.dumps(config.to_transformers().to_dict())) == exported
    # ... and re-imports here, as does the diff form.
    assert parse_config(exported) == config
    assert parse_config(config.to_json(diff=True)) == config


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)
KEYS = sorted({f.name for m in ("gptq", "awq", "aqlm") for f in (*CONFIG_MAPPING[m].FIELDS,
                                                                  *CONFIG_MAPPING[m].EXTRA_FIELDS)}
              | {"version", "checkpoint_format", "bogus"})


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["gptq", "awq", "aqlm"]), st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6))
def test_random_input_gives_a_config_or_a_config_error(method: str, d: dict) -> None:
    try:
        config = parse_config({"quant_method": method, **d})
    except ConfigError as exc:
        assert exc.errors and all(e.field for e in exc.errors)
        return
    assert parse_config(config.to_json()) == config


def test_every_problem_is_reported_at_once() -> None:
    bad = {"quant_method": "gptq", "bits": 5, "group_size": 0, "damp_percent": 1.0, "dataset": "pile",
           "format": "gguf", "backend": "cuda", "pack_dtype": "int4", "desc_act": True, "act_group_aware": True,
           "checkpoint_format": "gptq_v2", "grup_size": 64}
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    fields = set(info.value.fields())
    assert fields == {"bits", "group_size", "damp_percent", "dataset", "format", "backend", "pack_dtype",
                      "act_group_aware", "grup_size"}
    errors = {e.field: e for e in info.value.errors}
    assert "did you mean group_size" in errors["grup_size"].allowed
    assert '"wikitext2"' in errors["dataset"].allowed
    with pytest.raises(ConfigError) as info:
        parse_config({"quant_method": "gptq", "format": "gptq", "checkpoint_format": "gptq_v2"})
    assert info.value.fields() == ["checkpoint_format"]
    with pytest.raises(ConfigError) as info:
        parse_config({"quant_method": "awq", "bits": 3, "version": "gemm", "format": "gemv", "backend": None})
    assert set(info.value.fields()) == {"bits", "version", "backend"}
    with pytest.raises(ConfigError) as info:
        parse_config({"quant_method": "aqlm", "in_group_size": 0, "nbits_per_codebook": 17, "num_codebooks": 1.0})
    assert set(info.value.fields()) == {"in_group_size", "nbits_per_codebook", "num_codebooks"}


def test_transformers_normalisation_is_mirrored() -> None:
    awq = parse_config({"quant_method": "awq", "version": "GEMV", "backend": "autoawq"})
    assert awq.format == "gemv" and awq.backend == "auto"
    assert awq.to_dict() == json.loads(json.dumps(AwqConfig(version="GEMV", backend="autoawq").to_dict()))
    assert parse_config({"quant_method": "awq", "backend": "llm-awq"}).format == "llm-awq"
    gptq = parse_config({"quant_method": "gptq", "backend": None, "checkpoint_format": "GPTQ_V2"})
    assert gptq.backend == "auto" and gptq.format == "gptq_v2" and gptq.to_dict()["checkpoint_format"] == "gptq_v2"
    assert AqlmQuantConfig(linear_weights_not_to_quantize=None).linear_weights_not_to_quantize == []
    assert GPTQQuantConfig(desc_act=True).act_group_aware is False
    assert GPTQQuantConfig().replace(format="gptq_v2").to_dict()["checkpoint_format"] == "gptq_v2"


def test_to_transformers_without_optimum_is_a_backend_error() -> None:
    import importlib.util

    config = GPTQQuantConfig(modules_in_block_to_quantize=[["self_attn.q_proj"], ["mlp.down_proj"]])
    if importlib.util.find_spec("optimum") is not None:
        pytest.skip("optimum is installed here")
    with pytest.raises(BackendUnavailableError, match="optimum"):
        config.to_transformers()


def test_labels_and_schema() -> None:
    assert GPTQQuantConfig(bits=4, group_size=64).label == "GPTQ int4 g64"
    assert AwqQuantConfig(group_size=64).label == "AWQ int4 g64"
    assert AqlmQuantConfig().label == "AQLM 1x16 g8"
    assert AqlmQuantConfig(num_codebooks=2, nbits_per_codebook=8).label == "AQLM 2x8 g8"
    schema = GPTQQuantConfig.json_schema()
    assert "built-in corpus" in schema["properties"]["dataset"]["description"]
    assert schema["properties"]["damp_percent"]["exclusiveMaximum"] == 1.0
    assert "pack_dtype" in schema["x-accepted-extra-keys"]


# ----------------------------------------------------------------------------------------
# quantizers: factory, shapes, storage
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, library", [({"quant_method": "gptq"}, "gptqmodel"),
                                             ({"quant_method": "awq"}, "gptqmodel"),
                                             ({"quant_method": "aqlm"}, "aqlm")])
def test_factory_says_method_missing_library_and_fix(config: dict, library: str, monkeypatch) -> None:
    import importlib.util

    # Where the library is installed (CI installs gptqmodel), hide it so the message is still checked.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kw: None if name == library else real_find_spec(name, *args, **kw))
    with pytest.raises(BackendUnavailableError) as info:
        get_quantizer(config, device="cpu")
    err = info.value
    assert config["quant_method"].upper() in err.method
    assert library in err.missing
    assert f"pip install {library}" in err.fix


def test_registry_and_presets() -> None:
    assert QUANTIZER_MAPPING["gptq"] is GPTQQuantizer and QUANTIZER_MAPPING["awq"] is AwqQuantizer
    assert QUANTIZER_MAPPING["aqlm"] is AqlmQuantizer
    assert preset("gptq-int4-g64").label == "GPTQ int4 g64" and preset("awq-int4-g64").label == "AWQ int4 g64"
    runnable = runnable_presets()
    assert set(runnable) <= set(PRESETS) and "rtn-int4-g64" in runnable
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        assert "gptq-int4-g64" not in runnable and "awq-int4-g64" not in runnable


def test_preflight_on_default_model() -> None:
    model_config = read_model_config("default")
    for method in ("gptq", "awq"):
        problems = preflight({"quant_method": method, "bits": 4, "group_size": 128}, model_config)
        # q/k/v/o/gate/up read 576 features in each of the 30 layers; down_proj reads 1536 = 12 x 128.
        assert len(problems) == 30 * 6
        assert all("input width 576" in p and "64" in p for p in problems)
        assert any(p.startswith("model.layers.0.self_attn.q_proj:") for p in problems)
        assert not any("down_proj" in p for p in problems)
        assert preflight({"quant_method": method, "bits": 4, "group_size": 64}, model_config) == []
    assert preflight({"quant_method": "aqlm"}, model_config) == []
    bad = preflight({"quant_method": "aqlm", "in_group_size": 7, "out_group_size": 5}, model_config)
    assert bad and "in_group_size 7" in bad[0]
    assert any("out_group_size 5" in p for p in bad)


def test_validate_cli_names_layers_for_g128(tmp_path, capsys) -> None:
    path = tmp_path / "gptq.json"
    path.write_text(json.dumps({"quant_method": "gptq", "bits": 4, "group_size": 128}))
    assert main(["validate", str(path), "--model", "default"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "group_size 128" in err
    path.write_text(json.dumps({"quant_method": "gptq", "bits": 4, "group_size": 64}))
    assert main(["validate", str(path), "--model", "default"]) == 0


def test_gptq_shapes_match_gptq_checkpoints() -> None:
    """A Llama-2-7B q_proj in a 4-bit g128 GPTQ checkpoint: qweight [512, 4096] int32, qzeros
    [32, 512] int32, scales [32, 4096] fp16, g_idx [4096] int32 (gptqmodel/AutoGPTQ QuantLinear)."""
    config = GPTQQuantConfig(bits=4, group_size=128)
    shapes = GPTQQuantizer.tensor_shapes(config, 4096, 4096)
    assert shapes == {"qweight": ((512, 4096), 32), "qzeros": ((32, 512), 32), "scales": ((32, 4096), 16),
                      "g_idx": ((4096,), 32)}
    three = GPTQQuantizer.tensor_shapes(GPTQQuantConfig(bits=3, group_size=-1), 11008, 4096)
    assert three["qweight"] == ((384, 11008), 32) and three["scales"] == ((1, 11008), 16)
    parts = GPTQQuantizer.storage_bytes(config, 4096, 4096)
    n = 4096 * 4096
    assert parts["codes"] == n / 2
    assert parts["scales"] == 32 * 4096 * 2 + 32 * 512 * 4 + 4096 * 4
    # 4 + 16/128 (scale) + 4/128 (zero) bits per weight, plus g_idx.
    assert 8 * (parts["codes"] + parts["scales"]) / n == pytest.approx(4 + 20 / 128 + 32 / 4096)
    # gptqmodel 7.6.0's own output for a 128x128 q_proj at g64 (the probe's checkpoint).
    assert GPTQQuantizer.tensor_shapes(parse_config(GPTQMODEL_760), 128, 128) == {
        "qweight": ((16, 128), 32), "qzeros": ((2, 16), 32), "scales": ((2, 128), 16), "g_idx": ((128,), 32)}
    awq = AwqQuantizer.tensor_shapes(AwqQuantConfig(group_size=128), 4096, 4096)
    assert awq == {"qweight": ((4096, 512), 32), "qzeros": ((32, 512), 32), "scales": ((32, 4096), 16)}


def test_calibrated_quantize_tensor_is_never_faked() -> None:
    import torch

    quantizer = object.__new__(GPTQQuantizer)  # skip the library check to reach quantize_tensor
    quantizer.config = GPTQQuantConfig()
    with pytest.raises(BackendUnavailableError, match="calibration-based"):
        quantizer.quantize_tensor(torch.zeros(64, 64))


LLAMA2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False).to_dict()


def test_aqlm_bits_per_parameter_match_the_paper_and_published_checkpoints() -> None:
    """AQLM (arXiv:2401.06118; github.com/Vahe1994/AQLM README): 1x16 with groups of 8 codes 2 bits
    per weight plus a 2^16 x 8 fp16 codebook per layer; 2x8 has 2 bits and tiny codebooks. The README
    lists the Llama-2-7b checkpoints at 2.4 GB (1x16) and 2.2 GB (2x8), embeddings and head in fp16."""
    one = plan_memory(LLAMA2_7B, AqlmQuantConfig(num_codebooks=1, nbits_per_codebook=16, in_group_size=8),
                      "float16")
    two = plan_memory(LLAMA2_7B, AqlmQuantConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=8),
                      "float16")
    linear = one.quantized_params
    assert linear == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    layers = 32 * 7
    codebook_bits = layers * 2**16 * 8 * 16
    scale_bits = 32 * (4 * 4096 + 2 * 11008 + 4096) * 16
    assert one.quantized_bits_per_param == pytest.approx(2 + (codebook_bits + scale_bits) / linear)
    assert one.bytes_by_component["code_tables"] == codebook_bits / 8
    # ~2.29 bits: 2 for the codes, ~0.29 for the 1x16 codebooks (the paper's "2-bit" class).
    assert 2.28 < one.quantized_bits_per_param < 2.30
    assert 2.0 < two.quantized_bits_per_param < 2.01
    assert round(one.total_bytes / 1e9, 1) == 2.4
    assert 2.1 <= two.total_bytes / 1e9 <= 2.2


def test_gptq_int4_g128_llama2_7b_size() -> None:
    """TheBloke/Llama-2-7B-GPTQ (4-bit, g128) ships a 3.9 GB model.safetensors."""
    plan = plan_memory(LLAMA2_7B, GPTQQuantConfig(bits=4, group_size=128), "float16")
    assert round(plan.total_bytes / 1e9, 1) == 3.9
