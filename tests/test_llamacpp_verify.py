"""Verifying a GGUF config with llama.cpp itself (`quantlib llama-cpp-verify`): the summary llama-perplexity prints is
read (tests/data/llama_perplexity_kld.txt: its real output for the default model in Q4_K_M, 4 chunks of 512), the
llama-quantize command is the one the export prints, and where llama.cpp is built the whole verification runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlib.methods._gguf_file_types import llama_quantize_argv
from quantlib.methods._llamacpp_verify import find_tools, llama_figures, verify
from quantlib.registry import parse_config, quantizer_class

DATA = Path(__file__).parent / "data"


def test_llama_perplexity_s_summary_is_read() -> None:
    figures = llama_figures((DATA / "llama_perplexity_kld.txt").read_text())
    assert figures == {"kl": 0.0539, "kl_se": 0.002888, "top1": 85.294, "top1_se": 1.109, "ln_ratio": 0.047517,
                       "ln_ratio_se": 0.011382, "corr": 99.18}


def test_missing_tools_are_named_with_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="llama-quantize is not in .*--llama-cpp DIR"):
        find_tools(str(tmp_path))


def test_the_arguments_are_the_exported_command(tiny_llama_dir) -> None:
    import json

    from quantlib.shapes import model_shapes

    model_config = json.loads((tiny_llama_dir / "config.json").read_text())
    shapes = model_shapes(model_config)
    config = parse_config({"quant_method": "gguf", "quant_type": "Q4_0", "imatrix": True,
                           "tensor_types": {"model.layers.1.mlp.down_proj": "Q8_0"}})
    decisions = quantizer_class(config).classify(config, shapes)
    argv = llama_quantize_argv(config, model_config, shapes, decisions, "in.gguf", "out.gguf", "imatrix.gguf")
    assert argv[:3] == ["llama-quantize", "--imatrix", "imatrix.gguf"] and argv[-3:] == ["in.gguf", "out.gguf", "Q4_0"]
    overrides = dict(argv[i + 1].split("=") for i, a in enumerate(argv) if a == "--tensor-type")
    assert overrides[r"^blk\.1\.ffn_down\.weight$"] == "q8_0" and overrides[r"^blk\.0\.attn_q\.weight$"] == "q4_0"
    assert len(overrides) == 14  # every quantized matrix, none left to llama-quantize's mixture rules
    command = quantizer_class(config).tool_commands(config, model_config, shapes)["llama-quantize"]
    assert r"--tensor-type '^blk\.1\.ffn_down\.weight$=q8_0'" in command
    file_type = parse_config({"quant_method": "gguf", "quant_type": "Q4_K_M"})
    assert llama_quantize_argv(file_type, model_config, shapes, {}, "a", "b") == ["llama-quantize", "a", "b", "Q4_K_M"]


def test_llama_cpp_s_kl_and_size_agree_with_quantlib_s(tmp_path) -> None:
    built = Path.home() / ".cache/quantlib/llamacpp/build/bin"
    try:
        tools = find_tools(str(built) if built.exists() else None)
    except FileNotFoundError as exc:
        pytest.skip(f"llama.cpp is not built here ({exc}); CI does not build it")
    from quantlib.compare import CompareSettings, run_comparison

    def evaluate(config, source, tokens, window, stride):
        settings = CompareSettings(source=source, max_tokens=tokens, window=window, stride=stride, device="cpu")
        return run_comparison([config], settings, save=False).table.set_index("scheme").loc[config.label]

    config = parse_config({"quant_method": "gguf", "quant_type": "Q4_0", "llama_quantize_rules": True})
    result = verify(config, "default", tools, classify=quantizer_class(config).classify, evaluate=evaluate, ctx=256,
                    chunks=4, work=tmp_path)
    q, ll = result["quantlib"], result["llama.cpp"]
    se = (q["kl_se"] ** 2 + ll["kl_se"] ** 2) ** 0.5
    assert abs(q["kl"] - ll["kl"]) < 3 * se, result
    assert abs(q["memory_mib"] - result["llama.cpp_mib"]) < 0.01, result  # the rotary buffer is 256 bytes


def test_the_command_refuses_a_config_of_another_method_and_missing_tools_clearly(tmp_path) -> None:
    import subprocess
    import sys

    other = tmp_path / "rtn.json"
    other.write_text('{"quant_method": "rtn"}')
    done = subprocess.run([sys.executable, "-m", "quantlib", "llama-cpp-verify", "--config", str(other), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "takes a gguf config" in done.stderr and "Traceback" not in done.stderr
    gguf = tmp_path / "q4.json"
    gguf.write_text('{"quant_method": "gguf", "quant_type": "Q4_0"}')
    done = subprocess.run([sys.executable, "-m", "quantlib", "llama-cpp-verify", "--config", str(gguf), "--llama-cpp",
                           str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "llama-quantize is not in" in done.stderr and "Traceback" not in done.stderr
