"""Benchmark: the recommender on the default model, per method family (issue 13).

Measures (does not assert), for each family:
- the sensitivity measurement, cold (no sensitivity cache): every layer at every setting, plus the proxy check
  against end-to-end KL, in seconds and as multiples of one plain fp32 forward over the same 8 x 1024 tokens a
  comparison evaluates (measured in the same run: the machine's speed drifts);
- the optimization alone: the median seconds of `recommend` over 9 budgets across the reachable range;
- the verification: the mix at the middle between the uniform 4-bit and 8-bit sizes and the mix at the uniform
  4-bit size plus 10%, quantized and evaluated with every uniform setting of the family on --tokens tokens
  (a comparison run), judged by `quantlib.recommend.judge`.

    python3 benchmarks/bench_recommend.py [--families bitsandbytes,gguf,hqq,gptq] [--tokens 2048] [--json FILE]
                                          [--device cpu|cuda|auto]

On CUDA (issue 29) the model, the per-layer measurement and the verification run on the GPU; the target there is
a sensitivity measurement of the default model in at most 10 s.

A family that calibrates (GPTQ) calibrates every config of the verification on `rc.VERIFY_CALIB_TOKENS` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from quantlib import recommend as rc  # noqa: E402
from quantlib.compare import CompareSettings, run_comparison, unique_labels  # noqa: E402
from quantlib.memory import plan_memory  # noqa: E402
from quantlib.registry import quantizer_class  # noqa: E402
from quantlib.models import load_model  # noqa: E402
from quantlib.shapes import describe_model  # noqa: E402


def plain_pass_seconds(model: torch.nn.Module, tokens: int = 8192, window: int = 1024) -> float:
    from quantlib.runtime import device_clock

    ids = torch.randint(0, model.config.vocab_size, (1, window), device=next(model.parameters()).device)
    with torch.inference_mode():
        model(ids)
        started = device_clock()
        for _ in range(tokens // window):
            model(ids)
    return device_clock() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", default=",".join(rc.families()))
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation tokens of the verification")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where the model lives and the measurement runs (auto: CUDA when visible)")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    base = load_model("default", device=args.device)
    one_pass = plain_pass_seconds(base.model)
    print(f"load average {os.getloadavg()}; one plain fp32 pass over 8 x 1024 tokens: {one_pass:.1f} s", flush=True)
    shapes = describe_model(base.model)
    cfg = base.model.config.to_dict()
    results: dict = {"plain_pass_seconds": one_pass, "load_average": os.getloadavg(), "families": {}}
    for family in args.families.split(","):
        from quantlib.runtime import device_clock

        started = device_clock()
        sens = rc.measure_sensitivity(base, family, use_cache=False)
        measure = device_clock() - started
        spaces = rc.family_class(family).mix_spaces(shapes)
        lo, hi = rc.reachable_range(sens, spaces)
        timings = []
        for i in range(9):
            budget = lo + (hi - lo) * i / 8
            t0 = time.perf_counter()
            rc.recommend(sens, cfg, budget_gib=budget / rc.GIB, shapes=shapes)
            timings.append(time.perf_counter() - t0)
        optimize = statistics.median(timings)
        row = {"measure_seconds": measure, "measure_passes": measure / one_pass, "optimize_seconds": optimize,
               "optimize_max_seconds": max(timings), "layers": int(sens.rows["layer"].nunique()),
               "settings": int(sens.rows["choice"].nunique()) - 1,
               "spearman_fisher": sens.check.get("spearman_fisher"),
               "spearman_relative": sens.check.get("spearman_relative"), "check_pairs": len(sens.check["pairs"]),
               "reachable_gib": [lo / rc.GIB, hi / rc.GIB]}
        print(f"{family}: measure {measure:.1f} s ({measure / one_pass:.2f} passes), optimize median "
              f"{optimize * 1000:.0f} ms (max {max(timings) * 1000:.0f} ms); proxy check Spearman "
              f"{row['spearman_fisher']:.2f} (Fisher) vs {row['spearman_relative']:.2f} (relative)", flush=True)
        if not args.skip_verify:
            uniform = rc.uniform_configs(family, shapes)
            # the uniform 4-bit point (the smallest 4-bit setting) and the uniform 8-bit one
            sizes = {c.label: (quantizer_class(c).code_bits(c), plan_memory(cfg, c, "float32", shapes=shapes).total_bytes)
                     for c in uniform}
            four = min(size for bits, size in sizes.values() if bits == 4)
            eight = min(size for bits, size in sizes.values() if bits == 8)
            recs = {"middle": rc.recommend(sens, cfg, budget_gib=(four + eight) / 2 / rc.GIB, shapes=shapes),
                    "4-bit + 10%": rc.recommend(sens, cfg, budget_gib=four * 1.1 / rc.GIB, shapes=shapes)}
            configs = [r.config for r in recs.values()] + uniform
            labels = unique_labels(configs)
            with tempfile.TemporaryDirectory() as runs:
                t0 = time.perf_counter()
                # a family that calibrates calibrates every config on the same text, as `rc.verify` does
                calibration = rc.family_class(family).calibration_settings(rc.VERIFY_CALIB_TOKENS)
                result = run_comparison(configs, CompareSettings(max_tokens=args.tokens, calibration=calibration,
                                                                 device=args.device),
                                        base=base, save=False, runs_folder=runs)
                verify = time.perf_counter() - t0
            table = result.table
            row["verify_seconds"] = verify
            row["uniform"] = table[table["scheme"].isin(labels[2:])][["scheme", "memory_mib", "kl", "kl_se"]] \
                .to_dict(orient="records")
            for (name, rec), label in zip(recs.items(), labels):
                verdict = rc.judge(table[table["scheme"].isin([label, *labels[2:]])], label)
                verdict.update(predicted_kl=rec.predicted_error, label=rec.config.label,
                               planned_mib=rec.total_bytes / 2**20)
                row[name] = verdict
                print(f"  {name}: {rec.config.label} {verdict['mix_mib']:.1f} MiB, KL {verdict['mix_kl']:.4f} ± "
                      f"{verdict['mix_kl_se']:.4f} (predicted {rec.predicted_error:.4f}); beats smaller: "
                      f"{verdict['beats_smaller']}; line KL {verdict['line_kl']}, below: {verdict['below_line']}",
                      flush=True)
            for r in row["uniform"]:
                print(f"  uniform {r['scheme']}: {r['memory_mib']:.1f} MiB, KL {r['kl']:.4f} ± {r['kl_se']:.4f}")
        results["families"][family] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
