"""Trains a masked-diffusion LM: the same command on a laptop CPU and on every host of a TPU pod.

    python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny
    python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny --config.train.steps=10
    python launch/train.py --config=configs/llada_8b.py:/data/llada_tokenizer \\
        --workdir=gs://bucket/run --config.data.source=tfds:NAME      # on each pod host

Any config field can be overridden with `--config.SECTION.FIELD=VALUE`. Re-running with the
same `--workdir` resumes from its latest intact checkpoint (same batches, same noise); re-running
a finished run says so and exits 0. Progress lines (step, loss, tokens/s, ETA) go to stderr.

Errors end the program with one line, `error: ...`, on stderr: exit status 2 for a bad flag or
config value (nothing was started), 1 for a run that stopped (divergence, a workdir trained with
another config or without an intact checkpoint, bad data, an I/O error such as a full disk or a
read-only workdir). Committed checkpoints are never touched by a failure.
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys

import program
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config preset, e.g. configs/tiny.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and TensorBoard "
                               "events (local or gs://)")
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "also show the INFO logs of orbax and "
                                  "grain (checkpoint and input-pipeline internals)")

EXIT_FAILURE = 1  # the run started and stopped
EXIT_USAGE = 2    # a bad flag or config value: nothing was started


def _fail(message: object, status: int = EXIT_USAGE) -> None:
    """Prints `error: ...` as the last line and exits. A run that stopped exits at once
    (os._exit): storage threads of a failed save may still be unwinding, and must neither keep
    the process alive nor print after the error line."""
    line = f"error: {' '.join(str(message).split())}"
    if status == EXIT_USAGE:
        print(line, file=sys.stderr, flush=True)
        sys.exit(status)
    py_logging.disable(py_logging.CRITICAL)
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(status)


def _one_line(error: BaseException) -> str:
    """An exception's message; of an embedded traceback (config file errors) only the end."""
    message = str(error)
    if "Traceback" in message:
        head = message.split("Traceback")[0].strip()
        tail = [line for line in message.splitlines() if line.strip()][-1].strip()
        message = f"{head} {tail}"
    return message


def unknown_field_message(error: BaseException, argv: list[str]) -> str:
    """`--config.train.learnig_rate=1` -> one line naming the field, the flag and the
    suggestion of ml_collections (whose KeyError message is a repr with a newline in it)."""
    while isinstance(error, (AttributeError, KeyError)) and error.args and isinstance(
            error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    field = text.split("\n")[0].strip().strip("'\"")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    flag = next((o for o in overrides if field in o.split(".")), None)
    message = f"unknown config field '{field}'"
    message += f" in {flag}" if flag else f" in {overrides}"
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    if suggestion:
        message += f"; did you mean '{suggestion.group(1)}'?"
    return message + " (fields are listed in llada_jax/config.py)"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error instead of a usage dump or a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(_one_line(e))
    except (AttributeError, KeyError) as e:  # --config.X.Y=... naming a field that does not exist
        _fail(unknown_field_message(e, argv))
    except (ValueError, OSError, SyntaxError) as e:
        _fail(_one_line(e))


class _QuietLibraries(py_logging.Filter):
    """Drops INFO records of orbax, grain and JAX's backend probing (one line per checkpoint
    event or missing platform), and the ERROR records of a failed asynchronous save (orbax's
    and asyncio's tracebacks from background threads): the trainer raises that failure again,
    as one line."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno == py_logging.ERROR and (
                "/orbax/" in record.pathname or ("/asyncio/" in record.pathname and
                                                 "never retrieved" in record.getMessage())):
            return False
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "xla_bridge"))
        return record.levelno >= py_logging.WARNING or not noisy


def _without_closed_loop_reports(hook):
    """After a failed asynchronous save, tensorstore's writer threads still call back into the
    save's event loop, which orbax has closed; each call prints a `RuntimeError: Event loop is
    closed` traceback (through sys.excepthook). They say nothing the error line does not."""
    def excepthook(kind, value, traceback):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        hook(kind, value, traceback)
    return excepthook


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (config fields are set as "
              f"--config.SECTION.FIELD=VALUE)")
    if _CONFIG.value is None:
        _fail("--config is required, e.g. --config=configs/tiny.py")
    if not _WORKDIR.value:
        _fail("--workdir is required")
    if not _LIBRARY_LOGS.value:
        for handler in py_logging.getLogger().handlers:  # absl's handler sits on the root logger
            handler.addFilter(_QuietLibraries())
        sys.excepthook = _without_closed_loop_reports(sys.excepthook)
    try:
        config = _CONFIG.value
        config.train  # a config file that failed to load raises here  # noqa: B018
    except OSError as e:
        _fail(_one_line(e))

    # Imported after flag parsing so that `--help` and flag errors are instant.
    from llada_jax import config as config_lib
    from llada_jax.data import validation as data_validation

    try:
        config_lib.validate(config)  # everything that does not need JAX or the devices, first
        data_validation.check(config)
    except ValueError as e:
        _fail(e)

    from llada_jax.train import trainer

    try:
        setup = trainer.prepare(config)  # devices, tokenizer, mesh: still nothing started
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    try:
        result = trainer.train(config, _WORKDIR.value, setup=setup)
    except (ValueError, OSError, trainer.TrainingDiverged) as e:
        # A bad init_from or data file, a workdir of another config, divergence, a full disk:
        # one line. The trainer has already finished or abandoned its pending save and closed
        # its threads, so exiting cannot hang. Anything else is a bug and keeps its traceback.
        _fail(e, EXIT_FAILURE)
    if result.history:
        last = result.history[-1]
        print(f"done: step {last['step'] + 1}, loss {last['loss']:.4f}, accuracy "
              f"{last['accuracy']:.3f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    program.run(main, flags_parser=_parse_flags)
