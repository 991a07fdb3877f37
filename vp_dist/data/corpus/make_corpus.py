"""Regenerate the shipped English corpus from the running Python's own documentation.

Usage (from the repository root)::

    python vp_dist/data/corpus/make_corpus.py            # writes python_docs.txt next to this file
    python vp_dist/data/corpus/make_corpus.py --out /tmp/corpus.txt

Two PSF-licensed sources, both present in every CPython install, nothing downloaded:

1. ``pydoc_data.topics``: the plain-text rendering of the Python Language Reference and
   library topics that ``help()`` shows. One document per topic.
2. Docstrings of the standard library, read with ``ast`` (no module is imported, so nothing
   runs). One document per module: the module docstring, then its classes' and functions'
   docstrings in source order (a class, then its methods). Tests, IDLE, tkinter, lib2to3 and site-packages are skipped.

Output format (what ``vp_dist.data.load_documents`` reads): one paragraph per line, a blank line
between documents. Code samples, grammar rules and tables are dropped by a prose heuristic:
a paragraph is kept if it is mostly letters and ends like a sentence. The output depends on
the Python version; the shipped file records which one in README.md.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIPPED_STDLIB_TOP_LEVEL = {"site-packages", "dist-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"}
HEADING_UNDERLINE = re.compile(r"^([*=\-~^#])\1{2,}$")
SENTENCE_END = re.compile(r"[.!?:][)\"'”’]*$")
RST_ROLE = re.compile(r":[a-z:]+:`~?([^`]+)`")
RST_LITERAL = re.compile(r"``([^`]+)``")
CODE_MARKERS = (">>>", "...", "+--", "|", "$ ", "%")
MIN_LETTER_FRACTION = 0.7
MIN_WORDS = 3


def blocks(text: str) -> Iterator[list[str]]:
    """Split text into blocks of lines separated by blank lines."""
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block


def is_prose(paragraph: str, lines: list[str]) -> bool:
    if any(line.lstrip().startswith(CODE_MARKERS) or "::=" in line for line in lines):
        return False
    words = paragraph.split()
    non_space = [c for c in paragraph if not c.isspace()]
    letters = sum(c.isalpha() for c in non_space)
    return (
        len(words) >= MIN_WORDS
        and letters >= MIN_LETTER_FRACTION * len(non_space)
        and SENTENCE_END.search(paragraph) is not None
    )


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of ``text`` joined onto one line each; headings kept, code and tables dropped."""
    paragraphs = []
    for lines in blocks(text):
        if len(lines) == 2 and HEADING_UNDERLINE.match(lines[1].strip()):
            paragraphs.append(" ".join(lines[0].split()))
            continue
        lines = [line for line in lines if not HEADING_UNDERLINE.match(line.strip())]
        if not lines:
            continue
        if lines[0].lstrip().startswith(("* ", "- ")):
            lines[0] = lines[0].lstrip()[2:]
        paragraph = " ".join(" ".join(lines).split())
        paragraph = RST_LITERAL.sub(r"\1", RST_ROLE.sub(r"\1", paragraph))
        if is_prose(paragraph, lines):
            paragraphs.append(paragraph)
    return paragraphs


def topic_documents() -> Iterator[list[str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield prose_paragraphs(topics[name])


def docstring_documents(stdlib: Path) -> Iterator[list[str]]:
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if parts[0] in SKIPPED_STDLIB_TOP_LEVEL or "test" in parts or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield [paragraph for docstring in docstrings_in_source_order(tree) for paragraph in prose_paragraphs(docstring)]


def docstrings_in_source_order(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, depth first: a class, then its methods."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        docstring = ast.get_docstring(node)
        if docstring:
            yield docstring
    for child in ast.iter_child_nodes(node):
        yield from docstrings_in_source_order(child)


def write_corpus(out: Path) -> tuple[int, int]:
    """Write the corpus to ``out``; returns (documents, bytes)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = 0
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for paragraphs in (*topic_documents(), *docstring_documents(stdlib)):
            if len(paragraphs) < 2:  # a lone heading or one-line docstring teaches little
                continue
            if documents:
                f.write("\n")
            f.write("\n".join(paragraphs) + "\n")
            documents += 1
    return documents, out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("python_docs.txt"))
    args = parser.parse_args()
    documents, size = write_corpus(args.out)
    version = ".".join(map(str, sys.version_info[:3]))
    sys.stderr.write(f"wrote {args.out}: {documents} documents, {size} bytes, from Python {version}\n")


if __name__ == "__main__":
    main()
