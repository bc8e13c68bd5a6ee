"""Markup removal for the corpus sources: reStructuredText, FOLDOC dictd entries, DocBook HTML.

Each function turns one source document into a list of clean paragraphs. The rules are
deliberately simple and deterministic; the goal is readable prose, not a faithful render.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

_RST_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+_.:])\1{2,}\s*$")
_RST_DIRECTIVE = re.compile(r"^\s*\.\.\s")
_RST_FIELD = re.compile(r"^\s*:[\w -]+:(\s|$)")
_RST_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_RST_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_{1,2}")
_RST_REF = re.compile(r"`([^`]+)`_{1,2}")
_RST_LITERAL = re.compile(r"``([^`]*)``")
_RST_INTERP = re.compile(r"`([^`]*)`")
_RST_EMPH = re.compile(r"(\*\*|\*)(\S[^*]*?)\1")
_RST_SUBST = re.compile(r"\|([\w -]+)\|")
_RST_TABLE = re.compile(r"^\s*[+|].*[+|]\s*$")
_ROLE_TITLE = re.compile(r"^(.*?)\s*<[^>]*>$")


def _strip_role(text: str) -> str:
    """``:func:`name <target>``` shows ``name``; ``~mod.func`` shows the full dotted name."""
    match = _ROLE_TITLE.match(text)
    text = match.group(1) if match else text
    return text.lstrip("~!")


def clean_rst(source: str) -> list[str]:
    """Split reStructuredText into paragraphs with directives, tables and inline markup removed.

    Indented blocks after a directive (``.. code-block::``, ``.. note::`` options) and literal
    blocks introduced by ``::`` are dropped, because they are mostly code or markup.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    skip_indent: int | None = None

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw in source.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if not line.strip():
            flush()
            continue
        if _RST_DIRECTIVE.match(line) or _RST_UNDERLINE.match(line) or _RST_TABLE.match(line):
            flush()
            if _RST_DIRECTIVE.match(line):
                skip_indent = indent
            continue
        if _RST_FIELD.match(line):
            continue
        text = line.strip()
        if text.endswith("::"):
            # A literal block follows; keep the sentence (with one colon), skip the block.
            text = text[:-1] if not text.endswith(" ::") else text[:-3]
            current.append(text)
            flush()
            skip_indent = indent
            continue
        current.append(text)
    flush()
    return [_rst_inline(p) for p in paragraphs]


def _rst_inline(text: str) -> str:
    text = _RST_ROLE.sub(lambda m: _strip_role(m.group(1)), text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    text = _RST_REF.sub(r"\1", text)
    text = _RST_INTERP.sub(r"\1", text)
    text = _RST_EMPH.sub(r"\2", text)
    text = _RST_SUBST.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def is_prose(paragraph: str, min_words: int = 8, min_letter_share: float = 0.8) -> bool:
    """Keep paragraphs that read like sentences: enough words, mostly letters and spaces."""
    if len(paragraph.split()) < min_words:
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
    return letters >= min_letter_share * len(paragraph)


_FOLDOC_XREF_URL = re.compile(r"\{([^{}]*?)\s*\((?:https?|ftp|mailto)[^)]*\)\s*\}", re.S)
_FOLDOC_XREF = re.compile(r"\{([^{}]*)\}")
_FOLDOC_DATE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")
_FOLDOC_TAG = re.compile(r"^<([^>]+)>\s*")
_URL = re.compile(r"\(?(?:https?|ftp)://\S+\)?")


def parse_foldoc(dictionary: str) -> list[tuple[str, str]]:
    """Split a FOLDOC dictd text into ``(headword, body)`` entries.

    Headword lines start at column 0 (an entry may have several, e.g. a term and its
    acronym); the body is indented. Cross-references ``{term}`` become plain ``term``, URLs and
    the trailing ``(YYYY-MM-DD)`` date are dropped, the leading ``<subject>`` tag becomes
    ``(subject)``.
    """
    entries: list[tuple[str, str]] = []
    heads: list[str] = []
    body: list[str] = []

    def flush() -> None:
        if heads and body:
            text = "\n".join(body)
            text = _FOLDOC_XREF_URL.sub(r"\1", text)
            text = _FOLDOC_XREF.sub(r"\1", text)
            paras = []
            for para in re.split(r"\n\s*\n", text):
                para = re.sub(r"\s+", " ", para).strip()
                para = _URL.sub("", para).strip()
                if len(para) < 3 or _FOLDOC_DATE.match(para.rstrip(".")):
                    continue
                para = _FOLDOC_TAG.sub(lambda m: f"({m.group(1)}) ", para)
                paras.append(para)
            if paras:
                entries.append((heads[0], heads[0] + "\n\n" + "\n\n".join(paras)))
        heads.clear()
        body.clear()

    for line in dictionary.splitlines():
        if line and not line[0].isspace():
            if body:
                flush()
            heads.append(line.strip())
        elif line.strip() or body:
            body.append(line)
    flush()
    return [(h, b) for h, b in entries if not h.startswith("00-database")]


class _DocbookParagraphs(HTMLParser):
    """Collects the text of ``<div class="para">`` and ``<p>`` elements of a DocBook HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth = 0  # nesting depth inside the current paragraph element
        self._parts: list[str] = []
        self._skip = 0  # inside <pre>/<script>/<style>

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag in ("pre", "script", "style"):
            self._skip += 1
        if self._depth:
            if tag == "div":
                self._depth += 1
            return
        if (tag == "div" and "para" in classes) or tag == "p":
            self._depth = 1
            self._parts = []

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style") and self._skip:
            self._skip -= 1
        if not self._depth:
            return
        if tag in ("div", "p"):
            self._depth -= 1
            if self._depth == 0:
                text = re.sub(r"\s+", " ", "".join(self._parts)).strip()
                if text:
                    self.paragraphs.append(text)

    def handle_data(self, data):
        if self._depth and not self._skip:
            self._parts.append(data)


def docbook_paragraphs(page: str) -> list[str]:
    """Paragraph texts of one DocBook/Publican HTML page (the Debian Handbook)."""
    parser = _DocbookParagraphs()
    parser.feed(page)
    parser.close()
    return [html.unescape(p) for p in parser.paragraphs]


_FRENCH_WORDS = frozenset("le la les des est une et du pour dans que qui sur pas vous avec sont ce cette aux au".split())
_ENGLISH_WORDS = frozenset("the and of to is that for in are with this you it be as by on".split())


def looks_french(paragraph: str) -> bool:
    """Stop-word vote; the French Handbook still carries some untranslated English paragraphs."""
    words = re.findall(r"[a-zà-ÿ]+", paragraph.lower())
    french = sum(w in _FRENCH_WORDS for w in words)
    english = sum(w in _ENGLISH_WORDS for w in words)
    return french > english
