"""Triton kernels of radd-fast, one module per op (see each module's header).

Every op has a pure-PyTorch reference ``<op>_ref`` beside it; the public
functions fall back to the reference where Triton cannot run (see
``utils.triton_runs_on``).
"""
