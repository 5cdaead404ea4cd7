"""Golden per-tensor types made by llama-quantize itself: the oracle of quantlib.methods._ggml_ftypes.

What it does:
1. Writes small synthetic llama-architecture GGUF files in F32 with gguf.GGUFWriter (random small weights):
   - ``llama_h256_gqa4_untied``: hidden 256, ffn 512, 8 layers, 4 heads, 1 KV head (n_gqa 4), output.weight;
   - ``smollm2_h576_gqa3_tied``: SmolLM2's widths (hidden 576, ffn 1536, 9 heads, 3 KV heads), 8 layers, tied
     (no output.weight);
   - ``mha_h256_16l_scrambled``: hidden 256, ffn 320, 16 layers, 4 heads and 4 KV heads (n_gqa 1) of width 36
     (attn_output rows of 144: not a multiple of 32, F16), tied, a 1-D rope_freqs.weight, and the tensors written
     in a scrambled order (blocks backwards, shuffled inside), to pin llama-quantize's own visiting order;
   - two other architectures: ``qwen2_h256_gqa2_biases`` (Qwen2, q/k/v biases, GQA 2) and ``phi3_h256_fused_qkv``
     (Phi-3: attn_qkv and a fused ffn_up), written with their own architecture's keys;
   - two mixtures of experts (llama arch, 3-D ``ffn_*_exps`` tensors and a ``ffn_gate_inp`` router):
     ``moe8_h256_gqa4`` (8 experts: llama.cpp's n_expert == 8 bumps) and ``moe4_h256_tied`` (4 experts, tied).
     Their imatrix holds one row of sums and one count per expert;
   - ``falcon_h256_16l_mqa``: Falcon (its own output, ffn_down and attn_output rules), multi-query, 16 layers;
   - ``qwen2moe_h256_shexp``: Qwen2-MoE, 4 experts plus a shared expert (``ffn_*_shexp``) whose gate
     ``ffn_gate_inp_shexp`` is one row: 1-D to ggml, so llama-quantize leaves it in F32.
2. Runs ``llama-quantize [--imatrix FILE] model.gguf out.gguf FTYPE`` for every file type of FILE_TYPES, without
   and with an importance matrix (a GGUF imatrix: ``<name>.in_sum2`` and ``<name>.counts`` per weight, with the
   imatrix.datasets / chunk_count / chunk_size keys that llama-quantize requires).
3. Reads the output's tensor types and order with gguf.GGUFReader and stores, in tests/data/llamacpp_ftypes.json.gz,
   ``{"models": {model: {metadata, "tensors": [[name, ncols, n_dims], ...] in file order}},
   "types": {model: {"plain"|"imatrix": {ftype: {tensor: type} or {"error": message}}}},
   "visit_order": {model: [names in llama-quantize's output order]}}``. The GGUF files are not kept.

llama-quantize needs these metadata keys to load a llama model's hparams (found by trying):
general.architecture, llama.context_length, llama.embedding_length, llama.block_count and
llama.attention.layer_norm_rms_epsilon. attention.head_count / head_count_kv are optional for loading, but
without them n_gqa() is 0, so they are written too. No tokenizer keys are needed.

    python scripts/llamacpp_ftypes_golden.py [--bin /work/llamacpp/build/bin/llama-quantize]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "tests" / "data" / "llamacpp_ftypes.json.gz"
DEFAULT_BIN = Path("/work/llamacpp/build/bin/llama-quantize")

from quantlib.methods._ggml_ftypes import FILE_TYPES, LLAMA_CPP_COMMIT  # noqa: E402

MODELS = {
    "llama_h256_gqa4_untied": dict(hidden=256, ffn=512, n_layer=8, n_head=4, n_head_kv=1, head_dim=64,
                                   tied=False, scrambled=False, rope_freqs=False),
    "smollm2_h576_gqa3_tied": dict(hidden=576, ffn=1536, n_layer=8, n_head=9, n_head_kv=3, head_dim=64,
                                   tied=True, scrambled=False, rope_freqs=False),
    "mha_h256_16l_scrambled": dict(hidden=256, ffn=320, n_layer=16, n_head=4, n_head_kv=4, head_dim=36,
                                   tied=True, scrambled=True, rope_freqs=True),
    # two other architectures: Qwen2 (q/k/v biases, 1-D, never quantized; GQA 2) and Phi-3 (attention fused into
    # attn_qkv, which llama-quantize types by its attn_v rules; gate and up fused into one ffn_up twice as tall)
    "qwen2_h256_gqa2_biases": dict(hidden=256, ffn=768, n_layer=8, n_head=4, n_head_kv=2, head_dim=64,
                                   tied=False, scrambled=False, rope_freqs=False, arch="qwen2"),
    "phi3_h256_fused_qkv": dict(hidden=256, ffn=512, n_layer=8, n_head=4, n_head_kv=4, head_dim=64,
                                tied=False, scrambled=False, rope_freqs=False, arch="phi3"),
    # Falcon: its own rules (output Q8_0, ffn_down and attn_output); attention fused into attn_qkv, multi-query
    "falcon_h256_16l_mqa": dict(hidden=256, ffn=1024, n_layer=16, n_head=4, n_head_kv=1, head_dim=64, tied=False,
                                scrambled=False, rope_freqs=False, arch="falcon"),
    # mixtures of experts (llama arch, 3-D expert tensors and a router): 8 experts get llama.cpp's n_expert == 8
    # bumps, 4 do not; both read each ffn tensor's layer from its name
    "moe8_h256_gqa4": dict(hidden=256, ffn=512, n_layer=8, n_head=4, n_head_kv=1, head_dim=64, tied=False,
                           scrambled=False, rope_freqs=False, n_expert=8),
    "moe4_h256_tied": dict(hidden=256, ffn=256, n_layer=8, n_head=4, n_head_kv=2, head_dim=64, tied=True,
                           scrambled=False, rope_freqs=False, n_expert=4),
    # Qwen2-MoE: experts of width ffn, a shared expert (ffn_*_shexp, width 256) and its one-row gate
    # ffn_gate_inp_shexp (numpy (1, hidden): ne [hidden, 1], a 1-D tensor to ggml, so never quantized)
    "qwen2moe_h256_shexp": dict(hidden=256, ffn=128, n_layer=8, n_head=4, n_head_kv=2, head_dim=64, tied=False,
                                scrambled=False, rope_freqs=False, n_expert=4, arch="qwen2moe", shared_ffn=256),
}
VOCAB = 256


def model_tensors(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) in the order written to the file (numpy shape = ggml ne reversed)."""
    h, f, hd = spec["hidden"], spec["ffn"], spec["head_dim"]
    q, kv = spec["n_head"] * hd, spec["n_head_kv"] * hd
    blocks = []
    arch = spec.get("arch", "llama")
    for i in range(spec["n_layer"]):
        if arch == "falcon":
            blocks.append([(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_norm.bias", (h,)),
                           (f"blk.{i}.attn_qkv.weight", (q + 2 * kv, h)), (f"blk.{i}.attn_output.weight", (h, q)),
                           (f"blk.{i}.ffn_up.weight", (f, h)), (f"blk.{i}.ffn_down.weight", (h, f))])
            continue
        if arch == "phi3":
            blocks.append([(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_qkv.weight", (q + 2 * kv, h)),
                           (f"blk.{i}.attn_output.weight", (h, q)), (f"blk.{i}.ffn_norm.weight", (h,)),
                           (f"blk.{i}.ffn_up.weight", (2 * f, h)), (f"blk.{i}.ffn_down.weight", (h, f))])
            continue
        biases = ([(f"blk.{i}.attn_q.bias", (q,)), (f"blk.{i}.attn_k.bias", (kv,)), (f"blk.{i}.attn_v.bias", (kv,))]
                  if arch in ("qwen2", "qwen2moe") else [])
        fs = spec.get("shared_ffn", 0)
        shared = ([(f"blk.{i}.ffn_gate_inp_shexp.weight", (1, h)), (f"blk.{i}.ffn_gate_shexp.weight", (fs, h)),
                   (f"blk.{i}.ffn_up_shexp.weight", (fs, h)), (f"blk.{i}.ffn_down_shexp.weight", (h, fs))]
                  if fs else [])
        e = spec.get("n_expert", 1)
        if e > 1:
            blocks.append([*biases, (f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_q.weight", (q, h)),
                           (f"blk.{i}.attn_k.weight", (kv, h)), (f"blk.{i}.attn_v.weight", (kv, h)),
                           (f"blk.{i}.attn_output.weight", (h, q)), (f"blk.{i}.ffn_norm.weight", (h,)),
                           (f"blk.{i}.ffn_gate_inp.weight", (e, h)), (f"blk.{i}.ffn_gate_exps.weight", (e, f, h)),
                           (f"blk.{i}.ffn_up_exps.weight", (e, f, h)), (f"blk.{i}.ffn_down_exps.weight", (e, h, f)),
                           *shared])
            continue
        blocks.append([*biases,(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_q.weight", (q, h)),
                       (f"blk.{i}.attn_k.weight", (kv, h)), (f"blk.{i}.attn_v.weight", (kv, h)),
                       (f"blk.{i}.attn_output.weight", (h, q)), (f"blk.{i}.ffn_norm.weight", (h,)),
                       (f"blk.{i}.ffn_gate.weight", (f, h)), (f"blk.{i}.ffn_up.weight", (f, h)),
                       (f"blk.{i}.ffn_down.weight", (h, f))])
    head = [("token_embd.weight", (VOCAB, h))]
    if spec["rope_freqs"]:
        head.append(("rope_freqs.weight", (hd // 2,)))
    tail = [("output_norm.weight", (h,))] + ([] if spec["tied"] else [("output.weight", (VOCAB, h))])
    if spec["scrambled"]:
        rng = np.random.default_rng(1)
        blocks = [[b[j] for j in rng.permutation(len(b))] for b in reversed(blocks)]
        return tail + [t for b in blocks for t in b] + head[::-1]
    return head + [t for b in blocks for t in b] + tail


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims of a tensor of this numpy shape: its ne is the shape reversed, and trailing ne of 1 do not
    count (a (1, hidden) matrix is 1-D to llama-quantize)."""
    ne = shape[::-1]
    return max((i + 1 for i, n in enumerate(ne) if n > 1), default=1)


def write_model(path: Path, spec: dict, seed: int) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), spec.get("arch", "llama"))
    w.add_context_length(256)
    w.add_embedding_length(spec["hidden"])
    w.add_block_count(spec["n_layer"])
    w.add_feed_forward_length(spec["ffn"])
    w.add_head_count(spec["n_head"])
    w.add_head_count_kv(spec["n_head_kv"])
    w.add_key_length(spec["head_dim"])
    w.add_value_length(spec["head_dim"])
    w.add_rope_dimension_count(spec["head_dim"])
    if spec.get("arch") == "falcon":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    if spec.get("n_expert", 1) > 1:
        w.add_expert_count(spec["n_expert"])
        w.add_expert_used_count(2)
    if "shared_ffn" in spec:
        w.add_expert_feed_forward_length(spec["ffn"])
        w.add_expert_shared_feed_forward_length(spec["shared_ffn"])
    w.add_file_type(0)  # LLAMA_FTYPE_ALL_F32
    rng = np.random.default_rng(seed)
    for name, shape in model_tensors(spec):
        data = np.ones(shape, np.float32) if len(shape) == 1 else rng.normal(0, 0.02, shape).astype(np.float32)
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_imatrix(path: Path, spec: dict, seed: int) -> None:
    """A GGUF imatrix (the format tools/imatrix writes): per matmul weight, ``<name>.in_sum2`` (ne = [ncols, 1])
    and ``<name>.counts`` (ne = [1, 1]); token_embd is not a matmul and has none."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 512)
    rng = np.random.default_rng(seed)
    for name, shape in model_tensors(spec):
        if len(shape) < 2 or name == "token_embd.weight" or "_norm" in name or "ffn_gate_inp" in name:
            continue
        rows = shape[0] if len(shape) == 3 else 1  # an expert tensor: one row of sums and one count per expert
        w.add_tensor(f"{name}.in_sum2", (rng.gamma(2.0, 1.0, (rows, shape[-1])) * 2048).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.full((rows, 1), 2048, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(binary: Path, src: Path, dst: Path, ftype: str, imatrix: Path | None) -> dict:
    import gguf

    cmd = [str(binary)] + (["--imatrix", str(imatrix)] if imatrix else []) + [str(src), str(dst), ftype]
    env = dict(os.environ, LD_LIBRARY_PATH=f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        lines = [ln.strip() for ln in text.splitlines() if "failed to quantize:" in ln]
        if not lines:
            raise RuntimeError(f"{' '.join(cmd)} failed without a message:\n{text[-3000:]}")
        return {"error": lines[0].split("failed to quantize:", 1)[1].strip()}
    reader = gguf.GGUFReader(str(dst))
    result = {t.name: t.tensor_type.name for t in reader.tensors}
    dst.unlink()
    return result


def llama_quantize_version(binary: Path) -> str:
    """The "version: ... (build N, commit X)" line llama-quantize prints first (there is no --version)."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent))
    proc = subprocess.run([str(binary), "/nonexistent.gguf", "/nonexistent-out.gguf", "Q8_0"], capture_output=True,
                          text=True, env=env)
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.lower().startswith("version")]
    return lines[0] if lines else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, default=DEFAULT_BIN, help="llama-quantize (libs in its folder)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    golden = {"llama_cpp_commit": LLAMA_CPP_COMMIT, "llama_quantize": llama_quantize_version(args.bin),
              "models": {}, "types": {}, "visit_order": {}}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (model, spec) in enumerate(MODELS.items()):
            src, imat = Path(tmp) / f"{model}.gguf", Path(tmp) / f"{model}.imatrix.gguf"
            write_model(src, spec, seed)
            write_imatrix(imat, spec, seed + 100)
            tensors = [[name, shape[-1], ggml_n_dims(shape)] for name, shape in model_tensors(spec)]
            golden["models"][model] = {**spec, "n_gqa": spec["n_head"] // spec["n_head_kv"], "vocab": VOCAB,
                                       "arch": spec.get("arch", "llama"), "tensors": tensors}
            golden["types"][model] = {"plain": {}, "imatrix": {}}
            for ftype in FILE_TYPES:
                for kind, imatrix in (("plain", None), ("imatrix", imat)):
                    types = quantize(args.bin, src, Path(tmp) / "out.gguf", ftype, imatrix)
                    if "error" not in types:
                        # llama-quantize writes the tensors in the order it visits them
                        golden["visit_order"].setdefault(model, list(types))
                        assert golden["visit_order"][model] == list(types)
                        types = {n: t for n, t in types.items() if t != "F32"}  # F32: left unquantized
                    golden["types"][model][kind][ftype] = types
                    status = types.get("error", f"{len(types)} tensors")
                    print(f"{model:26s} {kind:7s} {ftype:7s} {status}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(golden, separators=(",", ":"), sort_keys=False)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(gzip.compress((text + "\n").encode(), mtime=0))
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(text) // 1024} KiB) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
