"""Fixtures of the model tests."""
from tests.support.kernel_paths import no_triton  # noqa: F401  (a fixture: pytest finds it here)
