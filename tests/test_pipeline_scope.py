"""Scope checks end to end: a real DICOM file through the CLI's loop with the shipped model.

The shipped chest model is for frontal views (PA/AP). A lateral or oblique chest with Body Part
Examined CHEST used to be classified as if frontal and could be called normal on the device; so
could a chest stored left-right mirrored, which the model never saw in training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from triage_app.batch import triage_and_record
from triage_app.config import Settings
from triage_app.results import CaseResult
from triage_app.store import CaseStore
from triage_app.synthetic import PhantomConfig, phantom_to_dataset, render_phantom

# A normal DX phantom the shipped model calls normal with confidence (score ~0.005) when frontal.
SEED, INDEX = 2024, 5
SMALL = PhantomConfig(size_range=(256, 384))


def _chest(view_position: str | None) -> Dataset:
    ds = phantom_to_dataset(render_phantom(SEED, INDEX, SMALL))
    assert (ds.Modality, ds.BodyPartExamined) == ("DX", "CHEST")
    if view_position is None:
        del ds.ViewPosition
    else:
        ds.ViewPosition = view_position
    return ds


def _triage(folder: Path, ds: Dataset) -> tuple[CaseResult, dict[str, Any]]:
    """What ``triage-app classify`` does with the file: the outcome and the stored record."""
    folder.mkdir()
    path = folder / "chest.dcm"
    ds.save_as(path, enforce_file_format=True)
    settings = Settings({"paths.data_dir": folder / "data", "processing.workers": 1})
    assert settings.model_name == "chest-dx-demo"
    (outcome,) = triage_and_record([path], settings)
    assert isinstance(outcome, CaseResult), outcome
    with CaseStore.open(settings.case_store_path) as store:
        stored = store.get(outcome.case_id)
    assert stored is not None
    return outcome, stored.result


def test_the_frontal_view_is_decided_locally(tmp_path: Path) -> None:
    """The control: the very same image as a PA is a confident normal."""
    outcome, record = _triage(tmp_path / "pa", _chest("PA"))
    assert (outcome.decision, outcome.reason) == ("normal", "confident_normal")
    assert record["scope"]["findings"] == []


@pytest.mark.parametrize("view", ["LL", "LAO"])
def test_a_lateral_or_oblique_chest_is_escalated_out_of_scope(tmp_path: Path, view: str) -> None:
    outcome, record = _triage(tmp_path / view, _chest(view))
    assert (outcome.decision, outcome.reason) == ("escalate", "out_of_scope")
    assert outcome.scope["in_scope"] is False
    assert outcome.scope["findings"] == ["view_not_intended"]
    assert (record["decision"], record["reason"]) == ("escalate", "out_of_scope")
    assert "view_not_intended" in record["scope"]["findings"]
    assert record["image"]["view_position"] == view  # what the finding refers to
    assert outcome.score < 0.025  # the score alone would have called it normal


def test_a_chest_without_view_position_is_still_triaged(tmp_path: Path) -> None:
    """CR images often lack View Position; the shipped model allows that."""
    outcome, record = _triage(tmp_path / "none", _chest(None))
    assert (outcome.decision, outcome.reason) == ("normal", "confident_normal")
    assert "view_position_missing" not in record["scope"]["findings"]


def _mirrored(ds: Dataset) -> Dataset:
    pixels = ds.pixel_array
    ds.PixelData = np.ascontiguousarray(pixels[:, ::-1]).tobytes()
    return ds


def test_a_mirrored_chest_is_escalated_out_of_scope(tmp_path: Path) -> None:
    """The same PA image stored mirrored (as after a wrong flip at the modality)."""
    outcome, record = _triage(tmp_path / "mirrored", _mirrored(_chest("PA")))
    assert (outcome.decision, outcome.reason) == ("escalate", "out_of_scope")
    assert outcome.scope["findings"] == ["looks_mirrored"]
    assert (record["decision"], record["reason"]) == ("escalate", "out_of_scope")
    assert record["scope"]["findings"] == ["looks_mirrored"]


# --- View Position the check used to miss (several values, a View Code Sequence) ----------------


def _coded_chest(value: str, meaning: str) -> Dataset:
    """A chest without View Position whose View Code Sequence (0054,0220) states the view."""
    ds = _chest(None)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    ds.ViewCodeSequence = [item]
    return ds


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        # Read as "PA" before (the first value only), then as "" (missing, which is allowed).
        pytest.param(lambda: _chest("PA\\LL"), "PA\\LL", id="pa-and-ll"),
        pytest.param(lambda: _chest("\\LL"), "LL", id="empty-and-ll"),
        # No View Position: the View Code Sequence was ignored, so this too was "missing".
        pytest.param(
            lambda: _coded_chest("399198007", "right lateral"), "RIGHT LATERAL", id="coded-lateral"
        ),
    ],
)
def test_a_lateral_view_stated_another_way_is_escalated_out_of_scope(
    tmp_path: Path, make: Callable[[], Dataset], shown: str
) -> None:
    outcome, record = _triage(tmp_path / "case", make())
    assert (outcome.decision, outcome.reason) == ("escalate", "out_of_scope")
    assert outcome.scope["findings"] == ["view_not_intended"]
    assert (record["decision"], record["reason"]) == ("escalate", "out_of_scope")
    assert record["scope"]["findings"] == ["view_not_intended"]
    assert record["image"]["view_position"] == shown  # the value the check used
    assert outcome.score < 0.025  # the score alone would have called it normal


def test_a_view_code_sequence_saying_postero_anterior_is_decided_locally(tmp_path: Path) -> None:
    """The control: a CR-style header with no View Position but a PA view code (CID 4010)."""
    outcome, record = _triage(tmp_path / "coded-pa", _coded_chest("272479007", "postero-anterior"))
    assert (outcome.decision, outcome.reason) == ("normal", "confident_normal")
    assert record["scope"]["findings"] == []
    assert record["image"]["view_position"] == "PA"


def test_a_frontal_code_worded_differently_is_decided_locally(tmp_path: Path) -> None:
    """View Position PA and the SNOMED RT PA code with a reworded Code Meaning: a frontal view.

    This was read as ``PA\\PA\\POSTERIOR-ANTERIOR`` and escalated, so every chest from such a
    modality went to escalation. The (scheme, value) pair is the concept; the meaning is text.
    """
    ds = _chest("PA")
    item = Dataset()
    item.CodeValue = "R-10214"  # SNOMED RT postero-anterior (CID 4010)
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Posterior-Anterior"  # not CID 4010's "postero-anterior"
    ds.ViewCodeSequence = [item]
    outcome, record = _triage(tmp_path / "srt-pa", ds)
    assert (outcome.decision, outcome.reason) == ("normal", "confident_normal")
    assert record["scope"]["findings"] == []
    assert record["image"]["view_position"] == "PA"
