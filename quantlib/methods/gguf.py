"""llama.cpp GGUF block types: the config, the quantizer and the raw-block tensor format (simulated: the numbers
show what the format loses, not how fast llama.cpp runs it).

The legacy types come from the `gguf` package's numpy reference quantizers; the K-quants (Q2_K ... Q6_K), IQ4_NL /
IQ4_XS and the lattice types (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S) from quantlib's vectorised ports
of llama.cpp's own quantizers (`_ggml_*.py`), bit-identical to
`ggml_quantize_chunk` with and without an importance matrix (tests/data/llamacpp_golden.npz, made by
scripts/llamacpp_golden.py). Every type is dequantized by the `gguf` package. With `imatrix`, the importance
matrix is measured as llama-imatrix measures it (`_ggml_importance`) and handed to the quantizers as llama-quantize
does."""

from __future__ import annotations

import os

from typing import Any, ClassVar

import numpy as np
import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.methods.base import Quantizer, register
from quantlib.methods.base.records import MixChoice, MixSpace
from quantlib.methods._gguf_file_types import MIXTURE_FILE_TYPES, file_type_notes, file_type_plan
from quantlib.methods._gguf_tensor import (GGUF_CODE_BITS, GGUF_TYPES, IMATRIX_TYPES, REQUIRES_IMATRIX,
                                           gguf_block_geometry, quantize_gguf)
from quantlib.methods.base.rules import default_skip_rules, natural_key, should_convert_module
from quantlib.shapes import ModelShapes, WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 20

#: Where llama.cpp's CUDA backend computes otherwise than the CPU path simulated here (ggml-cuda's mmq.cu,
#: `ggml_cuda_should_use_mmq`, and mmvq.cu).
CUDA_NOTE = ("on CUDA llama.cpp differs: its MMQ / MMVQ kernels quantize the activations to Q8_1 blocks of 32 for every "
             "weight type (Q8_K is the CPU's), and without tensor cores a large batch dequantizes the weights to F16 "
             "for cuBLAS, activations unquantized; these figures are the CPU's")


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
    description = ("llama.cpp GGUF: block types (Q8_0, Q6_K … Q2_K, IQ4_XS, IQ3_S … IQ1_S, Q4_0 …) and "
                   "llama-quantize's file types (Q4_K_M, Q5_K_S, IQ3_M, IQ2_M, …), bit-exact to llama.cpp.")
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
        FieldSpec("llama_quantize_rules", bool, False, "Apply llama-quantize's per-tensor rules for this type, as "
                  "`llama-quantize in.gguf out.gguf TYPE` does without --pure: the output and token embedding "
                  "quantized too, attn_v and ffn_down promoted where its rules say, rows that fit no block falling back to another type. The "
                  "mixtures (Q4_K_M, …) always apply them.", title="llama-quantize's rules"),
        FieldSpec("activations", bool, True, "Quantize each matmul's input as llama.cpp's CPU matmul does for the "
                  "weight's type (Q8_0, Q8_1 or Q8_K blocks; ggml's vec_dot_type), so the figures are llama.cpp's "
                  "own; off: the weights' share of the loss alone.", title="Activations as llama.cpp computes"),
        FieldSpec("imatrix_tokens", int, 4096, "Calibration tokens the importance matrix is measured on.",
                  minimum=512, maximum=1_000_000, visible_when=("imatrix", True), title="Importance-matrix tokens"),
    )

    def type_of(self, module: str) -> str:
        """The block type of layer `module` (its override, else `quant_type`); for a file type, which depends on
        the model, the quantizer's `module_types`."""
        return (self.tensor_types or {}).get(module, self.quant_type)

    def weights_only(self) -> QuantConfig | None:
        return self.replace(activations=False) if self.activations else None

    @property
    def is_file_type(self) -> bool:
        """A llama-quantize file type (a mixture such as Q4_K_M, or any type with `llama_quantize_rules`): the block
        type of each tensor depends on the model."""
        return self.quant_type in MIXTURE_FILE_TYPES or bool(self.llama_quantize_rules)

    @property
    def label(self) -> str:
        file = self.llama_quantize_rules and self.quant_type not in MIXTURE_FILE_TYPES
        label = f"GGUF {self.quant_type}" + (" file" if file else "") + (" imatrix" if self.imatrix else "") + \
            ("" if self.activations else ", weights only")
        if self.tensor_types:
            label += f" + {len(self.tensor_types)} overrides"
        if self.modules_to_not_convert and self.tensor_types:
            label += f", {len(self.modules_to_not_convert)} skipped"
        return label




@register("gguf")
class GGUFQuantizer(Quantizer):
    """GGUF block types through the `gguf` package's numpy quantizers, simulated."""

    config_class = GGUFQuantConfig
    requires = (("gguf", "gguf"),)
    library = "gguf"
    quantize_ahead = min(4, os.cpu_count() or 1)  # numpy quantizers: a layer per core keeps each busy on small layers

    #: layer name -> importance matrix (mean x_j^2 per input column), measured once by `quantize_model`; None for
    #: an embedding table (a row lookup: llama-imatrix measures no input there).
    importance: dict[str, np.ndarray | None] | None = None
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
        if (self.config.imatrix and self.importance is None) or self.config.activations:
            from quantlib.models import load_model

            if base is None:
                base = load_model(source, dtype=dtype, device=self.backend.device,
                                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
            self._refuse_fused_experts(base.model)
        if self.config.imatrix and self.importance is None:
            from quantlib.methods._ggml_importance import importance_matrix

            modules = dict(base.model.named_modules())
            layers = [ref.name for ref in self.quantizable_layers(base.model)]
            lookups = [name for name in layers if isinstance(modules.get(name), torch.nn.Embedding)]
            # the measurement reports the first half of this step and the quantization the second, so the bar
            # of a caller that maps this step onto its own range never goes back
            first = None if progress is None else (lambda f, m: progress(0.5 * f, m))
            measured = importance_matrix(base.model, base.tokenizer, [n for n in layers if n not in lookups],
                                         self.config.imatrix_tokens, progress=first, cancel=cancel)
            self.importance = {**measured, **dict.fromkeys(lookups)}
            progress = None if progress is None else (lambda f, m, _p=progress: _p(0.5 + 0.5 * f, m))
        quantized = super().quantize_model(base=base, source=source, dtype=dtype, trust_remote_code=trust_remote_code,
                                           allow_pickle=allow_pickle, progress=progress, cancel=cancel,
                                           calibration=calibration)
        if self.config.activations:
            from quantlib.methods._ggml_activations import add_activation_quantization

            add_activation_quantization(quantized.model, quantized.packed_layers)
        return quantized

    def _refuse_fused_experts(self, model: torch.nn.Module) -> None:
        """llama.cpp quantizes each expert matmul's input, and llama-imatrix measures it, per expert. A transformers
        MoE computes its experts inside one module from fused 3-D tensors (the down projection's input never leaves
        it), so neither can be simulated there: refused rather than done for some layers only."""
        fused = sorted({ref.shape.name for ref in self.quantizable_layers(model) if ref.index is not None})
        if not fused:
            return
        from quantlib.errors import QuantlibError

        asks = [what for what, on in (("activations: true (llama.cpp's quantized matmul inputs)",
                                       self.config.activations),
                                      ("imatrix: true (the importance matrix)", self.config.imatrix)) if on]
        raise QuantlibError(f"{self.config.label}: {' and '.join(asks)} cannot be simulated for fused expert tensors "
                            f"({fused[0]} and {len(fused) - 1} more): their inputs are computed inside one experts "
                            "module, out of quantlib's reach. Set activations to false (and imatrix to false) to "
                            "evaluate the weights alone; the planner plans this config as it is")

    def layer_output(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        """As llama.cpp's CPU matmul computes it (with `activations`): the input quantized to the weight type's
        vec_dot_type, Q4_1/Q5_1's fp16 block sums included (the same functions as the model's hooks)."""
        from quantlib.methods._ggml_activations import VEC_DOT_TYPE, block_mins, q8_1_sum_error, quantize_activations

        kind = VEC_DOT_TYPE.get(packed.qtype.name) if self.config.activations else None
        if kind is None or kind == "F32":
            return super().layer_output(x, packed)
        mins = block_mins(packed) if kind == "Q8_1" else None
        error = q8_1_sum_error(x) if mins is not None else None
        out = quantize_activations(x, kind) @ packed.dequantize().to(x.dtype).t()
        return out if error is None else out + (error @ mins.to(error.device).T).to(out.dtype)

    def kernel_paths(self, model: Any) -> list[str]:
        if not self.config.activations:
            return super().kernel_paths(model) + ["activations in float (weights only)"]
        return ["quantlib's simulation of llama.cpp's CPU matmul: F.linear on the dequantized weights, its inputs "
                "quantized to the weight type's vec_dot_type (Q8_0, Q8_1 or Q8_K blocks) as ggml-cpu does",
                CUDA_NOTE]

    @classmethod
    def offload_problem(cls, config: QuantConfig, dtype: str) -> str | None:
        if config.activations:
            return ("its activations are quantized in the forward pass, as llama.cpp's matmul does, which a "
                    "checkpoint of dequantized weights does not carry; set activations to false to evaluate the "
                    "weights offloaded")
        return super().offload_problem(config, dtype)

    @classmethod
    def config_problem(cls, config: QuantConfig) -> str | None:
        if config.is_file_type:
            if config.tensor_types:
                return ("a file type picks every tensor's type by llama-quantize's rules; per-layer types go with a "
                        "block type (llama-quantize's --tensor-type is not ported with the rules)")
            if config.quant_type == "Q2_K_S" and not config.imatrix:
                return "Q2_K_S needs an importance matrix: llama-quantize refuses it without one"
            return None
        types = {config.quant_type, *(config.tensor_types or {}).values()}
        need = [t for t in REQUIRES_IMATRIX if t in types]
        if need and not config.imatrix:
            return (f"{', '.join(need)} {'needs' if len(need) == 1 else 'need'} an importance matrix: llama-quantize "
                    f"refuses to write {'it' if len(need) == 1 else 'them'} without one (tensor_requires_imatrix); set "
                    "imatrix to true")
        if config.imatrix:
            refused = sorted(t for t in types if t not in IMATRIX_TYPES)
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
    def shape_problems(cls, config: QuantConfig, model_config: dict[str, Any]) -> list[str]:
        """A file type on this model: what llama-quantize would refuse (a tensor whose type needs an importance
        matrix, a model it cannot name), as the model's problem rather than an error of the check."""
        if config.is_file_type:
            from quantlib.shapes import model_shapes

            try:
                file_type_plan(config.quant_type, model_shapes(model_config), bool(config.imatrix))
            except ValueError as exc:
                return [str(exc)]
        return super().shape_problems(config, model_config)

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

    #: The block types a per-layer mix chooses from (the first is the uniform one; a 256-block type only for rows
    #: of whole 256-blocks: the recommender skips it for a layer it does not fit, as llama-quantize would fall
    #: back). The mix is measured without an importance matrix, so of the lattice types only IQ3_S, which
    #: llama-quantize writes without one, is offered (IQ3_XXS and the IQ2/IQ1 types need one).
    MIX_TYPES: ClassVar[tuple[tuple[str, float], ...]] = (("Q4_0", 4.0), ("Q4_1", 4.0), ("Q5_0", 5.0),
                                                          ("Q5_1", 5.0), ("Q8_0", 8.0), ("Q2_K", 2.0), ("Q3_K", 3.0),
                                                          ("Q4_K", 4.0), ("Q5_K", 5.0), ("Q6_K", 6.0),
                                                          ("IQ4_NL", 4.0), ("IQ4_XS", 4.0), ("IQ3_S", 3.0))
    #: The types llama-quantize writes only with an importance matrix (`NEEDS_IMATRIX`), offered with one.
    IMATRIX_MIX_TYPES: ClassVar[tuple[tuple[str, float], ...]] = (("IQ3_XXS", 3.0), ("IQ2_S", 2.0), ("IQ2_XS", 2.0),
                                                                  ("IQ2_XXS", 2.0), ("IQ1_M", 1.0), ("IQ1_S", 1.0))

    @classmethod
    def mix_spaces(cls, shapes: ModelShapes) -> list[MixSpace]:
        """llama.cpp sets a block type per tensor (llama-quantize --tensor-type): every layer chooses its own.
        The exported config names the commonest type as `quant_type`, the others in `tensor_types`, the layers
        kept unquantized in `modules_to_not_convert` (with transformers' default skips, which a list replaces).
        Two spaces: without an importance matrix, and with one (the export then names imatrix.gguf), which also
        opens the types llama-quantize writes only with one: IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M and IQ1_S.

        The second space's configs set `imatrix` (one matrix for the whole file, as llama-quantize takes one); the
        recommender measures each layer with the importance matrix of its calibration inputs
        (`quantize_layer_calibrated`)."""
        defaults = [p for p, why in default_skip_rules(shapes) if not why.startswith("kept in fp32")]
        keep = MixChoice("keep", "kept unquantized", None, 16.0)

        def space(imatrix: bool) -> MixSpace:
            types = (*cls.MIX_TYPES, *cls.IMATRIX_MIX_TYPES) if imatrix else cls.MIX_TYPES
            suffix = "+imatrix" if imatrix else ""
            choices = [MixChoice(t + suffix, t + (" + imatrix" if imatrix else ""),
                                 GGUFQuantConfig(quant_type=t, imatrix=imatrix), bits) for t, bits in types]
            keys = {c.key: t for c, (t, _) in zip(choices, types)}

            def build(assignment: dict[str, str]) -> QuantConfig:
                quantized = {m: keys[k] for m, k in assignment.items() if k != "keep"}
                kept = sorted((m for m, k in assignment.items() if k == "keep"), key=natural_key)
                counts = {t: list(quantized.values()).count(t) for t in dict.fromkeys(quantized.values())}
                base = max(counts, key=counts.get) if counts else types[0][0]
                overrides = {m: t for m, t in sorted(quantized.items(), key=lambda kv: natural_key(kv[0]))
                             if t != base}
                return GGUFQuantConfig(quant_type=base, tensor_types=overrides or None, imatrix=imatrix,
                                       modules_to_not_convert=[*defaults, *kept] if kept else None)

            name = "GGUF with an importance matrix, a block type per tensor" if imatrix else \
                "GGUF, a block type per tensor"
            export = ("quantlib's GGUF config with tensor_types, and the llama-quantize command with one "
                      "--tensor-type per tensor" + (" and --imatrix imatrix.gguf (the command that measures it "
                                                   "first)" if imatrix else ""))
            return MixSpace(name, (*choices, keep), "module", lambda module: module, build, choices[0].config, export)

        return [space(False), space(True)]

    def quantize_layer_calibrated(self, name: str, weight: torch.Tensor, inputs: torch.Tensor) -> Any:
        """With `imatrix` and no importance matrix measured for the model (the recommender measures one layer at a
        time): the layer's own calibration inputs give it, as llama-imatrix computes it (the mean of x_j^2 over the
        tokens, from float32 sums)."""
        if not self.config.imatrix or (self.importance is not None and name in self.importance):
            return self.quantize_layer(name, weight)
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        importance = x.square().sum(0).float().cpu().numpy() / np.float32(x.shape[0])
        return quantize_gguf(weight, qtype=self._type_of(name), imatrix=importance)

    @classmethod
    def cli_commands(cls) -> list[Any]:
        from quantlib.methods._ggml_importance import ImatrixCommand
        from quantlib.methods._llamacpp_verify import VerifyCommand

        return [ImatrixCommand(), VerifyCommand(cls.config_class, cls.classify)]

    @classmethod
    def tensor_plan(cls, config: QuantConfig, shapes: ModelShapes) -> list[dict[str, Any]] | None:
        """For a llama-quantize file type: every tensor's type and the llama-quantize rule that chose it."""
        if not config.is_file_type:
            return None
        from quantlib.methods._gguf_file_types import file_type_table

        return file_type_table(config.quant_type, shapes, bool(config.imatrix))

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
