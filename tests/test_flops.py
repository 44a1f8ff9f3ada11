"""The FLOPs a training step executes (radd_fast/flops.py), counted from the model's weights."""
import math

from radd_fast.flops import executed_train_flops, train_flops_per_token
from tests.support.models import loss_model


def test_executed_flops():
    model = loss_model(length=16)
    B, L = 3, 16
    full = executed_train_flops(model, B, L, head_rows=B * L)
    assert math.isclose(full, B * L * train_flops_per_token(model, L), rel_tol=1e-12)
    d, V = model.config.model.hidden_size, model.vocab_size
    rows_last = 9 * d * d  # attention output (d^2) + MLP (8 d^2) weights; biases are 1-D, not counted
    pruned = executed_train_flops(model, B, L, head_rows=10, last_block_rows=10)
    assert math.isclose(full - pruned, 3 * (B * L - 10) * (2 * rows_last + 2 * d * V), rel_tol=1e-12)
