"""AQLM (additive quantization with learned codebooks): the config transformers' AqlmConfig writes and
its checkpoint layout, planned exactly; quantizing needs the aqlm package and GPU-days, so it is refused."""

from __future__ import annotations

from typing import Any

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.methods.base import register
from quantlib.methods.base.families import CalibratedQuantizer, TensorShapes

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 80


class AqlmQuantConfig(QuantConfig):
    """AQLM (Egiazarian et al. 2024): additive multi-codebook quantization of weight groups.

    Each group of `in_group_size` x `out_group_size` weights is the sum of `num_codebooks` learned
    vectors, each chosen by a `nbits_per_codebook`-bit code. Keys exactly as
    `transformers.AqlmConfig.to_dict()`; a null `linear_weights_not_to_quantize` becomes [] as
    there. transformers only checks that the sizes are integers; here they must be positive, and
    codebooks hold at most 2^16 vectors (what the aqlm kernels and published checkpoints use).
    """

    quant_method = "aqlm"
    description = ("AQLM: groups of 8 weights encoded as sums of learned codebook vectors (~2 bits/param), "
                   "calibrated for GPU-days; needs the aqlm package to run, plannable here.")
    FIELDS = (
        FieldSpec("in_group_size", int, 8, "Weights per group along the input dimension (must divide every "
                  "layer's input width).", minimum=1, maximum=65536, title="Input group size"),
        FieldSpec("out_group_size", int, 1, "Weights per group along the output dimension (1 recommended).",
                  minimum=1, maximum=65536, title="Output group size"),
        FieldSpec("num_codebooks", int, 1, "Codebooks summed per group (1x16 and 2x8 are the common setups).",
                  minimum=1, maximum=64, title="Codebooks"),
        FieldSpec("nbits_per_codebook", int, 16, "Bits per code: each codebook holds 2^bits vectors.",
                  minimum=1, maximum=16, title="Bits per codebook"),
        FieldSpec("linear_weights_not_to_quantize", list, [], "Full parameter names kept in 16 bits, e.g. "
                  "lm_head.weight.", nullable=True, title="Weights not to quantize", patterns=True),
    )

    def __init__(self, **values: Any):
        raw = dict(values)
        if "linear_weights_not_to_quantize" in raw and raw["linear_weights_not_to_quantize"] is None:
            raw["linear_weights_not_to_quantize"] = []  # transformers' post_init does the same
        object.__setattr__(self, "_values", self._validate(raw))

    def to_transformers(self) -> Any:
        from transformers import AqlmConfig

        return AqlmConfig.from_dict(self.to_dict())

    @property
    def label(self) -> str:
        group = f"g{self.in_group_size}" + (f"x{self.out_group_size}" if self.out_group_size != 1 else "")
        return f"AQLM {self.num_codebooks}x{self.nbits_per_codebook} {group}"




@register("aqlm")
class AqlmQuantizer(CalibratedQuantizer):
    """AQLM through the aqlm package (its kernels; codebooks are learned for GPU-days)."""

    config_class = AqlmQuantConfig
    requires = (("aqlm", "aqlm"),)
    library = "aqlm"
    method_name = "AQLM"
    calibration = ("AQLM learns codebooks with beam search and fine-tuning on calibration text (GPU-days for "
                   "a 7B model); load a published AQLM checkpoint instead.")

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        """Codebook bits per weight: num_codebooks x nbits_per_codebook per group of in x out weights."""
        return config.num_codebooks * config.nbits_per_codebook / (config.in_group_size * config.out_group_size)

    @staticmethod
    def code_container_bits(nbits: int) -> int:
        """aqlm's `get_int_dtype`: codes of up to 8/16/32 bits are stored in int8/int16/int32."""
        return next(b for b in (8, 16, 32, 64) if nbits <= b)

    @classmethod
    def tensor_shapes(cls, config: QuantConfig, out_features: int, in_features: int) -> TensorShapes:
        """The parameters of aqlm's `QuantizedLinear`, as saved in AQLM checkpoints.

        codes: (out / out_group, in / in_group, num_codebooks), one code per group and codebook in
        the smallest int type holding nbits_per_codebook bits (int16 for 16, int8 for 8);
        codebooks: (num_codebooks, 2^nbits, out_group, in_group) fp16, per layer; scales:
        (out / out_group, 1, 1, 1) fp16, one per output group.
        """
        c = config
        return {
            "codes": ((out_features // c.out_group_size, in_features // c.in_group_size, c.num_codebooks),
                      cls.code_container_bits(c.nbits_per_codebook)),
            "codebooks": ((c.num_codebooks, 2 ** c.nbits_per_codebook, c.out_group_size, c.in_group_size), 16),
            "scales": ((out_features // c.out_group_size, 1, 1, 1), 16),
        }

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        """codes; scales (fp16 per output group); code_tables = the layer's fp16 codebooks."""
        t = cls.tensor_bytes(config, out_features, in_features)
        return {"codes": t["codes"], "scales": t["scales"], "dq_constants": 0.0, "code_tables": t["codebooks"]}

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        out_features, in_features = shape[0], shape[-1]
        problems = []
        if in_features % config.in_group_size:
            problems.append(f"input width {in_features} is not divisible by in_group_size {config.in_group_size}")
        if out_features % config.out_group_size:
            problems.append(f"output width {out_features} is not divisible by out_group_size "
                            f"{config.out_group_size}")
        return f"{name}: " + "; ".join(problems) if problems else None

    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        """`linear_weights_not_to_quantize` names parameters (lm_head.weight); modules are their parents."""
        names = config.linear_weights_not_to_quantize or []
        return [n[: -len(".weight")] if n.endswith(".weight") else n for n in names]



    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "AqlmConfig"
