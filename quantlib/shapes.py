"""Every weight of a model, read off the model transformers itself builds on the meta device.

No shape is derived by hand: `model_shapes(config_dict)` builds the model class transformers maps
the config to (`AutoModelForCausalLM.from_config` under `torch.device("meta")`, which allocates
nothing) and walks its real modules. `describe_model` does the same walk over any model, meta or
loaded, so the planner, the pre-flight checks and the quantization itself see the same weights:

- `nn.Linear` (and subclasses), GPT-2's `Conv1D` (stored input x output), and mixture-of-experts
  weights, both per-expert `nn.Linear` lists and fused 3-D expert parameters
  (num_experts x out x in, or x in x out where the experts module says `is_transposed`);
- tied parameters once (transformers' own `all_tied_weights_keys`), buffers, biases, norms;
- what transformers keeps in fp32 when the model is loaded in 16 bits (`_keep_in_fp32_modules`,
  `_keep_in_fp32_modules_strict`), and its default list of modules a quantizer leaves alone
  (`get_keys_to_not_convert`: the output head, tied weights, the last module).

`forward_memory` traces one forward of the meta model (transformers' own code, nothing computed)
to read the KV cache it keeps and the activation peak it reaches.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from quantlib.errors import QuantlibError


class ArchitectureError(QuantlibError, ValueError):
    """The config.json does not describe a model transformers can build here."""


#: Why a parameter that is not a matmul weight exists, by role (shown in the planner).
ROLE_LABELS = {
    "layer": "linear layers",
    "expert": "expert layers",
    "router": "MoE routers / gates (plain parameters, not nn.Linear: no method's layer replacement takes them)",
    "head": "output head",
    "embedding": "embeddings",
    "norm": "norms",
    "bias": "biases",
    "other": "other parameters",
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
#: Config keys that only describe how a checkpoint was saved; they do not change the model built.
TRACE_SECONDS_LIMIT = 20.0  # refuse traces projected to take longer (token-looping layers)
_BUILD_IGNORED_KEYS = ("quantization_config", "auto_map", "_name_or_path", "transformers_version")


@dataclass(frozen=True)
class WeightShape:
    """One parameter of the model, as the module that owns it holds it."""

    name: str  # parameter name, e.g. model.layers.0.mlp.experts.down_proj
    module: str  # owning module, e.g. model.layers.0.mlp.experts
    module_class: str
    kind: str  # "linear" | "conv1d" | "experts" (3-D fused) | "param" (anything else)
    role: str  # a key of ROLE_LABELS
    shape: tuple[int, ...]
    element_size: int = 4  # bytes per element as built (non-float parameters keep theirs)
    floating: bool = True
    exact_linear: bool = False  # type(module) is nn.Linear (what bitsandbytes' replacement takes)
    transposed: bool = False  # stored (in, out): Conv1D, or experts with is_transposed
    fp32_in: tuple[str, ...] = ()  # 16-bit dtypes under which transformers keeps it in fp32

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_matmul(self) -> bool:
        return self.kind in ("linear", "conv1d", "experts")

    @property
    def n_matrices(self) -> int:
        return self.shape[0] if self.kind == "experts" else 1

    @property
    def out_features(self) -> int:
        s = self.shape[-2:]
        return s[1] if self.transposed else s[0]

    @property
    def in_features(self) -> int:
        s = self.shape[-2:]
        return s[0] if self.transposed else s[1]

    def bytes_in(self, dtype: str) -> int:
        """Bytes of this parameter when the model is loaded in `dtype` (transformers' fp32 rules applied)."""
        if not self.floating:
            return self.numel * self.element_size
        unit = 4 if dtype in self.fp32_in else DTYPE_BYTES[dtype]
        return self.numel * unit


@dataclass(frozen=True)
class BufferShape:
    name: str
    numel: int
    element_size: int
    floating: bool

    def bytes_in(self, dtype: str) -> int:
        """Buffers keep their own dtype (rotary inv_freq stays fp32 whatever the weights)."""
        return self.numel * self.element_size


@dataclass(frozen=True)
class ModelShapes:
    """Every parameter (tied ones once) and buffer of a model, and transformers' defaults about them."""

    model_type: str
    class_name: str
    weights: tuple[WeightShape, ...]
    buffers: tuple[BufferShape, ...]
    tied: tuple[tuple[str, str], ...] = ()  # (alias, parameter it is tied to)
    default_not_convert: tuple[str, ...] = ()  # transformers' get_keys_to_not_convert (module names)
    keep_in_fp32_modules: tuple[str, ...] = ()
    n_experts: int = 0  # experts per MoE block (0: a dense model)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_params(self) -> int:
        return sum(w.numel for w in self.weights)

    @property
    def matmul_weights(self) -> list[WeightShape]:
        return [w for w in self.weights if w.is_matmul]

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.tied)

    def buffer_bytes(self) -> int:
        return sum(b.bytes_in("float32") for b in self.buffers)

    def weight(self, name: str) -> WeightShape:
        for w in self.weights:
            if w.name == name:
                return w
        raise KeyError(name)


# ----------------------------------------------------------------------------------------
# building the meta model
# ----------------------------------------------------------------------------------------


def _model_type(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ArchitectureError("config.json has no model_type, so transformers cannot tell which model it "
                                "describes (a transformers config.json names it, e.g. \"model_type\": \"llama\")")
    return model_type


def pretrained_config(cfg: dict[str, Any], trust_remote_code: bool = False, source_dir: str | None = None) -> Any:
    """transformers' config object for a config.json dict; clear errors for unknown or remote-code models."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(cfg, dict):
        raise ArchitectureError("config.json must be a JSON object")
    model_type = _model_type(cfg)
    if model_type not in CONFIG_MAPPING:
        if cfg.get("auto_map"):
            if not trust_remote_code:
                raise ArchitectureError(
                    f"model_type {model_type!r} is defined by code in the model's repository (auto_map), not by "
                    "transformers; running it needs trust_remote_code, which is off. Turn it on only for a "
                    "repository you trust")
            if source_dir is None:
                raise ArchitectureError(f"model_type {model_type!r} needs its repository's code: give the model "
                                        "folder or hub id (not a pasted config.json) with trust_remote_code on")
            return AutoConfig.from_pretrained(source_dir, trust_remote_code=True)
        import transformers

        raise ArchitectureError(f"transformers {transformers.__version__} does not know model_type {model_type!r}, "
                                "so its shapes cannot be built (a newer transformers, or trust_remote_code for a "
                                "repository that ships its own code)")
    kwargs = {k: v for k, v in cfg.items() if k not in _BUILD_IGNORED_KEYS and k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers validates the values; name the model type
        raise ArchitectureError(f"config.json is not a valid {model_type!r} config: {exc}") from None


def _model_class(config: Any) -> type:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        pass
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map:
        return AutoModelForCausalLM  # remote code: from_config resolves it
    raise ArchitectureError(f"model_type {config.model_type!r} has no causal language model class in transformers "
                            "(MODEL_FOR_CAUSAL_LM_MAPPING); the explorer plans and runs causal LMs only")


def build_meta_model(cfg: dict[str, Any], dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                     source_dir: str | None = None, **from_config_kwargs: Any) -> torch.nn.Module:
    """The model transformers builds for this config.json, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    config = pretrained_config(cfg, trust_remote_code, source_dir)
    cls = _model_class(config)
    try:
        with torch.device("meta"):
            if cls is AutoModelForCausalLM:
                model = cls.from_config(config, dtype=dtype, trust_remote_code=True, **from_config_kwargs)
            else:
                model = cls._from_config(config, dtype=dtype, **from_config_kwargs)
    except ArchitectureError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config transformers refuses to build
        raise ArchitectureError(f"transformers could not build model_type {config.model_type!r} "
                                f"({cls.__name__}) from this config: {type(exc).__name__}: {exc}") from None
    try:
        model.tie_weights()
    except Exception:  # noqa: BLE001 - models without tying logic; all_tied_weights_keys still says
        pass
    return model


# ----------------------------------------------------------------------------------------
# walking a model
# ----------------------------------------------------------------------------------------


def _is_conv1d(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _fp32_rules(model: torch.nn.Module) -> dict[str, Any]:
    """16-bit dtype -> compiled pattern of the parameters transformers keeps in fp32 under it."""
    from transformers.core_model_loading import build_glob_alternation

    rules = {}
    getter = getattr(model, "_get_dtype_plan", None)
    if getter is None:
        return rules
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        plan = getter(dtype)
        if plan:
            rules[name] = build_glob_alternation(list(plan))[0]
    return rules


def _moe_blocks(model: torch.nn.Module) -> tuple[set[str], int]:
    """Names of modules holding experts (a child `experts`, fused or a list), and experts per block."""
    blocks: set[str] = set()
    n_experts = 0
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        fused = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
        if fused:
            n = fused[0].shape[0]
        elif isinstance(experts, torch.nn.ModuleList):
            n = len(experts)
        else:
            continue
        blocks.add(name)
        n_experts = max(n_experts, int(n))
    return blocks, n_experts


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def describe_model(model: torch.nn.Module) -> ModelShapes:
    """Every parameter (tied ones once) and buffer of a model, classified the way quantizers see them."""
    from transformers.quantizers.base import get_keys_to_not_convert

    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n for n, m in modules.items() if head is not None and m is head}
    fp32 = _fp32_rules(model)
    moe_blocks, n_experts = _moe_blocks(model)
    weights = []
    for pname, param in model.named_parameters():  # tied parameters appear once
        mname, _, leaf = pname.rpartition(".")
        module = modules[mname]
        shape = tuple(int(d) for d in param.shape)
        kind, role, transposed = "param", "other", False
        in_experts = any(mname == f"{b}.experts" or mname.startswith(f"{b}.experts.") for b in moe_blocks)
        if param.dim() == 3 and in_experts:
            kind, role, transposed = "experts", "expert", bool(getattr(module, "is_transposed", False))
        elif leaf == "weight" and param.dim() == 2 and (isinstance(module, torch.nn.Linear) or _is_conv1d(module)):
            kind = "conv1d" if _is_conv1d(module) else "linear"
            transposed = kind == "conv1d"
            if mname in head_names:
                role = "head"
            elif in_experts:
                role = "expert"
            elif _parent(mname) in moe_blocks:
                role = "router"  # a direct linear child of an MoE block: the router / shared-expert gate
            else:
                role = "layer"
        elif param.dim() == 2 and _parent(mname) in moe_blocks and mname.rpartition(".")[2] != "experts":
            role = "router"  # routers that hold a bare weight (e.g. MixtralTopKRouter)
        elif isinstance(module, torch.nn.Embedding) or "embed" in type(module).__name__.lower():
            role = "embedding"
        elif "norm" in type(module).__name__.lower() or "norm" in mname.rpartition(".")[2].lower():
            role = "norm"
        elif leaf == "bias":
            role = "bias"
        fp32_in = tuple(d for d, rx in fp32.items() if rx.search(pname))
        weights.append(WeightShape(
            name=pname, module=mname, module_class=type(module).__name__, kind=kind, role=role, shape=shape,
            element_size=param.element_size(), floating=param.is_floating_point(),
            exact_linear=type(module) is torch.nn.Linear, transposed=transposed, fp32_in=fp32_in))
    seen = {id(p) for p in model.parameters()}
    buffers = []
    for bname, buf in model.named_buffers():
        if id(buf) in seen:
            continue
        seen.add(id(buf))
        buffers.append(BufferShape(bname, buf.numel(), buf.element_size(), buf.is_floating_point()))
    tied_map = getattr(model, "all_tied_weights_keys", None) or {}
    names = {w.name for w in weights}
    tied = tuple(sorted((a, t) for a, t in tied_map.items() if a not in names or t not in names))
    try:
        default_skip = tuple(sorted(get_keys_to_not_convert(model)))
    except Exception:  # noqa: BLE001 - a model transformers' helper cannot walk: fall back to the head
        default_skip = tuple(sorted(head_names))
    keep = tuple(sorted(set(getattr(model, "_keep_in_fp32_modules", None) or ())))
    config = getattr(model, "config", None)
    return ModelShapes(
        model_type=str(getattr(config, "model_type", "") or ""), class_name=type(model).__name__,
        weights=tuple(weights), buffers=tuple(buffers), tied=tied, default_not_convert=default_skip,
        keep_in_fp32_modules=keep, n_experts=n_experts)


# ----------------------------------------------------------------------------------------
# cached entry points (a config.json is planned many times per page view)
# ----------------------------------------------------------------------------------------

_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 16


def _cached(key: tuple, build):
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = build()
    with _CACHE_LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


def _config_key(cfg: dict[str, Any]) -> str:
    try:
        return json.dumps(cfg, sort_keys=True, default=str)
    except (TypeError, ValueError):
        raise ArchitectureError("config.json must be a JSON object") from None


def model_shapes(cfg: dict[str, Any], trust_remote_code: bool = False, source_dir: str | None = None) -> ModelShapes:
    """Shapes of every weight for a config.json dict, from the meta-device model (cached per config)."""
    if not isinstance(cfg, dict):
        raise ArchitectureError("config.json must be a JSON object")
    key = ("shapes", _config_key(cfg), trust_remote_code, source_dir)

    def build() -> ModelShapes:
        shapes = describe_model(build_meta_model(cfg, torch.float32, trust_remote_code, source_dir))
        if not any(w.role in ("layer", "expert") for w in shapes.matmul_weights):
            raise ArchitectureError(f"transformers builds {shapes.class_name} from this config.json with no linear "
                                    "layer besides the output head, so there is nothing to quantize; check "
                                    "num_hidden_layers and the layer sizes")
        return shapes

    return _cached(key, build)


# ----------------------------------------------------------------------------------------
# one forward, traced on the meta device: KV cache and activation peak
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardMemory:
    """What one prefill forward of `context` tokens x `batch` holds beside the weights."""

    context: int
    batch: int
    dtype: str  # activation (compute) dtype
    kv_bytes: int  # attention key/value cache after the forward, in the compute dtype
    state_bytes: int  # fixed-size recurrent/convolution states (state-space or linear-attention layers)
    activation_peak_bytes: int  # most bytes held by tensors the forward created, the caches excluded
    kv_elements: int  # elements of the key/value cache (for re-pricing in another KV dtype)
    layers_full: int = 0
    layers_sliding: int = 0
    assumptions: tuple[str, ...] = ()

    def kv_bytes_as(self, kv_dtype_bytes: float) -> float:
        return self.kv_elements * kv_dtype_bytes


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts bytes of storages created by aten ops while they are alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.size: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.size:
                    self.size[key] = storage.nbytes()
                    self.refs[key] = 0
                    self.current += self.size[key]
                    self.peak = max(self.peak, self.current)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


class _FusedAttention(torch.overrides.TorchFunctionMode):
    """Stands in for a fused SDPA kernel (flash / memory-efficient): its output only, no L x L scores.

    On the meta device torch would trace SDPA's math fallback, which materialises the score matrix
    that the fused CPU and CUDA kernels never hold.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, _, v = args[:3]
            heads = q.shape[-3]
            return torch.empty((*q.shape[:-3], heads, q.shape[-2], v.shape[-1]), dtype=q.dtype, device=q.device)
        return func(*args, **kwargs)


def _cache_tensors(cache: Any) -> tuple[int, int, int, int, int]:
    """(kv bytes, kv elements, state bytes, full layers, sliding layers) of a transformers cache."""
    kv_bytes = kv_elems = state = full = sliding = 0
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ArchitectureError(f"the model returned a {type(cache).__name__}, not a transformers layered cache")
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        for t in (keys, values):
            if isinstance(t, torch.Tensor) and t.numel():
                kv_bytes += t.numel() * t.element_size()
                kv_elems += t.numel()
        if isinstance(keys, torch.Tensor) and keys.numel():
            if getattr(layer, "is_sliding", False) or getattr(layer, "sliding_window", None):
                sliding += 1
            else:
                full += 1
        for name, t in vars(layer).items():
            if name not in ("keys", "values") and isinstance(t, torch.Tensor) and t.dim() >= 2:
                state += t.numel() * t.element_size()
    return kv_bytes, kv_elems, state, full, sliding


def forward_memory(cfg: dict[str, Any], context: int, batch: int = 1, dtype: str = "float16",
                   trust_remote_code: bool = False, source_dir: str | None = None) -> ForwardMemory:
    """KV cache and activation peak of one prefill of `context` tokens, traced on the meta device.

    transformers' own forward runs on meta tensors (nothing is computed or allocated), so the
    cache is exactly what its `DynamicCache` keeps for this architecture (GQA, sliding windows,
    multi-latent attention, hybrid layers), and the activation peak is the most bytes held at once
    by tensors the forward creates, with SDPA counted as a fused kernel and logits for the last
    position only (as generation's prefill). Raises `ArchitectureError` when the trace fails.
    """
    if context < 1 or batch < 1:
        raise ArchitectureError("context length and batch size must be at least 1")
    key = ("forward", _config_key(cfg), context, batch, dtype, trust_remote_code, source_dir)
    return _cached(key, lambda: _trace_forward(cfg, context, batch, dtype, trust_remote_code, source_dir))


def _trace_forward(cfg, context, batch, dtype, trust_remote_code, source_dir) -> ForwardMemory:
    try:
        return _trace_forward_in(cfg, context, batch, dtype, trust_remote_code, source_dir)
    except ArchitectureError as exc:
        # torch's grouped_mm (fused MoE experts) runs only in bf16 here: trace in bf16, price in `dtype`.
        if dtype == "bfloat16" or "BF16" not in str(exc):
            raise
    fm = _trace_forward_in(cfg, context, batch, "bfloat16", trust_remote_code, source_dir)
    scale = DTYPE_BYTES[dtype] / 2
    return ForwardMemory(context, batch, dtype, int(fm.kv_bytes * scale), int(fm.state_bytes * scale),
                         int(fm.activation_peak_bytes * scale), fm.kv_elements, fm.layers_full, fm.layers_sliding,
                         (*fm.assumptions, f"traced in bfloat16 (torch's grouped_mm for fused experts needs it) and "
                                           f"priced in {dtype} at {DTYPE_BYTES[dtype]} bytes per element"))


def _trace_forward_in(cfg, context, batch, dtype, trust_remote_code, source_dir) -> ForwardMemory:
    import time

    torch_dtype = getattr(torch, dtype)
    model = None
    last_error: Exception | None = None
    # SDPA where the model has it (as a fused kernel); grouped_mm experts as on the GPU (the eager
    # expert loop needs data-dependent indices). Models without SDPA trace with their own attention.
    for extra in ({"attn_implementation": "sdpa", "experts_implementation": "grouped_mm"},
                  {"attn_implementation": "sdpa"}, {"experts_implementation": "grouped_mm"}, {}):
        try:
            model = build_meta_model(cfg, torch_dtype, trust_remote_code, source_dir, **extra)
            break
        except ArchitectureError as exc:
            last_error = exc
    if model is None:
        raise last_error  # type: ignore[misc]
    model.eval()
    attention = str(getattr(model.config, "_attn_implementation", "") or "default")

    def run(tokens: int) -> tuple[Any, _LiveBytes]:
        ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
        tracer = _LiveBytes()
        with torch.no_grad(), _FusedAttention(), tracer:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out, tracer

    try:
        # State-space layers loop over tokens on the meta device: time two short probes first and
        # extrapolate the per-token cost (the first includes one-off warm-up, so it is not used alone).
        timings = []
        for tokens in sorted({min(context, 16), min(context, 128)}):
            started = time.perf_counter()
            out, tracer = run(tokens)
            timings.append((tokens, time.perf_counter() - started))
        if context > timings[-1][0]:
            (t0, s0), (t1, s1) = timings[0], timings[-1]
            per_token = max(0.0, (s1 - s0) / max(1, t1 - t0))
            projected = s1 + per_token * (context - t1)
            if projected > TRACE_SECONDS_LIMIT:
                raise ArchitectureError(
                    f"one forward of model_type {cfg.get('model_type')!r} over {context:,} tokens would take about "
                    f"{projected:,.0f} s to trace on the meta device (its layers loop over tokens), so its KV cache "
                    "and activations are not estimated")
            out, tracer = run(context)
    except ArchitectureError:
        raise
    except Exception as exc:  # noqa: BLE001 - some architectures need real data in their forward
        raise ArchitectureError(f"one forward of model_type {cfg.get('model_type')!r} could not be traced on the "
                                f"meta device ({type(exc).__name__}: {str(exc)[:160]}), so its KV cache and "
                                "activations are not estimated") from None
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise ArchitectureError(f"model_type {cfg.get('model_type')!r} returned no cache from its forward, so its "
                                "KV cache is not estimated")
    kv_bytes, kv_elems, state, full, sliding = _cache_tensors(cache)
    peak = max(0, tracer.peak - kv_bytes - state)
    fused = attention == "sdpa"
    assumptions = (
        f"one prefill of {context:,} tokens x batch {batch} in {dtype}, traced through transformers' own forward "
        f"on the meta device ({attention} attention)",
        "KV cache: what transformers' DynamicCache keeps after it (sliding-window layers keep only their window)",
        "activations: the most bytes held at once by tensors the forward creates, caches excluded; logits for the "
        "last position only (generation's prefill); "
        + ("SDPA counted as a fused kernel (no L x L score matrix)" if fused
           else f"{attention} attention materialises its L x L scores"),
    )
    return ForwardMemory(context, batch, dtype, kv_bytes, state, peak, kv_elems, full, sliding, assumptions)
