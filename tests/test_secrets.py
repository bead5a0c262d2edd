"""The per-site secret: created once, private, stable, never silently replaced."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


# --- Files the service user may not use -----------------------------------------------------------

# Root uses any file whatever its mode, and these tests run as root: what the service user meets
# is run in a child process as ``nobody`` (the service user here), in folders the test, as root,
# leaves root's, as an admin's first run as root does (``sudo triage-app device``).
SERVICE_USER = pwd.getpwnam("nobody")
ROOT = pwd.getpwuid(0).pw_name


def as_service_user(*args: str | Path) -> list[str]:
    """A Python command line run as the service user, without root's powers."""
    assert os.geteuid() == 0, "these tests give files to another user: run them as root"
    return [
        "setpriv",
        f"--reuid={SERVICE_USER.pw_uid}",
        f"--regid={SERVICE_USER.pw_gid}",
        "--clear-groups",
        sys.executable,
        *map(str, args),
    ]


def service_user_env(home: Path) -> dict[str, str]:
    """The environment for a command as the service user: a home it may read (root's may not
    be, and the default settings file is looked for there), no settings of the tests' own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_APP_", "XDG_"))}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    return env


@contextlib.contextmanager
def reachable_folder() -> Iterator[Path]:
    """A new folder the service user may enter (pytest's are under root's 0700 folder), and
    everything in it removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="triage-access-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def give_to_service_user(*paths: Path, mode: int = 0o700) -> None:
    for path in paths:
        os.chown(path, SERVICE_USER.pw_uid, SERVICE_USER.pw_gid)
        path.chmod(mode)


def run_as_service_user(script: str, *args: str | Path, home: Path) -> dict[str, str | None]:
    """Run ``script`` (which prints one JSON object) as the service user; return the object."""
    run = subprocess.run(
        as_service_user("-c", script, *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=service_user_env(home),
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, str | None] = json.loads(run.stdout)
    return result


_LOAD_SECRET = """
import json, sys
from pathlib import Path
from triage_app.errors import ConfigError
from triage_app.secrets import load_or_create_site_secret
try:
    load_or_create_site_secret(Path(sys.argv[1]))
    print(json.dumps({"error": None}))
except ConfigError as err:
    print(json.dumps({"error": str(err)}))
"""


def test_a_key_folder_left_to_root_is_refused_as_unreadable_with_the_fix() -> None:
    """An admin ran ``triage-app device`` as root first: the key folder is root's. Whether the
    secret is in it cannot be told, so the line says "cannot read", and how to fix it (it was
    an unexpected PermissionError, an internal error, before)."""
    with reachable_folder() as base:
        data = base / "data"
        load_or_create_site_secret(data)  # as root
        give_to_service_user(base, data)
        keys = data / "keys"

        result = run_as_service_user(_LOAD_SECRET, data, home=base)

        assert result["error"] == (
            f"{keys}: cannot read the key folder: owned by {ROOT}, not by nobody, the user this "
            f"runs as (mode 0700): chown -R nobody: {data}"
        )


def test_a_site_secret_left_to_root_says_cannot_read_it_and_the_fix() -> None:
    with reachable_folder() as base:
        data = base / "data"
        secret = load_or_create_site_secret(data)  # as root
        give_to_service_user(base, data, data / "keys")

        result = run_as_service_user(_LOAD_SECRET, data, home=base)

        path = site_secret_path(data)
        assert result["error"] == (
            f"{path}: cannot read the site secret: owned by {ROOT}, not by nobody, the user this "
            f"runs as (mode 0600): chown -R nobody: {data}"
        )
        assert path.read_bytes() == secret  # refused, not replaced


def test_a_site_secret_that_cannot_be_created_says_why() -> None:
    """A key folder of the service user's that it may not write in (0500): a clear line, not
    an internal error."""
    with reachable_folder() as base:
        data = base / "data"
        (data / "keys").mkdir(parents=True)
        give_to_service_user(base, data)
        give_to_service_user(data / "keys", mode=0o500)

        result = run_as_service_user(_LOAD_SECRET, data, home=base)

        path = site_secret_path(data)
        assert result["error"] == (
            f"{path}: cannot write the site secret: its mode is 0500: chmod u+w {data / 'keys'}"
        )
        assert not path.exists()


_ACCESS_PROBLEMS = """
import json, os, sys
from pathlib import Path
from triage_app.paths import FOLDER_ACCESS, access_problem
base = Path(sys.argv[1])
print(json.dumps({
    "its own folder": access_problem(base / "own", FOLDER_ACCESS),
    "its own, read-only": access_problem(base / "own" / "read-only", FOLDER_ACCESS),
    "root's file": access_problem(base / "own" / "roots.bin", os.R_OK),
    "root's file, in a tree": access_problem(
        base / "own" / "roots.bin", os.R_OK, tree=base / "own"
    ),
    "to make in root's folder": access_problem(base / "roots" / "new" / "deeper", FOLDER_ACCESS),
    "behind root's folder": access_problem(base / "closed" / "open", FOLDER_ACCESS),
    "behind root's folder, in a tree": access_problem(
        base / "closed" / "open", FOLDER_ACCESS, tree=base / "closed"
    ),
}))
"""


def test_access_problems_name_the_obstacle_and_the_fix() -> None:
    with reachable_folder() as base:
        own, roots, closed = base / "own", base / "roots", base / "closed"
        for folder in (own, own / "read-only", roots, closed, closed / "open"):
            folder.mkdir()
        (own / "roots.bin").write_bytes(b"root's")
        (own / "roots.bin").chmod(0o600)
        roots.chmod(0o755)
        closed.chmod(0o700)
        give_to_service_user(own, closed / "open")
        give_to_service_user(own / "read-only", mode=0o500)

        result = run_as_service_user(_ACCESS_PROBLEMS, base, home=base)

        by_root = f"owned by {ROOT}, not by nobody, the user this runs as"
        assert result == {
            "its own folder": None,
            "its own, read-only": "its mode is 0500 (no write permission for its owner): "
            "choose another folder",
            "root's file": f"{by_root} (mode 0600): chown nobody: {own / 'roots.bin'}",
            "root's file, in a tree": f"{by_root} (mode 0600): chown -R nobody: {own}",
            "to make in root's folder": f"{roots} is {by_root} (mode 0755): create it for nobody "
            f"first (install -d -o nobody -m 700 {roots / 'new' / 'deeper'})",
            "behind root's folder": f"{closed} is {by_root} (mode 0700): choose another folder",
            "behind root's folder, in a tree": f"{closed} is {by_root} (mode 0700): chown -R "
            f"nobody: {closed}",
        }
