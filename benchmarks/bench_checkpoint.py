"""Benchmark: streamed checkpoint analysis against the same analysis of tensors already in memory (issue 14).

Writes a synthetic Llama checkpoint of random fp16 weights (TinyLlama's shape: hidden 2048, 22 layers,
about 1.1B parameters, 2.2 GB in 600 MB shards), then, each in its own process (peak RSS is per process):

- streamed: `quantlib.checkpoint.analyze_checkpoint` with NF4 (errors, code usage, histograms, outlier
  statistics, packed storage; every layer), reading one tensor at a time;
- in memory: every quantized tensor read into memory first (not timed), then the same per-layer analysis
  (`quantlib.checkpoint.layer_row`) timed over them.

Throughput is GB of stored weights analyzed per second. Run:

    python3 benchmarks/bench_checkpoint.py [--method nf4] [--keep DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

STREAMED = """
import json, sys, time
from quantlib.runtime import vm_hwm
from quantlib.checkpoint import analyze_checkpoint
from quantlib.presets import preset
folder, method = sys.argv[1], sys.argv[2]
r = analyze_checkpoint(folder, preset(method))
print(json.dumps({"seconds": r.seconds, "bytes": r.bytes_read, "layers": len(r.layers), "problems": r.problems,
                  "peak_rss": vm_hwm()}))
"""

IN_MEMORY = """
import json, sys, time
from quantlib.runtime import vm_hwm
from safetensors.torch import load_file
from quantlib.checkpoint import _items, checkpoint_files, layer_row
from quantlib.registry import get_quantizer
from quantlib.models import read_model_config
from quantlib.presets import preset
from quantlib.shapes import model_shapes
folder, method = sys.argv[1], sys.argv[2]
config = preset(method)
items = _items(config, model_shapes(read_model_config(folder)))
files = checkpoint_files(folder)
tensors = {}
for path in sorted(set(files.values())):
    tensors.update(load_file(str(path)))
quantizer = get_quantizer(config, device="cpu")
wanted = [(i.name, tensors[i.tensor]) for i in items]
nbytes = sum(t.numel() * t.element_size() for _, t in wanted)
started = time.perf_counter()
for name, w in wanted:
    layer_row(quantizer, name, w.contiguous())
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "bytes": nbytes, "layers": len(wanted),
                  "peak_rss": vm_hwm()}))
"""


def run(script: str, folder: Path, method: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, str(folder), method], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from tests.test_checkpoint_stream import write_synthetic_checkpoint

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="nf4", help="a preset name (default nf4)")
    parser.add_argument("--keep", help="write the checkpoint here and keep it (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        params = write_synthetic_checkpoint(folder, hidden=2048, intermediate=5632, layers=22, vocab=32000)
        on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"load average {os.getloadavg()}; wrote {params / 1e9:.3f}B parameters, {on_disk / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        streamed = run(STREAMED, folder, args.method)
        memory = run(IN_MEMORY, folder, args.method)
    results = {"params": params, "bytes_on_disk": on_disk, "method": args.method, "streamed": streamed,
               "in_memory": memory, "load_average": os.getloadavg()}
    for name, r in (("streamed", streamed), ("in memory", memory)):
        r["gb_per_s"] = r["bytes"] / 1e9 / r["seconds"]
        print(f"{name:>9}: {r['layers']} layers, {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.1f} s = "
              f"{r['gb_per_s']:.3f} GB/s; peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    results["ratio"] = streamed["gb_per_s"] / memory["gb_per_s"]
    print(f"streamed / in-memory throughput: {results['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
