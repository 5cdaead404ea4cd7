"""The command line as a new user runs it: good arguments give files, bad ones a message and exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig

from quantlib.cli import main
from quantlib.runs import list_runs

REPO = Path(__file__).resolve().parents[1]
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True}


@pytest.fixture
def runs_env(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(folder))
    return folder


def _write(path: Path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_validate_prints_normalized_config_that_transformers_loads(tmp_path, capsys) -> None:
    assert main(["validate", _write(tmp_path / "c.json", NF4)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert BitsAndBytesConfig.from_dict(out).to_dict() == BitsAndBytesConfig(**{k: v for k, v in NF4.items()
                                                                                 if k != "quant_method"}).to_dict()


def test_validate_lists_every_error_on_stderr(tmp_path, capsys) -> None:
    bad = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf5", "extra": 1}
    assert main(["validate", _write(tmp_path / "bad.json", bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "bnb_4bit_quant_type" in captured.err and "extra" in captured.err and "2 problem(s)" in captured.err


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ("[]", "must be a JSON object")])
def test_validate_rejects_malformed_files(tmp_path, capsys, content, message) -> None:
    assert main(["validate", _write(tmp_path / "x.json", content)]) == 1
    assert message in capsys.readouterr().err


def test_validate_missing_file_and_directory(tmp_path, capsys) -> None:
    assert main(["validate", str(tmp_path / "missing.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_validate_against_a_model_names_layers_group_size_does_not_divide(tiny_llama_dir, tmp_path, capsys) -> None:
    g48 = _write(tmp_path / "g48.json", {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 48})
    assert main(["validate", g48, "--model", str(tiny_llama_dir), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["valid"] and any("q_proj" in p for p in report["model_problems"])
    g64 = _write(tmp_path / "g64.json", {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 64})
    assert main(["validate", g64, "--model", str(tiny_llama_dir)]) == 0


def test_plan_prints_a_table_without_loading_weights(tiny_llama_dir, capsys) -> None:
    assert main(["plan", "--model", str(tiny_llama_dir), "--preset", "nf4-dq", "--preset", "int8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["scheme"] for r in rows] == ["unquantized float16", "NF4+DQ", "INT8 (t=6)"]
    assert rows[1]["total MiB"] < rows[2]["total MiB"] < rows[0]["total MiB"]


def test_unknown_preset_and_missing_text(tiny_llama_dir, tmp_path, capsys, runs_env) -> None:
    assert main(["compare", "--model", str(tiny_llama_dir), "--preset", "nf3"]) == 1
    assert "unknown preset 'nf3'" in capsys.readouterr().err
    assert main(["compare", "--model", str(tiny_llama_dir), "--preset", "nf4", "--text", str(tmp_path / "no.txt")]) == 1
    assert "no such text file" in capsys.readouterr().err
    assert main(["compare", "--model", str(tmp_path / "nowhere"), "--preset", "nf4", "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_clear_error(tiny_llama_dir, tmp_path, capsys, runs_env) -> None:
    out = tmp_path / "out"
    assert main(["compare", "--model", str(tiny_llama_dir), "--preset", "nf4", "--device", "cuda",
                 "--out", str(out)]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_compare_writes_json_csv_html_and_the_run_appears_in_the_store(tiny_llama_dir, tmp_path, runs_env) -> None:
    out = tmp_path / "report"
    text = _write(tmp_path / "text.txt", "the quick brown fox jumps over the lazy dog. " * 40)
    proc = subprocess.run([sys.executable, "-m", "quantlib", "compare", "--model", str(tiny_llama_dir),
                           "--preset", "nf4-dq", "--preset", "rtn-int4-g64", "--text", text, "--tokens", "300",
                           "--window", "64", "--device", "cpu", "--out", str(out), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QUANTLIB_RUNS_DIR": str(runs_env)})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["scheme"] for r in rows] == ["baseline float32", "NF4+DQ", "RTN int4 g64"]
    assert "%]" in proc.stderr  # progress went to stderr
    assert {p.name for p in out.iterdir()} == {"run.json", "summary.csv", "layers.csv", "report.html"}
    html = (out / "report.html").read_text()
    assert "Plotly.newPlot" in html
    assert 'script src="http' not in html  # plotly.js is inline: the report works offline
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert run_id in list_runs(runs_env)["run_id"].tolist()


def test_console_script_entry_point_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'quantlib = "quantlib.cli:main"' in text


def test_quiet_silences_the_libraries_progress_bars_too(tiny_llama_dir, tmp_path) -> None:
    """--quiet: no progress on stderr, transformers' "Loading weights" bar included (it printed through --quiet
    before). Without it, progress is there."""
    import subprocess
    import sys

    config = _write(tmp_path / "rtn.json", {"quant_method": "rtn", "bits": 4, "granularity": "group",
                                             "group_size": 32})
    command = [sys.executable, "-m", "quantlib", "compare", "--model", str(tiny_llama_dir), "--config", config,
               "--tokens", "64", "--window", "64", "--device", "cpu", "--json"]
    env = {**os.environ, "QUANTLIB_CACHE": str(tmp_path / "cache")}
    env.pop("TQDM_DISABLE", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    loud = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0, loud.stderr
    bars = ("Loading weights", "Writing model shards", "%|")
    assert "Loading weights: 100%|" in loud.stderr and "[  0.0%] " in loud.stderr
    quiet = subprocess.run([*command, "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert not any(bar in quiet.stderr for bar in bars), quiet.stderr
    assert "[  0.0%] " not in quiet.stderr  # quantlib's own progress lines
    assert "saved run" in quiet.stderr  # what the run produced and how (kernels, CPU) is not progress: it stays
