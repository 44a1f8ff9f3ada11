"""Per-card launch configurations: every choice fits its card's shared memory, sm_90's are unchanged.

The choices are pure functions of (capability, shared memory limit, dtype, shape), so these run on
the CPU. The shared-memory estimates they use are cross-checked against what Triton actually
allocated when tools/aot_build.py compiled the kernels for each card (the committed JSON beside
benchmarks/results/triton_aot_*.json): an estimate never under-counts a measured
kernel, and the configuration recorded there is the one the functions choose today.
"""
import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

from radd_fast.kernels import flash_attention as fa
from radd_fast.kernels import linear_log_softmax as lls
from radd_fast.kernels import sampling_update as su
from radd_fast.kernels import utils

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARDS = sorted(utils.SMEM_PER_BLOCK_OPTIN.items())  # every card in the table, not only the built ones
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = range(fa.MIN_HEAD_DIM, fa.MAX_HEAD_DIM + 1, fa.HEAD_DIM_MULTIPLE)  # every supported one
SAMPLER_ROWS = (1, 2, 16, 17, 32, 33, 64, 128, 1024)
WIDTHS = (768, 1024)
V_HEAD = 50257
SM90 = (9, 0)
SM90_LIMIT = utils.SMEM_PER_BLOCK_OPTIN[SM90]


def _id(card):
    return f"sm_{card[0][0]}{card[0][1]}"


# ----------------------------------------------------------------------------- the card table
def test_card_limits_are_the_documented_numbers():
    # CUDA programming guide, maximum shared memory per block (opt-in), in bytes
    assert utils.smem_limit_of((8, 0)) == 166912  # A100: 163 KB
    assert utils.smem_limit_of((8, 9)) == 101376  # L4 / L40S / RTX 4090: 99 KB
    assert utils.smem_limit_of((9, 0)) == 232448  # H100 / H200: 227 KB
    assert utils.smem_limit_of((8, 8)) == 101376  # unknown minor: the smallest of its major
    assert utils.smem_limit_of((7, 5)) == 101376  # unknown major: 99 KB


def test_card_of_prefers_the_drivers_number(monkeypatch):
    props = {0: SimpleNamespace(major=8, minor=0, shared_memory_per_block_optin=150000),
             1: SimpleNamespace(major=8, minor=9)}  # an older torch without the field
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    utils._card_of_cuda.cache_clear()
    try:
        assert utils.card_of(torch.device("cuda", 0)) == ((8, 0), 150000)
        assert utils.card_of(torch.device("cuda", 1)) == ((8, 9), 101376)
    finally:
        utils._card_of_cuda.cache_clear()


def test_pipeline_buffers_by_card():
    assert utils.pipeline_buffers((9, 0), torch.bfloat16, 3) == 3  # wgmma keeps every stage
    assert utils.pipeline_buffers((9, 0), torch.float32, 3) == 2  # IEEE fp32 dots: cp.async
    assert utils.pipeline_buffers((8, 0), torch.float16, 3) == 2
    assert utils.pipeline_buffers((8, 9), torch.bfloat16, 1) == 1  # no pipelining: one copy


# ----------------------------------------------------------------------------- every choice fits
@pytest.mark.parametrize("card", CARDS, ids=_id)
def test_attention_choices_fit(card):
    cap, limit = card
    for dtype in DTYPES.values():
        for hd in HEAD_DIMS:
            for rotary in (False, True):
                fwd = fa.fwd_config_for(cap, limit, dtype, hd, rotary)
                bwd = fa.bwd_config_for(cap, limit, dtype, hd, rotary)
                what = f"{dtype} hd{hd} rotary={rotary}"
                assert fa.fwd_smem_bytes(fwd, cap, dtype, hd, rotary) <= limit, what
                assert fa.dkdv_smem_bytes(bwd, cap, dtype, hd, rotary) <= limit, what
                assert fa.dq_smem_bytes(bwd, cap, dtype, hd, rotary) <= limit, what


@pytest.mark.parametrize("card", CARDS, ids=_id)
def test_loss_head_choices_fit(card):
    cap, limit = card
    for dtype in DTYPES.values():
        for backward in (False, True):
            cfg = lls.tile_config_for(cap, limit, dtype, backward)
            assert lls.tile_smem_bytes(cfg, cap, dtype) <= limit, (dtype, backward)


@pytest.mark.parametrize("card", CARDS, ids=_id)
def test_sampling_head_choices_fit(card):
    cap, limit = card
    for dtype in DTYPES.values():
        for n in SAMPLER_ROWS:
            for d in WIDTHS:
                for fp64 in (False, True):
                    cfg = su.head_config_for(cap, limit, dtype, n, d, V_HEAD, fp64, sm_count=108)
                    assert su.head_smem_bytes(cfg, cap, dtype) <= limit, (dtype, n, d, fp64)
                    assert 1 <= cfg.splits <= -(-V_HEAD // cfg.block_v)


def test_small_cards_get_smaller_tiles_where_the_tuned_ones_overflow():
    # the cases the issue names: hd-128 attention with fused rotary, and the fused loss head
    l4 = ((8, 9), utils.smem_limit_of((8, 9)))
    a100 = ((8, 0), utils.smem_limit_of((8, 0)))
    for card in (l4, a100):  # 32 keys a step: fits L4, and keeps A100's registers from spilling
        assert fa.fwd_config_for(*card, torch.bfloat16, 128, True) == fa.FwdConfig(128, 32, 8, 3)
    assert fa.fwd_smem_bytes(fa.FwdConfig(128, 64, 8, 3), (8, 9), torch.bfloat16, 128, True) > l4[1]
    # head dim 64 keeps the tuned tiles on both (they fit)
    assert fa.fwd_config_for(*l4, torch.bfloat16, 64, True) == fa.FwdConfig(128, 64, 8, 3)
    # the loss head's 144 KB on sm_90 is wgmma's three copies of each stage; cp.async keeps two
    # (96 KB, measured), which fits both: its tuned tiles stay
    tuned_head = lls.tile_config_for(SM90, SM90_LIMIT, torch.bfloat16)
    assert lls.tile_smem_bytes(tuned_head, SM90, torch.bfloat16) == 147456
    for card in (l4, a100):
        assert lls.tile_smem_bytes(tuned_head, card[0], torch.bfloat16) == 98304
        assert lls.tile_config_for(*card, torch.bfloat16) == tuned_head


# ----------------------------------------------------------------------------- sm_90 unchanged
# The H200-tuned choices as they were before the per-card rule, written out by hand.
def _sm90_fwd(dtype):
    return fa.FwdConfig(32, 32, 4, 1) if dtype == torch.float32 else fa.FwdConfig(128, 64, 8, 3)


def _sm90_bwd(dtype, hd):
    if dtype == torch.float32:
        return fa.BwdConfig(16, 32, 4, 1, 32, 16, 4, 1)
    if hd <= 64:
        return fa.BwdConfig(32, 128, 8, 3, 128, 32, 8, 3)
    return fa.BwdConfig(32, 64, 8, 2, 64, 64, 8, 2)


def test_sm90_attention_choices_unchanged():
    for dtype in DTYPES.values():
        for hd in HEAD_DIMS:
            for rotary in (False, True):
                assert fa.fwd_config_for(SM90, SM90_LIMIT, dtype, hd, rotary) == _sm90_fwd(dtype)
                assert fa.bwd_config_for(SM90, SM90_LIMIT, dtype, hd, rotary) == _sm90_bwd(dtype, hd)


def test_sm90_loss_head_choices_unchanged():
    for backward in (False, True):
        assert lls.tile_config_for(SM90, SM90_LIMIT, torch.float32, backward) == lls.TileConfig(64, 64, 32, 8, 4, 3)
        for dtype in (torch.bfloat16, torch.float16):
            assert lls.tile_config_for(SM90, SM90_LIMIT, dtype, backward) == lls.TileConfig(128, 256, 64, 8, 8, 3)


def test_sm90_sampling_head_choices_unchanged():
    # (n_rows, fp64) -> (block_n, splits, num_warps) at V-1 = 50257, d = 768, 132 SMs: the sm_90 build's rows
    expected = {(128, False): (64, 197, 8), (128, True): (32, 131, 4), (16, False): (16, 393, 4),
                (16, True): (16, 393, 4), (1, False): (16, 393, 4)}
    for (n, fp64), (block_n, splits, warps) in expected.items():
        cfg = su.head_config_for(SM90, SM90_LIMIT, torch.bfloat16, n, 768, V_HEAD, fp64, sm_count=132)
        assert cfg == su.HeadConfig(block_n, 128, 64, splits, warps, 3), (n, fp64)


def test_interpreter_keeps_its_small_tiles():
    cpu = torch.device("cpu")
    assert fa.default_fwd_config(128, torch.bfloat16, cpu, rotary=True) == fa._INTERPRETER_FWD
    assert fa.default_bwd_config(128, torch.bfloat16, cpu, rotary=True) == fa._INTERPRETER_BWD
    assert lls.tile_config(torch.bfloat16, cpu) == lls.TileConfig(16, 64, 32)
    assert su._head_config(128, 768, V_HEAD, False, torch.float32, cpu).splits == 1


# ----------------------------------------------------------------------------- against the AOT build
def _aot_builds():
    """Every committed AOT build with its JSON: {file name: its contents}."""
    paths = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "triton_aot_*.json")))
    assert paths, "the committed AOT build (tools/aot_build.py --targets 80,89,90) is missing"
    builds = {}
    for path in paths:
        with open(path) as f:
            builds[os.path.basename(path)] = json.load(f)
    return builds


def _aot_rows():
    return [row for build in _aot_builds().values() for row in build["rows"]]


def _chosen(row):
    """What the configuration function chooses today for the row's card and inputs."""
    cap = utils.CARD_CAPABILITIES[int(row["card"][3:])]
    limit = utils.smem_limit_of(cap)
    c = dict(row["choice"])
    dtype = DTYPES[c.pop("dtype")]
    if row["kernel"] == "_attn_fwd_kernel":
        return fa.fwd_config_for(cap, limit, dtype, c["head_dim"], c["rotary"])
    if row["kernel"] in ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        return fa.bwd_config_for(cap, limit, dtype, c["head_dim"], c["rotary"])
    if row["kernel"] in ("_lse_partial_kernel", "_dlogits_kernel"):
        return lls.tile_config_for(cap, limit, dtype, c["backward"])
    return su.head_config_for(cap, limit, dtype, c["n_rows"], c["d"], c["n_vocab"], c["fp64"], c["sm_count"])


def test_aot_build_compiled_and_fit_everywhere():
    assert any(set(b["targets"]) == {80, 89, 90} for b in _aot_builds().values())
    rows = _aot_rows()
    bad = [(r["card"], r["kernel"], r["spec"], r["status"]) for r in rows if r["status"] != "OK" or not r["fits"]]
    assert not bad
    assert all(r["smem"] <= r["smem_limit"] for r in rows)


def _estimate(row):
    """Today's estimate for the row's kernel at the configuration it was built with."""
    cap = utils.CARD_CAPABILITIES[int(row["card"][3:])]
    c, cfg = row["choice"], row["config"]
    dtype = DTYPES[c["dtype"]]
    kernel = row["kernel"]
    if kernel == "_attn_fwd_kernel":
        return fa.fwd_smem_bytes(fa.FwdConfig(**cfg), cap, dtype, c["head_dim"], c["rotary"])
    if kernel == "_attn_bwd_dkdv_kernel":
        return fa.dkdv_smem_bytes(fa.BwdConfig(**cfg), cap, dtype, c["head_dim"], c["rotary"])
    if kernel == "_attn_bwd_dq_kernel":
        return fa.dq_smem_bytes(fa.BwdConfig(**cfg), cap, dtype, c["head_dim"], c["rotary"])
    if kernel in ("_lse_partial_kernel", "_dlogits_kernel"):
        return lls.tile_smem_bytes(lls.TileConfig(**cfg), cap, dtype)
    return su.head_smem_bytes(su.HeadConfig(**cfg), cap, dtype)


def test_estimates_bound_the_measured_shared_memory():
    checked = 0
    for r in _aot_rows():
        if r["choice"] is not None:
            assert r["smem"] <= _estimate(r), (r["card"], r["kernel"], r["spec"], r["smem"], _estimate(r))
            checked += 1
    assert checked > 100


def test_aot_build_recorded_todays_choices():
    for r in _aot_rows():
        if r["choice"] is not None:
            assert vars(_chosen(r)) == r["config"], (r["card"], r["kernel"], r["spec"])
