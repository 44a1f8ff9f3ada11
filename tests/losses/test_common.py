"""What every loss shares (radd_fast/losses/common.py): the batch checks with clear errors, the
masked rows' log-probs (through the fused head on the fast backend), and ``per_sequence``, a
fixed-order segment sum (bit for bit the sequential sum, whatever the thread count)."""
import importlib.util

import pytest
import torch

import radd_fast
from radd_fast import GeometricNoise, LogLinearNoise
from radd_fast.losses import LOSS_TYPES, get_loss_fn
from radd_fast.losses.common import per_sequence
from tests.support.compare import assert_close, rel_err
from tests.support.gradients import grads
from tests.support.models import LOSS_TOKENS, loss_model

EPS = 1e-3


# ---- bad inputs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bad_batches_raise_clear_errors(loss_type):
    model = loss_model()
    fn = get_loss_fn(LogLinearNoise(), model.vocab_size, train=True, loss_type=loss_type)
    ok = torch.randint(0, LOSS_TOKENS, (2, 4))
    with pytest.raises(ValueError, match="mask id is 11"):
        fn(model, ok.clone().fill_(model.mask_id))  # == mask id
    with pytest.raises(ValueError, match="clean tokens must be in"):
        fn(model, ok + 100)  # >= V
    with pytest.raises(ValueError, match="clean tokens must be in"):
        fn(model, ok - 100)
    with pytest.raises(ValueError, match="exceeds the model's length 16"):
        fn(model, torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        fn(model, ok.float())
    with pytest.raises(ValueError, match="does not match the model's vocab_size"):
        get_loss_fn(LogLinearNoise(), 50258, train=True, loss_type=loss_type)(model, ok)


def test_length_above_model_length_is_rejected():
    model = radd_fast.RADD(radd_fast.RADDConfig(tokens=10, model=radd_fast.ModelConfig(
        hidden_size=16, n_heads=2, n_blocks=1, length=8)))
    with pytest.raises(ValueError, match="exceeds the model's length 8"):
        get_loss_fn(LogLinearNoise(), 11, True)(model, torch.zeros(2, 9, dtype=torch.long))


# ---- per_sequence: a fixed-order segment sum -----------------------------------------------------------------
def sequential_sums(values: torch.Tensor, seq: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The oracle: each sequence's rows added one by one, in row order, from 0."""
    out = []
    for b in range(batch_size):
        acc = values.new_zeros(())
        for v in values[seq == b]:
            acc = acc + v
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sequence_is_the_sequential_sum_bit_for_bit(dtype):
    torch.manual_seed(1)
    B = 7
    seq = torch.randint(0, B, (300,)).sort().values
    seq = seq[(seq != 2) & (seq != 6)]  # sequences without masked rows, one of them the last
    values = (torch.randn(seq.numel(), dtype=dtype) * 100).requires_grad_(True)
    out = per_sequence(values, seq, B)
    assert out.dtype == dtype and out.shape == (B,)
    assert torch.equal(out, sequential_sums(values.detach(), seq, B)) and out[2] == 0 and out[6] == 0
    grad_out = torch.randn(B, dtype=dtype)
    (grad,) = torch.autograd.grad(out, values, grad_out)
    assert torch.equal(grad, grad_out[seq])  # each row gets its sequence's gradient


def test_per_sequence_leaves_out_padding_rows_past_the_last_sequence():
    seq = torch.tensor([0, 0, 1, 3, 3])  # B = 3: the rows of "sequence 3" are padding
    values = torch.tensor([1.0, 2.0, 4.0, float("nan"), 8.0], requires_grad=True)
    out = per_sequence(values, seq, 3)
    assert torch.equal(out, torch.tensor([3.0, 4.0, 0.0]))
    (grad,) = torch.autograd.grad(out, values, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(grad, torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0]))


def test_per_sequence_does_not_depend_on_the_thread_count():
    torch.manual_seed(2)
    seq = torch.randint(0, 64, (200_000,)).sort().values
    values = torch.randn(seq.numel())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = per_sequence(values, seq, 64)
        torch.set_num_threads(max(2, threads))
        many = per_sequence(values, seq, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_per_sequence_of_no_rows_and_under_torch_compile():
    assert torch.equal(per_sequence(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3), torch.zeros(3))
    seq = torch.tensor([0, 0, 2, 2, 2])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    compiled = torch.compile(per_sequence, backend="aot_eager", fullgraph=True)  # fullgraph: no sync, no break
    assert torch.equal(compiled(values, seq, 4), torch.tensor([3.0, 0.0, 12.0, 0.0]))


# ---- the fused head ------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("radd_fast.kernels.linear_log_softmax") is None,
                    reason="radd_fast/kernels/linear_log_softmax.py (fused head) not present yet")
@pytest.mark.parametrize("loss_type,whole_model,tokens,length", [
    ("t_DSE", False, 50, 8), ("lambda_DCE", False, 50, 8), ("k_DCE", False, 50, 8), ("lambda_DCE", True, 50, 8),
    # away from the defaults: a vocabulary past one tile (257, odd) and an odd length, t_DCE at another noise
    ("t_DCE", False, 257, 7), ("lambda_DCE", False, 257, 7)])
def test_fast_backend_loss_matches_reference(loss_type, whole_model, tokens, length):
    """backend='fast' routes the masked rows through the fused linear + log-softmax kernel
    (Triton interpreter on CPU): same values and gradients as the reference, fp32. First the
    head alone (blocks stay reference), then the whole fast model (Triton blocks too)."""
    noise = LogLinearNoise(EPS) if tokens == 50 else GeometricNoise(0.3, 5.0)
    ref, fast = loss_model(tokens=tokens, length=length), loss_model(tokens=tokens, length=length)
    if whole_model:
        fast.set_backend("fast")
    else:
        fast.backend = "fast"  # the head only: the loss head is what is under test
    batch = torch.randint(0, tokens, (3, length))
    values, gs = [], []
    for model in (ref, fast):
        torch.manual_seed(5)
        value = get_loss_fn(noise, model.vocab_size, train=True, loss_type=loss_type)(model, batch)
        model.zero_grad()
        value.sum().backward()
        values.append(value.detach())
        gs.append(grads(model))
    assert_close(values[1], values[0], atol=1e-5, rtol=1e-5, name=loss_type)
    for n in gs[0]:
        assert rel_err(gs[1][n], gs[0][n]) < 1e-5, f"grad {n}: rel err {rel_err(gs[1][n], gs[0][n]):.3g}"
