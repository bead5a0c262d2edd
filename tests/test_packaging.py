"""The systemd units, user and folders in packaging/: hardened, pointed at the data folder only,
and accepted by systemd's own tools where this machine has them."""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import requests

from tests.central.conftest import first_started, free_port, make_case, new_device, seal_case
from tests.helpers import run_cli, wait_until
from triage_app import cli
from triage_app.central import server as central_server
from triage_app.central.config import DEFAULT_MAX_CONNECTIONS, DEFAULT_PORT, CentralConfig
from triage_app.central.server import GRACEFUL_SHUTDOWN_S, open_files_needed
from triage_app.central.verdicts import VerdictWorker
from triage_app.cli_central import CENTRAL_MODEL_NAME
from triage_app.cli_common import EXIT_OK, EXIT_USAGE
from triage_app.config import is_loopback_host, load_settings
from triage_app.escalation.keys import ServerPublicKey
from triage_app.escalation.receipt import sign_request

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "packaging" / "systemd"
UNITS = {"triage-watch.service": "watch", "triage-receive.service": "receive"}
DATA_DIR = "/var/lib/triage-app"
CONFIG = "/etc/triage-app/settings.toml"
# The central server: its own unit, user and folders, never the devices'.
CENTRAL_UNIT = "triage-central.service"
CENTRAL_USER = "triage-central"
CENTRAL_DATA_DIR = "/var/lib/triage-central"
CENTRAL_ETC = "/etc/triage-central"
CENTRAL_SYSUSERS = "triage-central.sysusers.conf"
CENTRAL_TMPFILES = "triage-central.tmpfiles.conf"
ALL_UNITS = (*sorted(UNITS), CENTRAL_UNIT)
UNIT_DATA_DIR = dict.fromkeys(UNITS, DATA_DIR) | {CENTRAL_UNIT: CENTRAL_DATA_DIR}
# Beyond the data folder, the only folder a unit may write: the watch service's optional
# scanner share ('-': only if it exists).
EXTRA_WRITABLE: dict[str, set[str]] = {
    "triage-watch.service": {"-/srv/triage/watch"},
    "triage-receive.service": set(),
    CENTRAL_UNIT: set(),
}
INSTALLED_CLI = "/opt/triage-app/bin/triage-app"

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
    "RestartPreventExitStatus": "2",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "60",
}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections → key → every value in order (systemd keys may repeat, unlike configparser's)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""  # a line ending in a backslash, continued on the next (joined by a space)
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if pending:
            assert line and not line.startswith(("#", ";")), f"{path.name}: broken continuation"
            line = f"{pending} {line}"
        elif not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    assert not pending, f"{path.name}: ends inside a continuation"
    return unit


def single(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values is not None, f"{key}= missing from [{section}]"
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


@pytest.fixture(params=sorted(UNITS))
def unit_name(request: pytest.FixtureRequest) -> str:
    """Each of the device's units."""
    name: str = request.param
    return name


@pytest.fixture(params=ALL_UNITS)
def any_unit(request: pytest.FixtureRequest) -> str:
    """Each unit: the device's and the central server's."""
    name: str = request.param
    return name


def test_the_unit_runs_the_service_as_a_notify_service_that_stops_cleanly(unit_name: str) -> None:
    unit = parse_unit(SYSTEMD / unit_name)
    for key, expected in SERVICE.items():
        assert single(unit, key) == expected, key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_unit_restarts_a_temporary_failure_but_not_a_settings_mistake(any_unit: str) -> None:
    """Exit 2 (a settings mistake) would fail again at once: not restarted. Exit 75 (a lock, a
    port, an inbox another process holds for now) passes: restarted, so never prevented."""
    unit = parse_unit(SYSTEMD / any_unit)
    prevented = single(unit, "RestartPreventExitStatus").split()
    assert (prevented, single(unit, "Restart")) == ([str(EXIT_USAGE)], "on-failure")
    assert str(cli.EXIT_TEMPFAIL) not in prevented + unit["Service"].get("SuccessExitStatus", [])


def test_the_unit_is_hardened(any_unit: str) -> None:
    unit = parse_unit(SYSTEMD / any_unit)
    for key, expected in HARDENING.items():
        assert single(unit, key) == expected, key
    filters = unit["Service"]["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert "~@privileged" in filters
    families = single(unit, "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_the_unit_never_runs_as_root(any_unit: str) -> None:
    unit = parse_unit(SYSTEMD / any_unit)
    assert single(unit, "User") not in {"root", "0", ""}
    assert single(unit, "Group") not in {"root", "0", ""}
    assert "DynamicUser" not in unit["Service"]  # the data folder must outlive the service
    assert "AmbientCapabilities" not in unit["Service"]


def test_the_unit_may_write_the_data_folders_only(any_unit: str) -> None:
    unit = parse_unit(SYSTEMD / any_unit)
    writable = {p for line in unit["Service"]["ReadWritePaths"] for p in line.split()}
    assert writable == {UNIT_DATA_DIR[any_unit]} | EXTRA_WRITABLE[any_unit]
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
    assert argv[0] == INSTALLED_CLI
    assert PurePosixPath(argv[0]).name in scripts
    assert argv[1] == UNITS[unit_name]
    options = argv[2:]
    assert options[options.index("--config") + 1] == CONFIG
    assert options[options.index("--log-format") + 1] == "json"


def sysusers_entries(conf: str) -> list[list[str]]:
    return [
        shlex.split(line)  # the description is quoted
        for line in (SYSTEMD / conf).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def tmpfiles_entries(conf: str) -> dict[str, list[str]]:
    """Path → the line's fields."""
    return {
        fields[1]: fields
        for line in (SYSTEMD / conf).read_text().splitlines()
        if line.strip() and not line.startswith("#")
        for fields in [line.split()]
    }


def test_the_user_and_folders_match_the_units() -> None:
    users = sysusers_entries("triage-app.sysusers.conf")
    assert [(u[0], u[1], u[4]) for u in users] == [("u", "triage", DATA_DIR)]

    tmpfiles = tmpfiles_entries("triage-app.tmpfiles.conf")
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


# --- The central server ------------------------------------------------------------------------

# [Service] keys each unit sets for its own program. Every other key the device units share is
# hardening, and the central unit must have it too, with the same values.
PER_SERVICE = {
    "Type",
    "NotifyAccess",
    "WatchdogSec",
    "ExecStart",
    "KillSignal",
    "KillMode",
    "TimeoutStopSec",
    "Restart",
    "RestartSec",
    "RestartPreventExitStatus",
    "LimitNOFILE",
    "User",
    "Group",
    "Environment",
    "EnvironmentFile",
    "WorkingDirectory",
    "ReadWritePaths",
}


def central_unit() -> Unit:
    return parse_unit(SYSTEMD / CENTRAL_UNIT)


def central_argv() -> list[str]:
    return shlex.split(single(central_unit(), "ExecStart"))


def central_config(monkeypatch: pytest.MonkeyPatch, argv: list[str] | None = None) -> CentralConfig:
    """The configuration ``central serve`` would run with from the unit's ExecStart (or
    ``argv``): the real argument parser, then the command's own handler, which builds and checks
    it (serve() is replaced by a catch)."""
    argv = central_argv() if argv is None else argv
    assert argv[0] == INSTALLED_CLI
    try:
        args = cli._parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"triage-app refuses the unit's command line: {argv[1:]}")
    assert (args.command, args.central_command) == ("central", "serve")
    made: list[CentralConfig] = []
    monkeypatch.setattr(central_server, "serve", made.append)
    assert args.handler(args) == EXIT_OK
    (config,) = made
    return config


def seconds(value: str) -> float:
    """A systemd time span as the units write it: ``60``, ``60s``, ``90s`` or ``2min``."""
    for suffix, factor in (("min", 60), ("s", 1)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


def is_within(path: str | os.PathLike[str], folder: str) -> bool:
    return PurePosixPath(path).is_relative_to(folder)


def test_the_central_command_line_is_what_the_real_cli_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert PurePosixPath(central_argv()[0]).name in scripts
    config = central_config(monkeypatch)
    assert config.data_dir == Path(CENTRAL_DATA_DIR)
    assert config.uses_tls and not config.allow_plain_http
    assert not is_loopback_host(config.host), "devices on other machines must reach it"
    # The server's own default port, above 1024: no CAP_NET_BIND_SERVICE needed (and none is
    # given: test_the_unit_never_runs_as_root).
    assert config.port == DEFAULT_PORT
    assert config.port >= 1024


def test_the_central_unit_reads_the_tls_files_make_cert_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The README makes them with ``central make-cert --data-dir /etc/triage-central``: run it
    (into a stand-in for that folder) and the unit must name the very files it wrote."""
    config = central_config(monkeypatch)
    assert config.tls_cert is not None and config.tls_key is not None
    made = run_cli("central", "make-cert", "--host", "central.example", data_dir=tmp_path)
    assert made.returncode == 0, made.stderr
    written = json.loads(made.stdout)
    assert Path(written["cert"]).relative_to(tmp_path) == config.tls_cert.relative_to(CENTRAL_ETC)
    assert Path(written["key"]).relative_to(tmp_path) == config.tls_key.relative_to(CENTRAL_ETC)
    assert re.fullmatch("[0-9a-f]{64}", written["tls_pin"])
    # The key as written is one the server accepts (it refuses a key others may read), and the
    # service cannot replace it: /etc/triage-central is outside what it may write.
    assert stat.S_IMODE(Path(written["key"]).stat().st_mode) == 0o600
    writable = single(central_unit(), "ReadWritePaths").split()
    assert not any(is_within(config.tls_key, folder.removeprefix("-")) for folder in writable)


def test_the_central_model_is_the_one_the_wheel_installs(monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = central_config(monkeypatch).model_dir
    assert model_dir is not None, "without --model-dir a missing model would go unnoticed"
    assert model_dir.name == CENTRAL_MODEL_NAME
    prefix = PurePosixPath(INSTALLED_CLI).parents[1]  # the venv the wheel is installed in
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    assert str(PurePosixPath(model_dir).relative_to(prefix)) in data_files


def test_the_central_unit_has_the_open_files_its_connection_cap_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``central serve`` raises its soft limit to what its flags need, up to the hard limit:
    the hard limit must cover the unit's flags and the defaults (1000 connections)."""
    soft, _, hard = single(central_unit(), "LimitNOFILE").partition(":")
    soft_limit, hard_limit = int(soft), int(hard or soft)
    assert soft_limit <= hard_limit
    default = CentralConfig(Path(CENTRAL_DATA_DIR), allow_plain_http=True)
    assert default.max_connections == DEFAULT_MAX_CONNECTIONS
    assert hard_limit >= open_files_needed(central_config(monkeypatch))
    assert hard_limit >= open_files_needed(default)


def test_the_central_server_stops_gracefully_before_systemd_kills_it() -> None:
    """On SIGTERM, requests in progress get GRACEFUL_SHUTDOWN_S and the verdict worker its stop
    timeout; systemd's SIGKILL must come later."""
    unit = central_unit()
    assert single(unit, "KillSignal") == "SIGTERM"
    worker_stop_s = inspect.signature(VerdictWorker.stop).parameters["timeout_s"].default
    assert seconds(single(unit, "TimeoutStopSec")) > GRACEFUL_SHUTDOWN_S + worker_stop_s


def test_the_central_unit_restarts_failures_but_not_configuration_errors() -> None:
    unit = central_unit()
    assert single(unit, "Restart") == "on-failure"
    assert seconds(single(unit, "RestartSec")) > 0
    # Exit 2 (EXIT_USAGE: a bad flag, TLS file, model bundle, address) would fail again at
    # once. Nothing else is exempt: a crash, a kill, an internal error (70), a watchdog timeout
    # or a temporary failure (75: the port still taken) is restarted.
    assert single(unit, "RestartPreventExitStatus").split() == [str(EXIT_USAGE)]
    assert "SuccessExitStatus" not in unit["Service"]


def test_the_central_unit_is_a_notify_service_with_a_watchdog_as_the_device_units() -> None:
    """``central serve`` says READY=1, pings the watchdog and says STOPPING=1 (run below by
    test_the_central_units_command_serves_verdicts_within_the_units_limits), and logs JSON."""
    unit = central_unit()
    for key in ("Type", "NotifyAccess", "WatchdogSec"):
        assert single(unit, key) == SERVICE[key], key
    argv = central_argv()
    assert argv[argv.index("--log-format") + 1] == "json"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in single(unit, "After", "Unit").split()


def test_the_central_unit_has_every_hardening_line_of_the_device_units() -> None:
    devices = [parse_unit(SYSTEMD / name)["Service"] for name in sorted(UNITS)]
    hardening = {key: values for key, values in devices[0].items() if key not in PER_SERVICE}
    for other in devices[1:]:
        assert {k: v for k, v in other.items() if k not in PER_SERVICE} == hardening
    assert set(HARDENING) <= set(hardening)
    central = central_unit()["Service"]
    for key, values in hardening.items():
        assert central.get(key) == values, key


def test_the_central_server_has_a_user_and_folders_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unit, config = central_unit(), central_config(monkeypatch)
    users = sysusers_entries(CENTRAL_SYSUSERS)
    assert [(u[0], u[1], u[4]) for u in users] == [("u", CENTRAL_USER, CENTRAL_DATA_DIR)]
    assert single(unit, "User") == single(unit, "Group") == CENTRAL_USER
    assert single(unit, "WorkingDirectory") == CENTRAL_DATA_DIR

    folders = tmpfiles_entries(CENTRAL_TMPFILES)
    assert set(folders) == {CENTRAL_DATA_DIR, CENTRAL_ETC}
    for path, fields in folders.items():
        assert fields[:5] == ["d", path, "0700", CENTRAL_USER, CENTRAL_USER], path
    # Everything the unit names lives in those folders (or the installed venv).
    assert str(config.data_dir) == CENTRAL_DATA_DIR
    assert config.tls_cert is not None and config.tls_key is not None
    assert is_within(config.tls_cert, CENTRAL_ETC) and is_within(config.tls_key, CENTRAL_ETC)

    # Nothing shared with a device on the same machine.
    device_users = {u[1] for u in sysusers_entries("triage-app.sysusers.conf")}
    assert CENTRAL_USER not in device_users
    for device_path in tmpfiles_entries("triage-app.tmpfiles.conf"):
        for path in folders:
            assert not is_within(path, device_path) and not is_within(device_path, path)


def test_the_readme_installs_and_explains_the_central_server() -> None:
    readme = (ROOT / "packaging" / "README.md").read_text()
    assert "container image for the central server" in readme  # still planned
    assert "\n## Central server (systemd)\n" in readme
    section = readme.split("\n## Central server (systemd)\n", 1)[1].split("\n## ", 1)[0]
    for name in (CENTRAL_UNIT, CENTRAL_SYSUSERS, CENTRAL_TMPFILES):
        assert f"`systemd/{name}`" in section, name
    for line in (
        f"packaging/systemd/{CENTRAL_SYSUSERS} /etc/sysusers.d/triage-central.conf",
        f"packaging/systemd/{CENTRAL_TMPFILES} /etc/tmpfiles.d/triage-central.conf",
        "systemd-sysusers triage-central.conf",
        "systemd-tmpfiles --create triage-central.conf",
        f"sudo -u {CENTRAL_USER} /opt/triage-app/bin/triage-app central make-cert "
        f"--data-dir {CENTRAL_ETC}",
        f"sudo -u {CENTRAL_USER} /opt/triage-app/bin/triage-app central add-device "
        f"--data-dir {CENTRAL_DATA_DIR}",
        f"sudo -u {CENTRAL_USER} /opt/triage-app/bin/triage-app central keys "
        f"--data-dir {CENTRAL_DATA_DIR}",
        "systemctl enable --now triage-central.service",
        "systemctl edit triage-central",
        f"{DEFAULT_PORT}/tcp",
    ):
        assert line in section, line
    for key in (
        "Type",
        "NotifyAccess",
        "WatchdogSec",
        "LimitNOFILE",
        "RestartPreventExitStatus",
        "TimeoutStopSec",
    ):
        assert f"`{key}=" in section, key
    assert "journalctl -u triage-central -o cat" in section  # JSON Lines, one per line
    assert "port_in_use" in section and "Exit 75" in section


def test_the_readmes_drop_in_for_the_central_server_is_one_it_accepts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The example drop-in empties ExecStart= and gives a whole command line that ``central
    serve`` accepts, for the same folders and files as the unit, within its open-file limit."""
    readme = (ROOT / "packaging" / "README.md").read_text()
    section = readme.split("\n## Central server (systemd)\n", 1)[1]
    (block,) = re.findall(r"```ini\n(.*?)```", section, flags=re.DOTALL)
    (tmp_path / "override.conf").write_text(block)
    assert parse_unit(tmp_path / "override.conf")["Service"]["ExecStart"][0] == ""
    exec_start = parse_unit(tmp_path / "override.conf")["Service"]["ExecStart"][-1]
    argv = shlex.split(exec_start)
    assert argv[argv.index("--log-format") + 1] == "json"  # the journal's JSON, kept
    changed = central_config(monkeypatch, argv)
    shipped = central_config(monkeypatch)
    for field in ("data_dir", "host", "port", "tls_cert", "tls_key", "model_dir"):
        assert getattr(changed, field) == getattr(shipped, field), field
    _, _, hard = single(central_unit(), "LimitNOFILE").partition(":")
    assert open_files_needed(changed) <= int(hard)


# --- systemd's own tools, where installed ----------------------------------------------------


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    script = Path(sys.executable).parent / "triage-app"
    if not script.exists():
        pytest.skip("the triage-app script is not installed in this environment")
    # verify insists that ExecStart's program exists: point it at this environment's.
    for name in ALL_UNITS:
        text = (SYSTEMD / name).read_text().replace(INSTALLED_CLI, str(script))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", *(str(tmp_path / n) for n in ALL_UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    complaints = [line for line in result.stderr.splitlines() if "triage-" in line]
    assert result.returncode == 0, result.stderr
    assert not complaints


# What each install puts in place: (sysusers file, tmpfiles file) → user → (home, its folders).
INSTALLS = {
    "device": {"triage": (DATA_DIR, (DATA_DIR, "/etc/triage-app"))},
    "central": {CENTRAL_USER: (CENTRAL_DATA_DIR, (CENTRAL_DATA_DIR, CENTRAL_ETC))},
}
CONF_FILES = {
    "device": ("triage-app.sysusers.conf", "triage-app.tmpfiles.conf"),
    "central": (CENTRAL_SYSUSERS, CENTRAL_TMPFILES),
}


@pytest.mark.parametrize(
    "installs", [("device",), ("central",), ("device", "central")], ids="+".join
)
def test_sysusers_and_tmpfiles_create_the_user_and_private_folders(
    tmp_path: Path, installs: tuple[str, ...]
) -> None:
    """Each install alone (a device; a machine that runs only the central server), and both on
    one machine, where they must get different users."""
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers or systemd-tmpfiles is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating folders owned by another user needs root")
    (tmp_path / "etc").mkdir()
    for install in installs:
        users_conf, folders_conf = CONF_FILES[install]
        for tool, conf in ((sysusers, users_conf), (tmpfiles, folders_conf)):
            args = [tool, f"--root={tmp_path}"]
            args += ["--create"] if tool == tmpfiles else []
            run = subprocess.run(
                [*args, str(SYSTEMD / conf)], capture_output=True, timeout=60, check=False
            )
            assert run.returncode == 0, run.stderr
    passwd = [line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()]
    uids = set()
    for install in installs:
        for user, (home, folders) in INSTALLS[install].items():
            entry = next(fields for fields in passwd if fields[0] == user)
            uid = int(entry[2])
            assert uid != 0
            assert entry[5] == home
            assert entry[6].endswith("nologin")
            for folder in folders:
                info = (tmp_path / folder.lstrip("/")).stat()
                assert (info.st_uid, info.st_mode & 0o777) == (uid, 0o700), folder
            uids.add(uid)
    assert len(uids) == len(installs)  # the central server never shares the devices' user


# --- MemoryDenyWriteExecute ------------------------------------------------------------------

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
#: Python lines that switch the kernel's W^X on for the process (PR_SET_MDWE), as
#: MemoryDenyWriteExecute= does, and prove it bites: a writable and executable map is refused.
UNDER_MDWE = f"""\
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("W^X is not enforced")
"""
#: Then the CLI itself, with the script's arguments.
RUN_CLI = "from triage_app.cli import main\nsys.exit(main(sys.argv[1:]))\n"


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
        "import ctypes, mmap, sys\n"
        'if __name__ == "__main__":  # spawned workers re-import this file\n'
        + textwrap.indent(UNDER_MDWE + RUN_CLI, "    ")
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


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_the_central_units_command_serves_verdicts_within_the_units_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit's own command line, its folders moved under tmp_path and on a free loopback
    port, with the TLS files made as the README says, under the unit's open-file limits and
    (where the kernel has it) W^X as MemoryDenyWriteExecute=yes imposes, with a notify socket
    and the unit's watchdog interval as systemd passes them: it says READY=1 and pings, the
    central model gives a registered device's case its verdict, and SIGTERM stops the server
    (STOPPING=1, exit 0) well within TimeoutStopSec; its log is JSON Lines throughout."""
    unit = central_unit()
    etc, data = tmp_path / "etc", tmp_path / "data"
    made = run_cli("central", "make-cert", data_dir=etc)  # loopback names by default
    assert made.returncode == 0, made.stderr
    cert = json.loads(made.stdout)["cert"]
    device = new_device()
    added = run_cli("central", "add-device", device.public_key_b64(), data_dir=first_started(data))
    assert added.returncode == 0, added.stderr

    moved = {
        CENTRAL_DATA_DIR: str(data),
        CENTRAL_ETC: str(etc),
        str(PurePosixPath(INSTALLED_CLI).parents[1] / "share" / "triage-app" / "models"): str(
            ROOT / "models"
        ),
    }
    argv = central_argv()[1:]
    for old, new in moved.items():
        argv = [arg.replace(old, new) if arg.startswith(old) else arg for arg in argv]
    port = free_port()
    argv += ["--host", "127.0.0.1", "--port", str(port)]  # the last one given counts
    soft, _, hard = single(unit, "LimitNOFILE").partition(":")
    mdwe = _kernel_has_mdwe()
    script = tmp_path / "as_the_unit.py"
    script.write_text(
        "import ctypes, mmap, os, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({int(soft)}, {int(hard or soft)}))\n"
        "os.umask(0o077)\n" + (UNDER_MDWE if mdwe else "") + RUN_CLI
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    env |= {
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": str(int(seconds(single(unit, "WatchdogSec")) * 1e6)),
    }
    log = tmp_path / "server.log"
    http = requests.Session()
    http.trust_env = False
    http.verify = cert  # the self-signed certificate itself, as a device pins it
    url = f"https://127.0.0.1:{port}"
    with (
        notify,
        log.open("w") as stderr,
        subprocess.Popen(
            [sys.executable, str(script), *argv], stdout=subprocess.DEVNULL, stderr=stderr, env=env
        ) as server,
    ):
        try:
            assert notify.recv(64) == b"READY=1", log.read_text()
            assert notify.recv(64) == b"WATCHDOG=1"  # the first ping, at once
            health = http.get(f"{url}/v1/health", timeout=5).json()
            assert health["model"] is not None, health  # --model-dir was loaded
            keys = http.get(f"{url}/v1/keys", timeout=5).json()
            case = make_case(0)
            body = seal_case(case, device, ServerPublicKey.from_b64(keys["server_public_key"]))
            posted = http.post(
                f"{url}/v1/cases/{case.case_id}",
                data=body,
                headers={"Content-Type": "application/octet-stream"},
                timeout=30,
            )
            assert posted.status_code == 201, posted.text
            path = f"/v1/cases/{case.case_id}/verdict"
            verdicts: list[requests.Response] = []

            def decided() -> bool:
                headers = sign_request(device, "GET", path, int(time.time()))
                verdicts.append(http.get(url + path, headers=headers, timeout=30))
                return verdicts[-1].status_code != 202

            wait_until(decided, timeout_s=60, interval_s=0.2, what="the central verdict")
            assert verdicts[-1].status_code == 200, verdicts[-1].text
            http.close()  # idle keep-alive connections would otherwise hold the TLS shutdown
            started = time.monotonic()
            server.send_signal(signal.SIGTERM)
            assert notify.recv(64) == b"STOPPING=1"  # the next ping is 30 s away
            returncode = server.wait(timeout=seconds(single(unit, "TimeoutStopSec")))
            stopped_in = time.monotonic() - started
        finally:
            if server.poll() is None:
                server.kill()
    output = log.read_text()
    assert returncode == 0, output
    assert stopped_in < GRACEFUL_SHUTDOWN_S, output
    records = [json.loads(line) for line in output.splitlines()]  # --log-format json
    assert {r["level"] for r in records} == {"INFO"}, output
    messages = [r["message"] for r in records]
    needed = open_files_needed(central_config(monkeypatch))
    assert any(m.startswith(f"open-file limit raised from {soft} to {needed} ") for m in messages)
    assert any(f"listening on 127.0.0.1:{port} (https" in m for m in messages), messages


# --- the wheel ---------------------------------------------------------------------------------


def _source_copy(destination: Path) -> Path:
    """The tracked files only (what a clean clone builds from): no venv, no build leftovers."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@pytest.mark.timeout(600)
def test_the_wheel_installed_alone_triages_the_demo_images(tmp_path: Path) -> None:
    """What the install steps do: build the wheel, install it into a venv of its own, run it.

    A data file missing from the wheel (the Annex E table once was: every image failed with an
    internal error) shows here, not at a site. The dependencies come from this venv's
    site-packages as a plain path, so that its editable install of the source tree is not seen.
    """
    source = _source_copy(tmp_path / "source")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("triage_app-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    dependencies = next(p for p in map(Path, sys.path) if p.name == "site-packages")
    (site_packages / "dependencies.pth").write_text(f"{dependencies}\n", encoding="utf-8")
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRIAGE_APP_"))}
    where = subprocess.run(
        [str(python), "-c", "import triage_app; print(triage_app.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(site_packages), where.stdout
    demo = subprocess.run(
        [str(venv / "bin" / "triage-app"), "demo", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert " 0 failed" in demo.stdout, demo.stdout
    assert "verdicts back" in demo.stdout, demo.stdout
