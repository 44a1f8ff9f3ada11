"""Drop-in samplers with the published API and semantics (docs/SAMPLING.md): ``sample.py --loop published_api``.

Named after what they are, the published API; "reference" is the plain-PyTorch backend
(``--backend reference``), which these samplers run on like any other model code.

``DiffusionSampler(method, model, noise, batch_dims, token_dim, strategy, ...)`` and
``OrderedSampler(model, batch_dims, token_dim, strategy, ...)`` follow the
published loops step by step: a full forward (published output layout) on the
rows that changed since their last evaluation (the per-row cache), a
full log-softmax, then the strategy on every masked position. ``update_cnt``
counts rows whose tokens changed, summed over steps (E-NFE x batch).

Deliberate differences from the published code (quirks): random numbers are
drawn on the model's device (optionally from a seeded generator); the cache holds
fp32 log-probs (published: fp16 probabilities); top-p / top-k exclude the MASK
column; the default order of ``OrderedSampler`` is a permutation of the
configured length (published: a hard-coded 1024), conditioned positions are
never overwritten, and with steps < L it reveals the order in ``steps`` chunks
(published: leaves the rest masked).

``fast=True`` routes ``sample`` through the fast engine (``generate``) with the
same arguments and counters. Example::

    sampler = DiffusionSampler("tweedie", model, noise, (8, 1024), model.vocab_size, "direct")
    x = sampler.sample(1024)                        # [8, 1024] int64, no MASK left
    print(sampler.update_cnt / 8)                   # ~647 = E-NFE (docs/SAMPLING.md)
"""
from __future__ import annotations

import torch

from ..model.head import gumbel
from .engine import generate
from .schedule import DIFFUSION_METHODS, check_steps, ordered_groups, update_rates
from .strategies import check_strategy, sample_logits
from .strategies import sampling_dtype as parse_sampling_dtype


def _identity(x):
    return x


def _model_device(model) -> torch.device:
    """A RADD's ``device``; the published API also takes any module (its first parameter's device)."""
    if hasattr(model, "device"):
        return torch.device(model.device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class Sampler:
    def __init__(self, model, batch_dims, token_dim, strategy, strategy_para=None, device=None, *,
                 seed: int | None = None, fast: bool = False, sampling_dtype: str = "float32", **engine_kwargs):
        self.model = model
        self.batch_dims = tuple(int(b) for b in batch_dims)
        if len(self.batch_dims) != 2 or min(self.batch_dims) < 1:
            raise ValueError(f"batch_dims must be (batch, length) with both >= 1, got {batch_dims}")
        self.token_dim = int(token_dim)
        self.mask_id = self.token_dim - 1
        self.strategy = strategy
        self.strategy_para = check_strategy(strategy, strategy_para)
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.sampling_dtype = sampling_dtype
        self._dtype = parse_sampling_dtype(sampling_dtype)
        self.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        self.fast = fast
        self.engine_kwargs = engine_kwargs
        self._update_cnt = torch.zeros((), dtype=torch.int64, device=self.device)
        self.last_row_nfe = None  # [batch] rows' E-NFE in the last sample() call
        self.stats = None  # SamplingStats of the last fast call

    @property
    def update_cnt(self) -> int:
        """Rows whose tokens changed, summed over steps and calls (one host sync when read)."""
        return int(self._update_cnt)

    @update_cnt.setter
    def update_cnt(self, value: int) -> None:
        self._update_cnt.fill_(int(value))

    def _log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Published forward (log-softmax over the real tokens, MASK column raw) -> [b, L, V-1] fp32."""
        return self.model(x)[..., : self.mask_id].float()

    def _start(self, proj_fun) -> torch.Tensor:
        self.model.eval()
        return proj_fun(torch.full(self.batch_dims, self.mask_id, dtype=torch.int64, device=self.device))

    def _fast(self, steps, proj_fun, method, noise=None, **kwargs) -> torch.Tensor:
        init = proj_fun(torch.full(self.batch_dims, self.mask_id, dtype=torch.int64, device=self.device))
        seed = int(torch.randint(0, 2**62, (), generator=self.generator, device=self.device))
        kwargs = {"progress": False, **self.engine_kwargs, **kwargs}
        tokens, stats = generate(self.model, noise, self.batch_dims[0], self.batch_dims[1], steps, method=method,
                                 strategy=self.strategy, strategy_para=self.strategy_para, conditioning=init,
                                 seed=seed, sampling_dtype=self.sampling_dtype, **kwargs)
        self.stats, self.last_row_nfe = stats, stats.enfe.to(self.device)
        self._update_cnt += self.last_row_nfe.sum()
        return tokens

    def _count(self, x_old: torch.Tensor, x: torch.Tensor, row_nfe: torch.Tensor) -> torch.Tensor:
        changed = (x != x_old).any(dim=-1)
        row_nfe += changed
        self._update_cnt += changed.sum()
        return changed

    def sample(self, steps, proj_fun=_identity):
        raise NotImplementedError


class DiffusionSampler(Sampler):
    """tweedie / euler sampling with the per-row cache (docs/SAMPLING.md)."""

    def __init__(self, method, model, noise, batch_dims, token_dim, strategy, strategy_para=None, eps=1e-5,
                 device=None, **kwargs):
        super().__init__(model, batch_dims, token_dim, strategy, strategy_para, device, **kwargs)
        if method not in DIFFUSION_METHODS:
            raise ValueError(f"DiffusionSampler method must be one of {DIFFUSION_METHODS}, got {method!r}")
        self.method, self.noise, self.eps = method, noise, eps

    @torch.no_grad()
    def sample(self, steps, proj_fun=_identity) -> torch.Tensor:
        steps = check_steps(steps)
        if self.fast:
            return self._fast(steps, proj_fun, self.method, noise=self.noise, eps=self.eps)
        x = self._start(proj_fun)
        rates = update_rates(self.noise, steps, self.method, self.eps, self.device)
        B, L = self.batch_dims
        row_nfe = torch.zeros(B, dtype=torch.int64, device=self.device)
        logp = torch.empty(B, L, self.mask_id, dtype=torch.float32, device=self.device)
        changed = torch.ones(B, dtype=torch.bool, device=self.device)
        for i in range(steps):
            if changed.any():  # published: a host sync per step, then model(x[changed])
                logp[changed] = self._log_probs(x[changed])
            mask = x == self.mask_id
            x_old = x.clone()
            if self.strategy == "direct":
                x[mask] = self._direct_draw(logp[mask], rates[i])
            else:
                reveal = mask & (torch.rand(x.shape, device=self.device, generator=self.generator) < rates[i])
                x[reveal] = sample_logits(logp[reveal], self.strategy, self.strategy_para, self.generator, self._dtype)
            changed = self._count(x_old, x, row_nfe)
        self.last_row_nfe = row_nfe
        return x

    def _direct_draw(self, logp: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        """Published direct step: Gumbel-max over [p(v) * rate for v < V-1] + [1 - rate for MASK].

        The MASK column is scored apart (same argmax; ties go to the real token, as argmax over the
        concatenation would) and the noise is added in place: peak memory one [M, V-1] copy + noise."""
        dtype = self._dtype
        scores = logp.to(dtype, copy=True)
        scores += torch.log(rate).to(dtype)
        scores += gumbel(scores.shape, dtype, scores.device, self.generator)
        best, token = scores.max(dim=-1)
        del scores
        stay = torch.log1p(-rate).to(dtype) + gumbel(best.shape, dtype, best.device, self.generator)
        return torch.where(stay > best, torch.full_like(token, self.mask_id), token)


class OrderedSampler(Sampler):
    """Any-order autoregressive sampling (docs/SAMPLING.md): one position (or one chunk) of ``order`` per step."""

    def __init__(self, model, batch_dims, token_dim, strategy, strategy_para=None, order=None, device=None, **kwargs):
        super().__init__(model, batch_dims, token_dim, strategy, strategy_para, device, **kwargs)
        self.order = order

    @torch.no_grad()
    def sample(self, steps=None, proj_fun=_identity) -> torch.Tensor:
        steps = check_steps(self.batch_dims[1] if steps is None else steps)
        if self.fast:
            return self._fast(steps, proj_fun, "ordered", order=self.order)
        x = self._start(proj_fun)
        # Published: one random order per call, shared by the batch, a full forward every step.
        group, K = ordered_groups(x == self.mask_id, steps, self.order, self.generator, shared=True)
        row_nfe = torch.zeros(self.batch_dims[0], dtype=torch.int64, device=self.device)
        for i in range(int(K.max()) if K.numel() else 0):
            logp = self._log_probs(x)
            reveal = group == i
            x_old = x.clone()
            x[reveal] = sample_logits(logp[reveal], self.strategy, self.strategy_para, self.generator, self._dtype)
            self._count(x_old, x, row_nfe)
        self.last_row_nfe = row_nfe
        return x
