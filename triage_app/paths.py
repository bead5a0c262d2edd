"""Where the app keeps its files, and how it writes the private ones.

Settings, keys and the case store hold data another local user must not read or swap, so private
files are created 0600 from the first byte (never chmod-ed afterwards, which leaves a window) and
replaced atomically, so a crash or power cut leaves either the old file or the new one, never half.

A kill between writing the temporary file and renaming it leaves the temporary file behind. Its
writer holds an ``flock`` on it until it is renamed, so a clean-up can tell a dead writer's file
(lockable) from one still being written by another process (:func:`remove_abandoned_temps`).

When this process may not use a folder or file it needs (a first run as root left root's
folders behind), :func:`access_problem` says why and what fixes it, for one-line errors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import re
import secrets
import stat
from pathlib import Path
from typing import Final

import platformdirs

APP_NAME = "triage-app"

_TEMP_TOKEN_BYTES: Final = 8
# ``.<final name>.<16 hex>.tmp``: what :func:`write_locked_temp` names its files, nothing else.
_TEMP_NAME: Final = re.compile(r"\.(?P<final>.+)\.[0-9a-f]{16}\.tmp")
# flock errors meaning "no locks on this file system" (some network shares): the clean-up cannot
# lock there either, so it leaves every temporary file alone and nothing live is ever removed.
_NO_LOCKS: Final = frozenset({errno.ENOLCK, errno.EOPNOTSUPP})


def default_data_dir() -> Path:
    """The per-user data folder (case store, outbox, keys) that ``paths.data_dir`` defaults to."""
    return Path(platformdirs.user_data_path(APP_NAME, appauthor=False))


def default_config_path() -> Path:
    """The settings file read when no ``--config`` is given."""
    return Path(platformdirs.user_config_path(APP_NAME, appauthor=False)) / "settings.toml"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents if needed, each 0700 (``mkdir -p`` would give
    the parents the umask's mode: ``central/`` over ``central/tls/`` readable by all).

    An existing folder is left as it is: the caller may point at a shared place such as ``/tmp``,
    and tightening that would break other users. Callers that need an existing folder to be
    private (the key folder) check its mode themselves.
    """
    missing = []
    folder = path
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            folder.mkdir(mode=0o700)
    path.mkdir(mode=0o700, exist_ok=True)  # a file in the way raises FileExistsError
    return path


def write_private_file(
    path: Path,
    data: bytes,
    *,
    overwrite: bool = True,
    sync_folder: bool = True,
    keep_owner: bool = False,
) -> None:
    """Write ``data`` to ``path`` atomically, readable and writable by this user only (0600).

    The bytes go to a locked temporary file in the same folder (:func:`write_locked_temp`), and
    the file is then renamed over ``path`` (``overwrite=True``) or hard-linked to ``path``
    (``overwrite=False``, which raises ``FileExistsError`` instead of replacing a file another
    process created first). The folder is fsync-ed too, so the new name survives a power cut
    (``sync_folder=False`` when the caller writes several files there and syncs the folder once
    after the last).

    ``keep_owner``: a file root replaces keeps its owner, group and mode (see
    :func:`_keep_owner_of`), for the files an admin's command as root rewrites in the service
    user's place (the settings, the central server's keys).
    """
    tmp, fd = write_locked_temp(path.parent, path.name, data)
    try:
        if overwrite:
            if keep_owner:
                _keep_owner_of(path, fd)
            tmp.replace(path)
        else:
            path.hardlink_to(tmp)
    finally:
        # Gone after a replace; the spare name after a link; the debris after a failure.
        # Removed before the lock goes, so a clean-up never sees it unlocked.
        try:
            tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)
    if sync_folder:
        fsync_dir(path.parent)


def write_locked_temp(
    folder: Path, name: str, data: bytes | bytearray | memoryview
) -> tuple[Path, int]:
    """Write ``data`` to a new private temporary file for ``name`` in ``folder``, fsynced.

    Returns its path and the open descriptor, which holds an exclusive ``flock`` until the caller
    closes it: that is how :func:`remove_abandoned_temps` tells a live writer's file from a dead
    one's. The caller renames (or links) the file into place, then closes the descriptor.
    """
    while True:
        tmp = temp_path(folder, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in _NO_LOCKS:
                    raise
            if os.fstat(fd).st_nlink == 0:
                # A clean-up took it for debris in the instant before we locked it: start over.
                os.close(fd)
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return tmp, fd


def _keep_owner_of(path: Path, fd: int) -> None:
    """Give the open temporary file ``fd`` the owner, group and mode of the regular file at
    ``path`` it is about to replace, when that is another user's or group's and this process
    runs as root.

    As ``visudo`` and ``cp --preserve`` do: an admin's command as root that rewrites a file of
    the service user's must not leave it root's 0600, which the service could no longer read
    at its next start. Only root may give a file away: any other user's process (or root
    without ``CAP_CHOWN``), or a file that is missing or not a regular file, gets the new file
    as :func:`write_locked_temp` made it (this user's, 0600). Set before the rename, so the
    file never has the wrong owner.
    """
    if os.geteuid() != 0:
        return
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        return
    new = os.fstat(fd)
    if not stat.S_ISREG(old.st_mode) or (old.st_uid, old.st_gid) == (new.st_uid, new.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        return  # root without CAP_CHOWN (a container, a unit's CapabilityBoundingSet=)
    # After the chown, which clears set-id bits: only the permission bits are kept. Without
    # CAP_FOWNER, root may not change the mode of a file no longer its own: it stays 0600.
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, stat.S_IMODE(old.st_mode) & 0o777)
    os.fsync(fd)


def temp_path(folder: Path, name: str) -> Path:
    """A new random name in ``folder`` for a temporary file that will become ``name``.

    The shape :func:`remove_abandoned_temps` recognises; a caller that creates the file itself
    (a hard link cannot be created under :func:`write_locked_temp`'s lock) must hold an
    ``flock`` on it from its first instant, or the clean-up may take it for a dead writer's.
    """
    return folder / f".{name}.{secrets.token_hex(_TEMP_TOKEN_BYTES)}.tmp"


def remove_abandoned_temps(
    root: Path, *, for_suffixes: tuple[str, ...], recursive: bool = False
) -> int:
    """Remove the temporary files that dead writers left in ``root``; return how many went.

    Only names :func:`write_locked_temp` gives to files whose final name ends with one of
    ``for_suffixes``, only regular files, and only those nobody holds the lock of: a file
    another process is writing right now stays. With ``recursive``, sub-folders too (symbolic
    links are not followed).
    """
    removed = 0
    for folder, dirs, files in os.walk(root):
        if not recursive:
            dirs.clear()
        for name in files:
            match = _TEMP_NAME.fullmatch(name)
            if match is not None and match["final"].endswith(for_suffixes):
                removed += remove_if_abandoned(Path(folder) / name)
    return removed


def remove_if_abandoned(path: Path) -> bool:
    """Delete a temporary file if its writer is gone (nobody holds its lock).

    Anything this cannot be sure of is left alone: a file gone or renamed meanwhile, a
    symbolic link or anything not a regular file, a file it may not open, a file system
    without locks.
    """
    try:
        # O_NONBLOCK: a FIFO under such a name must not hang the clean-up.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it, or there are no locks here
        try:
            named = os.lstat(path)
        except FileNotFoundError:
            return False  # renamed into place while we locked it
        if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            return False  # a new file took the name meanwhile
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def lock_folder(path: Path) -> int | None:
    """Take an exclusive ``flock`` on the folder ``path`` itself, without waiting.

    Returns the descriptor that holds it (closing it, or the process ending, releases it), or
    None on a file system without locks (some network shares; NFS also refuses an exclusive
    lock on a descriptor not open for writing, which a folder's never is): there is nothing to
    hold, and the caller decides whether to go on. Raises ``BlockingIOError`` while anyone else
    (another process, or another descriptor in this one) holds it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in _NO_LOCKS or err.errno == errno.EBADF:
            return None
        raise
    return fd


def fsync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable (POSIX keeps directory entries separately)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: What to ask of a folder the app keeps files in: list it, enter it, create and remove in it.
FOLDER_ACCESS = os.R_OK | os.W_OK | os.X_OK
_DENIED = frozenset({errno.EACCES, errno.EPERM})
# Permissions are checked as the kernel checks the operations themselves: for the effective user.
_EFFECTIVE_IDS = os.access in os.supports_effective_ids


# --- Files this user may not use -----------------------------------------------------------------


def access_problem(path: Path, need: int, *, tree: Path | None = None) -> str | None:
    """Why this process may not use ``path`` as ``need`` asks (``os.R_OK``, ``os.W_OK`` and
    ``os.X_OK`` or-ed), with the fix, to end an error line; None if nothing stands in the way.

    Every folder on the way must let this user in, and a missing ``path`` must be creatable in
    its nearest existing folder. The usual cause is a first run as root, which left root's
    folders behind for a service that runs as its own user; the next is an admin running a
    command as themselves on the service user's folders. The answer names the owner and the
    missing permission, and a fix that cannot harm anything but the app's own files:

    A ``chown`` or ``chmod`` is suggested only for what lies in ``tree`` (the app's own folder
    its caller names from the settings or their defaults, e.g. ``paths.data_dir``) unless that
    is a shared folder (``/``, a folder right below it or right below ``/usr``, ``/usr/local``
    or ``/var``, or one holding a login user's home), and for ``path`` itself when it is a
    file; what another user owns otherwise is theirs (run the command as them) or, root's,
    left alone (choose another folder). In ``tree``, one ``chown -R <this user>: <tree>``
    fixes whatever else a run as root left there, unless ``tree`` is another user's (run the
    command as that user).

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
    me = user_name(os.geteuid())
    mode = stat.S_IMODE(info.st_mode)
    itself = culprit == path
    if need & os.W_OK and _read_only(culprit):
        # Under the units' ProtectSystem=strict, all but their ReadWritePaths= is read-only.
        where = "it is" if itself else f"{culprit} is"
        return (
            f"{where} on a read-only file system (under systemd's ProtectSystem=strict, a "
            "drop-in for the unit must add a ReadWritePaths= line for it)"
        )
    # Owners and modes change only in the app's own folder, or of the very file asked about.
    own_tree = _own_tree(tree, culprit)
    named_file = itself and stat.S_ISREG(info.st_mode)
    if info.st_uid != os.geteuid():
        why = f"owned by {user_name(info.st_uid)}, not by {me}, the user this runs as"
        why = f"{why} (mode {mode:04o})" if itself else f"{culprit} is {why} (mode {mode:04o})"
        if own_tree is not None:
            keeper = own_tree.stat().st_uid
            if keeper in (0, os.geteuid()):  # left by root, or by someone else in ours
                return f"{why}: chown -R {me}: {tree}"
            whose = "" if keeper == info.st_uid else f", the owner of {tree}"
            return f"{why}: {_run_as(keeper, whose)}"
        if info.st_uid != 0:
            return f"{why}: {_run_as(info.st_uid, '')}"
        if named_file:
            return f"{why}: chown {me}: {culprit}"
        if creating:
            return f"{why}: create it for {me} first (install -d -o {me} -m 700 {path})"
        return f"{why}: choose another folder"
    missing = [
        (bit, word)
        for flag, owner_flag, bit, word in _BITS
        if need & flag and not mode & owner_flag
    ]
    if not missing:
        what = "it" if itself else culprit
        return f"denied although {me}, the user this runs as, owns {what}: check its ACL and label"
    whose = "its" if itself else f"{culprit}'s"
    if own_tree is not None or named_file:
        return f"{whose} mode is {mode:04o}: chmod u+{''.join(bit for bit, _ in missing)} {culprit}"
    words = " and ".join(word for _, word in missing)
    return (
        f"{whose} mode is {mode:04o} (no {words} permission for its owner): choose another folder"
    )


#: access(2)'s flags, the owner's mode bit for each, its letter for chmod and its name.
_BITS = (
    (os.R_OK, stat.S_IRUSR, "r", "read"),
    (os.W_OK, stat.S_IWUSR, "w", "write"),
    (os.X_OK, stat.S_IXUSR, "x", "search"),
)
#: Folders whose every sub-folder is shared by the system (/var/lib, /usr/share, ...).
_SYSTEM_PARENTS: Final = frozenset(map(Path, ("/usr", "/usr/local", "/var")))
#: Login shells that let nobody log in: their users' homes are service folders.
_NO_LOGIN: Final = frozenset({"nologin", "false"})


def _own_tree(tree: Path | None, culprit: Path) -> Path | None:
    """``tree`` resolved, if a fix may change owners and modes in it (see
    :func:`access_problem`): it holds ``culprit`` and is no shared folder."""
    if tree is None:
        return None
    tree = tree.resolve()  # so that neither ``..`` nor a link hides a system folder
    if not culprit.resolve().is_relative_to(tree):
        return None
    if len(tree.parts) <= 2 or tree.parent in _SYSTEM_PARENTS:
        return None
    if any(home.is_relative_to(tree) for home in _login_homes()):
        return None
    return tree


def _login_homes() -> set[Path]:
    """The home folders of the users who may log in."""
    return {
        Path(user.pw_dir).resolve()
        for user in pwd.getpwall()
        if Path(user.pw_shell).name not in _NO_LOGIN
    }


def _run_as(uid: int, whose: str) -> str:
    """The fix when the obstacle is another user's: act as that user (never take it over)."""
    name = user_name(uid)
    sudo = name if name != str(uid) else f"'#{uid}'"  # sudo takes a bare number as a name
    return f"run the command as {name}{whose} (sudo -u {sudo} triage-app ...)"


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def user_name(uid: int) -> str:
    """The user's name, or its number if it has none (``chown`` takes either)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
