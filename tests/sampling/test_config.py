"""SamplerConfig: every sampling option validated once, and the registries it reads."""
import math

import pytest
import torch

from radd_fast import LogLinearNoise
from radd_fast.sampling import METHOD_SPECS, STRATEGY_SPECS, SamplerConfig, generate, sampler_config
from radd_fast.sampling.config import auto_rows_in_flight
from tests.support.models import random_head_model


@pytest.mark.parametrize("eps", [0.0, 1.0, 2.0, -1e-3, math.nan, math.inf])
def test_eps_outside_the_open_unit_interval_is_rejected(eps):
    with pytest.raises(ValueError, match="eps"):
        SamplerConfig(eps=eps)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=2.5), dict(method="ddim"), dict(strategy="beam"),
                                 dict(strategy="top_k", strategy_para=2.5), dict(strategy="top_p", strategy_para=0),
                                 dict(sampling_dtype="float16"), dict(rows_in_flight=0), dict(wave_size=0)])
def test_bad_options_fail_at_construction(bad):
    with pytest.raises(ValueError):
        SamplerConfig(**bad)


def test_defaults_are_the_published_library_ones_and_fp64_noise():
    assert SamplerConfig(strategy="top_k").strategy_para == 400
    assert SamplerConfig(strategy="top_p").strategy_para == 0.9
    cfg = SamplerConfig()
    assert cfg.sampling_dtype == "float64" and cfg.noise_dtype == torch.float64
    assert "fp64 Gumbel" in cfg.describe() and "fp32 Gumbel" in cfg.replace(sampling_dtype="float32").describe()


def test_options_override_a_config_and_unknown_names_fail():
    cfg = sampler_config(SamplerConfig(steps=7), batch_size=3, strategy="top_k", strategy_para=2)
    assert (cfg.steps, cfg.rows_in_flight, cfg.strategy, cfg.strategy_para) == (7, 3, "top_k", 2)
    with pytest.raises(TypeError, match="unknown sampling option"):
        sampler_config(temperature=0.7)


def test_registries_carry_their_metadata():
    assert {name for name, spec in METHOD_SPECS.items() if spec.needs_noise} == {"tweedie", "euler"}
    assert set(STRATEGY_SPECS) == {"direct", "top_p", "top_k"}


def test_auto_rows_in_flight_on_cpu_is_bounded_by_the_samples():
    cpu = torch.device("cpu")
    assert auto_rows_in_flight(5, 1024, 768, cpu) == 5
    assert auto_rows_in_flight(1000, 1024, 768, cpu) == 16
    assert auto_rows_in_flight(0, 1024, 768, cpu) == 1


def test_generate_records_its_config_in_the_stats():
    model = random_head_model(tokens=8, length=8)
    cfg = SamplerConfig(steps=4, sampling_dtype="float32", use_kernels=False)
    tokens, stats = generate(model, LogLinearNoise(), 6, config=cfg, seed=0, progress=False)
    assert tokens.shape == (6, 8) and stats.rows_in_flight == 6 and stats.steps == 4
    assert stats.sampler == cfg.describe() and "fp32 Gumbel" in stats.summary()
