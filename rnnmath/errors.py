"""The one exception a user can cause and fix.

Exit codes of the ``rnnmath`` command: 0 success; 2 bad usage or bad data (a ``UserError`` or an argparse
error); 1 an internal error (a bug: set ``RNNMATH_DEBUG=1`` to see its traceback); 130 stopped by Ctrl-C
after saving a checkpoint.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input: its message is one sentence naming the file and 1-based line (or the
    flag) and what was expected. The CLI prints it as ``rnnmath: error: <message>`` and exits with 2."""


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved; the message says where and how to resume (exit 130)."""
