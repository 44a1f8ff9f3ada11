"""Tokenizers behind one small interface: ``encode_batch``, ``decode``, ``vocab_size``, ``eos_token_id``.

- ``bytes``: UTF-8 bytes as tokens (256 ids); no files, no network. EOS is byte 0
  (NUL), which text does not contain; ``decode`` shows it as ``<|endoftext|>``.
- anything else: a Hugging Face tokenizer, by hub name (``gpt2``, the default) or
  local folder, loaded with ``transformers.AutoTokenizer``.

``identity`` is a string that changes whenever the token ids would: it keys the
token cache (datasets.py). ``default_tokenizer_name`` picks the tokenizer of a
checkpoint's config for the sampling and evaluation CLIs.
"""
from __future__ import annotations

import hashlib

EOS_TEXT = "<|endoftext|>"
# Model token count -> the tokenizer with exactly that many ids, for checkpoints whose config names none.
TOKENIZER_BY_SIZE = {50257: "gpt2", 256: "bytes"}


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
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load tokenizer {name_or_path!r} (a hub name, a local folder, or "
                             f"'bytes'): {e}") from e
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; documents need one as separator")
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


def get_tokenizer(name: str):
    """'bytes' -> ByteTokenizer; otherwise a hub name or local folder -> HFTokenizer."""
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)


def default_tokenizer_name(config) -> str:
    """The tokenizer of a model config (``RADDConfig``): its ``tokenizer`` entry when it has one
    (training writes it; a ``{name: ...}`` section also works), else by vocabulary size
    (``TOKENIZER_BY_SIZE``). Raises ValueError when neither applies."""
    name = config.extra.get("tokenizer") or TOKENIZER_BY_SIZE.get(config.tokens)
    if isinstance(name, dict):
        name = name.get("name")
    if name is None:
        raise ValueError(f"the model has {config.tokens} tokens and its config names no tokenizer: pass --tokenizer")
    return str(name)
