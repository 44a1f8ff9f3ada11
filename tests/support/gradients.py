"""A loss against its expected value: the values, then every parameter gradient (the loss tests)."""
from tests.support.compare import assert_close, rel_err


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def compare(model, value, expected, name):
    """Values to 1e-5 relative; then every parameter gradient to 1e-5 relative (norm-wise)."""
    assert value.dtype == expected.dtype, f"{name}: dtype {value.dtype} != {expected.dtype}"
    assert_close(value, expected, atol=1e-6, rtol=1e-5, name=name)
    model.zero_grad()
    value.sum().backward()
    g_loss = grads(model)
    model.zero_grad()
    expected.sum().backward()
    g_ref = grads(model)
    for n in g_ref:
        assert rel_err(g_loss[n], g_ref[n]) < 1e-5, f"{name}: grad {n} rel err {rel_err(g_loss[n], g_ref[n]):.3g}"
