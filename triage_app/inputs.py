"""Turning the paths a user gives into the list of input files every command works on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def expand_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders recursively in sorted order, skipping hidden entries.

    A path that does not exist is kept, so it is reported as unreadable instead of vanishing.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            found.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """The SHA-256 of a file's bytes, or ``None`` when they cannot be read (missing, a folder,
    no permission): what identifies a refused input in the case store."""
    try:
        with Path(path).open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None
