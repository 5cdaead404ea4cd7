"""bitsandbytes' two quantizers, `@register`-marked: 4-bit NF4/FP4 (double quant) and 8-bit LLM.int8(). They load
through transformers' `from_pretrained` (bitsandbytes quantizes while loading); their tensor path is the formats'."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Iterator

import torch

from quantlib.configs import QuantConfig
from quantlib.errors import Cancelled
from quantlib.formats import QuantizedTensor
from quantlib.methods.base import Quantizer, register
from quantlib.methods.base.records import LayerWeight, MixChoice, MixSpace, QuantizedModel
from quantlib.methods.base.rules import default_skip_rules, natural_key, transformers_skip_rules
from quantlib.methods.bitsandbytes.config import DTYPE_KEYS, BitsAndBytesQuantConfig
from quantlib.methods.bitsandbytes.exact import (_int8_matmul, exact_simulation_problem, keep_stored_4bit,
                                                 kernel_paths, stored_layers, to_exact_simulation,
                                                 work_around_cpu_kernel_bugs)
from quantlib.methods.bitsandbytes.formats import RowwiseInt8Tensor, quantize_4bit, quantize_int8_weight
from quantlib.methods.bitsandbytes.rounding import _levels
from quantlib.shapes import ModelShapes, WeightShape

# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------

class BnbQuantizer(Quantizer):
    """Shared part of the two bitsandbytes quantizers: the real library, real kernels.

    `quantize_model` goes through transformers' `from_pretrained(..., quantization_config=...)`, the
    path users will run: bitsandbytes quantizes while loading.
    """

    config_class = BitsAndBytesQuantConfig
    requires = (("bitsandbytes", "bitsandbytes"),)
    simulated = False
    library = "bitsandbytes"
    has_exact_simulation = True

    experts_policy = ("transformers 5.23 replaces only nn.Linear and Conv1D modules with bitsandbytes layers: fused "
                      "3-D expert tensors (Mixtral, Qwen-MoE, DeepSeek...) stay in 16/32 bits; per-expert "
                      "nn.Linear lists and routers that are nn.Linear modules are quantized, routers held as plain "
                      "parameters (Mixtral's MixtralTopKRouter) are not")

    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        return list(config.llm_int8_skip_modules or [])

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        if config.load_in_8bit:
            return 16.0 if config.llm_int8_has_fp16_weight else 8.0
        return 4.0

    @classmethod
    def skip_rules(cls, config: QuantConfig, shapes: ModelShapes) -> list[tuple[str, str]]:
        """transformers' `get_modules_to_not_convert`: its defaults (output head, tied weights, last
        module) apply only when `llm_int8_skip_modules` is None; a list replaces them."""
        return transformers_skip_rules(shapes, config.llm_int8_skip_modules, "llm_int8_skip_modules")

    @classmethod
    def unquantized_reason(cls, config: QuantConfig, w: WeightShape) -> str | None:
        if w.kind == "experts":
            return "fused expert tensors (transformers' bitsandbytes replaces only nn.Linear and Conv1D modules)"
        if w.kind == "linear" and not w.exact_linear:
            return f"{w.module_class}, a subclass of nn.Linear, which transformers' bitsandbytes replacement skips"
        return None

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "BitsAndBytesConfig"

    @classmethod
    def snippet(cls, config: QuantConfig, model_id: str) -> str | None:
        """transformers' idiom: `BitsAndBytesConfig(...)` with the non-default keyword arguments, dtypes
        as `torch.` attributes."""
        import json

        from quantlib.methods.base import _py

        diff = config.to_diff_dict()
        kwargs = [(n, f"torch.{diff[n]}" if n in DTYPE_KEYS and isinstance(diff[n], str) else _py(diff[n]))
                  for n in config.field_names() if n in diff]
        lines = ["import torch"] if any(src.startswith("torch.") for _, src in kwargs) else []
        lines += ["from transformers import (", "    AutoModelForCausalLM,", "    BitsAndBytesConfig,", ")", "",
                  "quantization_config = BitsAndBytesConfig("]
        lines += [f"    {name}={src}," for name, src in kwargs]
        lines += [")", f"model_id = {json.dumps(model_id)}", "model = AutoModelForCausalLM.from_pretrained(",
                  "    model_id,", "    quantization_config=quantization_config,", '    device_map="auto",', ")"]
        return "\n".join(lines)

    def quantize_model(self, *, base: Any = None, source: str = "default", dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, allow_pickle: bool = False, progress: Any = None,
                       cancel: Any = None, calibration: Any = None) -> QuantizedModel:
        """Load `source` through `from_pretrained` with the config (always from `source`, never from
        `base`: bitsandbytes quantizes while loading), with the baseline's loading choices."""
        from quantlib.footprint import measure_footprint
        from quantlib.models import load_model

        started = time.perf_counter()
        loaded = load_model(source, dtype=dtype, device=self.backend.device, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle, quantization_config=self.config.to_transformers(),
                            progress=progress)
        _own_unquantized_tensors(loaded.model)
        keep_stored_4bit(loaded.model)  # before a CPU forward repacks them for the fused kernel
        memory = measure_footprint(loaded.model)  # what bitsandbytes stores, before any workaround
        work_around_cpu_kernel_bugs(loaded.model)  # bitsandbytes' CPU kernels on shapes they get wrong
        loaded.model.eval()
        return QuantizedModel(loaded.model, loaded.tokenizer, self.config, self.backend, memory,
                              time.perf_counter() - started, loaded.description.to_dict())

    @classmethod
    def mix_spaces(cls, shapes: ModelShapes) -> list[MixSpace]:
        """A BitsAndBytesConfig quantizes every converted layer one way (one 4-bit type with or without double
        quant, or LLM.int8()); per layer it can only keep a module unquantized (`llm_int8_skip_modules`).
        One space per way; the exported skip list repeats transformers' defaults, which a list replaces."""
        defaults = [p for p, why in default_skip_rules(shapes) if not why.startswith("kept in fp32")]
        keep = MixChoice("keep", "kept unquantized", None, 16.0)
        ways = [("nf4+dq", "NF4 + double quant", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                  "bnb_4bit_use_double_quant": True}, 4.0),
                ("nf4", "NF4", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, 4.0),
                ("fp4+dq", "FP4 + double quant", {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                                  "bnb_4bit_use_double_quant": True}, 4.0),
                ("fp4", "FP4", {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, 4.0),
                ("int8", "LLM.int8()", {"load_in_8bit": True}, 8.0)]
        spaces = []
        for key, label, values, bits in ways:
            uniform = BitsAndBytesQuantConfig(**values)

            def build(assignment: dict[str, str], values: dict[str, Any] = values) -> QuantConfig:
                kept = sorted((g for g, choice in assignment.items() if choice == "keep"), key=natural_key)
                return BitsAndBytesQuantConfig(**values, llm_int8_skip_modules=[*defaults, *kept] if kept else None)

            spaces.append(MixSpace(
                f"{label}, some modules unquantized", (MixChoice(key, label, uniform, bits), keep), "module",
                lambda module: module, build, uniform,
                "BitsAndBytesConfig with llm_int8_skip_modules (the kept modules plus transformers' defaults)",
                "one BitsAndBytesConfig cannot mix 4-bit and 8-bit layers or two 4-bit types: each is its own space"))
        return spaces

    @classmethod
    def offload_problem(cls, config: QuantConfig, dtype: str) -> str | None:
        """4-bit layers compute `x @ dequantize(W).T` in the compute dtype: a checkpoint of the dequantized weights
        (bit-identical to bitsandbytes' own dequantization) in that dtype gives the same numbers. LLM.int8()
        quantizes activations at run time, which no weight checkpoint does."""
        if config.load_in_8bit:
            return ("LLM.int8() quantizes the activations at run time (outlier columns in 16 bits): a checkpoint of "
                    "dequantized weights would not reproduce it, and bitsandbytes offloads only to a CUDA device")
        if config.bnb_4bit_compute_dtype != dtype:
            return (f"its layers compute in {config.bnb_4bit_compute_dtype} while the model is {dtype}; set "
                    "bnb_4bit_compute_dtype to the model's dtype to evaluate it offloaded")
        return None

    @classmethod
    def offload_kernel_note(cls, config: QuantConfig, dtype: str) -> str | None:
        from quantlib.methods.bitsandbytes import _bnb_cpu

        path = _bnb_cpu.four_bit_path()
        if config.load_in_8bit or path == _bnb_cpu.DEQUANT_4BIT:
            return None
        return (f"{config.label}: evaluated offloaded as {_bnb_cpu.DEQUANT_4BIT} ({dtype}), the path bitsandbytes "
                f"takes on CPUs without AVX512-BF16; on this CPU its own layers run the {path}, so a comparison in "
                "memory here differs slightly (bf16 rounding)")

    def layer_output(self, x: torch.Tensor, packed: QuantizedTensor) -> torch.Tensor:
        if isinstance(packed, RowwiseInt8Tensor) and not self.config.llm_int8_has_fp16_weight:
            codes = packed.codes.reshape(packed.shape[0], -1)
            return _int8_matmul(x, codes, packed.row_absmax, self.config.llm_int8_threshold, None)
        return super().layer_output(x, packed)

    def exact_simulation_problem(self, model: Any) -> str | None:
        return exact_simulation_problem(model)

    @torch.no_grad()
    def layer_weights(self, base_model: torch.nn.Module, quantized: Any = None,
                      cancel: Any = None) -> Iterator[LayerWeight]:
        """From the quantized model (bitsandbytes' layers or their exact simulation): the tensors its layers store,
        with no second quantization; where there is none, quantize each base weight (the default)."""
        model = getattr(quantized, "model", quantized)
        stored = stored_layers(model) if model is not None else {}
        refs = self.quantizable_layers(base_model)
        if not stored or any(ref.name not in stored for ref in refs):
            # a layer repacked for a CPU kernel, or a model without bitsandbytes layers: quantize again
            yield from super().layer_weights(base_model, None, cancel=cancel)
            return
        for ref in refs:
            if cancel is not None and cancel():
                raise Cancelled(f"layer errors cancelled at {ref.name}")
            w = ref.read()
            packed = stored[ref.name](w.dtype)
            yield LayerWeight(ref.name, w, packed.dequantize(), packed, packed.bits_per_param)

    def to_exact_simulation(self, model: Any) -> int:
        return to_exact_simulation(model)

    def kernel_paths(self, model: Any) -> list[str]:
        return kernel_paths(model)

    @classmethod
    def cpu_kernel_summary(cls) -> str | None:
        from quantlib.methods.bitsandbytes._bnb_cpu import paths_summary

        return paths_summary()

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        n = out_features * in_features
        if config.load_in_8bit:
            if config.llm_int8_has_fp16_weight:
                return {"codes": 2.0 * n, "scales": 0.0, "dq_constants": 0.0, "code_tables": 0.0}
            # int8 codes plus one fp32 scale (SCB) per output row.
            return {"codes": float(n), "scales": 4.0 * out_features, "dq_constants": 0.0, "code_tables": 0.0}
        blocks = -(-n // Bnb4BitQuantizer.blocksize)
        codes = float(-(-n // 2))  # two 4-bit codes per byte
        if config.bnb_4bit_use_double_quant:
            # absmax in uint8; per 256 absmax blocks one fp32 absmax; one fp32 offset; both code tables.
            return {"codes": codes, "scales": float(blocks), "dq_constants": 4.0 * -(-blocks // 256) + 4.0,
                    "code_tables": 4.0 * (16 + 256)}
        return {"codes": codes, "scales": 4.0 * blocks, "dq_constants": 0.0, "code_tables": 4.0 * 16}


@register("bitsandbytes_4bit")
class Bnb4BitQuantizer(BnbQuantizer):
    """NF4/FP4 with optional double quantization (QLoRA), blocksize 64 as bitsandbytes uses."""

    blocksize: ClassVar[int] = 64
    #: A comparison's evaluation of this scheme on CPU against one plain fp32 pass (benchmarks/bench_compare.py,
    #: 2026-11-25: 1.19 with bitsandbytes 0.50.2's kernels, 1.27-1.36 with the exact simulation).
    cpu_eval_slowdown = 1.2

    def environment_notes(self, device: str) -> list[str]:
        from quantlib.methods.bitsandbytes import _bnb_cpu

        if device == "cpu" and _bnb_cpu.four_bit_path() == _bnb_cpu.FUSED_4BIT:
            return ["This CPU has AVX512-BF16: bitsandbytes runs its fused bf16 4-bit kernel (activations, code levels "
                    "and absmax rounded to bf16; about one plain pass). `--kernels exact` mirrors it bit for bit at "
                    "about 18 plain passes on the default model (benchmarks/RESULTS.md); the default keeps the kernel."]
        return []

    def code_levels(self) -> torch.Tensor | None:
        return _levels(self.config.bnb_4bit_quant_type)

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        return quantize_4bit(weight, quant_type=self.config.bnb_4bit_quant_type, blocksize=self.blocksize,
                            double_quant=self.config.bnb_4bit_use_double_quant, backend="bitsandbytes")


@register("bitsandbytes_8bit")
class Bnb8BitQuantizer(BnbQuantizer):
    """LLM.int8(): row-wise int8 weights, fp16 matmul for activation outlier columns."""

    # On this project's AVX2 CPU the simulation's forward took 1.35-1.40 plain forwards against the kernels'
    # 1.65-1.86, keeping the same int8 codes (benchmarks/RESULTS.md, "LLM.int8() through its simulation").
    exact_simulation_by_default = True
    #: A comparison's evaluation of this scheme on CPU against one plain fp32 pass (benchmarks/bench_compare.py,
    #: 2026-11-26, the default path: 1.33-1.58 through the simulation; 1.54 on bitsandbytes 0.50.2's kernels).
    cpu_eval_slowdown = 1.5

    def environment_notes(self, device: str) -> list[str]:
        if device == "cpu":
            return ["LLM.int8() on CPU (activation quantization, outlier columns) makes its evaluation about 1.5x "
                    "a plain fp32 pass (by default through quantlib's exact simulation of bitsandbytes' kernels, "
                    "1.5x to 1.9x on the kernels themselves)."]
        return []

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        """What `Int8Params._quantize` stores: the weight cast to fp16 first, whatever the model's
        dtype (so fp32 and bf16 weights round through fp16), then row-wise int8 with fp32 SCB."""
        packed = quantize_int8_weight(weight.to(torch.float16))
        return dataclasses.replace(packed, dtype=weight.dtype)


@torch.no_grad()
def _own_unquantized_tensors(model: torch.nn.Module) -> None:
    """Copy the tensors bitsandbytes left unquantized out of the checkpoint's memory map.

    Loaded from safetensors, they are views into a mapping of the whole file; each loaded model
    would keep its own 0.5 GB mapping resident (measured on the default model) for 0.1 GB of
    embeddings and norms. Copying them lets the mapping go; sizes and values are unchanged.
    """
    from quantlib.runtime import release_memory

    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or getattr(param, "quant_state", None) is not None or not param.is_floating_point():
            continue
        seen.add(id(param))
        param.data = param.data.clone()
    release_memory()
