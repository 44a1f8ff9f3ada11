"""Sampling from RADD (docs/SAMPLING.md): the fast engine and the published-API samplers.

- ``generate(model, noise, num_samples, length, steps, config=SamplerConfig(...))``: the fast engine
  (engine.py), every option typed and validated in ``SamplerConfig`` (config.py);
- ``DiffusionSampler`` / ``OrderedSampler``: drop-ins with the published API (published_api.py),
  ``fast=True`` routes them through the engine;
- ``text_conditioning``: prefix / suffix / infill pairs (conditioning.py).
"""
from .conditioning import initial_state, text_conditioning
from .config import SamplerConfig, sampler_config
from .engine import SamplingStats, generate
from .published_api import DiffusionSampler, OrderedSampler, Sampler
from .schedule import METHOD_SPECS, METHODS, expected_enfe, update_rates
from .strategies import STRATEGIES, STRATEGY_SPECS

__all__ = ["generate", "SamplerConfig", "sampler_config", "SamplingStats", "DiffusionSampler", "OrderedSampler",
           "Sampler", "text_conditioning", "initial_state", "expected_enfe", "update_rates", "METHODS",
           "METHOD_SPECS", "STRATEGIES", "STRATEGY_SPECS"]
