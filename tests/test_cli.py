"""cli: one `error:` line and an exit status for user errors, tracebacks for bugs."""

import json

import pytest

from lfpr_jax import cli


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


@cli.command
def _main(argv=None):
  parser = cli.ArgumentParser(prog="demo")
  parser.add_argument("--path")
  parser.add_argument("--n", type=int, default=1)
  parser.add_argument("--fail", choices=["value", "missing", "perm", "json", "usage",
                                         "bug", "multiline"])
  args = parser.parse_args(argv)
  if args.fail == "value":
    raise ValueError("--n must be positive, got -1")
  if args.fail == "missing":
    open(args.path)
  if args.fail == "perm":
    raise PermissionError(13, "Permission denied", args.path)
  if args.fail == "json":
    json.loads("{")
  if args.fail == "usage":
    raise cli.UsageError("--a and --b exclude each other")
  if args.fail == "bug":
    raise KeyError("internal")
  if args.fail == "multiline":
    raise ValueError("first\n  second")
  return 0


def test_success_returns_status():
  assert _main(["--n", "3"]) == 0


@pytest.mark.parametrize("argv,status,text", [
    (["--fail", "value"], 1, "error: --n must be positive, got -1"),
    (["--fail", "missing", "--path", "/no/such/file"], 1,
     "error: /no/such/file: No such file or directory"),
    (["--fail", "perm", "--path", "/root/x"], 1, "error: /root/x: Permission denied"),
    (["--fail", "json"], 1, "error: Expecting property name"),
    (["--fail", "usage"], 2, "error: --a and --b exclude each other"),
    (["--n", "two"], 2, "error: argument --n: invalid int value: 'two' (see demo --help)"),
    (["--bogus"], 2, "error: unrecognized arguments: --bogus"),
    (["--fail", "multiline"], 1, "error: first second"),
])
def test_user_errors_are_one_line(capsys, monkeypatch, argv, status, text):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit) as e:
    _main(argv)
  assert e.value.code == status
  assert _one_error_line(capsys).startswith(text)


def test_bugs_keep_their_traceback(monkeypatch):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  with pytest.raises(KeyError, match="internal"):
    _main(["--fail", "bug"])


def test_debug_flag_and_env_show_the_exception(monkeypatch, capsys):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  with pytest.raises(ValueError, match="must be positive"):
    _main(["--fail", "value", "--debug"])
  with pytest.raises(cli.UsageError):
    _main(["--fail", "usage", "--debug"])
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(ValueError, match="must be positive"):
    _main(["--fail", "value"])
  monkeypatch.setenv(cli.DEBUG_ENV, "0")
  with pytest.raises(SystemExit):
    _main(["--fail", "value"])
  capsys.readouterr()
  # After "--" it is an argument, not the switch.
  assert not cli.debug_requested(["--", "--debug"])


def test_help_still_exits_zero(capsys):
  with pytest.raises(SystemExit) as e:
    _main(["--help"])
  assert e.value.code == 0
  assert "--debug" in capsys.readouterr().out


def test_interrupt(monkeypatch, capsys):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

  def interrupted(argv):
    raise KeyboardInterrupt
  with pytest.raises(SystemExit) as e:
    cli.run(interrupted, [])
  assert e.value.code == 130
  assert _one_error_line(capsys) == "error: interrupted"
