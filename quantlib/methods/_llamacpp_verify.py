"""Verify a GGUF config with llama.cpp itself, where its tools are installed: `quantlib llama-cpp-verify`.

1. The model as an F32 GGUF: a GGUF source (the default model's Q4_1 file, or any .gguf) is widened with
   `llama-quantize --allow-requantize SRC F32`; another source needs `--f32-gguf FILE` (convert_hf_to_gguf.py makes it).
2. The config's own llama-quantize command (`llama_quantize_argv`, the one the export prints), with quantlib's
   importance matrix file when the config uses one (`quantlib imatrix`'s measurement).
3. `llama-perplexity --kl-divergence` against the F32 model, on the same text and context quantlib evaluates.
4. quantlib's comparison of the same config on the same F32 file and tokens.

The two KLs are printed side by side with their standard errors and the difference in combined standard errors, and
llama.cpp's tensor bytes beside quantlib's planned quantized bytes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

#: llama-perplexity's --kl-divergence summary lines.
_FIGURES = {"kl": r"Mean\s+KLD:\s+([-\d.]+)\s+±\s+([-\d.]+)", "top1": r"Same top p:\s+([-\d.]+)\s+±\s+([-\d.]+)",
            "ln_ratio": r"Mean\s+ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s+([-\d.]+)\s+±\s+([-\d.]+)",
            "corr": r"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s+([-\d.]+)"}


def llama_figures(text: str) -> dict[str, float]:
    """KL, same-top-p (%) and ln PPL ratio with their ±, and Cor(ln PPL) (%), from llama-perplexity's
    --kl-divergence output."""
    out: dict[str, float] = {}
    for key, pattern in _FIGURES.items():
        match = re.search(pattern, text)
        if match:
            out[key] = float(match.group(1))
            if match.lastindex and match.lastindex > 1:
                out[key + "_se"] = float(match.group(2))
    return out


def default_tools_dir() -> str | None:
    """Where llama.cpp's tools are looked for when no folder is given: $QUANTLIB_LLAMA_CPP, else PATH, else the
    folder scripts/llamacpp_golden.py builds them in ($QUANTLIB_CACHE/llamacpp/build/bin)."""
    import os

    if os.environ.get("QUANTLIB_LLAMA_CPP"):
        return os.environ["QUANTLIB_LLAMA_CPP"]
    if shutil.which("llama-quantize") and shutil.which("llama-perplexity"):
        return None
    built = Path(os.environ.get("QUANTLIB_CACHE", Path.home() / ".cache" / "quantlib")) / "llamacpp" / "build" / "bin"
    return str(built) if built.is_dir() else None


def find_tools(directory: str | None) -> dict[str, Path]:
    """llama-quantize and llama-perplexity in `directory`, else on PATH; `FileNotFoundError` naming what is missing."""
    found: dict[str, Path] = {}
    for name in ("llama-quantize", "llama-perplexity"):
        path = Path(directory) / name if directory else (Path(p) if (p := shutil.which(name)) else None)
        if path is None or not path.exists():
            where = f"in {directory}" if directory else "on PATH"
            raise FileNotFoundError(f"{name} is not {where} (build llama.cpp with scripts/llamacpp_golden.py, or pass "
                                    "--llama-cpp DIR)")
        found[name] = path
    return found


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
    return done.stdout + done.stderr


def gguf_tensor_bytes(path: Path) -> int:
    """The bytes of every tensor a GGUF file holds."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


class VerifyCommand:
    """`quantlib llama-cpp-verify`: a GGUF config through llama.cpp's own tools beside quantlib's figures. Made by the
    GGUF quantizer with its config class and its `classify` (this module knows no method)."""

    name = "llama-cpp-verify"
    help = ("run a GGUF config's llama-quantize command and llama-perplexity --kl-divergence, and show llama.cpp's KL "
            "and size beside quantlib's (where llama.cpp's tools are installed)")

    def __init__(self, config_class: Any, classify: Any):
        self.config_class, self.classify = config_class, classify

    def arguments(self, parser: Any) -> None:
        parser.add_argument("--config", required=True, metavar="FILE", help="a GGUF config JSON")
        parser.add_argument("--llama-cpp", metavar="DIR", help="folder with llama-quantize and llama-perplexity "
                                                             "(default: PATH)")
        parser.add_argument("--f32-gguf", metavar="FILE", help="the model as an F32 GGUF (default: widened from a "
                                                               "GGUF source with llama-quantize)")
        parser.add_argument("--ctx", type=int, default=512, help="context of each chunk (llama-perplexity's -c)")
        parser.add_argument("--chunks", type=int, default=8, help="chunks of the built-in evaluation text")
        parser.add_argument("--threads", type=int, default=2)

    def run(self, args: Any, context: Any) -> int:
        import json

        raw = json.loads(Path(args.config).read_text(encoding="utf-8"))
        method = raw.get("quant_method") if isinstance(raw, dict) else None
        if method != self.config_class.quant_method:
            raise ValueError(f"llama-cpp-verify takes a {self.config_class.quant_method} config; {args.config} is "
                             f"{method!r}")
        config = self.config_class(**raw)
        result = verify(config, args.model, find_tools(args.llama_cpp or default_tools_dir()), classify=self.classify,
                        evaluate=context.evaluate, f32_gguf=args.f32_gguf, ctx=args.ctx, chunks=args.chunks,
                        threads=args.threads, load=context.load)
        print(format_result(result))
        return 0

    # ----- the same check on a finished run (quantlib.tool_checks: the Compare page, the report) -----------------
    check_title = "llama.cpp's own tools (llama-quantize, llama-perplexity --kl-divergence)"

    def applies(self, config: Any) -> bool:
        return getattr(config, "quant_method", None) == self.config_class.quant_method

    def unavailable(self, source: str = "default") -> str | None:
        """Why the check cannot run on a run of model `source` here, or None."""
        if source != "default" and not str(source).endswith(".gguf"):
            return ("the run's model is not a GGUF file, and llama.cpp's tools need one: convert it with llama.cpp's "
                    "convert_hf_to_gguf.py (--outtype f32), then run `quantlib llama-cpp-verify --f32-gguf FILE`")
        try:
            find_tools(default_tools_dir())
        except FileNotFoundError as exc:
            return (f"{exc}. Set QUANTLIB_LLAMA_CPP to the folder that holds them, or build them with "
                    "scripts/llamacpp_golden.py")
        return None

    def check(self, config: Any, source: str, evaluate: Any, progress: Any = None) -> dict[str, Any]:
        """`verify` on the default chunks; `evaluate` takes a `progress` keyword (quantlib's comparison reports
        into the last third of the bar)."""
        def evaluate_here(*args: Any) -> Any:
            return evaluate(*args, progress=None if progress is None else
                            (lambda f, m: progress(0.65 + 0.35 * f, f"quantlib: {m}")))

        with tempfile.TemporaryDirectory(prefix="quantlib_llamacpp_") as work:  # the F32 and quantized files go
            result = verify(config, source, find_tools(default_tools_dir()), classify=self.classify,
                            evaluate=evaluate_here, progress=progress, work=Path(work))
        result.pop("work")  # removed with its files: the figures are what the run keeps
        return result

    @staticmethod
    def summary_lines(result: dict[str, Any]) -> list[str]:
        """The figures side by side, first saying on what (the work folder is left out: it is temporary)."""
        lines = format_result(result).splitlines()
        return [f"{result['tokens']:,} tokens of the built-in text in chunks of {result['ctx']}", *lines[1:]]


def verify(config: Any, source: str, tools: dict[str, Path], *, classify: Any, evaluate: Any,
           f32_gguf: str | None = None, ctx: int = 512, chunks: int = 8, threads: int = 2, load: Any = None,
           work: Path | None = None, progress: Any = None) -> dict[str, Any]:
    """llama.cpp's figures and quantlib's for `config` on the same F32 GGUF and tokens (see the module docstring).
    `classify(config, shapes)`: the quantizer's per-weight decisions; `evaluate(config, source, tokens, window,
    stride)`: quantlib's comparison row of `config` (kl, kl_se, top1_agreement, memory_mib)."""
    from quantlib.corpus import builtin_text
    from quantlib.methods._gguf_file_types import llama_quantize_argv
    from quantlib.models import _default_gguf_path, load_model, read_model_config
    from quantlib.shapes import model_shapes

    def say(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    work = Path(work or tempfile.mkdtemp(prefix="quantlib_llamacpp_"))
    f32 = Path(f32_gguf) if f32_gguf else work / "model-f32.gguf"
    if not f32_gguf:
        say(0.0, "llama-quantize: the model as an F32 GGUF")
        gguf_source = _default_gguf_path() if source == "default" else Path(source)
        if gguf_source.suffix != ".gguf":
            raise ValueError(f"{source} is not a GGUF file: convert it with llama.cpp's convert_hf_to_gguf.py "
                             "(--outtype f32) and pass the result as --f32-gguf")
        _run([str(tools["llama-quantize"]), "--allow-requantize", str(gguf_source), str(f32), "F32"])
    model_config = read_model_config(str(f32))
    shapes = model_shapes(model_config)
    imatrix = None
    if config.imatrix:
        from quantlib.methods._ggml_importance import measure_and_write

        base = load() if load is not None else load_model(str(f32))
        imatrix = work / "imatrix.gguf"
        measure_and_write(base.model, base.tokenizer, imatrix, config.imatrix_tokens)
    target = work / "model-quantized.gguf"
    say(0.1, f"llama-quantize: {config.label}")
    _run(llama_quantize_argv(config, model_config, shapes, classify(config, shapes), str(f32), str(target),
                             str(imatrix) if imatrix else None, "float32", str(tools["llama-quantize"])))
    text = work / "eval.txt"
    text.write_text(builtin_text("eval"), encoding="utf-8")
    common = ["-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    base_kld = work / "base.kld"
    say(0.25, f"llama-perplexity: the F32 model's logits on {ctx * chunks} tokens")
    _run([str(tools["llama-perplexity"]), "-m", str(f32), "--kl-divergence-base", str(base_kld), *common])
    say(0.45, f"llama-perplexity --kl-divergence: {config.label}")
    llama = llama_figures(_run([str(tools["llama-perplexity"]), "-m", str(target), "--kl-divergence",
                                "--kl-divergence-base", str(base_kld), *common]))
    # llama-perplexity scores the second half of each chunk: a stride of half the context gives every token quantlib
    # scores at least that much context
    say(0.65, "quantlib's comparison on the same F32 file and tokens")
    row = evaluate(config, str(f32), ctx * chunks, ctx, ctx // 2)
    f32_bytes, quantized_bytes = gguf_tensor_bytes(f32), gguf_tensor_bytes(target)
    return {"config": config.label, "tokens": ctx * chunks, "ctx": ctx, "llama.cpp": llama,
            "quantlib": {"kl": float(row["kl"]), "kl_se": float(row["kl_se"]),
                         "top1": 100 * float(row["top1_agreement"]), "memory_mib": float(row["memory_mib"])},
            "llama.cpp_mib": quantized_bytes / 2**20, "f32_mib": f32_bytes / 2**20, "work": str(work)}


def format_result(result: dict[str, Any]) -> str:
    """The figures side by side, with the KL difference in combined standard errors."""
    q, ll = result["quantlib"], result["llama.cpp"]
    where = f" (files in {result['work']})" if result.get("work") else ""
    lines = [f"{result['config']}: {result['tokens']} tokens in chunks of {result['ctx']}{where}"]
    if "kl" not in ll:
        return "\n".join([*lines, "llama-perplexity printed no KL summary"])
    se = (q["kl_se"] ** 2 + ll["kl_se"] ** 2) ** 0.5
    lines += [f"  KL      quantlib {q['kl']:.4f} ± {q['kl_se']:.4f} | llama.cpp {ll['kl']:.4f} ± {ll['kl_se']:.4f}"
              f"  ({(q['kl'] - ll['kl']) / se:+.1f} combined SE)" if se else "",
              f"  top-1   quantlib {q['top1']:.2f}% | llama.cpp {ll.get('top1', float('nan')):.2f}%",
              f"  size    quantlib {q['memory_mib']:.2f} MiB (planned, whole model) | llama.cpp's file "
              f"{result['llama.cpp_mib']:.2f} MiB of tensors"]
    return "\n".join(lines)
