"""The systemd units, user and folders in packaging/: hardened, pointed at the data folder only,
and accepted by systemd's own tools where this machine has them."""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from triage_app.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "packaging" / "systemd"
UNITS = {"triage-watch.service": "watch", "triage-receive.service": "receive"}
DATA_DIR = "/var/lib/triage-app"
CONFIG = "/etc/triage-app/settings.toml"
# Beyond the data folder, the only folder a unit may write: the watch service's optional
# scanner share ('-': only if it exists).
EXTRA_WRITABLE = {"triage-watch.service": {"-/srv/triage/watch"}, "triage-receive.service": set()}

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}
SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "60",
    "User": "triage",
    "Group": "triage",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "60",
}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections → key → every value in order (systemd keys may repeat, unlike configparser's)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}: continuation lines are not expected"
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def single(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values is not None, f"{key}= missing from [{section}]"
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


@pytest.fixture(params=sorted(UNITS))
def unit_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_the_unit_runs_the_service_as_a_notify_service_that_stops_cleanly(unit_name: str) -> None:
    unit = parse_unit(SYSTEMD / unit_name)
    for key, expected in SERVICE.items():
        assert single(unit, key) == expected, key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_unit_is_hardened(unit_name: str) -> None:
    unit = parse_unit(SYSTEMD / unit_name)
    for key, expected in HARDENING.items():
        assert single(unit, key) == expected, key
    filters = unit["Service"]["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert "~@privileged" in filters
    families = single(unit, "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_the_unit_never_runs_as_root(unit_name: str) -> None:
    unit = parse_unit(SYSTEMD / unit_name)
    assert single(unit, "User") not in {"root", "0", ""}
    assert single(unit, "Group") not in {"root", "0", ""}
    assert "DynamicUser" not in unit["Service"]  # the data folder must outlive the service
    assert "AmbientCapabilities" not in unit["Service"]


def test_the_unit_may_write_the_data_folders_only(unit_name: str) -> None:
    unit = parse_unit(SYSTEMD / unit_name)
    writable = {p for line in unit["Service"]["ReadWritePaths"] for p in line.split()}
    assert writable == {DATA_DIR} | EXTRA_WRITABLE[unit_name]
    for path in writable:
        pure = PurePosixPath(path.removeprefix("-"))
        assert pure.is_absolute()
        assert len(pure.parts) >= 3  # never "/" or a top-level folder such as /var
    assert single(unit, "ProtectSystem") == "strict"  # otherwise the list means nothing
    for key in ("ReadWriteDirectories", "StateDirectory", "LogsDirectory", "CacheDirectory"):
        assert key not in unit["Service"], f"{key}= would add a writable folder"


def test_the_unit_points_the_app_at_its_data_folder_and_settings(unit_name: str) -> None:
    unit = parse_unit(SYSTEMD / unit_name)
    env = dict(line.split("=", 1) for line in unit["Service"]["Environment"])
    assert env["TRIAGE_APP_PATHS__DATA_DIR"] == DATA_DIR
    assert single(unit, "WorkingDirectory") == DATA_DIR
    # Every TRIAGE_APP_ variable names a real setting, and the example settings load with them.
    settings = load_settings(SYSTEMD / "settings.toml.example", env=env)
    assert str(settings.data_dir) == DATA_DIR
    assert str(settings.watch_inbox).startswith(DATA_DIR)
    assert str(settings.receiver_storage).startswith(DATA_DIR)


def test_the_command_line_is_the_installed_cli_and_the_units_subcommand(unit_name: str) -> None:
    argv = shlex.split(single(parse_unit(SYSTEMD / unit_name), "ExecStart"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] == "/opt/triage-app/bin/triage-app"
    assert PurePosixPath(argv[0]).name in scripts
    assert argv[1] == UNITS[unit_name]
    options = argv[2:]
    assert options[options.index("--config") + 1] == CONFIG
    assert options[options.index("--log-format") + 1] == "json"


def test_the_user_and_folders_match_the_units() -> None:
    users = [
        shlex.split(line)  # the description is quoted
        for line in (SYSTEMD / "triage-app.sysusers.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [(u[0], u[1], u[4]) for u in users] == [("u", "triage", DATA_DIR)]

    tmpfiles = {
        fields[1]: fields
        for line in (SYSTEMD / "triage-app.tmpfiles.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
        for fields in [line.split()]
    }
    assert tmpfiles[DATA_DIR][:5] == ["d", DATA_DIR, "0700", "triage", "triage"]
    assert tmpfiles[str(PurePosixPath(CONFIG).parent)][2:5] == ["0700", "triage", "triage"]


def test_the_env_example_names_real_settings_only() -> None:
    lines = (SYSTEMD / "triage-app.env.example").read_text().splitlines()
    assignments = [line.lstrip("#") for line in lines if line.startswith(("TRIAGE_APP_", "#TRI"))]
    assert assignments
    env = dict(a.split("=", 1) for a in assignments)
    load_settings(SYSTEMD / "settings.toml.example", env=env)  # raises for an unknown name


def test_the_readme_explains_every_hardening_line() -> None:
    readme = (ROOT / "packaging" / "README.md").read_text()
    for key in (*HARDENING, "ReadWritePaths", "RestrictAddressFamilies", "SystemCallFilter"):
        assert f"`{key}=" in readme, key
    assert "curl -s http://127.0.0.1:9464/metrics" in readme
    assert "triage-app health watch" in readme


# --- systemd's own tools, where installed ----------------------------------------------------


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    cli = Path(sys.executable).parent / "triage-app"
    if not cli.exists():
        pytest.skip("the triage-app script is not installed in this environment")
    # verify insists that ExecStart's program exists: point it at this environment's.
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/triage-app/bin/triage-app", str(cli))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    complaints = [line for line in result.stderr.splitlines() if "triage-" in line]
    assert result.returncode == 0, result.stderr
    assert not complaints


def test_sysusers_and_tmpfiles_create_the_user_and_private_folders(tmp_path: Path) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers or systemd-tmpfiles is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating folders owned by another user needs root")
    (tmp_path / "etc").mkdir()
    for tool, conf in (
        (sysusers, "triage-app.sysusers.conf"),
        (tmpfiles, "triage-app.tmpfiles.conf"),
    ):
        args = [tool, f"--root={tmp_path}"]
        args += ["--create"] if tool == tmpfiles else []
        subprocess.run([*args, str(SYSTEMD / conf)], capture_output=True, timeout=60, check=True)
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    entry = next(line.split(":") for line in passwd if line.startswith("triage:"))
    uid = int(entry[2])
    assert uid != 0
    assert entry[5] == DATA_DIR
    assert entry[6].endswith("nologin")
    for folder in (DATA_DIR, "/etc/triage-app"):
        info = (tmp_path / folder.lstrip("/")).stat()
        assert (info.st_uid, info.st_mode & 0o777) == (uid, 0o700), folder


# --- MemoryDenyWriteExecute ------------------------------------------------------------------

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def _kernel_has_mdwe() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_the_pipeline_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes must not break the app: the real classify command, workers
    included, under the kernel's W^X switch (PR_SET_MDWE, Linux 6.3), which the children
    inherit. The child also proves the switch bites: a writable+executable map is refused."""
    if not _kernel_has_mdwe():
        pytest.skip("this kernel has no PR_SET_MDWE")
    script = tmp_path / "under_mdwe.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import ctypes, mmap, sys
            if __name__ == "__main__":  # spawned workers re-import this file
                libc = ctypes.CDLL(None, use_errno=True)
                assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0
                try:
                    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
                except PermissionError:
                    pass
                else:
                    sys.exit("W^X is not enforced")
                from triage_app.cli import main
                sys.exit(main(sys.argv[1:]))
            """
        )
    )
    images = ROOT / "triage_app" / "demo_data" / "images"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "classify",
            "--data-dir",
            str(tmp_path / "data"),
            str(images),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TRIAGE_APP_PROCESSING__WORKERS": "2"},
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(list(images.glob("*.dcm")))
    assert all(r["ok"] for r in records)
