"""The importance matrix, as llama.cpp's `llama-imatrix` makes it: for every matrix a model multiplies, the mean
of the squared input activation of each input column over calibration text.

llama-imatrix runs the model over the text in chunks of `n_ctx` tokens (512 by default), the first token of each
chunk BOS, and sums `x_j^2` over every token a matrix sees (`in_sum2`) with a count; llama-quantize divides one by
the other and hands the per-column mean to the block quantizers as `quant_weights`. This does the same with the
model's own forward pass in PyTorch: the figures differ from llama.cpp's by the activations' rounding (llama.cpp
runs its own kernels), not by the recipe.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quantlib.callbacks import CancelFn, ProgressFn

#: Tokens per calibration chunk, llama-imatrix's default context.
CHUNK_TOKENS = 512


class ImportanceMatrix(dict):
    """Layer name -> the mean of x_j^2 per input column (float32), as llama-quantize computes it from an imatrix file
    (`in_sum2 / counts` in float32); `sums` (float32 in_sum2) and `counts` (tokens seen) are what the file holds, over
    `chunk_count` chunks of `chunk_size` tokens."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    chunk_count: int
    chunk_size: int


@torch.no_grad()
def importance_matrix(model: torch.nn.Module, tokenizer: Any, layer_names: list[str], n_tokens: int,
                      text: str | None = None, chunk: int = CHUNK_TOKENS, progress: ProgressFn | None = None,
                      cancel: CancelFn | None = None) -> ImportanceMatrix:
    """Per layer in `layer_names` (modules whose input is the matrix's input): the mean of x_j^2 over `n_tokens`
    tokens of `text` (default: the built-in calibration text), float32 of length in_features, computed from the
    float32 sums and the counts as llama-quantize computes it from the file `write_imatrix_gguf` writes."""
    from quantlib.methods._calibration import observe_inputs

    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        sums[name] = sums.get(name, 0) + x.square().sum(0).cpu()
        counts[name] = counts.get(name, 0) + x.shape[0]

    # llama-imatrix: every chunk starts with BOS
    n_chunks = observe_inputs(model, tokenizer, layer_names, n_tokens, record, what="importance matrix", text=text,
                              chunk=chunk, bos=bos, progress=progress, cancel=cancel)
    out = ImportanceMatrix()
    out.sums = {name: sums[name].float().numpy() for name in layer_names if name in sums}
    out.counts = {name: int(counts[name]) for name in out.sums}
    out.chunk_count, out.chunk_size = n_chunks, chunk
    for name, total in out.sums.items():
        out[name] = total / np.float32(out.counts[name])  # float32 / float32, as llama-quantize divides
    return out


@torch.no_grad()
def measure_and_write(model: torch.nn.Module, tokenizer: Any, path: Any, n_tokens: int, text: str | None = None,
                      dataset: str = "quantlib built-in calibration text", progress: ProgressFn | None = None,
                      cancel: CancelFn | None = None) -> tuple[ImportanceMatrix, int]:
    """llama-imatrix on this model in PyTorch: measure every matrix llama.cpp multiplies by (its 2-D weights that have
    a llama.cpp tensor name, embeddings and the output head's lookups aside) and write the file
    `llama-quantize --imatrix` reads. Returns the measurement and the number of matrices written."""
    from quantlib.methods._gguf_file_types import _gguf_names
    from quantlib.shapes import describe_model

    shapes = describe_model(model)
    names = _gguf_names(shapes)
    modules = dict(model.named_modules())
    by_module = {w.module: names[w.name] for w in shapes.weights if w.name in names and w.is_matmul
                 and not isinstance(modules.get(w.module), torch.nn.Embedding)}
    measured = importance_matrix(model, tokenizer, list(by_module), n_tokens, text=text, progress=progress,
                                 cancel=cancel)
    return measured, write_imatrix_gguf(path, measured, by_module, dataset)


def write_imatrix_gguf(path: Any, imatrix: ImportanceMatrix, gguf_names: dict[str, str], dataset: str) -> int:
    """Write `imatrix` as the GGUF file llama-imatrix writes and `llama-quantize --imatrix` reads: per matrix a float32
    `<tensor>.in_sum2` (in_features) and `<tensor>.counts` (1), named by llama.cpp's tensor names (`gguf_names`:
    layer name -> e.g. blk.0.ffn_down.weight), with general.type "imatrix", imatrix.datasets, imatrix.chunk_count and
    imatrix.chunk_size. Written to a temporary file and renamed. Returns the number of matrices written."""
    import os
    from pathlib import Path

    import gguf

    path = Path(path)
    missing = [name for name in imatrix.sums if name not in gguf_names]
    if missing:
        raise ValueError(f"no llama.cpp tensor name for {missing[0]} (and {len(missing) - 1} more); the imatrix file "
                         "names tensors as llama.cpp does")
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="", use_temp_file=False)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums, key=lambda n: gguf_names[n]):
        tensor = gguf_names[name]
        writer.add_tensor(f"{tensor}.in_sum2", imatrix.sums[name].astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{tensor}.counts", np.array([[imatrix.counts[name]]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return len(imatrix.sums)


class ImatrixCommand:
    """`quantlib imatrix`: llama-imatrix's measurement on a model, written as the file llama-quantize --imatrix reads."""

    name = "imatrix"
    help = "measure the importance matrix as llama-imatrix does and write the GGUF file llama-quantize --imatrix reads"

    def arguments(self, parser: Any) -> None:
        parser.add_argument("--out", required=True, metavar="FILE", help="the imatrix file to write (GGUF)")
        parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (chunks of 512, each from BOS)")
        parser.add_argument("--text", metavar="FILE", help="calibration text (default: the built-in calibration text)")

    def run(self, args: Any, context: Any) -> int:
        from pathlib import Path

        loaded = context.load()
        text = Path(args.text).read_text(encoding="utf-8") if args.text else None
        progress = None if args.quiet else _print_progress
        measured, n = measure_and_write(loaded.model, loaded.tokenizer, args.out, args.tokens, text=text,
                                        dataset=args.text or "quantlib built-in calibration text", progress=progress)
        print(f"wrote {args.out}: {n} matrices, {measured.chunk_count} chunks of {measured.chunk_size} tokens "
              f"(llama-quantize --imatrix {args.out} ...)")
        return 0


def _print_progress(fraction: float, message: str) -> None:
    import sys

    print(f"[{100 * fraction:5.1f}%] {message}", file=sys.stderr, flush=True)
