"""Perplexity windows (BOS-started, no double counting) and KL / top-1 against a baseline."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from quantlib.errors import Cancelled
from quantlib.evaluation import (
    EvaluationError,
    compare_logits,
    perplexity,
    perplexity_and_kl,
    plan_windows,
    reference_logprobs,
    tokenize_for_eval,
)

from tests.conftest import tiny_llama_config

VOCAB = 80
BOS = 1


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(VOCAB)).eval()


@pytest.fixture(scope="module")
def uniform_model():
    """Zero lm_head: every next-token distribution is uniform, so ppl must equal the vocab size."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (100,), generator=g)


class Recorder(torch.nn.Module):
    """Wraps a model and keeps every input batch, to check what the windows looked like."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.clone())
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def _manual_nll_sum(model, ids, window, stride):
    """Straightforward reference: one window at a time, full logits, cross-entropy."""
    total, prev_end = 0.0, 0
    for start in range(0, len(ids), stride):
        end = min(start + window, len(ids))
        inputs = torch.cat([torch.tensor([BOS]), ids[start : end - 1]]).unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=inputs).logits[0].double(), -1)
        targets = ids[start:end]
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total += float(nll[prev_end - start :].sum())
        prev_end = end
        if end == len(ids):
            break
    return total


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n, window, stride", [(100, 32, None), (100, 32, 16), (100, 32, 7), (5, 32, None),
                                               (64, 32, 32), (1, 1, 1), (33, 32, 31)])
def test_scored_parts_tile_the_text_once(n, window, stride):
    windows = plan_windows(n, window, stride)
    scored = [i for w in windows for i in range(w.score_from, w.end)]
    assert scored == list(range(n))
    assert all(w.length <= window and w.start <= w.score_from < w.end for w in windows)


def test_window_count_hf_style():
    assert len(plan_windows(100, 32, 16)) == 6
    assert len(plan_windows(100, 32)) == 4


def test_bad_window_settings():
    with pytest.raises(EvaluationError):
        plan_windows(10, 8, 9)
    with pytest.raises(EvaluationError):
        plan_windows(10, 0)


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("window, stride", [(32, None), (32, 16), (100, None), (17, 5)])
def test_uniform_logits_give_ppl_equal_to_vocab(uniform_model, ids, window, stride):
    result = perplexity(uniform_model, ids, window=window, stride=stride)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-6)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result.n_tokens == len(ids)
    assert result.n_windows == len(plan_windows(len(ids), window, stride))
    assert result.backend == "cpu" and result.seconds > 0 and result.tokens_per_s > 0


def test_every_window_starts_with_bos(tiny_model, ids):
    rec = Recorder(tiny_model)
    perplexity(rec, ids, window=32, stride=16, bos_token_id=BOS)
    windows = plan_windows(len(ids), 32, 16)
    assert len(rec.calls) == len(windows)
    for call, w in zip(rec.calls, windows):
        assert call.shape == (1, w.length)
        assert call[0, 0].item() == BOS
        assert torch.equal(call[0, 1:], ids[w.start : w.end - 1])


@pytest.mark.parametrize("window, stride", [(32, None), (32, 16), (32, 5), (100, None)])
def test_matches_manual_reference(tiny_model, ids, window, stride):
    result = perplexity(tiny_model, ids, window=window, stride=stride)
    expected = _manual_nll_sum(tiny_model, ids, window, stride or window)
    assert result.nll * result.n_tokens == pytest.approx(expected, rel=1e-5)


def test_batching_does_not_change_the_result(tiny_model, ids):
    one = perplexity(tiny_model, ids, window=16, batch_size=1)
    many = perplexity(tiny_model, ids, window=16, batch_size=4)
    assert many.ppl == pytest.approx(one.ppl, rel=1e-5)


def test_bos_defaults_to_model_config(tiny_model, ids):
    assert perplexity(tiny_model, ids, window=32).ppl == perplexity(tiny_model, ids, window=32, bos_token_id=1).ppl


def test_progress_and_cancel(tiny_model, ids):
    seen = []
    perplexity(tiny_model, ids, window=32, progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 4
    calls = iter([False, True])
    with pytest.raises(Cancelled):
        perplexity(tiny_model, ids, window=32, cancel=lambda: next(calls))


def test_accepts_batch_shaped_ids_and_rejects_empty(tiny_model, ids):
    assert perplexity(tiny_model, ids.unsqueeze(0), window=32).n_tokens == len(ids)
    with pytest.raises(EvaluationError):
        perplexity(tiny_model, torch.tensor([], dtype=torch.long))


# --------------------------------------------------------------------------- KL / top-1


@pytest.fixture(scope="module")
def perturbed(tiny_model):
    model = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.abs().mean())
    return model


def test_model_against_itself(tiny_model, ids):
    comp = compare_logits(tiny_model, tiny_model, ids, window=32)
    assert comp.kl_mean == 0.0 and comp.kl_max == 0.0
    assert comp.top1_agreement == 1.0
    assert comp.base_ppl == pytest.approx(comp.quant_ppl)
    assert comp.n_tokens == len(ids) and comp.backend == "cpu"


def test_perturbed_model_diverges(tiny_model, perturbed, ids):
    comp = compare_logits(tiny_model, perturbed, ids, window=32, stride=16)
    assert comp.kl_mean > 0
    assert comp.kl_max >= comp.kl_percentiles["p99"] >= comp.kl_percentiles["p50"] >= 0
    assert 0 <= comp.top1_agreement <= 1
    assert comp.quant_ppl == pytest.approx(perplexity(perturbed, ids, window=32, stride=16).ppl, rel=1e-6)


def test_kl_matches_direct_formula(tiny_model, perturbed, ids):
    inputs = torch.cat([torch.tensor([BOS]), ids[:-1]]).unsqueeze(0)
    with torch.no_grad():
        p = torch.log_softmax(tiny_model(input_ids=inputs).logits.double(), -1)
        q = torch.log_softmax(perturbed(input_ids=inputs).logits.double(), -1)
    per_token = (p.exp() * (p - q)).sum(-1).flatten().clamp_min(0).numpy()
    comp = compare_logits(tiny_model, perturbed, ids, window=len(ids))
    assert comp.kl_mean == pytest.approx(per_token.mean(), rel=1e-4)
    # Tail and agreement against numpy on the same per-token values (linear-interpolated percentiles).
    import numpy as np

    # The engine works in float32; tiny per-token KLs (1e-4) carry float32 rounding of ~0.2%, so the tail
    # is checked on float32 values computed here from the logits, to 1e-5.
    with torch.no_grad():
        p32 = torch.log_softmax(tiny_model(input_ids=inputs).logits.float(), -1)
        q32 = torch.log_softmax(perturbed(input_ids=inputs).logits.float(), -1)
    kl32 = (p32.exp() * (p32 - q32)).sum(-1).flatten().clamp_min(0).double().numpy()
    assert comp.kl_max == pytest.approx(kl32.max(), rel=1e-5)
    for name, value in comp.kl_percentiles.items():
        assert value == pytest.approx(np.percentile(kl32, float(name[1:])), rel=1e-5), name
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert 0 < agree < 1  # the perturbation flips some tokens, so a wrong axis would show
    assert comp.top1_agreement == pytest.approx(agree, abs=1e-12)


@pytest.mark.parametrize("max_bytes", [2**30, 0])
def test_cached_reference_equals_direct(tiny_model, perturbed, ids, max_bytes):
    ref = reference_logprobs(tiny_model, ids, window=32, stride=16, max_bytes=max_bytes)
    assert ref.stored == (max_bytes > 0)
    assert ref.perplexity.ppl == pytest.approx(perplexity(tiny_model, ids, window=32, stride=16).ppl)
    direct = compare_logits(tiny_model, perturbed, ids, window=32, stride=16)
    cached = compare_logits(ref, perturbed)
    assert cached.kl_mean == pytest.approx(direct.kl_mean, rel=1e-6)
    assert cached.top1_agreement == direct.top1_agreement
    assert cached.baseline_recomputed == (max_bytes == 0)
    assert compare_logits(ref, perturbed).kl_mean == cached.kl_mean  # reusable


def test_many_models_one_baseline_pass(tiny_model, perturbed, ids):
    rec = Recorder(tiny_model)
    report = perplexity_and_kl(rec, {"same": tiny_model, "noisy": perturbed}, ids, window=32, bos_token_id=BOS)
    assert len(rec.calls) == len(plan_windows(len(ids), 32))  # baseline ran once per window
    assert report.comparison["same"].kl_mean == 0.0
    assert report.comparison["noisy"].kl_mean > 0
    assert report.perplexity["noisy"].ppl == pytest.approx(perplexity(perturbed, ids, window=32).ppl, rel=1e-6)
    assert report.base.ppl == pytest.approx(perplexity(tiny_model, ids, window=32).ppl, rel=1e-6)
    assert set(report.to_dict()["comparison"]) == {"same", "noisy"}


# --------------------------------------------------------------------------- tokenization


def test_tokenize_prefix_matches_full(tiny_tokenizer):
    text = "the quick brown fox jumps over the lazy dog. " * 50
    full = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenize_for_eval(tiny_tokenizer, text, 100)
    assert ids.dtype == torch.long and ids.tolist() == full[:100]
    assert tokenize_for_eval(tiny_tokenizer, text, None).tolist() == full
    assert len(tokenize_for_eval(tiny_tokenizer, "short", 100)) == 5


def test_tokenize_empty_text(tiny_tokenizer):
    with pytest.raises(EvaluationError):
        tokenize_for_eval(tiny_tokenizer, "", 10)


# --------------------------------------------------------------------------- default model (slow)


@pytest.mark.slow
def test_default_model_perplexity_on_builtin_eval(default_model):
    from quantlib.corpus import builtin_text

    ids = tokenize_for_eval(default_model.tokenizer, builtin_text("eval"), 4 * 1024)
    assert len(ids) == 4096
    result = perplexity(default_model.model, ids, window=1024, bos_token_id=default_model.tokenizer.bos_token_id)
    print(f"default fp32 ppl on 4x1024 eval tokens: {result.ppl:.2f} in {result.seconds:.1f} s ({result.backend})")
    assert result.n_tokens == 4096 and result.n_windows == 4
    assert 10 < result.ppl < 60


def test_a_recomputed_reference_abandoned_midway_leaves_no_inference_mode_behind(tiny_model, perturbed, ids):
    """A cancelled comparison against a recomputed (not stored) reference stops its baseline generator between
    batches; inference mode must not stay on in the caller's thread (it silently broke later backward passes)."""
    from quantlib.evaluation import compare_logits, reference_logprobs

    ref = reference_logprobs(tiny_model, ids, window=32, max_bytes=0)  # recompute the baseline batch by batch
    calls = iter([False, False, True, True, True])
    with pytest.raises(Cancelled):
        compare_logits(ref, perturbed, cancel=lambda: next(calls))
    assert not torch.is_inference_mode_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    assert x.grad is not None


def test_log_softmax_in_place_is_bit_identical_to_torch():
    """`_log_softmax` overwrites fp32 logits in place (one vocabulary-sized tensor per window instead of two): the
    values are bit for bit torch's out-of-place log-softmax, and fp16 logits are converted, not overwritten."""
    from quantlib.evaluation import _log_softmax

    torch.manual_seed(0)
    logits = torch.randn(2, 37, 1000) * 7
    expected = torch.log_softmax(logits, dim=-1)
    work = logits.clone()
    out = _log_softmax(work)
    assert torch.equal(out, expected) and out.data_ptr() == work.data_ptr()
    half = logits.half()
    out16 = _log_softmax(half)
    assert torch.equal(out16, torch.log_softmax(half.float(), dim=-1)) and torch.equal(half, logits.half())
