"""What a quantizer hands back (`QuantizedModel`, `LayerWeight`), the matrices it works on (`MatrixRef`), the
per-layer mixes a method's config can express (`MixChoice`, `MixSpace`) and the error it raises where a layer's
shape does not fit (`ShapeError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from quantlib.configs import QuantConfig
from quantlib.errors import QuantlibError
from quantlib.formats import QuantizedTensor
from quantlib.runtime import BackendReport
from quantlib.shapes import WeightShape


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
        """The matrix, contiguous, on the model's device, where the reference formats, the simulated methods and
        the error metrics compute (a format whose math runs in numpy reads it to the host itself, once): what
        quantizing and measuring a layer start from."""
        return self.get().contiguous()

    def set(self, value: torch.Tensor, in_this_thread: bool = False) -> None:
        """Write `value` into the matrix (copied onto the model's device and dtype). `in_this_thread`: on the CPU,
        copy in slices of rows that torch copies in the calling thread. One copy of a large tensor opens an OpenMP
        region whose threads then spin for milliseconds, taking the cores from threads working beside it (the
        numpy quantizers' layers ahead, `Quantizer.quantize_ahead`): GGUF Q4_K_M took about 1.3 times as long."""
        dst = self.get()  # a view: writes go into the parameter
        value = value.to(dst.device, dst.dtype)
        if not in_this_thread or dst.device.type != "cpu" or dst.dim() == 0 or value.shape != dst.shape \
                or dst.numel() <= SERIAL_COPY:
            dst.copy_(value)
            return
        rows = max(1, SERIAL_COPY // max(1, dst[0].numel()))
        for i in range(0, dst.shape[0], rows):
            dst[i:i + rows].copy_(value[i:i + rows])


#: Elements up to which ATen runs an elementwise operation in the calling thread (`at::internal::GRAIN_SIZE`).
SERIAL_COPY = 32768


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
