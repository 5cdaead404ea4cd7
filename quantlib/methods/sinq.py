"""SINQ (Sinkhorn-normalized quantization, Huawei 2025) through the `sinq` package, as transformers' `SinqConfig`
uses it: the config, the quantizer and the tensor format.

SINQ needs no calibration data. Before rounding, it balances each weight matrix with a Sinkhorn-style iteration: a
scale per input column (`scale2`, fp16) and a scale per group. Then it rounds each group of `group_size` weights
to `nbits` codes, with an affine scale and zero. Those per-group scales and zeros are themselves stored in 8 bits
("quantAux": uint8 codes plus fp16 constants). The quantizer builds the same `sinq.sinqlinear_hf.SINQLinear` that
transformers builds on load (`replace_with_sinq_linear`, then `quantize(weight)`). It uses the model's dtype as its
compute dtype, as transformers passes it, and keeps what the layer holds: the packed codes `W_q` and the tensors
of its `meta`. Every one of them is counted byte by byte.

The model then runs with the weights `SINQLinear.dequantize()` gives. That is exactly what the layer's PyTorch
backend computes, `x @ dequantize().T`; sinq's GemLite kernels are CUDA only. So on a CPU this is the library's
own forward, not an imitation of it.

Which layers: every `nn.Linear` not matched by `modules_to_not_convert`, the output head included. transformers'
SINQ passes `modules_to_not_convert or []` on, so its usual default skips (the output head, tied weights) never
apply; the fp32 modules a model declares stay. Refused with the reason:
- `method: asinq` (A-SINQ, calibrated): transformers refuses it, and points to the SINQ repository;
- `tiling_mode: 2D`: its block-tiled scale layout is not planned here;
- shapes sinq cannot take: `in_features` not a multiple of `group_size`, or a group count that is not a
  multiple of 32. (The 8-bit scale quantization reshapes the group scales into 32 rows.)

Installing: the `sinq` wheel ships a top-level `sitecustomize.py` that patches transformers' `from_pretrained` and
`save_pretrained` in every Python process. `scripts/install.sh` removes that file. quantlib imports only sinq's layer
and quantizer, which patch nothing (tests/test_sinq.py checks both).
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.errors import _MISSING, FieldError
from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.base import register
from quantlib.methods.base.families import LinearReplacingQuantizer
from quantlib.methods.base.rules import should_convert_module, transformers_skip_rules

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 32

#: Widths `sinq.quantizer.Quantizer` packs, as integers (transformers' SinqConfig casts nbits to int, so 1.58 is
#: not expressible), and each width's packing: (name, codes per container, container bytes).
SINQ_BITS = (1, 2, 3, 4, 5, 6, 8)
PACKING = {8: ("8bit_u8", 1, 1), 6: ("6bit_32", 5, 4), 5: ("5bit_32", 6, 4), 4: ("4bit_u8", 2, 1),
           3: ("3bit_32", 10, 4), 2: ("2bit_u8", 4, 1), 1: ("1bit_u8", 8, 1)}
#: sinq quantizes the per-group scales to 8 bits over this many rows (`quantAux`: uint8 codes, fp16 per column).
AUX_ROWS = 32


def _group_size_rule(value: Any) -> str | None:
    return None if value % 8 == 0 else "must be a multiple of 8 (sinq's base config asserts it)"


class SinqQuantConfig(QuantConfig):
    """SINQ: calibration-free affine quantization after a Sinkhorn balancing of rows and columns. Keys as
    transformers' SinqConfig."""

    quant_method = "sinq"
    description = ("SINQ: calibration-free int1-8 per group, after a Sinkhorn-style balancing of the weight "
                   "matrix (a scale per input column); group scales and zeros in 8 bits (the sinq package, as "
                   "transformers' SinqConfig uses it).")
    ACCEPTED_EXTRA_KEYS = ("_extra_kwargs",)
    FIELDS = (
        FieldSpec("nbits", int, 4, "Bits per weight code.", choices=SINQ_BITS, title="Bits"),
        FieldSpec("group_size", int, 64, "Weights per scale/zero group (a multiple of 8 that divides every "
                  "quantized layer's input width).", minimum=8, validator=_group_size_rule,
                  allowed="a positive multiple of 8", title="Group size"),
        FieldSpec("tiling_mode", str, "1D", "Groups along each row (1D, transformers' default and what GemLite "
                  "runs) or square tiles (2D).", choices=("1D", "2D"), title="Tiling"),
        FieldSpec("method", str, "sinq", "sinq: calibration-free. asinq: activation-aware A-SINQ, calibrated "
                  "(transformers refuses it: the SINQ repository quantizes it).", choices=("sinq", "asinq"),
                  title="Method"),
        FieldSpec("modules_to_not_convert", list, None, "Module names left unquantized. transformers' SINQ has no "
                  "default skips: null quantizes the output head too.", nullable=True, title="Skip modules",
                  patterns=True),
    )

    @classmethod
    def _absorb(cls, raw: dict[str, Any], values: dict[str, Any]) -> list[FieldError]:
        """transformers writes `_extra_kwargs`: the keys its constructor did not take. `SinqConfig.from_dict` of a
        saved config passes `quant_method` there, so a checkpoint's config.json holds {"quant_method": "sinq"}."""
        extra = raw.get("_extra_kwargs", _MISSING)
        if extra is _MISSING or extra in ({}, {"quant_method": "sinq"}):
            return []
        return [FieldError("_extra_kwargs", extra, "holds keys SinqConfig does not define; none is modelled",
                           '{} or {"quant_method": "sinq"}')]

    def to_transformers(self) -> Any:
        """transformers' SinqConfig (`to_dict` leaves out its empty `_extra_kwargs`, which `from_dict` would nest)."""
        from transformers import SinqConfig

        return SinqConfig.from_dict(self.to_dict())

    @property
    def label(self) -> str:
        return f"SINQ int{self.nbits} g{self.group_size}" + ("" if self.tiling_mode == "1D" else " 2D") + \
            ("" if self.method == "sinq" else " (A-SINQ)")


# --------------------------------------------------------------------------------------------
# The tensor format
# --------------------------------------------------------------------------------------------


def _tensors(meta: dict[str, Any], prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a SINQLinear's meta, by path (the 8-bit scale and zero are (codes, s, m, shape))."""
    out: list[tuple[str, torch.Tensor]] = []
    for key, value in meta.items():
        if isinstance(value, torch.Tensor):
            out.append((prefix + key, value))
        elif isinstance(value, dict):
            out += _tensors(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)):
            out += [(f"{prefix}{key}.{i}", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    return out


@dataclass
class SinqTensor(QuantizedTensor):
    """What `SINQLinear` holds for one weight: packed codes `W_q`, the 8-bit group scales and zeros with their fp16
    constants, and the fp16 column scales `scale2`; the layer itself dequantizes."""

    layer: Any  # sinq.sinqlinear_hf.SINQLinear
    nbits: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "scales": "scales", "aux": "dq_constants"}

    @property
    def storage_bits(self) -> dict[str, int]:
        """W_q as codes; the uint8 scale and zero codes and `scale2` as scales; the fp16 constants of the 8-bit
        scale and zero quantization as second-level constants."""
        bits = {"codes": 8 * self.layer.W_q.numel() * self.layer.W_q.element_size(), "scales": 0, "aux": 0}
        for path, t in _tensors(self.layer.meta):
            aux = path.endswith((".1", ".2", ".s", ".m"))
            bits["aux" if aux else "scales"] += 8 * t.numel() * t.element_size()
        return bits

    @property
    def n_codes(self) -> int:
        return 2 ** self.nbits

    def codes_unpacked(self) -> torch.Tensor:
        from sinq.quantizer import Quantizer as SINQ

        codes = SINQ.unpack[self.layer.meta["packing"]](self.layer.W_q, dtype=torch.uint8)
        return codes.reshape(-1)[: self.numel].long()

    def dequantize(self) -> torch.Tensor:
        """`SINQLinear.dequantize()`: what its PyTorch backend multiplies by, in the original shape and dtype."""
        return self.layer.dequantize().reshape(self.shape).to(self.dtype)


def _import_sinq() -> Any:
    """sinq's layer; its module prints whether GemLite is installed, which quantlib says in its own words."""
    with contextlib.redirect_stdout(io.StringIO()):
        from sinq.sinqlinear_hf import SINQLinear, sinq_base_quant_config
    return SINQLinear, sinq_base_quant_config


def quantize_sinq(w: torch.Tensor, config: QuantConfig) -> SinqTensor:
    """One (out, in) weight through the `SINQLinear` transformers builds (compute dtype: the weight's)."""
    check_float(w, "quantize_sinq")
    if w.dim() != 2:
        raise ValueError(f"quantize_sinq takes an (out, in) matrix, got shape {tuple(w.shape)}")
    problem = _shape_problem("weight", tuple(w.shape), config.group_size)
    if problem:
        raise ValueError(problem)
    SINQLinear, base_config = _import_sinq()
    quant_config = base_config(nbits=config.nbits, group_size=config.group_size, quant_zero=False, quant_scale=False,
                               view_as_float=False, axis=1, tiling_mode=config.tiling_mode, method=config.method)
    layer = SINQLinear(in_features=w.shape[1], out_features=w.shape[0], bias=False, quant_config=quant_config,
                       compute_dtype=w.dtype, device=str(w.device), use_unpack_kernel=True)
    layer.quantize(w.detach())
    return SinqTensor(layer, config.nbits, tuple(w.shape), w.dtype)


def _shape_problem(name: str, shape: tuple[int, ...], group_size: int) -> str | None:
    out_features, in_features = shape[-2], shape[-1]
    if in_features % group_size:
        return (f"{name}: {in_features} input features are not a whole number of groups of {group_size} (SINQ "
                "groups along each row); pick a group_size that divides it")
    groups = out_features * in_features // group_size
    if groups % AUX_ROWS:
        return (f"{name}: {groups} groups of {group_size} are not a multiple of {AUX_ROWS}, which sinq's 8-bit "
                "scale quantization needs (it reshapes the group scales into 32 rows); pick a smaller group_size")
    return None


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------


@register("sinq")
class SinqQuantizer(LinearReplacingQuantizer):
    """SINQ through the sinq package's own layer, simulated with the weights it dequantizes (its PyTorch
    backend's forward)."""

    config_class = SinqQuantConfig
    requires = (("sinq", "sinq"), ("datasets", "datasets"))  # sinq imports datasets (for A-SINQ) at import
    library = "sinq"
    transformers_path = "transformers' SINQ replacement needs"
    experts_policy = ("transformers' SINQ replaces every nn.Linear not skipped (per-expert nn.Linear lists "
                      "included); fused 3-D expert tensors stay in 16/32 bits")

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "SinqConfig"

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        return float(config.nbits)

    @classmethod
    def skip_rules(cls, config: QuantConfig, shapes: Any) -> list[tuple[str, str]]:
        """transformers' SINQ passes `modules_to_not_convert or []` to `get_modules_to_not_convert`, never None, so
        its default skips (the output head, tied weights) never apply: the output head is quantized unless the
        config names it. Only the model's fp32 modules stay, as for every method."""
        return transformers_skip_rules(shapes, list(config.modules_to_not_convert or []), "modules_to_not_convert")

    @classmethod
    def tied_head_problem(cls, config: QuantConfig, shapes: Any) -> str | None:
        """An output head tied to the token embedding that the config does not skip: transformers' SINQ replaces it
        with a SINQLinear that never gets a weight (the checkpoint stores it once, as the embedding), and the model
        fails in its forward ("model was not quantized"). Refused, rather than planned as the run it never is."""
        skip = list(config.modules_to_not_convert or [])
        for alias, _ in shapes.tied:
            module = alias.removesuffix(".weight")
            if module in shapes.default_not_convert and should_convert_module(module, skip):
                return (f"{module} is tied to the token embedding: transformers' SINQ replaces it with a SINQLinear "
                        "that never receives a weight, and the model fails in its forward (\"model was not "
                        f"quantized\"); add {module!r} to modules_to_not_convert")
        return None

    @classmethod
    def shape_problems(cls, config: QuantConfig, model_config: dict[str, Any]) -> list[str]:
        from quantlib.shapes import model_shapes

        problem = cls.tied_head_problem(config, model_shapes(model_config))
        return [*([problem] if problem else []), *super().shape_problems(config, model_config)]

    def check_model_shapes(self, model: torch.nn.Module, refs: list | None = None) -> None:
        from quantlib.methods.base.records import ShapeError
        from quantlib.shapes import describe_model

        problem = self.tied_head_problem(self.config, describe_model(model))
        if problem:
            raise ShapeError([problem])
        super().check_model_shapes(model, refs)

    @classmethod
    def config_problem(cls, config: QuantConfig) -> str | None:
        if config.method == "asinq":
            return ("A-SINQ is calibrated on activations; transformers refuses method 'asinq' (\"not supported in "
                    "Hugging Face\") and points to the SINQ repository. Use method 'sinq'")
        if config.tiling_mode == "2D":
            return ("tiling_mode 2D stores its scales per square tile, a layout quantlib does not plan; transformers' "
                    "default, 1D, is what sinq's GemLite kernels run")
        return None

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        return _shape_problem(name, shape, config.group_size)

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int,
                      dtype: str = "float32") -> dict[str, float]:
        """Packed codes (containers rounded up per column of a group), uint8 scale and zero per group, fp16 column
        scales, and the fp16 constants of the 8-bit scale (two per 32 groups) and zero (two per tensor)."""
        groups = out_features * in_features // config.group_size
        _, per, nbytes = PACKING[config.nbits]
        codes = math.ceil(groups / per) * nbytes * config.group_size
        return {"codes": float(codes), "scales": float(2 * groups + 2 * in_features),
                "dq_constants": float(4 * math.ceil(groups / AUX_ROWS) + 4), "code_tables": 0.0}

    def quantize_tensor(self, weight: torch.Tensor) -> SinqTensor:
        return quantize_sinq(weight, self.config)

    def kernel_paths(self, model: Any) -> list[str]:
        return ["sinq's SINQLinear, PyTorch backend: x @ dequantize().T on the weights its dequantize gives "
                "(GemLite, its fast 4-bit path, is CUDA only)"]

    def environment_notes(self, device: str) -> list[str]:
        return ["SINQ quantizes with the sinq package's own SINQLinear; its fast GemLite kernels are CUDA only, so on "
                "this machine its PyTorch backend (dequantize, then matmul) is both what runs and what is measured"]
