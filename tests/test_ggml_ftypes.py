"""quantlib.methods._ggml_ftypes against llama-quantize: for every stored model and file type, without and with an
importance matrix, the per-tensor types equal those llama-quantize wrote (tests/data/llamacpp_ftypes.json.gz, made
by scripts/llamacpp_ftypes_golden.py from llama.cpp 0c1e570); the unported cases raise with a reason."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from quantlib.methods._ggml_ftypes import (
    FILE_TYPES, LLAMA_CPP_COMMIT, fallback_notes, file_type_tensor_types, tensor_category, visiting_order)

GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "llamacpp_ftypes.json.gz"
GOLDEN = json.loads(gzip.decompress(GOLDEN_PATH.read_bytes()))
MODELS = GOLDEN["models"]


def _kwargs(model: str, kind: str) -> dict:
    meta = MODELS[model]
    return dict(n_layer=meta["n_layer"], n_gqa=meta["n_gqa"], has_imatrix=kind == "imatrix", arch=meta["arch"],
                n_expert=meta.get("n_expert", 1))


def test_golden_is_from_the_ported_commit():
    assert GOLDEN["llama_cpp_commit"] == LLAMA_CPP_COMMIT
    assert LLAMA_CPP_COMMIT[:7] in GOLDEN["llama_quantize"]
    for model in MODELS:
        for kind in ("plain", "imatrix"):
            assert set(GOLDEN["types"][model][kind]) == set(FILE_TYPES)


#: The file types llama-quantize refuses without an importance matrix on some golden model: those with tensors of a
#: type that needs one (IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S; Q2_K in Q2_K_S).
NEED_IMATRIX = ("Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


def test_refusals_are_those_of_llama_quantize():
    """Every file type without an importance matrix is refused on the models where llama-quantize refused it and
    accepted where it wrote the file (the IQ3_S and IQ3_M families never need one)."""
    refused = {(model, ftype) for model in MODELS for ftype, types in GOLDEN["types"][model]["plain"].items()
               if "error" in types}
    assert {ftype for _, ftype in refused} == set(NEED_IMATRIX)
    for model in MODELS:
        for ftype in FILE_TYPES:
            try:
                file_type_tensor_types(ftype, MODELS[model]["tensors"], **_kwargs(model, "plain"))
                ours = False
            except ValueError as exc:
                assert "importance matrix" in str(exc)
                ours = True
            assert ours == ((model, ftype) in refused), (model, ftype)


@pytest.mark.parametrize("kind", ["plain", "imatrix"])
@pytest.mark.parametrize("ftype", list(FILE_TYPES))
@pytest.mark.parametrize("model", list(MODELS))
def test_types_match_llama_quantize(model, ftype, kind):
    expected = GOLDEN["types"][model][kind][ftype]
    tensors = MODELS[model]["tensors"]  # [name, ncols, n_dims] in the file's order
    if "error" in expected:  # llama-quantize refused: a tensor needs an importance matrix (tensor_requires_imatrix)
        assert ftype in NEED_IMATRIX and kind == "plain" and "imatrix" in expected["error"]
        with pytest.raises(ValueError, match="importance matrix"):
            file_type_tensor_types(ftype, tensors, **_kwargs(model, kind))
        return
    ours = file_type_tensor_types(ftype, tensors, **_kwargs(model, kind))
    differing = {name: (ours.get(name), expected.get(name)) for name in set(ours) | set(expected)
                 if ours.get(name) != expected.get(name)}
    assert not differing, f"(ours, llama-quantize) differ for {len(differing)} tensors: {sorted(differing.items())[:8]}"
    # the result is in llama-quantize's visiting order
    assert list(ours) == [n for n in GOLDEN["visit_order"][model] if n in ours]


@pytest.mark.parametrize("model", list(MODELS))
def test_visiting_order_and_input_order(model):
    tensors = MODELS[model]["tensors"]
    assert visiting_order(name for name, _, _ in tensors) == GOLDEN["visit_order"][model]
    shuffled = list(tensors)
    random.Random(0).shuffle(shuffled)
    kwargs = _kwargs(model, "plain")
    for ftype in ("Q4_K_M", "Q3_K_M", "Q5_K_M"):
        assert file_type_tensor_types(ftype, shuffled, **kwargs) == file_type_tensor_types(ftype, tensors, **kwargs)


def test_scrambled_file_order_differs_from_visiting_order():
    # the oracle's third model pins that llama-quantize does not follow the file's order
    names = [name for name, _, _ in MODELS["mha_h256_16l_scrambled"]["tensors"]]
    assert names != GOLDEN["visit_order"]["mha_h256_16l_scrambled"]
    assert visiting_order(["blk.10.ffn_down.weight", "blk.2.ffn_down.weight", "output.weight",
                           "blk.2.attn_v.weight", "token_embd.weight"]) == [
        "output.weight", "token_embd.weight", "blk.2.attn_v.weight", "blk.2.ffn_down.weight",
        "blk.10.ffn_down.weight"]


def test_smollm2_fallback_notes():
    meta = MODELS["smollm2_h576_gqa3_tied"]
    notes = fallback_notes("Q4_K_M", meta["tensors"], n_layer=meta["n_layer"], n_gqa=meta["n_gqa"])
    by_name = {note.tensor: note for note in notes}
    q = by_name["blk.0.attn_q.weight"]
    assert (q.wanted, q.used, q.ncols) == ("Q4_K", "Q5_0", 576) and "256" in q.reason
    assert "Q4_K -> Q5_0" in str(q)
    embd = by_name["token_embd.weight"]  # tied: the output rule, Q8_0 for a shape that does not fit Q4_K
    assert (embd.wanted, embd.used) == ("Q6_K", "Q8_0")
    # ffn_down's ncols (1536) is a multiple of 256: no note; attn_v asks for Q6_K in some layers -> Q8_0
    assert not any("ffn_down" in name for name in by_name)
    assert {(n.wanted, n.used) for n in notes if "attn_v" in n.tensor} == {("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")}


def test_f16_when_not_a_multiple_of_32():
    meta = MODELS["mha_h256_16l_scrambled"]  # attn_output ncols 144
    notes = fallback_notes("Q4_K_M", meta["tensors"], n_layer=meta["n_layer"], n_gqa=meta["n_gqa"])
    out = [n for n in notes if n.tensor == "blk.3.attn_output.weight"][0]
    assert out.used == "F16" and "144" in out.reason and "32" in out.reason
    assert fallback_notes("Q4_K_M", [("blk.0.attn_q.weight", 256)], n_layer=1, n_gqa=1) == []


def test_norms_biases_and_1d_are_left_out():
    tensors = [("token_embd.weight", 256), ("output_norm.weight", 256, 1), ("rope_freqs.weight", 32, 1),
               ("blk.0.attn_q.bias", 256), ("blk.0.attn_q.weight", 256), ("blk.0.ffn_norm.weight", 256, 1),
               ("blk.0.attn_v.weight", 256), ("blk.0.ffn_gate_inp.weight", 256), ("position_embd.weight", 256)]
    types = file_type_tensor_types("Q4_K_M", tensors, n_layer=1, n_gqa=1)
    assert types == {"token_embd.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K"}


def test_aliases_and_case():
    tensors = MODELS["llama_h256_gqa4_untied"]["tensors"]
    kwargs = _kwargs("llama_h256_gqa4_untied", "plain")
    assert file_type_tensor_types("q4_k", tensors, **kwargs) == file_type_tensor_types("Q4_K_M", tensors, **kwargs)
    assert file_type_tensor_types("Q3_K", tensors, **kwargs) == file_type_tensor_types("Q3_K_M", tensors, **kwargs)


def test_categories():
    assert tensor_category("output.weight") == "OUTPUT"
    assert tensor_category("token_embd.weight") == "TOKEN_EMBD"
    assert tensor_category("blk.0.attn_qkv.weight") == "ATTENTION_QKV"
    assert tensor_category("blk.0.attn_v.weight") == "ATTENTION_V"
    assert tensor_category("blk.0.ffn_down_exps.weight") == "FFN_DOWN"
    assert tensor_category("blk.0.attn_norm.weight") == "OTHER"


def test_attn_qkv_is_attn_v_like():
    # llama.cpp's ATTENTION_QKV branch is unreachable: attn_qkv takes the attn_v rules (Q6_K, not Q5_K, in Q4_K_M)
    tensors = [(f"blk.{i}.attn_qkv.weight", 256) for i in range(8)]
    types = file_type_tensor_types("Q4_K_M", tensors, n_layer=8, n_gqa=1)
    assert types["blk.0.attn_qkv.weight"] == "Q6_K" and types["blk.1.attn_qkv.weight"] == "Q4_K"


@pytest.mark.parametrize("ftype", ["TQ1_0", "MXFP4_MOE", "F16", "COPY"])
def test_unported_file_types_raise(ftype):
    with pytest.raises(ValueError, match="not ported"):
        file_type_tensor_types(ftype, [("blk.0.attn_q.weight", 256)], n_layer=1, n_gqa=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_layer=80, n_gqa=8), "70B"),
    (dict(n_layer=80, n_gqa=1, arch="qwen2"), "70B"),
    (dict(arch="glm5-next"), "GLM5"),
])
def test_unported_models_raise(kwargs, match):
    kwargs = {"n_layer": 8, "n_gqa": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        file_type_tensor_types("Q4_K_M", [("blk.0.attn_q.weight", 256)], **kwargs)


def test_an_expert_tensor_whose_layer_is_not_in_its_name_is_refused_as_llama_quantize_refuses_it():
    """With n_expert > 1 llama.cpp reads an ffn tensor's layer from its name (layer_info) and throws otherwise."""
    tensors = [("blk.0.attn_q.weight", 256), ("blk.9.ffn_down_exps.weight", 256, 3)]
    with pytest.raises(ValueError, match="Bad layer 9"):
        file_type_tensor_types("Q4_K_M", tensors, n_layer=8, n_gqa=1, n_expert=8)
    assert file_type_tensor_types("Q4_K_M", tensors, n_layer=8, n_gqa=1)  # a dense model counts instead


def test_unknown_file_type_raises():
    with pytest.raises(ValueError, match="unknown"):
        file_type_tensor_types("Q7_K", [("blk.0.attn_q.weight", 256)], n_layer=1, n_gqa=1)


def _transformers_config(model: str):
    from transformers import FalconConfig, Phi3Config, Qwen2Config

    meta = MODELS[model]
    if meta["arch"] == "falcon":  # multi-query: one KV head, attention fused into query_key_value
        return FalconConfig(hidden_size=meta["hidden"], num_hidden_layers=meta["n_layer"],
                            num_attention_heads=meta["n_head"], multi_query=True, new_decoder_architecture=False,
                            parallel_attn=True, bias=False, vocab_size=meta["vocab"], tie_word_embeddings=meta["tied"],
                            bos_token_id=1, eos_token_id=2)
    common = dict(hidden_size=meta["hidden"], intermediate_size=meta["ffn"], num_hidden_layers=meta["n_layer"],
                  num_attention_heads=meta["n_head"], num_key_value_heads=meta["n_head_kv"], vocab_size=meta["vocab"],
                  tie_word_embeddings=meta["tied"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return (Qwen2Config if meta["arch"] == "qwen2" else Phi3Config)(**common)


@pytest.mark.parametrize("kind", ["plain", "imatrix"])
@pytest.mark.parametrize("model", ["qwen2_h256_gqa2_biases", "phi3_h256_fused_qkv", "falcon_h256_16l_mqa"])
def test_the_planner_gives_transformers_models_of_other_architectures_llama_quantize_s_types(model, kind):
    """The same widths as a transformers Qwen2 (q/k/v biases), Phi-3 (qkv_proj and gate_up_proj fused) and Falcon
    (multi-query, query_key_value fused: its GQA factor read from the fused widths): the planner's per-tensor types,
    from transformers' weight names mapped by gguf, are the ones llama-quantize wrote."""
    from quantlib.methods._gguf_file_types import _gguf_names, file_type_plan
    from quantlib.shapes import model_shapes

    shapes = model_shapes(_transformers_config(model).to_dict())
    names = _gguf_names(shapes)
    for ftype in FILE_TYPES:
        expected = GOLDEN["types"][model][kind][ftype]
        if "error" in expected:
            with pytest.raises(ValueError, match="importance matrix"):
                file_type_plan(ftype, shapes, kind == "imatrix")
            continue
        ours = {names[w]: t for w, t in file_type_plan(ftype, shapes, kind == "imatrix").items()}
        assert ours == expected, (ftype, {k: (ours.get(k), v) for k, v in expected.items() if ours.get(k) != v})
