"""Benchmark (issue 11): baseline + NF4 + FP4 + INT8 on the default model, 8,192 tokens, against the floor.

Every phase runs in its own process (so each peak RSS is its own) and is printed as a multiple of ONE
PLAIN PASS: a transformers fp32 forward of the default model over the same windows, timed in the same
run (the machine's speed drifts; ratios within one run do not). The fp32 GEMM peak is measured too.

Phases
  gemm     fp32 GEMM GFLOP/s on this machine (2048^3, best of 5)
  plain    one plain forward pass over the tokens (window by window, full logits; the faster of two)
  cold     the comparison as a user runs it (the default --kernels auto: 4-bit on bitsandbytes' CPU kernels,
           LLM.int8() through its exact simulation), with an empty baseline cache
  cached   the same comparison again: the baseline comes from its cached final hidden states
  settled  the same with --until-settled (cached baseline): when does the ranking settle, is it the same
  exact    the same with --kernels exact (cached baseline): bitsandbytes' layers swapped for their exact
           simulation, each cross-checked against the kernels on its first tokens; its figures against `kernels`
           show how close the simulation is over all the tokens
  kernels  --kernels library (cached baseline): every scheme on bitsandbytes' kernels

On CUDA (--device cuda) the plain pass and the comparisons run on the GPU (bitsandbytes' CUDA kernels; the exact
simulation is CPU-only, so `exact` refuses there), timings synchronise the device, `gemm` is the GPU's fp32 GEMM
(TF32 off) and each phase also reports its peak GPU memory.

Run:  python3 benchmarks/bench_compare.py [--tokens 8192] [--window 1024] [--device cpu|cuda|auto] [--phases ...]
                                          [--json out.json]
Each comparison also prints its seconds by phase (the run's `phase_seconds`: load, quantize, crosscheck, errors,
forwards, output_head, bookkeeping, total; on CUDA each boundary drains the device queue) and issue 29's ratio,
(total - load) / forwards, whose GPU target is at most 2.

Measures, never asserts; figures go to benchmarks/RESULTS.md by hand with the load average printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PRESETS = ["nf4", "fp4", "int8"]


class PeakRss:
    """Samples this process's RSS every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def phase_gemm(args) -> dict:
    import torch

    n = 2048 if args.device == "cpu" else 8192
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 peak on the GPU, as the evaluation runs
    a, b = torch.randn(n, n, device=args.device), torch.randn(n, n, device=args.device)
    torch.mm(a, b)
    _sync(args.device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(args.device)
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * n ** 3 / best / 1e9, "threads": torch.get_num_threads(), "device": args.device}


def _ids(model_tokenizer, tokens):
    from quantlib.corpus import builtin_text
    from quantlib.evaluation import tokenize_for_eval

    return tokenize_for_eval(model_tokenizer, builtin_text("eval"), tokens)


def phase_plain(args) -> dict:
    import torch

    from quantlib.evaluation import plan_windows
    from quantlib.models import load_model

    base = load_model("default", device=args.device)
    ids = _ids(base.tokenizer, args.tokens).to(args.device)
    bos = base.model.config.bos_token_id
    windows = plan_windows(len(ids), args.window)
    n_params = sum(p.numel() for p in base.model.parameters())
    with torch.inference_mode():
        bos_t = torch.tensor([bos], device=args.device)
        x = torch.cat([bos_t, ids[:63]]).unsqueeze(0)
        base.model(input_ids=x)  # warm-up
        _sync(args.device)
        passes = []
        for _ in range(2):  # the faster of two passes: the floor, and the larger (conservative) ratios
            t0 = time.perf_counter()
            for w in windows:
                x = torch.cat([bos_t, ids[w.start:w.end - 1]]).unsqueeze(0)
                base.model(input_ids=x).logits.float()
            _sync(args.device)
            passes.append(time.perf_counter() - t0)
        seconds = min(passes)
    return {"seconds": seconds, "passes_seconds": passes, "tokens": int(len(ids)), "windows": len(windows),
            "n_params": n_params, "gflops": 2 * n_params * len(ids) / seconds / 1e9}


def _compare(args, **settings) -> dict:
    from quantlib.compare import CompareSettings, run_comparison
    from quantlib.presets import preset

    started = time.perf_counter()
    updates = []
    result = run_comparison([preset(p) for p in PRESETS],
                            CompareSettings(max_tokens=args.tokens, window=args.window, device=args.device,
                                            **settings), save=False,
                            on_update=lambda r: updates.append((time.perf_counter() - started,
                                                                r.run.settings["n_tokens"],
                                                                bool(r.run.extra["ranking_settled"]))))
    seconds = time.perf_counter() - started
    table = result.table
    details = result.run.extra["details"]
    baseline_eval = float(table["seconds"].iloc[0])
    quantize = {k: v["quantize_seconds"] for k, v in details.items()}
    evaluate = {k: v["kl"]["seconds"] for k, v in details.items()}
    return {"seconds": seconds, "baseline_eval_seconds": baseline_eval, "quantize_seconds": quantize,
            "evaluate_seconds": evaluate,
            "other_seconds": seconds - baseline_eval - sum(quantize.values()) - sum(evaluate.values()),
            "n_tokens": int(result.run.settings["n_tokens"]), "partial": bool(result.run.extra["partial"]),
            "stop_reason": result.run.extra["stop_reason"], "phases": result.run.extra["phase_seconds"],
            "ranking": result.run.tables["ranking"].to_dict("records"),
            "ranking_settled": bool(result.run.extra["ranking_settled"]),
            "baseline_source": result.run.extra.get("baseline_source"),
            "crosscheck": {k: v.get("crosscheck") for k, v in details.items()},
            "table": table[["scheme", "backend", "bits_per_param", "memory_mib", "n_tokens", "perplexity",
                            "perplexity_se", "kl", "kl_se", "top1_agreement", "top1_se", "seconds"]].to_dict("records"),
            "updates": updates}


def phase_cold(args) -> dict:
    from quantlib import baseline_cache

    baseline_cache.clear()
    return _compare(args)


def phase_cached(args) -> dict:
    return _compare(args)


def phase_settled(args) -> dict:
    return _compare(args, until_settled=True)


def phase_exact(args) -> dict:
    return _compare(args, kernels="exact")


def phase_kernels(args) -> dict:
    return _compare(args, kernels="library")


PHASES = {"gemm": phase_gemm, "plain": phase_plain, "cold": phase_cold, "cached": phase_cached,
          "settled": phase_settled, "exact": phase_exact, "kernels": phase_kernels}


def run_child(args) -> None:
    import torch

    with PeakRss() as rss:
        out = PHASES[args.child](args)
    out["peak_rss_gib"] = rss.peak / 2**30
    if args.device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name(0)
    print("RESULT " + json.dumps(out, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where the plain pass and the comparisons run (auto: CUDA when visible)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--json", metavar="FILE", help="also write every phase's figures here")
    parser.add_argument("--child", choices=list(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here; use --device cpu (or auto)")
    if args.child:
        run_child(args)
        return
    results = {}
    print(f"load average at start: {os.getloadavg()}; device {args.device}", flush=True)
    for name in args.phases:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--tokens", str(args.tokens),
                               "--window", str(args.window), "--device", args.device], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:  # say why, and go on with the next phase
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            print(f"phase {name} failed", flush=True)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        results[name]["process_seconds"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps(results[name], default=str)[:600]}", flush=True)
    print(f"load average at end: {os.getloadavg()}")
    plain = results.get("plain", {}).get("seconds")
    if plain:
        print(f"\none plain pass: {plain:.1f} s over {results['plain']['tokens']} tokens "
              f"({results['plain']['gflops']:.1f} GFLOP/s"
              + (f" of a {results['gemm']['gflops']:.1f} GFLOP/s GEMM peak" if "gemm" in results else "") + ")")
        for name in ("cold", "cached", "settled", "exact", "kernels"):
            r = results.get(name)
            if not r:
                continue
            print(f"{name:8s} {r['seconds']:7.1f} s = {r['seconds'] / plain:5.2f} passes (process "
                  f"{r['process_seconds'] / plain:5.2f}); baseline {r['baseline_eval_seconds'] / plain:4.2f}, "
                  f"quantize+check {sum(r['quantize_seconds'].values()) / plain:4.2f}, evaluate "
                  + ", ".join(f"{k} {v / plain:4.2f}" for k, v in r["evaluate_seconds"].items())
                  + f", other {r['other_seconds'] / plain:4.2f}; peak RSS {r['peak_rss_gib']:.2f} GiB; "
                  f"{r['n_tokens']} tokens, settled={r['ranking_settled']}"
                  + (f"; peak GPU {r['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in r else ""))
            ph = r["phases"]
            print(f"         by phase (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items())
                  + f"; (total - load) / forwards = {(ph['total'] - ph['load']) / max(ph['forwards'], 1e-9):.2f}")
        kernels = "kernels" if "kernels" in results else "cached"  # `cached` runs LLM.int8() simulated (auto)
        if kernels in results and "exact" in results:  # the same tokens on the kernels and on the simulation
            kernel_rows = {row["scheme"]: row for row in results[kernels]["table"]}
            for row in results["exact"]["table"][1:]:
                k = kernel_rows.get(row["scheme"])
                if k:
                    print(f"exact vs kernels, {row['scheme']}: perplexity {row['perplexity']:.6f} vs "
                          f"{k['perplexity']:.6f}, KL {row['kl']:.6f} vs {k['kl']:.6f}, top-1 "
                          f"{row['top1_agreement']:.6f} vs {k['top1_agreement']:.6f}")
            for label, check in results["exact"]["crosscheck"].items():
                if check:
                    print(f"cross-check {label}: {check['tokens']} tokens, max |d log p| "
                          f"{check['max_abs_logprob_diff']:.3g}, top-1 agreement {check['top1_agreement']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
