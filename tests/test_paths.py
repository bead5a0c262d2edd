"""Private folders and atomic private files."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_secrets import (
    ROOT,
    SERVICE_USER,
    give_to_service_user,
    reachable_folder,
    run_as_service_user,
)
from triage_app.paths import (
    FOLDER_ACCESS,
    default_config_path,
    default_data_dir,
    ensure_private_dir,
    lock_folder,
    remove_abandoned_temps,
    write_locked_temp,
    write_private_file,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_locations_follow_platformdirs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_data_dir() == tmp_path / "data" / "triage-app"
    assert default_config_path() == tmp_path / "config" / "triage-app" / "settings.toml"
    assert not (tmp_path / "data").exists()  # asking for a location creates nothing


def test_ensure_private_dir_creates_0700_with_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "keys"
    old = os.umask(0o022)  # a usual umask: mkdir -p would make the parents 0755
    try:
        assert ensure_private_dir(target) == target
    finally:
        os.umask(old)
    assert target.is_dir()
    assert [mode(f) for f in (tmp_path / "a", tmp_path / "a" / "b", target)] == [0o700] * 3
    assert ensure_private_dir(target) == target  # there already: fine


def test_ensure_private_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        ensure_private_dir(tmp_path / "a")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        ensure_private_dir(tmp_path / "a" / "b")


def test_ensure_private_dir_leaves_an_existing_folder_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    ensure_private_dir(shared)
    assert mode(shared) == 0o755


def test_write_private_file_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private_file(tmp_path / "f.bin", b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").read_bytes() == b"data"
    assert mode(tmp_path / "f.bin") == 0o600


def test_write_private_file_is_never_readable_by_others_while_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mode must come from os.open, not from a chmod after the bytes are on disk.
    seen: list[int] = []
    real_fsync = os.fsync

    def fsync_and_look(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_and_look)
    old = os.umask(0)
    try:
        write_private_file(tmp_path / "f.bin", b"data")
    finally:
        os.umask(old)
    assert seen == [0o600]


def test_write_private_file_replaces_and_tightens(tmp_path: Path) -> None:
    target = tmp_path / "settings.toml"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_private_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.toml"]


def test_write_private_file_without_overwrite_keeps_the_first(tmp_path: Path) -> None:
    target = tmp_path / "secret.bin"
    write_private_file(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        write_private_file(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    assert mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.bin"]


def test_failed_write_leaves_the_old_file_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "settings.toml"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_private_file(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.toml"]


# --- A file root replaces in the service user's place keeps its owner ----------------------------


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


SERVICE_OWNED = (SERVICE_USER.pw_uid, SERVICE_USER.pw_gid)


@pytest.mark.parametrize(("keep_owner", "kept"), [(True, True), (False, False)])
def test_root_replacing_another_users_file_keeps_its_owner_group_and_mode_when_asked(
    tmp_path: Path, keep_owner: bool, kept: bool
) -> None:
    """``config set`` as root left the service user's settings root's 0600, which the
    services could not read at their next start (as ``visudo``, it now keeps them theirs)."""
    target = tmp_path / "settings.toml"
    target.write_bytes(b"old")
    give_to_service_user(target, mode=0o640)

    write_private_file(target, b"new", keep_owner=keep_owner)

    assert target.read_bytes() == b"new"
    assert owner_and_mode(target) == ((*SERVICE_OWNED, 0o640) if kept else (0, 0, 0o600))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.toml"]


def test_keeping_the_owner_keeps_no_set_id_bit(tmp_path: Path) -> None:
    target = tmp_path / "settings.toml"
    target.write_bytes(b"old")
    give_to_service_user(target, mode=0o6750)

    write_private_file(target, b"new", keep_owner=True)

    assert owner_and_mode(target) == (*SERVICE_OWNED, 0o750)


def test_keeping_the_owner_follows_no_link(tmp_path: Path) -> None:
    """A link is replaced, as before: its target's owner is no reason to give the file away."""
    theirs = tmp_path / "theirs.toml"
    theirs.write_bytes(b"theirs")
    give_to_service_user(theirs, mode=0o644)
    target = tmp_path / "settings.toml"
    target.symlink_to(theirs)

    write_private_file(target, b"new", keep_owner=True)

    assert not target.is_symlink()
    assert owner_and_mode(target) == (0, 0, 0o600)
    assert theirs.read_bytes() == b"theirs"


def test_a_new_file_is_this_users_0600_when_keeping_the_owner(tmp_path: Path) -> None:
    target = tmp_path / "central_keys.json"
    write_private_file(target, b"new", keep_owner=True)
    assert owner_and_mode(target) == (0, 0, 0o600)


_REPLACE = """
import json, os, stat, sys
from pathlib import Path
from triage_app.paths import write_private_file
target = Path(sys.argv[1])
write_private_file(target, b"new", keep_owner=True)
info = target.stat()
print(json.dumps({"owner": f"{info.st_uid}:{info.st_gid} {stat.S_IMODE(info.st_mode):04o}"}))
"""


def test_root_that_may_not_change_owners_makes_the_file_its_own_as_before(
    tmp_path: Path,
) -> None:
    """Root without CAP_CHOWN (a container, a unit's bounding set) cannot give the file
    away: it writes it as it did before rather than failing."""
    target = tmp_path / "settings.toml"
    target.write_bytes(b"old")
    give_to_service_user(target, mode=0o644)
    no_capabilities = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable]

    run = subprocess.run(
        [*no_capabilities, "-c", _REPLACE, str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"owner": "0:0 0600"}
    assert target.read_bytes() == b"new"


def test_the_service_user_replacing_roots_file_makes_it_its_own_as_before() -> None:
    """Only root may give a file away: anyone else's new file is theirs, 0600."""
    with reachable_folder() as base:
        folder = base / "etc"
        folder.mkdir()
        give_to_service_user(folder)
        target = folder / "settings.toml"
        target.write_bytes(b"old")
        target.chmod(0o644)  # root's

        result = run_as_service_user(_REPLACE, target, home=base)

        assert result == {"owner": f"{SERVICE_USER.pw_uid}:{SERVICE_USER.pw_gid} 0600"}


# --- temporary files of dead writers --------------------------------------------------------------


def dead_writers_temp(folder: Path, name: str) -> Path:
    """A temporary file as a writer killed before its rename leaves it: written, unlocked."""
    tmp, fd = write_locked_temp(folder, name, b"half")
    os.close(fd)
    return tmp


@pytest.mark.parametrize("overwrite", [True, False])
def test_write_private_file_holds_a_lock_while_its_temporary_file_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    # Another process tidying the folder mid-write must not take the file from under it:
    # tidy after the bytes are synced and just before the rename (or link) into place.
    removed: list[int] = []

    def tidy_first(real: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        def tidy_then(src: Any, dst: Any) -> None:
            assert [p.name for p in tmp_path.glob(".f.bin.*.tmp")]  # the temp file is there
            removed.append(remove_abandoned_temps(tmp_path, for_suffixes=(".bin",)))
            real(src, dst)

        return tidy_then

    monkeypatch.setattr(os, "replace", tidy_first(os.replace))
    monkeypatch.setattr(os, "link", tidy_first(os.link))
    write_private_file(tmp_path / "f.bin", b"data", overwrite=overwrite)
    assert removed == [0]
    assert (tmp_path / "f.bin").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_only_unlocked_temporary_files_of_the_given_names_are_removed(tmp_path: Path) -> None:
    dead = dead_writers_temp(tmp_path, "a.json")
    live, fd = write_locked_temp(tmp_path, "b.json", b"being written")
    other_name = dead_writers_temp(tmp_path, "a.env")  # someone else's kind of file
    below = dead_writers_temp(ensure_private_dir(tmp_path / "sub"), "c.json")
    lookalikes = [
        tmp_path / ".a.json.0123456789abcdeg.tmp",  # not hex
        tmp_path / ".a.json.0123456789abcdef0.tmp",  # 17 characters
        tmp_path / "a.json.0123456789abcdef.tmp",  # not hidden
        tmp_path / ".a.json.0123456789abcdef.part",
        tmp_path / ".hidden",
    ]
    for path in lookalikes:
        path.write_bytes(b"not ours")
    try:
        assert remove_abandoned_temps(tmp_path, for_suffixes=(".json",)) == 1
        assert not dead.exists()
        assert live.read_bytes() == b"being written"
        assert other_name.exists() and below.exists()
        assert all(path.exists() for path in lookalikes)

        assert remove_abandoned_temps(tmp_path, for_suffixes=(".json",), recursive=True) == 1
        assert not below.exists()
        assert live.exists()
    finally:
        os.close(fd)
    # Its writer gone, the once live file is debris like the others.
    assert remove_abandoned_temps(tmp_path, for_suffixes=(".json",)) == 1
    assert not live.exists()
    assert other_name.exists()


def test_a_link_or_fifo_under_a_temporary_name_is_left_alone(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = dead_writers_temp(outside, "x.json")
    folder = ensure_private_dir(tmp_path / "done")
    link = folder / ".x.json.0123456789abcdef.tmp"
    link.symlink_to(target)
    fifo = folder / ".y.json.fedcba9876543210.tmp"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever

    assert remove_abandoned_temps(folder, for_suffixes=(".json",)) == 0
    assert link.is_symlink() and target.exists()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_without_working_locks_files_are_written_and_no_temporary_file_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some network shares refuse locks: writing must still work, and the clean-up, unable to
    # tell a live writer from a dead one there, must remove nothing.
    dead = dead_writers_temp(tmp_path, "a.json")

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    write_private_file(tmp_path / "f.json", b"data")
    assert (tmp_path / "f.json").read_bytes() == b"data"
    assert remove_abandoned_temps(tmp_path, for_suffixes=(".json",)) == 0
    assert dead.exists()


def test_a_folder_lock_is_held_by_one_descriptor_at_a_time_until_it_is_closed(
    tmp_path: Path,
) -> None:
    held = lock_folder(tmp_path)
    assert held is not None
    try:
        with pytest.raises(BlockingIOError):
            lock_folder(tmp_path)  # another holder, even in the same process
    finally:
        os.close(held)
    again = lock_folder(tmp_path)
    assert again is not None
    os.close(again)


# --- The fix a permission problem's line suggests ----------------------------------------------

# Root may do anything, and these tests run as root: the checks run as the service user
# (``nobody``), or as root without its capabilities, "an admin" meeting the service user's
# folders (helpers: tests/test_secrets.py).

# argv[1]: {name: [path, need, tree or null]}; prints {name: access_problem's answer}.
_PROBLEMS = """
import json, sys
from pathlib import Path
from triage_app.paths import access_problem
asked = json.loads(sys.argv[1])
print(json.dumps({
    name: access_problem(Path(path), need, tree=None if tree is None else Path(tree))
    for name, (path, need, tree) in asked.items()
}))
"""
Asked = dict[str, tuple[Path, int, Path | None]]


def _as_json(asked: Asked) -> str:
    return json.dumps(
        {name: [str(path), need, tree and str(tree)] for name, (path, need, tree) in asked.items()}
    )


def problems_as_service_user(asked: Asked, home: Path) -> dict[str, str | None]:
    return run_as_service_user(_PROBLEMS, _as_json(asked), home=home)


def problems_as_root_without_capabilities(asked: Asked) -> dict[str, str | None]:
    """Root without CAP_DAC_OVERRIDE and the like: file modes refuse it as any other user."""
    no_capabilities = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable]
    run = subprocess.run(
        [*no_capabilities, "-c", _PROBLEMS, _as_json(asked)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, str | None] = json.loads(run.stdout)
    return result


def test_a_system_folder_is_never_given_to_the_service_user() -> None:
    """``--config /etc/foo.toml`` said ``chown -R nobody: /etc``, which breaks the machine;
    a folder the settings name as the app's own is no safer when it is a system folder, or a
    link to one."""
    with reachable_folder() as base:
        (base / "usr").symlink_to("/usr")
        absent = f"triage-access-test-{base.name}"  # made by no one: base's name is unique

        result = problems_as_service_user(
            {
                "/etc, the settings file's folder": (Path("/etc"), FOLDER_ACCESS, None),
                "/etc as the app's folder": (Path("/etc") / absent, FOLDER_ACCESS, Path("/etc")),
                "/var/lib as the app's folder": (
                    Path("/var/lib") / absent,
                    FOLDER_ACCESS,
                    Path("/var/lib"),
                ),
                "/ as the app's folder": (Path("/"), FOLDER_ACCESS, Path("/")),
                "a link to /usr as the app's folder": (base / "usr", FOLDER_ACCESS, base / "usr"),
            },
            home=base,
        )

    by_root = f"owned by {ROOT}, not by nobody, the user this runs as"
    modes = {folder: f"{mode(Path(folder)):04o}" for folder in ("/", "/etc", "/usr", "/var/lib")}
    create = "create it for nobody first (install -d -o nobody -m 700"
    assert result == {
        "/etc, the settings file's folder": f"{by_root} (mode {modes['/etc']}): choose another "
        "folder",
        "/etc as the app's folder": f"/etc is {by_root} (mode {modes['/etc']}): {create} "
        f"/etc/{absent})",
        "/var/lib as the app's folder": f"/var/lib is {by_root} (mode {modes['/var/lib']}): "
        f"{create} /var/lib/{absent})",
        "/ as the app's folder": f"{by_root} (mode {modes['/']}): choose another folder",
        "a link to /usr as the app's folder": f"{by_root} (mode {modes['/usr']}): choose another "
        "folder",
    }


def test_a_mode_fix_names_only_the_missing_permission_and_only_in_the_apps_folder() -> None:
    """It said ``chmod u+rwx`` when one bit was missing, and for any folder."""
    with reachable_folder() as base:
        data, mine = base / "data", base / "mine"
        for folder in (data, data / "read-only", data / "write-only", mine):
            folder.mkdir()
        give_to_service_user(data)
        give_to_service_user(data / "read-only", mine, mode=0o500)
        give_to_service_user(data / "write-only", mode=0o300)

        result = problems_as_service_user(
            {
                "read-only": (data / "read-only", FOLDER_ACCESS, data),
                "write-only": (data / "write-only", FOLDER_ACCESS, data),
                "not the app's": (mine, FOLDER_ACCESS, None),
            },
            home=base,
        )

    assert result == {
        "read-only": f"its mode is 0500: chmod u+w {data / 'read-only'}",
        "write-only": f"its mode is 0300: chmod u+r {data / 'write-only'}",
        "not the app's": "its mode is 0500 (no write permission for its owner): choose another "
        "folder",
    }


def test_the_service_users_folders_tell_another_user_to_run_as_the_service_user() -> None:
    """An admin on the packaged folders (0700, the service user's) was told to let themselves
    in (``chmod o+x``) or to take the data folder over (``chown -R``), which locks the service
    out; ``sudo -u <service user>`` is the fix. Leftovers of another user in a folder of the
    admin's own are still given back with one ``chown -R``."""
    other = 4321  # a user without a name, besides root (the admin here) and nobody
    with reachable_folder() as base:
        etc, data, mine = base / "etc-triage-app", base / "lib-triage-app", base / "mine"
        shared = base / "shared"  # the service user's, open to all, with another user's keys
        for folder in (etc, data, shared, shared / "keys", mine, mine / "left"):
            folder.mkdir(mode=0o700)
        (etc / "settings.toml").write_bytes(b"")
        (base / "theirs.toml").write_bytes(b"")
        give_to_service_user(etc, data, mine / "left")
        give_to_service_user(shared, mode=0o755)
        give_to_service_user(etc / "settings.toml", mode=0o600)
        os.chown(shared / "keys", other, other)
        os.chown(base / "theirs.toml", other, other)
        (base / "theirs.toml").chmod(0o600)

        result = problems_as_root_without_capabilities(
            {
                "settings": (etc / "settings.toml", os.R_OK, base / "config" / "triage-app"),
                "data folder": (data, FOLDER_ACCESS, data),
                "in its data folder": (shared / "keys", FOLDER_ACCESS, shared),
                "a file of a user without a name": (base / "theirs.toml", os.R_OK, None),
                "leftovers in the admin's own folder": (mine / "left", FOLDER_ACCESS, mine),
            }
        )

    by_nobody = f"owned by nobody, not by {ROOT}, the user this runs as (mode 0700)"
    sudo = "(sudo -u nobody triage-app ...)"
    assert result == {
        "settings": f"{etc} is {by_nobody}: run the command as nobody {sudo}",
        "data folder": f"{by_nobody}: run the command as nobody {sudo}",
        "in its data folder": f"owned by {other}, not by {ROOT}, the user this runs as (mode "
        f"0700): run the command as nobody, the owner of {shared} {sudo}",
        "a file of a user without a name": f"owned by {other}, not by {ROOT}, the user this runs "
        f"as (mode 0600): run the command as {other} (sudo -u '#{other}' triage-app ...)",
        "leftovers in the admin's own folder": f"{by_nobody}: chown -R {ROOT}: {mine}",
    }
