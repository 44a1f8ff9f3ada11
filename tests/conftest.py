"""Test session set-up.

Without a GPU the Triton kernels are exercised through the interpreter, which
Triton reads from the environment at import time: set it before anything
imports triton.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """Where kernels are tested: the GPU when present, else CPU tensors through the Triton interpreter."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the objects most tests need, built fresh per test (each costs milliseconds) ---------------------------
@pytest.fixture
def tiny_model():
    """The sampling tests' tiny RADD (8 tokens + MASK, length 16, a random head): tests.support.models."""
    from tests.support.models import random_head_model

    return random_head_model()


@pytest.fixture
def loglinear_noise():
    """The released models' noise schedule (log-linear, eps 1e-3)."""
    from radd_fast import LogLinearNoise

    return LogLinearNoise()


@pytest.fixture
def byte_tokenizer():
    """The offline byte-level tokenizer (256 ids; a model with tokens=256 adds MASK as 256)."""
    from radd_fast.data.tokenizers import ByteTokenizer

    return ByteTokenizer()
