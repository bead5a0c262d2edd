"""``triage-app queue release``: the real command in its own process, a real central server.

The held cases are made in this process as a shell makes them while the server's keys are
unknown (``triage_and_record`` without a queue); the command then runs as an admin runs it.
"""

from __future__ import annotations

import sqlite3
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.dcmtk import free_port
from tests.escalation.conftest import (
    PATIENT_ID,
    PATIENT_NAME,
    Central,
    Device,
    Escalated,
    device_identity,
    device_settings,
    link_for,
    queue_cases,
    triage,
)
from tests.helpers import CliRun, make_result, run_cli
from tests.test_secrets import (
    as_service_user,
    give_to_service_user,
    reachable_folder,
    service_user_env,
)
from triage_app.central.certificates import make_self_signed
from triage_app.central.storage import Verdict, VerdictFailure
from triage_app.central.verdicts import FAILURE_MESSAGES
from triage_app.config import Settings, save_settings
from triage_app.escalation.outbox import _MIGRATIONS
from triage_app.escalation.service import open_outbox
from triage_app.results import HELD, EscalationRef, ModelRef
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore


def release(settings: Settings, tmp_path: Path, *flags: str) -> CliRun:
    config = save_settings(settings, tmp_path / "settings.toml")
    return run_cli("queue", "release", *flags, "--config", config, data_dir=settings.data_dir)


def queued_ids(settings: Settings, tmp_path: Path) -> list[str]:
    config = save_settings(settings, tmp_path / "settings.toml")
    listed = run_cli("queue", "list", "--json", "--config", config, data_dir=settings.data_dir)
    assert listed.returncode == 0, listed.stderr
    return sorted(str(r["case_id"]) for r in listed.records)


def held_cases(settings: Settings, tmp_path: Path) -> list[Escalated]:
    return triage(settings, tmp_path / "scans", (0, 1), queue=None)


def test_release_queues_every_held_case_once_and_exits_0(
    central: Central, device: Device, tmp_path: Path
) -> None:
    settings = device.settings(central)
    cases = held_cases(settings, tmp_path)
    run = release(settings, tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "2 released, 0 still held"
    ids = sorted(c.case_id for c in cases)
    assert sorted(line.partition(": ")[0] for line in lines[:-1]) == ids  # one line per case
    assert all(": released: queued, outbox priority " in line for line in lines[:-1])
    assert queued_ids(settings, tmp_path) == ids

    again = release(settings, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "0 released, 0 still held\n"
    assert queued_ids(settings, tmp_path) == ids  # not twice
    with CaseStore.open(settings.case_store_path) as store:
        assert {c.state for c in store.list_cases()} == {CaseState.QUEUED}


def test_release_reports_a_case_that_stays_held_as_json_and_exits_1(
    central: Central, device: Device, tmp_path: Path
) -> None:
    settings = device.settings(central)
    gone, kept = held_cases(settings, tmp_path)
    Path(gone.result.path).unlink()
    run = release(settings, tmp_path, "--json")
    assert run.returncode == 1, run.stderr
    (report,) = run.records
    assert {k: v for k, v in report.items() if k != "cases"} == {
        "released": 1,
        "source_unavailable": 1,
        "decision_changed": 0,
        "exceeds_quota": 0,
        "waiting_for_room": 0,
        "still_held": 1,
    }
    assert {c["case_id"]: c["outcome"] for c in report["cases"]} == {
        gone.case_id: "source_unavailable",
        kept.case_id: "released",
    }
    assert queued_ids(settings, tmp_path) == [kept.case_id]
    # One warning line naming the case by its id, and nothing that identifies the patient.
    assert gone.case_id in run.stderr
    for secret in (PATIENT_NAME, PATIENT_ID, Path(gone.result.path).name):
        assert secret not in run.stdout + run.stderr


def test_release_while_the_server_is_unreachable_leaves_the_cases_held(
    central: Central, device: Device, tmp_path: Path
) -> None:
    port = free_port()
    settings = device.settings(central, url=f"https://127.0.0.1:{port}")
    held_cases(settings, tmp_path)
    run = release(settings, tmp_path)
    assert run.returncode == 1, run.stderr
    # Why none could go is in the one line an admin reads, not only in the log.
    assert run.stdout == (
        "0 released, 2 still held (none can be sealed: transport_error: the central server's "
        f"keys are not known yet: key fetch: cannot reach https://127.0.0.1:{port}: connection "
        "refused (ECONNREFUSED); check that the central server runs and escalation.central_url "
        "(host and port))\n"
    )
    assert "central server keys unknown and the server is unreachable" in run.stderr
    # `queue status`, where an admin looks, counts them too.
    config = tmp_path / "settings.toml"
    status = run_cli("queue", "status", "--config", config, data_dir=settings.data_dir)
    assert status.returncode == 0, status.stderr
    assert "pending 0, in flight 0, delivered 0, quarantined 0, held on the device 2" in (
        status.stdout
    )
    listed = run_cli("queue", "status", "--json", "--config", config, data_dir=settings.data_dir)
    assert listed.records[0]["held"] == 2


def drain(settings: Settings, tmp_path: Path) -> CliRun:
    config = save_settings(settings, tmp_path / "settings.toml")
    return run_cli("queue", "drain", "--config", config, data_dir=settings.data_dir)


def error_lines(run: CliRun) -> list[str]:
    return [line for line in run.stderr.splitlines() if ": error: " in line]


def test_drain_while_the_server_was_never_reachable_is_a_temporary_failure(
    tmp_path: Path,
) -> None:
    """Without the server's keys nothing can be sent: exit 75 (try again later), not 2, which
    would say the settings are wrong. The one line says where it looked (the URL's origin,
    never its path) and what the system answered, without -v."""
    port = free_port()  # nothing listens there
    url = f"https://127.0.0.1:{port}/site-a"
    settings = device_settings(tmp_path / "device", url, "ab" * 32)
    run = drain(settings, tmp_path)
    assert run.returncode == 75, run.stderr
    assert run.stdout == ""
    assert error_lines(run) == [
        "triage-app: error: transport_error: the central server's keys are not known yet: "
        f"key fetch: cannot reach https://127.0.0.1:{port}: connection refused (ECONNREFUSED); "
        "check that the central server runs and escalation.central_url (host and port)"
    ], run.stderr
    assert "site-a" not in run.stderr


@pytest.mark.parametrize("keys", ["fetched", "configured"])
def test_drain_with_a_wrong_pin_stops_for_the_setting_with_the_servers_fingerprint(
    central: Central, device: Device, tmp_path: Path, keys: str
) -> None:
    """A pin that is not the server's certificate is a setting to fix: exit 2 (a service is
    not restarted on it) with certificate_pin_mismatch, whether the keys were still to fetch
    (first contact) or known; the line names the setting and the fingerprint the server
    showed, so the admin can compare it with the one the server's admin has."""
    stale_pin = make_self_signed(tmp_path / "old-tls").sha256
    extra = {} if keys == "fetched" else central.public_keys()
    right = device.settings(central, **extra)
    if keys == "configured":
        with link_for(right) as link:
            (case,) = queue_cases(link, tmp_path / "in", (0,))
    run = drain(right.with_values(**{"escalation.tls_pin": stale_pin}), tmp_path)
    assert run.returncode == 2, run.stderr
    (line,) = error_lines(run)
    prefix = (
        "triage-app: error: certificate_pin_mismatch: the central server's keys are not known"
        " yet: key fetch: "
        if keys == "fetched"
        else "triage-app: error: certificate_pin_mismatch: 1 case left waiting: upload: "
    )
    assert line.startswith(prefix), run.stderr
    assert (
        f"the certificate of https://127.0.0.1:{central.port} does not match escalation.tls_pin"
        f" (its SHA-256 fingerprint is {central.pin}); nothing was sent" in line
    )
    assert central.store.count() == 0
    if keys == "configured":
        # The attempt prints the documented code, and the queue keeps it as the case's error.
        (printed,) = run.records
        assert (printed["case_id"], printed["outcome"], printed["code"]) == (
            case.case_id, "retry", "certificate_pin_mismatch",
        )  # fmt: skip
        assert "1 sent now" not in run.stderr
        assert "0 sent now, 1 still waiting, 0 quarantined now" in run.stderr
        config = save_settings(right, tmp_path / "settings.toml")
        listed = run_cli("queue", "list", "--json", "--config", config, data_dir=device.data_dir)
        (record,) = listed.records
        assert record["state"] == "pending"
        assert record["last_error"].startswith("certificate_pin_mismatch: upload: ")


def test_drain_reports_this_run_and_why_cases_wait_while_the_server_is_down(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """The counts are this run's, not the queue's lifetime; cases left waiting because the
    link is down give one line with the last failure and exit 75; once the server is back the
    next drain sends them without waiting out their backoff."""
    live = device.settings(central)
    with link_for(live) as link:  # fetches and keeps the server's keys
        queue_cases(link, tmp_path / "first", (0, 1))
    first = drain(live, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "2 sent now, 0 still waiting, 0 quarantined now" in first.stderr
    with link_for(live) as link:
        later = queue_cases(link, tmp_path / "later", (2, 3))

    port = free_port()  # the same server, unreachable: as a central_url without its port
    down = live.with_values(**{"escalation.central_url": f"https://127.0.0.1:{port}"})
    tried = sorted((c.case_id, "retry", "transport_error") for c in later)
    # The first run tries one case: once it finds the link down, the health is asked once and
    # the other case waits untried (against a silent server each would spend the connect
    # timeout). The second run finds cases waiting out their backoff, or tries the one left:
    # either way it says why they wait rather than say nothing.
    for run_number in range(2):
        run = drain(down, tmp_path)
        assert run.returncode == 75, run.stderr
        assert "0 sent now, 2 still waiting, 0 quarantined now" in run.stderr
        (line,) = error_lines(run)
        assert line.startswith("triage-app: error: transport_error: 2 cases left waiting: ")
        assert f"cannot reach https://127.0.0.1:{port}: connection refused (ECONNREFUSED)" in line
        assert line.endswith("check that the central server runs and escalation.central_url"
                             " (host and port)")  # fmt: skip
        printed = sorted((r["case_id"], r["outcome"], r["code"]) for r in run.records)
        assert set(printed) <= set(tried)
        assert len(printed) == 1 if run_number == 0 else len(printed) <= 1

    back = drain(live, tmp_path)
    assert back.returncode == 0, back.stderr
    assert "2 sent now, 0 still waiting, 0 quarantined now" in back.stderr
    assert sorted((r["case_id"], r["outcome"]) for r in back.records) == sorted(
        (c.case_id, "delivered") for c in later
    )
    assert error_lines(back) == []


@pytest.mark.expect_log_warnings  # the server logs the refused device
def test_drain_exits_1_for_the_cases_it_quarantined_and_0_after(
    central: Central, tmp_path: Path
) -> None:
    stranger = Device(tmp_path / "stranger", device_identity(tmp_path / "stranger"))
    settings = stranger.settings(central)  # a device the server does not know
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "in", (0,))
    run = drain(settings, tmp_path)
    assert run.returncode == 1, run.stderr
    (printed,) = run.records
    assert (printed["case_id"], printed["outcome"], printed["code"]) == (
        case.case_id, "quarantined", "unknown_device",
    )  # fmt: skip
    assert "0 sent now, 0 still waiting, 1 quarantined now" in run.stderr
    again = drain(settings, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 sent now, 0 still waiting, 0 quarantined now" in again.stderr


def test_an_outbox_written_by_a_newer_version_is_refused_for_good(tmp_path: Path) -> None:
    """Exit 2, which the units do not restart: restarting cannot make the app newer."""
    data = tmp_path / "data"
    open_outbox(Settings({"paths.data_dir": data})).close()
    raw = sqlite3.connect(data / "cases.sqlite3")
    with raw:
        raw.execute("UPDATE outbox_meta SET value = 99 WHERE key = 'schema_version'")
    raw.close()
    run = run_cli("queue", "status", data_dir=data)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert errors == [
        "triage-app: error: outbox_incompatible: outbox: schema version 99 is newer than this"
        f" app supports ({len(_MIGRATIONS)}); upgrade the app"
    ], run.stderr


def test_release_without_a_central_server_is_a_configuration_error(tmp_path: Path) -> None:
    run = run_cli("queue", "release", data_dir=tmp_path)
    assert run.returncode == 2
    assert "no central server is configured" in run.stderr


def test_retry_all_with_nothing_quarantined_says_so_and_exits_0(
    central: Central, device: Device, tmp_path: Path
) -> None:
    config = save_settings(device.settings(central), tmp_path / "settings.toml")
    password = "a long enough admin password"
    made = run_cli(
        "config", "set-admin-password", "--stdin", "--config", config,
        data_dir=device.data_dir, stdin=f"{password}\n",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    run = run_cli(
        "queue", "retry", "--all", "--admin-password-stdin", "--config", config,
        data_dir=device.data_dir, stdin=f"{password}\n",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "no quarantined cases: nothing to retry"


def listed(settings: Settings, tmp_path: Path, *flags: str) -> CliRun:
    config = save_settings(settings, tmp_path / "settings.toml")
    run = run_cli("queue", "list", *flags, "--config", config, data_dir=settings.data_dir)
    assert run.returncode == 0, run.stderr
    return run


def test_list_shows_the_central_verdicts_the_device_received(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """A headless admin reads the central server's answers in `queue list`: the verdict, the
    server's refusal to give one, or that it is still awaited. A case the case store does not
    know is listed all the same; every outbox field stays as it was."""
    settings = device.settings(central)
    with link_for(settings) as link:
        decided, undecidable, waiting = queue_cases(link, tmp_path / "in", (0, 1, 2))
    assert drain(settings, tmp_path).returncode == 0  # delivered; this server has no model
    verdict = Verdict(
        decided.case_id,
        "abnormal",
        0.981,
        {"normal": 0.019, "abnormal": 0.981},
        ModelRef("central-dx", "2.0.0", "cd" * 32),
        "2026-01-01T00:00:00Z",
    )
    central.store.set_verdict(verdict)
    central.store.set_verdict_failure(
        VerdictFailure(undecidable.case_id, "unprocessable_image", "cannot", "2026-01-01T00:00:00Z")
    )
    assert drain(settings, tmp_path).returncode == 0  # fetches the answers (poll_verdicts)
    unknown = "ef" * 32  # in the outbox only
    with open_outbox(settings) as outbox:
        outbox.enqueue(unknown, b"an envelope", reason="uncertain", payload_sha256="12" * 32)
        items = {item.case_id: item.to_json() for item in outbox.items()}

    records = {r["case_id"]: r for r in listed(settings, tmp_path, "--json").records}
    assert {k: {f: v for f, v in r.items() if f != "verdict"} for k, r in records.items()} == (
        items
    )
    assert {k: r["verdict"] for k, r in records.items()} == {
        decided.case_id: verdict.to_json(),
        undecidable.case_id: {
            "verdict": None,
            "error": {
                "code": "unprocessable_image",
                "message": FAILURE_MESSAGES["unprocessable_image"],
            },
        },
        waiting.case_id: None,
        unknown: None,
    }

    table = listed(settings, tmp_path).stdout.splitlines()
    assert table[0].split() == ["case_id", "state", "reason", "tries", "bytes", "since", "verdict"]
    rows = {line[:16]: line.split()[5:] for line in table[1:]}
    assert rows == {
        decided.case_id[:16]: [items[decided.case_id]["enqueued_at"], "abnormal", "(0.981)"],
        undecidable.case_id[:16]: [
            items[undecidable.case_id]["enqueued_at"],
            "no",
            "verdict:",
            "unprocessable_image",
        ],
        waiting.case_id[:16]: [items[waiting.case_id]["enqueued_at"], "pending"],
        unknown[:16]: [items[unknown]["enqueued_at"], "-"],
    }
    for secret in (PATIENT_NAME, PATIENT_ID):
        assert secret not in "\n".join(table)


@pytest.mark.parametrize("command", [("list", "--json"), ("status",)])
def test_a_data_folder_that_does_not_exist_is_an_error_and_stays_absent(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A mistyped --data-dir must not make an empty queue there and report zeros: the admin
    would believe every case had gone."""
    mistyped = tmp_path / "no-such-folder"
    run = run_cli("queue", *command, data_dir=mistyped)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert error_lines(run) == [
        f"triage-app: error: config_invalid: paths.data_dir: the folder {mistyped} does not "
        "exist; check --data-dir or paths.data_dir (nothing was created)"
    ], run.stderr
    assert not mistyped.exists()


def test_a_data_folder_where_nothing_was_queued_lists_nothing_and_stays_empty(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    status = run_cli("queue", "status", "--json", data_dir=data)
    assert status.returncode == 0, status.stderr
    assert status.records == [
        {
            "pending": 0,
            "in_flight": 0,
            "delivered": 0,
            "quarantined": 0,
            "queued_bytes": 0,
            "quota_bytes": Settings().queue_quota_bytes,
            "oldest_pending_age_s": None,
            "full": False,
            "held": 0,
        }
    ]
    text = run_cli("queue", "status", data_dir=data)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("pending 0, in flight 0, delivered 0, quarantined 0, held on")
    assert run_cli("queue", "list", "--json", data_dir=data).stdout == ""
    table = run_cli("queue", "list", data_dir=data)
    assert (table.returncode, len(table.stdout.splitlines())) == (0, 1)  # the header only
    assert list(data.iterdir()) == []


def test_a_device_that_only_held_cases_counts_them_and_gains_no_outbox(tmp_path: Path) -> None:
    """No central server: cases are held and no outbox was ever made. ``queue status`` counts
    the held cases (it said 0), and neither command makes the outbox (they did, root's when
    run with sudo, which the service could then not use)."""
    data = tmp_path / "data"
    settings = Settings({"paths.data_dir": data})
    held = replace(make_result("held-1", decision="escalate", reason="uncertain"),
                   escalation=EscalationRef(state=HELD))  # fmt: skip
    with CaseStore.open(settings.case_store_path) as store:
        store.record_result(held, CaseEvent.HOLD)
    before = sorted(p.name for p in data.iterdir())

    status = run_cli("queue", "status", "--json", data_dir=data)
    assert status.returncode == 0, status.stderr
    assert [(r["pending"], r["held"]) for r in status.records] == [(0, 1)]
    listed = run_cli("queue", "list", "--json", data_dir=data)
    assert (listed.returncode, listed.stdout) == (0, "")

    assert sorted(p.name for p in data.iterdir()) == before
    with sqlite3.connect(settings.case_store_path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert not [t for t in tables if t.startswith("outbox")]


def test_a_data_folder_this_user_may_not_use_is_a_setting_to_fix_not_a_retry(
    tmp_path: Path,
) -> None:
    """It was ``outbox_error``, exit 75 ("try again later"), for a data folder left to root:
    now exit 2 with its owner and the fix, as the services say at start."""
    with reachable_folder() as base:
        data = base / "data"
        settings = Settings({"paths.data_dir": data})
        open_outbox(settings).close()  # the outbox and case store, made by root
        home = base / "home"
        home.mkdir()
        give_to_service_user(home)
        run = subprocess.run(
            as_service_user("-m", "triage_app", "queue", "status", "--data-dir", data),
            capture_output=True,
            text=True,
            timeout=120,
            env=service_user_env(home),
            check=False,
        )
    assert run.returncode == 2, run.stderr
    (line,) = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert line.startswith("triage-app: error: config_invalid: paths.")
    assert "owned by root" in line or "mode" in line, line
