"""Where the app keeps its files, and how it writes the private ones.

Settings, keys and the case store hold data another local user must not read or swap, so private
files are created 0600 from the first byte (never chmod-ed afterwards, which leaves a window) and
replaced atomically, so a crash or power cut leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import platformdirs

APP_NAME = "triage-app"


def default_data_dir() -> Path:
    """The per-user data folder (case store, outbox, keys) that ``paths.data_dir`` defaults to."""
    return Path(platformdirs.user_data_path(APP_NAME, appauthor=False))


def default_config_path() -> Path:
    """The settings file read when no ``--config`` is given."""
    return Path(platformdirs.user_config_path(APP_NAME, appauthor=False)) / "settings.toml"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) if needed; the folder itself is created 0700.

    An existing folder is left as it is: the caller may point at a shared place such as ``/tmp``,
    and tightening that would break other users. Callers that need an existing folder to be
    private (the key folder) check its mode themselves.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_private_file(
    path: Path, data: bytes, *, overwrite: bool = True, sync_folder: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically, readable and writable by this user only (0600).

    The bytes go to a temporary file in the same folder, are fsync-ed, and the file is then
    renamed over ``path`` (``overwrite=True``) or hard-linked to ``path`` (``overwrite=False``,
    which raises ``FileExistsError`` instead of replacing a file another process created first).
    The folder is fsync-ed too, so the new name survives a power cut (``sync_folder=False``
    when the caller writes several files there and syncs the folder once after the last).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            tmp.replace(path)
        else:
            path.hardlink_to(tmp)
    finally:
        # Gone after a replace; the spare name after a link; the debris after a failure.
        tmp.unlink(missing_ok=True)
    if sync_folder:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable (POSIX keeps directory entries separately)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
