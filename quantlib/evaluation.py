"""How good is a (quantized) language model: perplexity and divergence from its baseline.

Windows
    Text longer than the model's context is cut into windows in the sense of Hugging Face's
    "Perplexity of fixed-length models", with one change: every window starts with BOS. The
    model sees ``[BOS] + text[start : end-1]`` (exactly ``window`` positions) and predicts
    ``text[start : end]``, so every text token - the first of a window included - is predicted
    from a context that starts at a proper document start, and BOS itself is never scored.
    With ``stride < window`` consecutive windows overlap and only the tokens a window adds
    (those after the previous window's end) are scored: each token is counted exactly once,
    and ``n_tokens`` always equals the number of input tokens.

Baseline reuse and memory
    KL(base || quant) needs the baseline's full next-token distribution at every scored
    position. Keeping it costs ``n_tokens x vocab x 4`` bytes (fp32): 0.8 GB for 4,096 tokens
    of SmolLM2's 49,152-token vocabulary, 1.6 GB for 8k. float16 would halve that but its
    rounding (~5e-4 relative on log-probs near -30) biases KL by ~1e-3 nats - the size of an
    8-bit model's whole KL - so we never store fp16. Two ways avoid recomputing the baseline:

    * :func:`perplexity_and_kl` runs the baseline and N models window by window together:
      one baseline forward per window whatever N is. Each forward skips its output head and
      keeps the head's input (``window x hidden`` floats); the head then runs on slices of
      HEAD_CHUNK_BYTES, and log-softmax, KL, top-1 and the target's log-prob are taken slice by
      slice, the baseline's probabilities once for all N models. Peak extra memory is about four
      such slices, independent of N, of the window and of the text length (the models
      themselves must all be resident). A model whose logits are not its head's output alone
      (soft-capping, scaling; checked on its first window) is read as full log-probs.
    * :func:`reference_logprobs` runs the baseline once and keeps its log-probs when they fit
      in ``max_bytes`` (default 1 GiB, enough for 4k tokens); otherwise it keeps the model and
      recomputes per window (still correct, one extra forward per comparison). Use this when
      quantized models are produced one after another and cannot coexist in memory.

Every result names the backend ("cpu" or "cuda:0 <GPU name>") that produced it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from quantlib.errors import Cancelled, QuantlibError
from quantlib.runtime import device_clock, trim_heap
from quantlib.statistics import TokenSeries, compute_statistics
from quantlib.uncertainty import BLOCK_TOKENS, ppl_estimate
from quantlib.callbacks import CancelFn, ProgressFn


DEFAULT_WINDOW = 1024
DEFAULT_REFERENCE_BYTES = 2**30
# Auto batch size: keep one batch of fp32 logits around this size (several copies coexist).
AUTO_BATCH_LOGIT_BYTES = 512 * 2**20
#: Per-token KL and delta-p percentiles reported (llama.cpp's perplexity tool reports the same).
KL_PERCENTILES = (99.9, 99, 95, 90, 50, 10, 5, 1)
#: Positions per slice when computing KL, so temporaries stay small next to the log-probs themselves.
KL_CHUNK = 128
#: Vocabulary-sized work (output head, log-softmax, KL, top-1, target gather) runs on this many bytes of fp32
#: log-probs per model at a time: 512 positions of SmolLM2's 49,152-token vocabulary. The head's matmul keeps
#: its speed down to about this size on a CPU (256 positions cost 20% more, 128 positions 35%).
HEAD_CHUNK_BYTES = 96 * 2**20
#: Positions on which each model's own forward output is compared with its output head applied to the captured
#: final hidden states, once per evaluation (its first window); the head path is used only where they agree.
HEAD_CHECK_ROWS = 32
#: Largest |delta log p| (nats) the check allows: float32 matmuls of other shapes may round differently on some
#: backends (identical on this project's CPU); soft-capping or scaling a model applies after its head is far above.
HEAD_TOLERANCE = 1e-4

__all__ = [
    "Cancelled",
    "DistributionComparison",
    "EvaluationError",
    "EvaluationReport",
    "PerplexityResult",
    "ReferenceLogprobs",
    "Window",
    "backend_name",
    "compare_logits",
    "perplexity",
    "perplexity_and_kl",
    "plan_windows",
    "reference_logprobs",
    "tokenize_for_eval",
]


class EvaluationError(QuantlibError, ValueError):
    """Bad evaluation input (no tokens, window too small, no BOS token known...)."""


# --------------------------------------------------------------------------- results


@dataclass
class PerplexityResult:
    """Perplexity over the scored tokens; nll is the mean negative log-likelihood in nats."""

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    window: int
    stride: int
    seconds: float
    tokens_per_s: float
    backend: str
    #: Standard error of `ppl` (delta method over batch means of 64-token blocks; nan below 2 blocks).
    ppl_se: float = float("nan")
    #: The baseline's row of the summary table (`quantlib.statistics`, the baseline against itself), where this
    #: is the baseline of a comparison.
    figures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DistributionComparison:
    """How far a model's next-token distributions are from the baseline's (KL in nats).

    ``figures`` holds every statistic declared in `quantlib.statistics` (the summary table's columns: perplexity,
    KL, top-1 agreement and flips, ln(PPL ratio), its correlation, delta-p), each with its standard error where it
    has one, keyed by column; the attributes below name the common ones. ``kl_percentiles`` maps "p99.9" ... "p1"
    to per-token quantiles, ``dp_percentiles`` the same for delta-p, the quantized model's probability of the
    actual next token minus the baseline's. ``base_ppl`` comes from the same forward passes at no extra cost.
    Every standard error is from batch means over ``se_block``-token blocks (neighbouring tokens are correlated;
    see `quantlib.uncertainty`), nan below two blocks.
    """

    kl_max: float
    kl_percentiles: dict[str, float]
    base_ppl: float
    n_tokens: int
    n_windows: int
    window: int
    stride: int
    seconds: float
    backend: str
    baseline_recomputed: bool
    figures: dict[str, float] = field(default_factory=dict)
    base_ppl_se: float = float("nan")
    dp_percentiles: dict[str, float] = field(default_factory=dict)
    se_block: int = BLOCK_TOKENS
    #: Per-token KL in text order (for paired comparisons between schemes; not serialised).
    kl_tokens: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def _figure(self, key: str) -> float:
        return self.figures.get(key, float("nan"))

    kl_mean = property(lambda self: self._figure("kl"))
    kl_se = property(lambda self: self._figure("kl_se"))
    top1_agreement = property(lambda self: self._figure("top1_agreement"))
    top1_se = property(lambda self: self._figure("top1_se"))
    quant_ppl = property(lambda self: self._figure("perplexity"))
    quant_ppl_se = property(lambda self: self._figure("perplexity_se"))
    ln_ppl_ratio = property(lambda self: self._figure("ln_ppl_ratio"))
    ln_ppl_ratio_se = property(lambda self: self._figure("ln_ppl_ratio_se"))
    dp_mean = property(lambda self: self._figure("dp_mean"))
    dp_se = property(lambda self: self._figure("dp_se"))
    dp_rms = property(lambda self: self._figure("dp_rms"))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kl_tokens"}


@dataclass
class EvaluationReport:
    """Result of :func:`perplexity_and_kl`: baseline perplexity plus, per model, ppl and KL."""

    base: PerplexityResult
    perplexity: dict[str, PerplexityResult]
    comparison: dict[str, DistributionComparison]
    #: Windows evaluated and planned; a report is partial until they are equal (streamed updates, a
    #: run stopped when its ranking settled, or one cancelled with ``keep_partial``).
    windows_done: int = 0
    windows_planned: int = 0
    #: "" (ran to the end), "stopped" (the caller's ``stop`` said so) or "cancelled".
    stop_reason: str = ""
    #: Where the baseline's log-probs came from: "forward" (computed), "cache" (every window from
    #: cached hidden states), "cache+forward" (a cached prefix, the rest computed).
    baseline_source: str = "forward"
    #: Why the baseline was not cached, or where it was ("" when caching was not asked for).
    baseline_cache_note: str = ""
    #: Per model ("baseline" included): how its log-probs were read, "sliced" (its output head on the captured
    #: final hidden states, slice by slice; ``max_abs_logprob_diff`` against its own forward output on the
    #: checked positions) or "full" (the forward's logits, with ``note`` saying why).
    output_head: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Seconds by phase, every model together: "forwards" (the baseline's and each model's forward passes, or
    #: the baseline read from its cache) and "output_head" (each model's output head on its final hidden states,
    #: log-softmax, KL and the other per-token figures), timed with the device's queue drained (`device_clock`)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.windows_done >= self.windows_planned

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.to_dict(),
            "perplexity": {k: v.to_dict() for k, v in self.perplexity.items()},
            "comparison": {k: v.to_dict() for k, v in self.comparison.items()},
            "windows_done": self.windows_done, "windows_planned": self.windows_planned,
            "complete": self.complete, "stop_reason": self.stop_reason,
            "baseline_source": self.baseline_source, "baseline_cache_note": self.baseline_cache_note,
            "output_head": self.output_head, "phase_seconds": self.phase_seconds,
        }


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """Text tokens ``[start, end)`` are in the window; ``[score_from, end)`` are scored."""

    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def plan_windows(n_tokens: int, window: int, stride: Optional[int] = None) -> list[Window]:
    """Windows over n_tokens text tokens; the scored parts tile [0, n_tokens) exactly once."""
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise EvaluationError(f"Need window >= 1 and 1 <= stride <= window (got window={window}, stride={stride}).")
    windows, prev_end = [], 0
    for start in range(0, n_tokens, stride):
        end = min(start + window, n_tokens)
        windows.append(Window(start, end, prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal shape (length, scored count) grouped up to batch_size."""
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) >= batch_size or (w.length, w.n_scored) != (batch[0].length, batch[0].n_scored)):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


# --------------------------------------------------------------------------- model helpers


def _model_device(model: Any) -> torch.device:
    """Where inputs must go: the model's own notion (device_map aware), else its first weight."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type == "meta":
        # offloaded to disk (accelerate): inputs go where the hooks execute, the first accelerator in the map, else CPU
        placed = [d for d in (getattr(model, "hf_device_map", None) or {}).values() if d not in ("cpu", "disk")]
        return torch.device(f"cuda:{placed[0]}" if placed and isinstance(placed[0], int) else placed[0]) \
            if placed else torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def backend_name(model_or_device: Any) -> str:
    """'cpu' or 'cuda:0 NVIDIA H100 ...': which hardware produced a number."""
    device = model_or_device if isinstance(model_or_device, torch.device) else _model_device(model_or_device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return device.type


def _resolve_bos(model: Any, bos_token_id: Optional[int]) -> int:
    """BOS from the argument, else from the model config; perplexity needs one, so fail clearly."""
    if bos_token_id is None:
        bos_token_id = getattr(getattr(model, "config", None), "bos_token_id", None)
    if isinstance(bos_token_id, (list, tuple)):
        bos_token_id = bos_token_id[0] if bos_token_id else None
    if bos_token_id is None:
        raise EvaluationError("No BOS token id: pass bos_token_id (e.g. tokenizer.bos_token_id).")
    return int(bos_token_id)


def _as_1d(input_ids: Any) -> torch.Tensor:
    """Accept a 1-D tensor/list or a (1, N) batch; evaluation text is one token stream."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise EvaluationError(f"input_ids must be a non-empty 1-D token sequence (got shape {tuple(ids.shape)}).")
    return ids.cpu()


def _auto_batch_size(model: Any, window: int, batch_size: Optional[int]) -> int:
    """1 on CPU (batching gains nothing there); on GPU as many windows as ~512 MB of logits."""
    if batch_size is not None:
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be >= 1 (got {batch_size}).")
        return int(batch_size)
    if _model_device(model).type != "cuda":
        return 1
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 50_000) or 50_000)
    return max(1, min(16, AUTO_BATCH_LOGIT_BYTES // (window * vocab * 4)))


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _window_inputs(ids: torch.Tensor, batch: list[Window], bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs ``[BOS] + text[start:end-1]`` and the targets of the scored positions."""
    rows, targets = [], []
    for w in batch:
        rows.append(torch.cat([torch.tensor([bos], dtype=torch.long), ids[w.start : w.end - 1]]))
        targets.append(ids[w.score_from : w.end])
    return torch.stack(rows), torch.stack(targets)


def _forward_logits(model: Any, inputs: torch.Tensor, n_scored: int) -> torch.Tensor:
    """The model's logits for (at least) the last n_scored positions."""
    device = _model_device(model)
    inputs = inputs.to(device)
    kwargs: dict[str, Any] = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = n_scored  # skip the lm_head on unscored positions
    return model(**kwargs).logits


def _logprobs(model: Any, inputs: torch.Tensor, n_scored: int) -> torch.Tensor:
    """fp32 log-probs (B, n_scored, V) of the last n_scored positions (the scored suffix)."""
    return _log_softmax(_forward_logits(model, inputs, n_scored)[:, -n_scored:, :])


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs from logits (which it consumes: pass a tensor nobody else reads): the one place they are
    computed, so a baseline rebuilt from cached hidden states goes through exactly the same operations as a
    forward pass."""
    x = logits.float()  # the logits themselves where already fp32: overwritten in place (bit-identical to
    # the out-of-place result, tested), so a window holds one vocabulary-sized tensor per model instead of two
    return torch.log_softmax(x, dim=-1, out=x)


def _target_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the targets (float64 for exact summing)."""
    picked = logprobs.gather(-1, targets.to(logprobs.device).unsqueeze(-1)).squeeze(-1)
    return (-picked).double()


# --------------------------------------------------------------------------- accumulators


@dataclass
class _NllSum:
    """Running NLL total: float64 so 10^5 tokens sum without drift."""

    total: float = 0.0
    count: int = 0
    values: list[torch.Tensor] = field(default_factory=list)  # per token, in text order (for the SE)

    def add(self, nll: torch.Tensor) -> None:
        self.total += float(nll.sum().item())
        self.count += int(nll.numel())
        self.values.append(nll.detach().flatten().double().cpu())

    def series(self) -> torch.Tensor:
        return torch.cat(self.values) if self.values else torch.zeros(0, dtype=torch.float64)

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


@dataclass
class _KlStats:
    """Per-token KL values (kept: n_tokens floats is small) and top-1 agreement count."""

    kl: list[torch.Tensor] = field(default_factory=list)
    agree: int = 0
    nll: _NllSum = field(default_factory=_NllSum)
    base_nll: _NllSum = field(default_factory=_NllSum)  # the baseline's, on the same tokens
    same_top1: list[torch.Tensor] = field(default_factory=list)
    right: list[torch.Tensor] = field(default_factory=list)  # its top-1 is the actual next token
    base_right: list[torch.Tensor] = field(default_factory=list)  # the baseline's is

    def add(self, base_lp: torch.Tensor, quant_lp: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch of windows from full log-probs (B, n, V) of both models."""
        vocab = base_lp.shape[-1]
        base = _ModelRows(logprobs=base_lp.to(quant_lp.device).reshape(-1, vocab))
        (base_nll, base_right), per_model = _window_stats(
            base, {"q": _ModelRows(logprobs=quant_lp.reshape(-1, vocab))}, targets.reshape(-1))
        self.add_window(*per_model["q"], base_nll, base_right)

    def add_window(self, kl: torch.Tensor, same: torch.Tensor, nll: torch.Tensor, right: torch.Tensor,
                   base_nll: torch.Tensor, base_right: torch.Tensor) -> None:
        """Add one batch of windows' per-token values (from `_window_stats`), in text order."""
        self.kl.append(kl.clamp_min(0.0).flatten().cpu())
        same = same.flatten()
        self.same_top1.append(same.cpu())
        self.agree += int(same.sum().item())
        self.right.append(right.flatten().cpu())
        self.base_right.append(base_right.flatten().cpu())
        self.nll.add(nll)
        self.base_nll.add(base_nll)

    def series(self) -> TokenSeries:
        """The per-token series every declared statistic is computed from."""
        return TokenSeries(kl=torch.cat(self.kl), same_top1=torch.cat(self.same_top1), nll=self.nll.series(),
                           base_nll=self.base_nll.series(), right=torch.cat(self.right),
                           base_right=torch.cat(self.base_right), nll_mean=self.nll.mean,
                           base_nll_mean=self.base_nll.mean)


class _ModelRows:
    """One model's scored positions in one batch of windows, flattened to rows: final hidden states that its
    output head turns into log-probs slice by slice (so no window-by-vocabulary tensor is ever made), or, for a
    model whose logits are not its head's output alone, the full log-probs (sliced)."""

    def __init__(self, *, hidden: Optional[torch.Tensor] = None, head: Any = None,
                 logprobs: Optional[torch.Tensor] = None):
        self.hidden, self.head, self.full = hidden, head, logprobs

    @property
    def rows(self) -> int:
        return int((self.full if self.full is not None else self.hidden).shape[0])

    def vocab(self) -> int:
        if self.full is not None:
            return int(self.full.shape[-1])
        weight = getattr(self.head, "weight", None)
        if isinstance(self.head, torch.nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and weight.shape[1] == self.hidden.shape[-1]:
            return int(weight.shape[0])
        return int(self.logprobs(0, 1).shape[-1])  # a packed or unusual head: ask it

    def logprobs(self, start: int, stop: int) -> torch.Tensor:
        if self.full is not None:
            return self.full[start:stop]
        return _log_softmax(self.head(self.hidden[start:stop]))


def _window_stats(base: _ModelRows, models: Mapping[str, _ModelRows], targets: torch.Tensor,
                  times: Optional[dict[str, float]] = None
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, tuple[torch.Tensor, ...]]]:
    """Per-token baseline NLL and whether its top-1 is the actual next token, and, per model, per-token
    KL(base || model), same top-1, NLL and whether its top-1 is the actual next token, for one batch of
    windows, computed HEAD_CHUNK_BYTES of log-probs at a time. The baseline's probabilities and top-1 are
    computed once per slice for every model. ``times`` (if given) gets each model's seconds added, and the
    baseline's under "". KL is ``sum(exp(b) * (b - q))`` per position, in float32, exactly as before slicing."""
    n_rows, vocab = base.rows, base.vocab()
    step = max(1, HEAD_CHUNK_BYTES // (4 * vocab))
    targets = targets.reshape(-1)
    base_nll: list[torch.Tensor] = []
    base_right: list[torch.Tensor] = []
    out: dict[str, list[list[torch.Tensor]]] = {name: [[], [], [], []] for name in models}
    scratch: Optional[torch.Tensor] = None
    clock = time.perf_counter
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        t0 = clock()
        b = base.logprobs(start, stop)
        target = targets[start:stop].to(b.device)
        p = b.exp()
        top = b.argmax(-1)
        base_nll.append(_target_nll(b, target))
        base_right.append(top == target)
        if scratch is None or scratch.device != b.device:
            scratch = torch.empty((min(KL_CHUNK, step), vocab), dtype=b.dtype, device=b.device)
        if times is not None:
            times[""] = times.get("", 0.0) + clock() - t0
        for name, rows in models.items():
            t0 = clock()
            q = rows.logprobs(start, stop)
            if q.device != b.device:
                q = q.to(b.device)
            kl = torch.empty(stop - start, dtype=b.dtype, device=b.device)
            for s in range(0, stop - start, KL_CHUNK):  # (b - q) * p in a small scratch slice, summed per row
                e = min(stop - start, s + KL_CHUNK)
                d = torch.sub(b[s:e], q[s:e], out=scratch[:e - s])
                kl[s:e] = d.mul_(p[s:e]).sum(-1)
            out[name][0].append(kl)
            q_top = q.argmax(-1)
            out[name][1].append(q_top == top)
            out[name][2].append(_target_nll(q, target))
            out[name][3].append(q_top == target)
            del q
            if times is not None:
                times[name] = times.get(name, 0.0) + clock() - t0
        del b, p
    return (torch.cat(base_nll), torch.cat(base_right)), {name: tuple(torch.cat(part) for part in v)
                                                          for name, v in out.items()}


def _percentiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.tensor([p / 100 for p in KL_PERCENTILES], dtype=torch.float64)
    quantiles = torch.quantile(values.double(), q)
    return {f"p{p:g}": float(v) for p, v in zip(KL_PERCENTILES, quantiles)}


def _ppl_result(nll: _NllSum, n_windows: int, window: int, stride: int, seconds: float, backend: str) -> PerplexityResult:
    return PerplexityResult(
        ppl=math.exp(nll.mean), nll=nll.mean, ppl_se=ppl_estimate(nll.series()).se, n_tokens=nll.count, n_windows=n_windows, window=window,
        stride=stride, seconds=seconds, tokens_per_s=nll.count / seconds if seconds > 0 else float("inf"),
        backend=backend,
    )


def _comparison(stats: _KlStats, base_nll: _NllSum, plan: "_Plan", seconds: float, backend: str,
                recomputed: bool, n_windows: Optional[int] = None) -> DistributionComparison:
    series = stats.series()
    kl = series.kl
    return DistributionComparison(
        kl_max=float(kl.max()), kl_percentiles=_percentiles(kl), base_ppl=math.exp(base_nll.mean),
        n_tokens=int(kl.numel()), n_windows=len(plan.windows) if n_windows is None else n_windows,
        window=plan.window, stride=plan.stride, seconds=seconds, backend=backend, baseline_recomputed=recomputed,
        figures=compute_statistics(series), base_ppl_se=ppl_estimate(series.base_nll).se,
        dp_percentiles=_percentiles(torch.exp(-series.nll) - torch.exp(-series.base_nll)), kl_tokens=kl.double(),
    )


# --------------------------------------------------------------------------- the window loop


@dataclass
class _Plan:
    """Everything that fixes which positions are scored, shared by baseline and comparisons."""

    ids: torch.Tensor
    window: int
    stride: int
    bos: int
    batch_size: int
    windows: list[Window]


def _make_plan(model: Any, input_ids: Any, window: int, stride: Optional[int], bos_token_id: Optional[int],
               batch_size: Optional[int]) -> _Plan:
    ids = _as_1d(input_ids)
    stride = window if stride is None else int(stride)
    windows = plan_windows(len(ids), int(window), stride)
    return _Plan(ids, int(window), stride, _resolve_bos(model, bos_token_id),
                 _auto_batch_size(model, int(window), batch_size), windows)


def _run(plan: _Plan, progress: Optional[ProgressFn], cancel: Optional[CancelFn],
         label: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (batch index, model inputs, targets) batch by batch, honouring cancel/progress."""
    done = 0
    for index, batch in enumerate(_batches(plan.windows, plan.batch_size)):
        if cancel is not None and cancel():
            raise Cancelled(f"{label} cancelled after {done} of {len(plan.windows)} windows")
        inputs, targets = _window_inputs(plan.ids, batch, plan.bos)
        yield index, inputs, targets
        done += len(batch)
        if progress is not None:
            progress(done / len(plan.windows), f"{label}: window {done}/{len(plan.windows)}")


def perplexity(
    model: Any,
    input_ids: Any,
    *,
    window: int = DEFAULT_WINDOW,
    stride: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
) -> PerplexityResult:
    """Perplexity of model on input_ids with BOS-started windows (see the module docstring).

    ``bos_token_id`` defaults to ``model.config.bos_token_id``; ``batch_size`` defaults to 1
    on CPU and to ~512 MB of logits per batch on GPU. ``cancel()`` returning True stops
    between batches with :class:`Cancelled`.
    """
    plan = _make_plan(model, input_ids, window, stride, bos_token_id, batch_size)
    nll, t0 = _NllSum(), time.perf_counter()
    with torch.inference_mode():
        for _, inputs, targets in _run(plan, progress, cancel, "perplexity"):
            nll.add(_target_nll(_logprobs(model, inputs, targets.shape[1]), targets))
    return _ppl_result(nll, len(plan.windows), plan.window, plan.stride, time.perf_counter() - t0, backend_name(model))


# --------------------------------------------------------------------------- baselines


@dataclass
class ReferenceLogprobs:
    """A baseline computed once: its perplexity and, if they fit, its log-probs per batch.

    ``stored`` tells whether the log-probs were kept (CPU, fp32, ``nbytes`` bytes); when not,
    ``model`` is kept instead and comparisons recompute the baseline window by window.
    """

    plan: _Plan
    perplexity: PerplexityResult
    stored: bool
    nbytes: int
    logprobs: Optional[list[torch.Tensor]] = None
    model: Any = None

    def batches(self) -> Iterator[torch.Tensor]:
        """Baseline log-probs batch by batch, from memory or recomputed."""
        if self.stored:
            yield from self.logprobs or []
            return
        for _, inputs, targets in _run(self.plan, None, None, "baseline"):
            # inference mode only around the computation: a generator suspended inside `with inference_mode()`
            # leaves the mode on in its caller's thread (for good, if the caller stops early)
            with torch.inference_mode():
                lp = _logprobs(self.model, inputs, targets.shape[1])
            yield lp


def _vocab_size(model: Any) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size:
        return int(size)
    return int(model.get_output_embeddings().weight.shape[0])


def reference_logprobs(
    base_model: Any,
    input_ids: Any,
    *,
    window: int = DEFAULT_WINDOW,
    stride: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    batch_size: Optional[int] = None,
    max_bytes: int = DEFAULT_REFERENCE_BYTES,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
) -> ReferenceLogprobs:
    """Run the baseline once; keep fp32 log-probs if n_tokens x vocab x 4 <= max_bytes.

    Pass the result as ``base`` to :func:`compare_logits` for each quantized model.
    """
    plan = _make_plan(base_model, input_ids, window, stride, bos_token_id, batch_size)
    nbytes = len(plan.ids) * _vocab_size(base_model) * 4
    store = nbytes <= max_bytes
    kept: list[torch.Tensor] = []
    nll, t0 = _NllSum(), time.perf_counter()
    with torch.inference_mode():
        for _, inputs, targets in _run(plan, progress, cancel, "baseline"):
            lp = _logprobs(base_model, inputs, targets.shape[1])
            nll.add(_target_nll(lp, targets))
            if store:
                kept.append(lp.cpu())
    result = _ppl_result(nll, len(plan.windows), plan.window, plan.stride, time.perf_counter() - t0,
                         backend_name(base_model))
    return ReferenceLogprobs(plan=plan, perplexity=result, stored=store, nbytes=nbytes if store else 0,
                             logprobs=kept if store else None, model=None if store else base_model)


def compare_logits(
    base: Any,
    quant_model: Any,
    input_ids: Any = None,
    *,
    window: int = DEFAULT_WINDOW,
    stride: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
) -> DistributionComparison:
    """KL(base || quant), per-token KL quantiles and top-1 agreement, window by window.

    ``base`` is either the baseline model (run alongside, window by window) or a
    :class:`ReferenceLogprobs` from :func:`reference_logprobs`, whose windows, BOS and
    tokens are then used and ``input_ids``/``window``/``stride``/... are ignored.
    """
    if isinstance(base, ReferenceLogprobs):
        return _compare_with_reference(base, quant_model, progress, cancel)
    if input_ids is None:
        raise EvaluationError("compare_logits needs input_ids when base is a model.")
    report = perplexity_and_kl(base, {"model": quant_model}, input_ids, window=window, stride=stride,
                               bos_token_id=bos_token_id, batch_size=batch_size, progress=progress,
                               cancel=cancel)
    return report.comparison["model"]


def _compare_with_reference(ref: ReferenceLogprobs, quant_model: Any, progress: Optional[ProgressFn],
                            cancel: Optional[CancelFn]) -> DistributionComparison:
    stats, base_nll, t0 = _KlStats(), _NllSum(), time.perf_counter()
    base_batches = ref.batches()
    with torch.inference_mode():
        for _, inputs, targets in _run(ref.plan, progress, cancel, "comparison"):
            base_lp = next(base_batches)
            base_nll.add(_target_nll(base_lp, targets))
            stats.add(base_lp, _logprobs(quant_model, inputs, targets.shape[1]), targets)
    return _comparison(stats, base_nll, ref.plan, time.perf_counter() - t0,
                       backend_name(quant_model), recomputed=not ref.stored)


class _HeadPath:
    """How one model's scored positions are read: its final hidden states, captured at its output head's input
    while the head itself is skipped in the forward pass (the head then runs slice by slice in
    `_window_stats`), wherever that gives the model's own log-probs. On the model's first window the head still
    runs on HEAD_CHECK_ROWS positions inside the forward, and the model's output there must match the head
    applied to the captured states (within HEAD_TOLERANCE); a model that soft-caps or rescales its logits after
    the head, or has no head module, or runs it more than once, is read as full log-probs instead."""

    def __init__(self, model: Any):
        self.model = model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = head if isinstance(head, torch.nn.Module) else None
        self.usable: Optional[bool] = None if self.head is not None else False  # None: not checked yet
        self.note = "" if self.head is not None else "the model has no output head module"
        self.max_diff: Optional[float] = None

    def describe(self) -> dict[str, Any]:
        return {"path": "sliced" if self.usable else "full" if self.usable is False else "unchecked",
                "max_abs_logprob_diff": self.max_diff, "note": self.note}

    def rows(self, inputs: torch.Tensor, n_scored: int) -> _ModelRows:
        if self.usable is False:
            return self._full(inputs, n_scored)
        checking = self.usable is None
        keep = min(n_scored, HEAD_CHECK_ROWS)
        captured: list[torch.Tensor] = []

        def pre_hook(_module: Any, args: tuple) -> Optional[tuple]:
            if not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
                captured.append(None)  # not (batch, positions, hidden): leave the head alone
                return None
            captured.append(args[0])
            x = args[0][:, -n_scored:, :]
            return (x[:, :keep] if checking else x[:, :0],) + tuple(args[1:])

        handle = self.head.register_forward_pre_hook(pre_hook)
        try:
            logits = _forward_logits(self.model, inputs, n_scored)
        finally:
            handle.remove()
        if len(captured) != 1:
            return self._give_up(f"its output head ran {len(captured)} times in one forward pass", inputs, n_scored)
        if captured[0] is None:
            return self._give_up("its output head's input is not (batch, positions, hidden)", inputs, n_scored)
        hidden = captured[0][:, -n_scored:, :]
        if checking:
            # The model's own log-probs on the first `keep` positions of each window against its head alone.
            own = _log_softmax(logits[:, -keep:, :]) if logits.shape[1] >= keep else None
            mine = _log_softmax(self.head(hidden[:, :keep, :]))
            if own is None or own.shape != mine.shape:
                return self._give_up("its logits are not its output head's output", inputs, n_scored)
            self.max_diff = float((own - mine.to(own.device)).abs().max())
            if not self.max_diff <= HEAD_TOLERANCE:
                return self._give_up("it changes its output head's logits (soft-capping or scaling), so the head "
                                     "alone would not reproduce them", inputs, n_scored)
            self.usable = True
        del logits
        return _ModelRows(hidden=hidden.reshape(-1, hidden.shape[-1]), head=self.head)

    def _give_up(self, reason: str, inputs: torch.Tensor, n_scored: int) -> _ModelRows:
        self.usable, self.note = False, reason
        return self._full(inputs, n_scored)  # this window again, in full

    def _full(self, inputs: torch.Tensor, n_scored: int) -> _ModelRows:
        logprobs = _logprobs(self.model, inputs, n_scored)
        return _ModelRows(logprobs=logprobs.reshape(-1, logprobs.shape[-1]))


class _Baseline:
    """The baseline's scored positions window by window: from cached final hidden states when the cache has
    them (no forward pass), else from a forward pass (`_HeadPath`), whose captured states are cached for the
    next run when the head alone gives the model's log-probs (see `quantlib.baseline_cache`)."""

    def __init__(self, model: Any, plan: _Plan, use_cache: bool):
        self.model, self.plan = model, plan
        self.path = _HeadPath(model)
        self.use_cache = bool(use_cache) and self.path.head is not None
        self.note = "" if not use_cache or self.use_cache else "not cached: the model has no output head module"
        self.key, self.cached, self.offset = "", None, 0
        self.hidden: list[torch.Tensor] = []  # every window's scored hidden states so far, in order
        self.windows_cached = self.windows_computed = 0
        if self.use_cache:
            from quantlib import baseline_cache

            try:
                dtype = str(next(model.parameters()).dtype).replace("torch.", "")
            except StopIteration:
                dtype = "unknown"
            self.key = baseline_cache.entry_key(baseline_cache.model_fingerprint(model), plan.ids,
                                                window=plan.window, stride=plan.stride, bos=plan.bos,
                                                batch_size=plan.batch_size, dtype=dtype, backend=backend_name(model))
            self.cached = baseline_cache.load(self.key)

    @property
    def source(self) -> str:
        if self.windows_cached and self.windows_computed:
            return "cache+forward"
        return "cache" if self.windows_cached else "forward"

    def rows(self, inputs: torch.Tensor, n_scored: int, n_windows: int, windows_before: int) -> _ModelRows:
        rows = inputs.shape[0] * n_scored
        cached = self.cached
        if cached is not None and windows_before + n_windows <= cached.windows \
                and self.offset + rows <= cached.hidden.shape[0]:
            # Written only by a run whose head check passed on this very model (the key holds its fingerprint).
            h = cached.hidden[self.offset:self.offset + rows]
            self.offset += rows
            self.windows_cached += n_windows
            self.hidden.append(h)
            if self.path.usable is None:
                self.path.usable, self.path.note = True, "checked by the run that cached these states"
            return _ModelRows(hidden=h.to(_model_device(self.model)), head=self.path.head)
        result = self.path.rows(inputs, n_scored)
        self.windows_computed += n_windows
        if self.use_cache:
            if result.hidden is None:
                self._give_up(f"not cached: {self.path.note}")
            else:
                self.offset += rows
                self.hidden.append(result.hidden.detach().cpu())
        return result

    def _give_up(self, note: str) -> None:
        self.use_cache, self.note, self.hidden, self.cached = False, note, [], None

    def save(self, windows_done: int) -> None:
        """Store every window computed so far (a prefix of the plan) when it adds to what is cached."""
        if not self.use_cache or not self.hidden:
            return
        from quantlib import baseline_cache

        have = self.cached.windows if self.cached is not None else 0
        if windows_done <= have:
            self.note = f"from the cache ({have} windows)"
            return
        rows = sum(w.n_scored for w in self.plan.windows[:windows_done])
        hidden = torch.cat(self.hidden)[:rows]  # a window interrupted half-way is not kept
        if hidden.shape[0] < rows:
            return
        path = baseline_cache.save(self.key, hidden, windows_done,
                                   {"windows": windows_done, "planned": len(self.plan.windows)})
        self.note = (f"cached {windows_done} windows' final hidden states" if path else
                     "not cached: larger than the cache bound (QUANTLIB_BASELINE_CACHE_MB)")


UpdateFn = Callable[[EvaluationReport], None]
StopFn = Callable[[EvaluationReport], bool]


def perplexity_and_kl(
    base_model: Any,
    models: Mapping[str, Any],
    input_ids: Any,
    *,
    window: int = DEFAULT_WINDOW,
    stride: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    on_update: Optional[UpdateFn] = None,
    stop: Optional[StopFn] = None,
    keep_partial: bool = False,
    baseline_cache: bool = False,
) -> EvaluationReport:
    """Baseline ppl plus ppl and KL of every model in ``models``, one baseline pass in total.

    All models must be resident; each window's baseline log-probs are computed once and
    compared with every model before moving on, so memory does not grow with len(models).
    Times are per model (its forward plus the comparison), the baseline's its own.

    Streaming: after every batch of windows ``on_update`` receives the report so far (partial:
    ``windows_done < windows_planned``) and ``stop`` may end the run there (``stop_reason``
    "stopped"). With ``keep_partial``, ``cancel()`` returning True ends the run with what was
    computed (``stop_reason`` "cancelled") instead of raising :class:`Cancelled` (which it still
    does before the first batch finishes). ``baseline_cache`` reads and writes the baseline's final
    hidden states (`quantlib.baseline_cache`).
    """
    plan = _make_plan(base_model, input_ids, window, stride, bos_token_id, batch_size)
    base_nll, base_time = _NllSum(), 0.0
    base_right: list[torch.Tensor] = []
    stats = {name: _KlStats() for name in models}
    times = {name: 0.0 for name in models}
    baseline = _Baseline(base_model, plan, baseline_cache)
    paths = {name: _HeadPath(model) for name, model in models.items()}
    done, reason = 0, ""
    phases = {"forwards": 0.0, "output_head": 0.0}

    def report() -> EvaluationReport:
        base = _ppl_result(base_nll, done, plan.window, plan.stride, base_time, backend_name(base_model))
        if base_nll.count:
            base.figures = compute_statistics(TokenSeries.of_baseline(base_nll.series(), torch.cat(base_right),
                                                                      base_nll.mean))
        ppls = {name: _ppl_result(stats[name].nll, done, plan.window, plan.stride, times[name], backend_name(m))
                for name, m in models.items()}
        comps = {name: _comparison(stats[name], base_nll, plan, times[name], backend_name(m), recomputed=False,
                                   n_windows=done)
                 for name, m in models.items()}
        return EvaluationReport(base=base, perplexity=ppls, comparison=comps, windows_done=done,
                                windows_planned=len(plan.windows), stop_reason=reason,
                                baseline_source=baseline.source, baseline_cache_note=baseline.note,
                                output_head={"baseline": baseline.path.describe(),
                                             **{name: path.describe() for name, path in paths.items()}},
                                phase_seconds=dict(phases))

    try:
        with torch.inference_mode():
            for _, inputs, targets in _run(plan, progress, cancel, "evaluation"):
                n_scored = targets.shape[1]
                t_window = device_clock()
                base_rows = baseline.rows(inputs, n_scored, inputs.shape[0], done)
                base_time += device_clock() - t_window
                rows = {}
                for name, model in models.items():
                    t0 = device_clock()
                    rows[name] = paths[name].rows(inputs, n_scored)
                    trim_heap()  # a forward pass leaves up to 0.5 GB of freed pages (LLM.int8() on CPU)
                    times[name] += device_clock() - t0
                t_head = device_clock()
                phases["forwards"] += t_head - t_window
                spent: dict[str, float] = {}
                (window_nll, window_right), per_model = _window_stats(base_rows, rows, targets, spent)
                base_nll.add(window_nll)
                base_right.append(window_right.flatten().cpu())
                base_time += spent.pop("", 0.0)
                for name, values in per_model.items():
                    stats[name].add_window(*values, window_nll, window_right)
                    times[name] += spent.get(name, 0.0)
                phases["output_head"] += device_clock() - t_head
                del base_rows, rows, per_model
                trim_heap()  # a window frees hundreds of MB of vocabulary-sized slices; glibc keeps the pages
                done += inputs.shape[0]
                if done < len(plan.windows) and (on_update is not None or stop is not None):
                    partial = report()
                    if on_update is not None:
                        on_update(partial)
                    if stop is not None and stop(partial):
                        reason = "stopped"
                        break
    except Cancelled:
        if not keep_partial or done == 0:
            raise
        reason = "cancelled"
    finally:
        baseline.save(done)
    final = report()
    if on_update is not None and reason != "stopped":  # a stopped run's last update was this report
        on_update(final)
    return final


def window_logprobs(model: Any, text_ids: Any, bos_token_id: Optional[int] = None) -> torch.Tensor:
    """fp32 log-probs (n, vocab) that `model` gives every token of one window ``[BOS] + text_ids[:-1]``."""
    ids = _as_1d(text_ids)
    inputs, _ = _window_inputs(ids, [Window(0, len(ids), 0)], _resolve_bos(model, bos_token_id))
    with torch.inference_mode():
        return _logprobs(model, inputs, len(ids))[0]


# --------------------------------------------------------------------------- tokenization


def tokenize_for_eval(tokenizer: Any, text: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    """First max_tokens tokens of text (no special tokens: windows add BOS themselves).

    Tokenizes a growing prefix instead of the whole text, so asking for 4k tokens of a
    large file stays fast; the last token of a cut prefix is dropped as it may be split.
    """
    if max_tokens is not None and max_tokens < 1:
        raise EvaluationError(f"max_tokens must be >= 1 (got {max_tokens}).")
    chars = len(text) if max_tokens is None else max_tokens * 8
    while True:
        whole = chars >= len(text)
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if not whole:
            ids = ids[:-1]
        if whole or (max_tokens is not None and len(ids) >= max_tokens):
            break
        chars *= 2
    ids = ids if max_tokens is None else ids[:max_tokens]
    if not ids:
        raise EvaluationError("The text produced no tokens to evaluate on.")
    return torch.tensor(ids, dtype=torch.long)
