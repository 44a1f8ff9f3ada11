"""The transformers door (radd_fast/integrations/transformers.py): after ``import radd_fast``,
AutoConfig / AutoModelForMaskedLM load our hub layout and, given the config, the published one,
into a model that computes exactly what ``radd_fast.load_model`` returns; registering costs
``import radd_fast`` nothing."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from radd_fast import load_model
from tests.support.checkpoints import TOKENS, published_checkpoint, write_hub
from tests.support.paths import REPO

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForMaskedLM  # noqa: E402

from radd_fast.integrations.transformers import RADDForMaskedLM, RADDHFConfig  # noqa: E402


@pytest.fixture
def published_folder(tmp_path):
    cfg, state = published_checkpoint()
    return write_hub(tmp_path / "published", cfg, state)


def _same_outputs(hf_model, ours, length=9):
    """Bit for bit: the wrapped RADD's published forward, and the logits but for the MASK column (-inf)."""
    x = torch.randint(0, TOKENS + 1, (2, length))
    with torch.no_grad():
        assert torch.equal(hf_model.radd(x), ours(x))
        logits = hf_model(input_ids=x).logits
        assert torch.equal(logits[..., :-1], ours.logits(x)[..., :-1].float())
    assert bool((logits[..., -1] == float("-inf")).all())


def test_auto_classes_load_what_save_pretrained_wrote(tmp_path, published_folder):
    ours, _ = load_model(published_folder)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "radd"
    config = AutoConfig.from_pretrained(tmp_path / "ours")
    assert isinstance(config, RADDHFConfig)
    written = load_model(tmp_path / "ours")[0].config.to_dict()
    assert {**config.radd_config().to_dict(), "model_type": "radd"} == written == {**ours.config.to_dict(),
                                                                                 "model_type": "radd"}
    hf_model = AutoModelForMaskedLM.from_pretrained(tmp_path / "ours")
    assert type(hf_model) is RADDForMaskedLM and not hf_model.training
    _same_outputs(hf_model, ours)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_published_uploads_load_with_the_config_passed(tmp_path, fmt):
    cfg, state = published_checkpoint()
    folder = write_hub(tmp_path / fmt, cfg, state, fmt=fmt)
    ours, _ = load_model(folder)
    with pytest.raises(ValueError, match="model_type"):  # no model_type in a published config.json
        AutoModelForMaskedLM.from_pretrained(folder)
    _same_outputs(AutoModelForMaskedLM.from_pretrained(folder, config=RADDHFConfig.from_pretrained(folder)), ours)
    _same_outputs(RADDForMaskedLM.from_pretrained(folder), ours)


def test_the_wrapper_saves_the_one_hub_layout(tmp_path, published_folder):
    ours, _ = load_model(published_folder)
    hf_model = AutoModelForMaskedLM.from_pretrained(published_folder, config=RADDHFConfig.from_pretrained(published_folder))
    hf_model.save_pretrained(tmp_path / "again")
    assert set(load_file(str(tmp_path / "again" / "model.safetensors"))) == set(ours.state_dict())
    again, _ = load_model(tmp_path / "again")
    assert again.config.to_dict() == {**ours.config.to_dict(), "model_type": "radd"}
    _same_outputs(AutoModelForMaskedLM.from_pretrained(tmp_path / "again"), again)
    with pytest.raises(TypeError, match="max_shard_size"):
        hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")


def test_padding_masks_are_refused(published_folder):
    hf_model = RADDForMaskedLM.from_pretrained(published_folder)
    x = torch.randint(0, TOKENS, (1, 5))
    hf_model(input_ids=x, attention_mask=torch.ones_like(x))
    with pytest.raises(ValueError, match="attention_mask"):
        hf_model(input_ids=x, attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))


def test_import_radd_fast_imports_no_transformers_and_registers_when_it_loads():
    """In a fresh process: ``import radd_fast`` loads no transformers; AutoTokenizer (what sample.py
    imports) registers the config without transformers' model base; a RADD config brings the model."""
    script = """
import sys
import radd_fast
assert "transformers" not in sys.modules, "import radd_fast imported transformers"
from transformers import AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "radd" in CONFIG_MAPPING
assert "transformers.modeling_utils" not in sys.modules, "registering the config imported the model base"
from transformers import AutoConfig, AutoModelForMaskedLM
config = AutoConfig.for_model("radd", tokens=5, model={"hidden_size": 8, "n_heads": 2, "n_blocks": 1, "length": 4})
assert type(AutoModelForMaskedLM.from_config(config)).__name__ == "RADDForMaskedLM"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
