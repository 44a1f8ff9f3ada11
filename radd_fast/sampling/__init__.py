"""Sampling from RADD (spec 5): the fast engine and the published-API reference samplers.

- ``generate(model, noise, num_samples, length, steps, ...)``: the fast engine (engine.py);
- ``DiffusionSampler`` / ``OrderedSampler``: drop-ins with the published API (reference.py),
  ``fast=True`` routes them through the engine;
- ``text_conditioning``: prefix / suffix / infill pairs (conditioning.py).
"""
from .conditioning import initial_state, text_conditioning
from .engine import SamplingStats, generate
from .reference import DiffusionSampler, OrderedSampler, Sampler
from .schedule import METHODS, expected_enfe, update_rates
from .strategies import STRATEGIES

__all__ = ["generate", "SamplingStats", "DiffusionSampler", "OrderedSampler", "Sampler", "text_conditioning",
           "initial_state", "expected_enfe", "update_rates", "METHODS", "STRATEGIES"]
