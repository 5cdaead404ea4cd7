"""The two kinds of method that share more than the quantizer base class: `LinearReplacingQuantizer` (methods
transformers applies by replacing `nn.Linear` modules) and `CalibratedQuantizer` (methods calibrated on activations
by their own library, never imitated here)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from quantlib.configs import QuantConfig
from quantlib.errors import BackendUnavailableError
from quantlib.methods.base import Quantizer
from quantlib.methods.base.records import QuantizedModel
from quantlib.methods.base.rules import transformers_skip_rules
from quantlib.runtime import BackendReport
from quantlib.shapes import ModelShapes, WeightShape


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
    def unquantized_reason(cls, config: QuantConfig, w: WeightShape) -> str | None:
        if w.kind != "linear":
            return f"{w.module_class} is not an nn.Linear, which {cls.transformers_path}"
        return None

    @classmethod
    def layer_storage_bytes(cls, config: QuantConfig, w: WeightShape, dtype: str = "float32") -> dict[str, float]:
        return cls.storage_bytes(config, w.out_features, w.in_features, dtype)


class PlannedOnlyQuantizer(LinearReplacingQuantizer):
    """Methods quantlib plans to the byte but does not run (their packing is a GPU kernel it cannot check): refused
    on every device, before any weight is touched, with the reason and the fix `refusal(device)` gives. A missing
    library is reported first, with its install command."""

    simulated = False

    def refusal(self, device: str) -> tuple[str, str]:
        """(why it is not run on `device`, what to do instead)."""
        raise NotImplementedError

    def validate_environment(self, device: str) -> BackendReport:
        report = super().validate_environment(device)
        raise BackendUnavailableError(self.config.label, *self.refusal(report.device))

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        raise BackendUnavailableError(self.config.label, *self.refusal(str(weight.device.type)))


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
