#!/usr/bin/env python3
"""Rewrites spec citations to the in-repository design notes (docs/TAP.md, docs/LFPR.md).

    python docs/rewrite_citations.py FILE...            # rewrite in place
    python docs/rewrite_citations.py --check FILE...    # print the changes, exit 1 if any
    python docs/rewrite_citations.py --verify FILE...   # every cited § must exist

Rules, applied to every given file (Python, Markdown or plain text):

1. `TAP.md §x` / `LFPR.md §x` -> `docs/TAP.md §x` / `docs/LFPR.md §x`. A citation that
   already has a path before the file name (`docs/TAP.md`, `spec/TAP.md`) is not
   touched by this rule, so running the script twice changes nothing.
2. `../shared/spec/TAP.md` or `shared/spec/LFPR.md` (with or without `../`) ->
   `docs/TAP.md` / `docs/LFPR.md`.
3. `../shared/golden/batch_fields.md` -> `docs/TAP.md §3.3` (the batch fields).
4. Python files only, inside docstrings and comments only: any other `../shared/<path>`
   (or `shared/<path>`) -> `` `<path>` (docs/README.md §4) `` (the golden fixtures
   section). Lines that look like commands (` --` or `python -m`) are skipped, because
   there the path is a real argument.

Files are rewritten atomically (temporary file, then rename) and only when something
changed. `--verify` checks that every `docs/TAP.md §N` / `docs/LFPR.md §N` cited in
the files names a section that exists in the notes (a `## N.` / `### N.M` heading).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import tokenize
from typing import Iterable, Sequence

DOCS_DIR = os.path.dirname(os.path.abspath(__file__))

# Rule 1: a bare citation; the look-behind refuses any path character before the name.
BARE_CITATION = re.compile(r"(?<![\w/.\-])(TAP|LFPR)\.md(\s*§)")
# Rule 2: the external spec, by path.
SPEC_PATH = re.compile(r"(?<![\w/.])(?:\.\./)?shared/spec/(TAP|LFPR)\.md")
# Rule 3: the golden batch-field table moved into docs/TAP.md §3.3.
BATCH_FIELDS = re.compile(r"`?(?<![\w/.])(?:\.\./)?shared/golden/batch_fields\.md`?")
# Rule 4: any other shared path (docstrings / comments only), optionally in backticks.
SHARED_PATH = re.compile(r"(`?)(?<![\w/.])(?:\.\./)?shared/([\w.\-/{},*]*[\w}*])(`?)")
COMMAND_LINE = re.compile(r"\s--\w|python\S*\s+-m\s")
FIXTURES_NOTE = "docs/README.md §4"


def rewrite_text(text: str) -> str:
  """Rules 1-3 on any text.

  >>> rewrite_text("see TAP.md §4.6 and LFPR.md §6.7")
  'see docs/TAP.md §4.6 and docs/LFPR.md §6.7'
  >>> rewrite_text(rewrite_text("TAP.md §12.9"))
  'docs/TAP.md §12.9'
  >>> rewrite_text("(shared/spec/LFPR.md §7.3)")
  '(docs/LFPR.md §7.3)'
  >>> rewrite_text("the fields of `../shared/golden/batch_fields.md`")
  'the fields of docs/TAP.md §3.3'
  """
  text = SPEC_PATH.sub(lambda m: f"docs/{m.group(1)}.md", text)
  text = BATCH_FIELDS.sub("docs/TAP.md §3.3", text)
  return BARE_CITATION.sub(lambda m: f"docs/{m.group(1)}.md{m.group(2)}", text)


def rewrite_shared_prose(text: str) -> str:
  """Rule 4 on docstring or comment text, line by line.

  >>> rewrite_shared_prose("(see `shared/golden/data/evalai.json`)")
  '(see `golden/data/evalai.json` (docs/README.md §4))'
  >>> rewrite_shared_prose("Parity with ../shared/golden/{tap,tap12}.")
  'Parity with `golden/{tap,tap12}` (docs/README.md §4).'
  >>> rewrite_shared_prose("  python -m x --check-golden ../shared/golden")
  '  python -m x --check-golden ../shared/golden'
  """
  def one(m: re.Match) -> str:
    return f"`{m.group(2)}` ({FIXTURES_NOTE})"

  lines = text.split("\n")
  return "\n".join(line if COMMAND_LINE.search(line) else SHARED_PATH.sub(one, line)
                   for line in lines)


def _prose_token_spans(source: str) -> list[tuple[int, int]]:
  """Character spans of the comments and docstrings of Python `source`.

  A docstring is a string token that forms a whole expression statement (the first
  token of a logical line and followed by its end).
  """
  offsets = [0]
  for line in source.splitlines(keepends=True):
    offsets.append(offsets[-1] + len(line))

  def pos(row_col: tuple[int, int]) -> int:
    return offsets[row_col[0] - 1] + row_col[1]

  spans = []
  tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
  skip = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT}
  line_start = True
  for i, tok in enumerate(tokens):
    if tok.type == tokenize.COMMENT:
      spans.append((pos(tok.start), pos(tok.end)))
    elif tok.type == tokenize.STRING and line_start:
      nxt = next((t for t in tokens[i + 1:] if t.type not in skip), None)
      if nxt is None or nxt.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
        spans.append((pos(tok.start), pos(tok.end)))
    if tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
      line_start = True
    elif tok.type not in (tokenize.NL, tokenize.COMMENT):
      line_start = False
  return spans


def rewrite_source(text: str, path: str) -> str:
  """All rules for one file's contents; rule 4 only in Python docstrings/comments."""
  text = rewrite_text(text)
  if not path.endswith(".py"):
    return text
  try:
    spans = _prose_token_spans(text)
  except (tokenize.TokenError, SyntaxError, IndentationError):
    return text  # not valid Python: leave rule 4 out rather than guess
  out, last = [], 0
  for start, end in spans:
    out.append(text[last:start])
    out.append(rewrite_shared_prose(text[start:end]))
    last = end
  out.append(text[last:])
  return "".join(out)


def _write_atomic(path: str, text: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".rewrite-", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
      f.write(text)
    os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _diff_lines(old: str, new: str) -> Iterable[str]:
  for n, (a, b) in enumerate(zip(old.split("\n"), new.split("\n")), 1):
    if a != b:
      yield f"  {n}: - {a.strip()}\n  {n}: + {b.strip()}"


# --------------------------------------------------------------------- verification

SECTION_HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)[.\s]", re.M)
DOCS_CITATION = re.compile(r"docs/(TAP|LFPR)\.md\s*§\s*(\d+(?:\.\d+)*)")


def sections(doc: str) -> set[str]:
  """Section numbers defined by the headings of one note (`## 4.` -> '4', `### 4.6`)."""
  with open(os.path.join(DOCS_DIR, f"{doc}.md"), encoding="utf-8") as f:
    return set(SECTION_HEADING.findall(f.read()))


def verify(paths: Sequence[str]) -> list[str]:
  """Citations in `paths` whose section does not exist in docs/; '' list when fine."""
  known = {doc: sections(doc) for doc in ("TAP", "LFPR")}
  problems = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for m in DOCS_CITATION.finditer(text):
      doc, number = m.group(1), m.group(2).rstrip(".")
      if number not in known[doc]:
        line = text.count("\n", 0, m.start()) + 1
        problems.append(f"{path}:{line}: docs/{doc}.md §{number} has no such section")
  return problems


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("files", nargs="+", help="files to rewrite")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--check", action="store_true",
                    help="print what would change; exit 1 if anything would")
  mode.add_argument("--verify", action="store_true",
                    help="check that every docs/*.md § citation exists; exit 1 if not")
  args = parser.parse_args(argv)
  missing = [p for p in args.files if not os.path.isfile(p)]
  if missing:
    parser.error(f"not a file: {', '.join(missing)}")
  if args.verify:
    problems = verify(args.files)
    print("\n".join(problems) if problems else
          f"all docs/ citations in {len(args.files)} files resolve")
    return 1 if problems else 0
  changed = 0
  for path in args.files:
    with open(path, encoding="utf-8", newline="") as f:
      old = f.read()
    new = rewrite_source(old, path)
    if new == old:
      continue
    changed += 1
    print(f"{path}:")
    for line in _diff_lines(old, new):
      print(line)
    if not args.check:
      _write_atomic(path, new)
  verb = "would change" if args.check else "changed"
  print(f"{verb} {changed} of {len(args.files)} files", file=sys.stderr)
  return 1 if (args.check and changed) else 0


if __name__ == "__main__":
  sys.exit(main())
