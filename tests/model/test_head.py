"""The output head (radd_fast/model/head.py): its PyTorch Gumbel noise is standard Gumbel
(Kolmogorov-Smirnov against the CDF) and fresh between draws and positions; its two log-probs at
selected rows, every real token's ([N, V-1]) and the targets' ([N]), under their own names; the
adaptive decoders' token statistics (token, log-probability, entropy) on the kernel and torch paths;
the sampler's noise keys distinct over seeds and streams, and each (key, noise id) drawing noise of its
own on both paths."""
from __future__ import annotations

import pytest
import torch

from radd_fast.kernels.utils import triton_runs_on
from radd_fast.model import head as head_module
from radd_fast.model.head import gumbel, noise_key
from radd_fast.sampling.strategies import make_strategy
from tests.support.stats import ks_critical, ks_gumbel
from tests.support.uniform_head import LENGTH as UNIFORM_LENGTH
from tests.support.uniform_head import assert_iid_uniform, assert_independent_pairs, uniform_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_gumbel_is_standard_gumbel_and_fresh(dtype):
    gen = torch.Generator().manual_seed(0)
    x = gumbel((100, 200), dtype, "cpu", gen)
    assert x.dtype == dtype and x.shape == (100, 200) and bool(torch.isfinite(x).all())
    assert ks_gumbel(x) < ks_critical(x.numel())
    y = gumbel((100, 200), dtype, "cpu", gen)  # the next draw from the same generator
    assert ks_gumbel(torch.cat([x, y])) < ks_critical(2 * x.numel())
    assert abs(float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]).double())[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([x[:, 1:].flatten(), x[:, :-1].flatten()]).double())[0, 1])) < 0.03


def test_vocab_and_target_log_probs_say_what_they_return(tiny_model):
    """``vocab_log_probs(h) -> [N, V-1]`` and ``target_log_probs(h, targets) -> [N]``, the same names
    on the model and on its head (the head's were ``log_probs`` / ``log_probs_at``, the model's
    ``log_probs_at``: one name for both shapes)."""
    torch.manual_seed(0)
    head, V = tiny_model.output_head(), tiny_model.vocab_size
    h = tiny_model.hidden(torch.randint(0, V - 1, (2, 16))).reshape(-1, tiny_model.config.model.hidden_size)[:5]
    targets = torch.tensor([0, 3, 7, 1, 2])
    every = head.vocab_log_probs(h)
    assert every.shape == (5, V - 1) and every.dtype == torch.float32
    assert torch.allclose(every.exp().sum(-1), torch.ones(5), atol=1e-5)  # normalised over the real tokens
    assert torch.equal(tiny_model.vocab_log_probs(h), every)
    chosen = head.target_log_probs(h, targets)
    assert chosen.shape == (5,) and torch.equal(chosen, every.gather(-1, targets[:, None])[:, 0])
    assert torch.equal(tiny_model.target_log_probs(h, targets), chosen)
    for old in ("log_probs", "log_probs_at"):
        assert not hasattr(head, old) and not hasattr(tiny_model, old)


# ---------------------------------------------------------------- the adaptive decoders' statistics
needs_kernel_path = pytest.mark.skipif(not triton_runs_on(torch.empty(0)),
                                       reason="the kernel path needs TRITON_INTERPRET=1 on the CPU")


def _rows_and_ids(model, P: int = 12):
    """P hidden rows of the tiny model and their noise ids (sample x length + position, as the engine's)."""
    torch.manual_seed(1)
    x = torch.randint(0, model.vocab_size - 1, (2, model.length))
    h = model.hidden(x).reshape(-1, model.config.model.hidden_size)[3:3 + P].detach()
    return h, torch.arange(P) * 5 + 3


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernel_path), False],
                         ids=["kernels", "torch"])
@pytest.mark.parametrize("strategy", [("direct", None), ("top_k", 3), ("top_p", 0.8)], ids=lambda s: s[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_stats_are_sample_ats_tokens_with_their_log_probs_and_entropies(tiny_model, use_kernels, strategy,
                                                                              dtype):
    """token_stats(h, strategy, key, ids) draws the tokens sample_at writes for that key and ids, with the
    log-probability and entropy of the distribution they are drawn from (the filtered one under top_k /
    top_p), against a float64 log-softmax of the head's logits."""
    head = tiny_model.output_head()
    sampler = head.sampler(dtype, use_kernels=use_kernels)
    h, ids = _rows_and_ids(tiny_model)
    chosen = make_strategy(*strategy)
    key = noise_key(3, 1)
    with torch.no_grad():
        stats = sampler.token_stats(h, chosen, key, ids)
        x_flat = torch.full((len(ids),), -1)
        sampler.sample_at(h, torch.arange(len(ids)), x_flat, chosen, key, ids)
        logp = chosen.filter(head.logits(h)[:, :head.n_vocab]).double().log_softmax(-1)
    assert torch.equal(stats.tokens, x_flat)
    assert stats.log_prob.dtype == stats.entropy.dtype == torch.float32
    assert torch.allclose(stats.log_prob.double(), logp.gather(-1, stats.tokens[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    entropy = -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)
    assert torch.allclose(stats.entropy.double(), entropy, atol=1e-5, rtol=1e-5)


@needs_kernel_path
def test_token_stats_take_the_one_pass_kernel_for_direct_only(tiny_model, monkeypatch):
    """With the kernels, direct goes through kernels/token_stats.py (the kernel refuses top_k / top_p,
    which go through the filtered logits); the kernel and the torch path draw the same tokens."""
    calls = []
    real = head_module.token_stats
    monkeypatch.setattr(head_module, "token_stats", lambda *a, **k: calls.append(k["noise_ids"]) or real(*a, **k))
    head = tiny_model.output_head()
    h, ids = _rows_and_ids(tiny_model)
    with torch.no_grad():
        fused = head.sampler(torch.float32, use_kernels=True).token_stats(h, make_strategy("direct"), 11, ids)
        assert len(calls) == 1 and torch.equal(calls[0], ids)
        head.sampler(torch.float32, use_kernels=True).token_stats(h, make_strategy("top_k", 4), 11, ids)
        plain = head.sampler(torch.float32, use_kernels=False).token_stats(h, make_strategy("direct"), 11, ids)
    assert len(calls) == 1
    assert torch.equal(fused.tokens, plain.tokens)
    assert torch.allclose(fused.entropy, plain.entropy, atol=1e-5) and torch.allclose(fused.log_prob, plain.log_prob,
                                                                                        atol=1e-5)


# ---- the keys of the sampler's noise ------------------------------------------------------------------------------
def test_noise_keys_are_distinct_over_seeds_and_streams():
    """noise_key(seed, stream) keys a run's streams (head noise, reveal schedule, decoders): no two (seed, stream)
    pairs of a grid share a key (a key shared between one seed's schedule and another seed's head would tie
    two runs that should be independent), consecutive and far-apart seeds alike, and every key fits Philox's 64 bits."""
    seeds = [*range(2048), 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**62 - 1, 2**63 - 1]
    keys = {(seed, stream): noise_key(seed, stream) for seed in seeds for stream in range(4)}
    assert len(set(keys.values())) == len(keys)
    assert all(0 <= key < 2**64 for key in keys.values())


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernel_path), False],
                         ids=["kernels", "torch"])
@pytest.mark.parametrize("strategy", [("direct", None), ("top_k", 8)], ids=lambda s: s[0])
def test_each_key_and_noise_id_draws_noise_of_its_own(use_kernels, strategy):
    """On a uniform head the token is the noise's argmax: rows with the same (key, id) draw the same token and
    any other pair independent ones, whatever the id's place in the launch (ids past 2^32 included: a kernel
    that kept only the low 32 bits would repeat them), under another key, or the next ids along."""
    head = uniform_model().output_head()
    sampler = head.sampler(torch.float32, use_kernels=use_kernels)
    chosen = make_strategy(*strategy)
    n = 32 * UNIFORM_LENGTH
    h = torch.zeros(n, head.layer.linear.weight.shape[1])

    def draw(key, ids):
        x_flat = torch.full((n,), -1)
        with torch.no_grad():
            sampler.sample_at(h, torch.arange(n), x_flat, chosen, key, ids)
        return x_flat.view(32, UNIFORM_LENGTH)

    ids = torch.arange(n)
    base = draw(noise_key(5, 0), ids)
    assert_iid_uniform(base, "one launch")
    assert torch.equal(draw(noise_key(5, 0), ids.flip(0)), base.flatten().flip(0).view(32, UNIFORM_LENGTH))
    for name, key, other in (("the next ids", noise_key(5, 0), ids + n), ("ids + 2^32", noise_key(5, 0), ids + 2**32),
                             ("another stream", noise_key(5, 1), ids), ("another seed", noise_key(6, 0), ids)):
        assert_independent_pairs(base, draw(key, other), f"{strategy[0]}, kernels={use_kernels}: {name}")
