"""Plain English text from the World English Bible SWORD module (Debian package ``sword-text-web``).

Standard library only, so ``scripts/offline_assets.sh`` can run it as a file before torch_piso is
built: ``mod2imp engWEB2015eb | python torch_piso/sword.py OUT.txt``.

``mod2imp`` prints ``$$$Book C:V`` keys, each followed by the entry's OSIS markup. Only verse entries
(chapter and verse >= 1) are kept; footnotes, titles and other non-verse elements are dropped with
their content, the remaining tags are stripped, entities unescaped and whitespace collapsed. One
chapter becomes one paragraph (verses joined by spaces), paragraphs separated by a blank line.
"""
from __future__ import annotations

import html
import re
import sys

MODULE = "engWEB2015eb"
_KEY = re.compile(r"^\$\$\$(.+?)\s+(\d+):(\d+)\s*$")
_DROP = re.compile(r"<(note|title|rdg)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]*>")
_WS = re.compile(r"\s+")


def _clean(markup: str) -> str:
    s = _DROP.sub(" ", markup)
    s = _TAG.sub("", s)
    s = html.unescape(s)
    s = _WS.sub(" ", s).strip()
    s = re.sub(r" ([,.;:!?’”])", r"\1", s)
    return s


def imp_to_text(lines) -> str:
    """Converts mod2imp output (an iterable of lines) to plain text."""
    chapters: list[str] = []
    cur_key, cur_verses = None, []
    key, buf = None, []

    def flush_entry():
        nonlocal cur_key, cur_verses
        if key is None:
            return
        book, ch, vs = key
        if ch < 1 or vs < 1:
            return
        text = _clean(" ".join(buf))
        if not text:
            return
        if (book, ch) != cur_key:
            if cur_verses:
                chapters.append(" ".join(cur_verses))
            cur_key, cur_verses = (book, ch), []
        cur_verses.append(text)

    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("$$$"):
            flush_entry()
            m = _KEY.match(line)
            key = (m.group(1), int(m.group(2)), int(m.group(3))) if m else None
            buf = []
        elif key is not None:
            buf.append(line)
    flush_entry()
    if cur_verses:
        chapters.append(" ".join(cur_verses))
    return "\n\n".join(chapters) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: mod2imp engWEB2015eb | python torch_piso/sword.py OUT.txt", file=sys.stderr)
        return 2
    text = imp_to_text(sys.stdin)
    if len(text) < 100_000:
        print(f"sword.py: only {len(text)} characters of text; is the module installed?", file=sys.stderr)
        return 1
    import os
    tmp = argv[0] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
