"""The exit codes every command keeps (README: Commands, Operations), and the one way to stop on an error.

0 done; :attr:`Exit.FAILED` the operation failed or found a problem (an unknown id, Redis or the
database unreachable, the receiver refused); :attr:`Exit.USAGE` bad usage or configuration.
"""

from __future__ import annotations

import sys
from enum import IntEnum
from typing import NoReturn

import click


class Exit(IntEnum):
    FAILED = 1
    USAGE = 2


def fail(message: str, code: Exit) -> NoReturn:
    """One line on stderr naming what is wrong, then exit with ``code`` (no default: callers say which)."""
    click.echo(f"bridgehook: {message}", err=True)
    sys.exit(int(code))
