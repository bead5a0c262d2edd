"""Logging set-up for a process's entry point: the CLI's main and each spawned worker.

Library modules only log (``logging.getLogger(__name__)``); this is the one place that decides
format and levels, so a worker process logs exactly like the command that started it.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    # pydicom's value checks quote the offending value (names, UIDs) at WARNING: no PHI in logs.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
