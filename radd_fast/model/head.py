"""The output head of RADD: final norm + projection over the vocabulary, for its three uses.

The head is the only model-facing caller of the head kernels (the fused loss
head and the fused sampling update); losses, evaluation and the sampler go
through it and never reach into ``model.output_layer`` or ``radd_fast.kernels``.

- ``logits(h)``: raw logits at every row (the published forward);
- ``target_log_probs(h_rows, targets)``: log p(target) at selected rows only
  (losses, evaluation): [N] instead of the [B, L, V] log-softmax
  (``vocab_log_probs(h_rows)``: every real token's, [N, V-1]);
- ``sampler(...).sample_at(h_rows, dst, x_flat, strategy, key, noise_ids)``: draw the
  tokens of the revealed rows of one sampler evaluation and write them into x, each
  row's Gumbel noise keyed by (key, its noise id) alone;
- ``sampler(...).token_stats(h_rows, strategy, key, noise_ids)``: per masked position
  a drawn token, its log-probability and the entropy of its distribution (what the
  adaptive decoders rank positions by), in one pass over the vocabulary.

The one backend policy: the head's kernels run when the model's backend is
"fast" (``use_kernels`` overrides it for the sampler), and only where Triton can
run on the weights' device; the "reference" backend computes the published way
in PyTorch. The MASK column (the last one) never takes part in a softmax here.

Example::

    head = model.output_head()
    logp = head.target_log_probs(model.hidden(x)[seq, pos], clean[seq, pos])   # [N] fp32
"""
from __future__ import annotations

import torch

from ..kernels.linear_log_softmax import linear_log_softmax_gather
from ..kernels.sampling_update import (
    gumbel_noise,
    gumbel_ref,
    head_sample_update,
    logits_sample_update,
    logits_sample_update_ref,
    mix64,
)
from ..kernels.token_stats import TokenStats, logits_token_stats_ref, token_stats
from ..kernels.utils import triton_runs_on
from ..philox import keyed_gumbel
from .precision import autocast

__all__ = ["OutputHead", "RevealSampler", "gumbel", "noise_key"]


def gumbel(shape, dtype: torch.dtype, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise drawn on ``device`` from ``generator`` (the PyTorch draw of every sampler)."""
    return gumbel_ref(shape, dtype, device, generator)


def noise_key(seed: int, stream: int) -> int:
    """The Philox key of one random stream of a sampling run (e.g. the head's Gumbel noise, the reveal
    schedule): distinct and well spread for every (seed, stream)."""
    return mix64(mix64(int(seed)) ^ int(stream))


class OutputHead:
    """Final norm + projection of one model, with the backend policy fixed at creation.

    layer: the model's ``DDitFinalLayer`` (``norm_final`` then ``linear`` [V, d]); backend:
    'reference' | 'fast'; compute_dtype: the autocast dtype of the projection.
    """

    def __init__(self, layer, backend: str, compute_dtype: torch.dtype):
        self.layer = layer
        self.fused = backend == "fast"
        self.dtype = compute_dtype

    @property
    def n_vocab(self) -> int:
        """Real tokens (the MASK column excluded)."""
        return self.layer.linear.weight.shape[0] - 1

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d] -> raw logits [..., V] in the compute dtype."""
        with autocast(h.device, self.dtype):
            return self.layer(h)

    def vocab_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Log-probs over the V-1 real tokens: [N, d] -> [N, V-1] fp32."""
        return self.logits(h)[..., :-1].float().log_softmax(-1)

    def target_log_probs(self, h_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets) at selected rows: h_rows [N, d], targets [N] -> [N] fp32.

        Fused: the linear + log-softmax kernel keeps an online log-sum-exp over vocabulary
        tiles, so the [N, V] logits never exist. Reference: the published computation (full
        log-softmax over the V-1 real tokens, then gather).
        """
        if not self.fused:
            return self.vocab_log_probs(h_rows).gather(-1, targets[:, None]).squeeze(-1)
        hn = self.layer.norm_final(h_rows).to(self.dtype)
        w, b = self.layer.linear.weight[:-1], self.layer.linear.bias[:-1]
        # validate=False: no host sync per call; callers (losses, eval) check token ids up front.
        return linear_log_softmax_gather(hn, w.to(self.dtype), b.to(self.dtype), targets, validate=False)[0]

    def sampler(self, sampling_dtype: torch.dtype, use_kernels: bool | None = None) -> "RevealSampler":
        """The head prepared for one sampling run (weights cast once); see ``RevealSampler``."""
        return RevealSampler(self, sampling_dtype, use_kernels)


class RevealSampler:
    """The head at the revealed rows of sampler evaluations: strategy, Gumbel-max, write into x.

    - kernels, ``direct``: final norm in torch on [P, d], then logits tile by tile with a running
      Gumbel-max (fused Triton kernel): the [P, V] logits never exist;
    - kernels, ``top_k`` / ``top_p``: [P, V-1] logits for the revealed rows only (P is small),
      filtered by the strategy, then the Gumbel-max + write kernel;
    - no kernels: the same steps in PyTorch, with the same noise (``radd_fast.philox.keyed_gumbel``).
    Row i's noise is Philox keyed by (``key``, ``noise_ids[i]``) alone, so a token's draw does not
    depend on which rows share its evaluation. ``token_stats`` draws the same tokens and adds their
    log-probabilities and the entropies (one pass over the vocabulary with the kernels, ``direct``).
    """

    def __init__(self, head: OutputHead, sampling_dtype: torch.dtype, use_kernels: bool | None):
        self.head = head
        self.fp64 = sampling_dtype == torch.float64
        self.sampling_dtype = sampling_dtype
        linear = head.layer.linear
        self.use_kernels = self._decide_kernels(linear.weight, use_kernels)
        # The fused kernel reads W, b in the compute dtype: cast once, not per evaluation (and not at all
        # without the kernels, whose torch path goes through the autocast head).
        self.weight = linear.weight.detach().to(head.dtype).contiguous() if self.use_kernels else None
        self.bias = linear.bias.detach().to(head.dtype).contiguous() if self.use_kernels else None

    def _decide_kernels(self, weight: torch.Tensor, requested: bool | None) -> bool:
        if requested is None:  # the interpreter mis-reads 16-bit tl.dot tiles: fp32 only off CUDA
            return self.head.fused and triton_runs_on(weight) and (weight.is_cuda or self.head.dtype == torch.float32)
        if requested and not triton_runs_on(weight):
            raise ValueError("use_kernels=True needs CUDA tensors or TRITON_INTERPRET=1")
        return bool(requested)

    def sample_at(self, h_rows: torch.Tensor, dst: torch.Tensor, x_flat: torch.Tensor, strategy, key: int,
                  noise_ids: torch.Tensor) -> None:
        """Draw a token per row and write x_flat[dst[i]] = token[i].

        h_rows: [P, d] hidden rows of the revealed positions (padding included); dst: [P] int64
        into the flat token buffer x_flat; strategy: a ``radd_fast.sampling.strategies.Strategy``
        (``is_direct``, ``filter(logits)``); key: the run's noise key; noise_ids: [P] int64, what
        each row's noise is keyed by (the sampler's: sample index x length + position).
        """
        n_vocab = self.head.n_vocab
        if self.use_kernels and strategy.is_direct:
            hn = self.head.layer.norm_final(h_rows).to(self.weight.dtype)
            head_sample_update(hn, self.weight, self.bias, n_vocab, dst, x_flat, seed=key, fp64=self.fp64,
                               noise_ids=noise_ids)
            return
        logits = strategy.filter(self.head.logits(h_rows)[:, :n_vocab])
        if self.use_kernels:
            logits_sample_update(logits, dst, x_flat, seed=key, fp64=self.fp64, noise_ids=noise_ids)
            return
        noise = keyed_gumbel(key, noise_ids, n_vocab, self.sampling_dtype)
        logits_sample_update_ref(logits, dst, x_flat, noise, self.fp64)

    def token_stats(self, h_rows: torch.Tensor, strategy, key: int, noise_ids: torch.Tensor) -> TokenStats:
        """Per row: a drawn token, its log-probability and the entropy of the distribution it is drawn from.

        h_rows: [P, d] hidden rows of the masked positions; strategy, key, noise_ids: as in ``sample_at``
        (the same key and ids draw the same tokens). Returns ``TokenStats(tokens [P] int64, log_prob [P]
        fp32, entropy [P] fp32)``; under top_k / top_p, of the filtered and renormalised distribution.
        - kernels, ``direct``: one pass over the vocabulary (kernels/token_stats.py), no [P, V] tensor;
        - top_k / top_p (their kept set needs the sorted distribution: no one pass), or no kernels:
          [P, V-1] logits, the strategy's filter, the same keyed noise, ``logits_token_stats_ref``.
        """
        n_vocab = self.head.n_vocab
        if self.use_kernels and strategy.is_direct:
            hn = self.head.layer.norm_final(h_rows).to(self.weight.dtype)
            return token_stats(hn, self.weight[:n_vocab], self.bias[:n_vocab], key, self.fp64, noise_ids=noise_ids)
        logits = strategy.filter(self.head.logits(h_rows)[:, :n_vocab])
        if self.use_kernels:  # the kernel draws the noise on the GPU; the same bits as keyed_gumbel
            noise = gumbel_noise(logits.shape[0], n_vocab, key, logits.device, self.fp64, noise_ids=noise_ids)
        else:
            noise = keyed_gumbel(key, noise_ids, n_vocab, self.sampling_dtype)
        return logits_token_stats_ref(logits, noise, self.fp64)
