"""Benchmark: baseline + NF4 + FP4 + INT8 on the default model, perplexity on 8k tokens.

Measures (does not assert) seconds per step and peak RSS of one full comparison, the way the app
and `quantlib compare` run it. Run:  python3 benchmarks/bench_compare.py [--tokens 8192] [--device auto]

Targets from issue 3 on the 2-core CPU: whole comparison under 90 s, peak RSS under 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import psutil  # noqa: E402
import torch  # noqa: E402

from quantlib.compare import CompareSettings, run_comparison  # noqa: E402
from quantlib.models import load_model  # noqa: E402
from quantlib.presets import preset  # noqa: E402
from quantlib.runs import environment_info  # noqa: E402


class PeakRss:
    """Samples this process's RSS every 50 ms (ru_maxrss cannot be reset between phases)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", nargs="+", default=["nf4", "fp4", "int8"])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    env = environment_info()
    cpu = f"CPU ({env['cpu_count']} cores, {torch.get_num_threads()} threads)"
    print(f"device: {env['gpu'] or cpu}")
    print("versions:", ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    steps: list[tuple[float, str]] = []
    t_start = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        steps.append((time.perf_counter() - t_start, message))

    with PeakRss() as rss:
        t0 = time.perf_counter()
        base = load_model("default", device="cuda" if args.device == "cuda" else "cpu")
        load_s = time.perf_counter() - t0
        settings = CompareSettings(max_tokens=args.tokens, window=args.window, device=args.device)
        t0 = time.perf_counter()
        result = run_comparison([preset(p) for p in args.presets], settings, base=base, progress=progress, save=False)
        compare_s = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

    table = result.table.copy()
    n_tokens = result.run.settings["n_tokens"]
    base_ppl = result.run.extra["baseline"]
    print(f"\nmodel load (cached safetensors): {load_s:.1f} s")
    print(f"baseline perplexity pass: {base_ppl['seconds']:.1f} s, {base_ppl['tokens_per_s']:.0f} tokens/s "
          f"on {n_tokens} tokens")
    print("per scheme: seconds = weight errors + quantization + perplexity/KL pass")
    print(table[["scheme", "backend", "bits_per_param", "memory_mib", "perplexity", "kl", "top1_agreement",
                 "seconds"]].to_string(index=False))
    print(f"\nwhole comparison: {compare_s:.1f} s (target < 90 s on the 2-core CPU)")
    print(f"peak RSS: {rss.peak / 2**30:.2f} GiB (target < 3 GB); ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if gpu_peak is not None:
        print(f"peak GPU memory allocated: {gpu_peak:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": env, "tokens": n_tokens, "load_s": load_s, "compare_s": compare_s,
            "peak_rss_gib": rss.peak / 2**30, "gpu_peak_gib": gpu_peak, "baseline": base_ppl,
            "table": json.loads(table.to_json(orient="records"))}, indent=1))


if __name__ == "__main__":
    main()
