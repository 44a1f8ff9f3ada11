"""The published detokenizers (radd_fast/data/detokenizers.py), rule by rule, on inputs written for
each rule and on a sentence of each corpus; and the cache key that follows the rules.

Expected strings follow from the published rules as they read, quirks included (a regex
WikiText rule that only matches a literal "/' <digit>/", PTB numbers written as 1)."""
from __future__ import annotations

import pytest

from radd_fast.data import lambada_detokenizer, lm1b_detokenizer, ptb_detokenizer, wikitext_detokenizer
from radd_fast.data.detokenizers import detokenizer_identity

WIKITEXT = [
    ("the players ' union", "the players' union"),
    ("a/' 5/b", "a/'[0-9]/b"),  # the published regex matches only this literal shape
    ("well @-@ known", "well-known"),
    ("1 @,@ 000", "1,000"),
    ("3 @.@ 5", "3.5"),
    ("note : this ; that . Then ! Why ? So , yes", "note: this; that. Then! Why? So, yes"),
    ("in the ( old city )", "in the (old city)"),
    ("see [ 1 ] and { x }", "see [1] and {x}"),
    ('he said " hello there " loudly', 'he said "hello there" loudly'),
    ("the ' quoted ' word", "the 'quoted' word"),
    (" = = = Career = = = \n", " === Career ===\n"),
    (" = = = = Deep = = = = \n", " ==== Deep ====\n"),
    (" = Title = \n", " = Title =\n"),
    ("20 \u00b0 C", "20\u00b0C"),
    ("end \n start", "end\nstart"),
    ("in N years", "in 1 years"),
    ("the city 's walls", "the city's walls"),
]

PTB = [
    ("the company 's stock", "the company's stock"),
    ("the investors ' money", "the investors' money"),
    ("he does n't know", "he doesn't know"),
    ("first \n second", "first\nsecond"),
    ("a 1\\/2 share", "a 1/2 share"),
    ("about N shares", "about 1 shares"),
    ("rose N N N points", "rose 1 1 1 points"),  # overlapping runs: the rule is applied ten times
    ("costs $ N million", "costs $1 million"),
    ("item # N here", "item #1 here"),
    ("the <unk> fell", "the ? fell"),
]

LM1B = [
    ("see http : / / example.com now", "see http://example.com now"),
    ("see https : / / example.com now", "see https://example.com now"),
    ("it 's fine", "it's fine"),
    ("the end . Next one", "the end. Next one"),
    ("the very end .", "the very end."),
    ("why ? because", "why? because"),
    ("really ?", "really?"),
    ("wow ! nice", "wow! nice"),
    ("stop !", "stop!"),
    ("a , b : c ; d / e", "a, b: c; d/e"),
    ('he said " it is fine " today', 'he said "it is fine" today'),
    ("the ' best ' one", "the 'best' one"),
    ("a ( small ) note", "a (small) note"),
    ("a [ tiny ] note", "a [tiny] note"),
    ("pay $ 5 or \u00a3 3", "pay $5 or \u00a33"),
]

@pytest.mark.parametrize("text, expected", WIKITEXT)
def test_wikitext_rules(text, expected):
    assert wikitext_detokenizer(text) == expected

@pytest.mark.parametrize("text, expected", PTB)
def test_ptb_rules(text, expected):
    assert ptb_detokenizer(text) == expected

@pytest.mark.parametrize("text, expected", LM1B)
def test_lm1b_rules(text, expected):
    assert lm1b_detokenizer(text) == expected

def test_lambada_straightens_quotes_and_starts_a_line():
    assert lambada_detokenizer("  \u201cCome in,\u201d she said.  ") == '\n"Come in," she said.'
    assert lambada_detokenizer("plain") == "\nplain"


def test_each_detokenizer_on_a_sentence_of_its_corpus():
    assert wikitext_detokenizer(" = = Early life = = \n") == " == Early life ==\n"
    assert wikitext_detokenizer("1 @,@ 000 people , in the ( old city ) . It 's 3 @.@ 5 m") == \
        "1,000 people, in the (old city). It's 3.5 m"
    assert ptb_detokenizer("he does n't pay $ 1 million") == "he doesn't pay $1 million"
    assert ptb_detokenizer("about N shares") == "about 1 shares"  # published: " N " -> " 1 "
    assert lm1b_detokenizer('He said : " it is fine " , then left .') == 'He said: "it is fine", then left.'
    assert lm1b_detokenizer("see http : / / example.com ( now ) !") == "see http://example.com (now)!"
    assert lambada_detokenizer("  \u201cHi,\u201d she said.  ") == '\n"Hi," she said.'


def test_cache_key_follows_the_rules():
    """A corrected rule must re-tokenise: the cache key carries a digest of the rules."""
    ident = detokenizer_identity(ptb_detokenizer)
    assert ident.startswith("ptb_detokenizer-") and ident != detokenizer_identity(wikitext_detokenizer)
    assert detokenizer_identity(lambada_detokenizer) == "lambada_detokenizer"
