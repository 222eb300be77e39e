"""The one place that turns errors into a line on stderr and an exit code, for every command.

Every command is an absl program (one CLI framework: ``config_flags`` gives
``--config.field=value`` overrides), defines its flags only when run as the entry
point, and runs through :func:`run` or :func:`absl_main` with :func:`parse_absl_flags`, which print
``error: <sentence>`` and exit with status 1 (2 for a bad command line), never a
traceback; ``--verbosity=1`` (absl) or ``MOBILENET_JAX_TRACEBACK=1`` shows the
traceback of such an error for debugging. :func:`load_config` reads a config file
named as on the command line (``path.py[:options]``).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from mobilenet_jax.errors import USER_ERRORS, sentence


def exit_with(message: str, status: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def quiet_logging() -> None:
    """Warnings and errors only from absl logging, unless ``--verbosity`` was given (every command calls it)."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


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
        exit_with(flag_error_message(error, argv), 2)


def flag_error_message(error: Exception, argv: Sequence[str]) -> str:
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


# ----------------------------------------------------------------------------- the commands

# `mobilenet-jax COMMAND ...` runs the run_command() of COMMAND's module, as `python -m MODULE ...`
# does (train: train_command() below, what train.py runs).
COMMANDS = {
    "train": None,
    "evaluate": "mobilenet_jax.evaluate",
    "export": "mobilenet_jax.deployment.export",
    "prune": "mobilenet_jax.compression.prune_cli",
    "convert": "mobilenet_jax.weights.convert_cli",
    "summary": "mobilenet_jax.summary",
}


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``mobilenet-jax <train|evaluate|export|prune|convert|summary> ...`` console script."""
    import importlib

    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        exit_with(f"usage: mobilenet-jax {{{'|'.join(COMMANDS)}}} [flags]; each command has --help.", 2)
    command = argv[1]
    sys.argv = [f"mobilenet-jax {command}", *argv[2:]]
    if COMMANDS[command] is None:
        train_command()
    importlib.import_module(COMMANDS[command]).run_command()
    sys.exit(0)


def quiet_tensorflow() -> None:
    """Keeps TensorFlow (the input pipeline, the LiteRT converter) from printing its INFO lines when it loads
    ("oneDNN custom operations are on", the CPU-feature notice, absl's "before InitializeLog" warning), which
    read as errors: INFO off, and TensorFlow's own oneDNN graph rewrites off (what it announces; the
    commands run no TensorFlow matrix products or convolutions). Environment values already set win."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def run_absl(define_flags: Callable[[], None], main: Callable[[list[str]], Any]) -> NoReturn:
    """Defines a command's flags (only now: importing a module defines none) and runs ``main`` under absl,
    with TensorFlow quiet (:func:`quiet_tensorflow`; set before anything imports it)."""
    from absl import app

    quiet_tensorflow()
    define_flags()
    app.run(main, flags_parser=parse_absl_flags)


def _define_train_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training config file (configs/v1.py or configs/v2.py).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
    flags.mark_flags_as_required(["config", "workdir"])


def _train() -> None:
    from absl import flags

    from mobilenet_jax import host

    FLAGS = flags.FLAGS
    quiet_logging()  # the progress bar and metrics.jsonl report progress
    host.configure_cpu_allocator()  # before XLA or TensorFlow start threads; see host.py for the measured effect
    host.enable_compilation_cache(FLAGS.config.compilation_cache_dir)
    import tensorflow as tf

    # TensorFlow only feeds data; keep it off the accelerators JAX uses.
    tf.config.experimental.set_visible_devices([], "GPU")

    from mobilenet_jax.training import distributed
    from mobilenet_jax.training import loop as training

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def train_command() -> NoReturn:
    """``python train.py`` and ``mobilenet-jax train``: the flags, then the training run."""
    run_absl(_define_train_flags, absl_main(_train))
