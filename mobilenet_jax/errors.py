"""Errors written for people, and the one place that turns them into a line on stderr and an exit code.

Library functions raise :class:`UserError` subclasses (or the built-in errors listed
in :data:`USER_ERRORS`) whose message is one sentence saying what is wrong and what
to do. Every command-line entry point runs through :func:`run` (argparse programs)
or :func:`absl_main` / :func:`parse_absl_flags` (absl programs), which print
``error: <sentence>`` and exit with status 1 (2 for a bad command line), never a
traceback; ``--verbosity=1`` (absl) or ``MOBILENET_JAX_TRACEBACK=1`` shows the
traceback of such an error for debugging.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class UserError(ValueError):
    """Something the user asked for cannot work; the message says what and what to do."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the field."""


class DatasetError(UserError):
    """A dataset cannot be found, prepared or read as configured."""


class CheckpointError(UserError):
    """No usable checkpoint or model directory where one was named."""


class DivergenceError(UserError, FloatingPointError):
    """Training produced a non-finite loss or update."""


# Errors whose message is written for the user; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)


def sentence(error: BaseException) -> str:
    """The error's message as one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def exit_with(message: str, status: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _show_traceback() -> bool:
    if os.environ.get("MOBILENET_JAX_TRACEBACK"):
        return True
    try:
        from absl import flags

        return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1
    except (ImportError, KeyError, AttributeError):
        return False


def run(main: Callable[[], int | None]) -> NoReturn:
    """Runs ``main`` and exits: its return value (0 for None), or 1 with one sentence for a user error."""
    try:
        status = main()
    except USER_ERRORS as error:
        if _show_traceback():
            traceback.print_exc()
        exit_with(sentence(error))
    except KeyboardInterrupt:
        exit_with("interrupted.", 130)
    sys.exit(status or 0)


def absl_main(main: Callable[[], int | None]) -> Callable[[Sequence[str]], NoReturn]:
    """Wraps an absl ``main()`` (no argv) for ``app.run(..., flags_parser=parse_absl_flags)``."""

    def wrapped(argv: Sequence[str]) -> NoReturn:
        if len(argv) > 1:
            exit_with(f"unexpected argument(s) {list(argv[1:])}; every option is a --flag.", 2)
        run(main)

    return wrapped


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing with one-sentence errors (exit 2) for bad flags and bad ``--config.*`` overrides."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except Exception as error:  # absl and ml_collections raise many kinds for one bad command line
        exit_with(_flag_error_message(error, argv), 2)


def _flag_error_message(error: Exception, argv: Sequence[str]) -> str:
    plain = sentence(error).removeprefix("FATAL Flags parsing error: ").rstrip(".") + "."
    config_arg = _flag_value(argv, "config")
    overrides = [a[len("--config.") :].partition("=") for a in argv if a.startswith("--config.")]
    if config_arg is None or not overrides:
        return plain
    try:
        config = load_config(config_arg)
    except Exception as load_error:
        return f"cannot load the config {config_arg!r} ({sentence(load_error)})."
    for path, _, value in overrides:
        problem = _override_problem(config, path, value)
        if problem:
            return problem
    return plain


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config(config_arg: str) -> Any:
    """``get_config(arg)`` of a config file named as on the command line (``path.py[:arg]``)."""
    path, _, arg = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("mobilenet_jax_config_file", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None) if arg else module.get_config()


def _fields(config: Any, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if hasattr(value, "items"):
            out += _fields(value, prefix + key + ".")
    return out


def _override_problem(config: Any, path: str, value: str) -> str | None:
    """One sentence for an override that names no field or gives a value the field cannot take."""
    node = config
    for part in path.split("."):
        if not hasattr(node, "items") or part not in node:
            fields = _fields(config)
            same_name = [f for f in fields if f.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]]
            close = same_name or difflib.get_close_matches(path, fields, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
            return f"unknown config field {path!r} in --config.{path}={value}{hint}"
        node = node[part]
    if hasattr(node, "items"):
        return (
            f"config field {path!r} is a group of fields ({', '.join(sorted(node))}); "
            f"set one of them, e.g. --config.{path}.{next(iter(sorted(node)))}=..."
        )
    return None
