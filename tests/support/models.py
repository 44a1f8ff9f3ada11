"""The tiny RADD models the tests build, in one place.

Each builder keeps the exact random draws its tests were written against (seeded tests stay
bit-identical). Why the weights are changed at all: the published init zero-initialises the output
layer (every real token equally likely) and sets the final norm's bias to ones (one direction
dominates the logits); a test that must see the head's output depend on the input perturbs them.
"""
from __future__ import annotations

import torch

from radd_fast import RADD, ModelConfig, RADDConfig


def tiny_config(tokens: int, length: int, hidden_size: int = 32, n_heads: int = 2, n_blocks: int = 1,
                dropout: float = 0.0, **model_fields) -> RADDConfig:
    """A small RADDConfig: d 32, 2 heads, 1 block, no dropout unless asked."""
    return RADDConfig(tokens=tokens, model=ModelConfig(hidden_size=hidden_size, n_heads=n_heads, n_blocks=n_blocks,
                                                       length=length, dropout=dropout, **model_fields))


def random_head_model(tokens: int = 8, length: int = 16, seed: int = 0, scale: float = 0.25) -> RADD:
    """1 block, d = 32, a random head (weight and bias ~ N(0, scale^2)) and a zero final-norm bias: a
    spread, context-dependent distribution (the chi-square tests flag a 10% temperature change at
    3000 samples). The sampling tests' model."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = RADD(tiny_config(tokens, length, name="test"))
    with torch.no_grad():
        lin = model.output_layer.linear
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * scale)
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * scale)
        model.output_layer.norm_final.bias.zero_()
    return model.eval()


def normal_head_model(n_blocks: int, length: int, backend: str = "reference", tokens: int = 11) -> RADD:
    """d = 32, a N(0, 0.3^2) head weight and a zero final-norm bias, seed 4: the cached sampler's model."""
    torch.manual_seed(4)
    model = RADD(tiny_config(tokens, length, n_blocks=n_blocks, name="cache"), backend=backend).eval()
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.3)
        model.output_layer.norm_final.bias.zero_()
    return model


def perturbed_model(tokens: int, length: int, seed: int = 0, scale: float = 0.1, n_blocks: int = 1,
                    hidden_size: int = 32, zero_head: bool = False) -> RADD:
    """Every weight moved by N(0, scale^2) (none when ``zero_head``: the published init), seeded
    globally: the losses' (2 blocks, 0.3) and the evaluation's (256 tokens, 0.1) models."""
    torch.manual_seed(seed)
    model = RADD(tiny_config(tokens, length, hidden_size=hidden_size, n_blocks=n_blocks))
    if not zero_head:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    return model


# The losses' model: V = 12 (mask id 11), 2 blocks, every weight moved by 0.3.
LOSS_TOKENS = 11


def loss_model(tokens=LOSS_TOKENS, length=16, d=32, seed=0) -> RADD:
    return perturbed_model(tokens, length, seed=seed, scale=0.3, n_blocks=2, hidden_size=d)


# The evaluation's model: 256 byte tokens, length 32, weights moved by 0.1; batches of EVAL_LENGTH tokens.
EVAL_LENGTH = 16


def eval_model(seed: int = 0, zero_head: bool = False) -> RADD:
    return perturbed_model(256, 32, seed=seed, scale=0.1, zero_head=zero_head).eval()


def eval_batches(n: int = 2, b: int = 3, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (b, EVAL_LENGTH), generator=g) for _ in range(n)]


def suite_model(loss_type: str | None = "t_DCE") -> RADD:
    """The evaluation suites' model: the evaluation's draws (256 tokens, length 32, weights moved by
    0.1, seed 0), its config recording ``training.loss_type`` (none when None) as a trained run does."""
    torch.manual_seed(0)
    extra = {"training": {"loss_type": loss_type}} if loss_type else {}
    cfg = RADDConfig(tokens=256, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=32, dropout=0.0),
                     extra=extra)
    model = RADD(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def fallback_model(backend: str) -> RADD:
    """10 tokens, length 8, 1 block, a N(0, 0.5^2) head weight, seed 0: the same weights for either
    backend, so the fast backend without Triton (its fallbacks) can be compared with the reference."""
    torch.manual_seed(0)
    model = RADD(RADDConfig(tokens=10, model=ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, length=8,
                                                          dropout=0.0, name="fallback")), backend=backend)
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.5)
    return model.eval()


def zero_head_model(tokens: int, length: int = 16) -> RADD:
    """The published init (a zero output layer: -log p = log(tokens) at every masked token), in eval mode:
    the losses' closed-form tests."""
    model = perturbed_model(tokens, length, zero_head=True).eval()
    assert not model.output_layer.linear.weight.detach().any()
    return model
