"""HQQ, torchao and optimum-quanto: configs against transformers' classes, tensors against the libraries.

The registry-parametrised test (tests/test_registry.py) already checks each through its preset
(schema, round trip, preflight, planned == stored bytes on a tiny model, per-layer error bound).
Here: random valid configs round-trip through HqqConfig / TorchAoConfig / QuantoConfig, junk is
rejected with every problem named, each tensor format equals what its library computes with, the
planner follows each library's own rules (quanto's group sizes, HQQ's per-tag settings) on widths
the tiny model lacks, and what cannot run here is refused with the reason while still planned.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import HqqConfig, QuantoConfig, TorchAoConfig

from quantlib import ConfigError, parse_config
from quantlib.errors import BackendUnavailableError, QuantlibError
from quantlib.memory import plan_memory
from quantlib.registry import get_quantizer
from quantlib.methods.hqq import META_BYTES, linear_tag, quantize_hqq
from quantlib.methods.hqq import _storage as hqq_storage
from quantlib.methods.quanto import QuantoQuantizer, group_size_for, quantize_quanto
from quantlib.methods.torchao import TorchAoQuantizer, quantize_torchao_int8
from tests.conftest import tiny_llama_config

FAST = settings(max_examples=25, deadline=None)
TAGS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


def _json(obj):
    return json.loads(json.dumps(obj, default=lambda v: getattr(v, "value", str(v))))


# ----------------------------------------------------------------------------------------- configs

layer = st.fixed_dictionaries({}, optional={"nbits": st.sampled_from([1, 2, 3, 4, 8]),
                                            "group_size": st.sampled_from([None, 8, 16, 32, 64, 128]),
                                            "axis": st.sampled_from([0, 1]), "view_as_float": st.booleans()})


@FAST
@given(nbits=st.sampled_from([1, 2, 3, 4, 8]), group_size=st.sampled_from([None, 16, 32, 64, 128, 256]),
       axis=st.sampled_from([0, 1]), view_as_float=st.booleans(),
       skip=st.lists(st.sampled_from(["lm_head", *TAGS]), max_size=3, unique=True),
       dynamic=st.none() | st.dictionaries(st.sampled_from(TAGS), layer, min_size=1, max_size=4))
def test_hqq_config_round_trips_through_hqqconfig(nbits, group_size, axis, view_as_float, skip, dynamic) -> None:
    kwargs = dict(nbits=nbits, group_size=group_size, axis=axis, view_as_float=view_as_float, skip_modules=skip,
                  dynamic_config=dynamic)
    ours = parse_config({"quant_method": "hqq", **kwargs})
    theirs = HqqConfig(**kwargs)
    assert ours.to_dict() == _json(theirs.to_dict())  # what transformers saves, key for key
    assert parse_config(_json(theirs.to_dict())) == ours  # a checkpoint's block parses back to the same config
    assert _json(HqqConfig.from_dict(ours.to_dict()).to_dict()) == ours.to_dict()


@FAST
@given(weights=st.sampled_from(["float8", "int8", "int4", "int2"]), activations=st.sampled_from([None, "int8", "float8"]),
       skip=st.none() | st.lists(st.sampled_from(["lm_head", "model.layers.0.mlp"]), max_size=2, unique=True))
def test_quanto_config_round_trips_through_quantoconfig(weights, activations, skip) -> None:
    theirs = QuantoConfig(weights=weights, activations=activations, modules_to_not_convert=skip)
    ours = parse_config(_json(theirs.to_dict()))
    assert ours.to_dict() == _json(theirs.to_dict())
    assert _json(ours.to_transformers().to_dict()) == _json(theirs.to_dict())


@FAST
@given(int8=st.booleans(), group=st.sampled_from([None, 32, 64, 128, 256]), untie=st.booleans(),
       skip=st.none() | st.lists(st.sampled_from(["lm_head", "model.layers.1"]), max_size=2, unique=True))
def test_torchao_config_round_trips_through_torchaoconfig(int8, group, untie, skip) -> None:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, PerGroup, PerRow

    if not int8 and group is None:
        group = 128
    ao = (Int8WeightOnlyConfig(granularity=PerRow() if group is None else PerGroup(group)) if int8
          else Int4WeightOnlyConfig(group_size=group))
    theirs = TorchAoConfig(ao, modules_to_not_convert=skip, untie_embedding_weights=untie)
    ours = parse_config(_json(theirs.to_dict()))
    assert (ours.ao_config, ours.group_size) == (type(ao).__name__, group)
    assert ours.to_dict() == _json(theirs.to_dict())
    assert _json(TorchAoConfig.from_dict(ours.to_dict()).to_dict()) == ours.to_dict()


@pytest.mark.parametrize("junk, fields", [
    ({"quant_method": "hqq", "nbits": 5, "group_size": 60, "axis": 2, "bogus": 1}, {"nbits", "group_size", "axis", "bogus"}),
    ({"quant_method": "hqq", "dynamic_config": {"mlp.up_proj": {"nbits": 7}}}, {"dynamic_config"}),
    ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4, "optimize": False}}},
     {"quant_config"}),
    ({"quant_method": "quanto", "weights": "int3", "activations": "int4", "extra": 0}, {"weights", "activations", "extra"}),
    ({"quant_method": "torchao", "ao_config": "Int4WeightOnlyConfig", "group_size": 48}, {"group_size"}),
    ({"quant_method": "torchao", "ao_config": "Float8", "group_size": 0}, {"ao_config", "group_size"}),
    ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_version": 2,
                                                            "_data": {"group_size": 64, "int4_tile_packed_ntile": 4}}}},
     {"quant_type"}),
])
def test_junk_is_rejected_with_every_problem_named(junk, fields) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(junk)
    assert {e.field.split(".")[0] for e in info.value.errors} == fields, info.value


# ----------------------------------------------------------------------------------------- tensors

def test_hqq_tensor_is_what_hqqlinear_computes_with_and_stores() -> None:
    from hqq.core.quantize import HQQLinear

    torch.manual_seed(0)
    w = torch.randn(192, 576)
    for nbits in (1, 2, 3, 4, 8):
        for axis in (0, 1):
            packed = quantize_hqq(w, nbits, 64, axis)
            linear = torch.nn.Linear(576, 192, bias=False)
            linear.weight.data = w.clone()
            from quantlib.methods.hqq import base_quantize_config

            layer = HQQLinear(linear, base_quantize_config(nbits, 64, axis), compute_dtype=torch.float16,
                              device="cpu", del_orig=False)
            x = torch.randn(5, 576, dtype=torch.float16)
            deq = packed.dequantize()
            # HQQLinear's pytorch forward is x @ dequantize().T in fp16: the same weights.
            assert torch.equal(layer(x), torch.matmul(x, deq.half().t()))
            assert torch.equal(deq, layer.dequantize().float())
            # Codes rebuild the weights: (codes - zero) x scale, group by group.
            codes = packed.codes_unpacked().reshape(-1, 64) if axis == 1 else packed.codes_unpacked().reshape(64, -1)
            assert int(codes.max()) < 2 ** nbits
            rebuilt = ((codes.half() - packed.meta["zero"]) * packed.meta["scale"]).reshape(w.shape)
            assert torch.equal(rebuilt.float(), deq)
            assert packed.meta_bytes == META_BYTES
            stored = {k: v // 8 for k, v in packed.storage_bits.items()}
            planned = hqq_storage(192, 576, nbits, 64, axis)
            assert stored["codes"] == planned["codes"] == layer.W_q.numel() * layer.W_q.element_size()
            assert stored["scale"] + stored["zero"] == planned["scales"]


def test_torchao_int8_tensor_is_torchaos_own() -> None:
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup, quantize_

    torch.manual_seed(1)
    w = torch.randn(96, 256)
    for group in (None, 64):
        ours = quantize_torchao_int8(w, group)
        linear = torch.nn.Linear(256, 96, bias=False)
        linear.weight.data = w.clone()
        quantize_(linear, Int8WeightOnlyConfig(granularity=PerGroup(group)) if group else Int8WeightOnlyConfig())
        assert torch.equal(ours.dequantize(), linear.weight.dequantize())
        assert torch.equal(ours.qdata, linear.weight.qdata)
        config = parse_config({"quant_method": "torchao", "group_size": group})
        planned = TorchAoQuantizer.storage_bytes(config, 96, 256)
        stored = ours.storage_by_component()
        assert (stored["codes"], stored["scales"]) == (planned["codes"], planned["scales"])


@pytest.mark.parametrize("weights", ["int2", "int4", "int8", "float8"])
@pytest.mark.parametrize("shape", [(192, 576), (576, 1536), (96, 224), (64, 100)])
def test_quanto_storage_follows_quantos_group_rule(weights, shape) -> None:
    """Planned == stored on widths where quanto picks 128, 96, 32 or one group per row."""
    torch.manual_seed(2)
    w = torch.randn(*shape)
    ours = quantize_quanto(w, weights)
    assert ours.group_size == group_size_for(shape[1], ours.bits)
    planned = QuantoQuantizer.storage_bytes(parse_config({"quant_method": "quanto", "weights": weights}), *shape)
    stored = ours.storage_by_component()
    assert (stored["codes"], stored["scales"]) == (planned["codes"], planned["scales"])
    err = (ours.dequantize() - w).norm() / w.norm()
    assert err < {"int2": 0.6, "int4": 0.12, "int8": 0.01, "float8": 0.04}[weights]


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("ninja")),
                    reason="quanto's own int2/int4 dequantize needs its C++ extension built (g++ and ninja)")
@pytest.mark.parametrize("weights", ["int2", "int4", "int8", "float8"])
def test_quanto_dequantize_equals_quantos(weights) -> None:
    from optimum.quanto import qfloat8, qint2, qint4, qint8
    from optimum.quanto.nn import QLinear

    torch.manual_seed(3)
    w = torch.randn(576, 1536)
    linear = torch.nn.Linear(1536, 576, bias=False)
    linear.weight.data = w.clone()
    q = QLinear.from_module(linear, weights={"int2": qint2, "int4": qint4, "int8": qint8, "float8": qfloat8}[weights])
    q.freeze()
    assert torch.equal(quantize_quanto(w, weights).dequantize(), q.weight.dequantize())


# ----------------------------------------------------------------------------------------- models

def test_hqq_dynamic_config_planned_equals_simulated() -> None:
    """Per-tag settings: each tag's own bits and groups in the plan, untagged layers unquantized."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(4)
    cfg = tiny_llama_config(256)
    model = LlamaForCausalLM(cfg).eval()
    config = parse_config({"quant_method": "hqq", "dynamic_config": {
        "self_attn.q_proj": {"nbits": 2, "group_size": 16}, "mlp.down_proj": {"nbits": 8, "group_size": 32},
        "mlp.up_proj": {"nbits": 3, "axis": 0, "group_size": 64}}})
    quantizer = get_quantizer(config, device="cpu")
    planned = plan_memory(cfg.to_dict(), config, "float32")
    measured = quantizer.simulate(model)
    assert planned.bytes_by_component == measured.bytes_by_component
    quantized = {ref.name for ref in quantizer.quantizable_layers(model)}
    assert {linear_tag(n) for n in quantized} == {"self_attn.q_proj", "mlp.down_proj", "mlp.up_proj"}
    assert len(quantized) == 3 * cfg.num_hidden_layers


def test_what_cannot_run_here_is_refused_with_the_reason_and_still_planned() -> None:
    int4 = parse_config({"quant_method": "torchao", "ao_config": "Int4WeightOnlyConfig", "group_size": 64})
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        get_quantizer(int4, device="cpu")
    plan = plan_memory(tiny_llama_config(256).to_dict(), int4, "bfloat16")
    n = plan.quantized_params
    assert plan.bytes_by_component["codes"] == n / 2 and plan.bytes_by_component["scales"] == 2 * 2 * n / 64
    with pytest.raises(BackendUnavailableError, match="activations"):
        get_quantizer({"quant_method": "quanto", "weights": "int8", "activations": "int8"}, device="cpu")
    embeddings = {"quant_method": "torchao", "include_input_output_embeddings": True}
    with pytest.raises(BackendUnavailableError, match="embedding"):
        get_quantizer(embeddings, device="cpu")
    with pytest.raises(QuantlibError, match="cannot be planned"):
        plan_memory(tiny_llama_config(256).to_dict(), parse_config(embeddings), "float32")


def test_awq_clip_search_choice_is_per_thread() -> None:
    """The AWQ clip-search switch is a context variable: two runs at once each see their own choice."""
    from types import SimpleNamespace

    from quantlib.methods.awq import _apply_clip_choice, _clip_search

    barrier = threading.Barrier(2)
    seen: dict[bool, bool] = {}

    def run(choice: bool) -> None:
        with _clip_search(choice):
            barrier.wait()  # both contexts are open at once
            processor = SimpleNamespace(apply_clip=True)
            _apply_clip_choice(processor)
            barrier.wait()
            seen[choice] = processor.apply_clip

    threads = [threading.Thread(target=run, args=(c,)) for c in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {True: True, False: False}
    outside = SimpleNamespace(apply_clip=True)
    _apply_clip_choice(outside)  # outside quantlib's calibrate(): the library's default stays
    assert outside.apply_clip is True


def test_hqq_snippet_model_api_quantizes_as_quantlib_does() -> None:
    """The snippet's `AutoHQQHFModel.quantize_model` call (per-tag quant_config) gives, layer for layer,
    the weights quantlib's HQQ quantizer computes with."""
    from hqq.core.quantize import HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import LlamaForCausalLM

    from quantlib.methods.base import _py

    torch.manual_seed(5)
    model = LlamaForCausalLM(tiny_llama_config(256)).eval()
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = parse_config({"quant_method": "hqq", "nbits": 3, "group_size": 32})
    snippet = get_quantizer(config, device="cpu").snippet(config, "x")
    lines = snippet.splitlines()
    assert "quant_config=quant_config" in lines[-1]
    # One setting for every tag: its dict is written once, and the per-tag mapping is built from it.
    assert sum('"nbits": 3' in line for line in lines) == 2  # HqqConfig.from_dict(...) and `layer = ...`
    namespace: dict = {}
    for line in lines:
        if line.startswith(("layer = ", "quant_config = {")):
            exec(line, namespace)  # noqa: S102 - the snippet's own literal assignments
    per_tag = namespace["quant_config"]
    assert len(per_tag) == 7 and per_tag == json.loads(json.dumps(per_tag)) and _py(per_tag)
    AutoHQQHFModel.quantize_model(model, quant_config=per_tag, compute_dtype=torch.float16, device="cpu")
    quantizer = get_quantizer(config, device="cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, HQQLinear)}
    assert len(layers) == 7 * 2
    for name, layer in layers.items():
        ours = quantizer.quantize_layer(name, reference[name]).dequantize()
        assert torch.equal(ours, layer.dequantize().float()), name
