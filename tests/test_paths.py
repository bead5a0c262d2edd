"""Private folders and atomic private files."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from triage_app.paths import (
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
