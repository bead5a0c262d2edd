"""Logging set-up for a process's entry point: the CLI's main and each spawned worker.

Library modules only log (``logging.getLogger(__name__)``); this is the one place that decides
format and levels, so a worker process logs exactly like the command that started it.

A service under systemd logs JSON Lines (``json_lines=True``): the journal and log shippers
then get fields (level, logger, the ``extra`` of a call such as an error code) without parsing
free text. The lines a command prints itself about how its run ended (``print_outcome``) follow
the same format, so the one line a shipper most needs is not the one it cannot parse.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import UTC, datetime

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
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ASCII escapes: no U+2028 or the like that some readers take for a line break.
        return json.dumps(out)


def configure_logging(level: int, *, json_lines: bool = False) -> None:
    """Log to stderr at ``level``, as text lines or (``json_lines``) JSON Lines."""
    if json_lines:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLinesFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=FORMAT)
    # pydicom's value checks quote the offending value (names, UIDs) at WARNING: no PHI in logs.
    # Its decoders log each plugin's failure at ERROR with a traceback, which the reader reports
    # as one line already: kept for --debug only.
    logging.getLogger("pydicom").setLevel(
        logging.ERROR if level <= logging.DEBUG else logging.CRITICAL
    )
    # pynetdicom logs every association at INFO and dumps data sets (UIDs, names) at DEBUG; the
    # receiver logs what an admin needs itself.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


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
