"""The manifest's own hash: in the model reference, the result record and the load log line.

The manifest sets thresholds, calibration, preprocessing and intended use, and nothing vouches
for it; a record must show which manifest decided its case.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import make_result
from tests.model.conftest import (
    NORMAL_BELOW,
    PHANTOM_SEED,
    SMALL,
    dicom_bytes,
    read_doc,
    write_doc,
)
from triage_app.model import Classifier
from triage_app.model.manifest import MANIFEST_NAME, load_manifest, sha256_file, verify_bundle
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import CaseResult, ModelRef
from triage_app.states import CaseEvent
from triage_app.store import CaseStore
from triage_app.synthetic import render_phantom


def _rewrite_unusually(bundle: Path) -> bytes:
    """The same manifest with other whitespace and CRLF line ends: a hash of the parsed
    document (re-serialised) would differ from the file's, so only the file's bytes pass."""
    text = json.dumps(read_doc(bundle), indent=3, sort_keys=True).replace("\n", "\r\n")
    data = (text + "\r\n").encode("utf-8")
    (bundle / MANIFEST_NAME).write_bytes(data)
    return data


def test_the_record_names_the_manifest_file_as_it_is_on_disk(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    on_disk = _rewrite_unusually(tiny_bundle)
    image = tmp_path / "case.dcm"
    image.write_bytes(dicom_bytes(render_phantom(PHANTOM_SEED, 3, SMALL)))

    result = TriagePipeline(PipelineConfig(tiny_bundle, site_secret=b"s" * 32)).run(image)

    assert isinstance(result, CaseResult)
    model = result.to_json()["model"]
    assert model == {
        "name": load_manifest(tiny_bundle).name,
        "version": load_manifest(tiny_bundle).version,
        "sha256": sha256_file(tiny_bundle / "model.onnx"),
        "manifest_sha256": hashlib.sha256(on_disk).hexdigest(),
    }
    reserialised = json.dumps(load_manifest(tiny_bundle).raw, indent=2).encode()
    assert model["manifest_sha256"] != hashlib.sha256(reserialised).hexdigest()
    assert result.payload_json()["model"] == model  # the escalated copy names it too


def test_bundles_differing_in_one_threshold_have_different_manifest_hashes(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-bundle"
    shutil.copytree(tiny_bundle, other)
    doc = read_doc(other)
    doc["thresholds"]["normal_below"] = NORMAL_BELOW / 2
    write_doc(other, doc)

    first, second = Classifier(tiny_bundle).ref, Classifier(other).ref

    # The same name, version and ONNX file: only the manifest's hash tells them apart.
    assert (first.name, first.version, first.sha256) == (second.name, second.version, second.sha256)
    assert first.manifest_sha256 is not None and second.manifest_sha256 is not None
    assert first.manifest_sha256 != second.manifest_sha256
    assert second.manifest_sha256 == sha256_file(other / MANIFEST_NAME)


def test_verify_bundle_gives_the_hash_of_the_bytes_it_parsed(tiny_bundle: Path) -> None:
    assert verify_bundle(tiny_bundle).manifest_sha256 == sha256_file(tiny_bundle / MANIFEST_NAME)


def test_the_load_log_line_names_both_hashes(
    tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    classifier = Classifier(tiny_bundle)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded model ")]
    manifest_sha256 = sha256_file(tiny_bundle / MANIFEST_NAME)
    assert f"sha256 {classifier.manifest.sha256[:12]}…" in line
    assert f"manifest sha256 {manifest_sha256[:12]}…" in line
    assert manifest_sha256[:13] not in line  # 12 hex digits, as for the ONNX file


def test_a_record_stored_without_the_manifest_hash_still_loads(tmp_path: Path) -> None:
    old = make_result("case-old")  # a ModelRef without the manifest's hash: the old JSON
    assert "manifest_sha256" not in old.to_json()["model"]
    new = replace(
        make_result("case-new"), model=ModelRef("tiny-cnn", "1.2.0", "ab" * 32, "cd" * 32)
    )
    with CaseStore.open(tmp_path / "cases.sqlite3") as store:
        store.record_result(old, CaseEvent.DECIDE_LOCAL_NORMAL)
        store.record_result(new, CaseEvent.DECIDE_LOCAL_NORMAL)
        stored_old, stored_new = store.get("case-old"), store.get("case-new")

    assert stored_old is not None and stored_new is not None
    assert stored_old.result["model"] == {
        "name": "tiny-cnn",
        "version": "1.2.0",
        "sha256": "ab" * 32,
    }
    assert stored_old.model_sha256 == "ab" * 32
    assert stored_new.result["model"]["manifest_sha256"] == "cd" * 32
