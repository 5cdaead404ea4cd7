"""The quantizer base class and `@register`: what every method inherits, and how it is marked for the registry.

Modelled on transformers' `HfQuantizer` (`quantizers/base.py`) and `AUTO_QUANTIZER_MAPPING`: a config
says *what*, a quantizer knows *how* (which library, which device, which modules to leave alone) and
checks the environment before any weights are touched. The base class owns the model-level work with
defaults, and a method overrides only what differs:

- `quantize_model`: simulate by default (each quantizable matrix replaced by its quantize->dequantize result, memory
  counted at the packed size); bitsandbytes loads through `from_pretrained`; calibrated methods calibrate.
- `layer_weights`: the original and dequantized weight of every quantized layer, for every metric.
- storage by component (`storage_bytes`, classmethod, from shapes alone; the packed tensors carry
  their own), code levels for histograms, cost estimates, notes and the copyable snippet.

Methods register with `@register("key")`; `quantlib.registry` imports every method module (none is named outside).

The package's other modules hold what the base class works with: `records` (what a quantizer hands back,
`QuantizedModel` and `LayerWeight`; the matrices it works on, `MatrixRef`; the per-layer mixes a config can
express, `MixChoice` and `MixSpace`; `ShapeError`), `rules` (the modules transformers leaves unquantized, module
order, group-size suggestions), `sharing` (tensors a quantized model shares with its base) and `families`
(`LinearReplacingQuantizer` and `CalibratedQuantizer`, the two kinds of method that share more than this class).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from typing import Any, Callable, ClassVar, Iterator

import torch

from quantlib.callbacks import CancelFn, ProgressFn
from quantlib.configs import QuantConfig
from quantlib.errors import BackendUnavailableError
from quantlib.formats import MEMORY_COMPONENTS, QuantizedTensor
from quantlib.methods.base.ahead import quantized_in_turn
from quantlib.methods.base.records import LayerWeight, MatrixRef, MixSpace, QuantizedModel, ShapeError
from quantlib.methods.base.rules import default_skip_rules, should_convert_module
from quantlib.methods.base.sharing import _copy_sharing_unquantized
from quantlib.methods.base.snippet import _py  # noqa: F401 (methods import it from here)
from quantlib.runtime import BackendReport, device_name, resolve_device
from quantlib.shapes import ROLE_LABELS, ModelShapes, WeightShape, describe_model, model_shapes


def register(key: str) -> Callable[[type["Quantizer"]], type["Quantizer"]]:
    """Class decorator: mark a quantizer to be registered under `key` (and its config class under its quant_method)
    by `quantlib.registry`, which finds every marked class in the method modules. Marking writes no global
    mapping, so a method module imports nothing that knows other methods."""

    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        cls.registry_key = key
        return cls

    return wrap


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------ the base class
class Quantizer:
    """Base of all quantizers (the `HfQuantizer` of this project).

    Subclasses set `config_class`, `requires` (importable modules and pip names), `simulated`, and
    implement `quantize_tensor` and `storage_bytes`. `validate_environment` runs in the
    constructor, so a quantizer that exists can run.

    One vocabulary for refusals: every hook that can say no is named `*_problem` and returns the reason as a
    sentence for the user, or None where there is none: `config_problem` (a valid config quantlib cannot model),
    `shape_problem` / `layer_shape_problem` (a weight shape the scheme cannot take), `mix_problem` (no per-layer
    mix), `offload_problem`, `exact_simulation_problem`. `unquantized_reason` is not a refusal: it says why a
    weight stays in full precision.
    """

    config_class: ClassVar[type[QuantConfig]]
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()  # (module, pip requirement)
    simulated: ClassVar[bool] = True
    library: ClassVar[str] = "torch"
    #: True where the method quantizes a whole model from activations (its library does), so layer
    #: weights come from the quantized model, not from quantizing each base weight.
    calibrated: ClassVar[bool] = False
    #: False where the stored weight is not the base weight rounded (AWQ folds per-channel scales into
    #: it and into the preceding module), so a layer's weight error is more than its rounding error.
    weight_error_is_rounding: ClassVar[bool] = True
    #: CPU evaluation time relative to a plain fp32 pass (measured by benchmarks/bench_compare.py);
    #: 1.0 for methods that evaluate with dequantized weights in the compute dtype.
    cpu_eval_slowdown: ClassVar[float] = 1.0
    #: Layers quantized ahead on worker threads while the one before is written back (`base.ahead`): for methods
    #: whose quantizer releases the GIL (numpy); 0 runs one layer at a time in the caller's thread.
    quantize_ahead: ClassVar[int] = 0
    #: What the method does with mixture-of-experts weights, for the planner's notes.
    experts_policy: ClassVar[str] = ("experts quantized one matrix per expert (fused 3-D tensors included), as "
                                     "llama.cpp and gptqmodel store them; routers kept in full precision")

    def __init__(self, config: QuantConfig, device: str = "auto"):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, not {type(config).__name__}")
        self.config = config
        self.backend = self.validate_environment(device)

    # ----- environment ------------------------------------------------------------------
    def validate_environment(self, device: str) -> BackendReport:
        """Check libraries and hardware; raise `BackendUnavailableError` saying what is missing."""
        for module, pip_name in self.requires:
            if importlib.util.find_spec(module) is None:
                raise BackendUnavailableError(self.config.label, f"the Python package {pip_name!r} is not installed",
                                              f"Install it with: pip install {pip_name}")
        concrete, reason = resolve_device(device)
        notes = tuple(self.environment_notes(concrete))
        lib = f"{self.library} {_version(self.library)}"
        return BackendReport(
            method=self.config.quant_method,
            scheme=self.config.label,
            device=concrete,
            device_name=device_name(concrete),
            library=lib + (" (simulated: weights replaced by quantize→dequantize)" if self.simulated else ""),
            simulated=self.simulated,
            reason=reason,
            notes=notes,
        )

    def environment_notes(self, device: str) -> list[str]:
        """Caveats about running this scheme on `device` (slow paths, missing kernels)."""
        return []

    # ----- exact simulation of a library's kernels ----------------------------------------
    #: The method's library layers can be swapped for an exact plain-speed simulation (which then holds
    #: dequantized weights: a comparison budgets such a model like a simulated one).
    has_exact_simulation: ClassVar[bool] = False
    #: A comparison's default (``kernels="auto"``) evaluates through the exact simulation, where it can (CPU),
    #: instead of the kernels: set only where the simulation measured faster than the library's kernels in no
    #: more memory (benchmarks/RESULTS.md). Every such run still cross-checks the two.
    exact_simulation_by_default: ClassVar[bool] = False

    def exact_simulation_problem(self, model: Any) -> str | None:
        """Why this quantized `model` (as `quantize_model` returned it) cannot have its library layers
        swapped for an exact plain-speed simulation, or None when it can (see `to_exact_simulation`)."""
        return "quantlib has no exact simulation of this method's kernels" if not self.simulated else \
            "the model is already simulated"

    def to_exact_simulation(self, model: Any) -> int:
        """Swap the library's layers of `model` in place for modules computing the same numbers, bit for
        bit, at plain-matmul speed; returns how many. Only where `exact_simulation_problem` is None."""
        raise NotImplementedError(self.exact_simulation_problem(model) or "no exact simulation")

    @classmethod
    def cpu_kernel_summary(cls) -> str | None:
        """Where the library picks its CPU kernels by CPU features: which it takes here, in a few words."""
        return None

    def kernel_paths(self, model: Any) -> list[str]:
        """Which kernels compute this scheme's layers in `model` (as evaluated), for the run's record."""
        if self.simulated:
            return ["quantlib's simulation: F.linear on the dequantized weights in the model's dtype"]
        return [f"{self.library}'s own layers on {self.backend.device}"]

    # ----- tensors ----------------------------------------------------------------------
    def quantize_tensor(self, weight: torch.Tensor) -> QuantizedTensor:
        """Quantize one weight matrix (out x in); returns the method's packed tensor format."""
        raise NotImplementedError

    def quantize_layer(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        """Quantize the matrix of layer `name` (methods with per-layer settings override this)."""
        return self.quantize_tensor(weight)

    def quantize_layer_calibrated(self, name: str, weight: torch.Tensor, inputs: torch.Tensor) -> QuantizedTensor:
        """Quantize layer `name` given its calibration inputs (rows x in), as the method would in a model:
        methods whose rounding uses activations (GPTQ) override this; the others ignore the inputs."""
        return self.quantize_layer(name, weight)

    def code_levels(self) -> torch.Tensor | None:
        """The code values in units of a block's scale (e.g. NF4's 16 levels in [-1, 1]), for drawing
        on weight histograms normalised the same way; None where codes are not a fixed table."""
        return None

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        """Bits of the code per weight, scales aside (4 for NF4, 5 for Q5_0): what error bounds scale with."""
        return float(config.bits)

    @classmethod
    def error_bits(cls, config: QuantConfig) -> float:
        """Bits of the integer grid whose rounding error this format's matches (error bounds use it): the code bits,
        or fewer for a float element type, whose mantissa sets its step (E4M3 rounds like a 6-bit grid)."""
        return cls.code_bits(config)

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        """Why a weight of this shape cannot be quantized by this scheme, or None if it can (a classmethod: shape rules
        need the config, not the hardware, so they run on a `config.json` before anything is loaded)."""
        return None

    @classmethod
    def layer_shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        """`shape_problem` for the layer `name` (methods with per-layer settings override this)."""
        return cls.shape_problem(config, name, shape)

    @classmethod
    def shape_problems(cls, config: QuantConfig, model_config: dict[str, Any]) -> list[str]:
        """Problems `config` will hit on a model, from its `config.json` alone, before any weights are read: every
        layer it quantizes whose shape the scheme cannot take (a group or block size that does not divide its input
        width), with the sizes that would fit. An empty list means the config fits the model."""

        shapes = model_shapes(model_config)
        decisions = cls.classify(config, shapes)
        problems = []
        for w in shapes.matmul_weights:
            if decisions[w.name] is not None:
                continue
            name = w.module if w.kind != "experts" else f"{w.name}[*] ({w.n_matrices} experts)"
            problem = cls.layer_shape_problem(config, name, (w.out_features, w.in_features))
            if problem is not None:
                problems.append(problem)
        return problems

    @classmethod
    def layer_storage_bytes(cls, config: QuantConfig, w: WeightShape, dtype: str = "float32") -> dict[str, float]:
        """`storage_bytes` of one matrix of `w` in a `dtype` model (per-layer settings, dtype scales override it)."""
        return cls.storage_bytes(config, w.out_features, w.in_features)

    @classmethod
    def plan_notes(cls, config: QuantConfig, shapes: ModelShapes) -> list[str]:
        """What the plan of this model should say beside its bytes (none by default)."""
        return []

    @classmethod
    def tensor_plan(cls, config: QuantConfig, shapes: ModelShapes) -> list[dict[str, Any]] | None:
        """Where a config types each tensor by a rule (llama-quantize's file types): per tensor its type and the rule."""
        return None

    @classmethod
    def model_layer_storage_bytes(cls, config: QuantConfig, shapes: ModelShapes, w: WeightShape,
                                  dtype: str = "float32") -> dict[str, float]:
        """`layer_storage_bytes` where the layer's format depends on the whole model (a method that picks each
        tensor's type from its place in the model overrides this)."""
        return cls.layer_storage_bytes(config, w, dtype)

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        """Analytic bytes of one quantized linear weight, by memory component, from its shape alone.

        Components: `codes`, `scales`, `dq_constants` (second-level quantization state) and
        `code_tables` (per-layer lookup tables). The planner sums these; tests check them against
        what the real packed tensors occupy.
        """
        raise NotImplementedError

    @classmethod
    def config_problem(cls, config: QuantConfig) -> str | None:
        """Why quantlib cannot model this (valid) config at all, planner included, or None."""
        return None

    # ----- costs, notes, snippet ------------------------------------------------------------
    @classmethod
    def calibration_settings(cls, n_tokens: int) -> Any:
        """The method's calibration settings for about `n_tokens` of the built-in calibration text (what
        `quantize_model(calibration=...)` takes), or None for a method that does not calibrate."""
        return None

    @classmethod
    def calibration_seconds(cls, config: QuantConfig, n_params: int, n_tokens: int) -> float:
        """Estimated CPU seconds of calibration for a model of `n_params` on `n_tokens` (0: none)."""
        return 0.0

    @classmethod
    def transformers_class_name(cls) -> str | None:
        """Name of transformers' config class for this method, or None where it has none."""
        return None

    #: What `snippet` shows, in a few words (the Config Builder's heading over it).
    snippet_heading: ClassVar[str] = "The same config with transformers (only non-default arguments):"

    @classmethod
    def snippet(cls, config: QuantConfig, model_id: str) -> str | None:
        """Python that loads `model_id` with this config through transformers (None: no transformers class)."""
        name = cls.transformers_class_name()
        if name is None:
            return None
        return "\n".join([
            "from transformers import AutoModelForCausalLM, " + name,
            "",
            f"quantization_config = {name}.from_dict({_py(config.to_dict())})",
            f"model_id = {json.dumps(model_id)}",
            "model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=quantization_config, "
            "device_map=\"auto\")",
        ])

    # ----- per-layer mixes (quantlib.recommend) -------------------------------------------------
    @classmethod
    def mix_spaces(cls, shapes: ModelShapes) -> list[MixSpace]:
        """The per-layer mixes this method's config can express for a model, one space per setting that the
        config must share across layers; [] where it has none (`mix_problem` says why)."""
        return []

    @classmethod
    def mix_problem(cls) -> str:
        return (f"{cls.config_class.quant_method}: its config has no per-layer setting that quantlib can "
                "export and load back")

    @classmethod
    def offload_problem(cls, config: QuantConfig, dtype: str) -> str | None:
        """Why a model quantized with `config` cannot be evaluated offloaded (`quantlib.offload`: from a checkpoint
        of its dequantized weights in `dtype`), or None where those weights give the method's numbers."""
        if cls.calibrated or not cls.simulated:
            return (f"{cls.library} computes with its own layers, which a checkpoint of dequantized weights does not "
                    "reproduce")
        return None

    @classmethod
    def offload_kernel_note(cls, config: QuantConfig, dtype: str) -> str | None:
        """Where an offloaded evaluation (dequantized weights, `F.linear` in `dtype`) is the method's numbers on
        another kernel path than the one its library takes on this machine: which, and why they differ."""
        return None

    @classmethod
    def tool_commands(cls, config: QuantConfig, model_config: dict[str, Any], shapes: ModelShapes,
                      dtype: str = "float32") -> dict[str, str]:
        """Commands of the method's own tools that produce this config (tool name -> shell text; llama-quantize's)."""
        return {}

    @classmethod
    def cli_commands(cls) -> list[Any]:
        """Subcommands of `quantlib` that are the method's own tools (GGUF's imatrix): objects with `name`, `help`,
        `arguments(parser)` and `run(args, context) -> exit status` (the CLI's `MethodContext`)."""
        return []

    def layer_output(self, x: torch.Tensor, packed: QuantizedTensor) -> torch.Tensor:
        """What the quantized layer computes from inputs `x` (rows x in), bias aside: `x @ W_q.T` by
        default; methods that also quantize activations override it."""
        return x @ packed.dequantize().to(x.dtype).t()

    # ----- modules ----------------------------------------------------------------------
    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        """Module patterns the config itself leaves in full precision."""
        return list(getattr(config, "modules_to_not_convert", None) or [])

    @classmethod
    def skip_rules(cls, config: QuantConfig, shapes: ModelShapes) -> list[tuple[str, str]]:
        """(module pattern, why) left unquantized: transformers' defaults (output head, tied weights,
        last module), the model's fp32 modules, then the config's own list."""
        return [*default_skip_rules(shapes),
                *((p, f"skipped by the config ({p!r})") for p in cls.skip_modules(config))]

    @classmethod
    def classify(cls, config: QuantConfig, shapes: ModelShapes) -> dict[str, str | None]:
        """Parameter name -> None where the method quantizes it, else why it stays unquantized."""
        rules = cls.skip_rules(config, shapes)
        return {w.name: cls.treatment(config, w, rules) for w in shapes.weights}

    @classmethod
    def treatment(cls, config: QuantConfig, w: WeightShape, rules: list[tuple[str, str]]) -> str | None:
        if not w.is_matmul:
            return ROLE_LABELS[w.role]
        for pattern, why in rules:
            if not should_convert_module(w.module, [pattern]):
                return why
        return cls.unquantized_reason(config, w)

    @classmethod
    def unquantized_reason(cls, config: QuantConfig, w: WeightShape) -> str | None:
        """Why the method leaves a matmul weight (not skipped by the rules) unquantized, or None."""
        if w.role == "router":
            return "MoE routers / gates (kept in full precision, as llama.cpp and gptqmodel do)"
        return None

    @classmethod
    def quantized_matrices(cls, config: QuantConfig, shapes: ModelShapes) -> list[tuple[str, WeightShape, int | None]]:
        """Every matrix `config` quantizes in the model `shapes` describes, by the planner's rules: (name, weight,
        expert index), the name being the module, or `param[e]` for expert e of a fused expert tensor. The one
        place a loaded model (`quantizable_layers`) and a checkpoint streamed from disk find their matrices."""
        decisions = cls.classify(config, shapes)
        out: list[tuple[str, WeightShape, int | None]] = []
        for w in shapes.weights:
            if decisions[w.name] is not None:
                continue
            if w.kind == "experts":
                out += [(f"{w.name}[{e}]", w, e) for e in range(w.n_matrices)]
            else:
                out.append((w.module, w, None))
        return out

    def quantizable_layers(self, model: torch.nn.Module) -> list[MatrixRef]:
        """Every matrix this quantizer quantizes in `model`, by the same rules the planner uses."""
        params = dict(model.named_parameters())
        return [MatrixRef(name, params[w.name], w, e)
                for name, w, e in type(self).quantized_matrices(self.config, describe_model(model))]

    def check_model_shapes(self, model: torch.nn.Module, refs: list[MatrixRef] | None = None) -> None:
        """Refuse before any work when a layer's width does not fit the scheme's groups or blocks
        (`refs`: the model's `quantizable_layers`, when the caller already has them)."""
        problems = [p for ref in (self.quantizable_layers(model) if refs is None else refs)
                    if (p := self.layer_shape_problem(self.config, ref.name, tuple(ref.get().shape))) is not None]
        if problems:
            raise ShapeError(problems)

    # ----- the model-level work ---------------------------------------------------------------
    def quantize_model(self, *, base: Any = None, source: str = "default", dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, allow_pickle: bool = False,
                       progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                       calibration: Any = None) -> QuantizedModel:
        """Quantize a model with this config and measure its footprint (default: simulated).

        `base` (a `LoadedModel` already in memory) saves a reload; the copy is quantized, the base is
        left untouched.
        """
        from quantlib.models import load_model

        started = time.perf_counter()
        if base is None:
            base = load_model(source, dtype=dtype, device=self.backend.device, trust_remote_code=trust_remote_code,
                              allow_pickle=allow_pickle, progress=progress)
        model = _copy_sharing_unquantized(base.model, self.quantizable_layers(base.model)).to(self.backend.device)
        packed: dict[str, QuantizedTensor] = {}
        memory = self.simulate(model, progress=progress, cancel=cancel, keep=packed)
        model.eval()
        return QuantizedModel(model, base.tokenizer, self.config, self.backend, memory,
                              time.perf_counter() - started, base.description.to_dict(), packed_layers=packed)

    @torch.no_grad()
    def simulate(self, model: torch.nn.Module, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, keep: dict[str, QuantizedTensor] | None = None) -> Any:
        """Replace each quantizable matrix in place by quantize→dequantize; return the packed size
        (a `quantlib.memory.MemoryBreakdown`). `keep` receives each layer's packed tensor by name."""
        from quantlib.footprint import MemoryBreakdown

        layers = self.quantizable_layers(model)
        self.check_model_shapes(model, layers)
        parts = {c: 0.0 for c in (*MEMORY_COMPONENTS, "unquantized")}
        quantized_ids: set[int] = set()
        quantized_params = 0
        done: dict[str, QuantizedTensor] = {}  # layers finish in any order; `keep` gets them in the layers' order
        for i, (ref, _, packed, values) in enumerate(self._quantized(layers, cancel, "quantization", ordered=False)):
            ref.set(values, in_this_thread=self.quantize_ahead > 0)
            if keep is not None:
                done[ref.name] = packed
            for comp, nbytes in packed.storage_by_component().items():
                parts[comp] += nbytes
            quantized_ids.add(id(ref.param))
            quantized_params += ref.get().numel()
            if progress and (i % 8 == 0 or i == len(layers) - 1):
                progress((i + 1) / len(layers), f"{self.config.label}: layer {i + 1}/{len(layers)} {ref.name}")
        if keep is not None:
            keep.update((ref.name, done[ref.name]) for ref in layers)
        seen: set[int] = set()
        total = 0
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if id(p) not in quantized_ids:
                parts["unquantized"] += p.numel() * p.element_size()
        for b in model.buffers():  # rotary inv_freq and the like stay as they are
            if id(b) not in seen:
                seen.add(id(b))
                parts["unquantized"] += b.numel() * b.element_size()
        notes = ["simulated: quantized layers counted at their packed size; in memory they are dequantized"]
        return MemoryBreakdown(parts, quantized_params, total, "packed (simulated)", notes)

    @torch.no_grad()
    def layer_weights(self, base_model: torch.nn.Module, quantized: Any = None,
                      cancel: CancelFn | None = None) -> Iterator[LayerWeight]:
        """The base and dequantized weight of every layer this method quantizes, one at a time.

        Default: the packed tensors `quantize_model` kept (`QuantizedModel.packed_layers`, when `quantized` is
        given and has every layer), else quantize each base weight with the method's own tensor path, so peak
        memory is the model plus one layer's packed and dequantized copies. Methods whose layers come from a
        calibrated model need `quantized`.
        """
        refs = self.quantizable_layers(base_model)
        self.check_model_shapes(base_model, refs)
        kept = getattr(quantized, "packed_layers", None) or {}
        if any(ref.name not in kept for ref in refs):
            kept = {}
        for ref, w, packed, values in self._quantized(refs, cancel, "layer errors", kept):
            yield LayerWeight(ref.name, w, values, packed, packed.bits_per_param)

    def _quantized(self, refs: list[MatrixRef], cancel: CancelFn | None, what: str,
                   kept: dict[str, QuantizedTensor] | None = None, ordered: bool = True) -> Iterator[tuple]:
        """(ref, weight, packed, dequantized) of every ref, in order unless not `ordered`, on `quantize_ahead`
        worker threads (`ahead.quantized_in_turn`); a packed tensor in `kept` is used as it is."""
        def work(ref: MatrixRef, w: torch.Tensor) -> tuple:
            packed = kept[ref.name] if kept and ref.name in kept else self.quantize_layer(ref.name, w)
            return ref, w, packed, packed.dequantize()

        return quantized_in_turn(refs, work, self.quantize_ahead, cancel, what, ordered)

    def count_layers(self, base_model: torch.nn.Module, quantized: Any = None) -> int:
        """How many items `layer_weights` yields (for progress)."""
        return len(self.quantizable_layers(base_model))

