"""Doors to other libraries (docs/INTEGRATIONS.md): ``transformers`` and ``lm-evaluation-harness``.

- ``transformers.py``: ``RADDHFConfig`` / ``RADDForMaskedLM``, model type ``radd``, a thin wrapper
  around ``radd_fast.RADD``;
- ``lm_eval.py``: the harness's model ``radd`` (``python -m radd_fast.integrations.lm_eval``).

The one thing the core imports from here is ``register_with_transformers``, called by
``radd_fast/__init__.py``. It must keep ``import radd_fast`` cheap: importing ``transformers``
takes about a second and its model base (``PreTrainedModel``) several more, and most users of
the package never touch either. So nothing is imported now. The config class is registered
with ``AutoConfig`` right after ``transformers`` loads its Auto-config module (cheap by then),
and the model class when the first RADD config object is built
(``transformers.RADDHFConfig.__init__``): ``AutoModelForMaskedLM.from_pretrained`` always builds
the config before it looks the model class up.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

# The transformers module that holds AutoConfig's table of model types (the same path in 4.x and 5.x).
AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"


def register_with_transformers() -> None:
    """Register RADD's config with ``transformers.AutoConfig`` now if transformers' Auto classes are
    loaded already, else right after they load. Imports nothing; never fails the caller's import."""
    if AUTO_CONFIG_MODULE in sys.modules:
        _register_config()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(AUTO_CONFIG_MODULE, _register_config))


def _register_config() -> None:
    try:
        from . import transformers  # noqa: F401  (registers its config class at import)
    except Exception as e:  # an incompatible transformers must not break its own import (e.g. a tokenizer's)
        warnings.warn(f"radd_fast could not register the 'radd' model type with transformers "
                      f"({type(e).__name__}: {e}); AutoConfig / AutoModelForMaskedLM will not know RADD "
                      f"checkpoints", RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback`` once, right after the module ``name`` has been executed by an import.

    The first time ``name`` is imported it finds the module's real spec through the other finders
    and wraps its loader; from then on it answers nothing (one string comparison per import).
    """

    def __init__(self, name: str, callback):
        self.name = name
        self.callback = callback
        self.fired = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self.fired:
            return None
        self.fired = True  # before the search below, which asks every finder again, this one included
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenCall(spec.loader, self.callback)
        return spec


class _ThenCall(importlib.abc.Loader):
    """A loader that runs the wrapped loader, then ``callback``; anything else is the wrapped loader's."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):  # get_source, get_resource_reader, ... (tracebacks, importlib.resources)
        return getattr(self._loader, name)
