"""Benchmark: real GPTQ and AWQ (gptqmodel, CPU) on the default model against RTN int4 g64.

Measures (does not assert) calibration seconds, load-back seconds and peak RSS of each method
with the issue's 128 x 512 calibration tokens from the built-in "calib" split, and perplexity on
the disjoint "eval" split next to symmetric / asymmetric RTN int4 g64 and the fp32 baseline. Run:

    python3 benchmarks/bench_calibrated.py [--samples 128] [--seq-len 512] [--tokens 4096] [--methods gptq awq]

AWQ calibrates in bf16 (see quantlib.methods._gptqmodel), slow on CPUs without bf16 instructions: at
128 x 512 tokens expect hours on two cores; use e.g. --methods awq --samples 4 --seq-len 256 there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from bench_compare import PeakRss  # noqa: E402

from quantlib.registry import quantize_model  # noqa: E402
from quantlib.methods._gptqmodel import CalibrationSettings  # noqa: E402
from quantlib.corpus import builtin_text  # noqa: E402
from quantlib.evaluation import perplexity_and_kl, tokenize_for_eval  # noqa: E402
from quantlib.models import load_model  # noqa: E402
from quantlib.presets import preset  # noqa: E402
from quantlib.runs import environment_info  # noqa: E402

PRESETS = {"gptq": "gptq-int4-g64", "awq": "awq-int4-g64"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["gptq", "awq"], choices=sorted(PRESETS))
    parser.add_argument("--awq-clip-search", action="store_true", help="AWQ's clipping search (~45 s/layer on CPU)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    base = load_model("default", device="cpu")
    ids = tokenize_for_eval(base.tokenizer, builtin_text("eval"), args.tokens)
    results: dict[str, dict] = {}
    models = {}
    for method in args.methods:
        settings = CalibrationSettings(n_samples=args.samples, seq_len=args.seq_len,
                                       awq_clip_search=args.awq_clip_search)
        with PeakRss() as rss:
            t0 = time.perf_counter()
            qm = quantize_model(preset(PRESETS[method]), source="default", device="cpu", calibration=settings)
            total = time.perf_counter() - t0
        models[method] = qm.model
        results[method] = {"calibration_s": round(qm.calibration_seconds, 1), "total_s": round(total, 1),
                           "peak_rss_mib": round(rss.peak / 2**20), "memory_mib": round(qm.memory.total_bytes / 2**20, 1),
                           "bits_per_param": round(qm.memory.quantized_bits_per_param, 3),
                           "calibration_tokens": args.samples * args.seq_len}
        print(f"{method}: {results[method]}", file=sys.stderr, flush=True)
        gc.collect()
    for name in ("rtn-int4-g64", "rtn-int4-g64-asym"):
        models[name] = quantize_model(preset(name), base=base, device="cpu").model
    evaluation = perplexity_and_kl(base.model, models, ids, window=args.window)
    ppl = {name: round(evaluation.comparison[name].quant_ppl, 3) for name in models}
    ppl["baseline fp32"] = round(evaluation.base.ppl, 3)
    for method in args.methods:
        results[method]["perplexity"] = ppl[method]
    out = {"settings": vars(args), "eval_tokens": int(ids.numel()), "perplexity": ppl, "methods": results,
           "environment": environment_info()}
    print("calibration: %d x %d tokens of the built-in calib split; eval: %d tokens (window %d)"
          % (args.samples, args.seq_len, ids.numel(), args.window))
    print(f"{'scheme':<22}{'perplexity':>11}{'calib s':>9}{'total s':>9}{'peak RSS MiB':>14}{'model MiB':>11}")
    for name, value in ppl.items():
        r = results.get(name, {})
        print(f"{name:<22}{value:>11.3f}{r.get('calibration_s', 0):>9}{r.get('total_s', ''):>9}"
              f"{r.get('peak_rss_mib', ''):>14}{r.get('memory_mib', ''):>11}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
