"""``triage-app deidentify``: many files into a folder, through the real command and the batch.

The source folders are named after the patients, as exported studies often are; nothing of
them may reach the output names, and the originals stay in the local case store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.helpers import CliRun, phantom_dataset, run_cli, write_bad_inputs
from triage_app import deid_batch
from triage_app.deid_batch import DeidentifiedOutput, DeidOutcome, deidentify_to_folder
from triage_app.dicom import load_image
from triage_app.dicom.deidentify import DeidConfig, Deidentifier
from triage_app.dicom.deidentify.files import deidentify_file
from triage_app.dicom.pseudonym import patient_pseudonym, pseudonymous_uid
from triage_app.errors import InputError
from triage_app.escalation.phi_gate import IdentifyingValues, audit_payload
from triage_app.results import FailedInput
from triage_app.secrets import load_or_create_site_secret
from triage_app.store import CaseStore

PATIENTS = (("DOE^JOHN", "MRN4711"), ("ROE^JANE", "MRN5822"))
OUTPUT_NAME = re.compile(r"[0-9a-f]{16}/[0-9a-f]{16}/[0-9a-f]{16}\.dcm")
SECRET = b"d" * 32


@dataclass(frozen=True)
class Source:
    root: Path
    originals: dict[str, pydicom.Dataset]  # path as the report gives it -> the original
    bad: dict[str, str]  # file name -> expected error code (or "ok")


def write_source(root: Path, seed: int = 71) -> Source:
    """Two patients, each in folders named after them, next to bad inputs of every kind."""
    originals: dict[str, pydicom.Dataset] = {}
    for index in range(4):
        name, patient_id = PATIENTS[index // 2]
        folder = (
            root / f"{name} {patient_id}" / "study 1"
            if index < 2
            else root / name.replace("^", "_") / patient_id
        )
        folder.mkdir(parents=True, exist_ok=True)
        ds = phantom_dataset(seed, index)
        ds.PatientName = name
        ds.PatientID = patient_id
        path = folder / f"{patient_id}_{name.split('^')[0]}_{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        originals[str(path)] = ds
    bad = write_bad_inputs(root)
    return Source(root, originals, bad)


def identifiers(source: Source) -> list[str]:
    values = [part for name, _ in PATIENTS for part in name.split("^")]
    values += [patient_id for _, patient_id in PATIENTS]
    for ds in source.originals.values():
        values += [str(ds.AccessionNumber), str(ds.PatientBirthDate), str(ds.SOPInstanceUID)]
    return values


@dataclass(frozen=True)
class Runs:
    source: Source
    data: Path
    one: CliRun  # --workers 1 into dst/one
    two: CliRun  # --workers 2 into dst/two
    again: CliRun  # --workers 1 into dst/again
    retain: CliRun  # --option retain-uids into dst/retain
    dst: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("deid")
    source = write_source(base / "src")
    data, dst = base / "data", base / "dst"

    def run(out: str, *extra: str) -> CliRun:
        return run_cli("deidentify", source.root, dst / out, *extra, data_dir=data)

    return Runs(
        source,
        data,
        one=run("one", "--workers", "1"),
        two=run("two", "--workers", "2"),
        again=run("again", "--workers", "1"),
        retain=run("retain", "--option", "retain-uids", "--workers", "1"),
        dst=dst,
    )


def read_code(path: Path) -> str:
    """The code ``classify`` gives a file (its reader), or "ok"."""
    try:
        load_image(path)
    except InputError as err:
        return err.code
    return "ok"


# --- The report ---------------------------------------------------------------------------------


def test_every_input_gets_one_line_and_failures_exit_1(runs: Runs) -> None:
    run = runs.one
    assert run.returncode == 1, run.stderr
    records = run.records
    assert len(records) == len(runs.source.originals) + len(runs.source.bad)
    by_name = run.by_name()
    for name in runs.source.bad:
        record = by_name[name]
        if name == "no_pixels.dcm":
            # De-identification is header work: an instance without pixels is still one.
            assert record["ok"] is True
            continue
        assert record["ok"] is False
        assert record["error"]["code"] == read_code(runs.source.root / name)
        assert "\n" not in record["error"]["message"]
    for path in runs.source.originals:
        record = next(r for r in records if r["path"] == path)
        assert set(record) == {"path", "ok", "output", "deidentification", "timings_ms"}
        assert record["ok"] is True
    failures = [line for line in run.stderr.splitlines() if line.startswith("triage-app: ")]
    assert len(failures) == 3
    assert f"{len(records)} inputs" in run.stderr
    assert "Traceback" not in run.stderr


def test_outputs_are_named_from_deidentified_uids_only(runs: Runs) -> None:
    records = [r for r in runs.one.records if r["ok"]]
    outputs = {r["output"] for r in records}
    assert all(OUTPUT_NAME.fullmatch(output) for output in outputs), outputs
    written = {p.relative_to(runs.dst / "one").as_posix() for p in (runs.dst / "one").rglob("*")}
    assert {p for p in written if p.endswith(".dcm")} == outputs  # and no partial files
    assert not [p for p in written if ".partial" in p]
    names = "\n".join(outputs).lower()
    for value in [*identifiers(runs.source), "study", "chest", "p00"]:
        assert value.lower() not in names


def test_outputs_are_deidentified_with_keyed_pseudonyms_and_the_same_pixels(runs: Runs) -> None:
    secret = load_or_create_site_secret(runs.data)
    by_path = {r["path"]: r for r in runs.one.records}
    for path, original in runs.source.originals.items():
        record = by_path[path]
        data = (runs.dst / "one" / record["output"]).read_bytes()
        out = pydicom.dcmread(runs.dst / "one" / record["output"])
        pseudonym = patient_pseudonym(secret, f"id:{original.PatientID}")

        assert out.PatientIdentityRemoved == "YES"
        assert str(out.PatientName) == out.PatientID == pseudonym
        assert out.PatientID != original.PatientID
        assert record["deidentification"]["patient_pseudonym"] == pseudonym
        assert out.SOPInstanceUID == pseudonymous_uid(secret, original.SOPInstanceUID)
        assert out.PixelData == original.PixelData
        # The independent gate finds nothing of the original in the output either.
        assert audit_payload(data, b"{}", IdentifyingValues.capture(original)) == ()


def test_the_same_input_gives_byte_identical_outputs_whatever_the_workers(runs: Runs) -> None:
    def outputs(run: CliRun) -> list[tuple[str, str | None]]:
        return [(r["path"], r.get("output")) for r in run.records]

    assert runs.one.returncode == runs.two.returncode == runs.again.returncode == 1
    assert outputs(runs.one) == outputs(runs.two) == outputs(runs.again)
    for _, output in outputs(runs.one):
        if output is not None:
            first = (runs.dst / "one" / output).read_bytes()
            assert (runs.dst / "two" / output).read_bytes() == first
            assert (runs.dst / "again" / output).read_bytes() == first


def test_retain_uids_keeps_the_sop_instance_uid(runs: Runs) -> None:
    by_path = {r["path"]: r for r in runs.retain.records}
    for path, original in runs.source.originals.items():
        record = by_path[path]
        out = pydicom.dcmread(runs.dst / "retain" / record["output"], stop_before_pixels=True)
        assert out.SOPInstanceUID == original.SOPInstanceUID
        assert out.StudyInstanceUID == original.StudyInstanceUID
        assert "retain-uids" in record["deidentification"]["method"]
        assert str(out.PatientName) != str(original.PatientName)


def test_links_stay_in_the_case_store_and_originals_never_reach_the_report(runs: Runs) -> None:
    with CaseStore.open(runs.data / "cases.sqlite3") as store:
        for path, original in runs.source.originals.items():
            record = next(r for r in runs.one.records if r["path"] == path)
            pseudonym = record["deidentification"]["patient_pseudonym"]
            assert store.original_for("patient", pseudonym) == f"id:{original.PatientID}"
        codes = sorted(f.code for f in store.failures())
    # Four runs over the same inputs: each failed input is listed once (same path, bytes, code).
    assert codes == ["empty_file", "not_dicom", "truncated"]

    # The input paths are the user's own (here named after the patients): all else is clean.
    report = runs.one.stdout
    assert "DOE^JOHN" in report  # the folder names do contain the identifiers
    for record in runs.one.records:
        report = report.replace(json.dumps(record["path"]), '"<input>"')
    for value in identifiers(runs.source):
        assert value.lower() not in report.lower(), value
    assert "<input>" in report


# --- Usage and configuration errors -------------------------------------------------------------


def _one_error_line(run: CliRun) -> str:
    assert run.returncode == 2
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, run.stderr
    return errors[0]


def test_an_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    run = run_cli(
        "deidentify", source, tmp_path / "dst", "--option", "retain-all", data_dir=tmp_path
    )
    assert "retain-all" in _one_error_line(run)
    assert not (tmp_path / "dst").exists()


def test_full_and_modified_dates_together_are_refused_naming_the_setting(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    run = run_cli(
        "deidentify",
        source,
        tmp_path / "dst",
        "--option",
        "retain-longitudinal-full-dates",
        "--option",
        "retain-longitudinal-modified-dates",
        data_dir=tmp_path,
    )
    line = _one_error_line(run)
    assert "deidentify.options" in line and "config_invalid" in line
    assert not (tmp_path / "dst").exists()


def test_an_unreadable_pixel_clean_rules_file_is_a_configuration_error(tmp_path: Path) -> None:
    settings = tmp_path / "settings.toml"
    rules = tmp_path / "missing-rules.toml"
    settings.write_text(f'[deidentify]\npixel_clean_rules = "{rules}"\n', encoding="utf-8")
    source = tmp_path / "src"
    source.mkdir()
    run = run_cli(
        "deidentify", source, tmp_path / "dst", "--config", settings, data_dir=tmp_path / "d"
    )
    line = _one_error_line(run)
    assert str(rules) in line and "config_invalid" in line


def test_a_destination_inside_the_source_is_not_read_back(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    phantom_dataset(72, 0).save_as(source / "a.dcm", enforce_file_format=True)
    first = run_cli("deidentify", source, source / "out", data_dir=tmp_path / "d")
    second = run_cli("deidentify", source, source / "out", data_dir=tmp_path / "d")
    assert first.returncode == second.returncode == 0, second.stderr
    assert [r["path"] for r in second.records] == [str(source / "a.dcm")]
    assert second.records[0]["output"] == first.records[0]["output"]


# --- The batch itself ---------------------------------------------------------------------------


def _good_files(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"g{index}.dcm"
        phantom_dataset(73, index).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _batch(files: list[Path], destination: Path, store: Path) -> list[DeidOutcome]:
    return list(
        deidentify_to_folder(
            files,
            destination,
            secret=SECRET,
            config=DeidConfig(),
            store_path=store,
            workers=1,
        )
    )


def test_failures_are_kept_in_the_store(tmp_path: Path) -> None:
    good = _good_files(tmp_path / "in", 1)
    bad = write_bad_inputs(tmp_path / "bad")
    files = [*good, tmp_path / "bad" / "empty.dcm", tmp_path / "bad" / "notes.txt"]
    outcomes = _batch(files, tmp_path / "out", tmp_path / "cases.sqlite3")

    assert [type(o) for o in outcomes] == [DeidentifiedOutput, FailedInput, FailedInput]
    with CaseStore.open(tmp_path / "cases.sqlite3") as store:
        failures = store.failures()
    assert [(Path(f.path).name, f.code) for f in failures] == [
        ("empty.dcm", bad["empty.dcm"]),
        ("notes.txt", bad["notes.txt"]),
    ]


def test_a_write_failure_is_reported_and_the_batch_goes_on(tmp_path: Path) -> None:
    files = _good_files(tmp_path / "in", 2)
    destination = tmp_path / "out"
    blocked = deidentify_file(files[0], Deidentifier(SECRET, DeidConfig())).relative_path
    destination.mkdir()
    (destination / blocked.parts[0]).write_bytes(b"a file where a folder must go")

    outcomes = _batch(files, destination, tmp_path / "cases.sqlite3")

    failed, written = outcomes
    assert isinstance(failed, FailedInput) and isinstance(written, DeidentifiedOutput)
    assert failed.code == "write_failed"
    assert "\n" not in failed.message
    assert (destination / written.output).is_file()
    assert not [p for p in destination.rglob("*") if p.name.startswith(".partial")]
    with CaseStore.open(tmp_path / "cases.sqlite3") as store:
        assert [f.code for f in store.failures()] == ["write_failed"]


def test_links_are_flushed_in_batches_and_when_the_caller_stops_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _good_files(tmp_path / "in", 3)
    patients = [f"id:{pydicom.dcmread(f, stop_before_pixels=True).PatientID}" for f in files]

    monkeypatch.setattr(deid_batch, "LINK_BATCH", 2)
    outcomes = _batch(files, tmp_path / "out", tmp_path / "all.sqlite3")
    with CaseStore.open(tmp_path / "all.sqlite3") as store:
        for outcome, patient in zip(outcomes, patients, strict=True):
            assert isinstance(outcome, DeidentifiedOutput)
            pseudonym = outcome.deidentification["patient_pseudonym"]
            assert store.original_for("patient", pseudonym) == patient

    monkeypatch.setattr(deid_batch, "LINK_BATCH", 512)
    batch = deidentify_to_folder(
        files,
        tmp_path / "out2",
        secret=SECRET,
        config=DeidConfig(),
        store_path=tmp_path / "early.sqlite3",
        workers=1,
    )
    first = next(batch)
    assert isinstance(batch, Generator)
    batch.close()  # as a caller that stops reading (or crashes) does
    assert isinstance(first, DeidentifiedOutput)
    with CaseStore.open(tmp_path / "early.sqlite3") as store:
        pseudonym = first.deidentification["patient_pseudonym"]
        assert store.original_for("patient", pseudonym) == patients[0]
