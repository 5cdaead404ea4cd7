"""Named configs a practitioner reaches for first; shared by the app and the command line.

Each preset is a plain dict, validated by `parse_config` like any user input (a test checks all),
so a preset can be exported, edited in the Config Builder and re-imported without special cases.
"""

from __future__ import annotations

from quantlib.configs import QuantConfig
from quantlib.registry import parse_config
from quantlib.errors import ConfigError, FieldError

PRESETS: dict[str, dict] = {
    "nf4-dq": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
               "bnb_4bit_use_double_quant": True},
    "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0},
    "rtn-int4-g64": {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 64},
    "rtn-int4-g64-asym": {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 64,
                          "symmetric": False},
    "rtn-int8": {"quant_method": "rtn", "bits": 8, "granularity": "channel"},
    "gguf-q4_0": {"quant_method": "gguf", "quant_type": "Q4_0"},
    "gguf-q4_1": {"quant_method": "gguf", "quant_type": "Q4_1"},
    "gguf-q8_0": {"quant_method": "gguf", "quant_type": "Q8_0"},
    "gguf-q4_k_m": {"quant_method": "gguf", "quant_type": "Q4_K_M"},
    "hqq-int4-g64": {"quant_method": "hqq", "nbits": 4, "group_size": 64},
    "sinq-int4-g64": {"quant_method": "sinq", "nbits": 4, "group_size": 64, "modules_to_not_convert": ["lm_head"]},
    "torchao-int8": {"quant_method": "torchao", "ao_config": "Int8WeightOnlyConfig"},
    "quanto-int4": {"quant_method": "quanto", "weights": "int4"},
    "fp8-block32": {"quant_method": "fp8", "weight_block_size": [32, 32]},
    "fbgemm-fp8": {"quant_method": "fbgemm_fp8"},
    "nvfp4": {"quant_method": "nvfp4"},
    "ct-fp8-dynamic": {"quant_method": "compressed-tensors", "scheme": "FP8_DYNAMIC"},
    "ct-nvfp4": {"quant_method": "compressed-tensors", "scheme": "NVFP4"},
    "ct-mxfp4": {"quant_method": "compressed-tensors", "scheme": "MXFP4"},
    # Calibration-based: valid for planning and export everywhere, runnable only where their library
    # is installed (see `runnable_presets`). g64 because the default model's 576-wide layers do not
    # fit GPTQ's usual g128.
    "gptq-int4-g64": {"quant_method": "gptq", "bits": 4, "group_size": 64},
    "awq-int4-g64": {"quant_method": "awq", "bits": 4, "group_size": 64},
    "aqlm-1x16-g8": {"quant_method": "aqlm", "num_codebooks": 1, "nbits_per_codebook": 16, "in_group_size": 8},
}

PRESET_TITLES: dict[str, str] = {
    "nf4-dq": "NF4 + double quant (QLoRA)",
    "nf4": "NF4",
    "fp4": "FP4",
    "int8": "LLM.int8() (threshold 6.0)",
    "rtn-int4-g64": "RTN int4, group 64, symmetric",
    "rtn-int4-g64-asym": "RTN int4, group 64, asymmetric",
    "rtn-int8": "RTN int8, per channel",
    "gguf-q4_0": "GGUF Q4_0",
    "gguf-q4_1": "GGUF Q4_1",
    "gguf-q8_0": "GGUF Q8_0",
    "gguf-q4_k_m": "GGUF Q4_K_M (llama-quantize's mixture)",
    "hqq-int4-g64": "HQQ int4, group 64 (calibration-free)",
    "sinq-int4-g64": "SINQ int4, group 64 (calibration-free, Sinkhorn-balanced; output head kept)",
    "torchao-int8": "torchao int8 weight-only, per row",
    "quanto-int4": "optimum-quanto int4 (its group size)",
    "fp8-block32": "transformers' fine-grained FP8, 32x32 blocks (128x128 fits no 576-wide model)",
    "fbgemm-fp8": "FBGEMM FP8 per row (planning; CUDA only)",
    "nvfp4": "transformers' NVFP4 (planning; Blackwell GPUs only)",
    "ct-fp8-dynamic": "compressed-tensors FP8 dynamic (W8A8, vLLM)",
    "ct-nvfp4": "compressed-tensors NVFP4 (W4A4, vLLM)",
    "ct-mxfp4": "compressed-tensors MXFP4 (W4A4, vLLM)",
    "gptq-int4-g64": "GPTQ int4, group 64 (needs gptqmodel)",
    "awq-int4-g64": "AWQ int4, group 64 (needs gptqmodel)",
    "aqlm-1x16-g8": "AQLM 1x16, group 8 (planning; needs aqlm)",
}


def preset(name: str) -> QuantConfig:
    """The validated config of a preset; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ConfigError([FieldError("preset", name, "is not a known preset", ", ".join(PRESETS))])
    return parse_config(PRESETS[name])


def missing_requirements(name: str) -> list[str]:
    """pip names of the libraries a preset's quantizer needs and this environment lacks."""
    import importlib.util

    from quantlib.registry import quantizer_class

    quantizer = quantizer_class(preset(name))
    return [pip for module, pip in quantizer.requires if importlib.util.find_spec(module) is None]


def runnable_presets() -> dict[str, dict]:
    """The presets whose quantizer's libraries are installed here, in `PRESETS` order.

    Pages that run presets (Compare, Quantize and Inspect) should offer these; planning and export
    can offer all of `PRESETS`. Whether a GPU is needed is decided later, by `get_quantizer`.
    """
    return {name: cfg for name, cfg in PRESETS.items() if not missing_requirements(name)}
