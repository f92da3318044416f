"""One error convention for the entry points in `experiments/`, and clear errors for
command-line config overrides before absl parses them.

A user error (a bad flag, config field, file or value) is reported as ONE line on stderr that
names the field / file / value and what is allowed, with exit status 2 and no traceback
(`--verbose` shows the traceback). A run that starts and then fails for a reason that is not the
user's input (e.g. `TrainingDiverged`) is one line too, with exit status 1.

`ml_collections.config_flags` reports an unknown `--config.train.no_such_key=1` as a bare
`AttributeError: 'no_such_key'`, and a missing config file as a traceback. `check_overrides(argv)`
loads the config file named by `--config=` the same way first and names the unknown key, where it
is, and the keys that exist there; a missing file, a file without `get_config()` or one whose
`get_config()` fails is named with what is expected.

    if __name__ == "__main__":
        run_main(main, default_config="configs/train_base.py")
"""
from __future__ import annotations

import importlib.util
import logging as std_logging
import sys
import traceback
from pathlib import Path
from typing import Callable

from absl import app, flags, logging

from sparse_lm.config import ConfigError
from sparse_lm.data.tfds_source import DataError

EXIT_USER = 2        # bad input: nothing ran (or nothing was changed)
EXIT_FAILED = 1      # the run started and failed (e.g. it diverged)


class ConfigOverrideError(SystemExit):
    pass


class UserError(ValueError):
    """A bad command-line value; the message names it and what is allowed."""


def one_line(e: BaseException | str) -> str:
    """The message of `e` on one line (line breaks become '; ')."""
    text = str(e) if not isinstance(e, BaseException) or str(e) else type(e).__name__
    parts = [p.strip() for p in text.strip().splitlines() if p.strip()]
    return "; ".join(parts)


def _expected(path: str) -> str:
    return "a Python file defining get_config() that returns an ml_collections.ConfigDict"


def _load(path: str):
    p = Path(path)
    if not p.exists():
        raise ConfigOverrideError(f"error: --config={path}: no such file; expected {_expected(path)}")
    if p.is_dir() or p.suffix != ".py":
        raise ConfigOverrideError(f"error: --config={path}: not a Python config file; expected "
                                  f"{_expected(path)}")
    spec = importlib.util.spec_from_file_location("_config_for_check", path)
    if spec is None or spec.loader is None:
        raise ConfigOverrideError(f"error: --config={path}: not a Python config file; expected "
                                  f"{_expected(path)}")
    mod = importlib.util.module_from_spec(spec)
    root = str(Path.cwd())
    if root not in sys.path:       # config files import `configs....` relative to the repository
        sys.path.insert(0, root)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:          # noqa: BLE001 - the user's file: report it in one line
        raise ConfigOverrideError(f"error: --config={path}: importing it failed: "
                                  f"{type(e).__name__}: {one_line(e)}") from e
    if not callable(getattr(mod, "get_config", None)):
        raise ConfigOverrideError(f"error: --config={path}: defines no get_config(); expected "
                                  f"{_expected(path)}")
    try:
        cfg = mod.get_config()
    except Exception as e:          # noqa: BLE001
        raise ConfigOverrideError(f"error: --config={path}: get_config() failed: "
                                  f"{type(e).__name__}: {one_line(e)}") from e
    if not hasattr(cfg, "keys"):
        raise ConfigOverrideError(f"error: --config={path}: get_config() returned "
                                  f"{type(cfg).__name__}; expected {_expected(path)}")
    return cfg


def check_overrides(argv: list[str], default_config: str | None = None, flag: str = "config") -> None:
    """Raise ConfigOverrideError (exit status 2, one clear line) for a config file that is missing
    or not a config file, and for an override of a key that the config does not have. Does
    nothing when no config file is given or defaulted."""
    path = default_config
    overrides = []
    for a in argv[1:]:
        if a == "--":
            break
        if a.startswith(f"--{flag}="):
            path = a.split("=", 1)[1]
        elif a.startswith(f"--{flag}."):
            overrides.append(a[len(flag) + 3:].split("=", 1)[0])
    if overrides and not path:
        raise ConfigOverrideError(f"error: --{flag}.{overrides[0]} given without --{flag}=FILE "
                                  f"(the overrides apply to a config file)")
    if not path:
        return
    cfg = _load(path.split(":")[0])
    for key in overrides:
        node, walked = cfg, []
        for part in key.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(walked) or "the top level"
                raise ConfigOverrideError(
                    f"error: --{flag}.{key}: the config {path} has no key {part!r} under "
                    f"{where}; keys there: {sorted(keys)}")
            node = node[part]
            walked.append(part)


def main_guard(argv=None, default_config: str | None = None) -> None:
    """Call at the top of a launcher's `__main__` block (run_main does it for you)."""
    try:
        check_overrides(sys.argv if argv is None else argv, default_config)
    except ConfigOverrideError as e:
        print(e, file=sys.stderr)
        raise SystemExit(EXIT_USER)


# Errors that are the user's input: one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, UserError,
                                                FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)


def _verbose_requested(argv) -> bool:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
               for a in argv[1:])


def report(e: BaseException, *, prefix: str = "error", verbose: bool = False,
           with_type: bool = False) -> None:
    if verbose:
        traceback.print_exception(e, file=sys.stderr)
    name = f"{type(e).__name__}: " if with_type else ""
    print(f"{prefix}: {name}{one_line(e)}", file=sys.stderr, flush=True)


# Loggers of this project (a module's `logging.getLogger(__name__)`; "__main__" is the entry point
# run with `python -m`): INFO by default, while other libraries' INFO lines (orbax logs every
# save and restore) stay hidden unless --verbosity asks for them.
PROJECT_LOGGERS = ("sparse_lm", "experiments", "__main__")


def configure_logging() -> None:
    """Log levels of an entry point (messages go to stderr through absl's handler). absl's
    --verbosity (-v), when given, sets the level of every logger (-1 warning, 0 info, 1 debug);
    without it the project's messages show from INFO and other libraries' from WARNING."""
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        level = std_logging.NOTSET                    # follow the root level --verbosity set
    else:
        logging.set_verbosity(logging.WARNING)
        level = std_logging.INFO
    for name in PROJECT_LOGGERS:
        std_logging.getLogger(name).setLevel(level)


def run_main(main: Callable, *, default_config: str | None = None, config_flag: str | None = "config",
             user_errors: tuple = (), runtime_errors: tuple = (), argv=None) -> None:
    """`absl.app.run(main)` with the one error convention: the config file and its `--config.*`
    overrides are checked before anything runs; flag errors, `app.UsageError` and `user_errors`
    (plus USER_ERRORS) print one line and exit 2; `runtime_errors` print one line (with the
    error's type) and exit 1. `--verbose` adds the traceback. Log levels: `configure_logging`."""
    argv = list(sys.argv if argv is None else argv)
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show the traceback of an error.")
    verbose = _verbose_requested(argv)
    if config_flag:
        try:
            check_overrides(argv, default_config, config_flag)
        except ConfigOverrideError as e:
            if verbose:
                traceback.print_exception(e, file=sys.stderr)
            print(e, file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER) from None

    def parse(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            if verbose:
                traceback.print_exception(e, file=sys.stderr)
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER) from None

    users = USER_ERRORS + tuple(user_errors)

    def wrapped(args):
        configure_logging()
        try:
            return main(args)
        except app.UsageError as e:
            report(e, verbose=verbose)
            raise SystemExit(EXIT_USER) from None
        except users as e:
            report(e, verbose=verbose)
            raise SystemExit(EXIT_USER) from None
        except tuple(runtime_errors) as e:
            report(e, verbose=verbose, with_type=True)
            raise SystemExit(EXIT_FAILED) from None

    app.run(wrapped, argv=argv, flags_parser=parse)


def exit_with(e: BaseException, code: int = EXIT_USER, *, with_type: bool = False) -> None:
    """Report `e` in one line (traceback too with --verbose) and exit with `code`."""
    verbose = bool(flags.FLAGS["verbose"].value) if "verbose" in flags.FLAGS else False
    report(e, verbose=verbose, with_type=with_type)
    raise SystemExit(code) from None
