"""Delivery as an operator runs it: the real ``triage-app`` commands in their own processes.

The central server runs in this process (``ServerThread``: uvicorn on 127.0.0.1, a self-signed
certificate the device pins); the device side is ``python -m triage_app ...`` with a settings
file, exactly as a shell or a service manager starts it, and is killed for real (SIGKILL,
SIGTERM). The crash test drives the product's ``Uploader`` in a child process, because the
lease of ``queue drain`` (300 s) cannot be shortened from the command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.escalation.conftest import (
    Central,
    Escalated,
    link_for,
    queue_cases,
    write_identified_phantoms,
)
from tests.escalation.conftest import (
    Device as DeviceFolder,
)
from tests.fault_proxy import FaultProxy
from tests.helpers import CliRun, run_cli, wait_until
from triage_app.config import Settings, save_settings
from triage_app.escalation.outbox import OutboxState
from triage_app.states import CaseState
from triage_app.store import CaseStore

# The product's uploader with a short lease, run as ``queue drain --follow`` runs it.
CHILD_UPLOADER = """
import signal, sys, threading
from pathlib import Path
from triage_app.config import load_settings
from triage_app.escalation.service import open_escalation
from triage_app.escalation.uploader import Uploader, UploaderConfig

config, data_dir, lease_s = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
settings = load_settings(config, overrides={"paths.data_dir": data_dir})
link = open_escalation(settings)
assert link is not None and link.keys is not None
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
uploader = Uploader(
    outbox=link.outbox, client=link.client, device=link.device, keys=link.keys,
    store_path=settings.case_store_path,
    config=UploaderConfig(retry_cap_s=settings.retry_cap_s, lease_s=lease_s),
    owner="crash-child",
)
with link, uploader:
    print("ready", flush=True)
    uploader.run(stop, on_attempt=lambda a: print(a.outcome, a.case_id, flush=True))
"""


def child_env() -> dict[str, str]:
    """The environment without this machine's ``TRIAGE_APP_*`` settings (as ``run_cli``)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}


def settings_file(settings: Settings, tmp_path: Path) -> Path:
    return save_settings(settings, tmp_path / "settings.toml")


def queue_records(config: Path, data_dir: Path) -> list[dict[str, object]]:
    listed = run_cli("queue", "list", "--json", "--config", config, data_dir=data_dir)
    assert listed.returncode == 0, listed.stderr
    return listed.records


def central_cases(central: Central) -> CliRun:
    run = run_cli("central", "cases", "--json", data_dir=central.thread.config.data_dir)
    assert run.returncode == 0, run.stderr
    return run


def states(settings: Settings, cases: list[Escalated]) -> list[CaseState]:
    with CaseStore.open(settings.case_store_path) as store:
        found = [store.get(case.case_id) for case in cases]
    return [case.state for case in found if case is not None]


# --- classify and queue drain -------------------------------------------------------------------


def test_classify_queues_escalated_cases_for_the_configured_server(
    central: Central, device: DeviceFolder, tmp_path: Path
) -> None:
    config = settings_file(device.settings(central), tmp_path)
    written = write_identified_phantoms(tmp_path / "in", (0, 1, 2))

    run = run_cli("classify", tmp_path / "in", "--config", config, data_dir=device.data_dir)

    assert run.returncode == 0, run.stderr
    assert len(run.records) == len(written)
    assert [r["escalation"]["state"] for r in run.records] == ["queued"] * len(written)
    assert [r["state"] for r in queue_records(config, device.data_dir)] == ["pending"] * 3


def test_queue_drain_delivers_every_queued_case_exactly_once(
    central: Central, device: DeviceFolder, tmp_path: Path
) -> None:
    settings = device.settings(central)
    config = settings_file(settings, tmp_path)
    with link_for(settings) as link:  # fetches and keeps the server's keys for the CLI
        cases = queue_cases(link, tmp_path / "in", (0, 1, 2))
    ids = sorted(case.case_id for case in cases)
    assert [r["state"] for r in queue_records(config, device.data_dir)] == ["pending"] * 3

    drained = run_cli("queue", "drain", "--config", config, data_dir=device.data_dir)

    assert drained.returncode == 0, drained.stderr
    assert sorted((r["case_id"], r["outcome"], r["deliveries"]) for r in drained.records) == [
        (case_id, "delivered", 1) for case_id in ids
    ]
    assert "3 sent now, 0 still waiting, 0 quarantined now" in drained.stderr
    listed = queue_records(config, device.data_dir)
    assert sorted((r["case_id"], r["state"]) for r in listed) == [
        (case_id, "delivered") for case_id in ids
    ]
    assert "receipt" not in json.dumps(listed), "queue list shows no receipts"
    assert states(settings, cases) == [CaseState.DELIVERED] * 3
    on_server = central_cases(central).records
    assert sorted((r["case_id"], r["deliveries"]) for r in on_server) == [
        (case_id, 1) for case_id in ids
    ]
    assert {r["device_id"] for r in on_server} == {device.identity.device_id}

    again = run_cli("queue", "drain", "--config", config, data_dir=device.data_dir)

    assert again.returncode == 0, again.stderr
    assert again.records == [], "nothing is sent twice"
    assert central.deliveries() == dict.fromkeys(ids, 1)


# --- crashes and signals ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sender_killed_mid_upload_leaves_its_case_to_be_delivered_once_after_its_lease(
    central: Central, device: DeviceFolder, tmp_path: Path
) -> None:
    lease_s = 4.0
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(
            central, url=f"https://127.0.0.1:{proxy.port}", **central.public_keys()
        )
        config = settings_file(settings, tmp_path)
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "in", (0, 1, 2))
            outbox = link.outbox
            proxy.delay(0.3)  # slow uploads: the first one is still on its way when it dies
            with subprocess.Popen(
                [sys.executable, "-c", CHILD_UPLOADER, str(config), str(device.data_dir),
                 str(lease_s)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
            ) as child:  # fmt: skip

                def uploading() -> bool:
                    if child.poll() is not None:
                        pytest.fail(f"the sender exited early: {child.communicate()[1]}")
                    return outbox.status().in_flight == 1 and proxy.bytes_up > 16 * 1024

                wait_until(uploading, timeout_s=60, what="an upload in flight")
                child.kill()
                child.communicate(timeout=10)
            assert child.returncode == -signal.SIGKILL
            assert central.store.count() == 0, "it died before the upload was complete"
            (killed,) = [item for item in outbox.items() if item.state is OutboxState.IN_FLIGHT]
            assert killed.lease_owner == "crash-child" and killed.lease_until is not None
            lease_until = datetime.fromisoformat(killed.lease_until)
            assert lease_until > datetime.now(UTC), "nobody may take it while it is leased"

            proxy.pass_through()
            wait_until(
                lambda: datetime.now(UTC) > lease_until,
                timeout_s=lease_s + 5,
                interval_s=0.1,
                what="the lease to run out",
            )
            restarted = run_cli("queue", "drain", "--config", config, data_dir=device.data_dir)

            assert restarted.returncode == 0, restarted.stderr
            assert sorted(r["outcome"] for r in restarted.records) == ["delivered"] * 3
            items = {item.case_id: item for item in outbox.items()}
            assert {item.state for item in items.values()} == {OutboxState.DELIVERED}
            assert items[killed.case_id].attempts == 1, "the expired lease counts as an attempt"
            # Delivered: the error of the attempt the kill cut short is the history's now.
            assert items[killed.case_id].last_error is None
            assert list(outbox.spool_dir.iterdir()) == []
        assert states(settings, cases) == [CaseState.DELIVERED] * 3
        with CaseStore.open(settings.case_store_path) as store:
            resumed = [step.to_state.value for step in store.history(killed.case_id)]
        assert resumed[-4:] == ["send_failed_retrying", "queued", "sending", "delivered"]
        delivered = central.deliveries()
        assert sorted(delivered) == sorted(case.case_id for case in cases)
        assert central.store.count() == 3
        # The dead sender's request may still have reached the server: then it was counted.
        assert all(count in (1, 2) for count in delivered.values()), delivered


@pytest.mark.slow
def test_a_killed_queue_drain_s_case_is_taken_back_at_once_by_the_next_drain(
    central: Central, device: DeviceFolder, tmp_path: Path
) -> None:
    """The real command killed mid-upload: the restarted drain sees the lease holder's process
    is gone, takes its case back at once (not after the 300 s lease) and delivers every case
    exactly once."""
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(
            central, url=f"https://127.0.0.1:{proxy.port}", **central.public_keys()
        )
        config = settings_file(settings, tmp_path)
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "in", (0, 1, 2))
            outbox = link.outbox
            proxy.delay(0.3)
            command = [sys.executable, "-m", "triage_app", "queue", "drain", "--follow"]
            with subprocess.Popen(
                [*command, "--config", str(config), "--data-dir", str(device.data_dir)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
            ) as follower:

                def uploading() -> bool:
                    if follower.poll() is not None:
                        pytest.fail(f"queue drain --follow exited: {follower.communicate()[1]}")
                    return outbox.status().in_flight == 1 and proxy.bytes_up > 16 * 1024

                wait_until(uploading, timeout_s=60, what="an upload in flight")
                follower.kill()
                follower.communicate(timeout=10)
            assert follower.returncode == -signal.SIGKILL
            (killed,) = [item for item in outbox.items() if item.state is OutboxState.IN_FLIGHT]
            assert killed.lease_until is not None
            lease = datetime.fromisoformat(killed.lease_until) - datetime.fromisoformat(
                killed.updated_at
            )
            assert lease.total_seconds() == 300.0

            proxy.pass_through()
            restarted = run_cli("queue", "drain", "--config", config, data_dir=device.data_dir)

            assert restarted.returncode == 0, restarted.stderr
            assert "3 sent now, 0 still waiting, 0 quarantined now" in restarted.stderr
            assert sorted((r["case_id"], r["outcome"]) for r in restarted.records) == sorted(
                (c.case_id, "delivered") for c in cases
            )
            taken_back = outbox.get(killed.case_id)
            assert taken_back is not None and taken_back.state is OutboxState.DELIVERED
            assert taken_back.attempts == 1  # the killed attempt counts
    deliveries = central.deliveries()
    assert sorted(deliveries) == sorted(c.case_id for c in cases)  # each stored once
    assert all(deliveries[c.case_id] in (1, 2) for c in cases)  # the killed one may have landed


def test_sigterm_stops_queue_drain_follow_cleanly_within_seconds(
    central: Central, device: DeviceFolder, tmp_path: Path
) -> None:
    settings = device.settings(central)
    config = settings_file(settings, tmp_path)
    with link_for(settings) as link:
        cases = queue_cases(link, tmp_path / "in", (1, 2))
        outbox = link.outbox
        command = [sys.executable, "-m", "triage_app", "queue", "drain", "--follow"]
        with subprocess.Popen(
            [*command, "--config", str(config), "--data-dir", str(device.data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        ) as follower:

            def delivered() -> bool:
                if follower.poll() is not None:
                    pytest.fail(f"queue drain --follow exited: {follower.communicate()[1]}")
                return outbox.status().delivered == len(cases)

            wait_until(delivered, timeout_s=60, what="queue drain --follow to deliver")
            signalled = time.monotonic()
            follower.send_signal(signal.SIGTERM)
            out, err = follower.communicate(timeout=15)
            took = time.monotonic() - signalled

        assert follower.returncode == 0, err
        assert took < 5.0, took
        printed = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert sorted((p["case_id"], p["outcome"]) for p in printed) == sorted(
            (case.case_id, "delivered") for case in cases
        )
    assert central.deliveries() == {case.case_id: 1 for case in cases}
