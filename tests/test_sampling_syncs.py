"""The engine's host syncs: a fixed few per wave and one at the end, none per evaluation."""
import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.sampling import SamplerConfig, generate
from radd_fast.sync_counter import SyncCounter

from .test_sampling_utils import tiny_model

PER_WAVE = 3  # K to the host (plan), K.max() (group count), head rows per evaluation to the host
AT_END = 3  # the no-MASK-left check; the E-NFE theory (free counts and step probabilities to the host)


@pytest.fixture(scope="module")
def model():
    return tiny_model(tokens=8, length=12)


def _syncs(model, steps: int, num_samples: int, wave_size: int, **options) -> tuple[int, dict, int]:
    cfg = SamplerConfig(steps=steps, rows_in_flight=4, wave_size=wave_size, **options)
    with SyncCounter() as syncs:
        _, stats = generate(model, LogLinearNoise(), num_samples, config=cfg, seed=3, progress=False)
    return syncs.total, dict(syncs.by_op), stats.evaluations


@pytest.mark.parametrize("options", [dict(use_kernels=False), dict(use_kernels=False, strategy="top_k", strategy_para=3),
                                     dict(use_kernels=False, method="ordered")])
def test_syncs_do_not_grow_with_evaluations(model, options):
    few, ops_few, evals_few = _syncs(model, steps=2, num_samples=8, wave_size=8, **options)
    many, ops_many, evals_many = _syncs(model, steps=12, num_samples=8, wave_size=8, **options)
    assert evals_many > 2 * evals_few  # more evaluations ...
    at_end = 1 if options.get("method") == "ordered" else AT_END  # ordered: no E-NFE theory
    assert few == many == PER_WAVE + at_end, (ops_few, ops_many)  # ... the same syncs


def test_syncs_per_wave(model):
    one, _, _ = _syncs(model, steps=6, num_samples=12, wave_size=12, use_kernels=False)
    three, ops, _ = _syncs(model, steps=6, num_samples=12, wave_size=4, use_kernels=False)
    assert one == PER_WAVE + AT_END
    assert three == 3 * PER_WAVE + AT_END, ops


def test_kernel_path_adds_no_sync(model):
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
    total, ops, _ = _syncs(model, steps=6, num_samples=8, wave_size=8, use_kernels=True)
    assert total == PER_WAVE + AT_END, ops
