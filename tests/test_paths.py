"""Private folders and atomic private files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from triage_app.paths import (
    default_config_path,
    default_data_dir,
    ensure_private_dir,
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
    assert ensure_private_dir(target) == target
    assert target.is_dir()
    assert mode(target) == 0o700


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
