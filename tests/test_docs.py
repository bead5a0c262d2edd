"""The error-code reference (docs/error-codes.md) lists every code the program can raise."""

from __future__ import annotations

import re
from pathlib import Path

import triage_app.central.errors  # noqa: F401 - its codes join the exception tree
from triage_app import cli, cli_common
from triage_app.errors import TriageError
from triage_app.ordered_pool import WORKER_CRASHED

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "error-codes.md"


def _all_codes() -> set[str]:
    codes: set[str] = set()
    pending: list[type[TriageError]] = [TriageError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not TriageError:
            codes.add(cls.code)
    return codes | {WORKER_CRASHED}


def _table_codes(text: str) -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))


def test_every_error_code_has_a_row_in_the_reference() -> None:
    listed = _table_codes(REFERENCE.read_text(encoding="utf-8"))
    missing = sorted(_all_codes() - listed)
    assert not missing, f"docs/error-codes.md has no row for {missing}"


def test_the_reference_lists_no_code_the_program_does_not_have() -> None:
    listed = _table_codes(REFERENCE.read_text(encoding="utf-8"))
    assert listed, "no code rows found: the table format changed"
    assert sorted(listed - _all_codes()) == []


def test_every_exit_status_has_a_row_in_the_reference() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    statuses = {
        cli_common.EXIT_OK,
        cli_common.EXIT_SOME_FAILED,
        cli_common.EXIT_USAGE,
        cli.EXIT_INTERNAL,
        cli.EXIT_BROKEN_PIPE,
    }
    listed = {int(n) for n in re.findall(r"^\| `(\d+)` \|", text, flags=re.MULTILINE)}
    assert sorted(statuses - listed) == []
