"""What every benchmark leaves behind with ``--out DIR``: its figures as JSON and its table as
printed, side by side, so that a run can be compared with a later one on the same machine."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def save_report(out: Path, name: str, figures: dict[str, Any], table: str) -> None:
    """Write ``<out>/<name>.json`` (the figures, with the platform and Python they were
    measured on) and ``<out>/<name>.txt`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"platform": platform.platform(), "python": platform.python_version(), **figures}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / f"{name}.txt").write_text(table + "\n", encoding="utf-8")
