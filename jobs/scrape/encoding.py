"""A page's text encoding, chosen as a browser chooses it (the WHATWG encoding-sniffing order,
simplified): a byte-order mark, then the HTTP charset, then a `<meta charset>` or
`http-equiv="Content-Type"` in the first 1,024 bytes, then detection (charset-normalizer).

Only the HTTP header used to count: a Latin-1 page titled "Café crème" was stored as
"Caf� cr�me", and a UTF-16 page with a BOM as markup.
"""

from __future__ import annotations

import codecs
import re

from charset_normalizer import CharsetMatches, from_bytes

PRESCAN_BYTES = 1024  # where the HTML standard looks for a <meta> declaration
DETECT_BYTES = 64 * 1024  # enough for detection; the whole page would cost more for nothing
FALLBACK = "utf-8"

_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_META_CHARSET = re.compile(
    rb"""<meta[^>]+?charset\s*=\s*["']?\s*([a-zA-Z0-9_:.+-]+)""", re.IGNORECASE
)
# Labels browsers read as windows-1252, which differs from Latin-1 in 0x80-0x9F (curly quotes,
# the euro sign): pages that say iso-8859-1 almost always mean it.
_AS_WINDOWS_1252 = frozenset({"latin-1", "iso8859-1", "ascii"})


def sniff_encoding(body: bytes, http_charset: str | None) -> str:
    """The Python codec to decode `body` with."""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return name
    declared = _codec(http_charset)
    if declared is None:
        found = _META_CHARSET.search(body[:PRESCAN_BYTES])
        declared = _codec(found.group(1).decode("ascii")) if found else None
        if declared is not None and declared.startswith("utf-16"):
            declared = "utf-8"  # a <meta> read as ASCII cannot be UTF-16 (the standard's rule)
    if declared is not None:
        return "cp1252" if declared in _AS_WINDOWS_1252 else declared
    return undeclared_encoding(body[:DETECT_BYTES])


def undeclared_encoding(sample: bytes) -> str:
    """No BOM, no declaration: UTF-8 when the bytes are UTF-8 (ASCII is); else windows-1252
    when they read as Latin text in it, as browsers fall back for Western pages, unless
    detection is sure of another code page; else what detection finds (Cyrillic, CJK...).
    Detection alone guesses wildly on short pages: "Café déjà vu" came out as cp1257
    ("déją"), "Grüße" as cp1250, "Straße" as UTF-16."""
    if _is_utf8(sample):
        return "utf-8"
    latin = _reads_as_latin(sample)
    if latin and _high_bytes(sample) < SURE_AFTER:
        return "cp1252"
    matches = from_bytes(sample)
    best = matches.best()
    if latin and (best is None or _windows_1252_is_a_candidate(matches)):
        return "cp1252"
    return (_codec(best.encoding) if best is not None else None) or FALLBACK


def _is_utf8(sample: bytes) -> bool:
    """Valid UTF-8, a sequence cut by the sample's end allowed."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return False
    return True


_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
# Non-letters that do sit between two letters in Western text: apostrophes, the Catalan middle
# dot, a soft hyphen, a no-break space, dashes.
_INSIDE_WORDS = frozenset("\u2019\u2018\u00b7\u00ad\u00a0\u2013\u2014")
MOST_ODD_SHARE = 0.1  # of the non-ASCII characters: more looks like another script or code page
LONGEST_ACCENTED_RUN = 2  # "Grüße" has 2 in a row; Cyrillic read as Latin has whole words


def _reads_as_latin(sample: bytes) -> bool:
    """Whether the bytes read in windows-1252 as Western text: every byte defined, accented
    letters alone or in pairs inside words, no symbol in the middle of a word (Polish "ż"
    in windows-1250 reads as "¿" there, a Japanese page as "\u201a\u00cc")."""
    try:
        text = sample.decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90 and 0x9D are undefined
        return False
    seen = odd = 0
    for run in _NON_ASCII_RUN.finditer(text):
        seen += len(run.group())
        odd += _odd_characters(text, run.start(), run.end())
    return odd <= seen * MOST_ODD_SHARE


def _odd_characters(text: str, start: int, end: int) -> int:
    odd = letters = 0
    for i in range(start, end):
        char = text[i]
        if char.isalpha():
            letters += 1
            continue
        odd += _long_run(letters)
        letters = 0
        before, after = text[i - 1 : i], text[i + 1 : i + 2]
        if before.isalpha() and after.isalpha() and char not in _INSIDE_WORDS:
            odd += 1
    return odd + _long_run(letters)


def _long_run(letters: int) -> int:
    return letters if letters > LONGEST_ACCENTED_RUN else 0


# Non-ASCII bytes below which detection is unsure between Latin code pages: windows-1252 then.
# Past it, detection may rule windows-1252 out: a Czech page in windows-1250 whose bytes are
# all defined in windows-1252 ("Pøíliš" for "Příliš") reads messier in it.
SURE_AFTER = 32
_HIGH = bytes(range(0x80, 0x100))


def _high_bytes(sample: bytes) -> int:
    return len(sample) - len(sample.translate(None, _HIGH))


def _windows_1252_is_a_candidate(matches: CharsetMatches) -> bool:
    """Detection kept a reading of the bytes that windows-1252 gives too (the same text).
    Its ranking among Latin code pages is noise (a long French page ranked windows-1250, "à"
    read as "ŕ", first), so any candidate will do: a tie goes to windows-1252, as in browsers."""
    return any(
        "cp1252" in {_codec(name) for name in match.could_be_from_charset} for match in matches
    )


def decode_page(body: bytes, http_charset: str | None) -> tuple[str, str]:
    """The page's text and the encoding it was read with; bytes that are not valid in that
    encoding become U+FFFD, never an error."""
    encoding = sniff_encoding(body, http_charset)
    bom = next((b for b, name in _BOMS if name == encoding and body.startswith(b)), b"")
    return body[len(bom) :].decode(encoding, errors="replace"), encoding


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    try:
        return codecs.lookup(label.strip()).name
    except LookupError:
        return None
