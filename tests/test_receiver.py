"""The DICOM receiver: dcmtk's ``storescu`` plays the scanner on loopback, files are real.

Unit tests drive :class:`StudyGrouper` with made-up times and call ``DicomReceiver.store``
directly with Part 10 bytes; the system tests send a generated 300-slice CT series through the
real network stack and read back what landed in the spool.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import itertools
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pynetdicom import AE

from tests import dcmtk
from tests.ct_series import CtSeries, ct_dataset, write_ct_series
from tests.helpers import make_result
from triage_app import intake as intake_module
from triage_app import receiver as receiver_module
from triage_app.config import SPECS, Settings, load_settings
from triage_app.errors import ConfigError, ReceiverError
from triage_app.intake import SIDECAR_SUFFIX, FiledOutcome, move_durably
from triage_app.receiver import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
    DicomReceiver,
    StudyGrouper,
    run_receiver,
    spool_key,
)
from triage_app.secrets import load_or_create_site_secret
from triage_app.states import CaseEvent
from triage_app.store import REPROCESSED, CaseStore

AE_TITLE = "TRIAGE_TEST"
MB = 1024 * 1024
SERIES_SIZE = 300

MakeReceiver = Callable[..., DicomReceiver]


# --- fixtures and helpers ---------------------------------------------------------------------


def receiver_settings(storage: Path, **overrides: Any) -> Settings:
    values: dict[str, object] = {
        "receiver.storage_dir": storage,
        "receiver.ae_title": AE_TITLE,
        "receiver.bind_address": dcmtk.HOST,
        "receiver.port": dcmtk.free_port(),
        "receiver.study_quiet_s": 0.3,
        "receiver.min_free_mb": 0,
        "paths.data_dir": storage.parent / "data",
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return Settings(values)


@pytest.fixture
def make_receiver(tmp_path: Path) -> Iterator[MakeReceiver]:
    """Start receivers on free loopback ports (``receiver__key=value`` overrides settings)."""
    started: list[DicomReceiver] = []

    def make(**overrides: Any) -> DicomReceiver:
        receiver = DicomReceiver(receiver_settings(tmp_path / "receiver", **overrides))
        receiver.start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> CtSeries:
    return write_ct_series(tmp_path_factory.mktemp("ct300"), SERIES_SIZE, seed=11)


@pytest.fixture
def small_series(tmp_path: Path) -> CtSeries:
    return write_ct_series(tmp_path / "ct3", 3, seed=12)


def part10(seed: int = 3, index: int = 0, **changes: object) -> tuple[bytes, pydicom.Dataset]:
    """One small CT instance as the bytes a C-STORE handler gets (file meta + data set)."""
    ds = ct_dataset(seed, index, 1, np.zeros((512, 512), dtype=np.uint16))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), ds


def spooled(receiver: DicomReceiver) -> list[Path]:
    return sorted(receiver.incoming.rglob("*.dcm"))


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's data set, after the preamble and the file meta group."""
    assert data[128:132] == b"DICM"
    meta_length = int.from_bytes(data[140:144], "little")
    return data[144 + meta_length :]


def port_of(receiver: DicomReceiver) -> int:
    return receiver.address[1]


def sent_ok(result: Any) -> None:
    assert result.returncode == 0, f"storescu failed:\n{result.stdout}\n{result.stderr}"


def wait_for_studies(
    receiver: DicomReceiver, count: int = 1, timeout_s: float = 10.0
) -> list[list[Path]]:
    """The next ``count`` studies the receiver hands over (fails the test if they do not come)."""
    studies: list[list[Path]] = []
    deadline = time.monotonic() + timeout_s
    while len(studies) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(studies)} of {count} studies handed over within {timeout_s} s")
        time.sleep(0.05)
        studies.extend(receiver.ready_studies())
    return studies


def spool_path(receiver: DicomReceiver, study_uid: str, sop_uid: str) -> Path:
    return receiver.incoming / spool_key(study_uid) / f"{spool_key(sop_uid)}.dcm"


# --- StudyGrouper -----------------------------------------------------------------------------


def test_a_study_is_released_once_quiet_and_not_before() -> None:
    grouper = StudyGrouper(quiet_s=5.0, max_wait_s=300.0)
    grouper.add("s1", Path("a.dcm"), at=100.0)
    grouper.add("s1", Path("b.dcm"), at=103.0)

    assert grouper.pop_ready(107.9) == []  # 4.9 s after the last instance
    assert grouper.pop_ready(108.0) == [[Path("a.dcm"), Path("b.dcm")]]
    assert grouper.pop_ready(200.0) == []  # handed over once
    assert not grouper.is_pending("s1")


def test_each_new_instance_restarts_its_own_study_timer_only() -> None:
    grouper = StudyGrouper(quiet_s=2.0, max_wait_s=300.0)
    grouper.add("busy", Path("1.dcm"), at=0.0)
    grouper.add("idle", Path("x.dcm"), at=0.5)
    grouper.add("busy", Path("2.dcm"), at=1.9)

    assert grouper.pop_ready(2.6) == [[Path("x.dcm")]]
    assert grouper.is_pending("busy")
    assert grouper.pop_ready(3.9) == [[Path("1.dcm"), Path("2.dcm")]]


def test_a_resent_instance_is_listed_once_per_study() -> None:
    grouper = StudyGrouper(quiet_s=1.0, max_wait_s=300.0)
    for at in (0.0, 0.1, 0.2):
        grouper.add("s", Path("same.dcm"), at=at)
    grouper.add("s", Path("other.dcm"), at=0.3)

    assert grouper.pop_ready(1.3) == [[Path("same.dcm"), Path("other.dcm")]]


def test_an_instance_after_hand_over_starts_a_new_group() -> None:
    grouper = StudyGrouper(quiet_s=1.0, max_wait_s=300.0)
    grouper.add("s", Path("a.dcm"), at=0.0)
    assert grouper.pop_ready(1.0) == [[Path("a.dcm")]]
    grouper.add("s", Path("late.dcm"), at=5.0)
    assert grouper.pop_ready(5.5) == []
    assert grouper.pop_ready(6.0) == [[Path("late.dcm")]]


def max_wait_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "receiver.study_max_wait_s" in r.getMessage()]


def test_a_study_that_never_goes_quiet_is_handed_over_at_each_max_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grouper = StudyGrouper(quiet_s=1.0, max_wait_s=3.0)
    arrivals = [0.75 * i for i in range(9)]  # 0 .. 6.0 s: never 1 s without an instance
    handed: list[tuple[float, list[Path]]] = []
    for tick in range(33):  # the service loop, every 0.25 s up to 8 s: pop, then store
        now = tick * 0.25
        handed.extend((now, study) for study in grouper.pop_ready(now))
        for at in arrivals:
            if at == now:
                grouper.add("busy", Path(f"{at}.dcm"), at=at)

    def files(*times: float) -> list[Path]:
        return [Path(f"{at}.dcm") for at in times]

    assert handed == [
        (3.0, files(0.0, 0.75, 1.5, 2.25)),  # the first instance waited 3 s
        (6.0, files(3.0, 3.75, 4.5, 5.25)),  # the next batch's first waited 3 s
        (7.0, files(6.0)),  # the rest, once quiet
    ]
    assert grouper.hand_overs == {"quiet": 1, "max_wait": 2}
    lines = max_wait_lines(caplog)
    assert [r.levelno for r in lines] == [logging.INFO] * 2
    assert all("study busy " in r.getMessage() for r in lines)
    assert all("4 instance(s)" in r.getMessage() for r in lines)
    assert not any(".dcm" in r.getMessage() for r in lines)


def test_an_instance_stored_during_a_hand_over_goes_to_the_next_batch_only() -> None:
    grouper = StudyGrouper(quiet_s=1.0, max_wait_s=2.0)
    grouper.add("s", Path("a.dcm"), at=0.0)
    grouper.add("s", Path("b.dcm"), at=0.9)
    grouper.add("s", Path("c.dcm"), at=1.8)
    assert grouper.pop_ready(1.99) == []
    assert grouper.pop_ready(2.0) == [[Path("a.dcm"), Path("b.dcm"), Path("c.dcm")]]

    # While that batch is triaged: a new instance, and c again (its sender did not see the ack).
    grouper.add("s", Path("d.dcm"), at=2.1)
    grouper.add("s", Path("c.dcm"), at=2.2)

    assert grouper.is_pending("s")
    assert grouper.pop_ready(3.19) == []  # the timers start again from d, not from a
    # c is listed again: the service skips it if the first copy was filed (moved) meanwhile.
    assert grouper.pop_ready(3.2) == [[Path("d.dcm"), Path("c.dcm")]]
    assert not grouper.is_pending("s")


# --- storing one instance (no network) --------------------------------------------------------


def test_an_instance_is_spooled_byte_for_byte_under_hashed_names(
    make_receiver: MakeReceiver,
) -> None:
    receiver = make_receiver()
    data, ds = part10()

    assert receiver.store(data) == SUCCESS

    path = (
        receiver.incoming / spool_key(ds.StudyInstanceUID) / f"{spool_key(ds.SOPInstanceUID)}.dcm"
    )
    assert spooled(receiver) == [path]
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ds.StudyInstanceUID not in str(path) and ds.SOPInstanceUID not in str(path)
    assert len(path.stem) == 32
    assert receiver.instances_stored == 1
    assert not list(receiver.incoming.rglob("*.tmp"))


def test_storing_the_same_instance_again_replaces_it(make_receiver: MakeReceiver) -> None:
    receiver = make_receiver()
    data, _ = part10()

    assert [receiver.store(data) for _ in range(3)] == [SUCCESS] * 3

    assert len(spooled(receiver)) == 1
    assert receiver.instances_stored == 3


@pytest.mark.expect_log_warnings
def test_below_the_disk_reserve_stores_are_refused_with_one_alarm_per_episode(
    make_receiver: MakeReceiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    free = {"bytes": 50 * MB}
    monkeypatch.setattr(receiver_module, "free_disk_bytes", lambda path: free["bytes"])
    receiver = make_receiver(receiver__min_free_mb=100)
    data, _ = part10()

    def alarms() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("ALARM:")]

    assert receiver.store(data) == OUT_OF_RESOURCES
    assert receiver.store(data) == OUT_OF_RESOURCES
    assert receiver.low_disk
    assert len(alarms()) == 1
    assert alarms()[0].levelno == logging.ERROR
    assert "0xA700" in alarms()[0].getMessage()
    assert receiver.instances_refused == {"low_disk": 2}
    assert spooled(receiver) == []

    free["bytes"] = 100 * MB + len(data)  # exactly the reserve left after this instance
    assert receiver.store(data) == SUCCESS
    assert (receiver.low_disk, receiver.instances_stored) == (False, 1)

    free["bytes"] = 99 * MB
    assert receiver.store(data) == OUT_OF_RESOURCES
    assert len(alarms()) == 2  # a new episode, a new alarm


@pytest.mark.expect_log_warnings
def test_a_failed_write_is_refused_as_out_of_resources(make_receiver: MakeReceiver) -> None:
    receiver = make_receiver()
    data, ds = part10()
    # A plain file where the study's folder should go: the write fails for real (ENOTDIR).
    (receiver.incoming / spool_key(ds.StudyInstanceUID)).write_bytes(b"")

    assert receiver.store(data) == OUT_OF_RESOURCES

    assert receiver.instances_refused == {"write_failed": 1}
    assert receiver.instances_stored == 0
    assert not receiver.low_disk


@pytest.mark.expect_log_warnings
def test_unreadable_or_incomplete_data_sets_are_refused(
    make_receiver: MakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = make_receiver()
    no_study, ds = part10(StudyInstanceUID=None)
    truncated = part10()[0][:600]  # ends inside the header

    assert receiver.store(b"this is not DICOM" * 40) == CANNOT_UNDERSTAND
    assert receiver.store(truncated) == CANNOT_UNDERSTAND
    assert receiver.store(no_study) == DATASET_DOES_NOT_MATCH_SOP_CLASS

    assert receiver.instances_refused == {"invalid_dataset": 3}
    assert spooled(receiver) == []
    logged = caplog.text
    assert ds.SOPInstanceUID not in logged and "SYNTHETIC" not in logged


def test_files_left_by_a_crash_are_handed_over_at_start(tmp_path: Path) -> None:
    settings = receiver_settings(tmp_path / "receiver")
    study = settings.receiver_storage / "incoming" / ("a" * 32)
    study.mkdir(parents=True)
    left = [study / "1.dcm", study / "2.dcm"]
    for path in left:
        path.write_bytes(part10()[0])
    debris = study / ".3.dcm.0123456789abcdef.tmp"
    debris.write_bytes(b"half an image")

    with DicomReceiver(settings) as receiver:
        assert receiver.ready_studies() == [left]  # at once, without waiting for the timer

    assert not debris.exists()
    assert all(path.exists() for path in left)


def test_empty_study_folders_are_pruned_unless_the_study_is_open(
    make_receiver: MakeReceiver,
) -> None:
    receiver = make_receiver(receiver__study_quiet_s=3600.0, receiver__study_max_wait_s=3600.0)
    data, ds = part10(seed=1)
    assert receiver.store(data) == SUCCESS
    done = receiver.incoming / ("b" * 32)
    done.mkdir()

    receiver.prune_empty_studies()

    assert not done.exists()
    assert (receiver.incoming / spool_key(ds.StudyInstanceUID)).is_dir()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_instance_received_during_a_hand_over_is_spooled_and_handed_over_once(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    settings = receiver_settings(
        tmp_path / "receiver", receiver__study_quiet_s=1.0, receiver__study_max_wait_s=2.0
    )
    done = tmp_path / "done"
    done.mkdir()
    instances = [part10(seed=7, index=i) for i in range(4)]
    names = [f"{spool_key(ds.SOPInstanceUID)}.dcm" for _, ds in instances]

    def file_away(paths: list[Path]) -> None:
        """What the intake does with a handed-over file once triaged: move it out."""
        for path in paths:
            move_durably(path, done / path.name)

    with DicomReceiver(settings, clock=clock) as receiver:
        for at, (data, _) in zip((0.0, 0.9, 1.8), instances[:3], strict=True):
            clock.now = at
            assert receiver.store(data) == SUCCESS
        clock.now = 2.0
        (first,) = receiver.ready_studies()  # the max wait, although not quiet
        assert [p.name for p in first] == names[:3]
        folder = first[0].parent

        file_away(first[:1])
        clock.now = 2.1
        assert receiver.store(instances[3][0]) == SUCCESS  # arrives mid hand-over
        receiver.prune_empty_studies()
        file_away(first[1:])
        receiver.prune_empty_studies()
        assert [p.name for p in folder.iterdir()] == names[3:]  # not pruned, not lost

        assert receiver.ready_studies() == []
        clock.now = 3.1
        (second,) = receiver.ready_studies()
        assert second == list(folder.iterdir())
        file_away(second)
        receiver.prune_empty_studies()

        assert not folder.exists()
        assert receiver.ready_studies() == []
    assert sorted(p.name for p in done.iterdir()) == sorted(names)


def test_an_instance_arrives_when_it_is_stored_and_a_resent_one_when_stored_again(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    settings = receiver_settings(tmp_path / "receiver")
    data, ds = part10(seed=2)
    with DicomReceiver(settings, clock=clock) as receiver:
        clock.now = 5.0
        assert receiver.store(data) == SUCCESS
        clock.now = 7.0
        assert receiver.store(data) == SUCCESS  # the scanner sent it again
        path = spool_path(receiver, ds.StudyInstanceUID, ds.SOPInstanceUID)
        assert receiver.arrived(path) == 7.0
        assert receiver.arrived(path) is None  # filed: forgotten


def test_a_port_in_use_is_a_clear_receiver_error(tmp_path: Path) -> None:
    settings = receiver_settings(tmp_path / "receiver")

    with DicomReceiver(settings), pytest.raises(ReceiverError, match="cannot listen") as caught:
        DicomReceiver(settings).start()
    assert caught.value.code == "receiver_error"
    assert caught.value.temporary  # the instance before still closing it: a restart finds it free


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        # TEST-NET-1 (RFC 5737): never an address of this machine.
        ("192.0.2.1", "Cannot assign requested address"),
        ("no-such-host.invalid", None),  # RFC 2606: never resolves; the resolver's own words
    ],
)
def test_an_address_not_of_this_machine_is_a_setting_to_fix_naming_it(
    tmp_path: Path, address: str, reason: str | None
) -> None:
    """Not the temporary receiver_error (exit 75, restarted every 5 s for ever): a restart
    cannot give the machine that address. As ``central serve`` does (``bind_socket``)."""
    settings = receiver_settings(tmp_path / "receiver", receiver__bind_address=address)
    port = settings.receiver_port

    with pytest.raises(ConfigError) as caught:
        DicomReceiver(settings).start()

    assert caught.value.code == "config_invalid"
    assert not caught.value.temporary
    message = str(caught.value)
    assert message.startswith(
        f"receiver.bind_address: cannot listen for DICOM on {address}:{port} ("
    )
    assert message.endswith(
        "): it must be an address of this machine (ip -brief address lists them), or 0.0.0.0 "
        "for all of them"
    )
    if reason is not None:
        assert f"({reason})" in message


# --- settings: the max wait and the network timeouts -----------------------------------------

TIMEOUT_KEYS = ("receiver.acse_timeout_s", "receiver.dimse_timeout_s", "receiver.network_timeout_s")


def test_the_defaults_keep_the_former_timeouts_and_a_five_minute_max_wait() -> None:
    settings = Settings()

    assert [settings.get(key) for key in TIMEOUT_KEYS] == [30.0, 60.0, 60.0]
    assert settings.receiver_study_max_wait_s == 300.0


def test_the_listening_ae_uses_the_timeouts_from_the_settings(
    make_receiver: MakeReceiver,
) -> None:
    receiver = make_receiver(
        receiver__acse_timeout_s=7.5,
        receiver__dimse_timeout_s=45.0,
        receiver__network_timeout_s=90.0,
    )

    ae = receiver.ae
    assert ae is not None
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (7.5, 45.0, 90.0)
    receiver.stop()
    assert receiver.ae is None


@pytest.mark.timeout(30)
def test_a_connection_that_never_asks_for_an_association_is_dropped_at_the_acse_timeout(
    make_receiver: MakeReceiver,
) -> None:
    receiver = make_receiver(receiver__acse_timeout_s=1.0)

    with socket.create_connection((dcmtk.HOST, port_of(receiver)), timeout=10.0) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # the receiver closed it; the default (30 s) would time out
        waited = time.monotonic() - started

    assert 0.9 <= waited < 5.0


@pytest.mark.parametrize("key", TIMEOUT_KEYS)
def test_a_timeout_out_of_bounds_is_refused_naming_the_field(key: str, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(key)}: must be between 1 and 3600 \(got 0"
    ):
        Settings({key: 0})
    variable = SPECS[key].env_var
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(key)}: must be a number .*\[{variable}\]$"
    ):
        load_settings(tmp_path / "absent.toml", env={variable: "30s"})


def test_the_max_wait_is_bounded_and_never_below_the_quiet_time() -> None:
    with pytest.raises(ConfigError, match=r"^receiver\.study_max_wait_s: must be between 1 and"):
        Settings({"receiver.study_max_wait_s": 0.5})
    with pytest.raises(
        ConfigError,
        match=r"^receiver\.study_max_wait_s: must be at least receiver\.study_quiet_s "
        r"\(got 10 < 20\)",
    ):
        Settings({"receiver.study_quiet_s": 20.0, "receiver.study_max_wait_s": 10.0})
    same = Settings({"receiver.study_quiet_s": 20.0, "receiver.study_max_wait_s": 20.0})
    assert same.receiver_study_max_wait_s == 20.0


# --- dcmtk storescu as the scanner ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_300_instance_series_is_stored_once_and_a_resend_adds_nothing(
    make_receiver: MakeReceiver, series: CtSeries
) -> None:
    receiver = make_receiver()

    sent_ok(dcmtk.storescu(port_of(receiver), series.folder, called=AE_TITLE))

    files = spooled(receiver)
    assert len(files) == SERIES_SIZE
    assert {f.parent.name for f in files} == {spool_key(series.study_uid)}
    stored_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    assert sorted(stored_uids) == sorted(series.sop_uids)
    # Kept as received: the data set bytes of every file are exactly the ones sent.
    originals = {uid: path for uid, path in zip(series.sop_uids, series.files, strict=True)}
    for uid, path in zip(stored_uids, files, strict=True):
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(originals[uid].read_bytes())
    assert [sorted(study) for study in wait_for_studies(receiver)] == [files]

    sent_ok(dcmtk.storescu(port_of(receiver), series.folder, called=AE_TITLE))

    assert spooled(receiver) == files
    assert receiver.instances_stored == 2 * SERIES_SIZE
    assert receiver.instances_refused == {}
    assert [sorted(study) for study in wait_for_studies(receiver)] == [files]


@pytest.mark.expect_log_warnings
@pytest.mark.timeout(60)
def test_a_wrong_called_ae_title_is_rejected_and_nothing_stored(
    make_receiver: MakeReceiver, small_series: CtSeries, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = make_receiver()

    result = dcmtk.storescu(port_of(receiver), small_series.folder, called="NOT_TRIAGE")

    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert spooled(receiver) == []
    assert receiver.associations_rejected == 1
    assert "called AE title is not ours" in caplog.text


@pytest.mark.expect_log_warnings
@pytest.mark.timeout(60)
def test_only_allowed_calling_ae_titles_may_send(
    make_receiver: MakeReceiver, small_series: CtSeries, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = make_receiver(receiver__allowed_calling_aes=("CT_ROOM_1", "MR_ROOM_2"))
    port = port_of(receiver)

    refused = dcmtk.storescu(port, small_series.folder, called=AE_TITLE, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert spooled(receiver) == []
    assert "not in receiver.allowed_calling_aes" in caplog.text

    sent_ok(dcmtk.storescu(port, small_series.folder, called=AE_TITLE, calling="CT_ROOM_1"))
    assert len(spooled(receiver)) == 3
    assert receiver.associations_rejected == 1


@pytest.mark.timeout(60)
def test_echoscu_gets_an_answer(make_receiver: MakeReceiver) -> None:
    receiver = make_receiver()

    result = dcmtk.echoscu(port_of(receiver), called=AE_TITLE)

    assert result.returncode == 0, result.stderr


@pytest.mark.expect_log_warnings
@pytest.mark.timeout(60)
def test_the_scanner_sees_out_of_resources_when_the_disk_is_low(
    make_receiver: MakeReceiver, small_series: CtSeries, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(receiver_module, "free_disk_bytes", lambda path: 10 * MB)
    receiver = make_receiver(receiver__min_free_mb=20)

    result = dcmtk.storescu(port_of(receiver), small_series.folder, called=AE_TITLE, verbose=True)

    assert result.returncode != 0
    assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr
    assert spooled(receiver) == []
    assert receiver.low_disk


@pytest.mark.timeout(60)
def test_two_scanners_at_once_make_two_studies(make_receiver: MakeReceiver, tmp_path: Path) -> None:
    receiver = make_receiver()
    first = write_ct_series(tmp_path / "a", 20, seed=21)
    second = write_ct_series(tmp_path / "b", 20, seed=22)

    with ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(dcmtk.storescu, port_of(receiver), s.folder, called=AE_TITLE, calling=ae)
            for s, ae in ((first, "CT_ROOM_1"), (second, "CT_ROOM_2"))
        ]
        for run in runs:
            sent_ok(run.result())

    studies = sorted(sorted(study) for study in wait_for_studies(receiver, count=2))
    expected = sorted(
        sorted(spool_path(receiver, s.study_uid, uid) for uid in s.sop_uids)
        for s in (first, second)
    )
    assert studies == expected


@pytest.mark.expect_log_warnings
@pytest.mark.timeout(60)
def test_beyond_the_association_limit_a_scanner_is_told_to_retry_later(
    make_receiver: MakeReceiver, small_series: CtSeries, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = make_receiver(receiver__max_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context("1.2.840.10008.1.1")  # Verification
    held = holder.associate(dcmtk.HOST, port_of(receiver), ae_title=AE_TITLE)
    assert held.is_established
    try:
        result = dcmtk.storescu(port_of(receiver), small_series.folder, called=AE_TITLE)
    finally:
        held.release()

    assert result.returncode != 0
    assert "Local Limit Exceeded" in result.stdout + result.stderr
    assert "too many associations" in caplog.text
    assert spooled(receiver) == []


# --- the service: receiver + intake + case store ---------------------------------------------


def wait_for(
    predicate: Callable[[], bool], service: Future[None], timeout_s: float, what: str
) -> None:
    """Poll ``predicate``; fail at the time-out, or at once if the service has stopped."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if service.done():
            service.result()  # raises what stopped it
            pytest.fail(f"the service returned while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def receiver_service(settings: Settings, filed: list[FiledOutcome]) -> Iterator[Future[None]]:
    """``run_receiver`` in a thread, once it listens: its future, for :func:`wait_for` to watch.
    Stopped on leaving (as by SIGTERM), its outcome then raised if it failed."""
    listening = threading.Event()
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        service = pool.submit(
            run_receiver, settings, stop, on_filed=filed.append, on_tick=lambda _: listening.set()
        )
        try:
            wait_for(listening.is_set, service, 60, "the receiver to listen")
            yield service
        finally:
            stop.set()
        service.result(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_service_makes_one_case_per_instance_and_a_resend_makes_none(
    tmp_path: Path, series: CtSeries
) -> None:
    settings = receiver_settings(tmp_path / "receiver")
    port = settings.receiver_port
    filed: list[FiledOutcome] = []

    with receiver_service(settings, filed) as service:
        sent_ok(dcmtk.storescu(port, series.folder, called=AE_TITLE))
        wait_for(lambda: len(filed) >= SERIES_SIZE, service, 150, "the series' triage")
        sent_ok(dcmtk.storescu(port, series.folder, called=AE_TITLE))
        wait_for(lambda: len(filed) >= 2 * SERIES_SIZE, service, 150, "the re-sent series")

    assert len(filed) == 2 * SERIES_SIZE
    assert not [f for f in filed if f.quarantined or f.deferred]
    with CaseStore.open(settings.case_store_path) as store:
        cases = store.list_cases()
        assert len(cases) == SERIES_SIZE
        assert all(
            [t.event for t in store.history(case.case_id)].count(REPROCESSED) == 1 for case in cases
        )
    # The re-sent copies took their twins' places instead of piling up beside them.
    assert len(list((settings.receiver_storage / "done").rglob("*.dcm"))) == SERIES_SIZE
    incoming = settings.receiver_storage / "incoming"
    assert list(incoming.rglob("*.dcm")) == []
    assert list(incoming.iterdir()) == []  # the study's spool folder was pruned


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.expect_log_warnings  # the file that cannot leave the spool, said once
def test_a_file_that_cannot_leave_the_spool_is_filed_once_it_can_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spooled image the service may not take out of its folder (a permission changed
    under it) waits on its own and is tried again: it used to sit in the spool until the
    next restart, never triaged into done/."""
    study = write_ct_series(tmp_path / "study", 3, seed=37)
    settings = receiver_settings(tmp_path / "receiver")
    monkeypatch.setattr(intake_module, "STUCK_RETRY_FIRST_S", 0.5)
    incoming = settings.receiver_storage / "incoming"
    locked = threading.Event()
    locked.set()
    refused: list[Path] = []
    unlink = Path.unlink

    def refuse_in_the_spool(self: Path, missing_ok: bool = False) -> None:
        if locked.is_set() and self.is_relative_to(incoming) and self.suffix == ".dcm":
            refused.append(self)
            raise PermissionError(errno.EACCES, "Permission denied")  # a sticky folder, say
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_in_the_spool)
    filed: list[FiledOutcome] = []
    with receiver_service(settings, filed) as service:
        sent_ok(dcmtk.storescu(settings.receiver_port, study.folder, called=AE_TITLE))
        wait_for(lambda: len(set(refused)) == 3, service, 60, "three refused moves")
        time.sleep(1.0)  # at least one more try of each, still refused
        assert filed == []
        locked.clear()  # the admin gives the folder back
        wait_for(lambda: len(filed) >= 3, service, 60, "the images to be filed")

    assert len(refused) > 3, "each was tried again while the spool stayed locked"
    assert sorted(f.source.name for f in filed) == sorted(
        f"{spool_key(uid)}.dcm" for uid in study.sop_uids
    )
    assert not [f for f in filed if f.quarantined or f.deferred]
    assert len(list((settings.receiver_storage / "done").rglob("*.dcm"))) == 3
    assert list(incoming.rglob("*.dcm")) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_service_triages_a_study_that_never_goes_quiet_in_batches_each_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = write_ct_series(tmp_path / "busy", 40, seed=31)
    settings = receiver_settings(
        tmp_path / "receiver", receiver__study_quiet_s=1.0, receiver__study_max_wait_s=2.0
    )
    filed: list[FiledOutcome] = []
    sent_at: list[float] = []

    with receiver_service(settings, filed) as service:
        # A scanner that keeps sending, never 1 s apart, until the receiver has handed part
        # of the study over (and one image more), however slow the machine is.
        seen_a_batch = False
        for path in study.files:
            sent_ok(dcmtk.storescu(settings.receiver_port, path, called=AE_TITLE))
            sent_at.append(time.monotonic())
            if seen_a_batch:
                break
            seen_a_batch = bool(filed)
            time.sleep(0.1)
        assert seen_a_batch, "no hand-over while the scanner kept sending"
        count = len(sent_at)
        wait_for(lambda: len(filed) >= count, service, 90, "the study's triage")

    gaps = [later - earlier for earlier, later in itertools.pairwise(sent_at)]
    assert max(gaps) < 1.0, f"the sender paused long enough for a quiet hand-over: {gaps}"
    # Timed from each instance's arrival (metrics), not from its hand-over seconds later.
    assert min(f.submitted_at for f in filed) <= sent_at[0]
    lines = max_wait_lines(caplog)
    assert lines
    first_batch = re.search(r"the (\d+) instance", lines[0].getMessage())
    assert first_batch is not None and int(first_batch[1]) < count  # the rest came later
    # Named by a digest keyed with the site secret, not the spool's plain hash of the UID
    # (which anyone holding the UID could compute).
    secret = load_or_create_site_secret(settings.data_dir)
    keyed = hmac.new(secret, spool_key(study.study_uid).encode(), hashlib.sha256).hexdigest()
    assert f"study {keyed[:16]} is still receiving" in lines[0].getMessage()
    assert spool_key(study.study_uid) not in caplog.text
    assert not [uid for uid in (study.study_uid, *study.sop_uids) if uid in caplog.text]
    # Every instance sent handed over and filed exactly once, nothing left behind.
    assert sorted(f.source.name for f in filed) == sorted(
        f"{spool_key(uid)}.dcm" for uid in study.sop_uids[:count]
    )
    assert not [f for f in filed if f.quarantined or f.deferred]
    with CaseStore.open(settings.case_store_path) as store:
        cases = store.list_cases()
        assert len(cases) == count
        assert not any(
            t.event == REPROCESSED for case in cases for t in store.history(case.case_id)
        )
    assert len(list((settings.receiver_storage / "done").rglob("*.dcm"))) == count
    assert list((settings.receiver_storage / "incoming").iterdir()) == []


@pytest.mark.timeout(120)
def test_the_service_removes_images_filed_longer_ago_than_the_retention_period_at_start(
    tmp_path: Path,
) -> None:
    settings = receiver_settings(tmp_path / "receiver", intake__done_retention_days=30)
    done = settings.receiver_storage / "done"
    with CaseStore.open(settings.case_store_path) as store:
        store.record_result(make_result("case-held", decision="escalate"), CaseEvent.HOLD)
    filed: dict[str, Path] = {}
    for name, case_id, days in (
        ("old", "case-old", 31),
        ("recent", "case-recent", 29),
        ("held", "case-held", 400),
    ):
        data, _ = part10(seed=5, index=len(filed))
        image = done / spool_key(name) / f"{spool_key(case_id)}.dcm"
        image.parent.mkdir(parents=True)
        image.write_bytes(data)
        sidecar = image.with_name(image.name + SIDECAR_SUFFIX)
        sidecar.write_text(json.dumps(make_result(case_id, path=str(image)).to_json()), "utf-8")
        moment = time.time() - days * 86400
        os.utime(sidecar, (moment, moment))
        filed[name] = image
    listening = threading.Event()
    stop = threading.Event()

    with ThreadPoolExecutor(1) as pool:
        service = pool.submit(run_receiver, settings, stop, on_tick=lambda _: listening.set())
        try:
            wait_for(lambda: not filed["old"].exists(), service, 60, "the old image's removal")
        finally:
            stop.set()
        service.result(timeout=60)

    assert not filed["old"].parent.exists()  # with its result, and its study's folder
    assert sorted(p.relative_to(done) for p in done.rglob("*") if p.is_file()) == sorted(
        p.relative_to(done)
        for image in (filed["recent"], filed["held"])
        for p in (image, image.with_name(image.name + SIDECAR_SUFFIX))
    )
