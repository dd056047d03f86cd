"""The exit codes every command keeps (README: Commands, Operations), and the one way to stop on an error.

0 done; :attr:`Exit.FAILED` the operation failed or found a problem (an unknown id, Redis or the
database unreachable, the receiver refused); :attr:`Exit.USAGE` bad usage or configuration.
"""

from __future__ import annotations

import re
import sys
from enum import IntEnum
from typing import NoReturn

import click


class Exit(IntEnum):
    FAILED = 1
    USAGE = 2


def fail(message: str, code: Exit) -> NoReturn:
    """One line on stderr naming what is wrong, then exit with ``code`` (no default: callers say which).

    A message quoted from elsewhere may span lines (psycopg's do): its lines are joined with "; "."""
    line = re.sub(r"\s*\n[\s;]*", "; ", message.strip())
    click.echo(f"bridgehook: {line}", err=True)
    sys.exit(int(code))
