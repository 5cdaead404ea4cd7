"""llama-quantize's file types (Q4_K_M and the rest) on a transformers model: which block type every weight gets.

`_ggml_ftypes` ports llama-quantize's rules on GGUF tensor names; this maps a model's weights (the meta-device
shapes quantlib plans from) to those names with the `gguf` package's own name map, as convert_hf_to_gguf.py
names them, and back. The token embedding and the output head are weights of the file like any other: llama.cpp
quantizes them (the output to Q6_K, or Q8_0 where its rows do not fit), so a file type quantizes them here too.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from quantlib.shapes import ModelShapes

#: llama-quantize file types that are mixtures: no block type has their name.
MIXTURE_FILE_TYPES = ("Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "IQ3_XS",
                      "IQ3_M", "IQ2_M")


#: transformers model types whose GGUF architecture has another name: convert_hf_to_gguf.py writes a Mixtral as a
#: llama model with expert tensors, Qwen3-MoE as qwen3moe and Qwen2-MoE as qwen2moe (whose one-row shared-expert
#: gate is 1-D to ggml, so llama-quantize leaves it in F32: `ggml_n_dims`).
ARCH_ALIASES = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims of a weight of this (torch) shape: ggml's ne is the shape reversed and trailing ne of 1 do not
    count, so a one-row matrix (Qwen2-MoE's shared_expert_gate, (1, hidden)) is 1-D to llama-quantize, which
    quantizes only tensors of 2 dimensions or more."""
    ne = tuple(shape)[::-1]
    return max((i + 1 for i, n in enumerate(ne) if n > 1), default=1)


def _name_map(shapes: ModelShapes) -> Any:
    import gguf

    wanted = ARCH_ALIASES.get(shapes.model_type, shapes.model_type)
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == wanted), None)
    if arch is None:
        raise ValueError(f"gguf has no architecture named {shapes.model_type!r}: llama.cpp's tensor names for this "
                         "model are unknown, so llama-quantize's per-tensor rules cannot be applied")
    # the block index: the first number in a weight's name (model.layers.3., transformer.h.3., ...)
    blocks = [int(m.group(1)) for w in shapes.weights if (m := re.search(r"\.(\d+)\.", w.name))]
    return gguf.get_tensor_name_map(arch, max(blocks, default=-1) + 1)


def _gguf_names(shapes: ModelShapes, names: Any = None) -> dict[str, str]:
    """Weight name (transformers) -> GGUF tensor name, for the weights llama.cpp stores as 2-D matrices (`names`:
    the model's gguf name map, when the caller has it)."""
    names = names if names is not None else _name_map(shapes)
    out = {}
    for w in shapes.weights:
        if not (w.is_matmul or w.role in ("embedding", "head")) or len(w.shape) != 2:
            continue
        gname = names.get_name(w.name, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            out[w.name] = gname
    return out


def _gguf_tensor_names(shapes: ModelShapes) -> list[tuple[str, str]]:
    """(weight name, GGUF tensor name) in model order, the 3-D expert tensors included. transformers fuses each
    expert's gate and up projections into one `gate_up_proj` (experts x 2·ffn x hidden) where convert_hf_to_gguf.py
    writes two tensors, `ffn_gate_exps` and `ffn_up_exps`: that weight gives both names."""
    names = _name_map(shapes)
    flat = _gguf_names(shapes, names)
    out: list[tuple[str, str]] = []
    for w in shapes.weights:
        if w.name in flat:
            out.append((w.name, flat[w.name]))
        elif w.kind == "experts":
            stem = w.name.rsplit(".", 1)[0]
            parts = ([f"{stem}.gate_proj", f"{stem}.up_proj"] if w.name.endswith("gate_up_proj") else [w.name])
            mapped = [names.get_name(p, try_suffixes=(".weight",)) for p in parts]
            out += [(w.name, g if g.endswith(".weight") else f"{g}.weight") for g in mapped if g is not None]
    return out


def file_type_plan(file_type: str, shapes: ModelShapes, has_imatrix: bool = False) -> dict[str, str]:
    """Weight name -> the GGML type llama-quantize writes it in, for a `file_type` file of this model (rules and
    shape fallbacks applied). Weights it leaves alone (norms, biases) are absent. `ValueError` with the reason
    for a model or file type the port does not cover."""
    return dict(_plan(file_type, shapes, has_imatrix)[0])


def file_type_table(file_type: str, shapes: ModelShapes, has_imatrix: bool = False) -> list[dict[str, Any]]:
    """Every tensor llama-quantize writes for a `file_type` file of this model, in its visiting order: the weight,
    llama.cpp's tensor name, the type the rules ask for, the type written, the rule and any shape fallback."""
    from quantlib.methods._ggml_ftypes import tensor_choices

    by_gguf, tensors, kwargs = _inputs(shapes, has_imatrix)
    return [{"weight": by_gguf[c.name], "tensor": c.name, "rule type": c.rule_type, "type": c.type, "rule": c.rule,
             "fallback": c.reason} for c in tensor_choices(file_type, tensors, **kwargs) if c.name in by_gguf]


def file_type_notes(file_type: str, shapes: ModelShapes, has_imatrix: bool = False) -> list[str]:
    """What llama.cpp did other than the file type's name says: the weights whose rows fell back to another type."""
    return list(_plan(file_type, shapes, has_imatrix)[1])


@lru_cache(maxsize=64)
def _plan(file_type: str, shapes: ModelShapes, has_imatrix: bool) -> tuple[tuple[tuple[str, str], ...],
                                                                             tuple[str, ...]]:
    from quantlib.methods._ggml_ftypes import fallback_notes, file_type_tensor_types

    by_gguf, tensors, kwargs = _inputs(shapes, has_imatrix)
    types = file_type_tensor_types(file_type, tensors, **kwargs)
    notes = [f"{by_gguf.get(n.tensor, n.tensor)} ({n.tensor}): {n}" for n in fallback_notes(file_type, tensors,
                                                                                           **kwargs)]
    plan: dict[str, str] = {}
    for g, t in types.items():
        if g not in by_gguf:
            continue
        weight = by_gguf[g]
        if plan.setdefault(weight, t) != t:  # a fused gate_up_proj whose two GGUF tensors differ
            raise ValueError(f"{file_type}: llama-quantize writes the two halves of {weight} ({g} and its twin) as "
                             f"{plan[weight]} and {t}; transformers stores them as one tensor, which quantlib "
                             "quantizes with one type")
    return tuple(plan.items()), tuple(notes)


def llama_quantize_argv(config: Any, model_config: dict[str, Any], shapes: ModelShapes,
                        decisions: dict[str, str | None], source: str, target: str, imatrix: str | None = None,
                        dtype: str = "float32", program: str = "llama-quantize") -> list[str]:
    """The llama-quantize arguments that write this config from the `source` GGUF (in the model's float type) to
    `target`: for a file type, its name (llama-quantize's own rules); for a block type, one anchored --tensor-type per
    quantized tensor (no mixture rule left to choose; --pure would ignore the overrides), the layers kept unquantized
    at the float type, output and token embedding as the planner counts them. `ValueError` where gguf cannot name
    the model's tensors."""
    import gguf

    imatrix_args = ["--imatrix", imatrix] if imatrix else []
    if config.is_file_type:
        return [program, *imatrix_args, source, target, config.quant_type]
    float_type = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
    model_type = model_config.get("model_type", "")
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == model_type), None)
    if arch is None:
        raise ValueError(f"gguf {_gguf_version()} has no architecture named {model_type!r}: the tensor names llama.cpp "
                         "uses for this model are unknown")
    names = gguf.get_tensor_name_map(arch, int(model_config.get("num_hidden_layers", 0)))
    overrides, unmapped = [], []
    for w in shapes.weights:
        if not w.is_matmul or w.role in ("head", "embedding"):
            continue
        gname = names.get_name(w.name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            unmapped.append(w.name)
            continue
        qtype = config.type_of(w.module).lower() if decisions[w.name] is None else float_type
        overrides += ["--tensor-type", f"^{re.escape(gname)}$={qtype}"]
    if unmapped:
        raise ValueError(f"not mapped to a GGUF tensor name: {', '.join(unmapped[:5])}")
    return [program, *imatrix_args, "--output-tensor-type", float_type, "--token-embedding-type", float_type,
            *overrides, source, target, config.quant_type]


def llama_quantize_command(config: Any, model_config: dict[str, Any], shapes: ModelShapes,
                           decisions: dict[str, str | None], dtype: str = "float32") -> str:
    """The llama.cpp commands that write this config (`llama_quantize_argv` as shell text), after converting the
    model; with `imatrix`, the importance matrix measured first."""
    float_type = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
    convert = f"python convert_hf_to_gguf.py MODEL_DIR --outtype {float_type} --outfile model-{float_type}.gguf"
    measure = ([f"quantlib imatrix --model MODEL_DIR --tokens {config.imatrix_tokens} --out imatrix.gguf  # the "
                "importance matrix quantlib measured; or llama.cpp's own: "
                f"llama-imatrix -m model-{float_type}.gguf -f calibration.txt -c 512 -o imatrix.gguf"]
               if config.imatrix else [])
    target = f"model-{config.quant_type}.gguf" if config.is_file_type else "model-mix.gguf"
    try:
        argv = llama_quantize_argv(config, model_config, shapes, decisions, f"model-{float_type}.gguf", target,
                                   "imatrix.gguf" if config.imatrix else None, dtype)
    except ValueError as exc:
        return f"# {exc}: no command is written (the JSON config above still holds the per-layer types)"
    if config.is_file_type:
        return "\n".join(["# llama.cpp: convert, then quantize with llama-quantize's own rules for this file type",
                          convert, *measure, " ".join(argv)])
    head = [f"# llama.cpp: convert, then quantize with these per-tensor types (gguf {_gguf_version()} names)",
            convert, *measure]
    lines, i = [argv[0] + (" " + " ".join(argv[1:3]) if argv[1] == "--imatrix" else "") + " \\"], 3 if argv[1] == "--imatrix" else 1
    lines.append("  " + " ".join(argv[i:i + 4]) + " \\")
    i += 4
    while argv[i] == "--tensor-type":
        lines.append(f"  --tensor-type '{argv[i + 1]}' \\")
        i += 2
    lines.append("  " + " ".join(argv[i:]))
    return "\n".join(head + lines)


def _inputs(shapes: ModelShapes, has_imatrix: bool) -> tuple[dict[str, str], list[tuple[str, int]], dict[str, Any]]:
    """llama.cpp tensor name -> weight name, the (tensor, ncols) list and the model settings the rules read."""
    pairs = _gguf_tensor_names(shapes)
    if not any(g.startswith("blk.") for _, g in pairs):
        raise ValueError(f"the gguf package maps none of this {shapes.model_type} model's block weights to llama.cpp "
                         "tensor names, so llama-quantize's per-tensor rules cannot be applied")
    by_gguf = {g: name for name, g in pairs}
    weights = {w.name: w for w in shapes.weights}
    tensors = [(g, weights[name].in_features if weights[name].is_matmul else weights[name].shape[-1],
                ggml_n_dims(weights[name].shape)) for name, g in pairs]
    gguf_names = {name: g for name, g in pairs}
    n_layer = len({m.group(1) for name in gguf_names.values() if (m := re.match(r"blk\.(\d+)\.", name))})
    q = next((weights[by_gguf[g]] for g in by_gguf if g == "blk.0.attn_q.weight"), None)
    k = next((weights[by_gguf[g]] for g in by_gguf if g == "blk.0.attn_k.weight"), None)
    qkv = next((weights[by_gguf[g]] for g in by_gguf if g == "blk.0.attn_qkv.weight"), None)
    out = next((weights[by_gguf[g]] for g in by_gguf if g == "blk.0.attn_output.weight"), None)
    if q is not None and k is not None and k.out_features:
        n_gqa = q.out_features // k.out_features
    elif qkv is not None and out is not None and qkv.out_features > out.in_features:
        # fused attention (Falcon, Phi-3): q is as wide as attn_output's input, k and v share the rest
        n_gqa = out.in_features // ((qkv.out_features - out.in_features) // 2)
    else:
        n_gqa = 1
    kwargs = dict(n_layer=n_layer, n_gqa=n_gqa, n_expert=max(1, shapes.n_experts), has_imatrix=has_imatrix,
                  arch=shapes.model_type)
    return by_gguf, tensors, kwargs


def _gguf_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return "?"
