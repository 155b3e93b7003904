"""The PTB tokenisation of the COCO caption evaluation, re-stated in pure Python.

The COCO caption evaluation (Chen et al. 2015, "Microsoft COCO Captions: Data Collection and Evaluation
Server"; the ``pycocoevalcap`` package) tokenises every caption with the Stanford PTBTokenizer of
CoreNLP 3.4.1, run as ``PTBTokenizer -preserveLines -lowerCase`` over all captions of one call joined by
newlines, then drops the tokens in its punctuation list (:data:`PUNCTUATIONS`). This module reproduces
that pipeline without Java:

* a longest-match lexer (ties go to the earlier rule, and trailing context counts towards the match
  length, as in JFlex) over the rule subset of CoreNLP's ``PTBLexer.flex`` that English captions use:
  words and clitics (``'s 're 've 'll 'd 'm n't``, ``cannot``, ``gonna``), hyphenated and alphanumeric
  words, ``AT&T``-style words, numbers, fractions, dates, abbreviations and acronyms (the sentence-final
  period doubled before an upper-case word or one of the lexer's sentence-opening words), URLs and
  e-mail addresses, emoticons, quotes (LaTeX style), brackets, dashes, ellipses and the other symbols;
* 3.4.1's defaults as measured on its jar: no British→American rewriting, no ``\\/`` escaping, ``[`` →
  ``-LSB-``, ``{`` → ``-LCB-``, ``<`` kept, composed fractions spelled (``½`` → ``1/2``), currency
  symbols mapped (``£`` → ``#``), characters outside the Basic Multilingual Plane deleted;
* lower-casing *after* normalisation, so brackets come out as ``-lrb-``; the reference's punctuation list
  is upper-case and therefore keeps them (a quirk we reproduce).

Captions are lexed as one newline-joined stream, like the reference, because an abbreviation at the end
of one caption is split when the next caption starts with a capital letter (``"Inc."`` → ``inc. .``).

Scope: the lexer is checked token for token against the jar on the caption set of
``tests/test_caption_eval.py`` (and on ~11k captions of its generator); constructs outside these rules
(dotted words such as ``ab.cd.``, HTML entities, phone numbers, the rarer apostrophe words of the flex
file) may tokenise differently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = ["PUNCTUATIONS", "coco_tokenize", "ptb_tokenize"]

#: Tokens pycocoevalcap removes after tokenisation (compared case-sensitively, after lower-casing).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# --- character classes (JFlex %caseless does not expand inside classes, so [A-Z] stays upper-case) ---
# A Unicode letter: Python's \w also takes numeric characters such as "½" and "²", which are not letters.
_NUMERIC = "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff"
_L = f"[^\\W\\d_{_NUMERIC}]"
_LD = f"(?:{_L}|\\d)"  # a letter or digit
_APOS = "['\u0092\u2019]"
_APOSX = "['\u0092\u2019\u0091\u2018\u201b]"
_REDAUX = _APOS + r"(?:[msdMSD]|(?i:re|ve|ll))"
_SREDAUX = "(?i:n)" + _APOSX + "(?i:t)"
_SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
_NEWLINE = "(?:\r\n|[\r\n\u2028\u2029\u000b\u000c\u0085])"
_SPACENL = f"(?:{_SPACE}|{_NEWLINE})"
_SGML = r"</?[A-Za-z!][^>]*>"
_SENTEND = f"{_SPACENL}(?:{_SPACENL}|[A-Z]|{_SGML})"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_ABMONTH = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec"
_ABDAYS = "Mon|Tues|Tue|Wed|Thurs|Thu|Fri"
_ABSTATE = (
    "Ala|Ariz|Ark|Calif|Colo|Conn|Dak|Del|Fla|Ga|Ill|Ind|Kans|Kan|Ky|La|Mass|Md|Mich|Minn|Miss|Mo|Mont|"
    "Neb|Nev|Okla|Ore|Pa|Penn|Tenn|Tex|Va|Vt|Wash|Wisc|Wis|Wyo"
)
_ABCOMP = "Inc|Cos|Co|Corp|Pptys|Ppty|Ptys|Pty|Ltd|Plc|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys"
_ABNUM = "Nos|No|Prop|Ph|tel|est|ext|sq|ft"
_ABPTIT = r"Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq"
_ABBREV1 = f"(?i:{_ABMONTH}|{_ABDAYS}|{_ABSTATE}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|etc|al|seq)\\."
_ABTITLE = (
    "Mrs|Mr|Ms|Miss|Drs|Dr|Profs|Prof|Sens|Sen|Reps|Rep|Attys|Atty|Lt|Col|Gen|Messrs|Govs|Gov|Adm|Rev|"
    "Maj|Sgt|Cpl|Pvt|Mt|Capt|Ste|St|Ave|Pres|Lieut|Hon|Brig|Comdr|Cmdr|Pfc|Spc|Supts|Supt|Det"
)
_ABBREV4 = (
    f"(?:{_ACRO}|(?i:a\\.k\\.a|{_ABTITLE}|vs|Alex|Wm|Jos|Cie|cf|TREAS|Invt|Elec|Natl|Mfg|Mtg)|[A-Za-z])"
)
# Words after which an acronym's period also ends the sentence: the first letter must be upper-case, the
# rest is caseless (JFlex %caseless does not reach into the rule's one-letter classes).
_ACRONYM_NEXT = "|".join(
    word[0] + "(?i:" + word[1:] + ")" if len(word) > 1 else word
    for word in (
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many "
        r"More Mr\. Ms\. Now Once One Other Our She Since So Some Such That The Then There These They This "
        "We When While What Yet You"
    ).split()
)
_HYPHEN = "[-_\u058a\u2010\u2011]"
_THING_PART = f"(?:[dDoOlL]{_APOSX}{_LD})?{_LD}+"
_THING = f"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{_ACRO}\.))+"
_NUM = r"[-+]?(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)"
_APOWORD = (
    f"{_APOS}n{_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin|somethin|ol){_APOS}|{_APOS}(?i:em)"
    f"|[A-HJ-XZn]{_APOSX}{_L}{{2,}}|{_APOS}[2-9]0s|{_APOS}(?i:till|til)"
    f"|{_L}+[aeiouyAEIOUY]{_APOSX}[aeiouA-Z]{_L}*|{_APOS}(?i:cause)"
    r"|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"
)
_URL_END = '[^ \t\n\f\r"<>|.!?(){},-]'
_FULLURL = f'https?://[^ \t\n\f\r"<>|()]*{_URL_END}'
_LIKELYURL = (
    '(?:(?:www\\.(?:[^ \t\n\f\r"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4})'
    "|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},_$-]+\\.)+(?:com|net|org|edu)))"
    f'(?:/[^ \t\n\f\r"<>|()]*{_URL_END})?'
)
_EMAIL = '[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0]*@(?:[^ \t\n\f\r"<>|().\u00a0]+\\.)+[a-zA-Z]{2,4}'
_QUOTES = f"{_APOS}|''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{{1,2}}"
_SPLIT_WORDS = re.compile(r"(?i:gonna|wanna|gotta|lemme|gimme)")


def _latex_quotes(text: str, left: bool) -> str:
    """PTB3 quote normalisation: straight quotes by position, curly ones by shape."""
    text = text.replace("'", "`" if left else "'").replace('"', "``" if left else "''")
    text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203a]", "'", text)
    text = re.sub("[\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


def _hyphens(text: str) -> str:
    return "--" if len(text) in (3, 4) else text


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u0080": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# Each rule: (token pattern, trailing-context pattern or None, action). The action maps the matched token
# text to (emitted text or None, characters consumed); None means the characters are skipped.
_Action = Callable[[str], "tuple[str | None, int]"]


def _emit(text: str) -> tuple[str | None, int]:
    return text, len(text)


def _emit_as(fn: Callable[[str], str]) -> _Action:
    return lambda text: (fn(text), len(text))


def _skip(text: str) -> tuple[str | None, int]:
    return None, len(text)


def _word(text: str) -> tuple[str | None, int]:
    if _SPLIT_WORDS.fullmatch(text):  # gonna → gon na, as the 3.4.1 jar does
        return text[:3], 3
    return text.replace("\u00ad", ""), len(text)


def _period_back(text: str) -> tuple[str | None, int]:
    # An abbreviation ending a sentence: emit it with its period, and lex the period again.
    return text, len(text) - 1


_RULES: list[tuple[str, str | None, _Action]] = [
    ("(?i:cannot)", None, lambda text: (text[:3], 3)),
    (_SGML, None, _emit),
    ("&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _emit_as(lambda t: "--")),
    ("(?i:&amp;)", None, _emit_as(lambda t: "&")),
    (f"{_L}+", _REDAUX, _word),
    ("[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", _SREDAUX, _emit),
    (f"{_L}+", None, _word),
    (f"y{_APOS}", _L, _emit),
    (_APOWORD, None, _emit),
    (f"{_APOS}(?i:t)", f"(?i:is|was){_SPACENL}", _emit),
    ("@[A-Za-z_][A-Za-z_0-9]*|#[A-Za-z_][A-Za-z_0-9]*", None, _emit),
    (_FULLURL, None, _emit),
    (_LIKELYURL, None, _emit),
    (_EMAIL, None, _emit),
    (_REDAUX, "[^A-Za-z]", _emit_as(lambda t: _latex_quotes(t, False))),
    (_SREDAUX, None, _emit_as(lambda t: _latex_quotes(t, False))),
    (r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", None, _emit),
    (_NUM, None, _emit_as(lambda t: t.replace("\u00ad", ""))),
    (
        "(?:\\d{1,4}[- \u00a0])?\\d{1,4}(?:\\\\?/|\u2044)\\d{1,4}",
        None,
        _emit_as(lambda t: t.replace(" ", "\u00a0")),
    ),
    ("[\u00bc\u00bd\u00be\u2153-\u215e]", None, _emit_as(lambda t: _FRACTIONS.get(t, t))),
    (r"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S&P-500|S&Ls|Cap'n|c'est", None, _emit),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, _emit),
    (r"[A-Z]*\$|#", None, _emit),
    (
        "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        None,
        _emit_as(lambda t: _CURRENCY.get(t, t)),
    ),
    (f"{_ACRO}\\.", f"{_SPACENL}+(?:{_ACRONYM_NEXT})(?:{_SPACENL}|\\Z)", _period_back),
    (_ABBREV1, _SENTEND, _period_back),
    (_ABBREV1, None, _emit),
    ("[A-Za-z]", f"\\.{_SENTEND}", _emit),  # a single letter ending a sentence keeps its period apart
    (f"{_ABBREV4}\\.", None, _emit),
    (_ABBREV4, _SPACE, _emit),
    (_ACRO, _SPACENL, _emit),
    (f"{_APOS}[0-9][0-9]", _SPACENL, _emit),
    (f"{_L}+\\.", "[,;:]", _emit),
    ('"', "[A-Za-z0-9$]", _emit_as(lambda t: "``")),
    ('"', None, _emit_as(lambda t: "''")),
    ("[+%&\u2030\u2031~^|\\\\=/<>]", None, _emit),
    (r"[()\[\]{}]", None, _emit_as(lambda t: _BRACKETS[t])),
    (r"-+", None, _emit_as(_hyphens)),
    ("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", None, _emit_as(lambda t: "...")),
    ("@+|#+|_+", None, _emit),
    (r"\*+", None, _emit),
    ("[,;:]", None, _emit),
    ("[?!]+", None, _emit),
    ("[.\u00a1\u00bf]", None, _emit),
    (f"{_HTHING}\\.", "[,;:]", _emit),
    (_HTHING, None, _emit),
    (f"{_THING}\\.", "[,;:]", _emit),
    (_THING, None, _emit),
    ("[A-Z]+(?:[+&][A-Z]+)+", r"\.[,;:]", lambda text: (text + ".", len(text) + 1)),
    ("[A-Z]+(?:[+&][A-Z]+)+", None, _emit),
    ("[:;=]-?[()DPdp]", "[^A-Za-z]", _emit_as(lambda t: t.replace("(", "-LRB-").replace(")", "-RRB-"))),
    (r"-_-|\^_\^", None, _emit),
    ("'", "[A-Za-z][^ \t\n\r\u00a0]", _emit_as(lambda t: "`")),
    (_REDAUX, None, _emit_as(lambda t: _latex_quotes(t, False))),
    (_QUOTES, None, _emit_as(lambda t: _latex_quotes(t, False))),
    (
        "[\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u2020-\u2023\u2032-\u2038\u2190-\u21ff\u2200-\u22ff\u2600-\u26ff]",
        None,
        _emit,
    ),
    (f"\0|{_SPACE}+|[\u200b\u200e\u200f\ufeff]", None, _skip),
]
_COMPILED = [(re.compile(tok), re.compile(ctx) if ctx else None, act) for tok, ctx, act in _RULES]
_NEWLINE_RE = re.compile(_NEWLINE)


def _lex(text: str) -> list[list[str]]:
    """Tokenise ``text`` as the jar's ``-preserveLines`` mode does: one token list per input line."""
    lines: list[list[str]] = [[]]
    pos = 0
    while pos < len(text):
        newline = _NEWLINE_RE.match(text, pos)
        best_len, best = 0, None
        for token_re, context_re, action in _COMPILED:
            m = token_re.match(text, pos)
            if m is None or m.end() == pos:
                continue
            total = m.end() - pos
            if context_re is not None:
                c = context_re.match(text, m.end())
                if c is None:
                    continue
                total += c.end() - m.end()
            if total > best_len:  # strictly longer: ties go to the earlier rule
                best_len, best = total, (m.group(), action)
        if newline is not None and newline.end() - pos >= best_len:
            lines.append([])
            pos = newline.end()
            continue
        if best is None:  # untokenizable (e.g. outside the BMP): deleted, as the jar's default does
            pos += 1
            continue
        token, consumed = best[1](best[0])
        if token is not None:
            lines[-1].append(token)
        pos += consumed
    return lines


def ptb_tokenize(captions: Sequence[str]) -> list[list[str]]:
    """PTB tokens of each caption, lower-cased, before punctuation removal.

    The captions are lexed as one stream joined by newlines (newlines inside a caption become spaces),
    exactly as the reference feeds them to the jar.
    """
    stream = "\n".join(caption.replace("\n", " ") for caption in captions)
    lines = _lex(stream)
    # Lines beyond the captions cannot occur (every newline separates two captions), but a stray "\r"
    # or other line separator inside a caption would shift them, as in the reference; keep its behaviour.
    lines += [[] for _ in range(len(captions) - len(lines))]
    return [[token.lower() for token in line] for line in lines[: len(captions)]]


def coco_tokenize(captions: Sequence[str]) -> list[str]:
    """The COCO evaluation's tokenised form of each caption: PTB tokens without punctuation, space-joined."""
    return [" ".join(t for t in tokens if t not in PUNCTUATIONS) for tokens in ptb_tokenize(captions)]
