"""Where the tests find the published RADD code (CI lays it beside the checkout), or why they skip."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from benchmarks import published as pubcode
from tests.support.paths import REPO

BESIDE_CHECKOUT = REPO.parent / "shared" / "published-radd"


def published_checkout() -> Path:
    """The published code for the tests, or pytest.skip with the reason."""
    path = Path(os.environ.get(pubcode.ENV_VAR) or BESIDE_CHECKOUT)
    if not path.is_dir():
        pytest.skip(f"no published RADD code at {path} (CI has ../shared/published-radd; or set {pubcode.ENV_VAR})")
    missing = [m for m in pubcode.DEPENDENCIES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the published code needs {', '.join(missing)}: pip install -e '.[bench]'")
    return path
