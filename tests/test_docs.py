"""The error-code reference (docs/error-codes.md) lists every code the program can raise."""

from __future__ import annotations

import re
from pathlib import Path

import triage_app.central.errors  # noqa: F401 - its codes join the exception tree
from triage_app import cli, cli_common
from triage_app.central import app as central_app
from triage_app.errors import TriageError
from triage_app.ordered_pool import WORKER_CRASHED

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "error-codes.md"
CENTRAL_APP = Path(central_app.__file__)
#: A code the central API writes as a literal: ``error_response(404, "unknown_case", ...)``.
_LITERAL_CODE = re.compile(r'error_response\(\s*\d{3},\s*"([a-z_]+)"')


def _central_api_codes() -> set[str]:
    """The codes the central API answers with besides its exceptions': those it declares
    (``API_ERROR_CODES``) and any it writes as a literal, so that a new one needs a row too."""
    literals = set(_LITERAL_CODE.findall(CENTRAL_APP.read_text(encoding="utf-8")))
    return set(central_app.API_ERROR_CODES) | literals


def _all_codes() -> set[str]:
    codes: set[str] = set()
    pending: list[type[TriageError]] = [TriageError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not TriageError:
            codes.add(cls.code)
    return codes | {WORKER_CRASHED} | _central_api_codes()


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
        cli.EXIT_TEMPFAIL,
        cli.EXIT_INTERNAL,
        cli.EXIT_BROKEN_PIPE,
    }
    listed = {int(n) for n in re.findall(r"^\| `(\d+)` \|", text, flags=re.MULTILINE)}
    assert sorted(statuses - listed) == []
    # The row of each code says it exits 75 exactly when its class is temporary.
    rows = dict(re.findall(r"^\| `([a-z_]+)` \|(.*)$", text, flags=re.MULTILINE))
    temporary: set[str] = set()
    pending: list[type[TriageError]] = [TriageError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.temporary:
            temporary.add(cls.code)
    saying_75 = {code for code, row in rows.items() if f"exits `{cli.EXIT_TEMPFAIL}`" in row}
    assert saying_75 == temporary


def test_the_central_api_codes_are_found_and_used() -> None:
    """The literal search still matches app.py's style, and no declared code is stale."""
    source = CENTRAL_APP.read_text(encoding="utf-8")
    assert {"unknown_case", "bad_request"} <= set(_LITERAL_CODE.findall(source))
    unused = [code for code in central_app.API_ERROR_CODES if f'"{code}"' not in source]
    assert unused == []


def test_the_reference_gives_each_server_refusal_the_status_it_is_answered_with() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", text, flags=re.MULTILINE))
    statuses = {**central_app.STATUS_BY_CODE, **central_app.API_ERROR_CODES}
    expected = {code: str(status) for code, status in statuses.items() if status is not None}
    assert {code: listed.get(code) for code in expected} == expected
