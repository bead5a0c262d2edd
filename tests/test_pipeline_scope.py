"""Scope checks end to end: a real DICOM file through the CLI's loop with the shipped model.

The shipped chest model is for frontal views (PA/AP). A lateral or oblique chest with Body Part
Examined CHEST used to be classified as if frontal and could be called normal on the device; so
could a chest stored left-right mirrored, which the model never saw in training.
"""

from __future__ import annotations

import struct
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


def _triage(
    folder: Path, ds: Dataset, rewrite: Callable[[bytes], bytes] | None = None
) -> tuple[CaseResult, dict[str, Any]]:
    """What ``triage-app classify`` does with the file (its bytes passed through ``rewrite``
    first, if given): the outcome and the stored record."""
    folder.mkdir()
    path = folder / "chest.dcm"
    ds.save_as(path, enforce_file_format=True)
    if rewrite is not None:
        path.write_bytes(rewrite(path.read_bytes()))
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


# --- Body part stated by the Anatomic Region Sequence (0008,2218) only -------------------------


def _region(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _regioned(body_part: str | None, *items: Dataset) -> Dataset:
    """A frontal chest whose Body Part Examined is empty (``""``) or absent (``None``) and whose
    Anatomic Region Sequence holds these items, as many CR/DX modalities write the region."""
    ds = _chest("PA")
    if body_part is None:
        del ds.BodyPartExamined
    else:
        ds.BodyPartExamined = body_part
    ds.AnatomicRegionSequence = list(items)
    return ds


@pytest.mark.parametrize("body_part", ["", None], ids=["empty", "absent"])
def test_a_head_coded_only_in_the_anatomic_region_sequence_is_escalated_out_of_scope(
    tmp_path: Path, body_part: str | None
) -> None:
    """The reviewer's case: a skull film with no Body Part Examined but an Anatomic Region
    Sequence saying Head was read as "missing", which the chest model allows, and decided here
    by a chest model. Its pixels are the chest phantom's: only the header puts it out of scope.
    """
    ds = _regioned(body_part, _region("69536005", "SCT", "Head"))
    outcome, record = _triage(tmp_path / "head", ds)
    assert (outcome.decision, outcome.reason) == ("escalate", "out_of_scope")
    assert outcome.scope["findings"] == ["body_part_not_intended"]
    assert (record["decision"], record["reason"]) == ("escalate", "out_of_scope")
    assert record["scope"]["findings"] == ["body_part_not_intended"]
    assert record["image"]["body_part"] == "HEAD"  # the value the check used
    assert outcome.score < 0.025  # the score alone would have called it normal


@pytest.mark.parametrize(
    "code",
    [
        ("816094009", "SCT", "Chest"),  # CID 4031 now
        ("51185008", "SCT", "Thorax"),  # before CP 1962
        ("T-D3000", "SRT", "Chest"),  # SNOMED RT
    ],
    ids=["sct", "sct-before-cp-1962", "srt"],
)
def test_a_chest_coded_only_in_the_anatomic_region_sequence_is_decided_locally(
    tmp_path: Path, code: tuple[str, str, str]
) -> None:
    """The control: the same image with a chest region code and no Body Part Examined."""
    outcome, record = _triage(tmp_path / "chest", _regioned(None, _region(*code)))
    assert (outcome.decision, outcome.reason) == ("normal", "confident_normal")
    assert record["scope"]["findings"] == []
    assert record["image"]["body_part"] == "CHEST"


@pytest.mark.parametrize(
    ("body_part", "item", "shown"),
    [
        # A local code is a region this reader does not know, whatever its meaning says.
        pytest.param(None, _region("CHX1", "99LOCAL", "Chest"), "CHX1\\CHEST", id="local-code"),
        # Body Part Examined and the sequence disagree.
        pytest.param(
            "CHEST", _region("89546000", "SCT", "Skull"), "CHEST\\SKULL", id="chest-and-skull"
        ),
    ],
)
def test_a_region_that_is_not_one_clear_chest_is_escalated_out_of_scope(
    tmp_path: Path, body_part: str | None, item: Dataset, shown: str
) -> None:
    outcome, record = _triage(tmp_path / "case", _regioned(body_part, item))
    assert (outcome.decision, outcome.reason) == ("escalate", "out_of_scope")
    assert outcome.scope["findings"] == ["body_part_not_intended"]
    assert record["scope"]["findings"] == ["body_part_not_intended"]
    assert record["image"]["body_part"] == shown


_EMPTY_REGIONS = b"\x08\x00\x18\x22SQ\x00\x00\x00\x00\x00\x00"  # (0008,2218) SQ, length 0


def _cut_region_item(data: bytes) -> bytes:
    """The file with its empty Anatomic Region Sequence given one item of 16 bytes holding 2,
    which pydicom reads as an empty item (one that states nothing) without a word."""
    assert data.count(_EMPTY_REGIONS) == 1
    cut = b"\xfe\xff\x00\xe0\x10\x00\x00\x00ab"
    return data.replace(_EMPTY_REGIONS, _EMPTY_REGIONS[:8] + struct.pack("<L", len(cut)) + cut)


def test_a_damaged_anatomic_region_sequence_is_escalated_out_of_scope(tmp_path: Path) -> None:
    """A sequence that cannot be read may have said Head: never read as "missing"."""
    outcome, record = _triage(tmp_path / "damaged", _regioned(None), _cut_region_item)
    assert (outcome.decision, outcome.reason) == ("escalate", "out_of_scope")
    assert outcome.scope["findings"] == ["body_part_not_intended"]
    assert record["scope"]["findings"] == ["body_part_not_intended"]
    assert record["image"]["body_part"] == "UNKNOWN"
