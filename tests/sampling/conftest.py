"""Fixtures of the sampling tests."""
from tests.support.kernel_paths import no_triton  # noqa: F401  (a fixture: pytest finds it here)
