"""Display rules without Qt: initial window, presets, rendering, the AI result text."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from tests.helpers import phantom_dataset
from triage_app.gui.viewer_model import (
    DISCLAIMER,
    PRESETS,
    AiResult,
    ImageIdentity,
    ViewerImage,
    Window,
    display_level,
    identity_from_dataset,
    initial_window,
    presets_for,
    reduce_for_display,
    render,
    resolve_preset,
)

RAMP = np.tile(np.arange(1000, dtype=np.float32), (10, 1))


def _image(window: tuple[float, float] | None, photometric: str = "MONOCHROME2") -> ViewerImage:
    return ViewerImage((RAMP,), "DX", photometric, window, selected_frame=0)


def test_header_window_wins_and_percentiles_are_the_fallback() -> None:
    assert initial_window(_image((500.0, 200.0))) == Window(500.0, 200.0, "header")
    auto = initial_window(_image(None))
    assert auto.source == "auto"
    assert auto.center == pytest.approx(499.5, abs=1)
    assert auto.width == pytest.approx(990, abs=2)  # 0.5..99.5 percentiles of 0..999


def test_presets_are_data_per_modality() -> None:
    ct = [(p.name, p.center, p.width) for p in PRESETS["CT"]]
    assert ct == [
        ("Soft tissue", 40, 400),
        ("Lung", -600, 1500),
        ("Liver", 90, 150),
        ("Bone", 480, 2500),
        ("Brain", 40, 80),
    ]
    assert len(presets_for("DX")) == 5 and presets_for("dx") == presets_for("CR")
    assert presets_for("MR") == presets_for("DX")
    full = resolve_preset(presets_for("DX")[1], RAMP)
    assert (full.center, full.width, full.source) == (499.5, 999.0, "Full range")
    assert resolve_preset(PRESETS["CT"][1], RAMP) == Window(-600, 1500, "Lung")


def test_render_windows_and_inverts() -> None:
    window = Window(500.0, 200.0)
    pixels = render(RAMP, window, monochrome1=False, invert=False)
    assert pixels.dtype == np.uint8
    assert pixels[0, 0] == 0 and pixels[0, 999] == 255 and 100 < pixels[0, 500] < 155
    inverted = render(RAMP, window, monochrome1=False, invert=True)
    assert np.array_equal(inverted, 255 - pixels)
    # MONOCHROME1 is shown inverted, and inverting it again shows the stored order.
    assert np.array_equal(render(RAMP, window, monochrome1=True, invert=False), inverted)
    assert np.array_equal(render(RAMP, window, monochrome1=True, invert=True), pixels)


def test_window_drag_never_goes_below_width_one() -> None:
    assert Window(10, 5).adjusted(3, -100) == Window(13, 1.0, "manual")


@pytest.mark.parametrize(
    ("decision", "text"),
    [
        ("normal", "normal below 0.040"),
        ("abnormal", "abnormal at or above 0.990"),
        ("escalate", "escalated between 0.040 and 0.990"),
    ],
)
def test_ai_result_lines(decision: str, text: str) -> None:
    result = AiResult.from_result(
        {
            "decision": decision,
            "reason": "uncertain",
            "score": 0.5,
            "thresholds": {"normal_below": 0.04, "abnormal_at_or_above": 0.99},
            "model": {"name": "chest-dx-demo", "version": "1.0.0"},
        }
    )
    lines = result.lines()
    assert lines[0] == DISCLAIMER == "AI result – not for diagnostic use"
    assert f"Threshold: {text}" in lines
    assert "Model: chest-dx-demo 1.0.0" in lines
    assert AiResult.from_result({}).threshold == "not recorded"


@pytest.mark.parametrize(
    ("zoom", "level"),
    [(3.0, 0), (1.0, 0), (0.99, 0), (0.5, 1), (0.3, 1), (0.25, 2), (0.2, 2), (0.001, 6)],
)
def test_display_level_halves_while_a_screen_pixel_still_gets_an_image_pixel(
    zoom: float, level: int
) -> None:
    assert display_level(zoom) == level


def test_reduction_averages_fine_detail_instead_of_sampling_it() -> None:
    checkerboard = (np.indices((512, 515)).sum(axis=0) % 2 * 1000).astype(np.uint16)
    reduced = reduce_for_display(checkerboard, 2)
    assert reduced.shape == (128, 129)  # rounded up: the last columns are not dropped
    assert reduced.dtype == np.float32
    inner = reduced[:, :-1]  # the last column averages a partial block
    assert np.allclose(inner, 500.0)  # every 4x4 block holds eight 0s and eight 1000s
    assert reduce_for_display(checkerboard, 0) is checkerboard


def test_an_out_of_scope_result_says_why_and_that_no_threshold_applied() -> None:
    record = {
        "decision": "escalate",
        "reason": "out_of_scope",
        "score": 0.002,
        "thresholds": {"normal_below": 0.04, "abnormal_at_or_above": 0.99},
        "scope": {"in_scope": False, "findings": ["view_not_intended", "looks_mirrored"]},
        "model": {"name": "chest-dx-demo", "version": "1.1.0"},
    }
    lines = AiResult.from_result(record).lines()
    assert lines[1] == "Result: escalate (out of scope)"
    assert lines[2] == (
        "Why: view not one this model reads (e.g. a lateral or oblique); "
        "image looks left-right mirrored (side marker? dextrocardia?)"
    )
    assert "Threshold: not applied: out of scope" in lines
    assert "Why: not recorded" in AiResult.from_result({**record, "scope": None}).lines()
    uncertain = AiResult.from_result({**record, "reason": "uncertain"})
    assert not [line for line in uncertain.lines() if line.startswith("Why:")]


# --- the central verdict in the result layer; who the image is of ------------------------------

UNCERTAIN = {
    "decision": "escalate",
    "reason": "uncertain",
    "score": 0.138,
    "thresholds": {"normal_below": 0.025, "abnormal_at_or_above": 0.964},
    "model": {"name": "chest-dx-demo", "version": "1.1.1"},
}
#: As the uploader stores it (``Verdict.to_json``), and as a worklist row's result carries it.
VERDICT = {
    "case_id": "c",
    "verdict": "abnormal",
    "score": 0.981428,
    "model": {"name": "central-dx-demo", "version": "1.1.0", "sha256": "58" * 32},
    "decided_at": "2026-11-22T22:34:50Z",
}


def test_the_result_layer_shows_the_central_verdict_under_the_device_result() -> None:
    """On a "Centre disagrees" case the layer showed only the device's "escalate"."""
    lines = AiResult.from_result({**UNCERTAIN, "central_verdict": VERDICT}).lines()
    when = datetime(2026, 11, 22, 22, 34, 50, tzinfo=UTC).astimezone()
    assert lines[1:] == [
        "Result: escalate (uncertain)",
        "Score: 0.138",
        "Threshold: escalated between 0.025 and 0.964",
        "Model: chest-dx-demo 1.1.1",
        "Central verdict: abnormal, score 0.981 – disagrees with the device",
        "Central model: central-dx-demo 1.1.0",
        f"Central decided: {when:%Y-%m-%d %H:%M:%S}",
    ]
    # No verdict yet: nothing about the centre. A verdict without model or time: the label.
    assert not [line for line in AiResult.from_result(UNCERTAIN).lines() if "Central" in line]
    bare = {**UNCERTAIN, "central_verdict": {"verdict": "normal", "score": 0.004}}
    assert AiResult.from_result(bare).lines()[-1] == "Central verdict: normal, score 0.004"


def test_a_central_failure_is_shown_as_no_verdict_with_its_reason() -> None:
    failure = {"verdict": None, "error": {"code": "unprocessable_image", "message": "bad pixels"}}
    lines = AiResult.from_result({**UNCERTAIN, "central_verdict": failure}).lines()
    assert lines[-1] == "Central verdict: no verdict: unprocessable_image: bad pixels"


def test_an_out_of_scope_image_shows_no_score() -> None:
    """ "Score: 1.000" for a CT slice, beside "Threshold: not applied: out of scope"."""
    record = {
        **UNCERTAIN,
        "reason": "out_of_scope",
        "score": 1.0,
        "scope": {"in_scope": False, "findings": ["modality_not_intended"]},
    }
    lines = AiResult.from_result(record).lines()
    assert "Score: n/a (out of scope)" in lines
    assert not [line for line in lines if "1.000" in line]


def test_the_identity_comes_from_the_header_with_dates_in_words() -> None:
    ds = phantom_dataset(5, 3)
    ds.PatientBirthDate = "19600229"
    ds.StudyDate, ds.StudyTime = "20261122", "101502.123"
    identity = identity_from_dataset(ds)
    family, given = str(ds.PatientName).split("^")[:2]
    assert identity == ImageIdentity(
        f"{family}, {given}", str(ds.PatientID), "1960-02-29", "2026-11-22 10:15"
    )
    assert identity.lines() == [
        f"{family}, {given}",
        f"ID {ds.PatientID}",
        "Born 1960-02-29",
        "Study 2026-11-22 10:15",
    ]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime"):
        delattr(ds, keyword)
    assert identity_from_dataset(ds).lines() == ["(no patient name)", "ID (none)"]
