"""How the commands end on a user's error: one `error: ...` line and status 2.

A bad config, data or workdir, a damaged checkpoint or a full disk raises `ValueError` or
`OSError` (or `WorkdirBusyError`) with a message that names the file or field and what to do;
the traceback adds nothing for the user, so the commands print only the message (`--debug`
shows the traceback). Any other exception keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys

from absl import logging

from clca_jax.training.workdirs import WorkdirBusyError

EXIT_CODE = 2
USER_ERRORS = (ValueError, OSError, WorkdirBusyError)


@contextlib.contextmanager
def reported(debug: bool = False):
    """Ends the process with one error line when the body raises a user error."""
    try:
        yield
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        logging.flush()
        # A failed save or restore leaves orbax's background reads or writes unfinished;
        # ending here skips the interpreter's teardown, which would print each of them as an
        # ignored exception and bury the line above.
        os._exit(EXIT_CODE)
