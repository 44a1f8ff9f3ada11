"""The time samplers (radd_fast/losses/time_samplers.py): naive, vdm and decoupled draws cover [0, 1)
uniformly, the stratified ones one draw per stratum, from the generator given."""
from __future__ import annotations

import math

import pytest
import torch

from radd_fast.losses.time_samplers import decoupled, get_time_sampler, naive, vdm


def test_time_samplers_cover_unit_interval():
    for sampler in (naive, vdm, decoupled):
        t = sampler(1000, "cpu")
        assert t.shape == (1000,) and (t >= 0).all() and (t < 1).all()
    # stratified: exactly one draw per stratum [j/B, (j+1)/B)
    for sampler in (vdm, decoupled):
        t = sampler(64, "cpu")
        assert torch.equal((t * 64).floor().long().sort().values, torch.arange(64))


@pytest.mark.parametrize("name", ["naive", "vdm", "decoupled"])
def test_time_samplers_are_uniform_on_0_1(name):
    torch.manual_seed(0)
    draws = torch.cat([get_time_sampler(name)(16, "cpu") for _ in range(500)])
    assert draws.dtype == torch.float32 and bool((draws >= 0).all()) and bool((draws < 1).all())
    counts = torch.histc(draws, bins=10, min=0, max=1)
    assert bool(((counts - 800).abs() < 5 * math.sqrt(800)).all()), counts.tolist()


@pytest.mark.parametrize("name", ["naive", "vdm", "decoupled"])
def test_time_samplers_draw_from_the_generator_given(name):
    sampler = get_time_sampler(name)
    a = sampler(8, "cpu", generator=torch.Generator().manual_seed(7))
    torch.manual_seed(99)  # the global generator must not matter
    assert torch.equal(a, sampler(8, "cpu", generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, sampler(8, "cpu", generator=torch.Generator().manual_seed(8)))


def test_vdm_steps_up_by_one_over_b_from_sequence_to_sequence():
    t = get_time_sampler("vdm")(8, "cpu", generator=torch.Generator().manual_seed(0)).double()
    steps = ((t - t[0]) % 1 * 8).tolist()  # sequence j sits j/B above sequence 0 (mod 1)
    assert steps == pytest.approx([float(j) for j in range(8)], abs=1e-4)
