"""An independent implementation of the published RADD forward, written from the spec alone.

It shares no code with radd_fast: its own layer norm, rotary and attention math,
reading the published state-dict keys directly. It stands in for the published
model in parity tests (the published code needs flash-attn and a GPU).
"""
from __future__ import annotations

import math

import torch


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def published_logits(state: dict, n_heads: int, indices: torch.Tensor) -> torch.Tensor:
    """Raw logits [B, T, V] of the published model with weights ``state`` (fp32, eval mode)."""
    S = {k: v.double() for k, v in state.items()}
    x = S["vocab_embed.embedding"][indices]
    B, T, d = x.shape
    hd = d // n_heads
    ang = torch.arange(T, dtype=torch.float64)[:, None] * S["rotary_emb.inv_freq"][None, :]  # [T, hd/2]
    cos, sin = ang.cos()[None, None], ang.sin()[None, None]  # broadcast over [B, h, T, hd/2]
    n_blocks = len({k.split(".")[1] for k in S if k.startswith("blocks.")})
    for i in range(n_blocks):
        p = f"blocks.{i}."
        a = _layer_norm(x, S[p + "norm1.weight"], S[p + "norm1.bias"])
        qkv = a @ S[p + "attn_qkv.weight"].T  # [B, T, 3d] ordered q | k | v
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(B, T, n_heads, hd).permute(0, 2, 1, 3) for j in range(3))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        att = torch.exp(scores - scores.amax(-1, keepdim=True))
        att = att / att.sum(-1, keepdim=True)
        o = (att @ v).permute(0, 2, 1, 3).reshape(B, T, d)
        x = x + o @ S[p + "attn_out.weight"].T
        m = _layer_norm(x, S[p + "norm2.weight"], S[p + "norm2.bias"])
        m = _gelu_tanh(m @ S[p + "mlp.0.weight"].T + S[p + "mlp.0.bias"])
        x = x + m @ S[p + "mlp.2.weight"].T + S[p + "mlp.2.bias"]
    x = _layer_norm(x, S["output_layer.norm_final.weight"], S["output_layer.norm_final.bias"])
    return x @ S["output_layer.linear.weight"].T + S["output_layer.linear.bias"]


def published_log_probs(state, n_heads, indices):
    logits = published_logits(state, n_heads, indices)
    real = logits[..., :-1]
    real = real - torch.logsumexp(real, -1, keepdim=True)
    return torch.cat([real, logits[..., -1:]], -1)


def published_state_dict(vocab: int, d: int, n_heads: int, n_blocks: int, seed: int = 0) -> dict:
    """Random fp32 weights with the published keys and shapes (what save_pretrained writes)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s
    hd = d // n_heads
    state = {"vocab_embed.embedding": r(vocab, d, s=1.0),
             "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))}
    for i in range(n_blocks):
        p = f"blocks.{i}."
        state.update({p + "norm1.weight": 1 + r(d), p + "norm1.bias": r(d), p + "attn_qkv.weight": r(3 * d, d),
                      p + "attn_out.weight": r(d, d), p + "norm2.weight": 1 + r(d), p + "norm2.bias": r(d),
                      p + "mlp.0.weight": r(4 * d, d), p + "mlp.0.bias": r(4 * d),
                      p + "mlp.2.weight": r(d, 4 * d, s=0.1), p + "mlp.2.bias": r(d)})
    state.update({"output_layer.norm_final.weight": 1 + r(d), "output_layer.norm_final.bias": r(d),
                  "output_layer.linear.weight": r(vocab, d), "output_layer.linear.bias": r(vocab)})
    return state


def published_config(tokens: int, d: int, n_heads: int, n_blocks: int, length: int) -> dict:
    """A config dict in the published nested layout, with keys our loader must ignore."""
    return {"ngpus": 8, "tokens": tokens,
            "training": {"batch_size": 512, "accum": 1, "n_iters": 400000, "ema": 0.9999, "loss_type": "t_DCE"},
            "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
            "graph": {"type": "absorb", "file": "data", "report_all": False},
            "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
            "model": {"name": "small", "type": "ddit_wot", "hidden_size": d, "cond_dim": 128, "length": length,
                      "n_blocks": n_blocks, "n_heads": n_heads, "scale_by_sigma": False, "dropout": 0.1,
                      "use_checkpoint": False, "dtype": "float16"},
            "optim": {"lr": 3e-4, "warmup": 2500}}
