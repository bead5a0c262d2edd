"""Logging set-up for a process's entry point: the CLI's main and each spawned worker.

Library modules only log (``logging.getLogger(__name__)``); this is the one place that decides
format and levels, so a worker process logs exactly like the command that started it.

A service under systemd logs JSON Lines (``json_lines=True``): the journal and log shippers
then get fields (level, logger, the ``extra`` of a call such as an error code) without parsing
free text. The lines a command prints itself about how its run ended (``print_outcome``) follow
the same format, so the one line a shipper most needs is not the one it cannot parse.

Libraries are not trusted with image data: their warnings and log messages can quote a value
of the file (a UID, a name). So Python warnings reach the log as their category and where they
were raised only, pydicom does not validate what it reads (its checks only warn, quoting the
value), and pynetdicom logs errors only, with quoted text and UID-like tokens blanked out.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from pydicom import config as pydicom_config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: anything else on a record came from a call's ``extra``.
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}
# Fields of the JSON object itself; an ``extra`` of the same name does not replace them.
_OWN_FIELDS = frozenset({"ts", "level", "logger", "message", "exc", "stack"})
# Extras libraries add for their own console: uvicorn's copy of the message with ANSI colours.
_CONSOLE_EXTRAS = frozenset({"color_message"})
_NOT_EXTRAS = _STANDARD_ATTRIBUTES | _OWN_FIELDS | _CONSOLE_EXTRAS

# A DICOM UID (digit groups joined by dots) and quoted text: how a library quotes a value.
_UID_LIKE = re.compile(r"\d+(?:\.\d+){3,}")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
# A traceback's frame line names code, not data: kept, so that the traceback stays useful.
_FRAME = re.compile(r'  File "[^"\n]*", line \d+, in \S+')
_NETWORK_LOGGER = "pynetdicom"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, always on one line.

    ``ts`` (ISO-8601, UTC, milliseconds), ``level``, ``logger``, ``message``, then each
    ``extra`` field whose value is a plain scalar (text, number, bool, None); other values
    are left out rather than turned into text nobody checked for identifying data.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _NOT_EXTRAS or key.startswith("_"):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = str(value)  # JSON has no NaN or infinity
            elif value is None or isinstance(value, str | int | float | bool):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # a traceback already redacted (_RedactNetworkValues)
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ASCII escapes: no U+2028 or the like that some readers take for a line break.
        return json.dumps(out)


def configure_logging(level: int, *, json_lines: bool = False) -> None:
    """Log to stderr at ``level``, as text lines or (``json_lines``) JSON Lines.

    Also the process's guard against libraries writing image data to the log (the journal):
    see the module's docstring. Process-wide state, set once at each entry point.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLinesFormatter() if json_lines else logging.Formatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])  # no-op if the root has handlers
    for root_handler in logging.getLogger().handlers:
        root_handler.addFilter(_REDACT_NETWORK_VALUES)  # once: addFilter skips a filter it has
    # A warning's text can quote a value (pydicom's "Invalid value for VR UI: '1.2.…'") and
    # Python would print it to stderr, outside the log format: log where it came from instead.
    logging.captureWarnings(True)  # also keeps the original, for captureWarnings(False)
    warnings.showwarning = _log_warning_without_text
    # pydicom's reading validation never changes a value or raises (that is RAISE, unused
    # here): it only warns and logs with the value quoted. The reader turns it off around each
    # read (quiet_pydicom); off for the whole process, a read elsewhere cannot quote one either.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    # pydicom's value checks quote the offending value (names, UIDs) at WARNING: no PHI in logs.
    # Its decoders log each plugin's failure at ERROR with a traceback, which the reader reports
    # as one line already: kept for --debug only.
    logging.getLogger("pydicom").setLevel(
        logging.ERROR if level <= logging.DEBUG else logging.CRITICAL
    )
    # pynetdicom logs every association at INFO, dumps data sets (UIDs, names) at DEBUG and
    # quotes a peer's non-conformant UIDs at WARNING; the receiver logs what an admin needs
    # itself. Its errors still pass, redacted (_RedactNetworkValues).
    logging.getLogger(_NETWORK_LOGGER).setLevel(logging.ERROR)


def _log_warning_without_text(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for :func:`configure_logging`: the category and the module
    file and line it was raised at, never the text (nor ``line``, the source line)."""
    logging.getLogger("py.warnings").warning(
        "%s raised at %s:%d (its text is not logged: it can quote image data)",
        category.__name__,
        Path(filename).name,
        lineno,
    )


def _redact(text: str) -> str:
    unquoted = _QUOTED.sub(lambda quoted: f"{quoted[0][0]}<redacted>{quoted[0][0]}", text)
    return _UID_LIKE.sub("<uid>", unquoted)


def _redact_traceback(text: str) -> str:
    lines = text.split("\n")
    return "\n".join(line if _FRAME.fullmatch(line) else _redact(line) for line in lines)


class _RedactNetworkValues(logging.Filter):
    """Blank out quoted text and UID-like tokens in pynetdicom's records (message and
    traceback): it quotes the values of the data sets it handles, a peer's UIDs among them."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name != _NETWORK_LOGGER and not name.startswith(_NETWORK_LOGGER + "."):
            return True
        record.msg = _redact(record.getMessage())
        record.args = ()
        if record.exc_info:
            traceback = logging.Formatter().formatException(record.exc_info)
            record.exc_text = _redact_traceback(traceback)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = _redact_traceback(record.exc_text)
        return True


_REDACT_NETWORK_VALUES = _RedactNetworkValues()


def logs_json_lines() -> bool:
    """Whether this process logs JSON Lines (``configure_logging(json_lines=True)``)."""
    root = logging.getLogger()
    return any(isinstance(handler.formatter, JsonLinesFormatter) for handler in root.handlers)


def print_outcome(
    text: str,
    *,
    logger: logging.Logger,
    level: int,
    message: str,
    **fields: str | int | float | bool | None,
) -> None:
    """Print a command's own line about how its run ended (a summary, the error it stopped on)
    to stderr: ``text`` as it is, or, when the log is JSON Lines, a record as a log line's with
    ``message`` and ``fields`` (an error's ``code``, a summary's counts).

    Printed rather than logged, so that no level or filter can drop it.
    """
    if not logs_json_lines():
        print(text, file=sys.stderr)
        return
    record = logger.makeRecord(logger.name, level, "", 0, message, (), None, extra=fields)
    print(JsonLinesFormatter().format(record), file=sys.stderr, flush=True)
