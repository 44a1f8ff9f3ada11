"""The one FLOP count of the project: model FLOPs per token, and each card's peak.

Forward FLOPs per token of a RADD on length-T blocks (PaLM appendix B, counted
from the parameters so every preset is covered):

    forward = 2 * W_body + 4 * n_blocks * T * d + 2 * d * V * head_fraction

W_body: the weights of the blocks' matmuls (2-D parameters outside the input
embedding, which is a lookup, and outside the output head); the second term is
attention's q k^T and p v; the last one the output projection, run on a
fraction of the positions (1 for a full forward; the masked fraction for the
losses, which run the head at masked rows only). A training step is 3x forward
(backward = 2x). MFU = executed FLOPs / (seconds * peak).

What a training micro-batch [B, L] executes (``executed_train_flops``; the static step runs the
head and the last block's attention output + MLP at its C planned rows, every other matmul
at all B * L positions; activation recomputation is not counted, as usual for MFU):

    3 * [ B*L * (2 * W_body - 2 * W_rows_last + 4 * n_blocks * L * d) + C * (2 * W_rows_last + 2 * d * V) ]

W_rows_last: the last block's row-wise weights (attention output projection and MLP).
"""
from __future__ import annotations

import weakref

import torch

# Dense 16-bit tensor-core peak FLOP/s, matched by substring of the device name (first match wins).
PEAK_FLOPS_16BIT = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


def body_matmul_weights(model) -> int:
    """Weights of the blocks' matmuls: 2-D parameters outside the embedding and the output head."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and not name.startswith(("vocab_embed", "output_layer")))


def forward_flops_per_token(model, length: int, head_fraction: float = 1.0) -> float:
    """Forward FLOPs per token of ``model`` on blocks of ``length`` (see the module docstring)."""
    m = model.config.model
    head = 2.0 * m.hidden_size * model.vocab_size * head_fraction
    return 2.0 * body_matmul_weights(model) + 4.0 * m.n_blocks * length * m.hidden_size + head


def last_block_row_weights(model) -> int:
    """Matmul weights of the last block that run at the head rows only (attention output + MLP)."""
    blocks = getattr(model, "blocks", ())
    if len(blocks) == 0:
        return 0
    return sum(p.numel() for name, p in blocks[-1].named_parameters()
               if p.dim() == 2 and not name.startswith("attn_qkv"))


_WEIGHT_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weight_counts(model) -> tuple[int, int]:
    """(body matmul weights, last block's row weights) of ``model``, counted once: the training step
    asks every micro-batch, and walking the parameters each time is Python on the hot path."""
    if model not in _WEIGHT_COUNTS:
        _WEIGHT_COUNTS[model] = (body_matmul_weights(model), last_block_row_weights(model))
    return _WEIGHT_COUNTS[model]


def executed_train_flops(model, batch_size: int, length: int, head_rows: int, last_block_rows: int | None = None) -> float:
    """FLOPs one training micro-batch [batch_size, length] executes (forward + backward; module docstring).

    head_rows: rows that reach the output head (the static step's capacity C, or N on the
    overflow path); last_block_rows: rows of the last block's attention output and MLP
    (default: every position, as an unpruned forward).
    """
    m = model.config.model
    tokens = batch_size * length
    rows_last = tokens if last_block_rows is None else last_block_rows
    w_body, w_last = _weight_counts(model)
    body = tokens * (2.0 * (w_body - w_last) + 4.0 * m.n_blocks * length * m.hidden_size)
    pruned = rows_last * 2.0 * w_last
    head = head_rows * 2.0 * m.hidden_size * model.vocab_size
    return 3.0 * (body + pruned + head)


# The formula beside every MFU number the training loop logs.
MFU_FORMULA = ("mfu = executed FLOPs / (seconds * peak * ranks); executed = 3 x forward, the head and the "
               "last block's attention output + MLP at the planned rows only (radd_fast.flops.executed_train_flops)")


def train_flops_per_token(model, length: int, head_fraction: float = 1.0) -> float:
    """Forward + backward (3x forward) FLOPs per token."""
    return 3.0 * forward_flops_per_token(model, length, head_fraction)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The card's dense 16-bit peak FLOP/s; None on CPU, for fp32, or for a card not in the table."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS_16BIT if key in name), None)
