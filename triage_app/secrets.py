"""The per-site secret behind keyed pseudonyms and case ids.

Pseudonyms and case ids are derived from this secret, so it must stay stable for the life of a
site: a lost or regenerated secret changes every pseudonym and splits every patient's history.
It is therefore created once, and a damaged or exposed file is refused loudly rather than
replaced. The secret itself is never logged.

Also here, as the lowest module that refuses files it cannot use: :func:`access_problem`, which
says why this process may not use a folder or file it needs, and what fixes it.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import secrets
import stat
from pathlib import Path

from triage_app.errors import ConfigError
from triage_app.paths import ensure_private_dir, write_private_file

log = logging.getLogger(__name__)

SITE_SECRET_BYTES = 32

#: What to ask of a folder the app keeps files in: list it, enter it, create and remove in it.
FOLDER_ACCESS = os.R_OK | os.W_OK | os.X_OK
_DENIED = frozenset({errno.EACCES, errno.EPERM})
# Permissions are checked as the kernel checks the operations themselves: for the effective user.
_EFFECTIVE_IDS = os.access in os.supports_effective_ids


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


# --- Files this user may not use -----------------------------------------------------------------


def access_problem(path: Path, need: int, *, tree: Path | None = None) -> str | None:
    """Why this process may not use ``path`` as ``need`` asks (``os.R_OK``, ``os.W_OK`` and
    ``os.X_OK`` or-ed), with the fix, to end an error line; None if nothing stands in the way.

    Every folder on the way must let this user in, and a missing ``path`` must be creatable in
    its nearest existing folder. The usual cause is a first run as root, which left root's
    folders behind for a service that runs as its own user: the answer names the owner, and
    says ``chown -R <this user>: <tree>`` when the obstacle is inside ``tree`` (the app's own
    folder, e.g. ``paths.data_dir``), so that one command fixes whatever else that run left.

    Asks the kernel (``access(2)``: ACLs count), and only about permission: a file where a
    folder should be and the like are the callers' to refuse. Names only ``path``, ``tree``
    and the folders above ``path``.
    """
    path = path.absolute()
    chain = [*reversed(path.parents), path]
    for index, step in enumerate(chain):
        try:
            info = step.stat()
        except FileNotFoundError:
            parent = chain[index - 1] if index else None
            if parent is None or os.access(parent, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE_IDS):
                return None  # it can be made, and so can the missing folders below it
            return _unusable(parent, path, os.W_OK | os.X_OK, tree, creating=True)
        except OSError:
            return None  # not a matter of permission (a file in the way, a loop)
        wanted = need if step == path else os.X_OK
        if not os.access(step, wanted, effective_ids=_EFFECTIVE_IDS):
            return _unusable(step, path, wanted, tree, creating=False, info=info)
    return None


def denied_because(err: OSError, path: Path, need: int, *, tree: Path | None = None) -> str:
    """The end of an error line for ``err``, met using ``path`` as ``need`` asks: ``": "`` and
    :func:`access_problem`'s answer for a permission problem it finds, else the operating
    system's own words in brackets."""
    if err.errno in _DENIED:
        problem = access_problem(path, need, tree=tree)
        if problem is not None:
            return f": {problem}"
    return f" ({err.strerror or type(err).__name__})"


def _unusable(
    culprit: Path,
    path: Path,
    need: int,
    tree: Path | None,
    *,
    creating: bool,
    info: os.stat_result | None = None,
) -> str:
    """Why ``culprit`` (``path``, or a folder above it) denies ``need``, and the fix."""
    info = info or culprit.stat()
    me = _user_name(os.geteuid())
    mode = stat.S_IMODE(info.st_mode)
    itself = culprit == path
    if need & os.W_OK and _read_only(culprit):
        # Under the units' ProtectSystem=strict, all but their ReadWritePaths= is read-only.
        where = "it is" if itself else f"{culprit} is"
        return (
            f"{where} on a read-only file system (under systemd's ProtectSystem=strict, a "
            "drop-in for the unit must add a ReadWritePaths= line for it)"
        )
    if info.st_uid != os.geteuid():
        owner = _user_name(info.st_uid)
        why = f"owned by {owner}, not by {me}, the user this runs as (mode {mode:04o})"
        why = why if itself else f"{culprit} is {why}"
        if tree is not None and tree.absolute() in (culprit, *culprit.parents):
            return f"{why}: chown -R {me}: {tree}"
        if itself:
            recursive = "-R " if stat.S_ISDIR(info.st_mode) else ""
            return f"{why}: chown {recursive}{me}: {culprit}"
        if creating:
            return f"{why}: create it for {me} first (install -d -o {me} -m 700 {path})"
        return f"{why}: let {me} in (e.g. chmod o+x {culprit}) or choose another folder"
    if any(need & flag and not mode & owner_flag for flag, owner_flag, _ in _BITS):
        wanted = "".join(bit for flag, _, bit in _BITS if need & flag)
        whose = "its" if itself else f"{culprit}'s"
        return f"{whose} mode is {mode:04o}: chmod u+{wanted} {culprit}"
    what = "it" if itself else culprit
    return f"denied although {me}, the user this runs as, owns {what}: check its ACL and label"


#: access(2)'s flags, the owner's mode bit for each, and its letter for chmod.
_BITS = (
    (os.R_OK, stat.S_IRUSR, "r"),
    (os.W_OK, stat.S_IWUSR, "w"),
    (os.X_OK, stat.S_IXUSR, "x"),
)


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _user_name(uid: int) -> str:
    """The user's name, or its number if it has none (``chown`` takes either)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
