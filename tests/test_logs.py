"""Log formats: JSON Lines for the services, text for the commands; pydicom kept quiet."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import config
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from tests.helpers import phantom_dataset, run_cli
from triage_app.logs import JsonLinesFormatter, configure_logging


def record(
    level: int = logging.INFO,
    msg: str = "triaged %d files",
    args: tuple[object, ...] = (3,),
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
) -> logging.LogRecord:
    return logging.getLogger("triage_app.watch").makeRecord(
        "triage_app.watch", level, __file__, 10, msg, args, exc_info, extra=extra
    )


def formatted(rec: logging.LogRecord) -> dict[str, Any]:
    line = JsonLinesFormatter().format(rec)
    assert "\n" not in line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_a_librarys_console_copy_of_the_message_is_left_out() -> None:
    """uvicorn adds ``color_message``, the message with ANSI escapes, for its own console."""
    out = formatted(
        record(msg="Started", args=(), extra={"color_message": "\x1b[1mStarted\x1b[0m"})
    )
    assert out["message"] == "Started"
    assert "color_message" not in out


def test_a_record_is_one_json_object_with_time_level_logger_and_message() -> None:
    before = datetime.now(UTC)
    out = formatted(record())
    assert set(out) == {"ts", "level", "logger", "message"}
    assert out["level"] == "INFO"
    assert out["logger"] == "triage_app.watch"
    assert out["message"] == "triaged 3 files"
    ts = datetime.fromisoformat(out["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= ts <= datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", out["ts"])


@pytest.mark.parametrize(
    ("level", "name"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARNING"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "CRITICAL"),
    ],
)
def test_level_names(level: int, name: str) -> None:
    assert formatted(record(level))["level"] == name


def test_scalar_extra_fields_are_kept_and_others_left_out() -> None:
    extra = {
        "code": "truncated",
        "count": 3,
        "ratio": 0.25,
        "ok": False,
        "case_id": None,
        "folder": object(),  # not a scalar: left out, not str()-ed
        "tags": ["a", "b"],
        "nan": float("nan"),
    }
    out = formatted(record(extra=extra))
    assert out["code"] == "truncated"
    assert out["count"] == 3
    assert out["ratio"] == 0.25
    assert out["ok"] is False
    assert out["case_id"] is None
    assert out["nan"] == "nan"
    assert "folder" not in out
    assert "tags" not in out


def test_an_extra_cannot_replace_the_records_own_fields() -> None:
    out = formatted(record(extra={"level": "fake", "ts": "then", "logger": "x"}))
    assert out["level"] == "INFO"
    assert out["logger"] == "triage_app.watch"
    assert out["ts"] != "then"


def test_a_multi_line_message_and_a_traceback_stay_on_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        exc_info = sys.exc_info()
    out = formatted(record(logging.ERROR, "first\nsecond\u2028third", (), exc_info=exc_info))
    assert out["message"] == "first\nsecond\u2028third"
    assert out["exc"].startswith("Traceback")
    assert "ValueError: bad" in out["exc"]
    assert "\u2028" not in JsonLinesFormatter().format(record(msg="a\u2028b", args=()))


def run_logging(json_lines: bool) -> list[str]:
    """configure_logging in a fresh interpreter (basicConfig is once per process)."""
    code = textwrap.dedent(
        f"""
        import logging
        from triage_app.logs import configure_logging
        configure_logging(logging.INFO, json_lines={json_lines})
        logging.getLogger("triage_app.receiver").info(
            "stored %d instances", 2, extra={{"code": "stored"}}
        )
        logging.getLogger("triage_app.receiver").debug("below the level")
        logging.getLogger("pydicom").warning("Invalid value for VR PN: 'DOE^JANE'")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == ""
    return result.stderr.splitlines()


def test_configure_logging_json_lines_writes_json_to_stderr_and_silences_pydicom() -> None:
    lines = run_logging(json_lines=True)
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["message"] == "stored 2 instances"
    assert out["code"] == "stored"
    assert out["level"] == "INFO"
    assert out["logger"] == "triage_app.receiver"


def test_configure_logging_keeps_text_lines_by_default() -> None:
    lines = run_logging(json_lines=False)
    assert len(lines) == 1
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO triage_app.receiver: stored 2 instances",
        lines[0],
    )


def run_watch_stopped_by(exception: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """The real ``main`` in a fresh interpreter, its ``watch`` handler raising ``exception``:
    neither a Ctrl-C before the service's own signal handlers nor a bug can be had on demand."""
    code = textwrap.dedent(
        f"""
        import sys
        from triage_app import cli, cli_services
        def stopped(args):
            raise {exception}
        cli_services._watch = stopped
        sys.exit(cli.main(["watch", *sys.argv[1:]]))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


INTERNAL_ERROR = "RuntimeError('/inbox/DOE^JANE/chest.dcm')"  # a message quoting PHI


@pytest.mark.parametrize(
    ("exception", "status", "level", "code", "prefix", "message"),
    [
        ("KeyboardInterrupt", 130, "WARNING", None, "triage-app: ", "interrupted"),
        (
            INTERNAL_ERROR,
            70,
            "ERROR",
            "internal_error",
            "triage-app: error: internal_error: ",
            r"unexpected RuntimeError in triage_app/cli\.py:\d+ \(main\); "
            "run again with --debug for the traceback",
        ),
    ],
    ids=["interrupted", "internal-error"],
)
def test_the_line_main_ends_a_run_with_follows_the_log_format(
    exception: str, status: int, level: str, code: str | None, prefix: str, message: str
) -> None:
    """A JSON log shipper got one text line, the one saying how the run ended; in text, the
    line is as it always was."""
    plain = run_watch_stopped_by(exception)
    assert plain.returncode == status
    assert re.fullmatch(re.escape(prefix) + message + "\n", plain.stderr), plain.stderr

    as_json = run_watch_stopped_by(exception, "--log-format", "json")
    assert as_json.returncode == status
    (line,) = as_json.stderr.splitlines()
    record = json.loads(line)
    assert record.pop("ts")
    assert re.fullmatch(message, record.pop("message")), line
    assert record == {"level": level, "logger": "triage_app.cli"} | ({"code": code} if code else {})
    assert "DOE^JANE" not in as_json.stderr


def run_pydicom_failure(level: int) -> str:
    """What a process configured at ``level`` writes when a pydicom decoder plugin fails: pydicom
    logs each failure at ERROR, with its traceback."""
    code = textwrap.dedent(
        f"""
        import logging
        from triage_app.logs import configure_logging
        configure_logging({level})
        try:
            raise RuntimeError("libjpeg error code -1038 returned from Decode()")
        except RuntimeError as exc:
            logging.getLogger("pydicom.pixels.decoders.base").exception(exc)
        logging.getLogger("triage_app.pipeline").error("triage failed on one input")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stderr


def test_pydicom_decoder_tracebacks_stay_out_of_stderr_without_debug() -> None:
    lines = run_pydicom_failure(logging.WARNING).splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("ERROR triage_app.pipeline: triage failed on one input")


def test_pydicom_decoder_tracebacks_are_shown_with_debug() -> None:
    stderr = run_pydicom_failure(logging.DEBUG)
    assert "Traceback" in stderr
    assert "libjpeg error code" in stderr


def test_classify_refuses_a_broken_codestream_in_one_line(tmp_path: Path) -> None:
    ds = phantom_dataset(7, 0)
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(100)])  # SOI, then nothing valid
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    path = tmp_path / "garbage.dcm"
    ds.save_as(path, enforce_file_format=True)
    run = run_cli("classify", path, data_dir=tmp_path / "data")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    refusals = [line for line in run.stderr.splitlines() if "garbage.dcm" in line]
    assert len(refusals) == 1
    assert "corrupt_pixel_data" in refusals[0]


# --- libraries never write image data to the log ------------------------------------------------

# How pydicom and pynetdicom quote a value they find invalid: a scanner's UID, leading zeros.
SCANNER_UID = "1.2.840.113619.2.055.3.2831164355.20120704.01"


def run_configured(code: str, *, json_lines: bool, level: int = logging.INFO) -> list[str]:
    """``code`` after configure_logging, in a fresh interpreter; its stderr lines."""
    setup = "import logging\nfrom triage_app.logs import configure_logging\n"
    setup += f"configure_logging({level}, json_lines={json_lines})\n"
    result = subprocess.run(
        [sys.executable, "-c", setup + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == ""
    assert SCANNER_UID not in result.stderr
    return result.stderr.splitlines()


WARNS_QUOTING_A_UID = f"""
    from pydicom import config
    from pydicom.valuerep import validate_value
    validate_value("UI", "{SCANNER_UID}", config.WARN)  # as reading one outside quiet_pydicom
"""
WARNING_LINE = r"UserWarning raised at valuerep\.py:\d+ \(its text is not logged: .*\)"


def test_a_library_warning_is_a_json_log_line_with_its_category_and_place_not_its_text() -> None:
    (line,) = run_configured(WARNS_QUOTING_A_UID, json_lines=True)
    out = json.loads(line)
    assert (out["level"], out["logger"]) == ("WARNING", "py.warnings")
    assert re.fullmatch(WARNING_LINE, out["message"]), line


def test_a_library_warning_is_a_text_log_line_with_its_category_and_place_not_its_text() -> None:
    (line,) = run_configured(WARNS_QUOTING_A_UID, json_lines=False)
    assert re.fullmatch(r"\S+ \S+ WARNING py\.warnings: " + WARNING_LINE, line), line


def test_pydicom_reads_without_validating_once_logging_is_configured() -> None:
    """Its reading checks only warn (quoting the value); none is left to quote one."""
    code = f"""
        import io
        import pydicom
        from pydicom.dataset import Dataset
        with pydicom.config.disable_value_validation():
            ds = Dataset()
            ds.StudyInstanceUID = "{SCANNER_UID}"
            buffer = io.BytesIO()
            ds.save_as(buffer, implicit_vr=True, little_endian=True)
        read = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
        assert read.StudyInstanceUID == "{SCANNER_UID}"  # as it was: nothing else changes
    """
    assert run_configured(code, json_lines=True) == []


PYNETDICOM_LINES = f"""
    log = logging.getLogger("pynetdicom.utils")
    log.warning("Non-conformant 'Affected SOP Instance UID' value '{SCANNER_UID}'")
    logging.getLogger("pynetdicom.assoc").error(
        "Association with %s failed (SOP Instance %s)", "'DOE^JANE'", "{SCANNER_UID}.7"
    )
    try:
        raise ValueError("bad value '{SCANNER_UID}'")
    except ValueError:
        logging.getLogger("pynetdicom").exception("Exception in the handler")
    logging.getLogger("triage_app.receiver").info("left as it is: 'quoted' 1.2.3.4.5")
"""


APP_LOGGER = "triage_app.receiver"
REDACTED_ERROR = "Association with '<redacted>' failed (SOP Instance <uid>)"


def test_pynetdicom_logs_only_errors_and_without_quoted_text_or_uids_as_json() -> None:
    lines = run_configured(PYNETDICOM_LINES, json_lines=True, level=logging.DEBUG)
    records = [json.loads(line) for line in lines]
    assert [r["logger"] for r in records] == [
        "pynetdicom.assoc",
        "pynetdicom",
        "triage_app.receiver",
    ]
    assert records[0]["message"] == "Association with '<redacted>' failed (SOP Instance <uid>)"
    assert records[1]["message"] == "Exception in the handler"
    assert records[1]["exc"].startswith('Traceback (most recent call last):\n  File "<string>"')
    assert records[1]["exc"].endswith("ValueError: bad value '<redacted>'")
    assert records[2]["message"] == "left as it is: 'quoted' 1.2.3.4.5"
    assert "DOE^JANE" not in "\n".join(lines)


def test_pynetdicom_logs_only_errors_and_without_quoted_text_or_uids_as_text() -> None:
    lines = run_configured(PYNETDICOM_LINES, json_lines=False, level=logging.DEBUG)
    text = "\n".join(lines)
    assert "Non-conformant" not in text
    assert (
        "ERROR pynetdicom.assoc: Association with '<redacted>' failed (SOP Instance <uid>)" in text
    )
    assert "ERROR pynetdicom: Exception in the handler\nTraceback" in text
    assert lines[-2] == "ValueError: bad value '<redacted>'"
    assert lines[-1].endswith("INFO triage_app.receiver: left as it is: 'quoted' 1.2.3.4.5")
    assert "DOE^JANE" not in text


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put back what the test runner had."""
    root = logging.getLogger()
    handlers = {handler: list(handler.filters) for handler in root.handlers}
    root_level = root.level
    levels = {name: logging.getLogger(name).level for name in ("pydicom", "pynetdicom")}
    showwarning = warnings.showwarning
    reading_mode = config.settings.reading_validation_mode
    yield
    config.settings.reading_validation_mode = reading_mode
    logging.captureWarnings(False)
    warnings.showwarning = showwarning
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    root.setLevel(root_level)
    for handler in list(root.handlers):
        if handler in handlers:
            handler.filters[:] = handlers[handler]
        else:
            root.removeHandler(handler)


@pytest.mark.usefixtures("restored_logging")
def test_warnings_are_still_errors_in_the_tests_after_configure_logging() -> None:
    """The suite's ``filterwarnings = error`` acts before a warning is shown (or logged)."""
    configure_logging(logging.INFO, json_lines=True)
    with pytest.raises(UserWarning, match="quoted"):
        warnings.warn("a value 'quoted'", UserWarning, stacklevel=1)
