# Per-position statistics of the sampler's head in one pass over the vocabulary: the drawn token,
# its log-probability and the entropy of its distribution (what the adaptive decoders rank by).
#
# What: for N masked positions with final-normed hidden rows h [N, d], the real-token classes
#   W [V-1, d], b [V-1] (the caller leaves the MASK row out: a view, no copy) and a noise key k:
#     l_i     = h_i W^T + b                           (fp32 accumulation; never stored)
#     token_i = argmax_v (l_iv + g_iv)                 (Gumbel-max: a draw from softmax(l_i))
#     logp_i  = l_i[token_i] - logsumexp(l_i)          (<= 0)
#     H_i     = -sum_v p_iv log p_iv = logsumexp(l_i) - sum_v p_iv l_iv
#   g is the sampling head's Philox Gumbel noise for key k: with `noise_ids` [N] int64 row i's
#   noise is keyed by (k, noise_ids[i]) alone (`_gumbel_keyed`, the counter (col, id_lo, id_hi, 0):
#   the same wherever the row sits in the batch; the decoders' rows in flight need that), else
#   at offset row * (V-1) + col in the same `row_chunks` (`_gumbel`). `gumbel_noise(N, V-1, k,
#   noise_ids=...)` materialises either, and for the same key and ids (and the same tiles) the
#   token is the one `head_sample_update` draws. fp64=True draws and adds the noise in fp64 as there.
#
# How: `_stats_partial_kernel` runs over (row tile x vocabulary split) like the sampling head:
#   each program walks its vocab tiles, builds a [BLOCK_N, BLOCK_V] logits tile with tl.dot and
#   keeps, per row, an online log-sum-exp and entropy relative to the running max m:
#     s = sum_v e^(l_v - m),   u = sum_v e^(l_v - m) (l_v - m)     (u <= 0, s >= 1)
#   rescaled when m grows to m': s' = a s, u' = a (u + (m - m') s), a = e^(m - m'); and the
#   running Gumbel-max (best score, its class and its logit). A [N, SPLITS] table of the six
#   partials is merged by `_stats_finalize_kernel` the same way; then
#     logsumexp = m + log s,   H = log s - u / s                   (two non-negative terms:
#   no cancellation at H ~ 0 or at H ~ log V), logp = l[token] - logsumexp.
#
# Strategies: `direct` only. top_k / top_p keep a set that the sorted distribution defines, so a
#   draw needs every logit first: one pass cannot apply them, and `token_stats` refuses them.
#   The head (model/head.py) draws those from their filtered [N, V-1] logits with
#   `logits_token_stats_ref` (the path the exact sampler's top_k / top_p already take).
#
# Memory traffic saved (N = 16384 masked positions, V-1 = 50257, d = 768, bf16): the unfused
#   reference writes and reads [N, V-1] logits (1.6 GB bf16), their fp32 / fp64 log-softmax, the
#   probabilities and p log p (3.3-6.6 GB each) and the same-sized noise; here W is read once
#   per row tile (consecutive programs share its tiles in L2), and only [N, SPLITS] partials
#   (24-28 bytes a row and split) and 16 bytes of results a row are written. No [N, V] tensor.
#
# Limits: h, W, b one dtype (fp32 / bf16 / fp16); fp32 uses IEEE dot products; any d (the kernel
#   loops over d); V-1 >= 1. Outputs: tokens int64, log-prob and entropy fp32. Ties in the draw
#   resolve to the lowest class like torch.argmax. Forward only (no autograd). Without Triton (CPU
#   and no interpreter) `token_stats` runs `token_stats_ref` with `gumbel_noise`'s fallback: with
#   noise_ids the kernel's own numbers (radd_fast/philox.py), else a torch.Generator keyed by the key
#   (same distribution, different numbers).
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from radd_fast.kernels.sampling_update import HeadConfig, gumbel_noise, head_config_for, row_chunks
from radd_fast.kernels.utils import (
    HAS_TRITON,
    SUPPORTED_DTYPES,
    card_of,
    next_power_of_2,
    require,
    triton_runs_on,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from radd_fast.kernels.sampling_update import _gumbel, _gumbel_keyed  # the head's noise, bit for bit

# The strategies one pass over the vocabulary can apply (see the header).
ONE_PASS_STRATEGIES = ("direct",)


class TokenStats(NamedTuple):
    """Per row: the drawn token [N] int64, its log-probability [N] fp32, the entropy [N] fp32 (nats)."""

    tokens: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _stats_partial_kernel(
        h_ptr,  # [N, D] final-normed hidden rows
        w_ptr,  # [n_vocab, D] real-token class weights
        b_ptr,  # [n_vocab] bias
        ids_ptr,  # [N] int64 noise id of each row (read only when KEYED)
        m_ptr,  # [N, SPLITS] fp32 running max logit of each split
        s_ptr,  # [N, SPLITS] fp32 sum e^(l - m)
        u_ptr,  # [N, SPLITS] fp32 sum e^(l - m) (l - m)
        val_ptr,  # [N, SPLITS] best Gumbel score of each split (fp32 / fp64)
        idx_ptr,  # [N, SPLITS] int32 class of that score
        lbest_ptr,  # [N, SPLITS] fp32 logit of that class
        key, N, D, n_vocab, tiles_per_split,
        stride_h, stride_w, stride_part,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        KEYED: tl.constexpr, FP64: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows_ld = tl.where(row_ok, rows, 0).to(tl.int64)
        ks = tl.arange(0, BLOCK_D)
        lanes = tl.arange(0, BLOCK_V)
        score_dtype = tl.float64 if FP64 else tl.float32
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        u = tl.zeros((BLOCK_N,), tl.float32)
        best = tl.full((BLOCK_N,), float("-inf"), score_dtype)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
        best_logit = tl.zeros((BLOCK_N,), tl.float32)
        col0 = pid_s * tiles_per_split * BLOCK_V
        if KEYED:
            ids = tl.load(ids_ptr + rows_ld, mask=row_ok, other=0)
        else:
            ids = rows_ld  # unused
        for t in range(0, tiles_per_split):
            cols = col0 + t * BLOCK_V + lanes
            col_ok = cols < n_vocab
            cols_ld = tl.where(col_ok, cols, 0).to(tl.int64)
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                h_ptrs = h_ptr + rows_ld[:, None] * stride_h + (d0 + ks)[None, :]  # [BLOCK_N, BLOCK_D]
                w_ptrs = w_ptr + cols_ld[:, None] * stride_w + (d0 + ks)[None, :]  # [BLOCK_V, BLOCK_D]
                if EVEN_D:
                    a = tl.load(h_ptrs)
                    b = tl.load(w_ptrs)
                else:
                    k_ok = (d0 + ks) < D
                    a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            logits = acc + tl.load(b_ptr + cols_ld).to(tl.float32)[None, :]
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            # online log-sum-exp and entropy, relative to the running max
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no class yet
            alpha = tl.exp(m - m_ref)  # 0 while m = -inf
            shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
            diff = logits - m_ref[:, None]  # -inf at the columns past n_vocab, where e = 0
            e = tl.exp(diff)
            u = alpha * (u + shift * s) + tl.sum(e * tl.where(col_ok[None, :], diff, 0.0), axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new
            # Gumbel-max, exactly as the sampling head scores a class
            if KEYED:
                g = _gumbel_keyed(key, ids, cols, FP64)
            else:
                g = _gumbel(key, rows[:, None] * n_vocab + cols[None, :], FP64)
            score = tl.where(col_ok[None, :], logits.to(score_dtype) + g.to(score_dtype), float("-inf"))
            tile_best = tl.max(score, axis=1)
            tile_lane = tl.argmax(score, axis=1).to(tl.int32)
            tile_logit = tl.sum(tl.where(lanes[None, :] == tile_lane[:, None], logits, 0.0), axis=1)
            better = tile_best > best  # strict: an earlier tile wins ties (torch.argmax order)
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_lane + col0 + t * BLOCK_V, best_idx)
            best_logit = tl.where(better, tile_logit, best_logit)
        part = rows_ld * stride_part + pid_s
        tl.store(m_ptr + part, m, mask=row_ok)
        tl.store(s_ptr + part, s, mask=row_ok)
        tl.store(u_ptr + part, u, mask=row_ok)
        tl.store(val_ptr + part, best, mask=row_ok)
        tl.store(idx_ptr + part, best_idx, mask=row_ok)
        tl.store(lbest_ptr + part, best_logit, mask=row_ok)

    @triton.jit
    def _stats_finalize_kernel(
        m_ptr,  # [N, SPLITS] fp32 partial max logits
        s_ptr,  # [N, SPLITS] fp32 partial sums e^(l - m)
        u_ptr,  # [N, SPLITS] fp32 partial sums e^(l - m) (l - m)
        val_ptr,  # [N, SPLITS] partial best Gumbel scores (fp32 / fp64)
        idx_ptr,  # [N, SPLITS] int32 partial best classes
        lbest_ptr,  # [N, SPLITS] fp32 logits of those classes
        tok_ptr,  # [N] int64 drawn tokens
        logp_ptr,  # [N] fp32 log-probability of the drawn token
        ent_ptr,  # [N] fp32 entropy of the row's distribution
        N, SPLITS,
        stride_part,
        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        splits = tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (splits < SPLITS)[None, :]
        part = rows64[:, None] * stride_part + splits[None, :]
        m = tl.load(m_ptr + part, mask=ok, other=float("-inf"))
        s = tl.load(s_ptr + part, mask=ok, other=0.0)
        u = tl.load(u_ptr + part, mask=ok, other=0.0)
        big = tl.max(m, axis=1)
        big_ref = tl.where(big == float("-inf"), 0.0, big)  # masked rows only: every real row has a class
        seen = m > float("-inf")
        scale = tl.exp(m - big_ref[:, None])  # 0 for a split that saw no class
        shift = tl.where(seen, m - big_ref[:, None], 0.0)
        s_all = tl.where(row_ok, tl.sum(scale * s, axis=1), 1.0)  # >= 1 on every real row
        u_all = tl.sum(scale * (u + shift * s), axis=1)
        log_s = tl.log(s_all)
        entropy = log_s - u_all / s_all
        v = tl.load(val_ptr + part, mask=ok, other=float("-inf"))
        best_s = tl.argmax(v, axis=1)  # first split holding the maximum = lowest class index
        tok = tl.load(idx_ptr + rows64 * stride_part + best_s, mask=row_ok, other=0).to(tl.int64)
        logit = tl.load(lbest_ptr + rows64 * stride_part + best_s, mask=row_ok, other=0.0)
        log_prob = logit - (big_ref + log_s)  # <= 0 after rounding too: logit <= big, log_s >= 0
        tl.store(tok_ptr + rows64, tok, mask=row_ok)
        tl.store(logp_ptr + rows64, log_prob, mask=row_ok)
        tl.store(ent_ptr + rows64, entropy, mask=row_ok)


# ----------------------------------------------------------------------------
# Configuration and launcher
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)  # pure, and asked on every launch
def token_stats_config_for(capability: tuple, smem_limit: int, dtype: torch.dtype, n_rows: int, d: int,
                           n_vocab: int, fp64: bool, sm_count: int) -> HeadConfig:
    """The launch on a card: the sampling head's rule (``head_config_for``), whose loop this kernel shares.

    The shared memory is the same (one d step's h and W tiles, ``head_smem_bytes``); the online
    statistics add three fp32 numbers a row, in registers. Tiles, vocabulary splits, warps, stages.
    """
    return head_config_for(capability, smem_limit, dtype, n_rows, d, n_vocab, fp64, sm_count)


def _config(n_rows: int, d: int, n_vocab: int, fp64: bool, dtype: torch.dtype, device) -> HeadConfig:
    if device.type != "cuda":  # interpreter: fewer, larger programs, one split
        block_n = min(128, max(16, next_power_of_2(n_rows)))
        block_v = min(128, max(16, next_power_of_2(n_vocab)))
        return HeadConfig(block_n, block_v, min(64, max(16, next_power_of_2(d))), 1, 4)
    capability, smem_limit = card_of(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return token_stats_config_for(capability, smem_limit, dtype, n_rows, d, n_vocab, fp64, sms)


def finalize_blocks(n_rows: int, splits: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_S) of ``_stats_finalize_kernel``: at most 2048 partials per program (six
    tables a split against the sampling head's two; 4096 spilled registers in the sm_80 build at
    32 rows x 128 fp64 splits, ``tools/aot_build.py --resources-from cubin``, triton 3.9)."""
    fs = max(2, next_power_of_2(splits))
    return max(2, min(64, next_power_of_2(n_rows), 2048 // fs)), fs


def _new(shape, dtype, device) -> torch.Tensor:
    """Every output and partial table of a launch (the tests poison them here)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(h, weight, bias, strategy: str, config: Optional[HeadConfig], noise_ids) -> None:
    require(strategy in ONE_PASS_STRATEGIES, lambda: (
        f"token_stats: strategy {strategy!r} cannot be applied in one pass (its kept set needs the whole sorted "
        f"distribution; only {ONE_PASS_STRATEGIES} can): draw from its filtered logits with logits_token_stats_ref"))
    require(h.dim() == 2 and weight.dim() == 2,
            lambda: f"token_stats: h must be [N, d] and weight [V-1, d], got {tuple(h.shape)}, {tuple(weight.shape)}")
    require(h.shape[1] == weight.shape[1],
            lambda: f"token_stats: h [N, d={h.shape[1]}] and weight [V-1, d={weight.shape[1]}] disagree on d")
    require(weight.shape[0] >= 1 and h.shape[1] >= 1, lambda: f"token_stats: weight needs a class and d >= 1, "
            f"got {tuple(weight.shape)}")
    require(tuple(bias.shape) == (weight.shape[0],),
            lambda: f"token_stats: bias must be [V-1={weight.shape[0]}], got {tuple(bias.shape)}")
    require(h.dtype in SUPPORTED_DTYPES and weight.dtype == h.dtype and bias.dtype == h.dtype,
            lambda: f"token_stats: h, weight, bias must share one of {SUPPORTED_DTYPES}, got {h.dtype}, "
            f"{weight.dtype}, {bias.dtype}; cast explicitly")
    require(h.device == weight.device == bias.device, "token_stats: h, weight, bias on different devices")
    require(h.stride(1) == 1 and weight.stride(1) == 1 and bias.stride(0) == 1,
            "token_stats: h and weight need unit stride along d, bias unit stride")
    if noise_ids is not None:
        require(noise_ids.dtype == torch.int64 and tuple(noise_ids.shape) == (h.shape[0],) and noise_ids.is_contiguous(),
                lambda: f"token_stats: noise_ids must be a contiguous int64 [N={h.shape[0]}], got {noise_ids.dtype} "
                f"{tuple(noise_ids.shape)}")
        require(noise_ids.device == h.device, lambda: f"token_stats: noise_ids on {noise_ids.device}, h on {h.device}")
    if config is not None:
        require(all(v >= 16 and v & (v - 1) == 0 for v in (config.block_n, config.block_v, config.block_d)),
                lambda: f"token_stats: config tiles must be powers of two >= 16 (tl.dot), got {config}")
        require(config.splits >= 1, lambda: f"token_stats: config.splits must be >= 1, got {config.splits}")


def token_stats(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, key: int = 0, fp64: bool = False,
                noise_ids: Optional[torch.Tensor] = None, strategy: str = "direct",
                config: Optional[HeadConfig] = None) -> TokenStats:
    """Draw a token per row from softmax(h W^T + b) and return it with its log-probability and the entropy.

    h: [N, d] final-normed rows; weight: [V-1, d] and bias: [V-1] the real-token classes (the MASK
    row left out, e.g. ``W[:-1]``, a view), all one dtype; key: the Philox noise key; noise_ids: [N]
    int64, row i's noise keyed by (key, noise_ids[i]) alone, else by its row offset (both the
    sampling head's: the same key and ids draw the same token as ``head_sample_update``); fp64: draw
    and add the Gumbel noise in fp64; strategy: ``"direct"`` (the others need two passes: refused);
    config: a launch configuration (tests), else the card's. Returns ``TokenStats(tokens [N] int64,
    log_prob [N] fp32, entropy [N] fp32)``; no [N, V-1] tensor is made. Example::

        tok, logp, ent = token_stats(hn, W[:-1], b[:-1], key=noise_key(seed, stream), noise_ids=ids)
    """
    _check_inputs(h, weight, bias, strategy, config, noise_ids)
    N, D = h.shape
    n_vocab = weight.shape[0]
    if not triton_runs_on(h):
        return token_stats_ref(h, weight, bias, key, fp64, noise_ids=noise_ids)
    tokens = _new((N,), torch.int64, h.device)
    log_prob = _new((N,), torch.float32, h.device)
    entropy = _new((N,), torch.float32, h.device)
    if N == 0:
        return TokenStats(tokens, log_prob, entropy)
    cfg = config or _config(N, D, n_vocab, fp64, h.dtype, h.device)
    splits = min(cfg.splits, triton.cdiv(n_vocab, cfg.block_v))
    tiles_per_split = triton.cdiv(triton.cdiv(n_vocab, cfg.block_v), splits)
    stats = [_new((N, splits), torch.float32, h.device) for _ in range(3)]  # m, s, u
    vals = _new((N, splits), torch.float64 if fp64 else torch.float32, h.device)
    idx = _new((N, splits), torch.int32, h.device)
    lbest = _new((N, splits), torch.float32, h.device)
    # keyed rows: one launch (no int32 offsets); row offsets: launches of < 2^31 offsets, derived keys
    launches = row_chunks(N, n_vocab, key) if noise_ids is None else [(0, N, int(key) & 0x7FFFFFFFFFFFFFFF)]
    for r0, r1, launch_key in launches:
        m, s, u = (t[r0:r1] for t in stats)
        ids = noise_ids[r0:r1] if noise_ids is not None else tokens  # tokens: an unused placeholder pointer
        _stats_partial_kernel[(triton.cdiv(r1 - r0, cfg.block_n), splits)](
            h[r0:r1], weight, bias, ids, m, s, u, vals[r0:r1], idx[r0:r1], lbest[r0:r1],
            launch_key, r1 - r0, D, n_vocab, tiles_per_split,
            h.stride(0), weight.stride(0), vals.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, KEYED=noise_ids is not None,
            FP64=fp64, EVEN_D=D % cfg.block_d == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    fb, fs = finalize_blocks(N, splits)
    _stats_finalize_kernel[(triton.cdiv(N, fb),)](
        *stats, vals, idx, lbest, tokens, log_prob, entropy,
        N, splits, vals.stride(0), BLOCK_N=fb, BLOCK_S=fs,
    )
    return TokenStats(tokens, log_prob, entropy)


# ----------------------------------------------------------------------------
# PyTorch references (the oracle of the tests; the CPU fallback; the head's top_k / top_p path)
# ----------------------------------------------------------------------------
def logits_token_stats_ref(logits: torch.Tensor, noise: torch.Tensor, fp64: bool = False) -> TokenStats:
    """From given logits [N, C] (-inf = filtered out) and Gumbel noise [N, C]: the token
    argmax(logits + noise) (added in fp32, fp64 if ``fp64``; first index on ties), its log-probability
    and the entropy of softmax(logits), both computed in fp64 and returned as fp32."""
    dtype = torch.float64 if fp64 else torch.float32
    tokens = (logits.to(dtype) + noise.to(dtype)).argmax(dim=-1)
    logp = logits.double().log_softmax(dim=-1)
    plogp = torch.where(logp > float("-inf"), logp.exp() * logp, 0.0)  # 0 log 0 = 0 for filtered tokens
    log_prob = logp.gather(-1, tokens[:, None]).squeeze(-1)
    return TokenStats(tokens, log_prob.float(), (-plogp.sum(dim=-1)).float())


def token_stats_ref(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, key: int = 0, fp64: bool = False,
                    noise: Optional[torch.Tensor] = None, noise_ids: Optional[torch.Tensor] = None) -> TokenStats:
    """The unfused op: fp32 logits h @ W^T + b [N, V-1], the kernel's noise for ``key`` (and
    ``noise_ids``) materialised (``gumbel_noise``; or ``noise`` [N, V-1] given), then
    ``logits_token_stats_ref``."""
    logits = h.float() @ weight.float().t() + bias.float()
    if noise is None:
        noise = gumbel_noise(h.shape[0], weight.shape[0], key, h.device, fp64, noise_ids=noise_ids)
    return logits_token_stats_ref(logits, noise, fp64)
