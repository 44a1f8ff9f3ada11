"""The op backends (radd_fast/model/ops.py): the ``fast`` backend (Triton kernels; interpreter on CPU)
against the ``reference`` model (forward, gradients, target log-probs, dropout under checkpointing,
torch.compile, bf16 on CUDA), the fast backend without Triton (the fallbacks, interpreter off) equal
to the reference, and the backends table."""
import pytest
import torch

from radd_fast import RADD, ModelConfig, RADDConfig, load_model
from radd_fast.kernels.attention import get_attention_impl, set_attention_impl
from radd_fast.model.ops import BACKENDS, FastOps, ReferenceOps, get_ops
from tests.support.compare import assert_close
from tests.support.kernel_paths import with_interpreter
from tests.support.models import fallback_model
from tests.support.published_model import published_config, published_log_probs, published_logits, published_state_dict

TOKENS = 41


def _pair(device, d=64, h=2, blocks=2, dropout=0.0, seed=0):
    cfg = RADDConfig(tokens=TOKENS, model=ModelConfig(hidden_size=d, n_heads=h, n_blocks=blocks, length=32,
                                                      dropout=dropout))
    torch.manual_seed(seed)
    ref = RADD(cfg).to(device)
    with torch.no_grad():  # the published init zeroes the head and sets norms to 1: make every weight matter
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = RADD(cfg, backend="fast").to(device)
    fast.load_state_dict(ref.state_dict())
    if device.type == "cuda":  # parity is judged in fp32
        ref.set_compute_dtype("fp32"), fast.set_compute_dtype("fp32")
    return ref, fast


@pytest.fixture(params=["auto", "triton"])
def attention_impl(request):
    before = get_attention_impl()
    set_attention_impl(request.param)
    yield request.param
    set_attention_impl(before)


@pytest.mark.parametrize("T", [1, 13])
def test_fast_forward_logits_and_grads_match_reference(device, attention_impl, T):
    ref, fast = _pair(device)
    x = torch.randint(0, TOKENS + 1, (2, T), device=device)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_close(fast.logits(x), ref.logits(x), atol=1e-4, rtol=1e-4, name="logits")
        assert_close(fast(x), ref(x), atol=1e-4, rtol=1e-4, name="forward")
    ref.train(), fast.train()  # dropout 0: training mode is deterministic
    w = torch.randn(2, T, TOKENS + 1, device=device)
    (ref(x) * w).sum().backward()
    (fast(x) * w).sum().backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        assert_close(p_fast.grad, p_ref.grad, atol=1e-4, rtol=1e-4, name=f"grad {name}")


def test_fast_target_log_probs_match_reference(device):
    ref, fast = _pair(device, seed=1)
    x = torch.randint(0, TOKENS + 1, (3, 9), device=device)
    rows = torch.tensor([0, 4, 17, 26], device=device)
    targets = torch.tensor([0, 5, TOKENS - 1, 7], device=device)
    outs = []
    for model in (ref, fast):
        h = model.hidden(x).reshape(-1, 64)[rows]
        lp = model.target_log_probs(h, targets)
        lp.sum().backward()
        outs.append((lp, [p.grad for p in model.parameters()]))
    assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5, name="target log-probs")
    for g_fast, g_ref in zip(outs[1][1], outs[0][1]):
        assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-4, name="grad")


def test_fast_dropout_is_reproducible_under_activation_checkpointing(device):
    _, fast = _pair(device, dropout=0.3, seed=2)
    fast.train()
    x = torch.randint(0, TOKENS + 1, (2, 7), device=device)
    torch.manual_seed(5)
    a = fast.hidden(x)
    a.square().sum().backward()
    body = [p for name, p in fast.named_parameters() if not name.startswith("output_layer")]
    grads = [p.grad.clone() for p in body]
    fast.zero_grad()
    fast.use_checkpoint = True
    torch.manual_seed(5)
    b = fast.hidden(x)
    b.square().sum().backward()
    assert_close(b, a, atol=1e-6, name="hidden with checkpointing")
    for g_ckpt, g in zip([p.grad for p in body], grads):
        assert_close(g_ckpt, g, atol=1e-5, rtol=1e-5, name="grad with checkpointing")
    fast.eval()
    with torch.no_grad():
        assert not torch.allclose(fast.hidden(x), a), "dropout had no effect in training mode"


def test_load_model_fast_backend_matches_published(tmp_path, device):
    import json

    from safetensors.torch import save_file

    d, h, blocks = 64, 4, 2
    state = published_state_dict(TOKENS + 1, d, h, blocks, seed=3)
    (tmp_path / "config.json").write_text(json.dumps(published_config(TOKENS, d, h, blocks, 32)))
    save_file(state, str(tmp_path / "model.safetensors"))
    model, _ = load_model(tmp_path, device=device, backend="fast", dtype="fp32")
    for T in (1, 7, 32):
        x = torch.randint(0, TOKENS + 1, (2, T), device=device)
        with torch.no_grad():
            assert_close(model.logits(x).cpu(), published_logits(state, h, x.cpu()), atol=1e-4, rtol=1e-4)
            assert_close(model(x).cpu(), published_log_probs(state, h, x.cpu()), atol=1e-4, rtol=1e-4)


def test_fast_model_traces_under_compile_on_cpu(device):
    """aot_eager traces the same graph inductor would get (inductor + interpreter on CPU is minutes)."""
    if device.type != "cpu":
        pytest.skip("CPU tracing check; CUDA runs the inductor test below")
    ref, fast = _pair(device, seed=4)
    x = torch.randint(0, TOKENS + 1, (2, 9), device=device)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=False)
    out = compiled(x)
    out.sum().backward()
    with torch.no_grad():
        assert_close(out, ref(x), atol=1e-4, rtol=1e-4, name="compiled forward")
    assert all(p.grad is not None for p in fast.blocks.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the Triton ops is checked on CUDA "
                    "(inductor + interpreter on CPU is minutes per graph)")
def test_fast_model_compiles_and_matches(device):
    ref, fast = _pair(device, seed=4)
    x = torch.randint(0, TOKENS + 1, (2, 16), device=device)
    compiled = torch.compile(fast)
    out = compiled(x)
    out.sum().backward()
    with torch.no_grad():
        assert_close(out, ref(x), atol=1e-4, rtol=1e-4, name="compiled forward")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on CUDA only")
def test_fast_bf16_error_is_within_reference_bf16_error(device):
    from tests.support.compare import assert_within_torch_error

    ref, fast = _pair(device, d=128, h=2, seed=6)
    x = torch.randint(0, TOKENS + 1, (4, 32), device=device)
    with torch.no_grad():
        exact = ref(x)
        ref.set_compute_dtype("bf16"), fast.set_compute_dtype("bf16")
        assert_within_torch_error(fast(x), exact, ref(x), factor=2.0, atol=1e-4, name="bf16 forward")


def test_get_ops_reads_the_backends_table():
    assert BACKENDS == {"reference": ReferenceOps, "fast": FastOps}
    assert get_ops("reference") is ReferenceOps and get_ops("fast") is FastOps
    with pytest.raises(ValueError, match="unknown backend 'turbo'; valid backends: reference, fast"):
        get_ops("turbo")


# --------------------------------- the fast backend without Triton (the interpreter off)
def test_fast_backend_without_triton_equals_the_reference(no_triton):
    x = torch.randint(0, 10, (2, 8))
    fast, ref = fallback_model("fast"), fallback_model("reference")
    assert_close(fast(x), ref(x), atol=1e-5, name="forward")
    with_kernels = with_interpreter(no_triton, lambda: fast(x))
    assert_close(fast(x), with_kernels, atol=1e-4, name="fallback vs kernels")
