"""The direction of imports, and the jobs the receiver names by dotted path."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from service.events import JOB_FUNCTIONS

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_service_never_imports_workers_the_api_or_the_cli() -> None:
    assert not imported_packages("service") & {"workers", "api", "bridgehook", "fakebridge"}


def test_workers_never_import_the_api_the_cli_or_the_fake() -> None:
    assert not imported_packages("workers") & {"api", "bridgehook", "fakebridge"}


def test_the_api_never_imports_the_cli_or_the_fake() -> None:
    """The API may use the receiver's and the workers' code (it needs the database and Bridge)."""
    assert not imported_packages("api") & {"bridgehook", "fakebridge"}
    assert {"service", "workers"} <= imported_packages("api")


@pytest.mark.parametrize("dotted", sorted(JOB_FUNCTIONS.values()))
def test_every_job_the_receiver_names_is_importable(dotted: str) -> None:
    module, _, name = dotted.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
