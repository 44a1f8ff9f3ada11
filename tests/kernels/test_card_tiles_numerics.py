"""The tiles each card gets, run against the references: an A100's fallback tiles compute what an H100's do.

``test_launch_configs.py`` proves every card's configuration fits its shared memory; this file
proves the smaller configurations are also correct. The 16-bit configurations every card of
the table gets (sm_80 A100, sm_89 L40S / RTX 4090, sm_90 H100, and the others) are launched on fp32 inputs through the Triton
interpreter (its 16-bit dots are not exact, the tiling logic is what is under test here):
masking at ragged edges, split reductions, stage counts. Shapes are awkward on purpose: primes,
one row, lengths that are not a multiple of any tile.
"""
import pytest
import torch

from radd_fast.kernels import flash_attention as fa
from radd_fast.kernels import linear_log_softmax as lls
from radd_fast.kernels import sampling_update as su
from radd_fast.kernels import utils
from radd_fast.kernels.attention import attention_ref
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs the card's own tiles in the kernel tests")

CARDS = {f"sm_{major}{minor}": (major, minor) for major, minor in sorted(utils.SMEM_PER_BLOCK_OPTIN)}
SMS = {"sm_80": 108, "sm_89": 142, "sm_90": 132}  # A100, L40S, H100 SXM: the head's split count follows them
DEFAULT_SMS = 132


def _limit(card: str) -> int:
    return utils.SMEM_PER_BLOCK_OPTIN[CARDS[card]]


def _tables(T: int, hd: int):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


# -- attention (RADD: hd 64; hd 128 is where the cards' tiles differ) -----------------------------------------------------
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


# -- the fused loss head ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("card", list(CARDS))
@pytest.mark.parametrize("N, C", [(1, 131), (37, 301)])
def test_loss_head_tiles_of_each_card_match_the_reference(card, N, C):
    d = 64
    fwd = lls.tile_config_for(CARDS[card], _limit(card), torch.bfloat16)
    bwd = lls.tile_config_for(CARDS[card], _limit(card), torch.bfloat16, backward=True)
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


# -- the sampler's head + Gumbel-max ----------------------------------------------------------------------------------
@pytest.mark.parametrize("card", list(CARDS))
@pytest.mark.parametrize("fp64", [False, True])
@pytest.mark.parametrize("N", [1, 17, 33])
def test_sampling_head_tiles_of_each_card_draw_the_reference_tokens(card, fp64, N, monkeypatch):
    d, V = 64, 211  # V real tokens of a [V + 1]-row head (the mask row is never drawn)
    chosen = []

    def card_config(n_rows, d_, n_vocab, fp64_, dtype, device):
        cfg = su.head_config_for(CARDS[card], _limit(card), torch.bfloat16, n_rows, d_, n_vocab, fp64_, SMS.get(card, DEFAULT_SMS))
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
