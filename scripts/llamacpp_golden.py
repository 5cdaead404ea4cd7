"""Golden GGUF blocks made by llama.cpp itself: the oracle of quantlib's K-quant and i-quant quantizers.

What it does:
1. Takes llama.cpp's source from the llama-cpp-python sdist on the package registry (`pip download`; it holds
   llama.cpp under vendor/llama.cpp) and builds it with cmake and Ninja: ggml and the targets llama-quantize,
   llama-perplexity and llama-imatrix (about 20 minutes on 2 cores; only ggml-base is needed here).
2. Compiles a 60-line C harness against ggml that calls `ggml_quantize_chunk`, the function llama-quantize
   itself calls for every tensor, with and without an importance matrix (`quant_weights`).
3. Quantizes fixed seeded tensors of several shapes and kinds (normal, heavy-tailed, uniform, and rows of
   zeros, of tiny values and with one huge outlier) with every block type, and writes the input, the importance
   matrices and llama.cpp's bytes to tests/data/llamacpp_golden.npz (small: about 200 KB), with the llama.cpp
   version in its metadata.

CI does not build llama.cpp: the tests read the stored bytes. Run this again when llama.cpp changes:

    python scripts/llamacpp_golden.py [--work DIR] [--version 0.3.36]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "llamacpp_golden.npz"

#: Block types quantized, in llama.cpp's names. Types llama.cpp refuses without an importance matrix
#: (`ggml_quantize_requires_imatrix`) are made with one only.
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
         "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M")

HARNESS = r"""
// Quantize rows of float32 with ggml_quantize_chunk, as llama-quantize does for every tensor.
// usage: harness TYPE ROWS COLS INPUT.f32 OUTPUT.bin [IMATRIX.f32]   (prints the type's requires_imatrix)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"

static void * read_all(const char * path, size_t n) {
    FILE * f = fopen(path, "rb"); if (!f) { perror(path); exit(2); }
    void * p = malloc(n); if (fread(p, 1, n, f) != n) { fprintf(stderr, "short read %s\n", path); exit(2); }
    fclose(f); return p;
}

int main(int argc, char ** argv) {
    if (argc < 6) { fprintf(stderr, "usage: harness TYPE ROWS COLS IN OUT [IMATRIX]\n"); return 2; }
    int type = -1;
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * name = ggml_type_name((enum ggml_type) t);
        if (name && strcasecmp(name, argv[1]) == 0) { type = t; break; }
    }
    if (type < 0) { fprintf(stderr, "unknown type %s\n", argv[1]); return 2; }
    long rows = atol(argv[2]), cols = atol(argv[3]);
    float * src = read_all(argv[4], sizeof(float) * rows * cols);
    float * imatrix = argc > 6 ? read_all(argv[6], sizeof(float) * cols) : NULL;
    if (imatrix == NULL && ggml_quantize_requires_imatrix((enum ggml_type) type)) {
        printf("requires_imatrix\n"); return 3;
    }
    size_t row_size = ggml_row_size((enum ggml_type) type, cols);
    void * dst = calloc(rows, row_size);
    size_t n = ggml_quantize_chunk((enum ggml_type) type, src, dst, 0, rows, cols, imatrix);
    if (n != row_size * rows) { fprintf(stderr, "wrote %zu bytes, expected %zu\n", n, row_size * rows); return 2; }
    FILE * f = fopen(argv[5], "wb"); fwrite(dst, 1, n, f); fclose(f);
    printf("%s\n", ggml_quantize_requires_imatrix((enum ggml_type) type) ? "requires_imatrix" : "ok");
    ggml_quantize_free();
    return 0;
}
"""


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, command)), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def llama_cpp_source(work: Path, version: str) -> Path:
    """llama.cpp's source as vendored in the llama-cpp-python sdist."""
    source = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    work.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={version}", "-d", str(work)])
    with tarfile.open(work / f"llama_cpp_python-{version}.tar.gz") as archive:
        archive.extractall(work, filter="data")
    return source


def build(source: Path, build_dir: Path, jobs: int) -> Path:
    """ggml and the llama.cpp tools, Release, with Ninja (the README's procedure)."""
    library = build_dir / "bin" / "libggml-base.so"
    if not library.is_file():
        run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
        run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", "llama-quantize", "llama-perplexity",
             "llama-imatrix"])
    return library


def compile_harness(source: Path, build_dir: Path) -> Path:
    c_file, binary = build_dir / "golden_harness.c", build_dir / "golden_harness"
    c_file.write_text(HARNESS)
    lib_dir = build_dir / "bin"
    run(["gcc", "-O2", "-o", str(binary), str(c_file), f"-I{source / 'ggml' / 'include'}", f"-L{lib_dir}",
         "-lggml-base", "-lm", f"-Wl,-rpath,{lib_dir}"])
    return binary


def inputs(seed: int = 20261205) -> dict[str, np.ndarray]:
    """The tensors quantized: several shapes (widths multiple of 256, the K-quant super-block) and kinds."""
    rng = np.random.default_rng(seed)
    edge = rng.standard_normal((4, 256)).astype(np.float32)
    edge[0] = 0.0  # a row of zeros
    edge[1] *= 1e-30  # tiny values (scales near the float16 underflow)
    edge[2, 17] = 40.0  # one huge outlier
    edge[3, :128] = 0.0  # half a row of zeros
    return {
        "normal_4x256": rng.standard_normal((4, 256)).astype(np.float32),
        "heavy_2x512": (rng.standard_t(3, (2, 512)) * 0.02).astype(np.float32),
        "uniform_3x768": rng.uniform(-0.1, 0.3, (3, 768)).astype(np.float32),
        "edge_4x256": edge,
    }


def imatrices(tensors: dict[str, np.ndarray], seed: int = 7) -> dict[str, np.ndarray]:
    """An importance matrix per tensor: positive per-column weights (mean squared activations) of varied size."""
    rng = np.random.default_rng(seed)
    return {name: (rng.chisquare(2, t.shape[1]) * rng.uniform(0.1, 3.0)).astype(np.float32)
            for name, t in tensors.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("QUANTLIB_CACHE", Path.home() / ".cache"
                                                                         / "quantlib")) / "llamacpp")
    parser.add_argument("--version", default="0.3.36", help="llama-cpp-python sdist whose llama.cpp to build")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    source = llama_cpp_source(args.work, args.version)
    build_dir = args.work / "build"
    build(source, build_dir, args.jobs)
    harness = compile_harness(source, build_dir)
    scratch = build_dir / "golden"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()

    tensors, weights = inputs(), None
    weights = imatrices(tensors)
    arrays: dict[str, np.ndarray] = {}
    requires: dict[str, bool] = {}
    for name, tensor in tensors.items():
        arrays[f"input/{name}"] = tensor
        arrays[f"imatrix/{name}"] = weights[name]
        tensor.tofile(scratch / f"{name}.f32")
        weights[name].tofile(scratch / f"{name}.imatrix.f32")
        for qtype in TYPES:
            for with_imatrix in (False, True):
                out = scratch / f"{name}.{qtype}.{int(with_imatrix)}.bin"
                command = [str(harness), qtype, str(tensor.shape[0]), str(tensor.shape[1]),
                           str(scratch / f"{name}.f32"), str(out)]
                if with_imatrix:
                    command.append(str(scratch / f"{name}.imatrix.f32"))
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode == 3:  # llama.cpp refuses this type without an importance matrix
                    requires[qtype] = True
                    continue
                if done.returncode != 0:
                    raise SystemExit(f"{qtype} on {name}: {done.stderr}")
                requires.setdefault(qtype, done.stdout.strip() == "requires_imatrix")
                key = f"{qtype}{'+imatrix' if with_imatrix else ''}/{name}"
                arrays[key] = np.fromfile(out, dtype=np.uint8).reshape(tensor.shape[0], -1)
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    meta = {"llama_cpp_python": args.version, "llama_cpp_commit": commit.stdout.strip() or "unknown (sdist)",
            "function": "ggml_quantize_chunk", "requires_imatrix": requires, "types": list(TYPES),
            "script": "scripts/llamacpp_golden.py"}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {len(arrays)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
