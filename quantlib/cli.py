"""Command line over the same engine as the app: validate, plan, compare, inspect, runs.

Unix conventions: data on stdout, progress and errors on stderr, `--json` for machine-readable
output, exit 0 on success, 1 when the input is invalid or the work failed, 2 for a usage error,
130 when interrupted. Runs started here are saved in the same store the app lists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _err(message: str) -> None:
    print(f"quantlib: {message}", file=sys.stderr)


def _read_config_file(path: str):
    """A config from a JSON file (or a model's config.json); errors name the file."""
    from quantlib.registry import parse_config
    from quantlib.errors import ConfigError

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory, expected a JSON file") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise CliError(f"{path}: {exc}") from None


class CliError(Exception):
    """A message for stderr and exit status 1."""


def _configs(args: argparse.Namespace) -> list:
    from quantlib.presets import PRESETS, preset

    configs = [_read_config_file(p) for p in (getattr(args, "config", None) or [])]
    for name in getattr(args, "preset", None) or []:
        if name not in PRESETS:
            raise CliError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        configs.append(preset(name))
    return configs


@contextlib.contextmanager
def _graceful_sigint(message: str) -> Iterator[list[bool]]:
    """A first Ctrl-C sets the yielded flag (the work stops at its next step and keeps what it did) and says
    `message`; a second one interrupts at once. Outside the main thread Ctrl-C is not ours to handle."""
    import signal

    interrupted = [False]

    def on_sigint(signum, frame) -> None:
        if interrupted[0]:
            raise KeyboardInterrupt
        interrupted[0] = True
        _err(message)

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (embedded use)
        previous = None
    try:
        yield interrupted
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _progress(enabled: bool):
    """Progress lines on stderr (one per message, throttled), silent with --quiet."""
    last = [0.0, ""]

    def report(fraction: float, message: str) -> None:
        now = time.monotonic()
        if not enabled or (message == last[1]) or (now - last[0] < 0.5 and fraction < 1.0):
            return
        last[0], last[1] = now, message
        print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    return report


def _print_table(frame, as_json: bool) -> None:
    if as_json:
        print(frame.to_json(orient="records", indent=1))
    else:
        import pandas as pd

        with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
            print(frame.to_string(index=False))


# ----------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from quantlib.registry import preflight
    from quantlib.models import read_model_config

    config = _read_config_file(args.file)
    problems: list[str] = []
    if args.model:
        problems = preflight(config, read_model_config(args.model))
    if args.json:
        print(json.dumps({"valid": not problems, "config": config.to_dict(), "warnings": config.warnings(),
                          "model_problems": problems}, indent=1))
    else:
        print(config.to_json(diff=args.diff))
        for warning in config.warnings():
            print(f"warning: {warning}", file=sys.stderr)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            _err(f"{len(problems)} layer(s) of {args.model} do not fit this config")
    return EXIT_INVALID if problems else EXIT_OK


def _plan_model_config(source: str) -> dict:
    """config.json of --model: a .json file is read as the config itself (no weights anywhere)."""
    from quantlib.models import read_model_config

    path = Path(source).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CliError(f"{source}: not a readable config.json ({exc})") from None
        if not isinstance(cfg, dict):
            raise CliError(f"{source}: config.json must be a JSON object")
        return cfg
    return read_model_config(source)


def cmd_plan(args: argparse.Namespace) -> int:
    import psutil

    from quantlib.memory import KV_DTYPE_BYTES, plan_memory, plan_table, stored_quantization
    from quantlib.shapes import ArchitectureError, forward_memory, model_shapes

    configs = _configs(args)
    model_config = _plan_model_config(args.model)
    shapes = model_shapes(model_config, args.trust_remote_code)
    stored, problem = stored_quantization(model_config)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    if stored is not None:
        print(f"note: {args.model} is stored quantized ({stored.label}); its first row plans it as stored",
              file=sys.stderr)
        configs.insert(0, stored)
    if not configs:
        raise CliError("plan needs at least one --config FILE or --preset NAME")
    runtime = None
    if args.context:
        compute = args.dtype if args.dtype in ("float16", "bfloat16") else "float32"
        try:
            runtime = forward_memory(model_config, args.context, args.batch, compute, args.trust_remote_code)
        except ArchitectureError as exc:
            print(f"warning: KV cache and activations left out: {exc}", file=sys.stderr)
        else:
            for line in runtime.assumptions:
                print(f"assumption: {line}", file=sys.stderr)
    available = args.memory_gib * 2**30 if args.memory_gib else psutil.virtual_memory().available
    table = plan_table(model_config, [None, *configs], args.dtype, available_bytes=available, runtime=runtime,
                       kv_dtype_bytes=KV_DTYPE_BYTES[args.kv_dtype] if runtime is not None else None,
                       trust_remote_code=args.trust_remote_code)
    if not args.why:
        _print_table(table, args.json)
        return EXIT_OK
    plans = {config.label: plan_memory(model_config, config, args.dtype, shapes=shapes) for config in configs}
    if args.json:
        print(json.dumps({"plan": json.loads(table.to_json(orient="records")),
                          "unquantized": {label: plan.unquantized_detail for label, plan in plans.items()},
                          "experts": {label: plan.experts_policy for label, plan in plans.items()
                                      if plan.experts_policy}}, indent=1))
        return EXIT_OK
    _print_table(table, False)
    for label, plan in plans.items():
        frame = plan.unquantized_frame()
        frame["MiB"] = frame.pop("bytes") / 2**20
        print(f"\n{label}: left unquantized")
        _print_table(frame, False)
        if plan.experts_policy:
            print(f"experts: {plan.experts_policy}")
    for config in configs:  # llama-quantize's file types: each tensor's type and the rule that chose it
        from quantlib.registry import quantizer_class

        try:
            rows = quantizer_class(config).tensor_plan(config, shapes)
        except ValueError as exc:
            print(f"\n{config.label}: not planned tensor by tensor ({exc})")
            continue
        if rows:
            print(f"\n{config.label}: each tensor's type and the rule that chose it")
            _print_table(pd_frame(rows), False)
    return EXIT_OK


def pd_frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows)


def cmd_compare_offloaded(args: argparse.Namespace, configs: list) -> int:
    """compare --offload: every model through accelerate's offload (models bigger than memory)."""
    from quantlib.offload import OffloadSettings, compare_offloaded
    from quantlib.runs import atomic_write_text

    if args.text:
        raise CliError("--offload evaluates on the built-in text; --text is not supported with it yet")
    settings = OffloadSettings(max_memory_gib=args.max_memory_gib, folder=args.offload_folder)

    def estimate(seconds: float, basis: str) -> None:
        print(f"estimated evaluation time: about {seconds / 60:.1f} min ({basis})", file=sys.stderr, flush=True)

    result = compare_offloaded(configs, source=args.model, settings=settings, dtype=args.dtype, max_tokens=args.tokens,
                               window=args.window, progress=_progress(not args.quiet), on_estimate=estimate)
    for note in result.notes:
        print(note, file=sys.stderr)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / "summary.csv", result.table.to_csv(index=False))
    print(f"ran offloaded in {result.seconds:.1f} s (estimated {result.estimate_seconds:.1f} s)", file=sys.stderr)
    _print_table(result.table, args.json)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from quantlib.compare import CompareSettings, run_comparison
    from quantlib.reports import (check_lines, format_summary, partial_text, phase_text, ranking_text, running_text,
                                  write_outputs)

    configs = _configs(args)
    if not configs:
        raise CliError("compare needs at least one --config FILE or --preset NAME")
    if args.weights_only_too:
        from quantlib.compare import with_weights_only

        configs = with_weights_only(configs)
    if args.text and not Path(args.text).is_file():
        raise CliError(f"{args.text}: no such text file")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"{args.out}: exists and is not a directory")
    if args.offload:
        return cmd_compare_offloaded(args, configs)
    settings = CompareSettings(source=args.model, text_path=args.text, max_tokens=args.tokens, window=args.window,
                               stride=args.stride, device=args.device, until_settled=args.until_settled,
                               baseline_cache=not args.no_baseline_cache, kernels=args.kernels)

    def running(partial) -> None:
        if not args.quiet:
            print(f"[running] {running_text(partial.run)}", file=sys.stderr, flush=True)

    # Ctrl-C during the evaluation stops at the end of the current window and keeps what was computed
    # (saved as a partial run); a second Ctrl-C interrupts at once.
    with _graceful_sigint("stopping after this window (Ctrl-C again to abort without saving)") as interrupted:
        result = run_comparison(configs, settings, progress=_progress(not args.quiet), on_update=running,
                                cancel=lambda: interrupted[0], keep_partial=True)
    partial = partial_text(result.run)
    if partial:
        print(partial, file=sys.stderr)
    for line in check_lines(result.run):
        print(line, file=sys.stderr)
    if args.out:
        paths = write_outputs(result.run, args.out)
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    phases = phase_text(result.run)
    print(f"saved run {result.run.run_id} ({result.path})" + (f"; time by phase: {phases}" if phases else ""),
          file=sys.stderr)
    ranking = ranking_text(result.run)
    if ranking:
        print(ranking, file=sys.stderr)
    _print_table(result.table if args.json else format_summary(result.table), args.json)
    return EXIT_OK


def cmd_recommend(args: argparse.Namespace) -> int:
    from quantlib import recommend as rc
    from quantlib.compare import CompareSettings
    from quantlib.models import load_model
    from quantlib.runs import atomic_write_text

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"{args.out}: exists and is not a directory")
    method = args.method or next(iter(rc.families()))
    rc.family_class(method)  # unknown or mix-less methods fail before loading
    loaded = load_model(args.model, dtype=getattr(__import__("torch"), args.dtype), device="cpu",
                        trust_remote_code=args.trust_remote_code, progress=_progress(not args.quiet))
    sens = rc.measure_sensitivity(loaded, method, dtype=args.dtype, calib_tokens=args.calib_tokens,
                                  proxy=args.proxy, use_cache=not args.no_cache, progress=_progress(not args.quiet))
    rec = rc.recommend(sens, loaded.model.config.to_dict(), budget_gib=args.budget_gib, bits=args.bits,
                       shapes=rc.describe_model(loaded.model))
    out = rec.to_dict()
    out["sensitivity"] = {"source": sens.source, "seconds": sens.seconds, "calib_tokens": sens.calib_tokens,
                          "proxy": args.proxy}
    verification = None
    if args.verify:
        settings = CompareSettings(source=args.model, max_tokens=args.tokens, dtype=args.dtype, device="cpu",
                                   trust_remote_code=args.trust_remote_code)
        verification = rc.verify(rec, settings, base=loaded, progress=_progress(not args.quiet),
                                 calib_tokens=args.verify_calib_tokens)
        out["verification"] = {"verdict": verification.verdict, "run_id": verification.comparison.run.run_id,
                               "table": verification.table.to_dict(orient="records")}
    if args.out:
        folder = Path(args.out)
        atomic_write_text(folder / "recommendation.json", json.dumps(out, indent=1, default=str))
        atomic_write_text(folder / "quantization_config.json", json.dumps(rec.export(), indent=1))
        atomic_write_text(folder / "layers.csv", rec.layers.to_csv(index=False))
        for tool, text in rec.commands.items():
            atomic_write_text(folder / f"{tool}.sh", text + "\n")
        if verification is not None:
            atomic_write_text(folder / "verification.csv", verification.table.to_csv(index=False))
        print(f"wrote {folder}/recommendation.json, quantization_config.json, layers.csv"
              + (", verification.csv" if verification is not None else ""), file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return EXIT_OK
    for line in rc.summary_lines(rec):
        print(line)
    if verification is not None:
        for line in rc.verdict_lines(verification.verdict):
            print(line)
    print(json.dumps(rec.export(), indent=1))
    for text in rec.commands.values():
        print(text)
    return EXIT_OK


def cmd_inspect_all(args: argparse.Namespace, config: Any) -> int:
    """Every layer, streamed tensor by tensor from the checkpoint's safetensors (models bigger than memory)."""
    from quantlib.checkpoint import analyze_checkpoint, flat_rows
    from quantlib.runs import atomic_write_text

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"{args.out}: exists and is not a directory")
    with _graceful_sigint("stopping after this tensor; finished layers are kept (Ctrl-C again to abort)") \
            as interrupted:
        result = analyze_checkpoint(args.model, config, out=args.out, dtype=args.dtype,
                                    trust_remote_code=args.trust_remote_code, progress=_progress(not args.quiet),
                                    cancel=lambda: interrupted[0])
    table = flat_rows(result.layers)
    if args.out:
        atomic_write_text(Path(args.out) / "layers.csv", table.to_csv(index=False))
        print(f"wrote {args.out}/layers.jsonl, layers.csv, summary.json", file=sys.stderr)
    for p in result.problems:
        print(f"problem: {p['layer']} ({p['tensor']}): {p['problem']}", file=sys.stderr)
    for note in result.notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps({**result.summary(), "layers": table.to_dict(orient="records")}, indent=1, default=str))
        return EXIT_OK if result.complete else EXIT_INTERRUPTED
    state = "complete" if result.complete else "INTERRUPTED (finished layers kept)"
    print(f"{config.label}: {len(result.layers)} layers analyzed, {len(result.problems)} problem(s), {state}; "
          f"{result.bytes_read / 1e9:.2f} GB read in {result.seconds:.1f} s ({result.gb_per_second:.3f} GB/s)")
    if len(table):
        cols = [c for c in ("layer", "rel_fro_error", "sqnr_db", "bits_per_param", "packed_bytes", "w_kurtosis",
                            "w_max_over_sigma") if c in table]
        print(table[cols].to_string(index=False))
    return EXIT_OK if result.complete else EXIT_INTERRUPTED


def cmd_inspect(args: argparse.Namespace) -> int:
    from quantlib.layers import layer_detail
    from quantlib.models import load_model
    from quantlib.registry import get_quantizer

    config = _read_config_file(args.config)
    if args.all_layers:
        return cmd_inspect_all(args, config)
    quantizer = get_quantizer(config, device=args.device)
    loaded = load_model(args.model, progress=_progress(not args.quiet))
    detail = layer_detail(loaded.model, quantizer, args.layer)
    hist = detail.pop("histogram")
    detail["histogram"] = {"edges": hist.edges, "counts": hist.counts, "blocksize": hist.blocksize,
                           "levels": hist.levels}
    detail["backend"] = quantizer.backend.to_dict()
    if args.json:
        print(json.dumps(detail, indent=1))
        return EXIT_OK
    print(f"layer {detail['layer']}  shape {detail['shape']}  scheme {config.label}  backend {quantizer.backend.short}")
    print(f"bits/param {detail['bits_per_param']:.4f}  code entropy {detail['code_entropy_bits']:.3f} bits")
    for key, value in {**detail["metrics"], **detail["weight_stats"]}.items():
        print(f"  {key:>22}: {value:.6g}")
    return EXIT_OK


class MethodContext:
    """What a method's own command (`Quantizer.cli_commands`) gets from the CLI: the model `--model` names, and
    quantlib's comparison (which the method modules cannot import: they never reach the registry)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def load(self) -> Any:
        from quantlib.models import load_model

        return load_model(self.args.model, progress=_progress(not self.args.quiet))

    def evaluate(self, config: Any, source: str, tokens: int, window: int, stride: int) -> Any:
        """quantlib's comparison row of `config` on `source` (the table's columns: kl, kl_se, ...)."""
        from quantlib.tool_checks import evaluate

        return evaluate(config, source, tokens, window, stride, progress=_progress(not self.args.quiet))


def cmd_runs(args: argparse.Namespace) -> int:
    from quantlib.runs import list_runs, runs_dir

    table = list_runs()
    if table.empty and not args.json:
        print(f"no saved runs in {runs_dir()}", file=sys.stderr)
        return EXIT_OK
    _print_table(table, args.json)
    return EXIT_OK


# ----------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from quantlib.presets import PRESETS

    parser = argparse.ArgumentParser(prog="quantlib", description="Quantization Explorer on the command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    model_help = "model: 'default' (embedded SmolLM2-135M), a local folder, a .gguf file or a hub id"

    def model_and_configs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="default", help=model_help)
        p.add_argument("--config", action="append", metavar="FILE", help="a config JSON (repeatable)")
        p.add_argument("--preset", action="append", metavar="NAME", help=f"one of: {', '.join(PRESETS)}")

    p = sub.add_parser("validate", help="check a config JSON (or a model's config.json)")
    p.add_argument("file")
    p.add_argument("--model", help=model_help + "; also check group/block sizes against its layers")
    p.add_argument("--diff", action="store_true", help="print only the non-default keys")
    common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="predict memory of a model under configs, no weights loaded")
    model_and_configs(p)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the unquantized parts (default float16)")
    p.add_argument("--memory-gib", type=float, help="memory to fit into (default: available RAM)")
    p.add_argument("--context", type=_positive_int, default=None,
                   help="add the KV cache and activation peak of one forward over this many tokens")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size for --context (default 1)")
    p.add_argument("--kv-dtype", default="float16", choices=["float16", "bfloat16", "float32", "float8"],
                   help="KV cache dtype for --context (default float16)")
    p.add_argument("--why", action="store_true", help="also list what each scheme leaves unquantized, and why, and "
                                                      "for a llama-quantize file type each tensor's type and rule")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow models whose code lives in their repository (off by default)")
    common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="quantize with several configs and measure them against the baseline")
    model_and_configs(p)
    p.add_argument("--text", metavar="FILE", help="evaluation text (default: built-in news corpus)")
    p.add_argument("--weights-only-too", action="store_true",
                   help="also evaluate each config that quantizes activations (GGUF's llama.cpp kernels, FP8, NVFP4, "
                        "MX) with its activations left alone, so each share of the loss shows")
    p.add_argument("--tokens", type=_positive_int, default=4096, help="tokens to evaluate (default 4096)")
    p.add_argument("--window", type=_positive_int, default=1024, help="window length (default 1024)")
    p.add_argument("--stride", type=_positive_int, default=None, help="stride (default: the window)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", metavar="DIR", help="write run.json, summary.csv, layers.csv, report.html here")
    p.add_argument("--until-settled", action="store_true",
                   help="stop once the ranking by mean KL is settled (every adjacent pair >= 2 paired standard "
                        "errors apart, after at least 1,024 tokens); saved as a partial run with its token count")
    p.add_argument("--kernels", default="auto", choices=["auto", "library", "exact"],
                   help="layers of a library quantlib simulates exactly: 'library' runs the library's kernels; "
                        "'exact' evaluates the exact simulation of its CPU kernels (the same log-probs, bit for "
                        "bit), cross-checked against the kernels on the first 128 tokens of the run; 'auto' (the "
                        "default) is the simulation for LLM.int8() on CPU (faster, same memory), else the kernels")
    p.add_argument("--no-baseline-cache", action="store_true",
                   help="recompute the baseline instead of reusing its cached final hidden states")
    p.add_argument("--offload", action="store_true",
                   help="models bigger than memory: load every model with accelerate's device_map='auto' within "
                        "--max-memory-gib, the rest on disk (schemes from a streamed checkpoint of their dequantized "
                        "weights); slow, and every result says it ran offloaded")
    p.add_argument("--max-memory-gib", type=float, default=2.0, help="--offload: memory per model (default 2)")
    p.add_argument("--offload-folder", metavar="DIR",
                   help="--offload: where offloaded and simulated weights go (default: a temporary folder)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="--offload: the models' dtype (default float32)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("recommend", help="the per-layer mix with the least predicted damage under a memory budget")
    p.add_argument("--model", default="default", help=model_help)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-gib", type=float, help="total weight memory to fit, in GiB (as the planner counts)")
    budget.add_argument("--bits", type=float, help="average bits per parameter over the whole model")
    p.add_argument("--method", default=None, help="method family (quant_method) whose config can mix settings "
                   "per layer (default: the first in the registry's order)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the model and of the layers kept unquantized (default float32)")
    p.add_argument("--calib-tokens", type=_positive_int, default=512, help="calibration tokens (default 512)")
    p.add_argument("--verify-calib-tokens", type=_positive_int, default=4096,
                   help="with --verify, for a family that calibrates: calibration tokens of every config "
                        "(default 4096)")
    p.add_argument("--proxy", default="fisher", choices=["fisher", "relative"],
                   help="error the optimizer sums: the predicted KL from the output's Fisher information (default), "
                        "or the relative output error")
    p.add_argument("--no-cache", action="store_true", help="measure again instead of reading the sensitivity cache")
    p.add_argument("--verify", action="store_true",
                   help="quantize the recommended mix and every uniform setting, and evaluate them (a comparison run)")
    p.add_argument("--tokens", type=_positive_int, default=2048, help="evaluation tokens of --verify (default 2048)")
    p.add_argument("--out", metavar="DIR", help="write recommendation.json, quantization_config.json, layers.csv")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow models whose code lives in their repository (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    common(p)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("inspect", help="statistics and histogram data of one layer, or of every layer streamed "
                                       "tensor by tensor from the checkpoint (--all-layers), under a config")
    p.add_argument("--model", default="default", help=model_help)
    p.add_argument("--config", required=True, metavar="FILE")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--layer", help="e.g. model.layers.0.mlp.down_proj")
    which.add_argument("--all-layers", action="store_true",
                       help="every layer the config quantizes, read one tensor at a time from the model folder's "
                            "safetensors (memory: the largest tensor and its quantized copy, never the model); "
                            "rows are written as they finish and a rerun resumes")
    p.add_argument("--out", metavar="DIR", help="--all-layers: write layers.jsonl (as they come), layers.csv, "
                                                 "summary.json here")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="--all-layers: cast each tensor to this dtype (default: analyze in the stored dtype)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow models whose code lives in their repository (off by default)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--quiet", action="store_true")
    common(p)
    p.set_defaults(func=cmd_inspect)

    from quantlib.registry import QUANTIZER_MAPPING

    for command in {c.name: c for cls in QUANTIZER_MAPPING.values() for c in cls.cli_commands()}.values():
        p = sub.add_parser(command.name, help=command.help)  # a method's own tool (GGUF's imatrix)
        p.add_argument("--model", default="default", help=model_help)
        p.add_argument("--quiet", action="store_true")
        command.arguments(p)
        common(p)
        p.set_defaults(func=lambda args, command=command: command.run(args, MethodContext(args)))

    p = sub.add_parser("runs", help="list saved comparison runs (the app lists the same)")
    common(p)
    p.set_defaults(func=cmd_runs)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _silence_library_progress() -> None:
    """--quiet: the libraries' own progress bars too (transformers' "Loading weights" and "Writing model shards",
    huggingface_hub's downloads), not only quantlib's lines. Set before any of them is imported, and again on the
    loaded modules where they already are."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m quantlib` and the `quantlib` console script."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "--quiet" in (sys.argv[1:] if argv is None else argv):  # before the parser imports the methods' libraries
        _silence_library_progress()
    args = build_parser().parse_args(argv)
    from quantlib.errors import QuantlibError

    try:
        return args.func(args)
    except CliError as exc:
        _err(str(exc))
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except (QuantlibError, ValueError, OSError) as exc:
        _err(str(exc))
    return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
