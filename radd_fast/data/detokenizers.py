"""Detokenizers for the evaluation corpora: the published data pipeline's rules, in order.

WikiText, PTB and One Billion Words are stored pre-tokenised ("don 't", " @-@ ",
"( word )"); the published evaluation undoes that before GPT-2 tokenisation, and
the reported perplexities depend on it. Each detokenizer is an ordered list of
rules, applied top to bottom: a plain string rule is ``str.replace``, a rule
marked ``RE`` is ``re.sub``.
"""
from __future__ import annotations

import hashlib
import re

RE = "re"


def _apply(rules, text: str) -> str:
    for rule in rules:
        if rule[0] == RE:
            text = re.sub(rule[1], rule[2], text)
        else:
            text = text.replace(rule[0], rule[1])
    return text


WIKITEXT_RULES = [
    # contractions
    ("s '", "s'"),
    (RE, r"/' [0-9]/", r"/'[0-9]/"),
    # number separators: 1 @,@ 000 -> 1,000
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    # punctuation
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    # brackets and quotes hug their content
    (RE, r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    (RE, r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (RE, r"{\s*([^}]*?)\s*}", r"{\1}"),
    (RE, r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (RE, r"'\s*([^']*?)\s*'", r"'\1'"),
    # section headings, degrees, line edges, numbers, possessives
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]

PTB_RULES = [
    # contractions and possessives re-attach
    (" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"),
    # a line break surrounded by spaces, escaped slashes
    (" \n ", "\n"), ("\\/", "/"),
    # PTB writes every number as N; ten passes so runs like "N N N" all become 1
    *[(" N ", " 1 ")] * 10,
    ("$ 1", "$1"), ("# 1", "#1"),
    ("<unk>", "?"),
]

LM1B_RULES = [
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (RE, r" '(\w+)", r"'\1"),
    (RE, r" (\w+) \. ", r" \1. "),
    (RE, r" (\w+) \.$", r" \1."),
    (" ? ", "? "), (RE, r" \?$", "?"),
    (" ! ", "! "), (RE, r" \!$", "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (RE, r"\" ([^\"]+) \"", r'"\1"'),
    (RE, r"' ([^']+) '", r"'\1'"),
    (RE, r"\( ([^\(\)]+) \)", r"(\1)"),
    (RE, r"\[ ([^\[\]]+) \]", r"[\1]"),
    ("$ ", "$"), ("\N{POUND SIGN} ", "\N{POUND SIGN}"),
]


def wikitext_detokenizer(text: str) -> str:
    return _apply(WIKITEXT_RULES, text)


def ptb_detokenizer(text: str) -> str:
    return _apply(PTB_RULES, text)


def lm1b_detokenizer(text: str) -> str:
    return _apply(LM1B_RULES, text)


def lambada_detokenizer(text: str) -> str:
    """Curly double quotes to straight ones; the passage starts on a new line."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.strip()


RULES_OF = {"wikitext_detokenizer": WIKITEXT_RULES, "ptb_detokenizer": PTB_RULES, "lm1b_detokenizer": LM1B_RULES}


def detokenizer_identity(detok) -> str:
    """Name plus a digest of its rules: keys the token cache, so a corrected rule re-tokenises."""
    rules = RULES_OF.get(detok.__name__)
    if rules is None:
        return detok.__name__
    return f"{detok.__name__}-{hashlib.sha256(repr(rules).encode()).hexdigest()[:8]}"


DETOKENIZERS = {
    "wikitext103": wikitext_detokenizer,
    "wikitext2": wikitext_detokenizer,
    "ptb": ptb_detokenizer,
    "lm1b": lm1b_detokenizer,
    "lambada": lambada_detokenizer,
}
