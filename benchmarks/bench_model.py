"""Whole-model forward and forward+backward: reference vs fast vs fast + torch.compile.

RADD-small (d 768, 12 blocks, 12 heads, V 50258) at B=32, T=1024, bf16 on a GPU;
a tiny model on CPU (quick). The backward runs from a masked-token NLL on the
published output (full [B, T, V] log-softmax), identical for every provider.
FLOPs per token: ``radd_fast.flops.forward_flops_per_token`` (forward + backward = 3x).
TFLOP/s and tokens/s derive from it.
"""
from __future__ import annotations

import torch

from radd_fast import PRESETS, RADD, RADDConfig
from radd_fast.config import ModelConfig
from radd_fast.flops import forward_flops_per_token

from .run import markdown_table
from .timing import median_ms, peak_memory_mb


def _providers(cfg: RADDConfig, device, dtype):
    ref = RADD(cfg).to(device).set_compute_dtype(dtype)
    fast = RADD(cfg, backend="fast").to(device).set_compute_dtype(dtype)
    fast.load_state_dict(ref.state_dict())
    providers = {"reference": ref, "fast": fast}
    if device.type == "cuda":
        providers["fast+compile"] = torch.compile(fast)
    return providers


def run(device: torch.device, quick: bool) -> list[dict]:
    if quick or device.type != "cuda":
        cfg = RADDConfig(tokens=255, model=ModelConfig(hidden_size=64, n_heads=2, n_blocks=2, length=64, dropout=0.0))
        B, T, dtype = 2, 64, torch.float32
    else:
        cfg = RADDConfig(tokens=50257, model=ModelConfig(**{**PRESETS["small"].__dict__, "dropout": 0.0}))
        B, T, dtype = 32, 1024, torch.bfloat16
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    targets = torch.randint(0, cfg.tokens, (B, T), device=device)
    rows = []
    for name, model in _providers(cfg, device, dtype).items():
        flops = forward_flops_per_token(model if isinstance(model, RADD) else model._orig_mod, T) * B * T

        def fwd():
            with torch.no_grad():
                return model(x)

        def fwd_bwd():
            logp = model(x)
            loss = -logp.gather(-1, targets[..., None]).mean()
            loss.backward()

        model.train()
        for mode, fn, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.0)):
            ms = median_ms(fn, device)
            rows.append({"provider": name, "mode": mode, "B": B, "T": T, "dtype": str(dtype).replace("torch.", ""),
                         "ms": ms, "tokens/s": B * T / ms * 1e3, "TFLOP/s": mult * flops / ms / 1e9,
                         "peak_MB": peak_memory_mb(fn, device)})
        model.zero_grad(set_to_none=True)
    base = {r["mode"]: r["ms"] for r in rows if r["provider"] == "reference"}
    for r in rows:
        r["speedup"] = base[r["mode"]] / r["ms"]
    return rows


if __name__ == "__main__":
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(markdown_table(run(dev, quick=dev.type != "cuda")))
