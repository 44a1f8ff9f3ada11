"""The table of kernels: one entry per kernel module of ``radd_fast/kernels/``, and the one list of them.

Adding a kernel is a module ``<name>.py``, one ``KernelSpec`` here, ``tests/kernels/test_<name>.py``
and its benchmark (docs/ARCHITECTURE.md, "Where to add"). What reads the table:

- ``benchmarks/run.py``: its kernel benchmarks are the entries' ``benchmark`` modules;
- ``benchmarks/test_micro_kernels.py``: its ``OPS`` are keyed by the names of the entries with
  ``micro_benchmark=True``, and it fails, naming the kernel, where one has no inputs or functions;
- ``tools/aot_build.py``: its ``FAMILIES`` are the entries' ``aot_family`` names, and it refuses to
  start, naming the kernel, where a family has no spec builder;
- ``tests/kernels/test_registry.py``: the table is complete (every module here but ``utils``,
  ``registry`` and ``__init__`` has an entry) and true (every name below exists, as what it says).

Data only: modules and functions are named by strings, so importing the table imports no kernel,
no Triton, and nothing outside this folder. ``KernelSpec.resolve`` imports what a name names.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

PACKAGE = "radd_fast.kernels"
# the modules of this folder that are not kernels: shared launcher code, this table, the package
NOT_KERNELS = ("utils", "registry", "__init__")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel module and everything outside it that names it."""

    name: str
    """the module ``radd_fast/kernels/<name>.py``; its tests live in ``tests/kernels/test_<name>.py``"""
    function: str
    """its one public function (an attribute of the module)"""
    reference: str
    """its plain-PyTorch reference ``<op>_ref``: a name in the module, or ``<module>.<name>`` for one
    that lives in another kernel module"""
    caller: str
    """its one model-facing caller, a path under ``radd_fast/``: ``model/ops.py`` (block ops) or
    ``model/head.py`` (head ops)"""
    benchmark: str
    """the benchmark that times it: ``benchmarks/bench_<benchmark>.py``"""
    configs: tuple[str, ...] = ()
    """its per-card configuration functions ``*_config_for(capability, smem_limit, ...)``
    (docs/KERNELS.md, "The per-card rule"; tests/kernels/test_card_configs.py)"""
    aot_family: Optional[str] = None
    """the family that builds its Triton kernels ahead of time in ``tools/aot_build.py``"""
    micro_benchmark: bool = False
    """whether ``benchmarks/test_micro_kernels.py`` times its forward + backward against eager"""
    through: Optional[str] = None
    """the kernel module (a dispatcher) the caller reaches this one through, if not directly"""

    @property
    def module(self) -> str:
        return f"{PACKAGE}.{self.name}"

    @property
    def path(self) -> str:
        return f"radd_fast/kernels/{self.name}.py"

    @property
    def test_path(self) -> str:
        return f"tests/kernels/test_{self.name}.py"

    @property
    def benchmark_path(self) -> str:
        return f"benchmarks/bench_{self.benchmark}.py"

    def resolve(self, qualified: str):
        """The object a name of this entry names: ``fn`` in this module, ``module.fn`` in another kernel module."""
        module, _, attr = qualified.rpartition(".")
        return getattr(importlib.import_module(f"{PACKAGE}.{module}" if module else self.module), attr)


# In the order data flows through the model: the block's norm, rotary and attention, then the
# heads. Every reader lists kernels in this order.
KERNELS: dict[str, KernelSpec] = {k.name: k for k in (
    KernelSpec("layer_norm", "layer_norm", "layer_norm_ref", "model/ops.py", "layer_norm",
               aot_family="layer_norm", micro_benchmark=True),
    KernelSpec("rotary", "apply_rotary_qkv", "apply_rotary_qkv_ref", "model/ops.py", "rotary",
               aot_family="rotary", micro_benchmark=True),
    # the dispatcher over flash_attention, SDPA and flash-attn; no Triton kernel of its own
    KernelSpec("attention", "attention", "attention_ref", "model/ops.py", "attention",
               micro_benchmark=True),
    # timed through the dispatcher (impl="triton") by bench_attention and the micro-benchmark
    KernelSpec("flash_attention", "flash_attention_forward", "attention.attention_ref", "model/ops.py",
               "attention", configs=("fwd_config_for", "bwd_config_for"), aot_family="attention",
               through="attention"),
    KernelSpec("linear_log_softmax", "linear_log_softmax_gather", "linear_log_softmax_gather_ref",
               "model/head.py", "linear_log_softmax", configs=("tile_config_for",), aot_family="loss_head",
               micro_benchmark=True),
    # timed inside the sampler (bench_sampling); it has no backward to micro-benchmark
    KernelSpec("sampling_update", "head_sample_update", "head_sample_update_ref", "model/head.py", "sampling",
               configs=("head_config_for",), aot_family="sampling"),
    # the adaptive decoders' head: forward only (no backward to micro-benchmark); bench_token_stats times it
    KernelSpec("token_stats", "token_stats", "token_stats_ref", "model/head.py", "token_stats",
               configs=("token_stats_config_for",), aot_family="token_stats"),
)}
