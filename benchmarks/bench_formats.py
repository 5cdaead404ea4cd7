"""The 2026 GPU formats against the 8- and 4-bit methods people weigh them against, on the default model: KL ± SE
(paired with the baseline, per token), weights only beside weights + activations where a format quantizes both.

    python benchmarks/bench_formats.py [--tokens 4096] [--out /tmp/bench_formats]

Runs `quantlib compare` once over every config below (one baseline, the same tokens for all) and prints a
Markdown table for benchmarks/RESULTS.md. compressed-tensors' formats run through compressed-tensors itself
(`quantlib/methods/_ct_formats.py`); their activation quantization is its forward pass, with NVFP4's and FP8's
static input scales measured on the built-in calibration text.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ct(scheme: str, activations: bool = True) -> dict:
    return {"quant_method": "compressed-tensors", "scheme": scheme, **({} if activations else {"activations": False})}


#: (group, config) in table order: 8-bit, then 4-bit.
CONFIGS = [
    # FP8_BLOCK's activations come in groups of 128, which the default model's 576-wide layers do not divide into
    # (refused): its weights alone
    ("8-bit", _ct("FP8_BLOCK", False)),
    ("8-bit", _ct("FP8_DYNAMIC", False)), ("8-bit", _ct("FP8_DYNAMIC")),
    ("8-bit", _ct("MXFP8", False)), ("8-bit", _ct("MXFP8")),
    ("8-bit", _ct("W8A8", False)), ("8-bit", _ct("W8A8")),
    ("8-bit", {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0}),
    ("8-bit", {"quant_method": "torchao", "ao_config": "Int8WeightOnlyConfig"}),
    ("4-bit", _ct("NVFP4", False)), ("4-bit", _ct("NVFP4")),
    ("4-bit", _ct("MXFP4", False)), ("4-bit", _ct("MXFP4")),
    ("4-bit", {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    ("4-bit", {"quant_method": "hqq", "nbits": 4, "group_size": 64}),
    ("4-bit", {"quant_method": "gguf", "quant_type": "Q4_0", "activations": False}),
    ("4-bit", {"quant_method": "gguf", "quant_type": "Q4_0"}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_formats_"))
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "quantlib", "compare", "--tokens", str(args.tokens), "--out", str(out), "--quiet"]
    for i, (_, config) in enumerate(CONFIGS):
        path = out / f"config_{i:02d}.json"
        path.write_text(json.dumps(config))
        command += ["--config", str(path)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return done.returncode
    seconds = time.perf_counter() - started
    rows = list(csv.DictReader(open(out / "summary.csv")))
    print(f"<!-- {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {args.tokens} tokens, "
          f"{seconds:.0f} s; `python benchmarks/bench_formats.py --tokens {args.tokens}` -->")
    print("| scheme | bits/param | KL ± SE | top-1 agreement | ln PPL ratio |")
    print("|---|---|---|---|---|")
    for row in rows[1:]:
        kl = f"{float(row['kl']):.4f} ± {float(row['kl_se']):.4f}"
        print(f"| {row['scheme']} | {float(row['bits_per_param']):.2f} | {kl} | {float(row['top1_agreement']):.4f} | "
              f"{float(row['ln_ppl_ratio']):.4f} |")
    print(done.stdout.splitlines()[0] if done.stdout else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
