"""The adaptive decoders (radd_fast/sampling/decoders.py): their rules, their reference, their limits, their labels.

The engine (``generate(..., decoder=...)``, adaptive.py) against ``decode_ref`` (each row alone, one
evaluation at a time, the rule in plain Python): with the same keys, the same samples and the same
evaluations per row, for every decoder, strategy and conditioning. The dense rules against the
per-row rules on random rows with ties. The limits of the knobs (tau > 1: one position per
evaluation; a tiny tau or a huge gamma: everything at once; low_confidence: the exact schedule's
counts). The label in every description, and the one-line refusals of bad knobs.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.model.head import noise_key
from radd_fast.sampling import SamplerConfig, generate
from radd_fast.sampling.conditioning import initial_state
from radd_fast.sampling.decoders import DECODER_SPECS, DECODERS, decode_ref, make_decoder, max_samples, noise_ids
from radd_fast.sampling.engine import DECODER_NOISE, REVEAL_SCHEDULE, _reveal_groups
from radd_fast.sampling.schedule import update_rates
from tests.support.models import normal_head_model, random_head_model

LENGTH, SEED, FIRST = 10, 7, 3


@pytest.fixture(scope="module")
def model():
    return random_head_model(tokens=8, length=LENGTH)


def reference(model, cfg: SamplerConfig, n: int, cond=None, noise=None, seed=SEED, first=FIRST):
    """decode_ref with the engine's keys: (tokens [n, L], evaluations [n])."""
    x0 = initial_state(cond, n, LENGTH, model.mask_id, "cpu").expand(n, LENGTH).clone()
    group = None
    if cfg.decoder_fn.uses_schedule:
        rates = update_rates(noise, cfg.steps, cfg.method, cfg.eps) if cfg.needs_noise else None
        ids = torch.arange(first, first + n)
        group, _ = _reveal_groups(x0 == model.mask_id, rates, cfg, noise_key(seed, REVEAL_SCHEDULE), ids)
    return decode_ref(model, x0, cfg.decoder_fn, cfg.strategy_fn, noise_key(seed, DECODER_NOISE), first,
                      cfg.noise_dtype, group)


def engine(model, cfg: SamplerConfig, n: int, cond=None, noise=None, **kw):
    return generate(model, noise, n, LENGTH, config=cfg, conditioning=cond, seed=SEED, first_index=FIRST,
                    progress=False, **kw)


CONDITIONS = {  # prefix, suffix and an infill span at once; per-row conditioning (a tensor)
    "prefix-suffix-infill": {0: [1, 2], 5: 3, 8: [4, 5]},
    "per-row": torch.tensor([[-1, 2, -1, -1, -1, -1, -1, -1, -1, 6], [0, -1, -1, -1, 3, -1, -1, -1, -1, -1]] * 3),
}
CASES = {  # name: (decoder, decoder_para, strategy, strategy_para, method)
    "confidence-direct": ("confidence", 0.4, "direct", None, "tweedie"),
    "confidence-top_k": ("confidence", 0.5, "top_k", 3, "tweedie"),
    "entropy_bound-direct": ("entropy_bound", 2.5, "direct", None, "tweedie"),
    "entropy_bound-top_p": ("entropy_bound", 1.0, "top_p", 0.8, "tweedie"),
    "low_confidence-tweedie": ("low_confidence", None, "direct", None, "tweedie"),
    "low_confidence-euler-top_k": ("low_confidence", None, "top_k", 4, "euler"),
    "low_confidence-ordered": ("low_confidence", None, "direct", None, "ordered"),
}


@pytest.mark.parametrize("cond", list(CONDITIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_each_decoder_gives_the_reference_samples(model, case, cond):
    """Same keys, same samples: the engine (rows in flight, chunks, pruned body, dense rules) draws what
    the plain per-row loop draws, with the same evaluations per row; the conditioning holds."""
    decoder, para, strategy, spara, method = CASES[case]
    noise = GeometricNoise(1e-2, 4.0) if method == "euler" else LogLinearNoise()
    cfg = SamplerConfig(steps=4, method=method, strategy=strategy, strategy_para=spara, decoder=decoder,
                        decoder_para=para, rows_in_flight=4, decoder_check_every=3, use_kernels=False,
                        order=torch.arange(LENGTH) if method == "ordered" else None)
    c = CONDITIONS[cond]
    tokens, stats = engine(model, cfg, 6, c, noise)
    ref, evals = reference(model, cfg, 6, c, noise)
    assert torch.equal(tokens, ref), case
    assert torch.equal(stats.enfe, evals)
    init = initial_state(c, 6, LENGTH, model.mask_id, "cpu").expand(6, LENGTH)
    fixed = init != model.mask_id
    assert torch.equal(tokens[fixed], init[fixed]) and not bool((tokens == model.mask_id).any())
    assert stats.tokens_revealed == int((~fixed).sum())


def test_the_kernel_head_draws_the_reference_candidates_and_keeps_the_schedules_counts(model):
    """The one-pass token-statistics kernel (through the interpreter on a CPU). Its candidates: with
    everything revealed at the first evaluation (a tiny tau), the reference's tokens exactly. Its
    rankings are not compared bit for bit: on a small model the masked positions' confidences differ
    by little more than the kernel's rounding (an online log-sum-exp), so near-ties may break either
    way; the counts that do not depend on them must hold: one position per evaluation at tau > 1, the
    exact schedule's evaluations with low_confidence."""
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
    noise = LogLinearNoise()
    cfg = SamplerConfig(steps=5, decoder="confidence", decoder_para=1e-30, rows_in_flight=3, use_kernels=True)
    tokens, stats = engine(model, cfg, 5, {0: 1})
    assert torch.equal(tokens, reference(model, cfg.replace(use_kernels=False), 5, {0: 1})[0])
    _, greedy = engine(model, cfg.replace(decoder_para=2.0), 4, {0: 1})
    assert greedy.enfe.tolist() == [LENGTH - 1] * 4
    _, low = engine(model, cfg.replace(decoder="low_confidence", decoder_para=None), 6, {0: 1}, noise)
    _, exact = engine(model, cfg.replace(decoder=None, decoder_para=None), 6, {0: 1}, noise)
    assert torch.equal(low.enfe, exact.enfe)


# ---- the limits of the knobs ----------------------------------------------------------------------------------
def test_confidence_above_one_reveals_one_position_per_evaluation_in_greedy_order(model):
    """tau > 1: only the most confident candidate, one per evaluation: a row of n free positions takes n
    evaluations and the head runs at n + (n - 1) + ... + 1 of them; tau = 1 is the same here (no candidate
    is certain on this head); the order is the reference's greedy one."""
    cond = {2: 1}
    cfg = SamplerConfig(decoder="confidence", decoder_para=1.5, rows_in_flight=4, use_kernels=False)
    tokens, stats = engine(model, cfg, 6, cond)
    n = LENGTH - 1
    assert stats.enfe.tolist() == [n] * 6 and stats.head_rows == 6 * n * (n + 1) // 2
    assert torch.equal(tokens, reference(model, cfg, 6, cond)[0])
    at_one, _ = engine(model, cfg.replace(decoder_para=1.0), 6, cond)
    assert torch.equal(at_one, tokens)


@pytest.mark.parametrize("decoder,para", [("confidence", 1e-30), ("entropy_bound", 1e9)])
def test_a_loose_knob_reveals_every_position_in_one_evaluation(model, decoder, para):
    tokens, stats = engine(model, SamplerConfig(decoder=decoder, decoder_para=para, use_kernels=False), 5, {4: 2})
    assert stats.enfe.tolist() == [1] * 5 and stats.eval_rows == 5 and stats.head_rows == 5 * (LENGTH - 1)
    assert not bool((tokens == model.mask_id).any())


def test_entropy_bound_zero_reveals_one_position_per_evaluation(model):
    _, stats = engine(model, SamplerConfig(decoder="entropy_bound", decoder_para=0, use_kernels=False), 4)
    assert stats.enfe.tolist() == [LENGTH] * 4  # every entropy > 0 here: one (the least uncertain) at a time


@pytest.mark.parametrize("method,steps", [("tweedie", 4), ("tweedie", 40), ("euler", 6), ("ordered", 3)])
def test_low_confidence_reveals_as_many_per_evaluation_as_the_exact_schedule(model, method, steps):
    """Its evaluations per row are the exact engine's for the same seed, and the head runs at the positions
    still masked at each: n_free - (revealed before) summed over the schedule's groups, exactly."""
    noise = GeometricNoise(1e-2, 4.0) if method == "euler" else LogLinearNoise()
    cfg = SamplerConfig(steps=steps, method=method, rows_in_flight=3, use_kernels=False)
    _, exact = engine(model, cfg, 7, {1: 2}, noise)
    _, low = engine(model, cfg.replace(decoder="low_confidence"), 7, {1: 2}, noise)
    assert torch.equal(low.enfe, exact.enfe) and low.enfe_theory == exact.enfe_theory
    x0 = initial_state({1: 2}, 7, LENGTH, model.mask_id, "cpu").expand(7, LENGTH)
    rates = update_rates(noise, steps, method, cfg.eps) if cfg.needs_noise else None
    group, K = _reveal_groups(x0 == model.mask_id, rates, cfg, noise_key(SEED, REVEAL_SCHEDULE),
                              torch.arange(FIRST, FIRST + 7))
    still_masked = sum(int((group[r] >= k).sum()) for r in range(7) for k in range(int(K[r])))
    assert low.head_rows == still_masked


def test_confidence_and_entropy_bound_draw_no_schedule_and_need_no_noise(model):
    for decoder in ("confidence", "entropy_bound"):
        cfg = SamplerConfig(decoder=decoder, use_kernels=False)
        assert not cfg.needs_noise and not cfg.uses_schedule
        _, stats = generate(model, None, 3, LENGTH, config=cfg, seed=0, progress=False)
        assert stats.enfe_theory is None
    assert SamplerConfig(decoder="low_confidence").needs_noise


# ---- the rules, dense against per row ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,para", [("confidence", 0.3), ("confidence", 2.0), ("entropy_bound", 1.5),
                                       ("entropy_bound", 0.0), ("low_confidence", None)])
def test_dense_rules_match_the_per_row_rules_on_rows_with_ties(name, para):
    """Random rows with values on a coarse grid (many ties, broken toward the lower position), empty rows included."""
    rng = np.random.default_rng(0)
    E, W = 64, 9
    log_prob = torch.from_numpy(np.log(rng.integers(1, 5, (E, W)) / 4.0)).float()
    entropy = torch.from_numpy(rng.integers(0, 4, (E, W)) * 0.5).float()
    masked = torch.from_numpy(rng.random((E, W)) < 0.6)
    masked[:3] = False
    count = torch.from_numpy(np.minimum(rng.integers(1, 4, E), masked.sum(1).numpy()))
    decoder = make_decoder(name, para)
    reveal = decoder.select(log_prob, entropy, masked, count)
    for e in range(E):
        pos = torch.nonzero(masked[e]).squeeze(1)
        expected = [] if pos.numel() == 0 else pos[decoder.choose(log_prob[e, pos].tolist(), entropy[e, pos].tolist(),
                                                                   int(count[e]))].tolist()
        assert torch.nonzero(reveal[e]).squeeze(1).tolist() == sorted(expected), (name, e)
        assert pos.numel() == 0 or bool(reveal[e].any())  # at least one where anything is masked


def test_rules_on_a_hand_made_row():
    log_prob = torch.tensor([[math.log(0.5), math.log(0.95), math.log(0.95), math.log(0.2), math.log(0.99)]])
    entropy = torch.tensor([[0.3, 0.1, 0.1, 2.0, 0.0]])
    masked = torch.tensor([[True, True, True, True, False]])
    pick = {name: make_decoder(name, para).select(log_prob, entropy, masked, torch.tensor([2])).nonzero()[:, 1].tolist()
            for name, para in [("confidence", 0.9), ("entropy_bound", 0.25), ("low_confidence", None)]}
    assert pick == {"confidence": [1, 2], "entropy_bound": [1, 2], "low_confidence": [1, 2]}
    assert make_decoder("confidence", 1.5).select(log_prob, entropy, masked).nonzero()[:, 1].tolist() == [1]  # a tie: the lower
    assert make_decoder("entropy_bound", 0.05).select(log_prob, entropy, masked).nonzero()[:, 1].tolist() == [1]


def test_noise_ids_key_sample_position_and_evaluation_apart():
    L = 5
    ids = {int(noise_ids(torch.tensor(i * L + p), torch.tensor(k), L)) for i in range(3) for p in range(L) for k in range(L)}
    assert len(ids) == 3 * L * L and min(ids) == 0
    assert max_samples(1024) == (2**63 - 1) // 1024**2


# ---- labels and knobs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder,para,label", [("confidence", 0.75, "approximate (confidence tau=0.75)"),
                                                ("entropy_bound", 2, "approximate (entropy_bound gamma=2)"),
                                                ("low_confidence", None, "approximate (low_confidence)")])
def test_labels_name_the_decoder_and_its_knob_everywhere(model, decoder, para, label):
    cfg = SamplerConfig(steps=3, decoder=decoder, decoder_para=para, use_kernels=False)
    assert cfg.approximate and label in cfg.describe()
    _, stats = generate(model, LogLinearNoise(), 2, LENGTH, config=cfg, seed=0, progress=False)
    assert stats.decoder == label and label in stats.sampler and label in stats.summary()
    assert stats.as_dict()["decoder"] == label and label in stats.as_dict()["sampler"]
    both = cfg.replace(refresh_every=2).describe()
    assert label in both and "approximate (refresh every 2)" in both
    assert ("steps" in cfg.describe()) == (decoder == "low_confidence")  # the others set their own pace


def test_the_exact_sampler_stays_the_default():
    cfg = SamplerConfig()
    assert cfg.decoder is None and cfg.decoder_fn is None and not cfg.approximate
    assert "approximate" not in cfg.describe()


def test_knob_defaults_are_data():
    assert set(DECODERS) == {"confidence", "entropy_bound", "low_confidence"}
    assert SamplerConfig(decoder="confidence").decoder_para == DECODER_SPECS["confidence"].default == 0.9
    assert SamplerConfig(decoder="entropy_bound").decoder_para == DECODER_SPECS["entropy_bound"].default
    assert SamplerConfig(decoder="low_confidence").decoder_para is None
    assert [name for name, spec in DECODER_SPECS.items() if spec.uses_schedule] == ["low_confidence"]


@pytest.mark.parametrize("options,words", [
    (dict(decoder="beam"), "unknown decoder 'beam'"),
    (dict(decoder="confidence", decoder_para=0), "confidence needs decoder_para tau > 0"),
    (dict(decoder="confidence", decoder_para=-0.5), "tau > 0"),
    (dict(decoder="confidence", decoder_para=math.nan), "tau > 0"),
    (dict(decoder="confidence", decoder_para=math.inf), "tau > 0"),
    (dict(decoder="confidence", decoder_para=True), "tau > 0"),
    (dict(decoder="confidence", decoder_para="0.9"), "tau > 0"),
    (dict(decoder="entropy_bound", decoder_para=-1), "entropy_bound needs decoder_para gamma >= 0"),
    (dict(decoder="entropy_bound", decoder_para=math.inf), "gamma >= 0"),
    (dict(decoder="low_confidence", decoder_para=3), "low_confidence has no decoder_para"),
    (dict(decoder_para=0.9), "decoder_para 0.9 needs a decoder"),
    (dict(decoder="confidence", decoder_check_every=0), "decoder_check_every must be a whole number >= 1"),
    (dict(decoder="confidence", decoder_check_every=2.5), "decoder_check_every"),
])
def test_bad_knobs_are_refused_in_one_line(options, words):
    with pytest.raises(ValueError, match=words) as err:
        SamplerConfig(**options)
    assert "\n" not in str(err.value)


def test_a_run_beyond_the_keyable_samples_is_refused(model):
    with pytest.raises(ValueError, match="a decoder run keys samples"):
        generate(model, None, 2, LENGTH, decoder="confidence", first_index=max_samples(LENGTH) - 1, progress=False)


def test_the_reference_needs_the_schedule_only_for_low_confidence():
    model = normal_head_model(1, 6)
    x0 = torch.full((2, 6), model.mask_id)
    strategy = SamplerConfig().strategy_fn
    tokens, evals = decode_ref(model, x0, make_decoder("confidence", 2.0), strategy, key=1)
    assert evals.tolist() == [6, 6] and not bool((tokens == model.mask_id).any())
