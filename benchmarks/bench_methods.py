"""Benchmark: how long each method takes to quantize the default model on this machine, against GPTQ.

Measures (does not assert) the seconds each method's quantizer spends quantizing every layer of
SmolLM2-135M (the model copy excluded; HQQ through hqq's HQQLinear, RTN in torch, optimum-quanto
and torchao through their own quantize paths), next to one plain fp32 forward pass of 1,024 tokens
(the machine's speed in the same run) and GPTQ's calibration through gptqmodel at its default
128 x 512 calibration tokens (or --gptq-samples / --gptq-seq-len). Run:

    python3 benchmarks/bench_methods.py [--gptq-samples 128] [--gptq-seq-len 512] [--skip-gptq]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import psutil  # noqa: E402
import torch  # noqa: E402

from quantlib.registry import quantize_model  # noqa: E402
from quantlib.registry import get_quantizer  # noqa: E402
from quantlib.methods._gptqmodel import CalibrationSettings  # noqa: E402
from quantlib.models import load_model  # noqa: E402
from quantlib.presets import preset  # noqa: E402

SIMULATED = ("hqq-int4-g64", "rtn-int4-g64-asym", "quanto-int4", "torchao-int8", "gguf-q4_k_m", "ct-nvfp4",
             "ct-mxfp4", "ct-fp8-dynamic", "fp8-block32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gptq-samples", type=int, default=128)
    parser.add_argument("--gptq-seq-len", type=int, default=512)
    parser.add_argument("--skip-gptq", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    base = load_model("default", device="cpu")
    ids = torch.randint(0, base.model.config.vocab_size, (1, 1024))
    with torch.no_grad():
        base.model(ids)
        t0 = time.perf_counter()
        base.model(ids)
        one_pass = time.perf_counter() - t0
    results: dict[str, dict] = {"plain fp32 forward, 1024 tokens": {"seconds": one_pass}}
    print(f"load average {os.getloadavg()}; plain forward of 1024 tokens: {one_pass:.2f} s", flush=True)
    for name in SIMULATED:
        quantizer = get_quantizer(preset(name), device="cpu")
        model = copy.deepcopy(base.model)
        t0 = time.perf_counter()
        memory = quantizer.simulate(model)
        seconds = time.perf_counter() - t0
        results[name] = {"seconds": seconds, "bits_per_param": memory.quantized_bits_per_param,
                         "library": quantizer.backend.library}
        print(f"{name}: {seconds:.1f} s ({seconds / one_pass:.2f} plain forward passes), "
              f"{memory.quantized_bits_per_param:.3f} bits/param", flush=True)
        del model
    if not args.skip_gptq:
        settings = CalibrationSettings(n_samples=args.gptq_samples, seq_len=args.gptq_seq_len)
        t0 = time.perf_counter()
        qm = quantize_model(preset("gptq-int4-g64"), source="default", device="cpu", calibration=settings)
        total = time.perf_counter() - t0
        results["gptq-int4-g64"] = {"seconds": qm.calibration_seconds, "total_seconds": total,
                                    "calibration_tokens": args.gptq_samples * args.gptq_seq_len,
                                    "bits_per_param": qm.memory.quantized_bits_per_param}
        print(f"gptq-int4-g64: calibration {qm.calibration_seconds:.1f} s (total with load/save/reload {total:.1f} s)"
              f" on {args.gptq_samples} x {args.gptq_seq_len} tokens", flush=True)
        hqq = results["hqq-int4-g64"]["seconds"]
        print(f"GPTQ calibration / HQQ quantization = {qm.calibration_seconds / hqq:.1f}x")
    print(f"load average after: {os.getloadavg()}; peak RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
