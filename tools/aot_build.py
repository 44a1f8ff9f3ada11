"""Compile every Triton kernel of radd_fast/kernels ahead of time for several GPUs, without a GPU.

    python tools/aot_build.py --targets 80,89,90 --out benchmarks/results/triton_aot_sm80-sm89-sm90_DATE.md

For each card (compute capability 8.0 = A100, 8.9 = L4 / L40S / RTX 4090, 9.0 = H100 / H200)
it asks the launchers' own configuration functions (``fwd_config_for``, ``tile_config_for``,
``head_config_for``, ...) what they would launch at RADD-small and RADD-medium sizes, binds
the same arguments the launcher passes (so Triton specializes exactly as at run time: 16-byte
divisibility of pointers and integers, integers equal to 1), compiles with
``triton.compile(ASTSource(...), target=GPUTarget('cuda', cc, 32))`` and reads the kernel's
shared memory from Triton's metadata and registers / spill stores from the bundled
``ptxas -v``. Writes a Markdown table and, beside it, the same rows as JSON (read by
tests/kernels/test_card_configs.py). It proves compilation and resource fit only: nothing
runs, so it says nothing about numerics or speed. The families built are the ``aot_family`` names
of the table of kernels (radd_fast/kernels/registry.py), each with its spec builder in ``SPEC_BUILDERS``.

bf16 is built at every shape; fp16 and fp32, which run the same code with another element type,
at a subset (see ``_attention_models`` and the loops below). Specializations that compile identically (RADD-small and -medium often do: every stride is a
multiple of 16 in both) are compiled once and listed with all the shapes they serve.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the run-time default; silences 3.9's warning
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from radd_fast.errors import UserError, run_cli  # noqa: E402
from radd_fast.kernels import flash_attention as fa  # noqa: E402
from radd_fast.kernels import layer_norm as ln  # noqa: E402
from radd_fast.kernels import linear_log_softmax as lls  # noqa: E402
from radd_fast.kernels import rotary as rot  # noqa: E402
from radd_fast.kernels import sampling_update as su  # noqa: E402
from radd_fast.kernels import token_stats as ts  # noqa: E402
from radd_fast.kernels.registry import KERNELS  # noqa: E402
from radd_fast.kernels.utils import CARD_CAPABILITIES, next_power_of_2, smem_limit_of  # noqa: E402

# RADD-small and RADD-medium (d_model, heads), and the shapes the issue asks for.
MODEL_WIDTHS = {"small": 768, "medium": 1024}
SEQ_LEN = 1024
VOCAB = 50258  # GPT-2's 50257 tokens + MASK; the heads take the first V - 1 classes
HEAD_DIMS = (32, 64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSS_ROWS = 4133  # masked rows of a training batch: deliberately not a multiple of 16
SAMPLER_ROWS = (1, 16, 128)  # positions revealed per evaluation
DECODER_ROWS = (1, 128, 16384)  # masked positions an adaptive decoder's evaluation scores (16 x 1024 at most)
# SMs of a representative card per target (the sampling head splits the vocabulary by it)
SM_COUNT = {80: 108, 89: 58, 90: 132}
CARD_NAMES = {80: "A100", 89: "L4 / L40S / RTX 4090", 90: "H100 / H200"}


@dataclass
class Spec:
    """One launch: the kernel, its bound arguments and options, and how to label it."""
    kernel: object
    label: str
    args: tuple
    kwargs: dict
    shapes: list = field(default_factory=list)
    estimate: Optional[int] = None  # the launcher's shared-memory estimate, where it has one
    config: Optional[dict] = None  # the launcher's configuration, as chosen for this card
    choice: Optional[dict] = None  # the arguments its configuration function was called with


def _ptr(dtype: torch.dtype) -> torch.Tensor:
    """A stand-in pointer argument: only its dtype and 16-byte alignment reach the compiler."""
    return torch.empty(64, dtype=dtype)


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ----------------------------------------------------------------------------- attention
def attention_specs(cc: int) -> list[Spec]:
    cap, limit = CARD_CAPABILITIES[cc], smem_limit_of(CARD_CAPABILITIES[cc])
    specs = []
    for dname, dtype in DTYPES.items():
        for hd in HEAD_DIMS:
            for rotary in (False, True):
                for model, d in _attention_models(dtype, hd):
                    specs += _attention_launches(cap, limit, dtype, hd, rotary, d // hd, f"{model} d{d} h{d // hd}")
    return specs


def _attention_models(dtype: torch.dtype, hd: int):
    """Which model widths to build at: bf16 (what the models train and sample in) at every head dim,
    both models at their head dim 64 and RADD-small's width for 32 and 128 (another head count);
    fp16 (the same code with another element type) and fp32 (a correctness path: IEEE dots, which
    "auto" never picks) at RADD-small's hd 64, and fp16 also at hd 128, the one that shrinks its tiles."""
    if dtype == torch.bfloat16:
        return list(MODEL_WIDTHS.items()) if hd == 64 else [("small", MODEL_WIDTHS["small"])]
    if hd == 64 or (hd == 128 and dtype == torch.float16):
        return [("small", MODEL_WIDTHS["small"])]
    return []


def _attention_launches(cap, limit, dtype, hd, rotary, h, shape) -> list[Spec]:
    T = SEQ_LEN
    qkv, out, f32 = _ptr(dtype), _ptr(dtype), _ptr(torch.float32)
    qs = (T * 3 * h * hd, 3 * h * hd, h * hd, hd)  # strides of a contiguous [B, T, 3, h, hd]
    os_ = (T * h * hd, h * hd, hd)  # of a contiguous [B, T, h, hd]
    cs = hd // 2 if rotary else 0
    flags = dict(HEAD_DIM=hd, HALF=hd // 2, BLOCK_HALF=max(16, next_power_of_2(hd // 2)),
                 BLOCK_D=max(16, next_power_of_2(hd)), ROTARY=rotary,
                 PRECISION="ieee" if dtype == torch.float32 else "tf32")
    tag = f"{_name(dtype)} hd{hd} rot={int(rotary)}"
    fwd = fa.fwd_config_for(cap, limit, dtype, hd, rotary)
    bwd = fa.bwd_config_for(cap, limit, dtype, hd, rotary)
    scale = 1.0 / hd ** 0.5
    choice = dict(dtype=_name(dtype), head_dim=hd, rotary=rotary)

    def even(a, b):
        return T % max(a, b) == 0

    specs = [Spec(fa._attn_fwd_kernel, f"{tag} {fwd.block_m}x{fwd.block_n} w{fwd.num_warps} s{fwd.num_stages}",
                  (qkv, f32, f32, out, f32, T, h, scale, *qs, cs, *os_),
                  dict(BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, EVEN=even(fwd.block_m, fwd.block_n),
                       num_warps=fwd.num_warps, num_stages=fwd.num_stages, **flags),
                  [shape], fa.fwd_smem_bytes(fwd, cap, dtype, hd, rotary), asdict(fwd), choice)]
    if not rotary:  # the delta kernel takes no rotary
        specs.append(Spec(fa._attn_bwd_delta_kernel, f"{_name(dtype)} hd{hd} BLOCK_M=128",
                          (out, out, f32, T, h, *os_, *os_),
                          dict(HEAD_DIM=hd, BLOCK_D=flags["BLOCK_D"], BLOCK_M=128), [shape]))
    bwd_args = (qkv, f32, f32, out, f32, f32, qkv, T, h, scale * 1.4426950408889634, scale, *qs, cs, *os_, *qs)
    specs.append(Spec(fa._attn_bwd_dkdv_kernel,
                      f"{tag} {bwd.block_m1}x{bwd.block_n1} w{bwd.num_warps1} s{bwd.num_stages1}", bwd_args,
                      dict(BLOCK_M=bwd.block_m1, BLOCK_N=bwd.block_n1, EVEN=even(bwd.block_m1, bwd.block_n1),
                           num_warps=bwd.num_warps1, num_stages=bwd.num_stages1, **flags),
                      [shape], fa.dkdv_smem_bytes(bwd, cap, dtype, hd, rotary), asdict(bwd), choice))
    specs.append(Spec(fa._attn_bwd_dq_kernel,
                      f"{tag} {bwd.block_m2}x{bwd.block_n2} w{bwd.num_warps2} s{bwd.num_stages2}", bwd_args,
                      dict(BLOCK_M=bwd.block_m2, BLOCK_N=bwd.block_n2, EVEN=even(bwd.block_m2, bwd.block_n2),
                           num_warps=bwd.num_warps2, num_stages=bwd.num_stages2, **flags),
                      [shape], fa.dq_smem_bytes(bwd, cap, dtype, hd, rotary), asdict(bwd), choice))
    return specs


# ----------------------------------------------------------------------------- loss head
def loss_head_specs(cc: int) -> list[Spec]:
    cap, limit = CARD_CAPABILITIES[cc], smem_limit_of(CARD_CAPABILITIES[cc])
    N, C = LOSS_ROWS, VOCAB - 1
    specs = []
    for dname, dtype in DTYPES.items():
        x, f32, i64 = _ptr(dtype), _ptr(torch.float32), _ptr(torch.int64)
        for model, d in MODEL_WIDTHS.items():
            shape = f"{model} d{d} N={N} C={C}"
            fwd = lls.tile_config_for(cap, limit, dtype)
            bwd = lls.tile_config_for(cap, limit, dtype, backward=True)
            tiles_n = -(-C // fwd.block_n)
            cols = lls.vocab_chunk_cols(N, C, dtype.itemsize, lls.DEFAULT_CHUNK_BYTES, bwd.block_n)
            for bias in (True, False):
                specs.append(Spec(
                    lls._lse_partial_kernel, f"{dname} bias={int(bias)} {_tile_label(fwd)}",
                    (x, x, x, i64, f32, f32, N, C, d, d, d, tiles_n),
                    dict(HAS_BIAS=bias, EVEN_K=d % fwd.block_k == 0, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n,
                         BLOCK_K=fwd.block_k, GROUP_M=fwd.group_m, DOT_PRECISION=lls._dot_precision(dtype),
                         num_warps=fwd.num_warps, num_stages=fwd.num_stages),
                    [shape], lls.tile_smem_bytes(fwd, cap, dtype), asdict(fwd), dict(dtype=dname, backward=False)))
                for glse in (False, True):
                    specs.append(Spec(
                        lls._dlogits_kernel, f"{dname} bias={int(bias)} GLSE={int(glse)} {_tile_label(bwd)}",
                        (x, x, x, i64, f32, f32, f32, x, f32, N, C, d, 0, cols, d, d, cols, C),
                        dict(HAS_BIAS=bias, HAS_GLSE=glse, EVEN_K=d % bwd.block_k == 0, BLOCK_M=bwd.block_m,
                             BLOCK_N=bwd.block_n, BLOCK_K=bwd.block_k, GROUP_M=bwd.group_m,
                             DOT_PRECISION=lls._dot_precision(dtype), num_warps=bwd.num_warps,
                             num_stages=bwd.num_stages),
                        [f"{shape} cols={cols}"], lls.tile_smem_bytes(bwd, cap, dtype), asdict(bwd),
                        dict(dtype=dname, backward=True)))
    return specs


def _tile_label(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} g{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}"


# ----------------------------------------------------------------------------- sampling head
def sampling_specs(cc: int) -> list[Spec]:
    cap, limit = CARD_CAPABILITIES[cc], smem_limit_of(CARD_CAPABILITIES[cc])
    n_vocab = VOCAB - 1
    f32, f64, i32, i64 = (_ptr(t) for t in (torch.float32, torch.float64, torch.int32, torch.int64))
    specs = []
    for dname, dtype in DTYPES.items():
        h = _ptr(dtype)
        for model, d in MODEL_WIDTHS.items():
            # bf16 at every row count; the other dtypes (the same code) at the largest
            for n in SAMPLER_ROWS if dtype == torch.bfloat16 else (max(SAMPLER_ROWS),):
                for fp64 in (False, True):
                    cfg = su.head_config_for(cap, limit, dtype, n, d, n_vocab, fp64, SM_COUNT[cc])
                    tiles_per_split = -(-(-(-n_vocab // cfg.block_v)) // cfg.splits)
                    vals = f64 if fp64 else f32
                    # noise: "keyed" (the sampler's: noise_ids), "offset" (row offsets), "given" (tests)
                    for noise in ("keyed", "offset", "given") if n == max(SAMPLER_ROWS) else ("keyed",):
                        nz = (f64 if fp64 else f32) if noise == "given" else vals
                        specs.append(Spec(
                            su._head_argmax_kernel,
                            f"{dname} N={n} FP64={int(fp64)} NOISE={noise} {cfg.block_n}x{cfg.block_v}x"
                            f"{cfg.block_d} splits={cfg.splits} w{cfg.num_warps} s{cfg.num_stages}",
                            (h, h, h, nz, i64 if noise == "keyed" else i32, vals, i32, 12345, n, d, n_vocab,
                             tiles_per_split, d, d, n_vocab if noise == "given" else cfg.splits, cfg.splits),
                            dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                                 NOISE_GIVEN=noise == "given", KEYED=noise == "keyed", FP64=fp64,
                                 EVEN_D=d % cfg.block_d == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                            [f"{model} d{d}"], su.head_smem_bytes(cfg, cap, dtype), asdict(cfg),
                            dict(dtype=dname, n_rows=n, d=d, n_vocab=n_vocab, fp64=fp64, sm_count=SM_COUNT[cc])))
                    fb, fs = su.finalize_blocks(n, cfg.splits)
                    for has_dst in (True, False):
                        specs.append(Spec(
                            su._finalize_kernel,
                            f"N={n} FP64={int(fp64)} SPLITS={cfg.splits} BLOCK_N={fb} BLOCK_S={fs} HAS_DST={int(has_dst)}",
                            (vals, i32, i64, i64, i64, n, cfg.splits, cfg.splits),
                            dict(BLOCK_N=fb, BLOCK_S=fs, HAS_DST=has_dst), [f"{dname} {model} d{d}"]))
    for fp64 in (False, True):  # the materialised noise (references, tests)
        for keyed in (False, True):
            for n in SAMPLER_ROWS:
                out = f64 if fp64 else f32
                specs.append(Spec(su._gumbel_noise_kernel, f"N={n} FP64={int(fp64)} KEYED={int(keyed)} 16x1024",
                                  (out, i64 if keyed else out, 12345, n, n_vocab, n_vocab),
                                  dict(BLOCK_N=16, BLOCK_V=1024, FP64=fp64, KEYED=keyed), [f"V-1={n_vocab}"]))
    for fp64 in (False, True):  # the top-k / top-p path from given logits
        for noise in ("keyed", "offset", "given"):
            for has_dst in (True, False):
                for n in (min(SAMPLER_ROWS), max(SAMPLER_ROWS)):
                    nz = (f64 if fp64 else f32) if noise == "given" else f32
                    specs.append(Spec(
                        su._logits_argmax_kernel,
                        f"N={n} FP64={int(fp64)} NOISE={noise} HAS_DST={int(has_dst)} 16x256 w4",
                        (f32, nz, i64, i64, i64, i64, 12345, n, n_vocab, n_vocab, n_vocab),
                        dict(BLOCK_N=16, BLOCK_V=256, NOISE_GIVEN=noise == "given", KEYED=noise == "keyed",
                             FP64=fp64, HAS_DST=has_dst, num_warps=4),
                        [f"V-1={n_vocab}"]))
    return specs


# ----------------------------------------------------------------------------- token statistics
def token_stats_specs(cc: int) -> list[Spec]:
    cap, limit = CARD_CAPABILITIES[cc], smem_limit_of(CARD_CAPABILITIES[cc])
    n_vocab = VOCAB - 1
    f32, f64, i32, i64 = (_ptr(t) for t in (torch.float32, torch.float64, torch.int32, torch.int64))
    specs = []
    for dname, dtype in DTYPES.items():
        h = _ptr(dtype)
        for model, d in MODEL_WIDTHS.items():
            # bf16 at every row count; the other dtypes (the same code) at the largest
            for n in DECODER_ROWS if dtype == torch.bfloat16 else (max(DECODER_ROWS),):
                for fp64 in (False, True):
                    cfg = ts.token_stats_config_for(cap, limit, dtype, n, d, n_vocab, fp64, SM_COUNT[cc])
                    tiles_per_split = -(-(-(-n_vocab // cfg.block_v)) // cfg.splits)
                    for keyed in (True, False):  # noise keyed by row ids (the decoders'), or by row offsets
                        specs.append(Spec(
                            ts._stats_partial_kernel,
                            f"{dname} N={n} FP64={int(fp64)} KEYED={int(keyed)} {cfg.block_n}x{cfg.block_v}x"
                            f"{cfg.block_d} splits={cfg.splits} w{cfg.num_warps} s{cfg.num_stages}",
                            (h, h, h, i64, f32, f32, f32, f64 if fp64 else f32, i32, f32, 12345, n, d, n_vocab,
                             tiles_per_split, d, d, cfg.splits),
                            dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, KEYED=keyed,
                                 FP64=fp64, EVEN_D=d % cfg.block_d == 0, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages),
                            [f"{model} d{d}"], su.head_smem_bytes(cfg, cap, dtype), asdict(cfg),
                            dict(dtype=dname, n_rows=n, d=d, n_vocab=n_vocab, fp64=fp64, sm_count=SM_COUNT[cc])))
                    fb, fs = ts.finalize_blocks(n, cfg.splits)
                    specs.append(Spec(
                        ts._stats_finalize_kernel,
                        f"N={n} FP64={int(fp64)} SPLITS={cfg.splits} BLOCK_N={fb} BLOCK_S={fs}",
                        (f32, f32, f32, f64 if fp64 else f32, i32, f32, i64, f32, f32, n, cfg.splits, cfg.splits),
                        dict(BLOCK_N=fb, BLOCK_S=fs), [f"{dname} {model} d{d}"]))
    return specs


# ----------------------------------------------------------------------------- layer norm, rotary
def layer_norm_specs(cc: int) -> list[Spec]:
    N = 64 * SEQ_LEN  # rows of a batch of 64 sequences
    f32, i64 = _ptr(torch.float32), _ptr(torch.int64)
    specs = []
    # (residual stream dtype, normed output dtype, weight dtype): mixed precision and pure 16-bit
    combos = [(torch.float32, torch.bfloat16, torch.float32), (torch.float32, torch.float16, torch.float32),
              (torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
              (torch.float16, torch.float16, torch.float16)]
    for x_dt, y_dt, w_dt in combos:
        x, y, w = _ptr(x_dt), _ptr(y_dt), _ptr(w_dt)
        for model, d in MODEL_WIDTHS.items():
            block = next_power_of_2(d)
            rows, warps = ln._fwd_config(block)
            brows, bwarps, _ = ln._bwd_config(block, torch.device("cuda"))
            for has_delta, dropout in ((False, False), (True, False), (True, True)):
                delta = y if has_delta else x  # the delta is the sublayer's output, in the compute dtype
                specs.append(Spec(
                    ln._layer_norm_fwd_kernel,
                    f"x={_name(x_dt)} y={_name(y_dt)} w={_name(w_dt)} DELTA={int(has_delta)} DROPOUT={int(dropout)} "
                    f"ROWS={rows} BLOCK={block} w{warps}",
                    (x, delta, w, w, y, x if has_delta else y, f32, f32, i64 if dropout else f32,
                     N, d, 1e-5, 0.1, 1 / 0.9, d, d if has_delta else 0, d, d if has_delta else 0),
                    dict(HAS_DELTA=has_delta, DROPOUT=dropout, ROWS=rows, BLOCK=block, num_warps=warps),
                    [f"{model} d{d}"]))
                specs.append(Spec(
                    ln._layer_norm_bwd_kernel,
                    f"x={_name(x_dt)} dy={_name(y_dt)} DXIN={int(has_delta)} DELTA={int(has_delta)} "
                    f"DROPOUT={int(dropout)} ROWS={brows} BLOCK={block} w{bwarps}",
                    (x, w, y, x if has_delta else y, f32, f32, x, y if has_delta else x, i64 if dropout else f32,
                     f32, f32, N, d, 64, 0.1, 1 / 0.9, d, d, d if has_delta else 0, d, d if has_delta else 0),
                    dict(HAS_DXIN=has_delta, HAS_DELTA=has_delta, DROPOUT=dropout, ROWS=brows, BLOCK=block,
                         num_warps=bwarps),
                    [f"{model} d{d}"]))
    return specs


def rotary_specs(cc: int) -> list[Spec]:
    T, B = SEQ_LEN, 64
    f32 = _ptr(torch.float32)
    specs = []
    for dname, dtype in DTYPES.items():
        x = _ptr(dtype)
        for hd in HEAD_DIMS if dtype == torch.bfloat16 else (64,):  # other dtypes: the same code
            for model, d in MODEL_WIDTHS.items():
                h = d // hd
                block_h, block_half = next_power_of_2(h), next_power_of_2(hd // 2)
                tok, warps = rot._config(block_h * block_half)
                qs = (T * 3 * h * hd, 3 * h * hd, h * hd, hd)
                for conj, copy_v in ((False, True), (False, False), (True, True)) if hd == 64 else ((False, True),):
                    specs.append(Spec(
                        rot._rotary_qkv_kernel,
                        f"{dname} hd{hd} CONJ={int(conj)} COPY_V={int(copy_v)} TOK={tok} {block_h}x{block_half} w{warps}",
                        (x, x, f32, f32, B * T, T, h, hd // 2, *qs, *qs, hd // 2, hd // 2),
                        dict(CONJ=conj, COPY_V=copy_v, TOK=tok, BLOCK_H=block_h, BLOCK_HALF=block_half,
                             num_warps=warps),
                        [f"{model} d{d} h{h}"]))
    return specs


# The spec builder of each family a kernel of the table (radd_fast/kernels/registry.py) names.
SPEC_BUILDERS: dict[str, Callable[[int], list[Spec]]] = {
    "attention": attention_specs, "loss_head": loss_head_specs, "sampling": sampling_specs,
    "layer_norm": layer_norm_specs, "rotary": rotary_specs, "token_stats": token_stats_specs,
}


def families_of(kernels, builders: dict) -> dict[str, Callable[[int], list[Spec]]]:
    """The families to build, keyed by the table's family names in the table's order. A family the table
    names without a builder here, or a builder no kernel of the table claims, is an error naming it."""
    missing = [k for k in kernels.values() if k.aot_family and k.aot_family not in builders]
    if missing:
        raise RuntimeError("; ".join(
            f"kernel {k.name!r} (radd_fast/kernels/registry.py) names the ahead-of-time family "
            f"{k.aot_family!r}, which tools/aot_build.py has no spec builder for (add one to SPEC_BUILDERS)"
            for k in missing))
    claimed = {k.aot_family for k in kernels.values()}
    unclaimed = [f for f in builders if f not in claimed]
    if unclaimed:
        raise RuntimeError(f"tools/aot_build.py builds the families {unclaimed}, which no kernel of "
                           "radd_fast/kernels/registry.py names as its aot_family")
    return {k.aot_family: builders[k.aot_family] for k in kernels.values() if k.aot_family}


FAMILIES = families_of(KERNELS, SPEC_BUILDERS)


# ----------------------------------------------------------------------------- compile and measure
def _bind(kernel, cc: int, args: tuple, kwargs: dict):
    """The (signature, constexprs, attrs, options) a launch with these arguments compiles with on ``cc``."""
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _ptxas_resources(ptx: str, cc: int) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from the bundled ``ptxas -v`` Triton itself uses for ``cc``."""
    # imported here: a private helper of the NVIDIA backend, needed by this tool only
    from triton.backends.nvidia.compiler import get_ptxas
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    report = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", report)
    if regs is None:
        raise RuntimeError(f"ptxas -v: {report.strip()[-300:]}")
    spills = re.search(r"(\d+) bytes spill stores", report)
    return int(regs.group(1)), int(spills.group(1)) if spills else 0


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack-frame bytes) read back from the compiled cubin by the bundled
    ``cuobjdump``: milliseconds where ``ptxas -v`` takes seconds. The stack frame holds the spills
    (and any local arrays): 0 means no spills, but its size is not ptxas's spill-store count."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        run = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", run.stdout)
    if usage is None:
        raise RuntimeError(f"cuobjdump: {(run.stdout + run.stderr).strip()[-300:]}")
    return int(usage.group(1)), int(usage.group(2))


# how compile_one reads registers: "ptxas" (spill-store bytes, slow) or "cubin" (stack bytes, fast)
RESOURCES_FROM = "ptxas"


def spec_key(spec: Spec, cc: int) -> str:
    """What makes two launches the same compilation (their shape labels aside)."""
    signature, constexprs, attrs, options = _bind(spec.kernel, cc, spec.args, spec.kwargs)
    return repr((spec.kernel.fn.__name__, sorted(signature.items()), sorted(constexprs.items(), key=str),
                 sorted(attrs.items(), key=str), sorted(vars(options).items(), key=str)))


def compile_one(spec: Spec, cc: int) -> dict:
    """Compile ``spec`` for ``cc``; its row: status, registers, spill bytes, shared memory, the card's limit."""
    limit = smem_limit_of(CARD_CAPABILITIES[cc])
    row = dict(kernel=spec.kernel.fn.__name__, spec=spec.label, shapes=spec.shapes, card=f"sm_{cc}",
               smem_limit=limit, estimate=spec.estimate, config=spec.config, choice=spec.choice)
    try:
        signature, constexprs, attrs, options = _bind(spec.kernel, cc, spec.args, spec.kwargs)
        compiled = triton.compile(ASTSource(spec.kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", cc, 32), options=vars(options))
        if RESOURCES_FROM == "ptxas":
            regs, spills = _ptxas_resources(compiled.asm["ptx"], cc)
            row.update(regs=regs, spill_bytes=spills)
        else:
            regs, stack = _cubin_resources(compiled.asm["cubin"])
            row.update(regs=regs, spill_bytes=None, stack_bytes=stack)
        smem = int(compiled.metadata.shared)
        row.update(status="OK", smem=smem, fits=smem <= limit, wgmma="wgmma" in compiled.asm["ptx"])
    except Exception as e:  # a failed build is a result to report, not a crash
        row.update(status=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}", fits=False)
    return row


# Each worker rebuilds the spec list and compiles one entry of it: Specs hold kernels, which do not pickle.
def _work(item: tuple[str, int, int]) -> dict:
    family, cc, index = item
    return compile_one(_unique_specs(family, cc)[index], cc)


_UNIQUE: dict = {}


def _unique_specs(family: str, cc: int) -> list[Spec]:
    """The family's launches for ``cc``, identical compilations merged (their shapes listed together)."""
    if (family, cc) not in _UNIQUE:
        merged: dict[str, Spec] = {}
        for spec in FAMILIES[family](cc):
            key = spec_key(spec, cc)
            if key in merged:
                merged[key].shapes += [s for s in spec.shapes if s not in merged[key].shapes]
            else:
                merged[key] = spec
        _UNIQUE[(family, cc)] = list(merged.values())
    return _UNIQUE[(family, cc)]


def build(targets: list[int], families: list[str], jobs: int, log: Callable[[str], None]) -> list[dict]:
    items = [(f, cc, i) for f in families for cc in targets for i in range(len(_unique_specs(f, cc)))]
    log(f"{len(items)} compilations ({', '.join(families)}) for {', '.join(f'sm_{c}' for c in targets)}")
    rows = []
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        for n, row in enumerate(pool.map(_work, items, chunksize=1), 1):
            rows.append(row)
            if n % 20 == 0 or n == len(items):
                log(f"  {n}/{len(items)}")
    return rows


# ----------------------------------------------------------------------------- report
def _resources(row: dict) -> list[str]:
    """The row's cells: status, registers / spill stores, shared memory, the estimate, fit."""
    if row["status"] != "OK":
        return [f"**{row['status']}**", "", "", "", ""]
    mma = " wgmma" if row.get("wgmma") else ""
    estimate = "" if row["estimate"] is None else str(row["estimate"])
    spill = row["spill_bytes"] if row.get("spill_bytes") is not None else f"stack {row['stack_bytes']}"
    return ["OK", f"{row['regs']}/{spill}{mma}", str(row["smem"]), estimate,
            "yes" if row["fits"] else "**NO**"]


def render(rows: list[dict], targets: list[int], versions: str, date: str) -> str:
    bad = [r for r in rows if r["status"] != "OK" or not r["fits"]]
    lines = [
        f"# Ahead-of-time build of every Triton kernel for {', '.join(f'sm_{c}' for c in targets)}, "
        f"triton {versions} ({date})",
        "",
        "Made on a machine without a GPU by `python tools/aot_build.py --targets "
        f"{','.join(map(str, targets))} --out <this file>`: each launch configuration the launchers pick "
        "for the card (their `*_config_for` functions) at RADD-small and RADD-medium sizes "
        f"(d 768/1024, T {SEQ_LEN}, V {VOCAB}, head dims 32/64/128; bf16 at every shape, fp16 and fp32 at "
        "RADD-small's head dim 64, fp16 attention also at hd 128, and the fp16/fp32 sampling head at 128 rows), "
        "compiled with `triton.compile(ASTSource(...), target=GPUTarget('cuda', cc, 32))` under the launcher's "
        "own argument specialization. Columns: registers per thread / spill-store bytes (the `ptxas -v` "
        "bundled with triton) or, written `stack N`, the stack frame in bytes read from the cubin "
        "(`--resources-from cubin`: 0 means no spills; `wgmma` where the kernel uses Hopper's "
        "tensor-core pipeline), shared memory "
        "in bytes (Triton's allocation, which a launch checks against the card's limit), the launcher's "
        "estimate of it (docs/KERNELS.md), and whether it fits. The same rows, as JSON, are beside this file.",
        "",
        "**This proves compilation and resource fit only: it says nothing about numerics or speed** "
        "(nothing runs).",
        "",
        f"Result: {len(rows)} compilations, "
        + (f"**{len(bad)} failed or over the limit**." if bad else "all OK and within each card's shared memory."),
    ]
    for cc in targets:
        limit = smem_limit_of(CARD_CAPABILITIES[cc])
        card_rows = [r for r in rows if r["card"] == f"sm_{cc}"]
        lines += ["", f"## sm_{cc} ({CARD_NAMES[cc]}): {limit} B of shared memory per block", "",
                  "| kernel | specialization | shapes | build | regs/spill B | smem B | estimate B | fits |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in card_rows:
            lines.append(f"| {r['kernel']} | {r['spec']} | {'; '.join(r['shapes'])} | "
                         + " | ".join(_resources(r)) + " |")
    return "\n".join(lines) + "\n"


def _narrow_shapes(head_dims: str, dtypes: str) -> None:
    """Build only these head dims and dtypes (a quick check of a few kernels, e.g. under another triton)."""
    global HEAD_DIMS, DTYPES
    try:
        dims = tuple(int(h) for h in head_dims.split(","))
    except ValueError:
        raise UserError(f"--head-dims: expected numbers like 32,64,128, got {head_dims!r}")
    if any(h not in HEAD_DIMS for h in dims) or any(t not in DTYPES for t in dtypes.split(",")):
        raise UserError(f"--head-dims / --dtypes: choose from {HEAD_DIMS} / {','.join(DTYPES)}")
    HEAD_DIMS = dims
    DTYPES = {k: v for k, v in DTYPES.items() if k in dtypes.split(",")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="80,89,90", help="compute capabilities, e.g. 80,89,90")
    p.add_argument("--out", required=True, help="the Markdown table to write (the JSON goes beside it)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    p.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="attention / rotary head dims")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"subset of {','.join(DTYPES)}")
    p.add_argument("--from-json", help="re-render the table from a JSON this tool wrote, compiling nothing")
    p.add_argument("--resources-from", choices=("ptxas", "cubin"), default="ptxas",
                   help="registers and spill stores from ptxas -v (default), or registers and the stack "
                        "frame from the cubin (cuobjdump: much faster)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="parallel compilations")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        targets = [int(t) for t in args.targets.split(",")]
    except ValueError:
        raise UserError(f"--targets: expected numbers like 80,89,90, got {args.targets!r}")
    unknown = [t for t in targets if t not in CARD_CAPABILITIES]
    if unknown:
        raise UserError(f"--targets: no card table entry for {unknown} (known: {sorted(CARD_CAPABILITIES)})")
    families = args.families.split(",")
    if any(f not in FAMILIES for f in families):
        raise UserError(f"--families: choose from {','.join(FAMILIES)}, got {args.families!r}")
    _narrow_shapes(args.head_dims, args.dtypes)
    global RESOURCES_FROM
    RESOURCES_FROM = args.resources_from
    if args.from_json:
        if not os.path.isfile(args.from_json):
            raise UserError(f"--from-json: no such file {args.from_json!r}")
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, targets, date, versions = saved["rows"], saved["targets"], saved["date"], saved["triton"]
    else:
        rows = build(targets, families, args.jobs, lambda s: print(s, flush=True))
        date = datetime.date.today().isoformat()
        versions = triton.__version__
    with open(args.out, "w") as f:
        f.write(render(rows, targets, versions, date))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(triton=versions, date=date, targets=targets, rows=rows), f, indent=1)
    bad = [r for r in rows if r["status"] != "OK" or not r["fits"]]
    print(f"wrote {args.out}: {len(rows)} compilations, {len(bad)} failed or over the limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
