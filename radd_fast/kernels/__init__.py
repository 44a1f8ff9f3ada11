"""Triton kernels of radd-fast, one module per op (see each module's header).

Every op has a pure-PyTorch reference ``<op>_ref`` beside it; the public
functions fall back to the reference where Triton cannot run (see
``utils.triton_runs_on``).

``registry.KERNELS`` is the table of them, one ``KernelSpec`` per kernel module: what the
benchmarks, the micro-benchmarks and ``tools/aot_build.py`` read their kernel lists from.
"""
