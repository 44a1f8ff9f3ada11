"""RADD: the time-independent transformer of the published ``ddit_wot`` model.

``model(indices)`` returns log p(x0_i = v | x_t) in the published layout
(log_softmax over columns [0, V-1), MASK column raw); ``logits`` the raw
logits; ``hidden`` the residual stream before the output head, which the fused
loss and the sparse-head sampler use to run the head only where it is needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import hub
from ..config import RADDConfig, parse_dtype
from .head import OutputHead
from .layers import DDiTBlock, DDitFinalLayer, EmbeddingLayer, Rotary
from .ops import AUTO, get_ops, resolve_backend
from .precision import autocast, default_compute_dtype


class RADD(nn.Module):
    """The published architecture (docs/MODEL.md). Example::

        cfg = RADDConfig(tokens=255, model=PRESETS["tiny"])
        model = RADD(cfg)
        logp = model(torch.randint(0, 256, (2, 16)))  # [2, 16, 256]
    """

    def __init__(self, config: RADDConfig | dict, backend: str | None = None, dtype=None):
        super().__init__()
        if not isinstance(config, RADDConfig):
            config = RADDConfig.from_dict(config)
        self.config = config
        m = config.model
        self.vocab_embed = EmbeddingLayer(m.hidden_size, config.vocab_size)
        self.rotary_emb = Rotary(m.head_dim)
        self.blocks = nn.ModuleList(DDiTBlock(m.hidden_size, m.n_heads, m.dropout) for _ in range(m.n_blocks))
        self.output_layer = DDitFinalLayer(m.hidden_size, config.vocab_size)
        self.use_checkpoint = m.use_checkpoint
        self.validate_inputs = True
        self.backend = "reference"
        self._dtype_override = parse_dtype(dtype)
        self.set_backend(backend or m.backend)

    # -- settings -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    @property
    def length(self) -> int:
        return self.config.model.length

    @property
    def device(self) -> torch.device:
        """The device of the weights: the one way the package asks where a model lives."""
        return self.vocab_embed.embedding.device

    def set_backend(self, backend: str) -> "RADD":
        """Swap every block's norm / rotary / attention (and the head's kernels) between 'reference' and
        'fast'; 'auto' picks fast on CUDA and reference elsewhere, and is decided again when the model moves."""
        self._backend_choice = backend
        self._apply_backend(resolve_backend(backend, self.device))
        return self

    def _apply_backend(self, backend: str) -> None:
        ops = get_ops(backend)
        self.backend = backend
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()`` / ``.cpu()`` go through here: an 'auto' backend follows the new device."""
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_backend_choice", None) == AUTO:
            self._apply_backend(resolve_backend(AUTO, self.device))
        return out

    def set_compute_dtype(self, dtype) -> "RADD":
        self._dtype_override = parse_dtype(dtype)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """Autocast dtype of the blocks and head: the explicit choice (``dtype=`` /
        ``set_compute_dtype``), else fp32 off CUDA and the config's ``model.dtype`` on CUDA.
        Independent of the kernel backend."""
        if self._dtype_override is not None:
            return self._dtype_override
        return default_compute_dtype(self.device, self.config.model.dtype)

    def autocast(self):
        return autocast(self.device, self.compute_dtype)

    # -- forward passes -------------------------------------------------------------------------
    def check_indices(self, indices: torch.Tensor) -> None:
        """Clear errors for inputs the embedding would otherwise reject deep inside a kernel."""
        if indices.dim() != 2 or indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"indices must be an int64 tensor [B, T], got {indices.dtype} {tuple(indices.shape)}")
        if indices.shape[1] > self.length:
            raise ValueError(f"sequence length {indices.shape[1]} exceeds the model's length {self.length} (model.length)")
        if not self.validate_inputs or torch.compiler.is_compiling() or indices.numel() == 0:
            return
        lo, hi = torch.aminmax(indices)
        if lo.item() < 0 or hi.item() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}) (vocab size incl. MASK), "
                             f"got min {lo.item()} max {hi.item()}: vocab mismatch between data and model?")

    def hidden(self, indices: torch.Tensor, check: bool = True, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Residual stream after the last block: [B, T] int -> [B, T, d] (fp32).

        ``check=False`` skips the token-range check (a host sync) for callers that already
        validated the tokens, e.g. the losses, which check the clean batch once.
        ``rows``: [P] int64 flat indices into the B * T positions -> only their rows, [P, d]. The
        last block then runs its attention output, MLP and residual adds at those rows alone (all
        positions still give keys and values): exact, and about 1/n_blocks of the body cheaper.
        """
        if check:
            self.check_indices(indices)
        x = self.vocab_embed(indices)
        cos, sin = self.rotary_emb(indices.shape[1], x.device)
        last = len(self.blocks) - 1
        with self.autocast():
            for i, block in enumerate(self.blocks):
                block_rows = rows if i == last else None
                if self.use_checkpoint and self.training:
                    x = checkpoint(block, x, cos, sin, block_rows, use_reentrant=False)
                else:
                    x = block(x, cos, sin, block_rows)
        if rows is not None and last < 0:  # no blocks: the embedding rows themselves
            x = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        return x

    def output_head(self) -> OutputHead:
        """The output head (final norm + projection) with this model's backend and compute dtype."""
        return OutputHead(self.output_layer, self.backend, self.compute_dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + output projection: [..., d] -> raw logits [..., V] (compute dtype)."""
        return self.output_head().logits(h)

    def logits(self, indices: torch.Tensor) -> torch.Tensor:
        """Raw logits [B, T, V]."""
        return self.head(self.hidden(indices))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Published output: [B, T, V] fp32, columns [0, V-1) log-softmaxed, MASK column raw."""
        return logits_to_log_probs(self.logits(indices))

    def vocab_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Log-probs over the V-1 real tokens at selected rows only: h [N, d] -> [N, V-1] fp32
        (``target_log_probs`` gathers one token per row instead)."""
        return self.output_head().vocab_log_probs(h)

    def target_log_probs(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets) at selected rows: h [N, d] (from ``hidden``), targets [N] -> [N] fp32
        (``OutputHead.target_log_probs``: the fused loss head on the fast backend)."""
        return self.output_head().target_log_probs(h, targets)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, folder) -> None:
        """Write the hub layout (config.json + model.safetensors) to ``folder``."""
        hub.save_pretrained(self, folder)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the hub layout to ``repo_id`` (``private``, ``token``); returns the commit URL."""
        return hub.push_to_hub(self, repo_id, **kwargs)


def logits_to_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Raw [.., V] logits -> the published layout: log_softmax over [0, V-1), MASK column kept raw."""
    logits = logits.float()
    return torch.cat([F.log_softmax(logits[..., :-1], dim=-1), logits[..., -1:]], dim=-1)
