"""How the launch programs run: absl's `app.run`, with the errors a user can cause as one line.

A bad flag value, a missing file or a checkpoint that does not fit raises ValueError /
FileNotFoundError / FileExistsError inside the library, with a message naming the culprit; a
program prints that message as `error: ...` on stderr and exits with status 1 instead of
showing a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)`, turning user errors into one `error:` line."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except USER_ERRORS as e:
            sys.exit(f"error: {e}")

    app.run(guarded)
