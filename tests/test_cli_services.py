"""The service commands' wiring: what the receive service shows on ``/metrics``."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import run_cli
from tests.test_receiver import part10, receiver_settings
from triage_app.cli_services import _receiver_metrics
from triage_app.metrics import ServiceMetrics
from triage_app.receiver import DicomReceiver

STORED = 0x0000  # the C-STORE success status


def samples(metrics: ServiceMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.exposition().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_receive_service_shows_the_receivers_tallies_and_hand_overs(tmp_path: Path) -> None:
    now = [0.0]
    settings = receiver_settings(
        tmp_path / "receiver", receiver__study_quiet_s=1.0, receiver__study_max_wait_s=2.0
    )
    receiver = DicomReceiver(settings, clock=lambda: now[0])
    metrics = ServiceMetrics()
    _receiver_metrics(metrics, receiver)
    receiver.start()
    try:
        for index, at in enumerate((0.0, 0.9, 1.8, 2.5)):  # one study, never 1 s quiet
            now[0] = at
            receiver.ready_studies()  # the service loop's poll: at 2.5 the first 3 go
            assert receiver.store(part10(index=index)[0]) == STORED
        now[0] = 2.5 + 1.0
        assert [len(study) for study in receiver.ready_studies()] == [1]
    finally:
        receiver.stop()

    figures = samples(metrics)
    assert figures[("triage_receiver_instances_stored_total", frozenset())] == 4
    hand_overs = "triage_receiver_study_hand_overs_total"
    assert figures[(hand_overs, frozenset({("why", "max_wait")}))] == 1  # the first 3, at 2.5 s
    assert figures[(hand_overs, frozenset({("why", "quiet")}))] == 1  # the last, once quiet


def test_watch_refuses_an_inbox_that_is_a_file_as_a_settings_error_naming_it(
    tmp_path: Path,
) -> None:
    """Not an internal error (70) at the first mkdir: the admin gave a file for a folder."""
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a folder")
    run = run_cli("watch", "--once", afile, data_dir=tmp_path / "data")
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line == f"triage-app: error: config_invalid: watch.inbox_dir: not a folder: {afile}"
    assert afile.read_bytes() == b"not a folder"
