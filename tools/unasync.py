"""Writes the synchronous SDK (clients/sdk.py) from the asyncio one (clients/aio.py), as httpcore's
scripts/unasync.py does: a small table of token substitutions, applied line by line.

    python tools/unasync.py           # rewrite clients/sdk.py
    python tools/unasync.py --check   # exit 1 when clients/sdk.py is not what it would write (make lint)

aio.py is written so that these substitutions alone make good synchronous code: no `async` construct
without a synchronous twin below, and only `import asyncio` for asyncio.sleep.
"""
from __future__ import annotations

import argparse
import difflib
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "clients" / "aio.py"
TARGET = ROOT / "clients" / "sdk.py"
HEADER = "# generated from clients/aio.py by tools/unasync.py; never edit\n"

# Across lines first: an async generator cannot `yield from`, a sync one should (ruff's UP028).
BLOCK_SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"^( *)(?:async )?for (\w+) in (.+):\n +yield \2\n", r"\1yield from \3\n"),
]
# Then line by line, (pattern, replacement) in order: whole lines, then specific tokens before general ones.
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"^import asyncio\n", ""),
    (r"^import grpc\.aio\n", ""),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"\bgrpc\.aio\.AioRpcError\b", "grpc.RpcError"),
    (r"\bgrpc\.aio\.", "grpc."),
    (r"\[(\w+) async for \1 in (\w+)\]", r"list(\2)"),
    (r"\basync def\b", "def"),
    (r"\basync for\b", "for"),
    (r"\basync with\b", "with"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncClient\b", "Client"),
]
_BLOCKS = [(re.compile(p, re.MULTILINE), s) for p, s in BLOCK_SUBSTITUTIONS]
_COMPILED = [(re.compile(p), s) for p, s in SUBSTITUTIONS]
_FROM_IMPORT = re.compile(r"^(from \S+ import )([^()]+)$")


def _sorted_names(line: str) -> str:
    """`from x import C, B` with its names in isort's order (constants, classes, the rest; then by name),
    so a substitution that renames an imported name keeps ruff's import order."""
    m = _FROM_IMPORT.match(line)
    if m is None:
        return line
    names = [n.strip() for n in m.group(2).split(",")]

    def key(name: str) -> tuple[int, str]:
        kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
        return kind, name.lower()
    return m.group(1) + ", ".join(sorted(names, key=key))


def _substitute(text: str) -> str:
    for pattern, replacement in _COMPILED:
        text = pattern.sub(replacement, text)
    return text


def _open_brackets(text: str) -> dict[int, tuple[int, int] | None]:
    """For each line (0-based) that continues a bracket, where that innermost open bracket is:
    (line, column); None for lines outside brackets."""
    inside: dict[int, tuple[int, int] | None] = {}
    stack: list[tuple[int, int]] = []
    row_seen = -1
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        row = tok.start[0] - 1
        if row != row_seen:
            for r in range(row_seen + 1, row + 1):
                inside.setdefault(r, stack[-1] if stack else None)
            row_seen = row
        if tok.type == tokenize.OP and tok.string in "([{":
            stack.append((row, tok.start[1]))
        elif tok.type == tokenize.OP and tok.string in ")]}":
            stack.pop()
    return inside


def unasync(text: str) -> str:
    for pattern, replacement in _BLOCKS:
        text = pattern.sub(replacement, text)
    old_lines = text.splitlines(keepends=True)
    inside = _open_brackets(text)
    new_lines: list[str] = []
    for n, line in enumerate(old_lines):
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        bracket = inside.get(n)
        if bracket is not None and indent == bracket[1] + 1:
            # Aligned under an open bracket: follow the bracket to where the substitutions moved it.
            b_row, b_col = bracket
            b_old = old_lines[b_row]
            b_body = b_old.lstrip(" ")
            b_indent_new = len(new_lines[b_row]) - len(new_lines[b_row].lstrip(" "))
            indent = b_indent_new + len(_substitute(b_old[len(b_old) - len(b_body):b_col])) + 1
        new = " " * indent + _substitute(body) if line.strip() else _substitute(line)
        if new.startswith("from "):
            new = _sorted_names(new.rstrip("\n")) + "\n"
        new_lines.append(new)
    return HEADER + "".join(new_lines)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when sdk.py is stale")
    args = parser.parse_args(argv)
    wanted = unasync(SOURCE.read_text())
    current = TARGET.read_text() if TARGET.exists() else ""
    if args.check:
        if current == wanted:
            return 0
        sys.stdout.writelines(difflib.unified_diff(
            current.splitlines(keepends=True), wanted.splitlines(keepends=True),
            _shown(TARGET), "generated from clients/aio.py"))
        print(f"{_shown(TARGET)} is not what tools/unasync.py generates from {_shown(SOURCE)}: "
              "run `python tools/unasync.py`", file=sys.stderr)
        return 1
    if current != wanted:
        TARGET.write_text(wanted)
        print(f"wrote {_shown(TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
