"""Rebuild llmshrink/data/python_docs_test.txt: the prose of the Python 3.11 tutorial, HOWTOs and FAQ.

Out-of-domain evaluation text (modern expository English) for models distilled on Shakespeare.
Provenance and license: llmshrink/data/README.md. Needs Debian's python3.11-doc, e.g.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb x
    python benchmarks/make_python_docs_text.py x/usr/share/doc/python3.11/html/_sources

Keeps only top-level prose paragraphs and list items of the reST sources: titles, code and literal
blocks, doctests, directives (with their bodies), tables, comments and indented blocks are dropped,
and inline markup is reduced to its text. One paragraph per line, paragraphs separated by a blank line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# In reading order. Left out: the index pages, and HOWTOs that are mostly code or C API detail
# (clinic, cporting, isolating-extensions, instrumentation, logging-cookbook).
FILES = [f"tutorial/{n}.rst.txt" for n in (
    "appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules", "inputoutput",
    "errors", "classes", "stdlib", "stdlib2", "venv", "whatnow", "interactive", "floatingpoint", "appendix")]
FILES += [f"howto/{n}.rst.txt" for n in (
    "pyporting", "curses", "descriptor", "functional", "logging", "regex", "sockets", "sorting", "unicode",
    "urllib2", "argparse", "ipaddress", "annotations", "enum")]
FILES += [f"faq/{n}.rst.txt" for n in (
    "general", "programming", "design", "library", "extending", "windows", "gui", "installed")]

# Inline markup, left to right: ``literal``, :role:`target`, `text <url>`_ or `text`_, *emphasis*.
TOKEN = re.compile(r"``(?P<lit>.+?)``|:(?P<role>[\w:+-]+):`(?P<target>[^`]*)`|`(?P<ref>[^`]+)`__?|"
                   r"(?P<star>\*\*|\*)(?P<emph>[^\s*](?:[^*]*?[^\s\\*])?)(?P=star)(?!\w)")
BULLET = r"([*+-]|\d+[.)]|#\.)\s"
FOOTNOTE = re.compile(r"\s*\[(#\w*|\d+|\*)\]_")


def unescape(text: str) -> str:
    """reST backslash escapes outside literals: a backslash-space vanishes, any other escaped char stays."""
    return re.sub(r"\\(.)", lambda m: "" if m.group(1) == " " else m.group(1), text)


def inline(text: str) -> str:
    text = FOOTNOTE.sub("", text)
    out, pos = [], 0
    for m in TOKEN.finditer(text):
        out.append(unescape(text[pos:m.start()]))
        if m.group("lit") is not None:
            out.append(m.group("lit"))
        elif m.group("role") is not None:
            target = m.group("target").strip()
            if target.endswith(">") and "<" in target and not target.startswith("<"):
                target = target[:target.rindex("<")].rstrip()  # :ref:`title <label>` -> title
            target = target.lstrip("~!")
            role = m.group("role").split(":")[-1]
            out.append(f"{role.upper()} {target}" if role in ("pep", "rfc") else target)
        elif m.group("ref") is not None:
            ref = m.group("ref").strip()
            out.append(re.sub(r"\s*<[^>]*>$", "", ref) if not ref.startswith("<") else ref.strip("<>"))
        else:
            out.append(unescape(m.group("emph")))
        pos = m.end()
    out.append(unescape(text[pos:]))
    text = "".join(out).replace("|release|", "3.11").replace("|version|", "3.11").replace(" --- ", " \u2014 ")
    return re.sub(r"[ \t]+", " ", text).strip()


def blocks(text: str) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip():
            out[-1].append(line.rstrip())
        elif out[-1]:
            out.append([])
    return [b for b in out if b]


def is_title(block: list[str]) -> bool:
    return any(len(set(line)) == 1 and line[0] in "=-~*^#\"'+`" and len(line) >= 3 for line in block)


def prose(text: str) -> list[str]:
    paragraphs = []
    for block in blocks(text):
        first = block[0]
        if first[0] in " \t" or first.startswith((".. ", "..\t", ">>>", "+", "|", "=====", ":")) or is_title(block):
            continue  # indented (code, directive body, quote), directive/comment, doctest, table, title, field list
        lines, item = [], []
        bullets = re.match(BULLET, first) is not None
        for line in block:
            if bullets and re.match(BULLET, line):  # a new list item
                if item:
                    lines.append(" ".join(item))
                item = [re.sub("^" + BULLET + r"\s*", "", line, count=1)]
            elif line[0] in " \t" and not item:  # definition-list body or continuation at an indent
                item = [line.strip()]
            else:
                item.append(line.strip())
        if item:
            lines.append(" ".join(item))
        cleaned = []
        for line in lines:
            line = inline(line)
            if line.endswith("::"):
                line = line[:-2].rstrip() + ("" if line[:-2].endswith(" ") else ":")
                line = line.rstrip()
            if line.endswith(":") and len(line.split()) < 4:
                continue
            if len(line.split()) < 4 or sum(c.isalpha() or c.isspace() for c in line) < 0.85 * len(line):
                continue  # fragments, and lines that are mostly code or symbols
            cleaned.append(line)
        if cleaned:
            paragraphs.append("\n".join(cleaned))
    return paragraphs


def main(sources: str, out: str) -> None:
    root = Path(sources)
    paragraphs: list[str] = []
    for name in FILES:
        paragraphs += prose((root / name).read_text(encoding="utf-8"))
    seen, unique = set(), []
    for p in paragraphs:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    Path(out).write_text("\n\n".join(unique) + "\n", encoding="utf-8")
    print(f"{out}: {len(unique)} paragraphs, {Path(out).stat().st_size:,} bytes")


if __name__ == "__main__":
    default_out = Path(__file__).resolve().parent.parent / "llmshrink" / "data" / "python_docs_test.txt"
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(default_out))
