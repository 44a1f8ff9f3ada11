"""Conditioning (docs/SAMPLING.md): fixed (position, token) pairs that are never masked and never change.

Accepted forms, all turned into one "initial state" tensor [1 or R, L] holding the
fixed tokens and MASK at every free position:
- ``None``: unconditional;
- a dict ``{position: token}`` or ``{position: [tokens...]}`` (a span starting there);
- a list of ``(position, token)`` pairs;
- a tensor [L] or [R, L] with MASK (or -1) at the free positions (one row per sample).

``text_conditioning`` builds the dict for the common prefix / suffix / infill case::

    cond = text_conditioning(length=128, prefix=tok.encode("Once"), suffix=tok.encode("end."))
    tokens, stats = generate(model, noise, 8, 128, 128, conditioning=cond)
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


def text_conditioning(length: int, prefix: Sequence[int] = (), suffix: Sequence[int] = (),
                      infill: Mapping[int, Sequence[int]] | None = None) -> dict[int, int]:
    """{position: token} for a prefix at 0, a suffix ending at length - 1, and spans at given positions."""
    prefix, suffix = list(prefix), list(suffix)
    if len(prefix) + len(suffix) > length:
        raise ValueError(f"prefix ({len(prefix)} tokens) + suffix ({len(suffix)} tokens) is longer than the "
                         f"sequence length {length}")
    pairs: dict[int, int] = {}
    spans = [(0, prefix, "prefix"), (length - len(suffix), suffix, "suffix")]
    spans += [(int(p), list(t), f"infill at {p}") for p, t in (infill or {}).items()]
    for start, toks, name in spans:
        if toks and not (0 <= start and start + len(toks) <= length):
            raise ValueError(f"{name}: positions [{start}, {start + len(toks)}) fall outside the sequence [0, {length})")
        for i, tok in enumerate(toks):
            if pairs.get(start + i, tok) != tok:
                raise ValueError(f"{name}: position {start + i} is already fixed to token {pairs[start + i]}")
            pairs[start + i] = int(tok)
    return pairs


def initial_state(conditioning, num_samples: int, length: int, mask_id: int, device) -> torch.Tensor:
    """The starting x: [1, L] (shared conditioning) or [num_samples, L] int64, MASK at free positions."""
    if conditioning is None:
        return torch.full((1, length), mask_id, dtype=torch.int64, device=device)
    if isinstance(conditioning, torch.Tensor):
        x = conditioning.to(device=device, dtype=torch.int64)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[1] != length or x.shape[0] not in (1, num_samples):
            raise ValueError(f"conditioning tensor must be [L={length}] or [num_samples={num_samples}, L], "
                             f"got {tuple(conditioning.shape)}")
        x = torch.where(x < 0, torch.full_like(x, mask_id), x)
        if bool((x > mask_id).any()):
            raise ValueError(f"conditioning tokens must be in [0, {mask_id}) (MASK = {mask_id} marks free positions)")
        return x.contiguous()
    pairs = _pairs(conditioning)
    x = torch.full((1, length), mask_id, dtype=torch.int64)
    for pos, tok in pairs:
        if not 0 <= pos < length:
            raise ValueError(f"conditioning position {pos} is outside the sequence [0, {length})")
        if not 0 <= tok < mask_id:
            raise ValueError(f"conditioning token {tok} at position {pos} is not a real token id [0, {mask_id})")
        x[0, pos] = tok
    return x.to(device)


def _pairs(conditioning) -> list[tuple[int, int]]:
    if isinstance(conditioning, Mapping):
        items = []
        for pos, tok in conditioning.items():
            toks = [tok] if isinstance(tok, int) or (isinstance(tok, torch.Tensor) and tok.dim() == 0) else list(tok)
            items += [(int(pos) + i, int(t)) for i, t in enumerate(toks)]
        return items
    try:
        return [(int(p), int(t)) for p, t in conditioning]
    except (TypeError, ValueError) as e:
        raise ValueError("conditioning must be None, a {position: token(s)} dict, (position, token) pairs, "
                         f"or a [L] / [R, L] tensor; got {type(conditioning).__name__}") from e


def projection(init: torch.Tensor, mask_id: int):
    """The published ``proj_fun``: writes the fixed tokens of ``init`` into x."""
    fixed = init != mask_id

    def proj_fun(x: torch.Tensor) -> torch.Tensor:
        return torch.where(fixed, init, x)

    return proj_fun
