"""Exponential moving average of parameters (docs/MODEL.md), run-format compatible.

``state_dict()`` is ``{decay, num_updates, shadow_params: [tensor per trainable
parameter, in parameters() order]}``, exactly what the published run
checkpoints hold under ``ema``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch


class ExponentialMovingAverage:
    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        params = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.num_updates = 0
        self.shadow_params = [p.detach().clone() for p in params]
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """shadow -= (1 - decay_n) (shadow - param), decay_n = min(decay, (1+n)/(10+n))."""
        self.num_updates += 1
        n = self.num_updates
        one_minus_decay = 1.0 - min(self.decay, (1 + n) / (10 + n))
        params = [p for p in parameters if p.requires_grad]
        # One fused multi-tensor op instead of a Python loop of small kernels.
        torch._foreach_lerp_(self.shadow_params, [p.detach() for p in params], one_minus_decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow_params, [p for p in parameters if p.requires_grad]):
            p.copy_(s)

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for c, p in zip(self.collected_params, parameters):
            p.copy_(c)

    @contextmanager
    def average_parameters(self, parameters: list[torch.nn.Parameter]):
        """Temporarily swap the EMA weights in (for evaluation and sampling)."""
        self.store(parameters)
        self.copy_to(parameters)
        try:
            yield
        finally:
            self.restore(parameters)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict) -> None:
        for key in ("decay", "num_updates", "shadow_params"):
            if key not in state:
                raise KeyError(f"EMA state has no {key!r} (keys: {sorted(state)})")
        if len(state["shadow_params"]) != len(self.shadow_params):
            raise ValueError(f"EMA state holds {len(state['shadow_params'])} tensors, the model has "
                             f"{len(self.shadow_params)} trainable parameters")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow_params = [s.to(p.device, p.dtype).clone() for s, p in zip(state["shadow_params"], self.shadow_params)]
