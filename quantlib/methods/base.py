"""The quantizer base class and the registry: what every method inherits, and how it is found.

Modelled on transformers' `HfQuantizer` (`quantizers/base.py`) and `AUTO_QUANTIZER_MAPPING`: a config
says *what*, a quantizer knows *how* (which library, which device, which modules to leave alone) and
checks the environment before any weights are touched. The base class owns the model-level work with
defaults, and a method overrides only what differs:

- `quantize_model`: simulate by default (each quantizable matrix replaced by its quantize->dequantize
  result, memory counted at the packed size); bitsandbytes loads through `from_pretrained`;
  calibrated methods calibrate with their library.
- `layer_weights`: the original and dequantized weight of every quantized layer, for every metric.
- storage by component (`storage_bytes`, classmethod, from shapes alone; the packed tensors carry
  their own), code levels for histograms, cost estimates, notes and the copyable snippet.

Methods register with `@register("key")`; `quantlib.methods` imports every method module. Nothing
outside `quantlib/methods/` names a method.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch

from quantlib.configs import QuantConfig
from quantlib.errors import BackendUnavailableError, Cancelled, QuantlibError
from quantlib.formats import MEMORY_COMPONENTS, QuantizedTensor
from quantlib.runtime import BackendReport, device_name, resolve_device
from quantlib.shapes import ROLE_LABELS, ModelShapes, WeightShape, describe_model, model_shapes

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

def register(key: str) -> Callable[[type["Quantizer"]], type["Quantizer"]]:
    """Class decorator: mark a quantizer to be registered under `key` (and its config class under its quant_method)
    by `quantlib.registry`, which finds every marked class in the method modules. Marking writes no global
    mapping, so a method module imports nothing that knows other methods."""

    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        cls.registry_key = key
        return cls

    return wrap


def should_convert_module(name: str, patterns: list[str]) -> bool:
    """transformers' matcher of `modules_to_not_convert` patterns (imported lazily: it is cheap)."""
    from transformers.quantizers.quantizers_utils import should_convert_module as _should

    return _should(name, patterns)


def natural_key(name: str) -> tuple:
    """Sort key of module names in model order: numbers compare as numbers (layers.3 before layers.11)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def default_skip_rules(shapes: ModelShapes) -> list[tuple[str, str]]:
    """transformers' default modules left unquantized for this model, each with why."""
    tied = {a.removesuffix(".weight") for pair in shapes.tied for a in pair}
    heads = {w.module for w in shapes.weights if w.role == "head"}
    rules = []
    for pattern in shapes.default_not_convert:
        if pattern in heads or pattern == "lm_head":
            why = "output head (transformers leaves it unquantized by default)"
        elif pattern in tied:
            why = "tied to the output head (transformers leaves tied weights unquantized)"
        else:
            why = "last module of the model (transformers leaves it unquantized by default)"
        rules.append((pattern, why))
    rules += [(p, "kept in fp32 by the model (_keep_in_fp32_modules)") for p in shapes.keep_in_fp32_modules]
    return rules


def transformers_skip_rules(shapes: ModelShapes, own: list[str] | None, field_name: str) -> list[tuple[str, str]]:
    """transformers' `HfQuantizer.get_modules_to_not_convert`: its defaults (output head, tied weights,
    last module) apply only when the config's list is None (a list replaces them); the model's fp32
    modules always stay unquantized."""
    rules = [r for r in default_skip_rules(shapes) if own is None or r[1].startswith("kept in fp32")]
    return [*rules, *((p, f"skipped by {field_name} ({p!r})") for p in own or [])]


#: Group sizes worth suggesting when one does not divide a layer's width.
COMMON_GROUP_SIZES = (16, 32, 64, 96, 128, 192, 256, 512, 1024)


def fitting_group_sizes(width: int, candidates: tuple[int, ...] = COMMON_GROUP_SIZES) -> list[int]:
    """Group sizes among `candidates` that divide `width` (the one suggestion rule of every method);
    where none does, the three largest divisors of `width`."""
    return [g for g in candidates if width % g == 0] or [d for d in range(1, width + 1) if width % d == 0][-3:]


def group_size_problem(name: str, width: int, group_size: int, candidates: tuple[int, ...] = COMMON_GROUP_SIZES,
                       minus_one: bool = False) -> str | None:
    """Why `group_size` does not fit a layer of input width `width`, with the sizes that would, or None."""
    if (minus_one and group_size == -1) or (group_size > 0 and width % group_size == 0):
        return None
    fits = ", ".join(map(str, fitting_group_sizes(width, candidates)))
    return (f"{name}: input width {width} is not divisible by group_size {group_size}; sizes that fit: {fits}"
            + (", or -1 (one group per output channel)" if minus_one else ""))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------
# What a quantizer hands back
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizedModel:
    """A model quantized with one config, with the backend that did it and what it occupies."""

    model: Any
    tokenizer: Any
    config: QuantConfig
    backend: BackendReport
    memory: Any  # quantlib.memory.MemoryBreakdown
    seconds: float
    description: dict[str, Any] = field(default_factory=dict)
    calibration_seconds: float = 0.0  # calibrated methods: the library's calibration alone
    checkpoint_dir: str | None = None  # calibrated methods: where the quantized checkpoint was saved
    #: simulated methods: each layer's packed tensor from `simulate`, so layer errors read it instead of quantizing
    #: every weight a second time (drop it with `release_packed` once read: it holds the packed model)
    packed_layers: dict[str, QuantizedTensor] | None = None
    #: which kernels compute its layers as evaluated (`Quantizer.kernel_paths`), set once by the comparison
    kernel_paths: list[str] = field(default_factory=list)

    def release_packed(self) -> None:
        self.packed_layers = None

    @property
    def simulated(self) -> bool:
        return self.backend.simulated


@dataclass
class LayerWeight:
    """One quantized matrix: its name, the base weight, what the quantized model computes with, and
    the packed tensor where the method produces one per layer (None for calibrated checkpoints)."""

    name: str
    original: torch.Tensor
    dequantized: torch.Tensor
    packed: QuantizedTensor | None
    bits_per_param: float


@dataclass
class MatrixRef:
    """One quantizable weight matrix of a loaded model: a linear weight, a Conv1D weight (stored
    input x output) or one expert's slice of a fused 3-D expert tensor, read and written as out x in."""

    name: str  # the module name, or `param[e]` for expert e of a fused tensor
    param: torch.nn.Parameter
    shape: WeightShape
    index: int | None = None

    def get(self) -> torch.Tensor:
        t = self.param.data if self.index is None else self.param.data[self.index]
        return t.t() if self.shape.transposed else t

    def read(self) -> torch.Tensor:
        """The matrix, contiguous, on the CPU where the reference formats compute (a copy when the model is on
        another device): what quantizing and measuring a layer start from."""
        return self.get().contiguous().cpu()

    def set(self, value: torch.Tensor) -> None:
        dst = self.get()  # a view: writes go into the parameter (`set` copies onto the model's device)
        dst.copy_(value.to(dst.dtype))


@dataclass(frozen=True)
class MixChoice:
    """One setting a group of layers may take in a per-layer mix: the uniform config that quantizes a
    layer this way, or None where the layer stays unquantized in the model's dtype."""

    key: str
    label: str
    config: QuantConfig | None
    bits: float  # code bits per weight (16 for a layer kept unquantized), for ordering and charts


@dataclass(frozen=True)
class MixSpace:
    """A per-layer mix a method's config can express: the choices, how layers are grouped (one choice per
    group, as the exported config addresses them) and how an assignment becomes one config.

    `group_of(module)` names a layer's group; `build({group: choice key})` returns the config (which must
    plan to exactly the per-group sizes); `uniform` is the config with every layer at `choices[0]`.
    """

    name: str
    choices: tuple[MixChoice, ...]
    grouping: str  # how groups are formed, in words ("module", "linear tag")
    group_of: Callable[[str], str]
    build: Callable[[dict[str, str]], QuantConfig]
    uniform: QuantConfig
    export: str  # what the exported config is, in words
    limits: str = ""  # what the format cannot mix, in words
    #: False where transformers' own config class drops part of the mix (its loader is the method's library)
    transformers_keeps: bool = True


class ShapeError(QuantlibError, ValueError):
    """Some layers cannot be quantized with this config (group or block size does not divide)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} layer(s) do not fit this config:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


class Quantizer:
    """Base of all quantizers (the `HfQuantizer` of this project).

    Subclasses set `config_class`, `requires` (importable modules and pip names), `simulated`, and
    implement `quantize_tensor` and `storage_bytes`. `validate_environment` runs in the
    constructor, so a quantizer that exists can run.
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

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """quantize→dequantize, in the weight's dtype: what the model computes with."""
        return self.quantize_tensor(weight).dequantize()

    def code_levels(self) -> torch.Tensor | None:
        """The code values in units of a block's scale (e.g. NF4's 16 levels in [-1, 1]), for drawing
        on weight histograms normalised the same way; None where codes are not a fixed table."""
        return None

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        """Bits of the code per weight, scales aside (4 for NF4, 5 for Q5_0): what error bounds scale with."""
        return float(config.bits)

    @classmethod
    def check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        """Why a weight of this shape cannot be quantized by this scheme, or None if it can.

        A classmethod, like `storage_bytes`: shape rules need the config, not the hardware, so
        they can run on a `config.json` before anything is loaded.
        """
        return None

    @classmethod
    def layer_check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        """`check_shape` for the layer `name` (methods with per-layer settings override this)."""
        return cls.check_shape(config, name, shape)

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
            problem = cls.layer_check_shape(config, name, (w.out_features, w.in_features))
            if problem is not None:
                problems.append(problem)
        return problems

    @classmethod
    def layer_storage_bytes(cls, config: QuantConfig, w: WeightShape, dtype: str = "float32") -> dict[str, float]:
        """`storage_bytes` of one matrix of the weight `w` for a model in `dtype` (methods with per-layer
        settings, or that store scales in the model dtype, override this)."""
        return cls.storage_bytes(config, w.out_features, w.in_features)

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        """Analytic bytes of one quantized linear weight, by memory component, from its shape alone.

        Components: `codes`, `scales`, `dq_constants` (second-level quantization state) and
        `code_tables` (per-layer lookup tables). The planner sums these; tests check them against
        what the real packed tensors occupy.
        """
        raise NotImplementedError

    @classmethod
    def unsupported(cls, config: QuantConfig) -> str | None:
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
        """Python that loads `model_id` with this config through transformers, or None where
        transformers has no config class for the method."""
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
        config must share across layers; [] where it has none (`mix_unsupported` says why)."""
        return []

    @classmethod
    def mix_unsupported(cls) -> str:
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
        """Commands of the method's own tools that produce this config (tool name -> shell text), where its
        config is not what the tool reads (llama.cpp's llama-quantize for GGUF); {} where none."""
        return {}

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
        return cls.matmul_treatment(config, w)

    @classmethod
    def matmul_treatment(cls, config: QuantConfig, w: WeightShape) -> str | None:
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
                    if (p := self.layer_check_shape(self.config, ref.name, tuple(ref.get().shape))) is not None]
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
        for i, ref in enumerate(layers):
            if cancel is not None and cancel():
                raise Cancelled(f"quantization cancelled at layer {ref.name}")
            packed = self.quantize_layer(ref.name, ref.read())
            ref.set(packed.dequantize())
            if keep is not None:
                keep[ref.name] = packed
            for comp, nbytes in packed.storage_by_component().items():
                parts[comp] += nbytes
            quantized_ids.add(id(ref.param))
            quantized_params += ref.get().numel()
            if progress and (i % 8 == 0 or i == len(layers) - 1):
                progress((i + 1) / len(layers), f"{self.config.label}: layer {i + 1}/{len(layers)} {ref.name}")
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
        for ref in refs:
            if cancel is not None and cancel():
                raise Cancelled(f"layer errors cancelled at {ref.name}")
            w = ref.read()
            packed = kept[ref.name] if ref.name in kept else self.quantize_layer(ref.name, w)
            yield LayerWeight(ref.name, w, packed.dequantize(), packed, packed.bits_per_param)

    def count_layers(self, base_model: torch.nn.Module, quantized: Any = None) -> int:
        """How many items `layer_weights` yields (for progress)."""
        return len(self.quantizable_layers(base_model))


def _py(value: Any) -> str:
    """A JSON value as Python source (True/False/None, floats with a point)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    return repr(value)


@torch.no_grad()
def share_identical_tensors(model: torch.nn.Module, reference: torch.nn.Module) -> int:
    """Point every parameter of `model` that equals the parameter of the same name in `reference` (same
    dtype, shape, device and values) at the reference's tensor; returns the bytes freed. A quantized model
    loaded from disk keeps its own copies of embeddings and norms; sharing them costs nothing as both
    models only read them."""
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    freed, seen = 0, set()
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            full = f"{module_name}.{name}" if module_name else name
            other = ref_params.get(full)
            if param is None or other is None or other is param or param.dtype != other.dtype \
                    or param.shape != other.shape or param.device != other.device or not torch.equal(param, other):
                continue
            module._parameters[name] = other
            if id(param) not in seen:
                seen.add(id(param))
                freed += param.numel() * param.element_size()
    return freed


def _copy_sharing_unquantized(model: torch.nn.Module, layers: list[MatrixRef]) -> torch.nn.Module:
    """A deep copy of `model` whose quantizable parameters are its own and whose other parameters and
    buffers (embeddings, norms, biases, rotary tables) are the original's tensors: simulation writes
    only the quantizable ones, so a simulated model costs its quantized matrices, not a whole copy."""
    quantized = {id(ref.param) for ref in layers}
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in quantized}
    return copy.deepcopy(model, memo)


class LinearReplacingQuantizer(Quantizer):
    """Methods transformers applies by replacing `nn.Linear` modules (subclasses included), with
    transformers' default skips unless the config's `modules_to_not_convert` replaces them, and scales
    stored in the model's dtype (so the planner passes it)."""

    #: How transformers applies the method, for the reasons shown in the planner.
    transformers_path: ClassVar[str] = ""

    @classmethod
    def skip_rules(cls, config: QuantConfig, shapes: ModelShapes) -> list[tuple[str, str]]:
        return transformers_skip_rules(shapes, config.modules_to_not_convert, "modules_to_not_convert")

    @classmethod
    def matmul_treatment(cls, config: QuantConfig, w: WeightShape) -> str | None:
        if w.kind != "linear":
            return f"{w.module_class} is not an nn.Linear, which {cls.transformers_path}"
        return None

    @classmethod
    def layer_storage_bytes(cls, config: QuantConfig, w: WeightShape, dtype: str = "float32") -> dict[str, float]:
        return cls.storage_bytes(config, w.out_features, w.in_features, dtype)


# --------------------------------------------------------------------------------------------
# Calibration-based methods: real libraries only, never imitated here
# --------------------------------------------------------------------------------------------

TensorShapes = dict[str, tuple[tuple[int, ...], int]]  # name -> (shape, bits per element)


class CalibratedQuantizer(Quantizer):
    """Base of methods calibrated on activations by their own library (GPTQ, AWQ, AQLM), never faked.

    Memory planning and shape checks work from the config alone (classmethods). Quantizing needs
    the library: `get_quantizer` raises `BackendUnavailableError` when it is missing, and
    `quantize_tensor` raises it always, because these methods quantize a whole model from its
    activations on calibration text, not one tensor at a time. A subclass that can calibrate here
    sets `calibrated = True` and overrides `quantize_model` and `layer_weights`.
    """

    simulated = False
    method_name: ClassVar[str] = ""
    calibration: ClassVar[str] = ""

    def validate_environment(self, device: str) -> BackendReport:
        try:
            return super().validate_environment(device)
        except BackendUnavailableError as exc:
            if "is not installed" not in exc.missing:
                raise
            raise BackendUnavailableError(
                f"{self.method_name} ({self.config.label})", exc.missing,
                f"{exc.fix}, into the environment that runs quantlib (its torch requirement must accept the "
                f"installed torch). {self.calibration}") from None

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        raise BackendUnavailableError(
            f"{self.method_name} ({self.config.label})",
            "it is calibration-based: it quantizes a whole model from its activations on calibration text, "
            f"which {self.library} does and quantlib does not imitate",
            f"Quantize the model with {self.library} and load the saved checkpoint; quantlib can plan its "
            "memory and check its shapes without it.")

    @classmethod
    def offload_problem(cls, config: QuantConfig, dtype: str) -> str | None:
        return ("calibration-based: it quantizes from the activations of the whole model, which an offloaded "
                "evaluation streams one module at a time")

    def quantize_model(self, **kwargs: Any) -> QuantizedModel:
        self.quantize_tensor(torch.empty(0))  # raises with the reason
        raise AssertionError("unreachable")

    @classmethod
    def tensor_shapes(cls, config: QuantConfig, out_features: int, in_features: int) -> TensorShapes:
        """Every tensor a checkpoint stores for one linear weight: name -> (shape, bits per element)."""
        raise NotImplementedError

    @classmethod
    def tensor_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        return {name: math.prod(shape) * bits / 8
                for name, (shape, bits) in cls.tensor_shapes(config, out_features, in_features).items()}
