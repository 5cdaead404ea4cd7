"""Benchmark (issue 27): how long GGUF Q4_K_M takes to quantize the default model (`simulate`), against one plain fp32
forward pass of 1,024 tokens in the same run: each the best of three, the two alternated (before 2026-12-05's third
round: the best of two quantizations against a single pass). Pass the checkout to time (its quantlib is imported):

    python benchmarks/bench_gguf_quantize.py /path/to/checkout

Run it on two checkouts, alternated, to compare code; the figures go to benchmarks/RESULTS.md by hand.
"""
import sys, time, copy, torch
sys.path.insert(0, sys.argv[1])
from quantlib.models import load_model
from quantlib.presets import preset
from quantlib.registry import get_quantizer
import quantlib  # noqa: E402

ROUNDS = 3
assert quantlib.__file__.startswith(sys.argv[1]), quantlib.__file__
base = load_model("default", device="cpu")
ids = torch.randint(0, base.model.config.vocab_size, (1, 1024))
q = get_quantizer(preset("gguf-q4_k_m"), device="cpu")
passes, quantizes = [], []
with torch.no_grad():
    base.model(ids)  # warm-up
    for _ in range(ROUNDS):  # alternated, so drift in the machine's speed reaches both sides
        t0 = time.perf_counter(); base.model(ids); passes.append(time.perf_counter() - t0)
        m = copy.deepcopy(base.model)
        t0 = time.perf_counter(); q.simulate(m); quantizes.append(time.perf_counter() - t0)
one, best = min(passes), min(quantizes)
print(f"{sys.argv[1]}: plain pass 1024 tokens {one:.2f} s; gguf-q4_k_m simulate {best:.2f} s = {best/one:.2f} passes "
      f"(best of {ROUNDS} each, alternated; all: passes {', '.join(f'{t:.2f}' for t in passes)}; "
      f"simulate {', '.join(f'{t:.2f}' for t in quantizes)})")
