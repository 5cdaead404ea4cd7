"""llama-quantize's per-tensor type choice for its file types (Q4_K_M and friends), ported to Python.

Ported from llama.cpp at commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (the llama-cpp-python 0.3.36 sdist),
``src/llama-quant.cpp``:

- ``tensor_get_category`` and ``category_is_attn_v`` (the tensor categories, from the name suffixes);
- ``tensor_allows_quantization`` (which tensors are quantized at all: 2-D or more, names ending in ``weight``,
  no norms, ...);
- ``init_quantize_state_counters`` (``n_attention_wv`` counts attn_v-like tensors, ``n_ffn_down/gate/up`` are
  ``n_layer``, the embeddings are tied when there is no ``output.weight``);
- ``llama_tensor_get_type_impl`` (the mixture rules, with the counters ``i_attention_wv`` and
  ``i_ffn_down/gate/up`` advancing in visiting order) and ``llama_tensor_get_type`` (the wrapper, without the
  user overrides ``--tensor-type``, ``--output-tensor-type``, ``--token-embedding-type``, ``--pure``);
- ``tensor_type_fallback`` (a tensor whose ncols is not a multiple of the block size gets another type);
- ``llama_ftype_get_default_type`` and ``tensor_requires_imatrix`` (for Q2_K_S);
- the visiting order: ``llama_model_loader::weights_map``'s ``weight_name_comparer`` (src/llama-model-loader.h)
  sorts the tensors by block number (``blk.N.``; other tensors first), then by name. llama-quantize visits,
  and writes, the tensors in that order, not in the input file's order.

The names users type are those of ``QUANT_OPTIONS`` in tools/quantize/quantize.cpp (case-insensitive, with the
aliases Q3_K, Q4_K, Q5_K). Types are returned as gguf-py's ``GGMLQuantizationType`` names ("Q4_K", "F16").

Mixture-of-experts models (n_expert > 1) follow llama.cpp's own rules: the layer of an ffn_down / ffn_gate / ffn_up
tensor (expert tensors included) is read from its name (``layer_info``), and with 8 experts attn_v and attn_k are
written Q8_0 and attn_output Q5_K for the K-quant mixtures. Falcon's own rules are ported too (output Q8_0, its
ffn_down and attn_output choices). ``ValueError`` (with the reason) for GLM5-next (its own rules), for models
llama.cpp types as 70B (attn_v bumped to Q5_K) and for the file types not in ``FILE_TYPES`` (TQ, MXFP4_MOE, ...). The rules of those file types inside ``llama_tensor_get_type_impl`` are left
out; everything else keeps llama.cpp's order. ``tensor_requires_imatrix`` is ported: a tensor written IQ3_XXS,
IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M or IQ1_S (or Q2_K in Q2_K_S), but for the token embedding and the output, needs an importance
matrix, and ``ValueError`` names the first one when none is given, as llama-quantize refuses.
Checked against llama-quantize itself: scripts/llamacpp_ftypes_golden.py, tests/test_ggml_ftypes.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

#: llama-quantize's file types ported here -> the default block type (``llama_ftype_get_default_type``).
FILE_TYPES: dict[str, str] = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K",
    "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S", "IQ3_XXS": "IQ3_XXS",
    "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS", "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S",
}

#: The ``llama_ftype`` number of each (include/llama.h), as written to ``general.file_type``.
FILE_TYPE_IDS: dict[str, int] = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "Q2_K_S": 21,
    "IQ4_NL": 25, "IQ4_XS": 30, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ3_S": 26,
    "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ1_S": 24, "IQ1_M": 31,
}

#: quantize.cpp's aliases.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

#: The 1- and 2-bit i-quant file types, which llama_tensor_get_type_impl handles in a branch of their own.
_LOW_IQ = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
#: Block types llama-quantize writes only with an importance matrix (tensor_requires_imatrix; Q2_K too, in Q2_K_S).
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")

#: The rest of quantize.cpp's QUANT_OPTIONS, with why they are not ported.
UNPORTED_FILE_TYPES = {
    **{name: "ternary / 1-2 bit file type not ported" for name in ("TQ1_0", "TQ2_0", "Q1_0", "Q2_0")},
    "MXFP4_MOE": "MoE file type (MXFP4 experts) not ported",
    **{name: "not a quantized file type: llama.cpp skips the mixture rules" for name in ("F16", "BF16", "F32",
                                                                                         "COPY")},
}

#: ggml block sizes (ggml_blck_size) of the types the ported rules can produce or fall back through.
BLOCK_SIZE = {
    "F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32,
    "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256, "IQ1_S": 256, "IQ1_M": 256,
    "IQ2_XXS": 256, "IQ2_XS": 256, "IQ2_S": 256, "IQ3_XXS": 256, "IQ3_S": 256, "TQ1_0": 256, "TQ2_0": 256,
}

#: tensor_type_fallback's switch: the type used when ncols is not a multiple of the target's block size.
_FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

#: Architectures whose own rules (LLM_ARCH_FALCON, LLM_ARCH_GLM5_NEXT branches) are not ported.
_UNPORTED_ARCHS = {"glm5-next": "GLM5-next keeps attn_q_a/attn_q_b/nextn.eh_proj at Q8_0 and skips its own tensors"}

#: (arch, n_layer) that llama.cpp's load_arch_hparams types LLM_TYPE_70B (src/models/*.cpp).
_TYPE_70B = {("llama", 80), ("qwen2", 80), ("deci", 80), ("olmo", 80), ("jais2", 68)}

# tensor_allows_quantization: substrings that keep a tensor unquantized (the arch-independent ones).
_NOT_QUANTIZED_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
# LLM_TN(arch)(LLM_TENSOR_POS_EMBD / LLM_TENSOR_TOKEN_TYPES, "weight"): the same names for every arch.
_NOT_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


# --- tensor categories (tensor_get_category, category_is_attn_v) -------------------------------------------------

def tensor_category(name: str) -> str:
    """llama.cpp's ``tensor_get_category``: the category of a GGUF tensor name, checked in llama.cpp's order."""
    if name == "output.weight":
        return "OUTPUT"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "TOKEN_EMBD"
    for suffix, category in (("attn_qkv.weight", "ATTENTION_QKV"), ("attn_kv_b.weight", "ATTENTION_KV_B"),
                             ("attn_v.weight", "ATTENTION_V"), ("attn_k.weight", "ATTENTION_K"),
                             ("attn_q.weight", "ATTENTION_Q"), ("attn_output.weight", "ATTENTION_OUTPUT"),
                             ("ffn_up", "FFN_UP"), ("ffn_gate", "FFN_GATE"), ("ffn_down", "FFN_DOWN")):
        if suffix in name:
            return category
    return "OTHER"


def category_is_attn_v(category: str) -> bool:
    """attn_v-like tensors (more sensitive to quantization): attn_v, attn_qkv, attn_kv_b."""
    return category in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B")


def tensor_allows_quantization(name: str, n_dims: int = 2) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` with default parameters, for any arch but GLM5-next.
    ``n_dims`` is ggml_n_dims (trailing dimensions of 1 do not count)."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED_SUBSTRINGS) and name not in _NOT_QUANTIZED_NAMES


# --- visiting order (weight_name_comparer) ------------------------------------------------------------------------

_BLK = re.compile(r"blk\.([+-]?\d+)")


def _visit_key(name: str) -> tuple[int, bytes]:
    match = _BLK.match(name)  # sscanf(name, "blk.%d.", &layer), layer -1 when it does not match
    return (int(match.group(1)) if match else -1, name.encode())


def visiting_order(names: Iterable[str]) -> list[str]:
    """The order llama-quantize visits (and writes) tensors: non-block tensors first, then by block number,
    each group by name (std::map with llama_model_loader's weight_name_comparer), whatever the file order."""
    return sorted(names, key=_visit_key)


# --- the port -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorChoice:
    """One quantized tensor: the type the mixture rules chose (``rule_type``), the type written (``type``)."""
    name: str
    ncols: int
    rule_type: str
    type: str
    reason: str = ""  # why ``type`` differs from what the rules ask for a shape-compatible tensor; "" if it does not
    rule: str = ""  # which of llama_tensor_get_type's rules gave ``rule_type``, in words


@dataclass(frozen=True)
class FallbackNote:
    """A tensor whose ncols made llama.cpp write another type than the file type's rules ask for."""
    tensor: str
    ncols: int
    wanted: str
    used: str
    reason: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.wanted} -> {self.used} ({self.reason})"


def _canonical_file_type(file_type: str) -> str:
    key = str(file_type).strip().upper()
    key = ALIASES.get(key, key)
    if key in FILE_TYPES:
        return key
    if key in UNPORTED_FILE_TYPES:
        raise ValueError(f"file type {file_type!r} is not ported: {UNPORTED_FILE_TYPES[key]}")
    raise ValueError(f"unknown llama-quantize file type {file_type!r}; ported: {', '.join(FILE_TYPES)}")


def _c_div(a: int, b: int) -> int:  # C integer division (truncates toward zero)
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _c_mod(a: int, b: int) -> int:  # C remainder (sign of the dividend)
    return a - b * _c_div(a, b)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (i_layer < _c_div(n_layers, 8) or i_layer >= _c_div(7 * n_layers, 8)
            or _c_mod(i_layer - _c_div(n_layers, 8), 3) == 2)


def _layer_info(i_layer: int, n_layer: int, name: str, n_expert: int) -> tuple[int, int]:
    """llama.cpp's ``layer_info``: the counter's layer, or for a mixture-of-experts model the layer in the tensor's
    name (its experts are sprinkled among the layers, so the counter does not say)."""
    if n_expert > 1:
        match = re.match(r"blk\.(\d+)\.", name)
        if match is None:
            raise ValueError(f"failed to determine layer for tensor {name}")
        i_layer = int(match.group(1))
        if not 0 <= i_layer < n_layer:
            raise ValueError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {n_layer})")
    return i_layer, n_layer


def _layer_rule(what: str, i_layer: int, n_layers: int, new_type: str, default: str, why: str = "") -> str:
    """The rule for a tensor that llama-quantize types by its place among the `n_layers` like it (attn_v, ffn_down):
    `why` the rule's own condition; without one, use_more_bits (the Q4_K_M / Q5_K_M rule)."""
    if new_type == default:
        return f"{what} {i_layer} of {n_layers}: the file type's type (no rule raises it here)"
    if not why:
        why = ("for a layer use_more_bits picks (the first and last eighth, and every third between)"
               if _use_more_bits(i_layer, n_layers) else "for its place among the layers")
    return f"{what} {i_layer} of {n_layers}: {new_type} {why}"


def _fallback(ncols: int, target: str) -> tuple[str, str]:
    """tensor_type_fallback: (type, reason); reason is "" when ncols fits the target's block size."""
    qk = BLOCK_SIZE[target]
    if ncols % qk == 0:
        return target, ""
    reason = f"ncols {ncols} not a multiple of {qk}, the block size of {target}"
    if target in _FALLBACK:
        used = _FALLBACK[target]
    elif qk <= 32:
        used = target  # already a 32-block type: only F16 below can help
    else:
        raise ValueError(f"no tensor type fallback is defined for type {target} (llama.cpp throws too)")
    if ncols % BLOCK_SIZE[used] != 0:
        reason += f"; not a multiple of {BLOCK_SIZE[used]} either, so F16"
        used = "F16"
    return used, reason


def _check_model(n_layer: int, n_gqa: int, n_expert: int, arch: str) -> None:
    arch = str(arch).lower()
    if arch in _UNPORTED_ARCHS:
        raise ValueError(f"arch {arch!r} is not ported: {_UNPORTED_ARCHS[arch]}")
    if (arch, n_layer) in _TYPE_70B:
        raise ValueError(f"arch {arch!r} with {n_layer} layers is (or, for llama, may be) LLM_TYPE_70B, whose "
                         "attn_v rule (Q3_K/Q4_K -> Q5_K) is not ported")
    if int(n_layer) != n_layer or n_layer < 1:
        raise ValueError(f"n_layer must be a positive integer, got {n_layer!r}")
    if int(n_gqa) != n_gqa or n_gqa < 0:
        raise ValueError(f"n_gqa must be n_head // n_head_kv (0 when n_head_kv is 0), got {n_gqa!r}")


def _parse(tensors: Sequence) -> list[tuple[str, int, int]]:
    parsed = []
    for item in tensors:
        if len(item) not in (2, 3):
            raise ValueError(f"expected (name, ncols) or (name, ncols, n_dims), got {item!r}")
        name, ncols = str(item[0]), int(item[1])
        n_dims = int(item[2]) if len(item) == 3 else 2
        if ncols < 1:
            raise ValueError(f"{name}: ncols must be positive, got {ncols}")
        parsed.append((name, ncols, n_dims))
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    return parsed


def tensor_choices(file_type: str, tensors: Sequence, *, n_layer: int, n_gqa: int, n_expert: int = 1,
                   has_imatrix: bool = False, arch: str = "llama") -> list[TensorChoice]:
    """Every tensor llama-quantize quantizes, in its visiting order, with the rules' type and the written type.
    Arguments as :func:`file_type_tensor_types`."""
    ftype = _canonical_file_type(file_type)
    _check_model(n_layer, n_gqa, n_expert, arch)
    default = FILE_TYPES[ftype]
    parsed = sorted(_parse(tensors), key=lambda t: _visit_key(t[0]))

    # init_quantize_state_counters: over all tensors, quantized or not
    categories = {name: tensor_category(name) for name, _, _ in parsed}
    n_attention_wv = sum(category_is_attn_v(c) for c in categories.values())
    has_tied_embeddings = "OUTPUT" not in categories.values()
    n_ffn_down = n_layer
    i_attention_wv = i_ffn_down = i_ffn_gate = i_ffn_up = 0

    falcon = str(arch).lower() == "falcon"
    choices = []
    for name, ncols, n_dims in parsed:
        if not tensor_allows_quantization(name, n_dims):
            continue
        category = categories[name]
        new_type = default
        shape_reason = ""
        layer_rule = ""
        # llama_tensor_get_type_impl (the branches of unported file types left out)
        if category == "OUTPUT" or (has_tied_embeddings and category == "TOKEN_EMBD"):
            output_type = "Q5_K" if ftype in (*_LOW_IQ, "IQ3_XXS") else "Q8_0" if default == "Q8_0" else "Q6_K"
            if falcon:
                new_type = "Q8_0"
            elif ncols % BLOCK_SIZE[default] != 0:
                new_type = "Q8_0"
                if output_type != "Q8_0":
                    shape_reason = (f"ncols {ncols} not a multiple of {BLOCK_SIZE[default]}, the block size of "
                                    f"{default}, so the output rule gives Q8_0, not {output_type}")
            else:
                new_type = output_type
            layer_rule = ("the output rule" + (" (Falcon's: Q8_0)" if falcon else "")
                          + (" (the token embedding stands in for a tied output)" if category == "TOKEN_EMBD" else ""))
        elif category == "TOKEN_EMBD":
            if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                new_type = "Q2_K"
            elif ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                new_type = "IQ3_S"
            if new_type != default:
                layer_rule = f"the token embedding in {ftype}: {new_type}"
        elif ftype in _LOW_IQ:  # llama.cpp's own branch for the 1- and 2-bit i-quant file types
            iq2_sm = ftype in ("IQ2_S", "IQ2_M")
            if category_is_attn_v(category):
                new_type = ("Q4_K" if n_gqa >= 4 or n_expert >= 4 else "IQ3_S" if iq2_sm else "Q2_K")
                layer_rule = f"attn_v in {ftype}: {new_type}" + (
                    " (n_gqa >= 4 or n_expert >= 4)" if new_type == "Q4_K" else "")
                i_attention_wv += 1
            elif n_expert == 8 and category == "ATTENTION_K":
                new_type, layer_rule = "Q4_K", "attn_k of an 8-expert model: Q4_K (llama.cpp's n_expert == 8 rule)"
            elif category == "FFN_DOWN":  # the counter, not the name's layer, even for experts
                if i_ffn_down < _c_div(n_ffn_down, 8):
                    new_type = "IQ3_S" if iq2_sm else "Q2_K"
                layer_rule = _layer_rule("ffn_down", i_ffn_down, n_ffn_down, new_type, default,
                                         f"in the first eighth of {ftype}")
                i_ffn_down += 1
            elif category == "ATTENTION_OUTPUT":
                if n_expert == 8:
                    new_type = "Q5_K"
                elif ftype in ("IQ1_S", "IQ1_M"):
                    new_type = "IQ2_XXS"
                elif iq2_sm:
                    new_type = "IQ3_S"
                if new_type != default:
                    layer_rule = f"attn_output is raised to {new_type} in {ftype}" + (
                        " for an 8-expert model" if n_expert == 8 else "")
        elif category_is_attn_v(category):  # attn_v, attn_qkv, attn_kv_b
            why = ""
            if ftype == "Q2_K":
                new_type, why = ("Q4_K" if n_gqa >= 4 else "Q3_K"), "in Q2_K (Q4_K when n_gqa >= 4, else Q3_K)"
            elif ftype == "Q2_K_S" and n_gqa >= 4:
                new_type, why = "Q4_K", "in Q2_K_S when n_gqa >= 4"
            elif ftype == "IQ3_XXS":
                new_type = "Q4_K" if n_gqa >= 4 else "IQ3_S" if not has_imatrix else "IQ3_XXS"
                why = "in IQ3_XXS (Q4_K when n_gqa >= 4, else IQ3_S without an importance matrix)"
            elif ftype in ("IQ3_XS", "IQ3_S") and n_gqa >= 4:
                new_type, why = "Q4_K", f"in {ftype} when n_gqa >= 4"
            elif ftype == "IQ3_M":
                new_type, why = "Q4_K", "in IQ3_M"
            elif ftype == "Q3_K_M":
                new_type, why = ("Q5_K" if i_attention_wv < 2 else "Q4_K"), "in Q3_K_M (Q5_K for the first two)"
            elif ftype == "Q3_K_L":
                new_type, why = "Q5_K", "in Q3_K_L"
            elif ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
                new_type, why = "Q5_K", f"in {ftype} when n_gqa >= 4"
            elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attention_wv, n_attention_wv):
                new_type = "Q6_K"
            elif ftype == "Q4_K_S" and i_attention_wv < 4:
                new_type, why = "Q5_K", "in Q4_K_S for the first four"
            layer_rule = _layer_rule("attn_v", i_attention_wv, n_attention_wv, new_type, default, why)
            if n_expert == 8:
                new_type, layer_rule = "Q8_0", "attn_v of an 8-expert model: Q8_0 (llama.cpp's n_expert == 8 rule)"
            i_attention_wv += 1
        elif category == "ATTENTION_K" and n_expert == 8:
            new_type, layer_rule = "Q8_0", "attn_k of an 8-expert model: Q8_0 (llama.cpp's n_expert == 8 rule)"
        elif category in ("ATTENTION_K", "ATTENTION_Q"):
            if ftype in ("IQ3_XS", "IQ3_XXS"):
                new_type = "IQ3_XXS" if ftype == "IQ3_XS" else "IQ2_S"
                layer_rule = f"{'attn_k' if category == 'ATTENTION_K' else 'attn_q'} in {ftype}: {new_type}"
        elif category == "FFN_DOWN":
            i_layer, n = _layer_info(i_ffn_down, n_ffn_down, name, n_expert)
            first8, why = i_layer < _c_div(n, 8), ""
            if ftype == "Q2_K":
                new_type, why = "Q3_K", "in Q2_K"
            elif ftype == "Q2_K_S":
                if first8:
                    new_type, why = "Q4_K", "in the first eighth of Q2_K_S"
            elif ftype == "IQ3_XXS" and not has_imatrix:
                new_type = "Q4_K" if first8 else "Q3_K"
                why = "in IQ3_XXS without an importance matrix (Q4_K in the first eighth, else Q3_K)"
            elif ftype == "Q3_K_M":
                new_type = ("Q5_K" if i_layer < _c_div(n, 16)
                            else "Q4_K" if not falcon or _use_more_bits(i_layer, n) else "Q3_K")
                why = "in Q3_K_M (Q5_K in the first sixteenth)" if new_type != "Q3_K" else ""
            elif ftype == "IQ3_M" and (first8 or (n_expert == 8 and _use_more_bits(i_layer, n))):
                new_type, why = "Q4_K", ("in the first eighth of IQ3_M" if first8 else "")
            elif ftype == "Q3_K_L":
                new_type, why = ("Q4_K" if falcon else "Q5_K"), "in Q3_K_L"
            elif ftype == "Q4_K_M":
                if falcon:
                    new_type = ("Q6_K" if i_layer < _c_div(n, 16) else "Q5_K" if _use_more_bits(i_layer, n)
                                else "Q4_K")
                    why = "in Falcon's first sixteenth" if i_layer < _c_div(n, 16) else ""
                elif _use_more_bits(i_layer, n):
                    new_type = "Q6_K"
            elif first8 and ftype in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
                new_type, why = "Q5_K", f"in the first eighth of {ftype} without an importance matrix"
            elif ftype == "Q5_K_M" and _use_more_bits(i_layer, n):
                new_type = "Q6_K"
            elif ftype == "Q4_K_S" and not falcon and first8:
                new_type, why = "Q5_K", "in the first eighth of Q4_K_S"
            elif ftype in ("Q4_0", "Q5_0") and has_imatrix and first8:
                new_type = "Q4_1" if ftype == "Q4_0" else "Q5_1"
                why = f"in the first eighth of {ftype} with an importance matrix"
            layer_rule = _layer_rule("ffn_down", i_layer, n, new_type, default, why)
            i_ffn_down += 1
        elif category == "ATTENTION_OUTPUT":
            if falcon:
                new_type = "Q4_K" if ftype == "Q3_K_L" else new_type
            elif n_expert == 8:
                if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                             "IQ3_M", "IQ4_XS"):
                    new_type = "Q5_K"
            else:
                new_type = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K",
                            "IQ3_M": "Q4_K"}.get(ftype, new_type)
            if new_type != default:
                layer_rule = f"attn_output is raised to {new_type} in {ftype}" + (
                    " for an 8-expert model" if n_expert == 8 else "")
        # (llama.cpp's ATTENTION_QKV branch is unreachable: attn_qkv is attn_v-like and handled above)
        elif category in ("FFN_GATE", "FFN_UP"):  # a bad layer throws, as layer_info does
            i_layer, n = _layer_info(i_ffn_gate if category == "FFN_GATE" else i_ffn_up, n_ffn_down, name, n_expert)
            if ftype == "IQ3_XS" and _c_div(n, 8) <= i_layer < _c_div(7 * n, 8):
                new_type = "IQ3_XXS"
                layer_rule = f"{category.lower()} {i_layer} of {n}: IQ3_XXS outside the first and last eighth"
            if category == "FFN_GATE":
                i_ffn_gate += 1
            else:
                i_ffn_up += 1

        rule_type = output_type if shape_reason else new_type  # the output rule for a shape that fits
        final, fallback_reason = _fallback(ncols, new_type)  # tensor_type_fallback
        needs = final in NEEDS_IMATRIX or (ftype == "Q2_K_S" and final == "Q2_K")
        if not has_imatrix and needs and name not in ("token_embd.weight", "per_layer_token_embd.weight",
                                                      "output.weight"):
            raise ValueError(f"{ftype} needs an importance matrix: llama-quantize refuses to write {name} as {final} "
                             "without one (tensor_requires_imatrix)")
        reason = "; ".join(r for r in (shape_reason, fallback_reason) if r)
        rule = layer_rule or f"{ftype}'s type for every other tensor"
        choices.append(TensorChoice(name, ncols, rule_type, final, reason, rule))
    return choices


def file_type_tensor_types(file_type: str, tensors: Sequence, *, n_layer: int, n_gqa: int, n_expert: int = 1,
                           has_imatrix: bool = False, arch: str = "llama") -> dict[str, str]:
    """``{gguf_tensor_name: type}`` for the tensors llama-quantize quantizes in a ``file_type`` file, fallbacks
    for the shapes applied; types are gguf GGMLQuantizationType names ("Q4_K", "Q5_0", "F16").

    ``tensors``: ``(gguf_tensor_name, ncols)`` or ``(gguf_tensor_name, ncols, n_dims)`` for every tensor of the
    model (ncols is ggml's ne[0], the row length; n_dims defaults to 2, give 1 for 1-D weights such as
    rope_freqs.weight). Any order: llama-quantize's own visiting order (:func:`visiting_order`) is applied.
    Norms, biases and 1-D tensors are left out of the result, as llama.cpp leaves them unquantized.
    ``n_layer`` is the block count, ``n_gqa`` n_head // n_head_kv of layer 0, ``has_imatrix`` whether
    llama-quantize gets ``--imatrix``. ``ValueError`` for what is not ported (see the module docstring) and, without
    an imatrix, for a file whose tensors llama-quantize refuses to write without one (tensor_requires_imatrix:
    Q2_K_S, and the i-quant types but IQ3_S, wherever a tensor keeps such a type after the fallbacks).
    """
    return {c.name: c.type for c in tensor_choices(file_type, tensors, n_layer=n_layer, n_gqa=n_gqa,
                                                   n_expert=n_expert, has_imatrix=has_imatrix, arch=arch)}


def fallback_notes(file_type: str, tensors: Sequence, *, n_layer: int, n_gqa: int, n_expert: int = 1,
                   has_imatrix: bool = False, arch: str = "llama") -> list[FallbackNote]:
    """The tensors whose shape made llama.cpp write another type than the file type asks for, and why: those
    ``tensor_type_fallback`` demoted (ncols not a multiple of 256, or of 32 -> F16), and an output (or tied token
    embedding) whose ncols does not fit the default type's block, written Q8_0 instead of Q6_K.

    E.g. SmolLM2 (hidden size 576) in Q4_K_M: attn_q/k/v/output and ffn_gate/up ask for Q4_K and get Q5_0.
    """
    return [FallbackNote(c.name, c.ncols, c.rule_type, c.type, c.reason)
            for c in tensor_choices(file_type, tensors, n_layer=n_layer, n_gqa=n_gqa, n_expert=n_expert,
                                    has_imatrix=has_imatrix, arch=arch)
            if c.reason]
