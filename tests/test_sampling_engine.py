"""The fast engine against the reference samplers: same sample distribution, same E-NFE, head rows exact."""
import pytest
import torch

from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.sampling import DiffusionSampler, OrderedSampler, generate
from radd_fast.sampling.conditioning import initial_state, projection

from .test_sampling_utils import assert_same_counts, assert_same_distribution, tiny_model

N_SAMPLES, LENGTH, STEPS = 3000, 5, 6
ORDER = torch.tensor([2, 4, 0, 3, 1])


@pytest.fixture(scope="module")
def model():
    return tiny_model(tokens=8, length=16)


CASES = {  # name: (method, strategy, para, noise, conditioning, kernels, sampling dtype)
    "tweedie-direct": ("tweedie", "direct", None, LogLinearNoise(), None, False, "float32"),
    "tweedie-direct-cond-kernel": ("tweedie", "direct", None, LogLinearNoise(), {1: 3, 4: 6}, True, "float32"),
    "euler-top_p-cond": ("euler", "top_p", 0.8, GeometricNoise(1e-3, 8.0), {0: 5}, False, "float32"),
    "tweedie-top_k-kernel-fp64": ("tweedie", "top_k", 3, GeometricNoise(1e-2, 4.0), None, True, "float64"),
    "ordered-direct": ("ordered", "direct", None, None, None, False, "float32"),
    "ordered-top_k-cond": ("ordered", "top_k", 2, None, {3: 1}, False, "float32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_reference_distribution(model, case):
    method, strategy, para, noise, cond, kernels, sdtype = CASES[case]
    shape = (N_SAMPLES, LENGTH)
    init = initial_state(cond, N_SAMPLES, LENGTH, model.mask_id, "cpu")
    if method == "ordered":
        ref = OrderedSampler(model, shape, model.vocab_size, strategy, para, order=ORDER, seed=11)
    else:
        ref = DiffusionSampler(method, model, noise, shape, model.vocab_size, strategy, para, seed=11)
    x_ref = ref.sample(STEPS, projection(init, model.mask_id))
    x_fast, stats = generate(model, noise, N_SAMPLES, LENGTH, STEPS, method=method, strategy=strategy,
                             strategy_para=para, conditioning=cond, batch_size=1024, seed=12, sampling_dtype=sdtype,
                             progress=False, use_kernels=kernels, order=ORDER)
    assert x_fast.shape == shape and x_fast.dtype == torch.int64
    assert not bool((x_fast == model.mask_id).any())
    fixed = init[0] != model.mask_id
    assert torch.equal(x_fast[:, fixed], init.expand(shape)[:, fixed])
    assert_same_distribution(x_ref, x_fast, model.vocab_size - 1, case)
    assert_same_counts(ref.last_row_nfe, stats.enfe, case + " E-NFE")
    n_free = int((~fixed).sum())
    assert stats.head_rows == N_SAMPLES * n_free and stats.head_rows_padded >= stats.head_rows
    assert stats.eval_rows == int(stats.enfe.sum())
    if stats.enfe_theory is not None:
        assert abs(stats.enfe_mean - stats.enfe_theory) < 4 * stats.enfe.double().std().item() / N_SAMPLES**0.5


class _Counter:
    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.rows += args[0].reshape(-1, args[0].shape[-1]).shape[0]


@pytest.mark.parametrize("strategy,kernels", [("direct", False), ("top_k", False), ("direct", True)])
def test_head_runs_on_exactly_the_revealed_rows(model, monkeypatch, strategy, kernels):
    n, L = 300, 7
    norm, linear = _Counter(model.output_layer.norm_final), _Counter(model.output_layer.linear)
    shapes = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda x, **kw: shapes.append(tuple(x.shape)) or hidden(x, **kw))
    try:
        tokens, stats = generate(model, LogLinearNoise(), n, L, 9, strategy=strategy, strategy_para=2,
                                 conditioning={3: 1}, batch_size=64, seed=0, progress=False, use_kernels=kernels,
                                 buckets=False)
    finally:
        norm.handle.remove()
        linear.handle.remove()
    assert stats.head_rows == stats.head_rows_padded == n * (L - 1)
    assert norm.rows == n * (L - 1)  # the final norm (the head's first op) saw the revealed rows only
    assert linear.rows == (0 if kernels and strategy == "direct" else n * (L - 1))  # fused kernel: no [N, V] logits
    assert sum(b for b, _ in shapes) == stats.eval_rows == int(stats.enfe.sum())
    assert all(t == L for _, t in shapes) and max(b for b, _ in shapes) == 64
    # with buckets, the evaluation batches take a few power-of-two sizes only
    shapes.clear()
    _, stats = generate(model, LogLinearNoise(), n, L, 9, strategy=strategy, strategy_para=2, batch_size=64, seed=0,
                        progress=False, use_kernels=False)
    assert {b for b, _ in shapes} <= {64, 32, 16, 8, 4, 2, 1} and stats.eval_rows_padded == sum(b for b, _ in shapes)


@pytest.mark.parametrize("kernels", [False, True])
def test_seeded_runs_are_deterministic(model, kernels):
    kw = dict(num_samples=40, length=6, steps=5, batch_size=8, progress=False, use_kernels=kernels, wave_size=16)
    a, sa = generate(model, LogLinearNoise(), seed=5, **kw)
    b, sb = generate(model, LogLinearNoise(), seed=5, **kw)
    c, _ = generate(model, LogLinearNoise(), seed=6, **kw)
    assert torch.equal(a, b) and torch.equal(sa.enfe, sb.enfe) and not torch.equal(a, c)
    assert sa.enfe.shape == (40,) and not bool((a == model.mask_id).any())


def test_per_row_conditioning_and_fully_fixed_rows(model):
    init = torch.full((3, 5), -1)
    init[0] = torch.tensor([1, 2, 3, 4, 5])  # nothing to sample: no evaluation
    init[1, 0] = 7
    tokens, stats = generate(model, LogLinearNoise(), 3, 5, 4, conditioning=init, progress=False, seed=0)
    assert tokens[0].tolist() == [1, 2, 3, 4, 5] and int(tokens[1, 0]) == 7
    assert int(stats.enfe[0]) == 0 and stats.head_rows == 9
    tokens, stats = generate(model, LogLinearNoise(), 2, 5, 4, conditioning=init[0], progress=False)
    assert stats.evaluations == 0 and tokens.tolist() == [[1, 2, 3, 4, 5]] * 2


def test_errors(model):
    with pytest.raises(ValueError, match="length must be"):
        generate(model, LogLinearNoise(), 2, 17, 4, progress=False)
    with pytest.raises(ValueError, match="needs the noise"):
        generate(model, None, 2, 4, 4, progress=False)
    with pytest.raises(ValueError, match="unknown sampling method"):
        generate(model, LogLinearNoise(), 2, 4, 4, method="ddim", progress=False)
    with pytest.raises(ValueError, match="top_k needs"):
        generate(model, LogLinearNoise(), 2, 4, 4, strategy="top_k", strategy_para=0, progress=False)
    with pytest.raises(ValueError, match="sampling_dtype"):
        generate(model, LogLinearNoise(), 2, 4, 4, sampling_dtype="float16", progress=False)
    with pytest.raises(ValueError, match="outside the sequence"):
        generate(model, LogLinearNoise(), 2, 4, 4, conditioning={4: 1}, progress=False)
    with pytest.raises(TypeError, match="radd_fast.RADD"):
        generate(torch.nn.Linear(2, 2), LogLinearNoise(), 2, 4, 4, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (kernels, CUDA graphs, on-device RNG)")
@pytest.mark.parametrize("strategy,para,sdtype", [("direct", None, "float32"), ("top_p", 0.8, "float64")])
def test_engine_on_cuda_matches_reference(strategy, para, sdtype):
    model = tiny_model(tokens=8, length=16).cuda()
    cond = {0: 2}
    init = initial_state(cond, N_SAMPLES, LENGTH, model.mask_id, "cuda")
    ref = DiffusionSampler("tweedie", model, LogLinearNoise(), (N_SAMPLES, LENGTH), model.vocab_size, strategy, para,
                           seed=1)
    x_ref = ref.sample(STEPS, projection(init, model.mask_id))
    kw = dict(strategy=strategy, strategy_para=para, conditioning=cond, batch_size=256, sampling_dtype=sdtype,
              progress=False)
    x_fast, stats = generate(model, LogLinearNoise(), N_SAMPLES, LENGTH, STEPS, seed=2, **kw)
    assert stats.cuda_graphs >= 1 and x_fast.is_cuda
    assert bool((x_fast[:, 0] == 2).all()) and not bool((x_fast == model.mask_id).any())
    assert_same_distribution(x_ref, x_fast, model.vocab_size - 1, f"cuda {strategy}")
    assert_same_counts(ref.last_row_nfe, stats.enfe, "cuda E-NFE")
    again, _ = generate(model, LogLinearNoise(), N_SAMPLES, LENGTH, STEPS, seed=2, **kw)
    assert torch.equal(x_fast, again)  # deterministic with a seed on one device
