"""The COCO caption tokenization in pure Python: Stanford PTBTokenizer's rules, lowercased, punctuation dropped.

pycocoevalcap (the COCO caption evaluation) tokenizes every caption with the Java
``edu.stanford.nlp.process.PTBTokenizer`` of Stanford CoreNLP 3.4.1 (``-preserveLines -lowerCase``,
default options) and then drops the tokens of its punctuation list. `coco_tokenize` does the same
without Java. Like the Java one (a JFlex scanner), it is a longest-match lexer: at each position every
rule is tried, the longest match wins (trailing context counts towards the length, as in JFlex), ties
go to the earlier rule; each rule matches its own longest alternative (the ``regex`` module's POSIX
mode). The rules are those of the 3.4.1 lexer specification (``PTBLexer.flex`` at tag ``v3.4.1`` of
stanfordnlp/CoreNLP) with its default options, written anew: Penn Treebank escaping (brackets become
``-LRB-``, ``-RSB-``, ...; quotes ``` `` ``` and ``''``; en and em dashes ``--``; ``…`` and ``. . .``
``...``; ``€`` ``$``, ``£`` ``#``, ``½`` ``1/2``), contractions split ("don't" → "do n't", "it's" →
"it 's", "cannot" → "can not", "gonna" → "gon na"), hyphenated words, numbers ("1,000", "3.5",
"10:30"), fractions, slashed words ("black/white"), abbreviations with their period ("mr.", "u.s.",
"etc."), URLs and e-mail addresses kept whole; no British-to-American respelling, no escaping of
``/`` and ``*``; characters no rule takes are deleted.

As in pycocoevalcap, the captions of one call are tokenized as one text, one caption per line, so a
rule that looks past the end of a caption sees the next one, as the Java tokenizer does: a caption
ending "the letter A." gives "a" before a caption that starts "The ..." and "a." before one that
starts "a ..."; "no." keeps its period before a caption that starts with a digit. The tokens are then
lowercased (Java's ``toLowerCase(Locale.ENGLISH)``; Python's `str.lower` agrees but for a few special
cases), the tokens of pycocoevalcap's punctuation list dropped (`PUNCTUATION`; it spells ``-LRB-`` in
capitals, so the lowercased ``-lrb-`` of a parenthesis *stays*, as it does in the COCO evaluation),
and the rest split at whitespace as its CIDEr scorer splits them (the lexer joins "1 1/2" into one
token with a non-breaking space).

Known differences from the Java tokenizer (tests/test_metrics_caption_ocr.py compares the two on
realistic captions and on random text of ASCII, Latin letters and typographic punctuation):

- Line breaks inside a caption: pycocoevalcap replaces ``\\n`` by a space but hands ``\\r``,
  ``\\u2028``, ``\\u2029``, ``\\v`` and ``\\f`` to Java, which starts a new line at each, so every
  later caption is paired with the wrong image. Here they are spaces too.
- SGML/HTML character entities other than ``&amp;``, ``&apos;``, ``&quot;``, ``&lt;`` and ``&gt;``
  (``&mdash;``, ``&nbsp;``, ...) are read as the characters they are spelled with, and a tag whose
  quoted attribute value runs into the next caption is not one tag (Java joins the two lines).
- Letters and digits are today's Unicode (categories L* and Nd of the Basic Multilingual Plane, plus
  the lexer's extra letters: the soft hyphen, spacing modifiers and the combining marks of Latin,
  Greek, Cyrillic and several other scripts); the Java tables, from about Unicode 6, do not know
  letters added since (U+0528 and later in Cyrillic, new CJK ideographs, ...). Characters outside the
  Basic Multilingual Plane (emoji) are deleted, as in Java.

Example:
    >>> coco_tokenize(["A man's T-shirt (red) isn't cheap: $5.50!", 'Two dogs, "playing"...'])
    [['a', 'man', "'s", 't-shirt', '-lrb-', 'red', '-rrb-', 'is', "n't", 'cheap', '$', '5.50'], ['two', 'dogs', 'playing']]
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import NamedTuple

import regex

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after tokenizing (compared after lowercasing,
# so the capitalised bracket tokens never match and stay).
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Characters the Java lexer counts as letters besides Unicode's letters: the soft hyphen (removed
# from words), spacing modifiers, and combining marks of Latin, Greek, Cyrillic, Hebrew, Arabic,
# Syriac, N'Ko and Indic scripts (PTBLexer.flex 3.4.1, macro LETTER).
_MORE_LETTERS = (
    "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385\u03cf"
    "\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd\u05bf\u05c1"
    "\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f"
    "\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e"
    "\u0951-\u0955\u0962\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3"
    "\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd"
    "\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd"
)
# The lexer's DIGIT adds N'Ko digits, which Unicode's Nd already holds.

# Line breaks other than "\n" (Java starts a new line at each; see the module docstring).
_EXTRA_LINE_BREAKS = re.compile("[\r\u2028\u2029\x0b\x0c]")


def _char_class(predicate: Callable[[str], bool], extra: str = "") -> str:
    """A regex character class of the BMP characters for which ``predicate`` holds, plus ``extra``."""
    ranges, start, prev = [], None, None
    for code in range(0x10000):
        if predicate(chr(code)):
            if start is None:
                start = code
            prev = code
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    parts = [re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges]
    return "[" + "".join(parts) + extra + "]"


def _ci(text: str) -> str:
    """``text`` (a regex of literals and small classes) matched caselessly, as JFlex's %caseless
    treats literals: each ASCII letter becomes ``[xX]``, each letter in a class gets its other case.
    (Spelled out: the ``regex`` module mis-matches some alternations holding ``(?i:...)`` groups.)"""
    out, in_class, escaped = [], False, False
    for ch in text:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            out.append(ch)
            escaped = True
        elif ch == "[":
            out.append(ch)
            in_class = True
        elif ch == "]":
            out.append(ch)
            in_class = False
        elif ch.isascii() and ch.isalpha():
            out.append(ch.lower() + ch.upper() if in_class else f"[{ch.lower()}{ch.upper()}]")
        else:
            out.append(ch)
    return "(?:" + "".join(out) + ")"


def _alts(*parts: str) -> str:
    return "(?:" + "|".join(parts) + ")"


# ----------------------------------------------------------------------------- token actions
# An action gets the token text and returns (token or None, characters consumed); consuming fewer
# characters than the token has pushes the rest back to be lexed again (JFlex's yypushback).

_LATEX_QUOTES_RIGHT = [
    (re.compile("&apos;|'"), "'"),
    (re.compile('"|&quot;'), "''"),
]
_LATEX_QUOTES_LEFT = [
    (re.compile("&apos;|'"), "`"),
    (re.compile('"|&quot;'), "``"),
]
_LATEX_QUOTES_UNICODE = [
    (re.compile("[\u0091\u2018\u201b\u2039]"), "`"),
    (re.compile("[\u0092\u2019\u203a]"), "'"),
    (re.compile("[\u0093\u201c\u00ab]"), "``"),
    (re.compile("[\u0094\u201d\u00bb]"), "''"),
]


def _quotes(text: str, probably_left: bool) -> str:
    """LaTeX-style quotes: ASCII quotes by the side they are probably on, curly ones by their shape."""
    for pattern, replacement in (_LATEX_QUOTES_LEFT if probably_left else _LATEX_QUOTES_RIGHT) + _LATEX_QUOTES_UNICODE:
        text = pattern.sub(replacement, text)
    return text


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}


def _whole(text: str) -> tuple[str, int]:
    return text, len(text)


def _normalized(fn: Callable[[str], str]) -> Callable[[str], tuple[str, int]]:
    return lambda text: (fn(text), len(text))


def _keep(n: int) -> Callable[[str], tuple[str, int]]:
    """Emit the first ``n`` characters and lex the rest again."""
    return lambda text: (text[:n], n)


def _with_period_again(text: str) -> tuple[str, int]:
    """An abbreviation with its period, then the period again as its own token (sentence end)."""
    return text, len(text) - 1


def _acronym_before_sentence(text: str) -> tuple[str, int]:
    """An acronym before a new sentence: "U.S." then its period again; "I." only the letter."""
    return (text[:-1], 1) if len(text) == 2 else (text, len(text) - 1)


def _no_soft_hyphens(text: str) -> str:
    return text.replace("\u00ad", "") or "-"


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


def _currency(text: str) -> str:
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", text.replace("\u00a2", "cents").replace("\u00a3", "#"))


def _skip(text: str) -> tuple[None, int]:
    return None, len(text)


_AMP = re.compile("&amp;", re.IGNORECASE)
_NEWLINE_TOKEN = "\n"


def _newline(text: str) -> tuple[str, int]:
    return _NEWLINE_TOKEN, len(text)


# ----------------------------------------------------------------------------- the rules


class _Across(str):
    """A rule pattern whose token or trailing context can run past the end of its line (other rules
    are matched within the line: the ``regex`` module can scan to the end of the text otherwise)."""


class _Rule(NamedTuple):
    pattern: regex.Pattern[str]  # group "t" is the token where there is trailing context
    action: Callable[[str], tuple[str | None, int]]
    across_lines: bool


@functools.cache
def _rules() -> list[_Rule]:
    """The lexer rules in priority order. A pattern with trailing context (JFlex ``r/s``: matched and
    counted for the length, not consumed) names its token group ``t``."""
    letter_l = _char_class(lambda c: unicodedata.category(c).startswith("L"))  # JFlex [:letter:]
    letter = _char_class(lambda c: unicodedata.category(c).startswith("L"), _MORE_LETTERS)  # the lexer's LETTER
    digit = _char_class(lambda c: unicodedata.category(c) == "Nd")
    upper = _char_class(lambda c: unicodedata.category(c) == "Lu")

    space = "[ \t\u00a0\u2000-\u200a\u3000]"
    newline = "(?:\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
    spacenl = f"(?:{space}|{newline})"
    apos = _alts("['\u0092\u2019]", _ci("&apos;"))
    apos_etc = _alts(apos, "[`\u0091\u2018\u201b]")  # also found inside words
    sgml = (
        r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
        r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^'\n]*'|\"[^\"\n]*\")))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>"
    )
    sentend = f"(?:{spacenl}(?:{spacenl}|{upper}|{sgml}))"
    word = f"{letter}(?:{letter}|{digit})*(?:[.!?]{letter}(?:{letter}|{digit})*)*"
    redaux = apos + _ci("[msd]|re|ve|ll")
    sword = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"  # cannot end in "n": "do|n't"
    sredaux = _ci("n") + apos_etc + _ci("t")
    apoword = _alts(
        apos + _ci("n") + apos + "?",
        "[lLdDjJ]" + apos,
        _ci("dunkin") + apos,
        _ci("somethin") + apos,
        _ci("ol") + apos,
        apos + _ci("em"),
        f"[A-HJ-XZn]{apos_etc}{letter_l}{{2,}}",
        apos + "[2-9]0" + _ci("s"),
        apos + _ci("till?"),
        f"{letter_l}+[aeiouyAEIOUY]{apos_etc}[aeiouA-Z]{letter_l}*",
        apos + _ci("cause"),
        _ci(r"cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l"),
        _ci("o") + apos_etc + _ci("o"),
    )
    url_end = '[^ \t\n\f\r"<>|.!?(){},-]'
    full_url = _ci("https?://") + '[^ \t\n\f\r"<>|(){}]+' + url_end
    likely_url = (
        _alts(
            _ci("www") + r"\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}",
            # The class excludes "," to "_" as a range (digits and capitals too), as in the original.
            "(?:[^ \t\n\f\r\"`'<>|.!?(){}\x2c-\x5f$]+\\.)+" + _ci("com|net|org|edu"),
        )
        + '(?:/[^ \t\n\f\r"<>|()]+'
        + url_end
        + ")?"
    )
    email_part = '[^ \t\n\f\r"<>|(){}.\u00a0]+'
    email = (
        f'(?:{_ci("&lt;")}|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0{{}}]*@(?:{email_part}\\.)*{email_part}'
        f"(?:{_ci('&gt;')}|>)?"
    )
    twitter = f"@[a-zA-Z_][a-zA-Z_0-9]*|#{letter}+"
    number = f"[-+]?(?:{digit}*(?:[.:,\u00ad\u066b\u066c]{digit}+)+|{digit}+)"
    frac = f"(?:{digit}{{1,4}}[- \u00a0])?{digit}{{1,4}}(?:\\\\?/|\u2044){digit}{{1,4}}"
    tbspec = _alts(
        "-" + _ci("rrb|lrb|rcb|lcb|rsb|lsb") + "-",
        _ci(r"c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls"),
        _ci("cap") + apos + _ci("n"),
        _ci("c") + apos + _ci("est"),
    )
    thing3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    acro_names = _ci(r"(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r)")
    acro = _alts(r"[A-Za-z](?:\.[A-Za-z])*", acro_names)
    acro2 = _alts(r"[A-Za-z](?:\.[A-Za-z])+", acro_names)
    # Capitalised words after which an acronym's period also ends the sentence (first letter as written).
    sentence_starts = "|".join(
        f"{w[0]}{_ci(w[1:])}" if len(w) > 1 else w
        for w in (
            "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
            r"Mr\. Ms\. Now Once One Other Our She Since So Some Such That The Their Then There These They This We "
            "When While What Yet You"
        ).split()
    )
    # Abbreviations usually followed by a lower-case word (a capital after them starts a sentence).
    abbrev1 = (
        _alts(
            _ci("jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"),
            _ci("mon|tue|tues|wed|thu|thurs|fri"),
            _ci("ala|ariz"),
            "A" + _ci("z"),
            "A" + _ci("rk"),
            _ci("calif|colo|conn|ct|dak"),
            "D" + _ci("el"),
            _ci("fla|ga"),
            "I" + _ci("ll"),
            _ci("ind|kans?|ky"),
            "L" + _ci("a"),
            "M" + _ci("ass"),
            _ci("md|mich|minn"),
            "M" + _ci("iss"),
            _ci("mo|mont|neb|nev|okla"),
            "O" + _ci("re"),
            "P" + _ci("a"),
            _ci("penn|tenn"),
            "T" + _ci("ex"),
            _ci("va|vt"),
            "W" + _ci("ash"),
            _ci("wisc?|wyo"),
            _ci("inc|cos?|corp"),
            _ci("pp?t") + "[ye]" + _ci("s?"),
            _ci("ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys"),
            _ci("tel|est|ext|sq"),
            _ci(r"jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq"),
            _ci("etc|al|seq|bldg"),
        )
        + r"\."
    )
    abtitle = _alts(
        _ci("mr|mrs|ms"),
        "M" + _ci("iss"),
        _ci(
            "drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|ste?|ave|pres"
            "|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc"
        ),
    )
    abcomp2 = _alts(_ci("invt|elec|natl|dept"), _ci("m") + "[ft]" + _ci("g"))
    abbrev4 = _alts(abtitle, _ci(r"vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph"), acro, abcomp2)
    abbrev3 = _ci(r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\.")
    filename = f"(?:{letter}|{digit})+(?:\\.(?:{letter}|{digit})+)*\\." + _ci(
        "(?:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl"
        "|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)"
    )
    insentp = "[,;:\u3001]"
    phone = (
        r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])[0-9]{3,4}"
        r"[\- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
    )
    dblquot = '(?:"|' + _ci("&quot;") + ")"
    smiley = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
    asian_smiley = _alts(
        r"[\^x=~<>]\.\[\^" + _ci("x") + r"=~<>\]",  # a character class mis-escaped in the original
        r"[\-\^x=~<>']_[\-\^x=~<>']",
        r"\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)",
        r"\([\^x=~<>']-[\^x=~<>'`]\)",
    )
    hthing = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{acro2}\\.))+"
    alnum_l = f"(?:{letter_l}|{digit})"
    thing_part = f"(?:[dDoOlL]{apos_etc}{alnum_l})?{alnum_l}+"
    thing = f"{thing_part}(?:[-_\u058a\u2010\u2011]{thing_part})*"
    thinga = "[A-Z]+(?:(?:[+&]|" + _ci("&amp;") + ")[A-Z]+)+"
    quotes = _alts(
        apos,
        "''",
        "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}",
    )
    misc_symbol = (
        "[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3"
        "\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8"
        "\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f"
        "\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40"
        "\uff5b-\uff65]"
    )
    amp = _normalized(lambda t: _AMP.sub("&", t))
    right_quotes = _normalized(lambda t: _quotes(t, False))
    left_quotes = _normalized(lambda t: _quotes(t, True))
    unhyphenated = _normalized(_no_soft_hyphens)

    rules: list[tuple[str, Callable[[str], tuple[str | None, int]]]] = [
        (_ci(r"c\+\+|[cf]#"), _whole),
        (_ci("cannot"), _keep(3)),  # can|not
        ("'" + _ci("twas"), _keep(2)),  # 't|was
        ("'" + _ci("tis"), _keep(2)),
        (_ci("gonna|gotta|lemme|gimme|wanna"), _keep(3)),  # gon|na
        (sgml, _normalized(_nbsp)),
        ("[\u0096\u0097\u2013\u2014\u2015]|" + _ci("&(?:md|mdash|ndash);"), _normalized(lambda t: "--")),
        (_ci("&amp;"), amp),
        (_ci("&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);"), _whole),
        (f"(?P<t>{word}){redaux}", unhyphenated),
        (f"(?P<t>{sword}){sredaux}", unhyphenated),
        (word, unhyphenated),
        (apoword, _whole),
        (f"(?P<t>{_ci('y')}{apos}){letter_l}", _whole),
        (full_url, _whole),
        (likely_url, _whole),
        (email, _whole),
        (twitter, _whole),
        (_Across(f"(?P<t>{redaux})[^A-Za-z]"), right_quotes),
        (_Across(f"(?P<t>{sredaux})[^A-Za-z]"), right_quotes),
        (f"{digit}{{1,2}}[-/]{digit}{{1,2}}[-/]{digit}{{2,4}}", _whole),  # dates
        (number, unhyphenated),
        ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", _whole),
        (frac, _normalized(_nbsp)),
        ("[\u00bc\u00bd\u00be\u2153-\u215e]", _normalized(lambda t: _FRACTIONS.get(t, t))),
        (tbspec, amp),
        (thing3, _whole),
        (r"[A-Z]*\$|#", _whole),
        (
            "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
            _normalized(_currency),
        ),
        (_Across(f"(?P<t>{acro}\\.){spacenl}+(?:{sentence_starts}|{sgml}){spacenl}"), _acronym_before_sentence),
        (_Across(f"(?P<t>{abbrev3}){spacenl}?{digit}"), _whole),
        (f"(?P<t>{_ci('pt')}[eyEY]\\.|{_ci('co')}\\.){space}{_ci('ltd|lim')}", _whole),
        (_Across(f"(?P<t>{abbrev1}){sentend}"), _with_period_again),
        (_Across(f"(?P<t>{abbrev1})(?s:..)"), _whole),
        (abbrev1, _with_period_again),
        (abbrev4 + r"\.", _whole),
        (f"(?P<t>{abbrev4}){space}", _whole),
        (_Across(f"(?P<t>{acro}){spacenl}"), _whole),
        (_Across(f"(?P<t>{apos}[0-9][0-9]){spacenl}"), _whole),
        (_Across(f"(?P<t>{filename})(?:{spacenl}|[.?!,])"), _whole),
        (f"(?P<t>{word}\\.){insentp}", unhyphenated),
        (phone, _normalized(lambda t: _parens(_nbsp(t)))),
        (f"(?P<t>{dblquot})[A-Za-z0-9$]", left_quotes),
        (dblquot, right_quotes),
        ("\x7f", _skip),
        ("<|" + _ci("&lt;"), _normalized(lambda t: "<")),
        (">|" + _ci("&gt;"), _normalized(lambda t: ">")),
        (_Across(f"(?P<t>{smiley})[^A-Za-z0-9]"), _normalized(_parens)),
        (asian_smiley, _normalized(_parens)),
        (r"[(){}\[\]]", _normalized(_BRACKETS.__getitem__)),
        ("-+", _normalized(lambda t: "--" if 3 <= len(t) <= 4 else t)),
        ("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", _normalized(lambda t: "...")),
        ("@+|#+|_+", _whole),
        (r"\*+|(?:\\\*){1,3}", _whole),
        (insentp, _whole),
        ("[?!]+", _whole),
        ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", _whole),
        ("=", _whole),
        ("/", _whole),
        (f"(?P<t>{hthing}\\.){insentp}", unhyphenated),
        (hthing, unhyphenated),
        (f"(?P<t>{thing}\\.){insentp}", _whole),
        (thing, _whole),
        (f"(?P<t>{thinga}\\.){insentp}", amp),
        (thinga, amp),
        ("(?P<t>')[A-Za-z][^ \t\n\r\u00a0]", left_quotes),
        (redaux, right_quotes),
        (sredaux, right_quotes),
        (quotes, right_quotes),
        ("<<|>>", _whole),
        (misc_symbol, _whole),
        ("\x00|" + space + "+|[\u200b\u200e\u200f\ufeff]", _skip),
        (_Across(newline), _newline),
        (_ci("&nbsp;"), _skip),
        (".", _skip),  # untokenizable: deleted
    ]
    # POSIX mode: each rule matches its longest alternative, as a JFlex DFA does (re would take the first).
    flags = regex.POSIX | regex.VERSION0
    return [_Rule(regex.compile(pattern, flags), action, isinstance(pattern, _Across)) for pattern, action in rules]


@functools.lru_cache(maxsize=4096)
def _rules_starting_with(char: str) -> list[_Rule]:
    """The rules a match of which can start with ``char`` (a partial match of ``char`` alone), in order."""
    return [rule for rule in _rules() if rule.pattern.match(char, partial=True) is not None]


# Fast paths for the commonest input, equal to the rules: a run of ASCII letters before a space, a
# tab, a line end or the end is one token (only the splitting rules below, and rules that need an
# apostrophe, a period, "+" or "#" after letters, could match otherwise); a run of spaces and tabs is skipped.
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \t\n]|\Z)")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
_BLANKS = re.compile("[ \t]+")


def _lex(text: str, line_bounded: bool = True) -> list[str]:
    """The raw tokens of ``text`` (before lowercasing), newlines as ``_NEWLINE_TOKEN``.

    ``line_bounded=False`` matches every rule against the rest of the whole text (slow; the tests
    check that it changes nothing)."""
    rules = _rules()
    tokens, pos, end = [], 0, len(text)
    line_end = -1
    while pos < end:
        if line_bounded:
            if (m := _BLANKS.match(text, pos)) is not None:
                pos = m.end()
                continue
            if (m := _PLAIN_WORD.match(text, pos)) is not None and m.group().lower() not in _SPLIT_WORDS:
                tokens.append(m.group())
                pos = m.end()
                continue
        if line_end < pos:
            line_end = text.find("\n", pos) if line_bounded else -1
            line_end = end if line_end < 0 else line_end
        best_len, best = 0, None
        for rule in _rules_starting_with(text[pos]) if line_bounded else rules:
            m = rule.pattern.match(text, pos, end if rule.across_lines else line_end)
            if m is not None and m.end() - pos > best_len:
                best_len, best = m.end() - pos, (m, rule.action)
        if best is None:  # "." takes any character but "\n", and the newline rule takes that
            raise AssertionError(f"no rule matches {text[pos]!r}")  # pragma: no cover
        m, action = best
        token, consumed = action(m.group("t") if "t" in m.re.groupindex else m.group())
        if token is not None:
            tokens.append(token)
        pos += consumed
    return tokens


def coco_tokenize(captions: Sequence[str]) -> list[list[str]]:
    """Tokenizes captions as the COCO caption evaluation (pycocoevalcap's ``PTBTokenizer``) does.

    Stanford PTBTokenizer 3.4.1's rules in pure Python (see the module docstring), lowercased, the
    tokens of `PUNCTUATION` dropped, the rest split at whitespace. All captions are tokenized as one
    text, one per line, in the order given, as pycocoevalcap does per call: pass the references of
    the whole evaluation set in one call and the predictions in another for its exact tokens.

    Args:
        captions: The captions; line breaks inside one become spaces.

    Returns:
        One list of tokens per caption.

    Example:
        >>> coco_tokenize(["The dog's ball, isn't it?", "A  Red T-shirt."])
        [['the', 'dog', "'s", 'ball', 'is', "n't", 'it'], ['a', 'red', 't-shirt']]
    """
    text = "\n".join(_EXTRA_LINE_BREAKS.sub(" ", c.replace("\n", " ")) for c in captions)
    lines: list[list[str]] = [[]]
    for token in _lex(text):
        if token == _NEWLINE_TOKEN:
            lines.append([])
        elif (lowered := token.lower()) not in PUNCTUATION:
            lines[-1].extend(lowered.split())
    if len(lines) != len(captions) and captions:
        raise AssertionError(f"tokenized {len(lines)} lines from {len(captions)} captions")  # pragma: no cover
    return lines if captions else []
