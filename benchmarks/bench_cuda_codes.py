"""Measurement: bitsandbytes' CUDA 4-bit kernels against quantlib's reference (bit-identical to the CPU backend)
on every linear weight of the default model.

The CUDA kernels round with decision trees whose thresholds are decimal literals (csrc/kernels.cu): NF4's equal
our fp32 midpoints, FP4's are up to 14 ulp off, FP4's zero carries the other sign bit, and double quantization's
8-bit search and mean differ in detail. This prints, per format and input dtype, how many codes and how many
dequantized values differ, and by how much. Needs a CUDA GPU. Measures, never asserts.

Run:  python3 benchmarks/bench_cuda_codes.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from quantlib.methods.bitsandbytes import quantize_4bit
    from quantlib.models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU: the point is bitsandbytes' CUDA kernels")
    model = load_model("default").model
    weights = [(n, m.weight.data) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                n = codes = values = 0
                max_rel = 0.0
                err_ref = err_cuda = 0.0
                for _, w in weights:
                    w = w.to(dtype)
                    ref = quantize_4bit(w, quant_type, 64, double_quant, backend="torch")
                    cuda = quantize_4bit(w.cuda(), quant_type, 64, double_quant, backend="bitsandbytes")
                    codes += int((cuda.codes_unpacked().cpu() != ref.codes_unpacked()).sum())
                    a, b = cuda.dequantize().cpu().float(), ref.dequantize().float()
                    values += int((a != b).sum())
                    absmax = w.float().abs().max().clamp(min=1e-30)
                    max_rel = max(max_rel, float((a - b).abs().max() / absmax))
                    x = w.float()
                    err_cuda += float(((a - x) ** 2).sum())
                    err_ref += float(((b - x) ** 2).sum())
                    n += w.numel()
                row = {"dtype": str(dtype).replace("torch.", ""), "quant_type": quant_type,
                       "double_quant": double_quant, "weights": n, "codes_differ": codes,
                       "codes_differ_pct": 100 * codes / n, "values_differ": values,
                       "values_differ_pct": 100 * values / n, "max_abs_diff_over_tensor_absmax": max_rel,
                       "mse_cuda_over_mse_reference": err_cuda / err_ref}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"GPU {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
