"""Benchmarks of radd-fast. Without a GPU, the Triton kernels run through the
interpreter, which Triton reads at import time: set it before anything imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
