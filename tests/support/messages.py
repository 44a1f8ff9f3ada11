"""The exact text of a user error: the tests compare messages whole."""
from __future__ import annotations

import pytest


def error_of(fn, *args, **kwargs) -> str:
    """The message of the ValueError that ``fn(*args, **kwargs)`` raises (the test fails if none)."""
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    return str(err.value)
