"""A recorder of Triton kernel launches (grids, order), checked before each launch."""
from __future__ import annotations


class LaunchRecorder:
    """Stands for a ``@triton.jit`` kernel (``monkeypatch.setattr(module, "_x_kernel", LaunchRecorder(...))``):
    records each launch's grid in ``launches`` (a list several recorders may share, to see the order
    of a launcher's kernels) and, when ``expected`` is given, checks the grids so far against it
    before launching, so that a wrong grid fails at once instead of after the interpreter has run
    its extra programs (mutmut calls a slow mutant "suspicious", not killed). Then it launches."""

    def __init__(self, kernel, launches: list, expected: list | None = None):
        self.kernel, self.launches, self.expected = kernel, launches, expected

    def __getitem__(self, grid):
        self.launches.append(tuple(grid))
        if self.expected is not None:
            n = len(self.launches)
            assert self.launches == self.expected[:n], f"launch {n}: grid {tuple(grid)}, expected {self.expected}"
        return self.kernel[grid]
