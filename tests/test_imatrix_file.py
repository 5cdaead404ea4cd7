"""The importance matrix as the GGUF file llama-imatrix writes and `llama-quantize --imatrix` reads.

Where llama.cpp is built (scripts/llamacpp_golden.py keeps it under ~/.cache/quantlib/llamacpp, or llama-quantize is
on PATH), llama-quantize reads quantlib's file and writes the same Q4_0 bytes as quantlib's own imatrix-weighted
quantization. CI does not build llama.cpp: there that test is skipped with the reason, and the file's layout is
checked against the reader llama.cpp's own `gguf` package provides.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantlib.methods._ggml_importance import measure_and_write


def _llama_quantize() -> Path | None:
    found = shutil.which("llama-quantize")
    if found:
        return Path(found)
    built = Path.home() / ".cache/quantlib/llamacpp/build/bin/llama-quantize"
    return built if built.exists() else None


def test_the_file_holds_sums_counts_and_metadata_by_llama_cpp_names(tmp_path, tiny_llama_dir) -> None:
    import gguf

    from quantlib.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    path = tmp_path / "imatrix.gguf"
    measured, n = measure_and_write(loaded.model, loaded.tokenizer, path, 600)
    assert n == 15 and not list(tmp_path.glob("*.tmp"))  # 7 matrices x 2 blocks and the output; written atomically
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(fields["imatrix.chunk_count"].parts[-1][0]) == measured.chunk_count == 2
    assert int(fields["imatrix.chunk_size"].parts[-1][0]) == 512
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(tensors) == {f"blk.{b}.{m}.weight.{k}" for b in (0, 1) for k in ("in_sum2", "counts") for m in
                            ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | {
        "output.weight.in_sum2", "output.weight.counts"}  # the tiny model's head is its own (not tied)
    sums = tensors["blk.1.ffn_down.weight.in_sum2"].reshape(-1)
    count = tensors["blk.1.ffn_down.weight.counts"].reshape(-1)[0]
    assert count == measured.counts["model.layers.1.mlp.down_proj"] == 600
    assert np.array_equal(sums / np.float32(count), measured["model.layers.1.mlp.down_proj"])
    # the sums are what the layer saw: x^2 summed over every token
    assert sums.shape == (128,) and np.all(sums > 0)


def test_llama_quantize_reads_the_file_and_writes_quantlib_s_bytes(tmp_path) -> None:
    quantize = _llama_quantize()
    if quantize is None:
        pytest.skip("llama.cpp is not built here (scripts/llamacpp_golden.py builds it; CI does not)")
    import gguf

    from quantlib.methods._gguf_tensor import quantize_gguf
    from quantlib.models import _default_gguf_path, load_model

    f32 = tmp_path / "model-f32.gguf"
    subprocess.run([str(quantize), "--allow-requantize", str(_default_gguf_path()), str(f32), "F32"], check=True,
                   capture_output=True)
    loaded = load_model("default")
    imatrix = tmp_path / "imatrix.gguf"
    measured, _ = measure_and_write(loaded.model, loaded.tokenizer, imatrix, 1024)
    out = tmp_path / "q4_0.gguf"
    log = subprocess.run([str(quantize), "--imatrix", str(imatrix), "--pure", str(f32), str(out), "Q4_0"],
                         check=True, capture_output=True, text=True)
    assert "loaded 210 importance matrix entries" in log.stdout + log.stderr
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    params = dict(loaded.model.named_parameters())
    for layer, module, name in ((0, "mlp.down_proj", "ffn_down"), (13, "self_attn.v_proj", "attn_v"),
                                (29, "self_attn.o_proj", "attn_output")):
        weight = params[f"model.layers.{layer}.{module}.weight"].detach()
        ours = quantize_gguf(weight, "Q4_0", imatrix=measured[f"model.layers.{layer}.{module}"])
        theirs = written[f"blk.{layer}.{name}.weight"].view(np.uint8).reshape(-1)
        assert np.array_equal(np.ascontiguousarray(ours.data).view(np.uint8).reshape(-1), theirs)
        plain = quantize_gguf(weight, "Q4_0")  # and the importance matrix changed them
        assert not np.array_equal(np.ascontiguousarray(plain.data).view(np.uint8).reshape(-1), theirs)
    assert torch.is_tensor(weight)


def test_the_command_line_writes_the_file(tmp_path, tiny_llama_dir) -> None:
    import sys

    out = tmp_path / "imatrix.gguf"
    done = subprocess.run([sys.executable, "-m", "quantlib", "imatrix", "--model", str(tiny_llama_dir), "--out",
                           str(out), "--tokens", "600", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.exists() and "15 matrices, 2 chunks of 512 tokens" in done.stdout


def test_quantizing_with_an_importance_matrix_reports_progress_that_never_goes_back(tiny_llama_dir) -> None:
    """The measurement is the first half of the step and the quantization the second (before, both ran 0 -> 1 on
    one bar: a comparison's bar went from 50% back to 26%)."""
    from quantlib.models import load_model
    from quantlib.registry import get_quantizer

    base = load_model(str(tiny_llama_dir))
    seen: list[tuple[float, str]] = []
    quantizer = get_quantizer({"quant_method": "gguf", "quant_type": "Q4_0", "imatrix": True, "imatrix_tokens": 512},
                              device="cpu")
    quantizer.quantize_model(base=base, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("importance matrix" in m for _, m in seen) and any("layer" in m for f, m in seen if f > 0.5)
