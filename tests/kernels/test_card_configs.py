"""Per-card launch configurations of every kernel (flash attention, the fused loss head, the sampler's
head, the decoders' token statistics): every choice fits its card's shared memory, sm_90's are unchanged, and the smaller tiles the
other cards get compute what sm_90's do.

The choices are pure functions of (capability, shared memory limit, dtype, shape), so these run on
the CPU. The shared-memory estimates they use are cross-checked against what Triton actually
allocated when tools/aot_build.py compiled the kernels for each card (the committed JSON beside
benchmarks/results/triton_aot_*.json): an estimate never under-counts a measured
kernel, and the configuration recorded there is the one the functions choose today.

The 16-bit configurations every card of the table gets (sm_80 A100, sm_89 L40S / RTX 4090, sm_90
H100, and the others) are also launched on fp32 inputs through the Triton interpreter (its 16-bit
dots are not exact, the tiling logic is what is under test there): masking at ragged edges, split
reductions, stage counts. Shapes are awkward on purpose: primes, one row, lengths that are not a
multiple of any tile.
"""
import glob
import json
import os

import pytest
import torch

from radd_fast.kernels import flash_attention as fa
from radd_fast.kernels import linear_log_softmax as lls
from radd_fast.kernels import sampling_update as su
from radd_fast.kernels import token_stats as ts
from radd_fast.kernels import utils
from radd_fast.kernels.attention import attention_ref
from tests.support.compare import assert_close
from tests.support.paths import REPO

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


# --------------------------------------------------------------------- every choice fits
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


@pytest.mark.parametrize("card", CARDS, ids=_id)
def test_token_stats_choices_fit_and_are_the_sampling_heads(card):
    """The token statistics kernel walks the sampling head's loop: its tiles are the head's on every card."""
    cap, limit = card
    for dtype in DTYPES.values():
        for n in SAMPLER_ROWS + (16384,):
            for fp64 in (False, True):
                cfg = ts.token_stats_config_for(cap, limit, dtype, n, 768, V_HEAD, fp64, sm_count=108)
                assert cfg == su.head_config_for(cap, limit, dtype, n, 768, V_HEAD, fp64, sm_count=108)
                assert su.head_smem_bytes(cfg, cap, dtype) <= limit, (dtype, n, fp64)


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


# ----------------------------------------------------------------------- sm_90 unchanged
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


# ----------------------------------------------------------------- against the AOT build
def _aot_builds():
    """Every committed AOT build with its JSON: {file name: its contents}."""
    paths = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "triton_aot_*.json")))
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
    if row["kernel"] == "_stats_partial_kernel":
        return ts.token_stats_config_for(cap, limit, dtype, c["n_rows"], c["d"], c["n_vocab"], c["fp64"], c["sm_count"])
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
    # the sampling head and the token statistics: one loop, one estimate
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


# -------------------- every card's tiles compute the reference (through the interpreter)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs the card's own tiles in the kernel tests")
CAPABILITY_OF = {f"sm_{major}{minor}": (major, minor) for major, minor in sorted(utils.SMEM_PER_BLOCK_OPTIN)}
SMS = {"sm_80": 108, "sm_89": 142, "sm_90": 132}  # A100, L40S, H100 SXM: the head's split count follows them
DEFAULT_SMS = 132


def _limit(card: str) -> int:
    return utils.SMEM_PER_BLOCK_OPTIN[CAPABILITY_OF[card]]


def _tables(T: int, hd: int):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


# -- attention (RADD: hd 64; hd 128 is where the cards' tiles differ)
def _attention_configs() -> list:
    """Every distinct (hd, forward, backward) tile set any card in the table gets for 16-bit inputs."""
    seen = {}
    for capability, limit in utils.SMEM_PER_BLOCK_OPTIN.items():
        for dtype in (torch.bfloat16, torch.float16):
            for hd in (64, 128):
                cfg = (hd, fa.fwd_config_for(capability, limit, dtype, hd, True),
                       fa.bwd_config_for(capability, limit, dtype, hd, True))
                seen.setdefault(cfg, f"sm_{capability[0]}{capability[1]}-hd{hd}")
    return sorted(seen.items(), key=lambda kv: kv[1])


@cpu_only
@pytest.mark.parametrize("configs", [c for c, _ in _attention_configs()], ids=[n for _, n in _attention_configs()])
def test_attention_tiles_of_every_card_match_the_reference(configs):
    hd, fwd, bwd = configs
    B, T, h = 1, 67, 2
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3, h, hd)
    cos, sin = _tables(T, hd)
    out, lse = fa.flash_attention_forward(qkv, cos, sin, config=fwd)
    leaf = qkv.clone().requires_grad_(True)
    ref = attention_ref(leaf, cos, sin)
    assert_close(out, ref.detach(), atol=2e-5, rtol=2e-5, name=f"forward {fwd}")
    dout = torch.randn_like(out)
    (expected,) = torch.autograd.grad(ref, leaf, dout)
    dqkv = fa.flash_attention_backward(dout, qkv, out, lse, cos, sin, config=bwd)
    assert_close(dqkv, expected, atol=5e-5, rtol=5e-5, name=f"backward {bwd}")


# -- the fused loss head
@cpu_only
@pytest.mark.parametrize("card", list(CAPABILITY_OF))
@pytest.mark.parametrize("N, C", [(1, 131), (37, 301)])
def test_loss_head_tiles_of_each_card_match_the_reference(card, N, C):
    d = 64
    fwd = lls.tile_config_for(CAPABILITY_OF[card], _limit(card), torch.bfloat16)
    bwd = lls.tile_config_for(CAPABILITY_OF[card], _limit(card), torch.bfloat16, backward=True)
    torch.manual_seed(1)
    x, w, b = torch.randn(N, d), torch.randn(C, d) * 0.2, torch.randn(C) * 0.1
    targets = torch.randint(0, C, (N,))
    logp, lse = lls.linear_log_softmax_gather_forward(x, w, b, targets, config=fwd)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    ref_logp, ref_lse = lls.linear_log_softmax_gather_ref(*leaves, targets)
    assert_close(logp, ref_logp.detach(), atol=2e-5, rtol=2e-5, name=f"{card} logp {fwd}")
    assert_close(lse, ref_lse.detach(), atol=2e-5, rtol=2e-5, name=f"{card} lse")
    g = torch.randn(N)
    expected = torch.autograd.grad(ref_logp, leaves, g)
    got = lls.linear_log_softmax_gather_backward(g, None, x, w, b, targets, lse, config=bwd)
    for name, a, e in zip(("dx", "dW", "db"), got, expected):
        assert_close(a, e, atol=5e-5, rtol=5e-5, name=f"{card} {name} {bwd}")


# -- the sampler's head + Gumbel-max
@cpu_only
@pytest.mark.parametrize("card", list(CAPABILITY_OF))
@pytest.mark.parametrize("fp64", [False, True])
@pytest.mark.parametrize("N", [1, 17, 33])
def test_sampling_head_tiles_of_each_card_draw_the_reference_tokens(card, fp64, N, monkeypatch):
    d, V = 64, 211  # V real tokens of a [V + 1]-row head (the mask row is never drawn)
    chosen = []

    def card_config(n_rows, d_, n_vocab, fp64_, dtype, device):
        cfg = su.head_config_for(CAPABILITY_OF[card], _limit(card), torch.bfloat16, n_rows, d_, n_vocab, fp64_, SMS.get(card, DEFAULT_SMS))
        chosen.append(cfg)
        return cfg

    monkeypatch.setattr(su, "_head_config", card_config)
    torch.manual_seed(2)
    h, w, b = torch.randn(N, d), torch.randn(V + 1, d), torch.randn(V + 1) * 0.1
    noise = su.gumbel_noise(N, V, seed=5, device="cpu", fp64=fp64)
    x_flat = torch.full((N + 3,), -1, dtype=torch.int64)  # poisoned: every destination must be written
    dst = torch.randperm(N + 3)[:N]
    tokens = su.head_sample_update(h, w, b, V, dst=dst, x_flat=x_flat, noise=noise, fp64=fp64)
    x_ref = torch.full((N + 3,), -1, dtype=torch.int64)
    expected = su.head_sample_update_ref(h, w, b, V, dst, x_ref, noise, fp64)
    assert torch.equal(tokens, expected) and torch.equal(x_flat, x_ref), chosen[-1]
    assert chosen[-1].splits > 1  # the card's vocabulary splits and their reduction ran (the interpreter's own: 1)


# -- the decoders' token statistics
@cpu_only
@pytest.mark.parametrize("card", list(CAPABILITY_OF))
@pytest.mark.parametrize("N", [1, 33])
def test_token_stats_tiles_of_each_card_match_the_reference(card, N):
    d, V = 64, 211
    cfg = ts.token_stats_config_for(CAPABILITY_OF[card], _limit(card), torch.bfloat16, N, d, V, False,
                                    SMS.get(card, DEFAULT_SMS))
    assert cfg.splits > 1  # the card's vocabulary splits and their merge run (the interpreter's own: 1)
    torch.manual_seed(3)
    h, w, b = torch.randint(-2, 3, (N, d)).float(), torch.randint(-1, 2, (V, d)).float(), torch.randn(V)
    got = ts.token_stats(h, w, b, key=6, config=cfg)
    ref = ts.token_stats_ref(h, w, b, key=6)
    assert torch.equal(got.tokens, ref.tokens), cfg
    assert_close(got.log_prob, ref.log_prob, atol=1e-5, rtol=1e-5, name=f"{card} log_prob {cfg}")
    assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=1e-5, name=f"{card} entropy {cfg}")
