"""Data: tokenizers, the published detokenizers, token-block datasets and a resumable sharded loader."""
from .datasets import HF_CORPORA, DataError, TokenBlocks, load_blocks, load_token_stream
from .detokenizers import DETOKENIZERS, lambada_detokenizer, lm1b_detokenizer, ptb_detokenizer, wikitext_detokenizer
from .loader import ResumableLoader, check_batch_split
from .tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer

__all__ = ["HF_CORPORA", "DataError", "TokenBlocks", "load_blocks", "load_token_stream", "DETOKENIZERS",
           "lambada_detokenizer", "lm1b_detokenizer", "ptb_detokenizer", "wikitext_detokenizer",
           "ResumableLoader", "check_batch_split", "ByteTokenizer", "HFTokenizer", "get_tokenizer"]
