"""Tokenizers behind one small interface: ``encode_batch``, ``decode``, ``vocab_size``, ``eos_token_id``.

- ``bytes``: UTF-8 bytes as tokens (256 ids); no files, no network. EOS is byte 0
  (NUL), which text does not contain; ``decode`` shows it as ``<|endoftext|>``.
- anything else: a Hugging Face tokenizer, by hub name (``gpt2``, the default) or
  local folder, loaded with ``transformers.AutoTokenizer``. A path that does not
  exist is reported as such (not as a bad hub name); a hub name is looked up in
  the local cache first and, when it is not there and the hub cannot be reached
  (or ``HF_HUB_OFFLINE`` is set), fails at once with what to pass instead.

``identity`` is a string that changes whenever the token ids would: it keys the
token cache (datasets.py). ``default_tokenizer_name`` picks the tokenizer of a
checkpoint's config for the sampling and evaluation CLIs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..hub import hub_unreachable_hint
from .datasets import DataError

EOS_TEXT = "<|endoftext|>"
# Model token count -> the tokenizer with exactly that many ids, for checkpoints whose config names none.
TOKENIZER_BY_SIZE = {50257: "gpt2", 256: "bytes"}
INSTEAD = "pass a local tokenizer folder or 'bytes' (tokenizer=bytes / --tokenizer bytes)"


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    eos_token_id = 0
    identity = "bytes-utf8-eos0"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids)
        return EOS_TEXT.join(part.decode("utf-8", errors="replace") for part in data.split(b"\x00"))

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


class HFTokenizer:
    """A ``transformers`` tokenizer; ids exactly as the published data pipeline makes them."""

    def __init__(self, name_or_path: str):
        self.tok = _load_hf_tokenizer(name_or_path)
        if self.tok.eos_token_id is None:
            raise DataError(f"tokenizer {name_or_path!r} has no EOS token; documents need one as separator")
        self.name = name_or_path
        self.vocab_size = len(self.tok)
        self.eos_token_id = self.tok.eos_token_id
        backend = getattr(self.tok, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else repr(sorted(self.tok.get_vocab().items()))
        self.identity = f"hf-{hashlib.sha256(spec.encode()).hexdigest()[:16]}-{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


def _load_hf_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained`` with errors that say what is wrong, and no hub retries offline."""
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import; 'bytes' needs none

    path = Path(name_or_path).expanduser()
    if path.exists() or _looks_like_a_path(name_or_path):
        if not path.is_dir():
            what = "is a file; pass the folder that holds it" if path.exists() else "no such folder"
            raise DataError(f"could not load tokenizer {name_or_path!r}: {what} (a hub name, a local folder, "
                            f"or 'bytes')")
        return _from_pretrained(AutoTokenizer, str(path), name_or_path)
    try:  # the cache first: no network, no retries
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        pass
    hint = hub_unreachable_hint(f"tokenizer {name_or_path!r}", INSTEAD)
    if hint is not None:
        raise DataError(hint)
    return _from_pretrained(AutoTokenizer, name_or_path, name_or_path)


def _from_pretrained(auto, source: str, name: str):
    try:
        return auto.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise DataError(f"could not load tokenizer {name!r} (a hub name, a local folder, or 'bytes'): "
                        f"{' '.join(str(e).split())}") from e


def _looks_like_a_path(name: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything with a leading ``.``, ``/``, ``~`` or more
    slashes can only be a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def get_tokenizer(name: str):
    """'bytes' -> ByteTokenizer; otherwise a hub name or local folder -> HFTokenizer."""
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)


def tokenizer_mismatch(vocab_size: int, tokens: int, name, exact: bool) -> str | None:
    """Why a tokenizer of ``vocab_size`` ids does not fit a model of ``tokens`` real tokens, or None.

    Every id must be a model token (training, evaluation); ``exact``: also every model token an id
    (sampling decodes whatever the model writes). The one rule for the three CLIs, each of which
    raises its own error type with this message before any long work.
    """
    if vocab_size > tokens:
        return f"tokenizer {str(name)!r} has {vocab_size} ids but the model only {tokens} tokens"
    if exact and vocab_size < tokens:
        return f"the model has {tokens} tokens but tokenizer {str(name)!r} decodes only {vocab_size} ids"
    return None


def default_tokenizer_name(config) -> str:
    """The tokenizer of a model config (``RADDConfig``): its ``tokenizer`` entry when it has one
    (training writes it; a ``{name: ...}`` section also works), else by vocabulary size
    (``TOKENIZER_BY_SIZE``). Raises ValueError when neither applies."""
    name = config.extra.get("tokenizer") or TOKENIZER_BY_SIZE.get(config.tokens)
    if isinstance(name, dict):
        name = name.get("name")
    if name is None:
        raise DataError(f"the model has {config.tokens} tokens and its config names no tokenizer: pass --tokenizer")
    return str(name)
