"""The transformers door: ``AutoConfig`` / ``AutoModelForMaskedLM`` load RADD checkpoints (model type ``radd``).

``RADDHFConfig`` holds the run config's sections as the hub layout writes them (``tokens``,
``model``, ``noise``, and any other section as a plain attribute); ``RADDForMaskedLM`` wraps one
``radd_fast.RADD`` (its ``radd`` attribute) and adds no model code: the weights load into that
module by transformers' own loader (the hub layout's keys, under the ``radd.`` prefix), so the
model computes exactly what ``radd_fast.load_model`` returns. Its ``forward`` gives a
``MaskedLMOutput`` whose ``logits`` are the model's raw logits ``[B, T, V]`` (fp32) with the MASK
column at ``-inf``: softmax / argmax over them are the model's ``p(x0 | x_t)`` over the real tokens.

Loading (docs/INTEGRATIONS.md)::

    import radd_fast  # registers model type 'radd'
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained("folder-written-by-save_pretrained")
    # the published uploads' config.json names no model_type: pass the config explicitly
    model = AutoModelForMaskedLM.from_pretrained(path, config=RADDHFConfig.from_pretrained(path))

``save_pretrained`` / ``push_to_hub`` write the one hub layout (``radd_fast.hub``), which the
published class, ``radd_fast.load_model`` and this class all read. Registration: the config
class when transformers' Auto classes load (``radd_fast.integrations``), the model class when
the first config object is built, because importing transformers' ``PreTrainedModel`` takes
seconds and a user of AutoTokenizer alone should not pay for it.
"""
from __future__ import annotations

import functools

import torch
from transformers import AutoConfig, PretrainedConfig

from ..config import RADDConfig
from ..hub import MODEL_TYPE

# Keys transformers adds to a config of its own; they are not part of the RADD run config.
_TRANSFORMERS_KEYS = ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype",
                      "_name_or_path", "auto_map")


class RADDHFConfig(PretrainedConfig):
    """The RADD run config as a transformers config: ``tokens``, ``model`` and ``noise`` sections
    (nested dicts, as in config.json); other sections of the run config become attributes.

    ``radd_config()`` is the typed ``radd_fast.RADDConfig`` (validated: a bad value is a
    ``ConfigError`` naming it). Example::

        cfg = RADDHFConfig.from_pretrained("JingyangOu/radd-t-dce")  # published: no model_type needed
        cfg.radd_config().model.length  # 1024
    """

    model_type = MODEL_TYPE

    def __init__(self, tokens: int = 50257, model: dict | None = None, noise: dict | None = None, **kwargs):
        self.tokens = tokens
        self.model = dict(model or {})
        self.noise = dict(noise or {})
        super().__init__(**kwargs)
        model_class()  # AutoModelForMaskedLM looks the model class up right after building the config

    def radd_config(self) -> RADDConfig:
        """The typed run config of this checkpoint (every section but transformers' own keys)."""
        data = {k: v for k, v in self.to_diff_dict().items() if k not in _TRANSFORMERS_KEYS}
        data.update(tokens=self.tokens, model=dict(self.model), noise=dict(self.noise))
        return RADDConfig.from_dict(data)


def register_config() -> None:
    """``AutoConfig`` knows model type ``radd`` (done at import: ``radd_fast.integrations`` imports this
    module right after transformers loads its Auto classes)."""
    AutoConfig.register(MODEL_TYPE, RADDHFConfig, exist_ok=True)


@functools.lru_cache(maxsize=None)
def model_class() -> type:
    """``RADDForMaskedLM``, defined and registered with ``AutoModelForMaskedLM`` on first use.

    Defined here rather than at module level because its base class, transformers'
    ``PreTrainedModel``, takes seconds to import (see the module docstring).
    """
    from transformers import AutoModelForMaskedLM, PreTrainedModel
    from transformers.modeling_outputs import MaskedLMOutput

    from .. import hub
    from ..model import RADD

    class RADDForMaskedLM(PreTrainedModel):
        """``radd_fast.RADD`` behind transformers' model API; ``self.radd`` is the RADD itself."""

        config_class = RADDHFConfig
        base_model_prefix = "radd"  # the hub layout's keys load under it (transformers adds the prefix)
        main_input_name = "input_ids"

        def __init__(self, config: RADDHFConfig):
            super().__init__(config)
            self.radd = RADD(config.radd_config())
            self.post_init()

        def _init_weights(self, module):
            """RADD initialises its own weights (the published init); checkpoints overwrite them."""

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    return_dict: bool | None = None, **unused) -> MaskedLMOutput:
            """input_ids [B, T] (MASK = ``config.tokens``) -> logits [B, T, V] fp32, MASK column -inf."""
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("RADD attends to every position: an attention_mask with zeros (padding) is not "
                                 "supported; pass sequences of equal length")
            logits = self.radd.logits(input_ids).float()
            logits[..., self.radd.mask_id] = float("-inf")
            return MaskedLMOutput(logits=logits) if return_dict is not False else (logits,)

        def save_pretrained(self, save_directory, **kwargs) -> None:
            """The hub layout (``radd_fast.hub.save_pretrained``): the one every RADD loader reads."""
            if kwargs:
                raise TypeError(f"RADDForMaskedLM.save_pretrained writes the radd-fast hub layout and takes no "
                                f"options, got {sorted(kwargs)}")
            hub.save_pretrained(self.radd, save_directory)

        def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None, **kwargs) -> str:
            """Upload the hub layout (``radd_fast.hub.push_to_hub``); returns the commit URL."""
            if kwargs:
                raise TypeError(f"RADDForMaskedLM.push_to_hub takes private and token only, got {sorted(kwargs)}")
            return hub.push_to_hub(self.radd, repo_id, private=private, token=token)

    RADDForMaskedLM.__module__ = __name__  # pickle and repr find it as this module's attribute
    RADDForMaskedLM.__qualname__ = "RADDForMaskedLM"
    AutoModelForMaskedLM.register(RADDHFConfig, RADDForMaskedLM, exist_ok=True)
    return RADDForMaskedLM


def __getattr__(name: str):
    """``from radd_fast.integrations.transformers import RADDForMaskedLM`` builds the class on demand."""
    if name == "RADDForMaskedLM":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_config()
