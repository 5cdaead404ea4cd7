"""Issue 11: evaluation that streams its figures, stops early with what it computed, and reuses a
baseline's cached final hidden states exactly."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import LlamaForCausalLM

from quantlib import baseline_cache
from quantlib.errors import Cancelled
from quantlib.evaluation import perplexity_and_kl, plan_windows

from tests.conftest import tiny_llama_config

VOCAB = 80


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLIB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(VOCAB)).eval()


def _noisy(model, scale, seed):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return out


@pytest.fixture(scope="module")
def models(base):
    return {"small": _noisy(base, 0.02, 1), "large": _noisy(base, 0.2, 2)}


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (512,), generator=g)


class Counting(torch.nn.Module):
    """Counts forward passes of the model it wraps (and exposes its output head)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.config = inner, 0, inner.config

    def forward(self, **kwargs):
        self.calls += 1
        return self.inner(**kwargs)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_updates_stream_and_end_with_the_full_report(base, models, ids):
    seen = []
    report = perplexity_and_kl(base, models, ids, window=64, on_update=seen.append)
    n = len(plan_windows(len(ids), 64))
    assert [r.windows_done for r in seen] == list(range(1, n + 1))
    assert [r.comparison["small"].n_tokens for r in seen] == [64 * k for k in range(1, n + 1)]
    assert not any(r.complete for r in seen[:-1]) and seen[-1].complete and report.complete
    # The last update is the report itself; earlier ones are the same statistics on a prefix.
    assert seen[-1].comparison["large"].kl_mean == report.comparison["large"].kl_mean
    prefix = perplexity_and_kl(base, models, ids[:128], window=64)
    assert seen[1].comparison["large"].kl_mean == pytest.approx(prefix.comparison["large"].kl_mean, rel=1e-12)
    assert seen[1].base.ppl == pytest.approx(prefix.base.ppl, rel=1e-12)
    # Standard errors narrow as tokens accumulate (noisy in general; here 8x the tokens).
    assert seen[-1].comparison["large"].kl_se < seen[1].comparison["large"].kl_se


def test_stop_keeps_what_was_computed(base, models, ids):
    report = perplexity_and_kl(base, models, ids, window=64, stop=lambda r: r.windows_done >= 3)
    assert report.windows_done == 3 and report.windows_planned == 8 and not report.complete
    assert report.stop_reason == "stopped"
    assert report.comparison["small"].n_tokens == 192 and report.comparison["small"].n_windows == 3
    assert report.to_dict()["complete"] is False


def test_cancel_keeps_partial_only_when_asked(base, models, ids):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        perplexity_and_kl(base, models, ids, window=64, cancel=cancel)
    calls.clear()
    report = perplexity_and_kl(base, models, ids, window=64, cancel=cancel, keep_partial=True)
    assert report.stop_reason == "cancelled" and report.windows_done == 2
    # Nothing computed yet: cancelling still raises, there is nothing to keep.
    with pytest.raises(Cancelled):
        perplexity_and_kl(base, models, ids, window=64, cancel=lambda: True, keep_partial=True)


def test_cached_baseline_is_exact_and_skips_the_forward(base, models, ids):
    plain = perplexity_and_kl(base, models, ids, window=64, stride=48)
    counting = Counting(base)
    first = perplexity_and_kl(counting, models, ids, window=64, stride=48, baseline_cache=True)
    n = len(plan_windows(len(ids), 64, 48))
    assert counting.calls == n and first.baseline_source == "forward"
    assert "cached" in first.baseline_cache_note
    counting.calls = 0
    second = perplexity_and_kl(counting, models, ids, window=64, stride=48, baseline_cache=True)
    assert counting.calls == 0 and second.baseline_source == "cache"
    for name in models:  # bit for bit: the head sees the very states the forward pass gave it
        assert second.comparison[name].kl_mean == plain.comparison[name].kl_mean == first.comparison[name].kl_mean
        assert torch.equal(second.comparison[name].kl_tokens, plain.comparison[name].kl_tokens)
    assert second.base.ppl == plain.base.ppl
    # Another stride, other tokens or another model is another entry.
    counting.calls = 0
    perplexity_and_kl(counting, models, ids, window=64, baseline_cache=True)
    perplexity_and_kl(counting, models, ids[:-1], window=64, stride=48, baseline_cache=True)
    assert counting.calls == 8 + n
    assert len(baseline_cache.entries()) == 3


def test_a_stopped_run_caches_its_prefix_and_the_next_computes_the_rest(base, models, ids):
    counting = Counting(base)
    perplexity_and_kl(counting, models, ids, window=64, baseline_cache=True, stop=lambda r: r.windows_done >= 3)
    assert counting.calls == 3
    counting.calls = 0
    full = perplexity_and_kl(counting, models, ids, window=64, baseline_cache=True)
    assert counting.calls == 5 and full.baseline_source == "cache+forward"
    plain = perplexity_and_kl(base, models, ids, window=64)
    assert full.comparison["large"].kl_mean == plain.comparison["large"].kl_mean
    counting.calls = 0
    perplexity_and_kl(counting, models, ids, window=64, baseline_cache=True)
    assert counting.calls == 0


def test_a_model_that_rescales_its_logits_is_never_cached(base, models, ids):
    class Capped(Counting):
        def forward(self, **kwargs):
            out = super().forward(**kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)  # Gemma-2 style soft-capping
            return out

    capped = Capped(base)
    report = perplexity_and_kl(capped, models, ids, window=64, baseline_cache=True)
    assert "soft-capping" in report.baseline_cache_note and baseline_cache.entries() == []
    assert report.baseline_source == "forward"


def test_fingerprint_sees_every_weight(base):
    a = baseline_cache.model_fingerprint(copy.deepcopy(base))
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    assert baseline_cache.model_fingerprint(changed) != a
    assert baseline_cache.model_fingerprint(copy.deepcopy(base)) == a


def test_cache_is_bounded_and_atomic_under_concurrent_writers(monkeypatch):
    monkeypatch.setenv("QUANTLIB_BASELINE_CACHE_MB", str(3 * 400 * 64 * 4 / 2**20 + 0.01))  # room for 3 entries
    errors = []

    def writer(i):
        try:
            for j in range(5):
                baseline_cache.save(f"k{i}", torch.full((400, 64), float(i * 10 + j)), windows=j + 1)
                got = baseline_cache.load(f"k{i}")
                assert got is None or (got.hidden.shape == (400, 64) and got.hidden.unique().numel() == 1)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + \
              [threading.Thread(target=writer, args=(0,))]  # two writers of the same entry
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert baseline_cache.total_bytes() <= baseline_cache.max_bytes()
    assert 1 <= len(baseline_cache.entries()) <= 3
    assert not [p for p in baseline_cache.cache_folder().iterdir() if p.name.endswith(".tmp")]
    assert baseline_cache.clear() >= 1 and baseline_cache.entries() == []


def test_a_damaged_cache_entry_is_a_miss_and_is_replaced(base, models, ids):
    counting = Counting(base)
    perplexity_and_kl(counting, models, ids, window=64, baseline_cache=True)
    [entry] = baseline_cache.entries()
    entry["path"].write_bytes(b"not a safetensors file" * 10)
    counting.calls = 0
    report = perplexity_and_kl(counting, models, ids, window=64, baseline_cache=True)
    assert counting.calls == 8 and report.baseline_source == "forward"  # recomputed, no traceback
    counting.calls = 0
    perplexity_and_kl(counting, models, ids, window=64, baseline_cache=True)
    assert counting.calls == 0  # the entry was written again


def _head_calls(model, monkeypatch):
    """Row counts of every call of the model's output head."""
    head, calls = model.get_output_embeddings(), []
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda x: calls.append(tuple(x.shape)) or original(x))
    return calls


def test_vocabulary_work_runs_in_slices_from_the_output_head(base, models, ids, monkeypatch):
    """No window-by-vocabulary tensor is made: the forward passes skip their head (after checking it on the first
    window's first positions), and the head runs on slices of captured hidden states; the figures do not depend
    on the slice size and equal the full-logits path."""
    import quantlib.evaluation as ev
    from quantlib.evaluation import compare_logits, reference_logprobs

    whole = perplexity_and_kl(base, models, ids, window=64)
    monkeypatch.setattr(ev, "HEAD_CHUNK_BYTES", 24 * VOCAB * 4)  # 24 positions per slice
    calls = _head_calls(base, monkeypatch)
    sliced = perplexity_and_kl(base, models, ids, window=64)
    hidden = base.config.hidden_size
    in_forward = [c for c in calls if len(c) == 3]
    # The check, on the first window only: the forward's head and the head alone, on the same positions.
    assert in_forward[:2] == [(1, ev.HEAD_CHECK_ROWS, hidden)] * 2
    assert set(in_forward[2:]) == {(1, 0, hidden)} and len(in_forward) == 2 + 7  # later forwards skip it
    slices = [c for c in calls if len(c) == 2]
    assert slices and max(rows for rows, _ in slices) == 24 and sum(rows for rows, _ in slices) == len(ids)
    assert sliced.output_head["baseline"]["path"] == "sliced"
    assert sliced.output_head["large"]["max_abs_logprob_diff"] <= ev.HEAD_TOLERANCE
    full = compare_logits(reference_logprobs(base, ids, window=64), models["large"])  # full log-probs per window
    for report in (whole, sliced):
        assert report.comparison["large"].kl_mean == pytest.approx(full.kl_mean, rel=1e-6)
        assert report.comparison["large"].top1_agreement == full.top1_agreement
        assert report.perplexity["large"].ppl == pytest.approx(full.quant_ppl, rel=1e-9)
        assert report.base.ppl == pytest.approx(full.base_ppl, rel=1e-9)
    assert torch.allclose(sliced.comparison["large"].kl_tokens, whole.comparison["large"].kl_tokens, atol=1e-7)


def test_models_whose_head_is_not_the_whole_story_are_read_in_full(base, models, ids):
    """A compared model that soft-caps after its head, or runs its head twice, gets full log-probs (with the
    reason), and its figures equal those of the full-logits path."""
    from quantlib.evaluation import compare_logits, reference_logprobs

    class Capped(Counting):
        def forward(self, **kwargs):
            out = super().forward(**kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    class Twice(Counting):
        def forward(self, **kwargs):
            self.inner(**kwargs)
            return super().forward(**kwargs)

    class Flat(Counting):  # calls its head on (positions, hidden) rows
        def forward(self, **kwargs):
            from types import SimpleNamespace

            self.calls += 1
            h = self.inner.model(**kwargs).last_hidden_state
            return SimpleNamespace(logits=self.inner.lm_head(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:2], -1))

    odd = {"capped": Capped(models["large"]), "twice": Twice(models["small"]), "flat": Flat(models["large"])}
    report = perplexity_and_kl(base, odd, ids, window=64)
    assert report.output_head["capped"]["path"] == "full" and "soft-capping" in report.output_head["capped"]["note"]
    assert report.output_head["twice"]["path"] == "full" and "2 times" in report.output_head["twice"]["note"]
    from types import SimpleNamespace

    from quantlib.reports import output_head_text

    lines = output_head_text(SimpleNamespace(extra={"output_head": report.output_head}))
    assert report.output_head["flat"]["path"] == "full" and "not (batch" in report.output_head["flat"]["note"]
    assert [line.split(":")[0] for line in lines] == ["capped", "twice", "flat"]  # the baseline was sliced: not listed
    reference = reference_logprobs(base, ids, window=64)
    for name, model in odd.items():
        full = compare_logits(reference, model)
        assert report.comparison[name].kl_mean == pytest.approx(full.kl_mean, rel=1e-6), name
        assert report.perplexity[name].ppl == pytest.approx(full.quant_ppl, rel=1e-9), name
