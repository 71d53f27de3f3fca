"""Trains a masked-diffusion LM: the same command on a laptop CPU and on every host of a TPU pod.

    python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny
    python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny --config.train.steps=10
    python launch/train.py --config=configs/llada_8b.py:/data/llada_tokenizer \\
        --workdir=gs://bucket/run --config.data.source=tfds:NAME      # on each pod host

Any config field can be overridden with `--config.SECTION.FIELD=VALUE`. Re-running with the
same `--workdir` resumes from its latest checkpoint (same batches, same noise). A bad flag or
config value stops the program with one line, `error: ...`, on stderr and exit status 2.
"""

from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config preset, e.g. configs/tiny.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and TensorBoard "
                               "events (local or gs://)")
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "also show the INFO logs of orbax and "
                                  "grain (checkpoint and input-pipeline internals)")

EXIT_USAGE = 2


def _fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _one_line(error: BaseException) -> str:
    """An exception's message; of an embedded traceback (config file errors) only the end."""
    message = str(error)
    if "Traceback" in message:
        head = message.split("Traceback")[0].strip()
        tail = [line for line in message.splitlines() if line.strip()][-1].strip()
        message = f"{head} {tail}"
    return message


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error instead of a usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(_one_line(e))
    except (AttributeError, KeyError) as e:  # --config.X.Y=... naming a field that does not exist
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        _fail(f"unknown config field {str(e).strip(chr(34))} in {overrides} (fields are listed "
              f"in llada_jax/config.py)")
    except (ValueError, OSError, SyntaxError) as e:
        _fail(_one_line(e))


class _QuietLibraries(py_logging.Filter):
    """Drops INFO records of orbax, grain and JAX's backend probing (one line per checkpoint
    event or missing platform); warnings and errors always pass."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "xla_bridge"))
        return record.levelno >= py_logging.WARNING or not noisy


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
    try:
        config = _CONFIG.value
        config.train  # a config file that failed to load raises here  # noqa: B018
    except OSError as e:
        _fail(_one_line(e))

    # Imported after flag parsing so that `--help` and flag errors are instant.
    from llada_jax import config as config_lib
    from llada_jax.data.tokenizer import load_tokenizer

    try:
        config_lib.validate(config)  # everything that does not need the devices, first
        tokenizer = load_tokenizer(config.data.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)

    import jax

    from llada_jax import parallel
    from llada_jax.train import trainer

    try:
        trainer.check_tokenizer(config, tokenizer)
        parallel.maybe_initialize_distributed()
        config_lib.validate(config, jax.device_count())
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    try:
        result = trainer.train(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:
        # User errors found while building the run (a bad init_from, a data source that does not
        # exist) still get one line; anything else keeps its traceback.
        if isinstance(e, FileNotFoundError) or str(e).startswith("config."):
            _fail(e)
        raise
    if result.history:
        last = result.history[-1]
        logging.info("done: step %d, loss %.4f, accuracy %.3f", last["step"] + 1, last["loss"],
                     last["accuracy"])


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
