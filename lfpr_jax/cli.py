"""One exit path for the command-line entry points.

A user error (missing file, malformed argument, corrupt input, refused overwrite) ends
a command with ONE line on stderr, `error: <message>`, and exit status 1; malformed
arguments (`UsageError`, and everything `ArgumentParser` rejects) exit with 2, as
argparse does. Bugs still show their traceback. `--debug` on the command line (any
command using `ArgumentParser` accepts it) or `LFPR_DEBUG=1` in the environment shows
the traceback of user errors too.

    parser = cli.ArgumentParser(prog="python -m converters.torch_to_flax")
    ...

    @cli.command
    def main(argv=None) -> int:
      args = parser.parse_args(argv)
      ...
      return 0

    if __name__ == "__main__":
      sys.exit(main())
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

DEBUG_ENV = "LFPR_DEBUG"
DEBUG_FLAG = "--debug"

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
# ValueError covers the project's own (ConversionError, TorchFileError,
# atomic.ForeignDirectoryError, cache.CorruptCacheError, json.JSONDecodeError);
# OSError covers FileNotFoundError, NotADirectoryError, PermissionError,
# FileExistsError, IsADirectoryError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


class UsageError(Exception):
  """Malformed command-line arguments (exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` that raises `UsageError` instead of printing usage.

  Adds `--debug` (see the module docstring). `--help` still prints and exits 0.
  """

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    super().__init__(*args, **kwargs)
    self.add_argument(DEBUG_FLAG, action="store_true",
                      help=f"show tracebacks of errors (or set {DEBUG_ENV}=1)")

  def error(self, message: str) -> NoReturn:
    raise UsageError(f"{message} (see {self.prog} --help)")


def debug_requested(argv: Sequence[str] | None) -> bool:
  """Whether `--debug` is among the options of `argv` (default `sys.argv[1:]`) or the
  environment sets `LFPR_DEBUG` to a non-empty value other than 0."""
  if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
    return True
  args = sys.argv[1:] if argv is None else list(argv)
  options = args[:args.index("--")] if "--" in args else args
  return DEBUG_FLAG in options


def message(e: BaseException) -> str:
  """The one-line text of a user error."""
  if isinstance(e, OSError) and e.strerror and e.filename is not None:
    # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
    text = f"{e.filename}: {e.strerror}"
    if e.filename2 is not None:
      text += f" (-> {e.filename2})"
  else:
    text = str(e) or type(e).__name__
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def run(main_fn: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None) -> int:
  """Calls `main_fn(argv)` and turns user errors into one stderr line and an exit.

  Returns:
    `main_fn`'s exit status (None counts as 0).

  Raises:
    SystemExit: 1 after a user error, 2 after a usage error, 130 after Ctrl-C (each
      with its one line on stderr); or whatever `main_fn` itself exits with.
  """
  debug = debug_requested(argv)
  try:
    status = main_fn(argv)
  except UsageError as e:
    if debug:
      raise
    fail(message(e), 2)
  except USER_ERRORS as e:
    if debug:
      raise
    fail(message(e), 1)
  except KeyboardInterrupt:
    if debug:
      raise
    fail("interrupted", 130)
  return 0 if status is None else int(status)


def fail(text: str, status: int) -> NoReturn:
  """Prints `error: <text>` (one line) to stderr and exits with `status`."""
  print(f"error: {text}", file=sys.stderr)
  sys.stderr.flush()
  raise SystemExit(status)


def command(main_fn: Callable[[Sequence[str] | None], int | None]
            ) -> Callable[[Sequence[str] | None], int]:
  """Decorator form of `run`: `main(argv=None)` with the one exit path."""
  @functools.wraps(main_fn)
  def wrapper(argv: Sequence[str] | None = None) -> int:
    return run(main_fn, argv)
  return wrapper
