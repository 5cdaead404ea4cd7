"""Analyze a safetensors checkpoint one tensor at a time: models bigger than the machine.

Everything the weight side of the explorer shows is per layer: weight error, code usage, block-normalized
histograms, weight-outlier statistics and packed storage. `analyze_checkpoint` computes them for every layer
a config quantizes while holding one tensor (plus its quantized copy) in memory, never the model:

- the layer list comes from the model transformers builds on the meta device (`quantlib.shapes`), so a layer
  the checkpoint lacks, or stores with another shape, is reported, never skipped in silence;
- each tensor is read with `safetensors.safe_open` in its stored dtype (or cast to `dtype`), from a single
  file or a sharded `model.safetensors.index.json` (a local folder or a downloaded hub snapshot);
- each finished layer is appended to `layers.jsonl` in the output folder (flushed and synced), so an
  interrupted run keeps what it finished, and a rerun with the same checkpoint, config and dtype resumes;
- the per-layer numbers are the in-memory path's (`quantlib.layers.layer_errors`): same function, same
  tensors, so they agree to the bit on a model small enough for both (tested).

Methods whose quantization needs activations (calibrated methods) are refused with the reason.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch

from quantlib.configs import QuantConfig
from quantlib.registry import parse_config
from quantlib.errors import QuantlibError
from quantlib.callbacks import CancelFn, ProgressFn


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEADER_KIND = "quantlib-checkpoint-analysis"
#: After a tensor whose fp32 copies reach this size, freed heap pages are handed back to the OS at once.
TRIM_BYTES = 8 * 2**20


class CheckpointError(QuantlibError, ValueError):
    """A checkpoint that cannot be analyzed: no safetensors, a broken index, an unsupported method."""


# --------------------------------------------------------------------------------------------
# Where each tensor lives
# --------------------------------------------------------------------------------------------


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from `model.safetensors.index.json` when present,
    else from the headers of every `*.safetensors` file in the folder (one or several)."""
    from safetensors import safe_open

    folder = Path(folder).expanduser()
    if folder.is_file():
        files = [folder]
        folder = folder.parent
    else:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (needs a weight_map object): {exc}") from exc
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are not in {folder}: {', '.join(missing[:3])}")
            return {name: folder / f for name, f in weight_map.items()}
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file (pickle checkpoints are not streamed)")
    out: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    out[name] = path
        except Exception as exc:  # noqa: BLE001 - a damaged file is named, not a traceback
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    return out


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, in its stored dtype. The file is opened for this tensor alone and closed (unmapped)
    again, so the pages read do not stay resident."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


class ShardWriter:
    """Writes tensors into safetensors shards of about `shard_bytes` each, then the index: a checkpoint written
    tensor by tensor, never whole in memory."""

    def __init__(self, folder: str | Path, prefix: str = "model", shard_bytes: int = 512 * 2**20):
        self.folder, self.prefix, self.shard_bytes = Path(folder), prefix, shard_bytes
        self.weight_map: dict[str, str] = {}
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = self.n = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.shard[name] = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.size += nbytes
        self.total += nbytes
        if self.size >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"{self.prefix}-{self.n:05d}.safetensors"
        save_file(self.shard, str(self.folder / name), metadata={"format": "pt"})
        self.weight_map.update({k: name for k in self.shard})
        self.shard, self.size, self.n = {}, 0, self.n + 1

    def close(self, metadata: dict[str, Any] | None = None) -> int:
        """Write the last shard and `model.safetensors.index.json`; returns the bytes written."""
        if self.shard:
            self._flush()
        index = {"metadata": {"total_size": self.total, **(metadata or {})}, "weight_map": self.weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return self.total


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


@dataclass
class CheckpointAnalysis:
    """Per-layer rows (as `layer_errors` plus storage, outliers and histograms), the problems found, totals."""

    config: dict[str, Any]
    label: str
    layers: pd.DataFrame
    problems: list[dict[str, Any]]
    complete: bool
    seconds: float
    bytes_read: int
    out_dir: str | None = None
    resumed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_second(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        packed = float(self.layers["packed_bytes"].sum()) if len(self.layers) else 0.0
        return {"label": self.label, "config": self.config, "layers": int(len(self.layers)),
                "problems": self.problems, "complete": self.complete, "seconds": self.seconds,
                "bytes_read": self.bytes_read, "gb_per_second": self.gb_per_second, "packed_bytes": packed,
                "resumed_layers": self.resumed, "notes": self.notes}


@dataclass
class _Item:
    name: str  # the layer as the quantizer names it (module, or param[e] for an expert slice)
    tensor: str  # the checkpoint tensor name
    shape: tuple[int, ...]  # the expected stored shape
    transposed: bool
    expert: int | None


def _items(config: QuantConfig, shapes: Any) -> list[_Item]:
    """Every matrix `config` quantizes in the model `shapes` describes (expert slices of fused tensors apart),
    by the planner's rules."""
    from quantlib.registry import quantizer_class

    return [_Item(name, w.name, tuple(w.shape), w.transposed, e)
            for name, w, e in quantizer_class(config).quantized_matrices(config, shapes)]


def _locate(name: str, files: dict[str, Path]) -> str | None:
    """The checkpoint's name for a parameter: the same, or without / with the base model's prefix."""
    if name in files:
        return name
    head, _, rest = name.partition(".")
    if rest in files:
        return rest
    return next((k for k in files if k.endswith("." + name)), None)


def layer_row(quantizer: Any, name: str, weight: torch.Tensor, *, bins: int = 128) -> dict[str, Any]:
    """Everything measured about one layer's weight (out x in) under `quantizer`: the `layer_errors` columns,
    packed storage by component, weight-outlier statistics and the block-normalized histogram."""
    from quantlib.layers import code_usage
    from quantlib.distributions import block_normalized_histogram
    from quantlib.metrics import error_metrics
    from quantlib.outliers import weight_outlier_stats

    packed = quantizer.quantize_layer(name, weight)
    counts, entropy = code_usage(packed)
    storage = packed.storage_by_component()
    bits = packed.bits_per_param
    metrics = error_metrics(weight, packed.dequantize())
    del packed  # one copy at a time: the packed tensor, then the histogram's and statistics' temporaries
    hist = block_normalized_histogram(weight, bins=bins)
    return {"layer": name, "out_features": weight.shape[0], "in_features": weight.shape[1],
            **metrics, "bits_per_param": bits,
            "code_entropy_bits": entropy, "packed_bytes": float(sum(storage.values())),
            "storage": {k: float(v) for k, v in storage.items()},
            "code_counts": None if counts is None else [int(c) for c in counts],
            "weight_stats": weight_outlier_stats(weight),
            "histogram": {"edges": hist.edges, "counts": hist.counts, "blocksize": hist.blocksize}}


def _header(source: str, config: QuantConfig, dtype: str | None, files: dict[str, Path]) -> dict[str, Any]:
    stamp = sorted({(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files.values()})
    return {"kind": HEADER_KIND, "source": str(source), "config": config.to_dict(), "dtype": dtype or "stored",
            "files": stamp}


def _read_done(path: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run of the same analysis (same checkpoint files, config and dtype); {} otherwise.
    A torn last line (a crash mid-write) is dropped, and the file is rewritten without it."""
    from quantlib.runs import atomic_write_text

    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        if not lines or json.loads(lines[0]) != json.loads(json.dumps(header)):
            return {}
    except ValueError:
        return {}
    done, good = {}, [lines[0]]
    for line in lines[1:]:
        try:
            row = json.loads(line)
            done[row["layer"]] = row
        except (ValueError, KeyError, TypeError):
            break
        good.append(line)
    if len(good) < len(lines) or not path.read_text(encoding="utf-8").endswith("\n"):
        atomic_write_text(path, "\n".join(good) + "\n")
    return done


def _append(handle: Any, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def analyze_checkpoint(source: str | Path, config: QuantConfig | dict | str, *, out: str | Path | None = None,
                       dtype: str | None = None, bins: int = 128, trust_remote_code: bool = False,
                       progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                       on_layer: Callable[[dict[str, Any]], None] | None = None) -> CheckpointAnalysis:
    """Analyze every layer `config` quantizes in the safetensors checkpoint `source` (a folder with config.json,
    or a hub id already in the local cache), one tensor at a time. `dtype` casts each tensor (None: analyze in
    the stored dtype). With `out`, rows are appended to `out/layers.jsonl` as they finish and `summary.json` is
    written at the end; a rerun resumes. `cancel()` stops after the current tensor and returns what was done
    (`complete=False`)."""
    from quantlib.registry import get_quantizer
    from quantlib.methods.base.families import CalibratedQuantizer
    from quantlib.models import read_model_config, resolve_source_dir
    from quantlib.runs import atomic_write_text
    from quantlib.runtime import trim_heap
    from quantlib.shapes import model_shapes

    started = time.perf_counter()
    config = parse_config(config)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype: got {dtype!r}; allowed: {', '.join(DTYPES)} or None (the stored dtype)")
    quantizer = get_quantizer(config, device="cpu")
    if isinstance(quantizer, CalibratedQuantizer) or quantizer.calibrated:
        raise CheckpointError(f"{config.label}: calibration-based: it quantizes from the activations of the whole "
                              "model, which a tensor-by-tensor analysis does not have")
    if str(source) == "default":  # the default model's converted safetensors folder
        from quantlib.models import default_model_dir

        folder = Path(default_model_dir())
    else:
        folder = Path(resolve_source_dir(str(source)))
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        from huggingface_hub import snapshot_download

        try:  # a hub id: its weights must already be in the local cache (no download here)
            folder = Path(snapshot_download(str(source), local_files_only=True,
                                            allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001
            pass
    files = checkpoint_files(folder)
    shapes = model_shapes(read_model_config(str(source)), trust_remote_code,
                          str(folder) if trust_remote_code else None)
    items = _items(config, shapes)
    if not items:
        raise CheckpointError(f"{config.label} quantizes no layer of this model")

    header = _header(str(source), config, dtype, files)
    jsonl = Path(out) / "layers.jsonl" if out is not None else None
    done = _read_done(jsonl, header) if jsonl is not None else {}
    resumed = len(done)
    handle = None
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        if resumed:
            handle = open(jsonl, "a", encoding="utf-8")
        else:
            handle = open(jsonl, "w", encoding="utf-8")
            _append(handle, header)
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    bytes_read = 0
    complete = True
    cached: tuple[str, torch.Tensor] | None = None  # a fused expert tensor, read once for its slices
    try:
        for i, item in enumerate(items):
            if cancel is not None and cancel():
                complete = False
                break
            if item.name in done:
                rows.append(done[item.name])
                continue
            key = _locate(item.tensor, files)
            if key is None:
                problems.append({"layer": item.name, "tensor": item.tensor, "problem": "absent from the checkpoint"})
                continue
            if cached is not None and cached[0] == key:
                tensor = cached[1]
            else:
                cached = None
                tensor = read_tensor(files[key], key)
                bytes_read += tensor.numel() * tensor.element_size()
                if item.expert is not None:
                    cached = (key, tensor)
            if tuple(tensor.shape) != item.shape:
                problems.append({"layer": item.name, "tensor": key, "problem":
                                 f"stored shape {tuple(tensor.shape)}, the model expects {item.shape}"})
                continue
            w = tensor if item.expert is None else tensor[item.expert]
            w = (w.t() if item.transposed else w).contiguous()
            if dtype is not None:
                w = w.to(DTYPES[dtype])
            row = layer_row(quantizer, item.name, w, bins=bins)
            row["dtype"] = str(w.dtype).removeprefix("torch.")
            rows.append(row)
            big = w.numel() * 4 >= TRIM_BYTES
            del w, tensor
            if cached is None and big:
                trim_heap()  # hand the tensor's pages and its temporaries back: memory stays flat
            if handle is not None:
                _append(handle, row)
            if on_layer is not None:
                on_layer(row)
            if progress is not None:
                progress((i + 1) / len(items), f"{config.label}: {i + 1}/{len(items)} {item.name}")
    finally:
        if handle is not None:
            handle.close()
    frame = pd.DataFrame(rows)
    notes = [f"read tensor by tensor with safetensors.safe_open from {len(set(files.values()))} file(s), analyzed in "
             f"{dtype or 'the stored dtype'}"]
    if resumed:
        notes.append(f"resumed: {resumed} layer(s) read back from {jsonl}")
    result = CheckpointAnalysis(config.to_dict(), config.label, frame, problems, complete,
                                time.perf_counter() - started, bytes_read, None if out is None else str(out),
                                resumed, notes)
    if out is not None:
        atomic_write_text(Path(out) / "summary.json", json.dumps(result.summary(), indent=1))
    return result


def flat_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The per-layer table without its nested columns (histogram, storage, code counts), weight statistics
    spread into columns: what a CSV or a page table shows."""
    if frame.empty:
        return frame
    flat = frame.drop(columns=[c for c in ("histogram", "storage", "code_counts", "weight_stats") if c in frame])
    if "weight_stats" in frame:
        stats = pd.DataFrame(list(frame["weight_stats"])).add_prefix("w_")
        flat = pd.concat([flat.reset_index(drop=True), stats], axis=1)
    return flat


def iter_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a `layers.jsonl` written by `analyze_checkpoint` (the header line skipped)."""
    with open(path, encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if i and line.strip():
                yield json.loads(line)
