"""GGUF file types on a transformers mixture of experts (issue 27): fused 3-D expert tensors mapped to llama.cpp's
`ffn_{gate,up,down}_exps` as convert_hf_to_gguf.py names them, typed by llama-quantize's own rules.

The oracle is llama-quantize's per-tensor choices on the two synthetic MoE GGUF files of
tests/data/llamacpp_ftypes.json.gz (scripts/llamacpp_ftypes_golden.py), for every file type, with and without an
importance matrix. A transformers Mixtral of the same widths must get the same type on every tensor."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import torch

from quantlib import parse_config
from quantlib.errors import QuantlibError
from quantlib.memory import plan_memory
from quantlib.methods._gguf_file_types import _gguf_tensor_names, file_type_plan
from quantlib.registry import get_quantizer
from quantlib.shapes import model_shapes

GOLDEN = json.loads(gzip.open(Path(__file__).parent / "data" / "llamacpp_ftypes.json.gz").read())
#: the golden MoE models as transformers Mixtral configs of the same widths (8 layers, 4 heads of 64, vocab 256)
MIXTRALS = {"moe8_h256_gqa4": dict(hidden_size=256, intermediate_size=512, num_key_value_heads=1, num_local_experts=8,
                                   tie_word_embeddings=False),
            "moe4_h256_tied": dict(hidden_size=256, intermediate_size=256, num_key_value_heads=2, num_local_experts=4,
                                   tie_word_embeddings=True)}


def mixtral(layers: int = 8, **kwargs):
    from transformers import MixtralConfig

    return MixtralConfig(num_hidden_layers=layers, num_attention_heads=4, head_dim=64, num_experts_per_tok=2,
                         vocab_size=256, **kwargs)


def _types_match_the_golden(model: str, kind: str, shapes, pairs) -> list[dict[str, str]]:
    """For every file type llama-quantize wrote for the golden `model` (`kind`: plain or imatrix): the plan
    quantizes exactly the tensors it quantized (F32 ones are not listed), each in its type; where it refused, the
    plan refuses too. Returns the plans (at least 8)."""
    plans = []
    for file_type, expected in GOLDEN["types"][model][kind].items():
        if "error" in expected:
            with pytest.raises(ValueError):
                file_type_plan(file_type, shapes, kind == "imatrix")
            continue
        plan = file_type_plan(file_type, shapes, kind == "imatrix")
        assert {g for w, g in pairs if w in plan} == set(expected), file_type
        for weight, tensor in pairs:
            if tensor in expected:
                assert plan[weight].upper() == expected[tensor].upper(), (file_type, tensor)
        plans.append(plan)
    assert len(plans) >= 8
    return plans


def _planned_bytes_equal_the_stored(model_class, config):
    """GGUF Q4_K_M (weights only) on a random model of `config`: the planner's bytes by component and quantized
    parameters equal what the simulation stores. Returns (the model, its quantized copy)."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    gguf = parse_config({"quant_method": "gguf", "quant_type": "Q4_K_M", "activations": False})
    planned = plan_memory(config.to_dict(), gguf, "float32")
    quantized = copy.deepcopy(model)
    stored = get_quantizer(gguf, device="cpu").simulate(quantized)
    assert planned.bytes_by_component == stored.bytes_by_component
    assert planned.quantized_params == stored.quantized_params > 0
    return model, quantized


@pytest.mark.parametrize("model", list(MIXTRALS))
@pytest.mark.parametrize("kind", ["plain", "imatrix"])
def test_a_transformers_mixtral_gets_llama_quantize_s_type_on_every_tensor(model, kind) -> None:
    shapes = model_shapes(mixtral(**MIXTRALS[model]).to_dict())
    pairs = _gguf_tensor_names(shapes)
    names = [g for _, g in pairs]
    assert sorted(names) == sorted(n for n, _, dims in GOLDEN["models"][model]["tensors"] if dims >= 2
                                   and "ffn_gate_inp" not in n)  # the router stays in float, as llama.cpp keeps it
    assert ("model.layers.0.mlp.experts.gate_up_proj", "blk.0.ffn_gate_exps.weight") in pairs
    assert ("model.layers.0.mlp.experts.gate_up_proj", "blk.0.ffn_up_exps.weight") in pairs
    _types_match_the_golden(model, kind, shapes, pairs)


def test_the_planned_bytes_of_a_mixtral_equal_what_the_simulation_stores() -> None:
    from transformers import MixtralForCausalLM

    model, quantized = _planned_bytes_equal_the_stored(MixtralForCausalLM, mixtral(2, **MIXTRALS["moe8_h256_gqa4"]))
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, quantized(ids).logits)


@pytest.mark.parametrize("changes,what", [({}, "activations: true"), ({"activations": False, "imatrix": True},
                                                                        "imatrix: true")])
def test_what_cannot_reach_fused_experts_is_refused(tmp_path, tiny_tokenizer, changes, what) -> None:
    from transformers import MixtralForCausalLM

    from quantlib.models import load_model

    torch.manual_seed(0)
    MixtralForCausalLM(mixtral(2, **MIXTRALS["moe4_h256_tied"])).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    config = parse_config({"quant_method": "gguf", "quant_type": "Q4_K_M", **changes})
    with pytest.raises(QuantlibError, match=f"{what}.*fused expert tensors"):
        get_quantizer(config, device="cpu").quantize_model(base=load_model(str(tmp_path)))


def test_qwen3_moe_is_named_as_convert_hf_to_gguf_names_it() -> None:
    from transformers import Qwen3MoeConfig

    shapes = model_shapes(Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=8, num_experts_per_tok=2, vocab_size=256).to_dict())
    names = dict((g, w) for w, g in _gguf_tensor_names(shapes))
    assert names["blk.1.ffn_down_exps.weight"] == "model.layers.1.mlp.experts.down_proj"
    assert names["blk.1.ffn_up_exps.weight"] == names["blk.1.ffn_gate_exps.weight"]
    plan = file_type_plan("Q4_K_M", shapes)
    assert plan["model.layers.0.mlp.experts.gate_up_proj"] == "Q4_K"


def qwen2_moe(layers: int = 8):
    """A transformers Qwen2-MoE of the golden qwen2moe model's widths: 4 experts of 128, a shared expert of 256."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(num_hidden_layers=layers, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                          shared_expert_intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, num_experts=4, num_experts_per_tok=2, vocab_size=256, tie_word_embeddings=False)


@pytest.mark.parametrize("kind", ["plain", "imatrix"])
def test_a_transformers_qwen2_moe_gets_llama_quantize_s_type_on_every_tensor(kind) -> None:
    """Its shared expert is typed by the ffn rules (ffn_*_shexp); its one-row gate shared_expert_gate, (1, hidden),
    is 1-D to ggml (ne [hidden, 1]), so llama-quantize leaves it in F32 and so does the plan."""
    from quantlib.registry import quantizer_class

    model = "qwen2moe_h256_shexp"
    shapes = model_shapes(qwen2_moe().to_dict())
    pairs = _gguf_tensor_names(shapes)
    assert ("model.layers.0.mlp.shared_expert_gate.weight", "blk.0.ffn_gate_inp_shexp.weight") in pairs
    golden_dims = {n: dims for n, _, dims in GOLDEN["models"][model]["tensors"]}
    assert golden_dims["blk.0.ffn_gate_inp_shexp.weight"] == 1
    for plan in _types_match_the_golden(model, kind, shapes, pairs):
        assert "model.layers.0.mlp.shared_expert_gate.weight" not in plan
    config = parse_config({"quant_method": "gguf", "quant_type": "Q4_K_M"})
    why = quantizer_class(config).classify(config, shapes)["model.layers.3.mlp.shared_expert_gate.weight"]
    assert why is not None and "left in float by llama-quantize" in why


def test_the_planned_bytes_of_a_qwen2_moe_equal_what_the_simulation_stores() -> None:
    from transformers import Qwen2MoeForCausalLM

    model, quantized = _planned_bytes_equal_the_stored(Qwen2MoeForCausalLM, qwen2_moe(2))
    assert torch.equal(quantized.model.layers[0].mlp.shared_expert_gate.weight,
                       model.model.layers[0].mlp.shared_expert_gate.weight)
