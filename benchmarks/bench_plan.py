"""Planning speed from config.json alone: 70B-class configs, weights and the KV/activation trace.

    python benchmarks/bench_plan.py

Each config is planned in a fresh Python process: torch and transformers' modeling stack are imported
first (timed apart: every process pays it once, the app's server at start-up), then the first plan
(which imports the family's modeling module and builds the meta-device model), a plan of another,
uncached config of the same size, and the cached one. The trace of one 8,192-token forward (KV
cache, activations) is timed separately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CONFIGS = {
    "Llama-3-70B": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "Qwen2-72B": {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568,
                  "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                  "vocab_size": 152064, "tie_word_embeddings": False},
    "Mixtral-8x22B": {"model_type": "mixtral", "hidden_size": 6144, "intermediate_size": 16384,
                      "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
                      "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32768},
}

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import transformers.modeling_utils  # torch + transformers' modeling stack, paid once per process
from quantlib.memory import plan_table
from quantlib.presets import preset
from quantlib.shapes import forward_memory
t_import = time.perf_counter() - t0
cfg = json.loads(sys.argv[1])
configs = [None, preset("nf4-dq"), preset("int8"), preset("gguf-q4_0"), preset("gptq-int4-g64")]
t = time.perf_counter(); table = plan_table(cfg, configs, "bfloat16"); first = time.perf_counter() - t
other = {**cfg, "vocab_size": cfg["vocab_size"] + 64}  # not cached: a full meta build and walk again
t = time.perf_counter(); plan_table(other, configs, "bfloat16"); uncached = time.perf_counter() - t
t = time.perf_counter(); plan_table(cfg, configs, "bfloat16"); cached = time.perf_counter() - t
t = time.perf_counter(); fm = forward_memory(cfg, 8192, 1, "bfloat16"); trace = time.perf_counter() - t
print(json.dumps({"import_s": t_import, "first_s": first, "uncached_s": uncached, "cached_s": cached,
                  "trace_8k_s": trace, "bf16_gib": float(table["total MiB"].iloc[0]) / 1024,
                  "kv_8k_gib": fm.kv_bytes / 2**30}))
"""


def main() -> None:
    print(f"load average before: {os.getloadavg()}, cpus: {os.cpu_count()}")
    for name, cfg in CONFIGS.items():
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                             check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        wall = time.perf_counter() - started
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:14s} import torch+transformers {r['import_s']:.1f} s | plan of 5 schemes: first "
              f"{r['first_s']:.2f} s (imports the family's modeling module), another config {r['uncached_s']:.2f} s, "
              f"cached {r['cached_s']:.3f} s | 8k-token forward trace {r['trace_8k_s']:.2f} s | process {wall:.1f} s"
              f" | bf16 total {r['bf16_gib']:.1f} GiB, KV@8k {r['kv_8k_gib']:.2f} GiB")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
