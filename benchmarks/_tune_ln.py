# temporary tuning sweep (not committed)
import torch, triton
from triton.testing import do_bench
from radd_fast.kernels import layer_norm as m
n, d = 32768, 768
x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16); w = torch.ones(d, device="cuda"); b = torch.ones(d, device="cuda")
dy = torch.randn_like(x)
sm = torch.cuda.get_device_properties(0).multi_processor_count
orig_w = m._num_warps
for nw in (1, 2, 4, 8):
    m._num_warps = lambda blk, nw=nw: nw
    ms = do_bench(lambda: m.layer_norm_forward(x, w, b), return_mode="median")
    print(f"fwd nw={nw} {ms*1e3:.1f}us {n*d*4/ms/1e6:.0f}GB/s")
_, _, mean, rstd = m.layer_norm_forward(x, w, b)
for mult in (2, 4, 8, 16, 32):
    for nw in (2, 4, 8):
        m._num_warps = lambda blk, nw=nw: nw
        m._num_partials = lambda n_, dev, mult=mult: min(n_, sm * mult)
        ms = do_bench(lambda: m.layer_norm_backward(dy, x, w, mean, rstd), return_mode="median")
        print(f"bwd mult={mult} nw={nw} {ms*1e3:.1f}us {n*d*6/ms/1e6:.0f}GB/s")
m._num_warps = orig_w
