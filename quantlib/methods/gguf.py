"""llama.cpp GGUF block types: the config, the quantizer and the raw-block tensor format (simulated: the numbers
show what the format loses, not how fast llama.cpp runs it).

The legacy types come from the `gguf` package's numpy reference quantizers; the K-quants (Q2_K ... Q6_K) and
IQ4_NL / IQ4_XS from quantlib's vectorised ports of llama.cpp's own quantizers (`_ggml_*.py`), bit-identical to
`ggml_quantize_chunk` with and without an importance matrix (tests/data/llamacpp_golden.npz, made by
scripts/llamacpp_golden.py). Every type is dequantized by the `gguf` package. With `imatrix`, the importance
matrix is measured as llama-imatrix measures it (`_ggml_importance`) and handed to the quantizers as llama-quantize
does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np
import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.base import Quantizer, register
from quantlib.methods.base.records import MixChoice, MixSpace
from quantlib.methods._gguf_file_types import MIXTURE_FILE_TYPES, file_type_notes, file_type_plan
from quantlib.methods.base.rules import default_skip_rules, natural_key, should_convert_module
from quantlib.shapes import ModelShapes, WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 20


#: Block types quantlib quantizes: the `gguf` package's numpy quantizers (legacy types) and quantlib's ports of
#: llama.cpp's K-quant and IQ4 quantizers, widest first.
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL", "Q3_K", "Q2_K",
              "MXFP4", "BF16", "F16")


def _ported_quantizers() -> dict[str, Any]:
    """Block type -> quantlib's port of llama.cpp's quantizer, `f(x, imatrix=None) -> bytes (rows, row_bytes)`."""
    from quantlib.methods._ggml_iq4 import quantize_iq4_nl, quantize_iq4_xs
    from quantlib.methods._ggml_q3q6 import quantize_q3_K, quantize_q6_K
    from quantlib.methods._ggml_qk import quantize_q2_K, quantize_q4_K, quantize_q5_K

    return {"Q2_K": quantize_q2_K, "Q3_K": quantize_q3_K, "Q4_K": quantize_q4_K, "Q5_K": quantize_q5_K,
            "Q6_K": quantize_q6_K, "IQ4_NL": quantize_iq4_nl, "IQ4_XS": quantize_iq4_xs}


def _weighted_legacy_quantizers() -> dict[str, Any]:
    """Q4_0/Q4_1/Q5_0/Q5_1 with an importance matrix: llama.cpp's weighted quantizers (another algorithm than the
    reference ones the gguf package implements), ported bit-exact in `_ggml_legacy`."""
    from quantlib.methods._ggml_legacy import (quantize_q4_0_weighted, quantize_q4_1_weighted,
                                               quantize_q5_0_weighted, quantize_q5_1_weighted)

    return {"Q4_0": quantize_q4_0_weighted, "Q4_1": quantize_q4_1_weighted, "Q5_0": quantize_q5_0_weighted,
            "Q5_1": quantize_q5_1_weighted}


#: Types that take an importance matrix here: every type but MXFP4, whose llama.cpp quantizer has no weighted
#: path (Q8_0's, F16's and BF16's ignore it, as llama.cpp's do).
IMATRIX_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                 "BF16", "F16")


def _tensor_types_rule(value: Any) -> str | None:
    if not value:
        return "must name at least one module (or be null)"
    for module, qtype in value.items():
        if not isinstance(module, str) or not module:
            return "every key must be a module name, e.g. model.layers.3.mlp.down_proj"
        if qtype not in GGUF_TYPES:
            return f"{module!r}: {qtype!r} is not one of {', '.join(GGUF_TYPES)}"
    return None


class GGUFQuantConfig(QuantConfig):
    """llama.cpp GGUF block quantization, done with the `gguf` package's reference quantizers.

    Simulated: weights are replaced by their quantize→dequantize result, so the numbers show what
    the format loses, not how fast llama.cpp runs it.
    """

    quant_method = "gguf"
    description = ("llama.cpp GGUF: block types (Q8_0, Q6_K … Q2_K, IQ4_XS, Q4_0 …) and llama-quantize's file "
                   "types (Q4_K_M, Q5_K_S, …), bit-exact to llama.cpp.")
    FIELDS = (
        FieldSpec("quant_type", str, "Q8_0", "GGUF block type for every quantized layer, or a llama-quantize file "
                  "type (Q4_K_M, Q3_K_L, …): each tensor its type by llama-quantize's rules, shapes that do not fit "
                  "falling back as llama.cpp falls back, the output and token embedding included.",
                  choices=(*GGUF_TYPES, *MIXTURE_FILE_TYPES), title="Block or file type"),
        FieldSpec("modules_to_not_convert", list, None,
                  "Module names left unquantized (default: the output head, as transformers does).",
                  nullable=True, title="Skip modules", patterns=True),
        FieldSpec("tensor_types", dict, None, "Per-layer block types: module name -> GGUF type, as llama-quantize's "
                  "--tensor-type overrides; other layers use the block type above.", nullable=True,
                  validator=_tensor_types_rule, allowed="an object of module name -> GGUF block type",
                  title="Per-layer types"),
        FieldSpec("imatrix", bool, False, "Quantize with an importance matrix, as llama-quantize --imatrix does: the "
                  "mean squared input of every column, measured on the built-in calibration text as llama-imatrix "
                  "measures it (chunks of 512 tokens, each starting with BOS).", title="Importance matrix"),
        FieldSpec("imatrix_tokens", int, 4096, "Calibration tokens the importance matrix is measured on.",
                  minimum=512, maximum=1_000_000, visible_when=("imatrix", True), title="Importance-matrix tokens"),
    )

    def type_of(self, module: str) -> str:
        """The block type of layer `module` (its override, else `quant_type`); for a file type, which depends on
        the model, the quantizer's `module_types`."""
        return (self.tensor_types or {}).get(module, self.quant_type)

    @property
    def is_file_type(self) -> bool:
        """A llama-quantize mixture (Q4_K_M, …): the block type of each tensor depends on the model."""
        return self.quant_type in MIXTURE_FILE_TYPES

    @property
    def label(self) -> str:
        label = f"GGUF {self.quant_type}" + (" imatrix" if self.imatrix else "")
        if self.tensor_types:
            label += f" + {len(self.tensor_types)} overrides"
        if self.modules_to_not_convert and self.tensor_types:
            label += f", {len(self.modules_to_not_convert)} skipped"
        return label




#: Bits of the integer code per weight in each GGUF type (the rest of a block is scales/mins).
GGUF_CODE_BITS = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4, "MXFP4": 4, "BF16": 16, "F16": 16,
                  "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "IQ4_NL": 4, "IQ4_XS": 4,
                  "F32": 32, "TQ2_0": 2,
                  # TQ1_0 packs 5 trits per byte in 48 bytes and 4 per byte in 4 more: 52 bytes per 256 weights.
                  "TQ1_0": 52 * 8 / 256}


def gguf_block_geometry(quant_type: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type, from the gguf package's own table."""
    import gguf

    return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]])  # type: ignore[return-value]



@dataclass
class GGUFTensor(QuantizedTensor):
    """A GGML block-quantized tensor: the raw bytes exactly as a .gguf file stores them."""

    data: np.ndarray
    qtype: "object"  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def storage_bits(self) -> dict[str, int]:
        return {"blocks": 8 * int(self.data.nbytes)}

    def storage_by_component(self) -> dict[str, float]:
        """The packed bytes split into codes (code bits x weights: Q5's fifth bits included) and the
        per-block scales/mins that make up the rest of each block."""
        total = float(self.data.nbytes)
        codes = self.numel * GGUF_CODE_BITS[self.qtype.name] / 8
        return {"codes": codes, "scales": total - codes}

    @property
    def n_codes(self) -> int:
        return _GGUF_CODE_LAYOUT[self.qtype.name][0] if self.qtype.name in _GGUF_CODE_LAYOUT else 0

    def codes_unpacked(self) -> torch.Tensor:
        """Per-element quant indices for the simple block types (Q8_0, Q4_0, Q4_1, MXFP4).

        Q8_0 codes are offset by 128 (int8). The order within a block is element order.
        """
        name = self.qtype.name
        if name not in _GGUF_CODE_LAYOUT:
            raise NotImplementedError(f"codes_unpacked is not implemented for GGUF type {name}")
        _, header_bytes, kind = _GGUF_CODE_LAYOUT[name]
        from gguf import GGML_QUANT_SIZES

        _, block_bytes = GGML_QUANT_SIZES[self.qtype]
        blocks = self.data.reshape(-1, block_bytes)[:, header_bytes:]
        if kind == "int8":
            return torch.from_numpy(blocks.view(np.int8).astype(np.int64) + 128).reshape(-1)
        low = blocks & 0x0F
        high = blocks >> 4
        # ggml nibble layout: low nibbles are elements 0..15, high nibbles 16..31 of the block.
        return torch.from_numpy(np.concatenate([low, high], axis=1).astype(np.int64)).reshape(-1)

    def dequantize(self) -> torch.Tensor:
        from gguf import quants

        values = quants.dequantize(self.data, self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(self.dtype)


# name -> (n_codes, header bytes per block before the codes, code kind)
_GGUF_CODE_LAYOUT: dict[str, tuple[int, int, str]] = {
    "Q8_0": (256, 2, "int8"),
    "Q4_0": (16, 2, "nibble"),
    "Q4_1": (16, 4, "nibble"),
    "MXFP4": (16, 1, "nibble"),
}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------





def _probe_gguf_types() -> tuple[str, ...]:
    """Names of the GGML types the installed ``gguf`` package can quantize in numpy.

    Found by trying each on a small tensor: the package raises NotImplementedError for the rest
    (the k-quants and i-quants need llama.cpp's C code).
    """
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
    except ImportError:
        return ()
    sample = np.linspace(-1.0, 1.0, 2 * 256, dtype=np.float32).reshape(2, 256)
    names = []
    for qtype in GGMLQuantizationType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        try:
            quants.dequantize(quants.quantize(sample, qtype), qtype)
        except (NotImplementedError, ValueError, TypeError, AssertionError):
            continue
        names.append(qtype.name)
    return tuple(names)


GGUF_QUANTIZABLE_TYPES: tuple[str, ...] = _probe_gguf_types()
"""GGML type names ``quantize_gguf`` accepts (with gguf 0.19: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, BF16, TQ1_0, TQ2_0, MXFP4)."""


def quantize_gguf(w: torch.Tensor, qtype: Union[str, "object"] = "Q8_0",
                  imatrix: np.ndarray | None = None) -> GGUFTensor:
    """Quantize with a GGML block type: the ``gguf`` package's numpy implementation for the legacy types, quantlib's
    port of llama.cpp's quantizer for the K-quants and IQ4 types (with `imatrix`, the importance-weighted path,
    as `ggml_quantize_chunk` takes it).

    Blocks run along the last dim (as llama.cpp stores rows), so it must be a multiple of the
    type's block size. Storage is the real byte count: block bytes * 8 / block elements per
    parameter (e.g. Q8_0: 34 * 8 / 32 = 8.5; Q4_0: 4.5).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    check_float(w, "quantize_gguf")
    name = qtype if isinstance(qtype, str) else qtype.name
    ported = _ported_quantizers()
    if name not in GGUF_QUANTIZABLE_TYPES and name not in ported:
        raise ValueError(f"GGUF type {name!r} cannot be quantized here; choose one of "
                         f"{(*GGUF_QUANTIZABLE_TYPES, *ported)}")
    if imatrix is not None and name not in IMATRIX_TYPES:
        raise ValueError(f"GGUF {name} takes no importance matrix here (llama.cpp's {name} quantizer has no "
                         f"weighted path); types that take one: {', '.join(IMATRIX_TYPES)}")
    gtype = GGMLQuantizationType[name]
    block_elems, _ = GGML_QUANT_SIZES[gtype]
    last = w.shape[-1] if w.dim() else 1
    if last % block_elems:
        raise ValueError(
            f"GGUF {name} needs the last dimension to be a multiple of its block size {block_elems}; "
            f"got last dimension {last} (shape {tuple(w.shape)})"
        )
    array = w.detach().float().reshape(-1, last).numpy()
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(last)
    if name in ported:
        data = ported[name](array, weights)
    elif weights is not None and name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        data = _weighted_legacy_quantizers()[name](array, weights)
    else:
        data = quants.quantize(array, gtype)
    return GGUFTensor(data=data, qtype=gtype, shape=tuple(w.shape), dtype=w.dtype)


@register("gguf")
class GGUFQuantizer(Quantizer):
    """GGUF block types through the `gguf` package's numpy quantizers, simulated."""

    config_class = GGUFQuantConfig
    requires = (("gguf", "gguf"),)
    library = "gguf"

    #: layer name -> importance matrix (mean x_j^2 per input column), measured once by `quantize_model`.
    importance: dict[str, np.ndarray] | None = None
    #: For a file type: module name -> its block type in this model (set by `quantizable_layers`).
    module_types: dict[str, str] | None = None

    def quantizable_layers(self, model: torch.nn.Module) -> list:
        refs = super().quantizable_layers(model)
        if self.config.is_file_type:
            from quantlib.shapes import describe_model

            plan = file_type_plan(self.config.quant_type, describe_model(model), bool(self.config.imatrix))
            self.module_types = {ref.name: plan[ref.shape.name] for ref in refs}
        return refs

    def _type_of(self, name: str) -> str:
        if self.config.is_file_type:
            if self.module_types is None or name not in self.module_types:
                from quantlib.errors import QuantlibError

                raise QuantlibError(f"{self.config.label}: the type of {name} depends on the whole model; quantize "
                                    "the model (its quantizable_layers) first")
            return self.module_types[name]
        return self.config.type_of(name)

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        return quantize_gguf(weight, qtype=self.config.quant_type)

    def quantize_layer(self, name: str, weight: torch.Tensor) -> Any:
        imatrix = None
        if self.config.imatrix:
            if self.importance is None:
                from quantlib.errors import QuantlibError

                raise QuantlibError(f"{self.config.label}: the importance matrix is measured on the model's "
                                    "activations when the model is quantized (quantize_model); a layer alone, or a "
                                    "checkpoint streamed from disk, has none")
            if name not in self.importance and weight.dim() == 2 and self._is_lookup(name):
                return quantize_gguf(weight, qtype=self._type_of(name))  # llama-imatrix measures no embedding
            if name not in self.importance:
                from quantlib.errors import QuantlibError

                raise QuantlibError(f"{self.config.label}: no importance matrix for {name} (only layers that are "
                                    "modules of their own are measured; fused expert tensors are not)")
            imatrix = self.importance[name]
        return quantize_gguf(weight, qtype=self._type_of(name), imatrix=imatrix)

    def quantize_model(self, *, base: Any = None, source: str = "default", dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, allow_pickle: bool = False,
                       progress: Any = None, cancel: Any = None, calibration: Any = None) -> Any:
        """As every simulated method; with `imatrix`, the importance matrix is measured first on the unquantized
        model (llama-imatrix's recipe), once per quantizer."""
        if self.config.imatrix and self.importance is None:
            from quantlib.methods._ggml_importance import importance_matrix
            from quantlib.models import load_model

            if base is None:
                base = load_model(source, dtype=dtype, device=self.backend.device,
                                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
            modules = dict(base.model.named_modules())
            names = [ref.name for ref in self.quantizable_layers(base.model)
                     if not isinstance(modules.get(ref.name), torch.nn.Embedding)]
            self._lookups = {ref.name for ref in self.quantizable_layers(base.model)} - set(names)
            self.importance = importance_matrix(base.model, base.tokenizer, names, self.config.imatrix_tokens,
                                                progress=progress, cancel=cancel)
        return super().quantize_model(base=base, source=source, dtype=dtype, trust_remote_code=trust_remote_code,
                                      allow_pickle=allow_pickle, progress=progress, cancel=cancel,
                                      calibration=calibration)

    _lookups: set[str] = set()

    def _is_lookup(self, name: str) -> bool:
        """An embedding table (a lookup, no matmul input to measure)."""
        return name in self._lookups

    @classmethod
    def config_problem(cls, config: QuantConfig) -> str | None:
        if config.is_file_type:
            if config.tensor_types:
                return ("a file type picks every tensor's type by llama-quantize's rules; per-layer types go with a "
                        "block type (llama-quantize's --tensor-type is not ported with the rules)")
            if config.quant_type == "Q2_K_S" and not config.imatrix:
                return "Q2_K_S needs an importance matrix: llama-quantize refuses it without one"
            return None
        if config.imatrix:
            refused = sorted({t for t in {config.quant_type, *(config.tensor_types or {}).values()}
                              if t not in IMATRIX_TYPES})
            if refused:
                return (f"{', '.join(refused)} takes no importance matrix (llama.cpp's quantizer for it has no "
                        "weighted path); choose another type, or quantize without the importance matrix")
        return None

    @classmethod
    def classify(cls, config: QuantConfig, shapes: ModelShapes) -> dict[str, str | None]:
        """A block type: transformers' rules (the output head stays in float). A file type: what llama-quantize
        quantizes (the output and token embedding included), less the config's own skip list."""
        if not config.is_file_type:
            return super().classify(config, shapes)
        plan = file_type_plan(config.quant_type, shapes, bool(config.imatrix))
        own = [(p, f"skipped by the config ({p!r})") for p in cls.skip_modules(config)]
        out: dict[str, str | None] = {}
        for w in shapes.weights:
            skipped = [why for p, why in own if not should_convert_module(w.module, [p])]
            out[w.name] = ("left in float by llama-quantize (norms, biases, 1-D tensors)" if w.name not in plan
                           else skipped[0] if skipped else None)
        return out

    @classmethod
    def model_layer_storage_bytes(cls, config: QuantConfig, shapes: ModelShapes, w: WeightShape,
                                  dtype: str = "float32") -> dict[str, float]:
        if not config.is_file_type:
            return super().model_layer_storage_bytes(config, shapes, w, dtype)
        return _type_storage(file_type_plan(config.quant_type, shapes, bool(config.imatrix))[w.name],
                             w.out_features if w.is_matmul else w.shape[0], w.in_features if w.is_matmul
                             else w.shape[-1])

    @classmethod
    def file_type_notes(cls, config: QuantConfig, shapes: ModelShapes) -> list[str]:
        return file_type_notes(config.quant_type, shapes, bool(config.imatrix)) if config.is_file_type else []

    @classmethod
    def plan_notes(cls, config: QuantConfig, shapes: ModelShapes) -> list[str]:
        """A file type: how many tensors llama.cpp writes in another type than its rules ask for, and why."""
        if not config.is_file_type:
            return []
        from collections import Counter

        notes = file_type_notes(config.quant_type, shapes, bool(config.imatrix))
        pairs = Counter(n.split(": ", 2)[-1].split(" (")[0] for n in notes)  # "Q4_K -> Q5_0"
        if not pairs:
            return []
        total = len(file_type_plan(config.quant_type, shapes, bool(config.imatrix)))
        detail = ", ".join(f"{pair} for {count}" for pair, count in pairs.most_common())
        return [f"{config.label}: llama.cpp writes {len(notes)} of its {total} tensors in another type than the "
                f"file type's rules ask for, as their rows fit no 256-block ({detail})"]

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        types = {_block_type(config), *(config.tensor_types or {}).values()}
        return float(min(GGUF_CODE_BITS[t] for t in types))

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        return _type_storage(_block_type(config), out_features, in_features)

    @classmethod
    def layer_storage_bytes(cls, config: QuantConfig, w: WeightShape, dtype: str = "float32") -> dict[str, float]:
        return _type_storage(config.type_of(w.module), w.out_features, w.in_features)

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        if config.is_file_type:  # llama-quantize falls back to a type that fits (F16 at the last)
            return None
        return _type_shape_problem(config.quant_type, name, shape)

    @classmethod
    def layer_shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        if config.is_file_type:
            return None
        return _type_shape_problem(config.type_of(name.split("[")[0]), name, shape)

    #: Block types a per-layer mix chooses from (what the gguf package quantizes; the first is the uniform one).
    MIX_TYPES: ClassVar[tuple[tuple[str, float], ...]] = (("Q4_0", 4.0), ("Q4_1", 4.0), ("Q5_0", 5.0),
                                                          ("Q5_1", 5.0), ("Q8_0", 8.0))

    @classmethod
    def mix_spaces(cls, shapes: ModelShapes) -> list[MixSpace]:
        """llama.cpp sets a block type per tensor (llama-quantize --tensor-type): every layer chooses its own.
        The exported config names the commonest type as `quant_type`, the others in `tensor_types`, the layers
        kept unquantized in `modules_to_not_convert` (with transformers' default skips, which a list replaces)."""
        defaults = [p for p, why in default_skip_rules(shapes) if not why.startswith("kept in fp32")]
        choices = [MixChoice(t, t, GGUFQuantConfig(quant_type=t), bits) for t, bits in cls.MIX_TYPES]

        def build(assignment: dict[str, str]) -> QuantConfig:
            quantized = {m: t for m, t in assignment.items() if t != "keep"}
            kept = sorted((m for m, t in assignment.items() if t == "keep"), key=natural_key)
            counts = {t: list(quantized.values()).count(t) for t in dict.fromkeys(quantized.values())}
            base = max(counts, key=counts.get) if counts else cls.MIX_TYPES[0][0]
            overrides = {m: t for m, t in sorted(quantized.items(), key=lambda kv: natural_key(kv[0])) if t != base}
            return GGUFQuantConfig(quant_type=base, tensor_types=overrides or None,
                                   modules_to_not_convert=[*defaults, *kept] if kept else None)

        return [MixSpace("GGUF, a block type per tensor", (*choices, MixChoice("keep", "kept unquantized", None, 16.0)),
                         "module", lambda module: module, build, choices[0].config,
                         "quantlib's GGUF config with tensor_types, and the llama-quantize command with one "
                         "--tensor-type per tensor")]

    @classmethod
    def tool_commands(cls, config: QuantConfig, model_config: dict[str, Any], shapes: ModelShapes,
                      dtype: str = "float32") -> dict[str, str]:
        """The llama-quantize command that writes this config (`_gguf_file_types.llama_quantize_command`)."""
        from quantlib.methods._gguf_file_types import llama_quantize_command

        return {"llama-quantize": llama_quantize_command(config, model_config, shapes, cls.classify(config, shapes),
                                                         dtype)}


def _block_type(config: QuantConfig) -> str:
    """The config's block type; a file type's default one (what most of its tensors are)."""
    from quantlib.methods._ggml_ftypes import FILE_TYPES

    return FILE_TYPES[config.quant_type] if config.is_file_type else config.quant_type


def _type_storage(quant_type: str, out_features: int, in_features: int) -> dict[str, float]:
    block, type_bytes = gguf_block_geometry(quant_type)
    total = out_features * in_features / block * type_bytes
    # A GGUF block interleaves scale(s) and codes; split it by the codes' share for the chart.
    codes = out_features * in_features * GGUF_CODE_BITS[quant_type] / 8
    return {"codes": codes, "scales": total - codes, "dq_constants": 0.0, "code_tables": 0.0}


def _type_shape_problem(quant_type: str, name: str, shape: tuple[int, ...]) -> str | None:
    block, _ = gguf_block_geometry(quant_type)
    if shape[-1] % block:
        return f"{name}: input width {shape[-1]} is not a multiple of the {quant_type} block ({block})"
    return None
