"""The static-row losses (radd_fast/losses/static_rows.py): the published masking law of the planned
counts and positions, the planned loss equal to the eager one on the same masks (values and
gradients, fp32 1e-5, at the published and at other parameters), the capacity from the count
distribution, and a loss that compiles to one graph. Then the paths users run, the training step
(TrainStep) and ``static_rows`` evaluation, against the law of the eager losses for every loss of
the registry, at the published parameters and at others: the per-sequence loss's mean, variance and
distribution, the masked count per sequence against its closed form, the weight of each masked row,
and the batch's masked total under each time sampler."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from radd_fast import RADD, GeometricNoise, LogLinearNoise
from radd_fast.evaluation.ppl import make_loss_fn
from radd_fast.losses import LOSS_TYPES, get_loss_fn, get_loss_spec, k_dce, lambda_dce, t_dce, t_dse
from radd_fast.losses.masking import mask_k_random
from radd_fast.losses.registry import has_static_rows
from radd_fast.losses.static_rows import PLANNED_LOSS_TYPES, MaskPlanner, planned_loss, planned_rows
from radd_fast.training.step import TrainStep
from tests.support.compare import assert_close, rel_err
from tests.support.models import LOSS_TOKENS, loss_model, tiny_config, zero_head_model
from tests.support.stats import two_sample_chi2

EPS = 1e-3
EAGER = {"t_DSE": lambda m, x, n, plan, p: t_dse(m, x, n, t=plan.rate, perturbed=p),
         "t_DCE": lambda m, x, n, plan, p: t_dce(m, x, n, t=plan.rate, perturbed=p),
         "lambda_DCE": lambda m, x, n, plan, p: lambda_dce(m, x, lam=plan.rate, perturbed=p),
         "k_DCE": lambda m, x, n, plan, p: k_dce(m, x, k=plan.counts, perturbed=p)}


# ---- the masking law -----------------------------------------------------------------------------------------
def chi_square_pvalue(observed: np.ndarray, expected_prob: np.ndarray) -> float:
    """Goodness of fit, cells with fewer than 5 expected draws merged into one."""
    expected = expected_prob * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.mark.parametrize("loss_type", PLANNED_LOSS_TYPES)
def test_masked_count_law(loss_type):
    """The host's counts follow the published law: P(n_j = k) = E_r[Binomial(k; L, p(r))]."""
    L, noise = 16, LogLinearNoise(EPS)
    planner = MaskPlanner(loss_type, noise, L, sampling_eps=EPS)
    torch.manual_seed(0)
    counts = torch.cat([planner.draw(8).counts for _ in range(4000)]).numpy()
    observed = np.bincount(counts, minlength=L + 1)
    assert counts.min() >= 0 and counts.max() <= L
    assert chi_square_pvalue(observed, count_law(loss_type, L, noise, EPS)) > 1e-4


def test_counts_given_the_rate_are_binomial():
    class FixedRate(MaskPlanner):
        def rates(self, batch_size, generator=None):
            return torch.full((batch_size,), 0.3), torch.full((batch_size,), 0.3, dtype=torch.float64)

    torch.manual_seed(1)
    planner = FixedRate("lambda_DCE", None, 20)
    counts = torch.cat([planner.draw(16).counts for _ in range(2000)]).numpy()
    law = stats.binom.pmf(np.arange(21), 20, 0.3)
    assert chi_square_pvalue(np.bincount(counts, minlength=21), law) > 1e-4


def test_positions_are_a_uniform_subset():
    """Given n, every n-subset of the L positions is equally likely (10 subsets of 5 choose 2)."""
    torch.manual_seed(2)
    D, L = 20_000, 5
    mask, _, _ = planned_rows(torch.rand(D, L, dtype=torch.float64), torch.full((D,), 2), capacity=2 * D)
    codes = (mask.long() * (2 ** torch.arange(L))).sum(-1).numpy()
    subsets = np.bincount(codes, minlength=2 ** L)
    pairs = [c for c in range(2 ** L) if bin(c).count("1") == 2]
    assert subsets.sum() == subsets[pairs].sum() == D
    assert stats.chisquare(subsets[pairs]).pvalue > 1e-4


def test_planned_rows_layout():
    """Exact counts per sequence, rows in sequence order, padding rows marked B."""
    torch.manual_seed(3)
    B, L, C = 4, 7, 24
    counts = torch.tensor([0, 7, 3, 5])
    mask, seq, flat = planned_rows(torch.rand(B, L, dtype=torch.float64), counts, C)
    assert torch.equal(mask.sum(-1), counts)
    N = int(counts.sum())
    assert torch.equal(seq[:N], torch.repeat_interleave(torch.arange(B), counts)) and (seq[N:] == B).all()
    assert torch.equal(flat[:N].sort().values, mask.flatten().nonzero().squeeze(-1))
    assert ((flat >= 0) & (flat < B * L)).all()


# ---- values: the eager losses on the same perturbed batch ----------------------------------------------------
@pytest.mark.parametrize("loss_type", PLANNED_LOSS_TYPES)
def test_planned_loss_equals_eager_loss(loss_type):
    """Same rates, same positions: the static-row loss and its gradients are the eager loss's."""
    B, L, noise = 4, 12, LogLinearNoise(EPS)
    model, twin = loss_model(), loss_model()
    planner = MaskPlanner(loss_type, noise, L, sampling_eps=EPS)
    torch.manual_seed(4)
    batch = torch.randint(0, LOSS_TOKENS, (B, L))
    plan = planner.draw(B)
    keys = torch.rand(B, L, dtype=torch.float64)
    static = planned_loss(model, loss_type, noise, batch, keys, plan.counts, plan.rate, plan.total + 5)
    eager = EAGER[loss_type](twin, batch, noise, plan, mask_k_random(batch, plan.counts, twin.mask_id, keys))
    assert static.dtype == eager.dtype
    assert_close(static, eager, rtol=1e-5, atol=1e-5, name=loss_type)
    static.sum().backward()
    eager.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, name=name)


OTHER_PARAMETERS = {  # name: (noise, sampling_eps, time sampler: "naive", or "other": the stratified one not its own)
    "loglinear-eps0.3-naive": (LogLinearNoise(0.05), 0.3, "naive"),
    "geometric-0.3-5-eps0.2": (GeometricNoise(0.3, 5.0), 0.2, "other"),
}


def other_parameters(loss_type: str, case: str) -> tuple:
    """(noise, sampling_eps, time_sampler) of ``case`` for ``loss_type``: a loss without a time sampler keeps None."""
    noise, eps, sampler = OTHER_PARAMETERS[case]
    own = get_loss_spec(loss_type).time_sampler
    if own is None:
        return noise, eps, None
    return noise, eps, {"vdm": "decoupled", "decoupled": "vdm"}.get(own, "vdm") if sampler == "other" else sampler


@pytest.mark.parametrize("case", list(OTHER_PARAMETERS))
@pytest.mark.parametrize("loss_type", PLANNED_LOSS_TYPES)
def test_planned_loss_equals_eager_loss_at_other_parameters(loss_type, case):
    """The same at a noise, sampling_eps and time sampler away from the defaults: the planned rows are
    weighted with the schedule they are given (the plan's rate is the eager loss's t, lam or k)."""
    noise, eps, sampler = other_parameters(loss_type, case)
    spec = get_loss_spec(loss_type)
    B, L = 4, 12
    model, twin = loss_model(), loss_model()
    planner = MaskPlanner(loss_type, noise, L, sampling_eps=eps, time_sampler=sampler)
    torch.manual_seed(41)
    batch = torch.randint(0, LOSS_TOKENS, (B, L))
    plan = planner.draw(B)
    if spec.uses_sampling_eps:
        assert (plan.rate >= eps).all(), f"{loss_type}: a time below sampling_eps {eps}: {plan.rate.tolist()}"
    keys = torch.rand(B, L, dtype=torch.float64)
    static = planned_loss(model, loss_type, noise, batch, keys, plan.counts, plan.rate, plan.total + 5)
    eager = EAGER[loss_type](twin, batch, noise, plan, mask_k_random(batch, plan.counts, twin.mask_id, keys))
    assert_close(static, eager, rtol=1e-5, atol=1e-5, name=f"{loss_type} ({case})")


@pytest.mark.parametrize("loss_type", PLANNED_LOSS_TYPES)
def test_planned_loss_on_the_fused_head_equals_the_reference_head(loss_type):
    """The static-row loss as CUDA runs it, its rows through the fused linear + log-softmax head (Triton
    interpreter on CPU), against the reference head: a vocabulary past one tile (257), an odd length and
    padding rows (capacity above N) at another noise; the same values and gradients, fp32."""
    B, L, tokens, noise = 3, 7, 257, GeometricNoise(0.3, 5.0)
    ref, fast = loss_model(tokens=tokens, length=L), loss_model(tokens=tokens, length=L)
    fast.backend = "fast"  # the head only: the loss head is what is under test
    planner = MaskPlanner(loss_type, noise, L, sampling_eps=0.2)
    torch.manual_seed(42)
    batch = torch.randint(0, tokens, (B, L))
    plan = planner.draw(B)
    keys = torch.rand(B, L, dtype=torch.float64)
    values = [planned_loss(m, loss_type, noise, batch, keys, plan.counts, plan.rate, plan.total + 9) for m in (ref, fast)]
    assert_close(values[1], values[0], rtol=1e-5, atol=1e-5, name=loss_type)
    for m, value in zip((ref, fast), values):
        value.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):  # relative RMS, as the loss tests do
        assert rel_err(q.grad, p.grad) < 1e-5, f"grad {name}: rel err {rel_err(q.grad, p.grad):.3g}"


# ---- the capacity --------------------------------------------------------------------------------------------
def test_capacity_from_the_count_distribution():
    """lambda_DCE (decoupled): E[N] = L B / 2 and Var[N] = L^2 / (12 B) + L (B / 6 - 1 / (6 B)) in
    closed form; the capacity is mean + 8 sd up to a multiple of 128, and never overflows in 500
    draws at the published micro-batch (32 x 1024)."""
    B, L = 32, 1024
    planner = MaskPlanner("lambda_DCE", LogLinearNoise(), L)
    mean, var = planner.count_moments(B)
    exact_var = L * L / (12 * B) + L * (B / 6 - 1 / (6 * B))
    assert abs(mean - L * B / 2) < 0.01 * math.sqrt(exact_var)
    assert abs(var / exact_var - 1) < 0.1
    capacity = planner.capacity(B)
    assert capacity % 128 == 0 and mean + 8 * math.sqrt(var) <= capacity < mean + 8 * math.sqrt(var) + 128
    torch.manual_seed(5)
    assert max(planner.draw(B).total for _ in range(500)) <= capacity
    k_planner = MaskPlanner("k_DCE", None, 64)
    assert k_planner.count_moments(4) == (4 * 65 / 2, 4 * (64 * 64 - 1) / 12)
    assert k_planner.capacity(4) == 4 * 64  # mean + 8 sd is past B * L: capped


# ---- one graph -----------------------------------------------------------------------------------------------
def test_loss_compiles_to_one_graph():
    """The static-row loss traces as one graph: nothing in it needs the host."""
    B, L, noise = 2, 16, LogLinearNoise(EPS)
    model = loss_model(length=L)
    plan = MaskPlanner("lambda_DCE", noise, L).draw(B)
    model.rotary_emb(L, model.device)
    explained = torch._dynamo.explain(planned_loss)(model, "lambda_DCE", noise, torch.randint(0, LOSS_TOKENS, (B, L)),
                                                     torch.rand(B, L, dtype=torch.float64), plan.counts, plan.rate, 20)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


# ---- the shipped paths against the law of the eager losses -----------------------------------------------------
# Training (TrainStep) and ``static_rows`` evaluation (evaluation.ppl.make_loss_fn) run the static-row loss, not
# the eager losses that the parity tests pin to the published code. For every loss of the registry, at the
# published parameters and at others (sampling_eps, the noise type and its sigmas, the time sampler), the
# per-sequence loss must have the eager loss's law: the same mean and variance (z-tests against their standard
# errors), the same distribution (two-sample Kolmogorov-Smirnov), the masked count per sequence of the closed
# form (chi-square), and each masked row the weight the eager loss gives it. The draws differ (the static path
# draws its counts on the host): the same law, not the same stream.
LAW_B, LAW_L, LAW_DRAWS = 256, 8, 6  # 1536 sequences per path and case
Z_MAX = 4.5  # |z| of a mean or variance difference (two-sided p about 7e-6; seeded: a pass is reproducible)


def law_cases() -> list:
    """(loss_type, case name, noise, sampling_eps, time_sampler) for every loss of the registry: each at the
    published parameters, one with a static-row form also at the ``OTHER_PARAMETERS`` (a loglinear noise
    with a large sampling_eps and the naive sampler; a geometric noise with sigmas far from the defaults
    and the stratified sampler that is not its own)."""
    cases = []
    for name in LOSS_TYPES:
        cases.append((name, "published", LogLinearNoise(EPS), EPS, None))
        if has_static_rows(name):
            cases += [(name, case, *other_parameters(name, case)) for case in OTHER_PARAMETERS]
    return cases


LAW_CASES = law_cases()
LAW_IDS = [f"{c[0]}-{c[1]}" for c in LAW_CASES]


@pytest.fixture
def one_thread():
    """The law tests run many small forward and backward passes: on one intra-op thread (on tensors this small
    a second thread only adds synchronisation, several times slower on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_law(loss_type: str, length: int, noise, sampling_eps: float) -> np.ndarray:
    """P(n = k), k = 0..L, of one sequence's masked count under the published law (closed form in u,
    integrated on a midpoint grid; every time sampler's draw is marginally uniform on [0, 1)).

    t_DSE / t_DCE: t = (1 - eps) u + eps, each token masked w.p. 1 - exp(-sigma(t)); lambda_DCE: w.p. u;
    k_DCE: n uniform on 1..L. A loss with a static-row form but no law here fails its test: add its law."""
    k = np.arange(length + 1)
    if loss_type == "k_DCE":
        return np.where(k >= 1, 1.0 / length, 0.0)
    u = (np.arange(100_000) + 0.5) / 100_000
    if loss_type == "lambda_DCE":
        p = u
    elif loss_type in ("t_DSE", "t_DCE"):
        p = noise.move_chance(torch.tensor((1 - sampling_eps) * u + sampling_eps, dtype=torch.float64)).numpy()
    else:
        pytest.fail(f"no closed-form masked-count law for {loss_type!r}: add it to count_law")
    return stats.binom.pmf(k[:, None], length, p[None, :]).mean(-1)


class SeenMasks:
    """The masked count of every sequence the model's body is given (a forward pre-hook on the embedding)."""

    def __init__(self, model):
        self.mask_id, self.counts = model.mask_id, []
        self.handle = model.vocab_embed.register_forward_pre_hook(self.record)

    def record(self, module, args):
        self.counts.append((args[0] == self.mask_id).sum(-1))

    def take(self) -> torch.Tensor:
        counts, self.counts = torch.cat(self.counts), []
        return counts


def eager_draws(model, batch, loss_type, noise, sampling_eps, time_sampler, draws: int, train: bool) -> torch.Tensor:
    """Per-sequence losses [draws * B] of the eager loss (get_loss_fn), float64."""
    fn = get_loss_fn(noise, model.vocab_size, train=train, sampling_eps=sampling_eps, loss_type=loss_type,
                     time_sampler=time_sampler)
    with torch.no_grad():
        return torch.cat([fn(model, batch).double() for _ in range(draws)])


def step_draws(model, batch, loss_type, noise, sampling_eps, time_sampler, draws: int) -> torch.Tensor:
    """Per-sequence losses [draws * B] of the training step (TrainStep.micro_batch, forward and backward),
    read off its loss module's output; each micro-batch's returned mean is checked to be their mean."""
    stepper = TrainStep(model, noise, loss_type, sampling_eps=sampling_eps, time_sampler=time_sampler)
    out = []
    handle = stepper.module.register_forward_hook(lambda module, args, result: out.append(result.detach().double()))
    means = [stepper.micro_batch(batch, weight=1.0) for _ in range(draws)]
    handle.remove()
    assert len(out) == draws
    for mean, per_seq in zip(means, out):  # fp32 means: to their rounding, relative to the values' size
        assert abs(float(mean) - float(per_seq.mean())) <= 1e-6 * float(per_seq.abs().mean()) + 1e-9
    return torch.cat(out)


def static_eval_draws(model, batch, loss_type, noise, sampling_eps, time_sampler, draws: int) -> torch.Tensor:
    """Per-sequence losses [draws * B] of ``static_rows`` evaluation (make_loss_fn(static_rows=True))."""
    fn = make_loss_fn(model, noise, loss_type, sampling_eps, static_rows=True, time_sampler=time_sampler)
    with torch.no_grad():
        return torch.cat([fn(model, batch).double() for _ in range(draws)])


SHIPPED_PATHS = {"train_step": step_draws, "static_rows_eval": static_eval_draws}


def z_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """Difference of two sample means over its standard error."""
    return float((a.mean() - b.mean()) / (a.var() / a.numel() + b.var() / b.numel()).sqrt())


def z_variance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Difference of two sample variances over its standard error (sqrt((m4 - s^4) / n) each)."""
    def moments(x):
        c = x - x.mean()
        s2 = (c ** 2).mean()
        return s2, ((c ** 4).mean() - s2 ** 2) / x.numel()

    (va, sa), (vb, sb) = moments(a), moments(b)
    return float((va - vb) / (sa + sb).sqrt())


def count_pvalue(counts: torch.Tensor, law: np.ndarray) -> float:
    observed = np.bincount(counts.cpu().numpy(), minlength=law.size)
    assert observed.size == law.size, f"a masked count above L: {counts.max()}"
    return chi_square_pvalue(observed, law)


def assert_same_law(eager: torch.Tensor, shipped: torch.Tensor, name: str) -> None:
    assert torch.isfinite(shipped).all(), f"{name}: non-finite losses"
    zm, zv = z_mean(shipped, eager), z_variance(shipped, eager)
    ks = stats.ks_2samp(shipped.numpy(), eager.numpy()).pvalue
    assert abs(zm) < Z_MAX, f"{name}: mean {shipped.mean():.4g} vs eager {eager.mean():.4g} (z = {zm:.1f})"
    assert abs(zv) < Z_MAX, f"{name}: variance {shipped.var():.4g} vs eager {eager.var():.4g} (z = {zv:.1f})"
    assert ks > 1e-4, f"{name}: distribution differs from the eager loss's (two-sample KS p = {ks:.2g})"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", list(SHIPPED_PATHS))
@pytest.mark.parametrize("loss_type, case, noise, sampling_eps, time_sampler", LAW_CASES, ids=LAW_IDS)
def test_shipped_loss_has_the_eager_law(path, loss_type, case, noise, sampling_eps, time_sampler):
    """Mean, variance and distribution of the per-sequence loss, and the masked count of each sequence
    (the masks the model is given, against the closed form), on a model whose log-probs depend on the
    context; the eager loss is checked against the same count law so the closed form is not a guess."""
    exact = not has_static_rows(loss_type)
    B, draws = (32, 2) if exact else (LAW_B, LAW_DRAWS)  # ar_*: L passes each; the step runs their own fn
    model = loss_model(length=LAW_L)
    batch = torch.randint(0, LOSS_TOKENS, (B, LAW_L), generator=torch.Generator().manual_seed(11))
    seen = SeenMasks(model)
    torch.manual_seed(12)
    eager = eager_draws(model, batch, loss_type, noise, sampling_eps, time_sampler, draws, train=path == "train_step")
    eager_counts = seen.take()
    torch.manual_seed(13)
    shipped = SHIPPED_PATHS[path](model, batch, loss_type, noise, sampling_eps, time_sampler, draws)
    shipped_counts = seen.take()
    name = f"{path}, {loss_type} ({case})"
    if exact:  # no static-row form: the step and evaluation run the entry's own fn
        if loss_type != "ar_random":
            assert_close(shipped, eager, rtol=1e-5, atol=1e-5, name=name)
        assert_same_law(eager, shipped, name)
        return
    assert_same_law(eager, shipped, name)
    law = count_law(loss_type, LAW_L, noise, sampling_eps if get_loss_spec(loss_type).uses_sampling_eps else 0.0)
    assert count_pvalue(eager_counts, law) > 1e-4, f"{name}: the eager loss's counts do not fit the closed form"
    assert count_pvalue(shipped_counts, law) > 1e-4, f"{name}: masked counts per sequence differ from the law"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", list(SHIPPED_PATHS))
@pytest.mark.parametrize("loss_type, case, noise, sampling_eps, time_sampler",
                         [c for c in LAW_CASES if has_static_rows(c[0])],
                         ids=[i for c, i in zip(LAW_CASES, LAW_IDS) if has_static_rows(c[0])])
def test_each_masked_row_gets_the_eager_weight(path, loss_type, case, noise, sampling_eps, time_sampler):
    """On a model whose head is zero, log p is -log(V - 1) at every row, so a sequence's loss over its masked
    count is the weight of its rows alone (1 / lam, L / k, the t-losses' function of sigma(t)): its law,
    jointly with the count, must be the eager loss's."""
    B, draws = 1024, 3
    model = zero_head_model(LOSS_TOKENS, LAW_L)
    batch = torch.randint(0, LOSS_TOKENS, (B, LAW_L), generator=torch.Generator().manual_seed(21))
    seen = SeenMasks(model)
    torch.manual_seed(22)
    eager = eager_draws(model, batch, loss_type, noise, sampling_eps, time_sampler, draws, train=path == "train_step")
    eager_counts = seen.take().double()
    torch.manual_seed(23)
    shipped = SHIPPED_PATHS[path](model, batch, loss_type, noise, sampling_eps, time_sampler, draws)
    shipped_counts = seen.take().double()
    name = f"{path}, {loss_type} ({case})"
    assert ((shipped == 0) == (shipped_counts == 0)).all(), f"{name}: a loss without masked rows or the reverse"
    we, ws = (eager / eager_counts)[eager_counts > 0], (shipped / shipped_counts)[shipped_counts > 0]
    assert_same_law(we, ws, f"{name}: weight per masked row")
    assert_same_law(eager, shipped, f"{name}: masked count x weight")  # the weight jointly with the count


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", list(SHIPPED_PATHS))
@pytest.mark.parametrize("loss_type, time_sampler", [(name, sampler) for name in LOSS_TYPES
                                                     for sampler in ("naive", "vdm", "decoupled")
                                                     if get_loss_spec(name).time_sampler not in (None, sampler)])
def test_shipped_masked_total_has_the_eager_law_per_time_sampler(path, loss_type, time_sampler):
    """The time sampler couples the sequences of a batch (vdm: one shifted grid; decoupled: one stratum each;
    naive: none), which the per-sequence law cannot see: under each sampler other than the loss's own, the
    batch's total masked count N must have the eager loss's law (two-sample chi-square, and its variance;
    a tiny model: the counts are all that is looked at)."""
    B, L, draws = 8, 8, 300
    torch.manual_seed(0)
    model = RADD(tiny_config(LOSS_TOKENS, L, hidden_size=8))
    batch = torch.randint(0, LOSS_TOKENS, (B, L), generator=torch.Generator().manual_seed(31))
    seen = SeenMasks(model)
    noise, eps = GeometricNoise(0.3, 5.0), 0.2
    torch.manual_seed(32)
    eager_draws(model, batch, loss_type, noise, eps, time_sampler, draws, train=path == "train_step")
    eager = seen.take().view(draws, B).sum(-1)
    torch.manual_seed(33)
    SHIPPED_PATHS[path](model, batch, loss_type, noise, eps, time_sampler, draws)
    shipped = seen.take().view(draws, B).sum(-1)
    name = f"{path}, {loss_type}, {time_sampler} sampler: masked tokens per batch"
    stat, df, p = two_sample_chi2(torch.bincount(shipped, minlength=B * L + 1),
                                  torch.bincount(eager, minlength=B * L + 1))
    assert p > 1e-4, f"{name}: distribution differs from the eager loss's (chi2 {stat:.1f}, df {df}, p {p:.2g})"
    shipped, eager = shipped.double(), eager.double()
    zv = z_variance(shipped, eager)
    assert abs(zv) < Z_MAX, f"{name}: variance {shipped.var():.4g} vs eager {eager.var():.4g} (z = {zv:.1f})"
