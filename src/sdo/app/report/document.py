"""BENCHMARKS.md's generated blocks: the markers, and rewriting or checking a document from the stored outputs.

Every table and every generated summary line of BENCHMARKS.md sits between a marker pair::

    <!-- generated: NAME -->
    ...
    <!-- /generated -->

and ``NAME`` is a generator registered in ``sdo.app.report.blocks.BLOCKS`` by the module of its subject. A block
whose outputs are missing is an error, never a skip. ``benchmarks/report.py`` is the command line (``main``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
from pathlib import Path

from sdo.app.report.blocks import BLOCKS
from sdo.errors import CorruptFileError
from sdo.io import atomic_path

__all__ = [
    "CLOSE",
    "OPEN",
    "RESULTS",
    "SUBJECTS",
    "BlockError",
    "check",
    "find_blocks",
    "main",
    "regenerate",
    "render",
    "write",
]

SUBJECTS = (
    "latent",
    "estimators",
    "finetune",
    "finetune_comparison",
    "finetune_findings",
    "chains",
    "comparison",
    "equal_time",
    "equal_time_findings",
    "scale",
    "auto",
)
"""The modules of ``sdo.app.report`` that hold the blocks, in BENCHMARKS.md's order of subjects; importing one
registers its blocks (so ``BLOCKS`` lists them in this order)."""
for _subject in SUBJECTS:
    importlib.import_module(f"sdo.app.report.{_subject}")

RESULTS = Path("benchmarks") / "results" / "cpu"
"""The stored outputs, relative to a checkout's root (``benchmarks/report.py`` passes its own folder's)."""

OPEN = re.compile(r"^<!-- generated: (?P<name>[A-Za-z0-9_.-]+) -->$", re.M)
CLOSE = "<!-- /generated -->"


class BlockError(Exception):
    """A document's markers are malformed, name no generator, or a generator's outputs are missing."""


def find_blocks(text: str) -> list[tuple[str, int, int]]:
    """Every generated block of ``text``: ``(name, start, end)``, the body being ``text[start:end]`` (from after
    the opening marker's line to before the closing one's)."""
    blocks = []
    for match in OPEN.finditer(text):
        start = match.end() + 1
        end = text.find("\n" + CLOSE, match.end())
        following = OPEN.search(text, match.end())
        if end < 0 or (following is not None and following.start() < end):
            raise BlockError(f"block {match['name']!r} has no `{CLOSE}` before the next block")
        blocks.append((match["name"], start, max(start, end + 1)))
    if text.count(CLOSE) != len(blocks):
        raise BlockError(f"{text.count(CLOSE)} `{CLOSE}` markers for {len(blocks)} blocks")
    names = [name for name, _, _ in blocks]
    if len(set(names)) != len(names):
        raise BlockError(f"a block appears twice: {sorted({n for n in names if names.count(n) > 1})}")
    return blocks


def render(name: str, results: Path) -> str:
    """Block ``name`` from the outputs in ``results``; ``BlockError`` when it has no generator or outputs."""
    if name not in BLOCKS:
        raise BlockError(f"block {name!r}: no generator (known: {', '.join(BLOCKS)})")
    try:
        return BLOCKS[name](results).strip("\n") + "\n"
    except FileNotFoundError as error:
        raise BlockError(f"block {name!r}: missing output {error.filename}") from error
    except CorruptFileError as error:  # a stored output that sdo.io cannot read (missing or damaged)
        raise BlockError(f"block {name!r}: unreadable output: {error}") from error


def regenerate(text: str, results: Path) -> tuple[str, list[str], list[str]]:
    """``text`` with every block regenerated, the names of the blocks that changed, and the errors (blocks left
    as they were)."""
    pieces, changed, errors, position = [], [], [], 0
    for name, start, end in find_blocks(text):
        try:
            body = render(name, results)
        except BlockError as error:
            errors.append(str(error))
            body = text[start:end]
        if body != text[start:end]:
            changed.append(name)
        pieces += [text[position:start], body]
        position = end
    pieces.append(text[position:])
    return "".join(pieces), changed, errors


def check(doc: Path, results: Path) -> int:
    """0 when every block of ``doc`` equals its regeneration; else 1, naming the blocks that differ."""
    text = doc.read_text()
    try:
        new, changed, errors = regenerate(text, results)
    except BlockError as error:
        print(f"{doc}: {error}", file=sys.stderr)
        return 1
    for name in changed:
        print(f"{doc}: block {name!r} differs from its stored outputs", file=sys.stderr)
    if changed:
        diff = difflib.unified_diff(text.splitlines(), new.splitlines(), str(doc), "regenerated", lineterm="", n=1)
        print("\n".join(diff), file=sys.stderr)
    for error in errors:
        print(f"{doc}: {error}", file=sys.stderr)
    return 1 if changed or errors else 0


def write(doc: Path, results: Path) -> int:
    """Rewrite ``doc``'s blocks from ``results`` in one atomic replacement; nothing is written on any error."""
    try:
        new, changed, errors = regenerate(doc.read_text(), results)
    except BlockError as error:
        print(f"{doc}: {error}", file=sys.stderr)
        return 1
    if errors:
        print("\n".join(f"{doc}: {error}" for error in errors) + f"\n{doc}: not written", file=sys.stderr)
        return 1
    if changed:
        with atomic_path(doc) as tmp:
            tmp.write_text(new)
    print(f"{doc}: {len(changed)} block(s) rewritten" + (f" ({', '.join(changed)})" if changed else ""))
    return 0


def main(argv: list[str] | None = None, results: Path | None = None) -> int:
    """``benchmarks/report.py``'s command line (``results``: the default results folder); its exit status."""
    parser = argparse.ArgumentParser(
        description="The generated blocks of BENCHMARKS.md, from the stored outputs of the benchmark scripts."
    )
    parser.add_argument("results", nargs="?", type=Path, default=results or RESULTS, help="the stored outputs")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="DOC", help="rewrite DOC's generated blocks")
    action.add_argument("--check", type=Path, metavar="DOC", help="exit 1 if a block of DOC differs")
    args = parser.parse_args(argv)
    if args.write:
        return write(args.write, args.results)
    if args.check:
        return check(args.check, args.results)
    status = 0
    for name in BLOCKS:
        try:
            print(f"<!-- generated: {name} -->\n{render(name, args.results)}{CLOSE}\n")
        except BlockError as error:
            print(f"({error})\n")
            status = 1
    return status
