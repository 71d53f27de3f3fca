"""How the launch programs run: absl's `app.run`, quiet logs, and every error a user can cause as
one last line.

Every program in launch/ ends with `program.run(main)` (train.py passes its config-aware
`flags_parser`). The runner

* logs at WARNING by default: absl and Python logging, and with them the INFO chatter of orbax,
  JAX and grain, are silenced; `--verbose` (defined here, once for every program) shows INFO
  logs and, for user errors, the traceback above the error line;
* turns a flag that does not parse into `error: ...` (exit status 2);
* turns the errors a user can cause into ONE line `error: ...` on stderr, the last line of the
  output (exit status 1): ValueError / FileNotFoundError / FileExistsError raised by the library
  with a message naming the culprit, and I/O errors (permission denied, read-only file system,
  full disk, a directory where a file is expected, ...) named by their path;
* after any failure, flushes the output and ends the process at once (`os._exit`), so that
  background threads (orbax's asynchronous writers, data-loading workers) can neither keep it
  alive nor print after the error line.

Anything else is a bug and keeps its traceback (also ending the process at once).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

VERBOSE = flags.DEFINE_bool("verbose", False, "show INFO logs (orbax, JAX, grain, progress "
                            "details) and the traceback of errors")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)

EXIT_ERROR = 1   # a user error or a bug
EXIT_USAGE = 2   # a command line that does not parse

# Python loggers of libraries whose INFO records are chatter for a user of the programs (orbax
# and grain mostly log through absl, which `absl_logging.set_verbosity` covers).
LIBRARY_LOGGERS = ("jax", "jaxlib", "orbax", "grain", "tensorstore", "etils")

# Longest error line printed (a library message can embed a whole tree of shapes); --verbose
# shows the full message in the traceback.
MAX_ERROR_CHARS = 2000


def configure_logging(verbose: bool) -> None:
    """WARNING and above by default; INFO with --verbose (unless --verbosity was given)."""
    if flags.FLAGS["verbosity"].present:   # absl's own flag, given explicitly: it decides
        return
    level = logging.INFO if verbose else logging.WARNING
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    logging.getLogger().setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def one_line(message: object) -> str:
    """A message as one line: whitespace runs (newlines included) become single spaces."""
    text = " ".join(str(message).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + " ... (--verbose shows the whole message)"
    return text


def _io_path(error: OSError) -> str | None:
    """The path an I/O error is about: its own filename, or one of the errors it came from."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.filename is not None:
            path = os.fsdecode(error.filename)
            if getattr(error, "filename2", None) is not None:
                path += f" -> {os.fsdecode(error.filename2)}"
            return path
        error = error.__cause__ or error.__context__
    return None


def describe_io_error(error: OSError) -> str:
    """One line for an I/O error: the path, what went wrong, and a hint where it helps."""
    reason = error.strerror or one_line(error) or type(error).__name__
    path = _io_path(error)
    hints = {errno.ENOSPC: " (the disk is full: free space or choose another directory)",
             errno.EROFS: " (the file system is read-only: choose a writable directory)",
             errno.EACCES: " (check the permissions, or choose another path)",
             errno.EPERM: " (check the permissions, or choose another path)",
             errno.EISDIR: " (a file path is expected here)",
             errno.ENOTDIR: " (a part of the path is a file, not a directory)"}
    hint = hints.get(error.errno, "")
    return f"{path}: {reason}{hint}" if path else f"{reason}{hint}"


def fail(message: str, status: int = EXIT_ERROR) -> None:
    """Prints `error: message` as the last line of the output and ends the process now.

    Logging is switched off first and the process ends with `os._exit`, so nothing (a logging
    background thread, an atexit hook, a non-daemon writer thread) prints after the line or
    keeps the process alive.
    """
    _quiet_other_threads()
    _flush()
    # Other threads may still be printing (a failed checkpoint save's event loop): fd 2 goes to
    # /dev/null first and the line is written to a saved copy of it, so nothing can follow it.
    error_stream = _close_stderr()
    line = f"error: {one_line(message)}\n".encode()
    try:
        os.write(2 if error_stream is None else error_stream, line)
    except OSError:  # no stderr at all: the exit status still says it
        pass
    os._exit(status)


def _quiet_other_threads() -> None:
    """No more logs, and no tracebacks from other threads (e.g. a checkpoint writer's event loop
    failing as the process goes down): the error line must be the last one."""
    logging.disable(logging.CRITICAL)
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda args: None  # "Exception ignored in ..." from finalisers


def _close_stderr() -> int | None:
    """Points file descriptor 2 at /dev/null, so no thread can print after the error line in
    the moment before `os._exit`; returns a descriptor of the old stderr (None if it failed)."""
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        return saved
    except OSError:
        return None


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: nothing more can be shown
            pass


def _exit_now(status: int) -> None:
    _quiet_other_threads()
    _flush()
    _close_stderr()
    os._exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one `error:` line instead of a usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {one_line(e)} (--help lists the flags)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], None],
        flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
    """`app.run(main)` with quiet logs and one-line errors (see the module docstring)."""

    def guarded(argv: list[str]) -> None:
        configure_logging(VERBOSE.value)
        try:
            main(argv)
        except SystemExit as e:
            if e.code in (None, 0):
                raise
            if isinstance(e.code, int):   # the program printed its own message
                _exit_now(e.code)
            fail(str(e.code).removeprefix("error: "))   # sys.exit("error: ...") or a message
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (*USER_ERRORS, OSError) as e:   # OSError: permission denied, full disk, ...
            if VERBOSE.value:
                traceback.print_exc()
            if isinstance(e, OSError) and (e.strerror or not isinstance(e, USER_ERRORS)):
                fail(describe_io_error(e))   # raised by the OS: name the path
            fail(str(e))                     # raised by our code: the message names the culprit
        except BaseException:   # a bug: keep the traceback, but do not hang on worker threads
            logging.disable(logging.CRITICAL)
            _flush()
            traceback.print_exc()
            _exit_now(EXIT_ERROR)

    app.run(guarded, flags_parser=flags_parser)
