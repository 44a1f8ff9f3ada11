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
"""
from __future__ import annotations

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


def train_flops_per_token(model, length: int, head_fraction: float = 1.0) -> float:
    """Forward + backward (3x forward) FLOPs per token."""
    return 3.0 * forward_flops_per_token(model, length, head_fraction)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The card's dense 16-bit peak FLOP/s; None on CPU, for fp32, or for a card not in the table."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS_16BIT if key in name), None)
