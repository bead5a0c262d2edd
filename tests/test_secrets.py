"""The per-site secret: created once, private, stable, never silently replaced."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from triage_app.errors import ConfigError
from triage_app.paths import write_private_file
from triage_app.secrets import SITE_SECRET_BYTES, load_or_create_site_secret, site_secret_path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_is_created_0600_in_a_0700_folder(tmp_path: Path) -> None:
    secret = load_or_create_site_secret(tmp_path / "data")
    path = tmp_path / "data" / "keys" / "site_secret.bin"
    assert site_secret_path(tmp_path / "data") == path
    assert len(secret) == SITE_SECRET_BYTES == 32
    assert path.read_bytes() == secret
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700


def test_secret_is_stable_across_calls(tmp_path: Path) -> None:
    first = load_or_create_site_secret(tmp_path)
    assert load_or_create_site_secret(tmp_path) == first


def test_secret_differs_between_sites(tmp_path: Path) -> None:
    assert load_or_create_site_secret(tmp_path / "a") != load_or_create_site_secret(tmp_path / "b")


def test_an_existing_secret_is_used_as_is(tmp_path: Path) -> None:
    path = site_secret_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.write_bytes(bytes(range(32)))
    path.chmod(0o600)
    assert load_or_create_site_secret(tmp_path) == bytes(range(32))


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604])
def test_a_readable_by_others_secret_is_refused(tmp_path: Path, loose: int) -> None:
    first = load_or_create_site_secret(tmp_path)
    path = site_secret_path(tmp_path)
    path.chmod(loose)
    with pytest.raises(ConfigError, match=rf"permissions {loose:04o} are too open.*chmod 600"):
        load_or_create_site_secret(tmp_path)
    assert path.read_bytes() == first  # refused, not regenerated


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_wrong_size_secret_is_refused_not_regenerated(tmp_path: Path, size: int) -> None:
    load_or_create_site_secret(tmp_path)
    path = site_secret_path(tmp_path)
    path.write_bytes(b"x" * size)
    with pytest.raises(ConfigError, match=rf"exactly 32 bytes \(found {size}\)"):
        load_or_create_site_secret(tmp_path)
    assert path.read_bytes() == b"x" * size


def test_a_loose_key_folder_is_refused(tmp_path: Path) -> None:
    load_or_create_site_secret(tmp_path)
    site_secret_path(tmp_path).parent.chmod(0o755)
    with pytest.raises(ConfigError, match=r"key folder permissions 0755 are too open"):
        load_or_create_site_secret(tmp_path)


def test_a_symlinked_secret_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.bin"
    elsewhere.write_bytes(b"y" * 32)
    elsewhere.chmod(0o600)
    path = site_secret_path(tmp_path / "data")
    path.parent.mkdir(parents=True, mode=0o700)
    path.symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="must be a regular file, not a link"):
        load_or_create_site_secret(tmp_path / "data")


def test_a_folder_in_place_of_the_secret_is_refused(tmp_path: Path) -> None:
    path = site_secret_path(tmp_path)
    path.mkdir(parents=True)
    path.parent.chmod(0o700)
    with pytest.raises(
        ConfigError, match=r"site_secret\.bin: the site secret must be a regular file"
    ):
        load_or_create_site_secret(tmp_path)


def test_the_secret_is_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        secret = load_or_create_site_secret(tmp_path)
        load_or_create_site_secret(tmp_path)
    assert "created a new site secret" in caplog.text
    assert secret.hex() not in caplog.text
    assert repr(secret) not in caplog.text


def test_a_secret_created_concurrently_wins_over_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another worker creates the file between our existence check and our write: every
    # process must end up with that one secret, not replace it with its own.
    theirs = b"t" * SITE_SECRET_BYTES

    def other_process_first(path: Path, data: bytes, *, overwrite: bool = True) -> None:
        write_private_file(path, theirs, overwrite=False)
        write_private_file(path, data, overwrite=overwrite)

    monkeypatch.setattr("triage_app.secrets.write_private_file", other_process_first)
    assert load_or_create_site_secret(tmp_path) == theirs
    assert site_secret_path(tmp_path).read_bytes() == theirs
