"""The baseline computed once: its final hidden states, cached on disk.

Every comparison needs the baseline's next-token distribution at every scored position. Its
forward pass costs as much as a quantized model's; what the output head turns into logits is small:
``n_tokens x hidden`` floats after the final norm (19 MB for 8k tokens of SmolLM2-135M in fp32).
We keep exactly the tensor the output head receives (captured with a forward pre-hook), so a later
comparison recomputes the baseline's log-probs with one output-head matmul, bit for bit what the
forward pass would give. A model that post-processes its head's output (logit soft-capping,
scaling) fails that equality on the first window and is never cached; the run says why.

Key
    The model fingerprint (config and every weight, hashed), the tokens, window, stride, BOS,
    batch size, dtype and backend: any change gives another entry. Entries keep a prefix of the
    windows, so a run stopped early (a settled ranking) still saves what it computed and the next
    run computes only the rest.

Safety
    Files are written to a temporary name in the cache folder and renamed into place (atomic on
    POSIX), so two sessions writing the same entry leave one complete file and a reader never sees
    half of one. A file removed by another session's eviction between listing and reading is a miss.
    The folder is bounded (``QUANTLIB_BASELINE_CACHE_MB``, default 512 MiB): oldest-used entries
    are evicted after each write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MAX_MB = 512
_FINGERPRINT_ATTR = "_quantlib_fingerprint"


def cache_folder() -> Path:
    from quantlib.models import cache_dir

    return cache_dir() / "baseline-states"


def max_bytes() -> int:
    try:
        return int(float(os.environ.get("QUANTLIB_BASELINE_CACHE_MB", DEFAULT_MAX_MB)) * 2**20)
    except ValueError:
        return DEFAULT_MAX_MB * 2**20


@torch.no_grad()
def model_fingerprint(model: Any) -> str:
    """blake2b of the model's config and every parameter and buffer (names, dtypes, shapes, bytes).

    Computed once per model object (about 1 s per GB) and remembered on it; quantlib never modifies
    a baseline in place.
    """
    known = getattr(model, _FINGERPRINT_ATTR, None)
    if known:
        return known
    h = hashlib.blake2b(digest_size=20)
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in list(model.state_dict(keep_vars=False).items()):
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    digest = h.hexdigest()
    try:
        setattr(model, _FINGERPRINT_ATTR, digest)
    except Exception:  # noqa: BLE001 - a module that refuses attributes just hashes again next time
        pass
    return digest


def entry_key(fingerprint: str, ids: torch.Tensor, *, window: int, stride: int, bos: int, batch_size: int,
              dtype: str, backend: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"model": fingerprint, "window": window, "stride": stride, "bos": bos,
                         "batch": batch_size, "dtype": dtype, "backend": backend}, sort_keys=True).encode())
    h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CachedStates:
    """Hidden states of the first `windows` windows' scored positions, concatenated in text order."""

    key: str
    hidden: torch.Tensor
    windows: int
    path: Path


def load(key: str) -> CachedStates | None:
    """The entry for key, or None (missing, unreadable, or removed by another session meanwhile)."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    from safetensors import SafetensorError

    path = cache_folder() / f"{key}.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        hidden = load_file(str(path))["hidden"]
        os.utime(path)  # recently used: evicted last
    except FileNotFoundError:
        return None
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
        # A damaged entry (a disk full mid-write elsewhere, a stray file) is a miss, and is removed so
        # the next save replaces it.
        try:
            path.unlink()
        except OSError:
            pass
        return None
    if meta.get("key") != key:
        return None
    return CachedStates(key, hidden, int(meta.get("windows", 0)), path)


def save(key: str, hidden: torch.Tensor, windows: int, description: dict[str, Any] | None = None) -> Path | None:
    """Write the entry atomically (temporary file + rename), then evict the oldest beyond the bound.

    An entry larger than the whole bound is not written (None)."""
    from safetensors.torch import save_file

    hidden = hidden.detach().cpu().contiguous()
    limit = max_bytes()
    if hidden.numel() * hidden.element_size() > limit:
        return None
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        meta = {"key": key, "windows": str(windows), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "description": json.dumps(description or {}, default=str)}
        save_file({"hidden": hidden}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    evict(limit, keep=path)
    return path


def entries() -> list[dict[str, Any]]:
    """What the cache holds: one row per entry (newest use first)."""
    folder = cache_folder()
    rows = []
    for path in folder.glob("*.safetensors") if folder.is_dir() else []:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        rows.append({"path": path, "bytes": st.st_size, "used": st.st_mtime})
    return sorted(rows, key=lambda r: -r["used"])


def total_bytes() -> int:
    return sum(r["bytes"] for r in entries())


def evict(limit: int | None = None, keep: Path | None = None) -> int:
    """Remove least recently used entries until the folder holds at most `limit` bytes; returns how
    many were removed. Stale temporary files older than an hour go too."""
    limit = max_bytes() if limit is None else limit
    removed = 0
    folder = cache_folder()
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
            except FileNotFoundError:
                pass
    rows = entries()
    total = sum(r["bytes"] for r in rows)
    for row in reversed(rows):  # oldest use first
        if total <= limit:
            break
        if keep is not None and row["path"] == keep:
            continue
        try:
            row["path"].unlink()
            removed += 1
        except FileNotFoundError:
            pass
        total -= row["bytes"]
    return removed


def clear() -> int:
    """Remove every entry; returns how many."""
    return evict(0)
