"""GGUF K-quants and IQ4 types through the whole method: config, quantizer, importance matrix, planner, comparison.

The quantizers themselves are checked byte for byte against llama.cpp in tests/test_ggml_*.py; here the method
must hand them the right tensors and the right importance matrix, count their bytes as the planner does, and
refuse what it cannot do as llama.cpp would do it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantlib.errors import BackendUnavailableError, QuantlibError
from quantlib.memory import plan_memory
from quantlib.methods._ggml_importance import importance_matrix
from quantlib.methods._ggml_qk import quantize_q4_K
from quantlib.methods._gguf_tensor import GGUF_TYPES, IMATRIX_TYPES, quantize_gguf
from quantlib.models import load_model
from quantlib.registry import get_quantizer, parse_config, preflight
from tests.conftest import tiny_llama_config
from tests.ggml_golden import GOLDEN

KQ = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama whose widths are multiples of 256, the K-quant super-block."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide_llama")
    config = tiny_llama_config(len(tiny_tokenizer), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                               num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return load_model(str(folder))


def test_every_k_and_iq4_type_is_a_config_choice() -> None:
    for qtype in KQ:
        assert qtype in GGUF_TYPES and qtype in IMATRIX_TYPES
        assert parse_config({"quant_method": "gguf", "quant_type": qtype}).quant_type == qtype


def test_an_importance_matrix_takes_llama_cpp_s_weighted_legacy_quantizers_and_mxfp4_refuses_one() -> None:
    """With an imatrix llama.cpp quantizes Q4_0..Q5_1 with another (weighted) algorithm: the method takes it, as
    `_ggml_legacy` ports it bit-exact; MXFP4's quantizer has no weighted path, so it is refused with the reason."""
    from quantlib.methods._ggml_legacy import quantize_q5_1_weighted

    golden = np.load(GOLDEN)
    x, w = golden["input/heavy_2x512"], golden["imatrix/heavy_2x512"]
    ours = quantize_gguf(torch.from_numpy(x), "Q5_1", imatrix=w).data
    assert np.array_equal(ours, golden["Q5_1+imatrix/heavy_2x512"])
    assert np.array_equal(ours, quantize_q5_1_weighted(x, w))
    assert not np.array_equal(quantize_gguf(torch.from_numpy(x), "Q5_1").data, ours)
    with pytest.raises(BackendUnavailableError, match="MXFP4 takes no importance matrix"):
        get_quantizer({"quant_method": "gguf", "quant_type": "MXFP4", "imatrix": True})
    get_quantizer({"quant_method": "gguf", "quant_type": "Q8_0", "imatrix": True})  # llama.cpp's Q8_0 ignores it


def test_a_k_quant_refuses_a_width_that_is_not_a_multiple_of_256(tiny_llama_dir) -> None:
    """The block type alone does not fit a 64-wide layer: refused before anything is loaded (llama-quantize's file
    types fall back to other types there; a block type chosen by name does not)."""
    from quantlib.models import read_model_config

    problems = preflight({"quant_method": "gguf", "quant_type": "Q4_K"}, read_model_config(str(tiny_llama_dir)))
    assert problems and all("multiple of the Q4_K block (256)" in p for p in problems)


@pytest.mark.parametrize("qtype", KQ)
def test_planned_bytes_are_the_stored_bytes(wide_llama, qtype) -> None:
    quantizer = get_quantizer({"quant_method": "gguf", "quant_type": qtype}, device="cpu")
    qm = quantizer.quantize_model(base=wide_llama)
    stored = sum(p.data.nbytes for p in qm.packed_layers.values())
    planned = plan_memory(wide_llama.model.config.to_dict(), quantizer.config, "float32")
    assert planned.total_bytes == qm.memory.total_bytes
    quantized = sum(v for k, v in planned.bytes_by_component.items() if k != "unquantized")
    assert quantized == stored


def test_the_importance_matrix_is_measured_once_and_reaches_every_layer(wide_llama) -> None:
    quantizer = get_quantizer({"quant_method": "gguf", "quant_type": "Q4_K", "imatrix": True,
                               "imatrix_tokens": 600}, device="cpu")
    qm = quantizer.quantize_model(base=wide_llama)
    layers = [ref.name for ref in quantizer.quantizable_layers(wide_llama.model)]
    assert set(quantizer.importance) == set(layers)
    # independently: the mean squared input of q_proj is the mean squared output of the first norm
    expected = importance_matrix(wide_llama.model, wide_llama.tokenizer, [layers[0]], 600)[layers[0]]
    assert np.array_equal(quantizer.importance[layers[0]], expected)
    assert (expected > 0).all()
    for name in layers[:3]:  # the bytes are the port's on the layer's weight with its own importance
        weight = dict(wide_llama.model.named_modules())[name].weight.detach().float().numpy()
        assert np.array_equal(qm.packed_layers[name].data, quantize_q4_K(weight, quantizer.importance[name]))
    # and the importance matters: without it the same layer quantizes to other bytes
    plain = get_quantizer({"quant_method": "gguf", "quant_type": "Q4_K"}, device="cpu")
    weight = dict(wide_llama.model.named_modules())[layers[0]].weight
    assert not np.array_equal(plain.quantize_layer(layers[0], weight).data, qm.packed_layers[layers[0]].data)


def test_a_layer_alone_has_no_importance_matrix_and_says_so(wide_llama) -> None:
    quantizer = get_quantizer({"quant_method": "gguf", "quant_type": "Q4_K", "imatrix": True}, device="cpu")
    with pytest.raises(QuantlibError, match="measured on the model's activations"):
        quantizer.quantize_layer("model.layers.0.mlp.down_proj", torch.randn(256, 512))


def test_a_k_quant_comparison_runs_end_to_end(wide_llama, tmp_path) -> None:
    from quantlib.compare import CompareSettings, run_comparison

    settings = CompareSettings(source="unused", max_tokens=256, window=128, device="cpu")
    result = run_comparison([{"quant_method": "gguf", "quant_type": "Q4_K"},
                             {"quant_method": "gguf", "quant_type": "Q4_K", "imatrix": True, "imatrix_tokens": 512}],
                            settings, base=wide_llama, save=False)
    table = result.table.set_index("scheme")
    assert table.loc["GGUF Q4_K", "kl"] > 0 and table.loc["GGUF Q4_K imatrix", "kl"] > 0
    assert table.loc["GGUF Q4_K", "bits_per_param"] == pytest.approx(144 * 8 / 256)


# ------------------------------------------------------------------ llama-quantize's file types


def _smollm2_widths(n_layer: int = 8) -> dict:
    """config.json of a Llama with SmolLM2-135M's widths (hidden 576, ffn 1536, 9 heads, 3 KV heads, tied)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layer, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=256, tie_word_embeddings=True).to_dict()


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "Q3_K_L", "Q2_K_S"])
def test_a_file_type_gives_every_weight_the_type_llama_quantize_wrote(file_type) -> None:
    """The transformers model's weights, named as convert_hf_to_gguf names them, get the types llama-quantize
    itself wrote for a model of the same widths (tests/data/llamacpp_ftypes.json.gz)."""
    import gzip
    import json

    from quantlib.methods._gguf_file_types import _gguf_names, file_type_plan
    from quantlib.shapes import model_shapes

    golden = json.loads(gzip.decompress((Path(__file__).parent / "data" / "llamacpp_ftypes.json.gz").read_bytes()))
    imatrix = file_type == "Q2_K_S"  # llama-quantize refuses Q2_K_S without one
    written = golden["types"]["smollm2_h576_gqa3_tied"]["imatrix" if imatrix else "plain"][file_type]
    shapes = model_shapes(_smollm2_widths())
    names = _gguf_names(shapes)
    ours = {names[w]: t for w, t in file_type_plan(file_type, shapes, imatrix).items()}
    assert ours == written


def test_a_file_type_is_planned_quantized_and_stored_to_the_byte(wide_llama) -> None:
    quantizer = get_quantizer({"quant_method": "gguf", "quant_type": "Q4_K_M"}, device="cpu")
    qm = quantizer.quantize_model(base=wide_llama)
    config = wide_llama.model.config.to_dict()
    planned = plan_memory(config, quantizer.config, "float32")
    assert planned.total_bytes == qm.memory.total_bytes
    assert sum(v for k, v in planned.bytes_by_component.items() if k != "unquantized") == \
        sum(p.data.nbytes for p in qm.packed_layers.values())
    types = {name: packed.qtype.name for name, packed in qm.packed_layers.items()}
    assert types["lm_head"] == "Q6_K" and types["model.embed_tokens"] == "Q4_K"  # untied: llama.cpp's output rule
    assert {"Q4_K", "Q6_K"} <= set(types.values())
    assert quantizer.config.label == "GGUF Q4_K_M"


def test_the_default_model_in_q4_k_m_says_what_fell_back() -> None:
    """SmolLM2's rows of 576 are no multiple of 256: llama.cpp writes most of a "Q4_K_M" SmolLM2 as Q5_0 (and its
    tied embedding as Q8_0); the planner says so instead of pretending the file is Q4_K."""
    from quantlib.models import read_model_config
    from quantlib.registry import quantizer_class
    from quantlib.shapes import model_shapes

    config = parse_config({"quant_method": "gguf", "quant_type": "Q4_K_M"})
    shapes = model_shapes(read_model_config("default"))
    notes = quantizer_class(config).file_type_notes(config, shapes)
    assert any("token_embd.weight: Q6_K -> Q8_0" in n for n in notes)
    assert sum("-> Q5_0" in n for n in notes) > 100
    assert preflight(config, read_model_config("default")) == []  # fallbacks fit: nothing to refuse
    plan = plan_memory(read_model_config("default"), config, "bfloat16")
    assert any("Q4_K -> Q5_0 for" in n and "rows fit no 256-block" in n for n in plan.notes)  # on the plan itself
    with pytest.raises(BackendUnavailableError, match="Q2_K_S needs an importance matrix"):
        get_quantizer({"quant_method": "gguf", "quant_type": "Q2_K_S"})


def test_any_type_with_rules_is_the_file_llama_quantize_writes() -> None:
    """`llama_quantize_rules: true` turns a block type into llama-quantize's file type of that name: Q6_K on SmolLM2's widths
    writes its rows that fit no 256-block as Q8_0, as llama-quantize did (tests/data/llamacpp_ftypes.json.gz)."""
    import gzip
    import json

    from quantlib.methods._gguf_file_types import _gguf_names
    from quantlib.registry import quantizer_class
    from quantlib.shapes import model_shapes

    golden = json.loads(gzip.decompress((Path(__file__).parent / "data" / "llamacpp_ftypes.json.gz").read_bytes()))
    shapes = model_shapes(_smollm2_widths())
    names = _gguf_names(shapes)
    for qtype in ("Q6_K", "IQ4_XS", "Q4_1"):
        config = parse_config({"quant_method": "gguf", "quant_type": qtype, "llama_quantize_rules": True})
        decisions = quantizer_class(config).classify(config, shapes)
        assert config.label == f"GGUF {qtype} file"
        from quantlib.methods._gguf_file_types import file_type_plan

        ours = {names[w]: t for w, t in file_type_plan(qtype, shapes).items() if decisions[w] is None}
        assert ours == golden["types"]["smollm2_h576_gqa3_tied"]["plain"][qtype]


def test_file_types_reach_gpt2_and_refuse_what_gguf_cannot_name() -> None:
    """GPT-2's blocks are `transformer.h.N.` (not `.layers.N.`): every block weight and the tied embedding get a type.
    A model the gguf package has no llama.cpp names for (OPT) is refused with the reason, for the planner and the
    quantizer alike, never planned by a guess."""
    from transformers import GPT2Config, OPTConfig

    from quantlib.methods._gguf_file_types import file_type_plan
    from quantlib.shapes import model_shapes

    gpt2 = model_shapes(GPT2Config(n_embd=256, n_layer=2, n_head=4, vocab_size=512, bos_token_id=0,
                                   eos_token_id=0).to_dict())
    plan = file_type_plan("Q4_K_M", gpt2)
    blocks = [w.name for w in gpt2.weights if w.is_matmul and ".h." in w.name]
    assert len(blocks) == 8 and set(blocks) <= set(plan) and plan["transformer.wte.weight"] == "Q6_K"
    opt = OPTConfig(hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                    word_embed_proj_dim=256).to_dict()
    with pytest.raises(ValueError, match="per-tensor rules cannot be applied"):
        plan_memory(opt, parse_config({"quant_method": "gguf", "quant_type": "Q4_K_M"}), "float32")


def test_a_file_type_with_an_importance_matrix_quantizes_the_embedding_without_one(wide_llama) -> None:
    """llama-imatrix measures matmul inputs; the token embedding is a row lookup, so llama-quantize quantizes it
    without an importance matrix, and so does the method, while every matmul gets its own."""
    quantizer = get_quantizer({"quant_method": "gguf", "quant_type": "Q4_K_M", "imatrix": True,
                               "imatrix_tokens": 512}, device="cpu")
    qm = quantizer.quantize_model(base=wide_llama)
    assert quantizer.importance["model.embed_tokens"] is None
    assert all(v is not None for k, v in quantizer.importance.items() if k != "model.embed_tokens")
    embedding = wide_llama.model.model.embed_tokens.weight.detach()
    packed = qm.packed_layers["model.embed_tokens"]
    assert np.array_equal(packed.data, quantize_gguf(embedding, packed.qtype.name).data)


def _quantize_in_child(queue) -> None:
    from quantlib.methods._gguf_tensor import quantize_gguf

    w = torch.randn(2048, 256, generator=torch.Generator().manual_seed(1))
    queue.put(quantize_gguf(w, qtype="Q4_K").data.tobytes())


def test_slices_give_the_bytes_of_one_call_and_survive_a_fork() -> None:
    """`by_rows` quantizes a tall matrix in slices on two threads: the bytes equal one call's on the whole matrix,
    and a process forked afterwards (whose copy of the pool has no threads) still quantizes."""
    import multiprocessing

    from quantlib.methods._gguf_tensor import _ported_quantizers, by_rows, quantize_gguf

    w = torch.randn(2048, 256, generator=torch.Generator().manual_seed(1))
    sliced = quantize_gguf(w, qtype="Q4_K").data
    whole = _ported_quantizers()["Q4_K"](w.numpy(), None)
    assert np.array_equal(sliced, whole) and by_rows(lambda rows: rows * 2, w.numpy()[:3]).shape == (3, 256)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_quantize_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=120)  # before join: the child waits until its bytes have gone through the pipe
    child.join(timeout=30)
    assert child.exitcode == 0, "the forked child failed"
    assert got == sliced.tobytes()


LATTICE = ("IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


@pytest.mark.parametrize("qtype", LATTICE)
def test_a_lattice_type_needs_what_llama_quantize_needs(qtype) -> None:
    """IQ3_S is written without an importance matrix; the others only with one (llama-quantize's
    tensor_requires_imatrix), so the config says why instead of quantizing something llama.cpp would not write."""
    assert qtype in GGUF_TYPES and qtype in IMATRIX_TYPES
    if qtype == "IQ3_S":
        get_quantizer({"quant_method": "gguf", "quant_type": qtype})
    else:
        with pytest.raises(BackendUnavailableError, match=f"{qtype} needs an importance matrix"):
            get_quantizer({"quant_method": "gguf", "quant_type": qtype})
    get_quantizer({"quant_method": "gguf", "quant_type": qtype, "imatrix": True})
    with pytest.raises(BackendUnavailableError, match="IQ2_XS needs an importance matrix"):
        get_quantizer({"quant_method": "gguf", "quant_type": "IQ3_S", "tensor_types": {"lm_head": "IQ2_XS"}})


@pytest.mark.parametrize("qtype", ["IQ3_S", "IQ2_XXS", "IQ1_M"])
def test_a_lattice_type_is_planned_quantized_and_stored_to_the_byte(wide_llama, qtype) -> None:
    """Through the method: every layer (widths multiples of 256) in the type, llama.cpp's bytes for its own
    importance matrix, and the planner's bytes equal to the stored ones."""
    quantizer = get_quantizer({"quant_method": "gguf", "quant_type": qtype, "imatrix": True, "imatrix_tokens": 512,
                               "activations": False}, device="cpu")
    qm = quantizer.quantize_model(base=wide_llama)
    planned = plan_memory(wide_llama.model.config.to_dict(), quantizer.config, "float32")
    assert planned.total_bytes == qm.memory.total_bytes
    assert {p.qtype.name for p in qm.packed_layers.values()} == {qtype}
    name = "model.layers.1.mlp.down_proj"
    weight = dict(wide_llama.model.named_modules())[name].weight.detach()
    assert np.array_equal(qm.packed_layers[name].data,
                          quantize_gguf(weight, qtype, imatrix=quantizer.importance[name]).data)


def test_an_i_quant_file_type_without_an_importance_matrix_names_the_tensor() -> None:
    """IQ2_M on the default model: llama-quantize refuses it without an importance matrix because ffn_down (rows of
    1,536) would be IQ2_S; IQ3_XXS's tensors of that kind fall back or take other rules there, so it plans."""
    from quantlib.models import read_model_config

    config = read_model_config("default")
    with pytest.raises(ValueError, match=r"refuses to write blk\.\d+\.ffn_down\.weight as IQ2_S"):
        plan_memory(config, parse_config({"quant_method": "gguf", "quant_type": "IQ2_M"}), "float32")
    plan = plan_memory(config, parse_config({"quant_method": "gguf", "quant_type": "IQ3_XXS",
                                             "llama_quantize_rules": True}), "float32")
    assert plan.total_bytes > 0


def test_the_gguf_package_s_block_quantizers_called_whole_give_its_own_bytes() -> None:
    """quantize_gguf calls the gguf package's block quantizer on slices of rows and its dequantizer on all blocks at
    once, where `gguf.quants.quantize`/`dequantize` loop over small groups of rows: the same bytes and values."""
    from gguf import GGMLQuantizationType, quants

    from quantlib.methods._gguf_tensor import GGUF_QUANTIZABLE_TYPES

    x = np.random.default_rng(3).standard_normal((1100, 512)).astype(np.float32)  # several slices of rows
    checked = 0
    for name in GGUF_QUANTIZABLE_TYPES:
        if name == "F32":
            continue
        qtype = GGMLQuantizationType[name]
        ours = quantize_gguf(torch.from_numpy(x), name)
        assert np.array_equal(ours.data, quants.quantize(x, qtype)), name
        assert torch.equal(ours.dequantize(), torch.from_numpy(quants.dequantize(ours.data, qtype))), name
        checked += 1
    assert checked >= 8


def test_a_lattice_type_dequantizes_in_a_fresh_process() -> None:
    """The gguf package builds its lattice grids in `dequantize`; quantlib calls its block dequantizer directly, so
    it must build them itself: in a process where nothing else has, IQ3_S reads back."""
    import subprocess
    import sys

    code = ("import torch; from quantlib.methods._gguf_tensor import quantize_gguf; "
            "t = quantize_gguf(torch.randn(4, 256), 'IQ3_S'); v = t.dequantize(); "
            "assert v.shape == (4, 256) and torch.isfinite(v).all(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
