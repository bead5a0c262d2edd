"""The per-site secret behind keyed pseudonyms and case ids.

Pseudonyms and case ids are derived from this secret, so it must stay stable for the life of a
site: a lost or regenerated secret changes every pseudonym and splits every patient's history.
It is therefore created once, and a damaged or exposed file is refused loudly rather than
replaced. The secret itself is never logged.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from pathlib import Path

from triage_app.errors import ConfigError
from triage_app.paths import (
    FOLDER_ACCESS,
    access_problem,
    denied_because,
    ensure_private_dir,
    write_private_file,
)

log = logging.getLogger(__name__)

SITE_SECRET_BYTES = 32


def site_secret_path(data_dir: Path) -> Path:
    """Where the site secret lives under a data folder (for messages and backups)."""
    return data_dir / "keys" / "site_secret.bin"


def load_or_create_site_secret(data_dir: Path) -> bytes:
    """Return the site's 32-byte secret, creating it (0600 in a 0700 folder) on first run.

    Raises
    ------
    ConfigError
        If the key folder or the file is readable by other users, the file is not a regular
        file, or it does not hold exactly 32 bytes; or this user may not read them (or create
        the file), the message then saying what to change. Nothing is regenerated: an admin
        must restore the file from backup (or deliberately delete it, accepting new
        pseudonyms).
    """
    path = site_secret_path(data_dir)
    keys_dir = path.parent
    try:
        ensure_private_dir(keys_dir)
        dir_mode = stat.S_IMODE(keys_dir.stat().st_mode)
    except OSError as err:
        why = denied_because(err, keys_dir, os.R_OK | os.X_OK, tree=data_dir)
        raise ConfigError(f"{keys_dir}: cannot use the key folder{why}") from None
    problem = access_problem(keys_dir, os.R_OK | os.X_OK, tree=data_dir)
    if problem is not None:
        # Checked first: whether the secret is there cannot even be told (an admin's first
        # run as root left the folder root's), and "cannot write" would send them astray.
        raise ConfigError(f"{keys_dir}: cannot read the key folder: {problem}")
    if dir_mode & 0o077:
        raise ConfigError(
            f"{keys_dir}: key folder permissions {dir_mode:04o} are too open; "
            "it must be accessible by this user only (chmod 700)"
        )
    if not os.path.lexists(path):
        try:
            write_private_file(path, secrets.token_bytes(SITE_SECRET_BYTES), overwrite=False)
            log.info("created a new site secret at %s", path)
        except FileExistsError:
            pass  # Another worker created it first: use that one, so every process agrees.
        except OSError as err:
            why = denied_because(err, keys_dir, FOLDER_ACCESS, tree=data_dir)
            raise ConfigError(f"{path}: cannot write the site secret{why}") from None
    return _read_site_secret(path, data_dir)


def _read_site_secret(path: Path, data_dir: Path) -> bytes:
    """Read and check the secret through one file descriptor, so the checks match the bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW: a symlink could point anywhere
            raise ConfigError(
                f"{path}: the site secret must be a regular file, not a link"
            ) from None
        why = denied_because(err, path, os.R_OK, tree=data_dir)
        raise ConfigError(f"{path}: cannot read the site secret{why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: the site secret must be a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path}: site secret permissions {mode:04o} are too open; "
                "it must be readable by this user only (chmod 600)"
            )
        data = os.read(fd, SITE_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != SITE_SECRET_BYTES:
        raise ConfigError(
            f"{path}: the site secret must be exactly {SITE_SECRET_BYTES} bytes "
            f"(found {info.st_size}); restore it from backup, a new one would change every "
            "pseudonym"
        )
    return data
