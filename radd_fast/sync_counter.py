"""Count the operations that make the host wait for the device (host syncs).

A ``TorchDispatchMode`` sees every aten op; the ones below copy a device value
to the host or size an output by the data, so on CUDA they block until the
queue drains. Counting them on CPU tensors finds the same call sites (the op
is dispatched wherever the tensor lives), so the counts are exact and tests
can assert them without a GPU. ``Tensor.tolist()`` and ``Tensor.numpy()``
dispatch no op on CPU tensors, so the counter also wraps those two methods
while it is active (on CUDA they would be device-to-host copies).

Example::

    with SyncCounter() as syncs:
        generate(model, noise, 64, steps=128, seed=0, progress=False)
    print(syncs.total, syncs.by_op)   # e.g. 5 {'aten._local_scalar_dense': 5}
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host needs before it can go on (or whose output size depends on the data).
SYNC_OPS = frozenset({
    "aten._local_scalar_dense",  # .item(), int(t), float(t), bool(t), .tolist()
    "aten.is_nonzero",  # if tensor:
    "aten.nonzero",  # also behind boolean-mask indexing on CUDA
    "aten.masked_select",
    "aten.equal",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",  # without output_size
    "aten.item",
})


def _is_bool_index(func, args) -> bool:
    """x[mask] with a boolean mask: the output size is the number of True entries."""
    if func.overloadpacket is not torch.ops.aten.index and func.overloadpacket is not torch.ops.aten.index_put_ \
            and func.overloadpacket is not torch.ops.aten.index_put:
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _is_host_copy(func, args, kwargs) -> bool:
    """A CUDA tensor copied to the CPU (``.cpu()``, ``.to("cpu")``, ``.numpy()`` after it)."""
    if func.overloadpacket not in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
        return False
    src = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
    dst_device = kwargs.get("device") if func.overloadpacket is torch.ops.aten._to_copy else args[0].device
    return isinstance(src, torch.Tensor) and src.is_cuda and dst_device is not None \
        and torch.device(dst_device).type == "cpu"


class SyncCounter(TorchDispatchMode):
    """Counts host-sync operations while active: ``total`` and ``by_op`` (op name -> count)."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self._saved = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, self._saved[name]))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        self._saved.clear()
        return super().__exit__(*exc)

    def _counted(self, name: str, method):
        def wrapper(tensor, *args, **kwargs):
            self.by_op[f"Tensor.{name}"] += 1
            return method(tensor, *args, **kwargs)
        return wrapper

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"aten.{func.overloadpacket.__name__}"
        if name in SYNC_OPS:
            self.by_op[name] += 1
        elif _is_bool_index(func, args):
            self.by_op[f"{name} (boolean mask)"] += 1
        elif _is_host_copy(func, args, kwargs):
            self.by_op["device-to-host copy"] += 1
        return func(*args, **kwargs)
