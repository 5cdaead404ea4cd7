"""Saved comparison runs: one JSON file per run, written atomically, shared by app and CLI.

A run holds everything needed to show it again without recomputing: the configs, the model
description, the environment (versions, backend), and the result tables. Files are written to a
temporary name in the same folder, flushed to disk and renamed over the final name, so a run killed
mid-write leaves either the old state or the complete new file, never a truncated one; readers
ignore the temporary names.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from quantlib.errors import QuantlibError

RUN_SUFFIX = ".run.json"
FORMAT_VERSION = 1


class RunStoreError(QuantlibError, ValueError):
    """A saved run is missing or unreadable; names the file."""


def runs_dir() -> Path:
    """Where runs live: `$QUANTLIB_RUNS_DIR`, else `runs/` under the quantlib cache folder."""
    env = os.environ.get("QUANTLIB_RUNS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("QUANTLIB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quantlib")
    return Path(cache) / "runs"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def environment_info() -> dict[str, Any]:
    """Versions and hardware that produced a result, stored with every run."""
    from quantlib.registry import method_libraries
    from quantlib.runtime import cpu_features

    import importlib.metadata as md

    import torch

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_features": cpu_features(),
        "versions": {p: version(p) for p in dict.fromkeys(("torch", "transformers", "accelerate",
                                                            *method_libraries()))},
    }


@dataclass
class Run:
    """A comparison run as stored: metadata plus named tables (pandas on load)."""

    run_id: str
    created: str
    model: dict[str, Any]
    configs: list[dict[str, Any]]
    settings: dict[str, Any]
    environment: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "complete"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "run_id": self.run_id,
            "created": self.created,
            "status": self.status,
            "model": self.model,
            "configs": self.configs,
            "settings": self.settings,
            "environment": self.environment,
            "tables": {name: _records(df) for name, df in self.tables.items()},
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Run":
        """The inverse of `to_dict` (tables keep NaN and infinities: the file is written with allow_nan)."""
        return cls(
            run_id=data["run_id"], created=data["created"], model=data.get("model", {}),
            configs=data.get("configs", []), settings=data.get("settings", {}),
            environment=data.get("environment", {}),
            tables={k: pd.DataFrame.from_records(v) for k, v in data.get("tables", {}).items()},
            extra=data.get("extra", {}), status=data.get("status", "complete"),
        )


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_run(run: Run, folder: Path | None = None) -> Path:
    """Store a run atomically; returns its path."""
    path = (folder or runs_dir()) / f"{run.run_id}{RUN_SUFFIX}"
    atomic_write_text(path, json.dumps(run.to_dict(), indent=1, default=str, allow_nan=True))
    return path


def load_run(run_id_or_path: str | Path, folder: Path | None = None) -> Run:
    """Read one run by id or path; `RunStoreError` names the file when it is missing or broken."""
    path = Path(run_id_or_path)
    if not path.suffix:
        path = (folder or runs_dir()) / f"{run_id_or_path}{RUN_SUFFIX}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Run.from_dict(data)
    except FileNotFoundError:
        raise RunStoreError(f"no saved run at {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise RunStoreError(f"{path} is not a readable run file ({exc})") from None


def list_runs(folder: Path | None = None) -> pd.DataFrame:
    """One row per saved run, newest first; unreadable files are listed with their error."""
    base = folder or runs_dir()
    rows = []
    for path in sorted(base.glob(f"*{RUN_SUFFIX}"), reverse=True):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            extra, settings = data.get("extra", {}), data.get("settings", {})
            status = data.get("status")
            if extra.get("partial"):
                status = (f"partial: {settings.get('n_tokens', 0):,} of {settings.get('tokens_planned', 0):,} "
                          f"tokens ({extra.get('stop_reason') or 'stopped'})")
            rows.append({"run_id": data["run_id"], "created": data["created"], "status": status,
                         "model": data.get("model", {}).get("source", ""),
                         "schemes": ", ".join(c.get("label", c.get("quant_method", "?")) for c in data.get("configs", [])),
                         "backend": data.get("settings", {}).get("backend", ""), "path": str(path)})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            rows.append({"run_id": path.name, "created": "", "status": f"unreadable: {exc}", "model": "",
                         "schemes": "", "backend": "", "path": str(path)})
    return pd.DataFrame(rows, columns=["run_id", "created", "status", "model", "schemes", "backend", "path"])


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as JSON-ready records that keep NaN and +-inf (pandas' to_json turns both into null, so a
    perplexity that overflowed would come back as "missing")."""
    def native(value: Any) -> Any:
        return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value

    return [{str(k): native(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
