"""What the viewer shows, without Qt: frames, window/level, presets, the AI result layer and
who the image is of.

Kept free of Qt (napari's model/view split) so the display rules are plain functions: the
initial window comes from the header with a percentile fallback, presets are data per
modality, and rendering is windowing plus inversion on numpy arrays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from triage_app.config import Settings
from triage_app.dicom import DicomImage, load_image
from triage_app.dicom.pixels import apply_modality, window_to_unit
from triage_app.dicom.reader import quiet_pydicom
from triage_app.model.classifier import Classifier
from triage_app.model.manifest import find_bundle
from triage_app.model.saliency import SaliencyMap, occlusion_map
from triage_app.policy import OUT_OF_SCOPE, describe_findings
from triage_app.worklist import (
    CENTRAL_VERDICT_KEY,
    Urgency,
    patient_from_dataset,
    urgency_of,
    verdict_parts,
)

__all__ = [
    "DISCLAIMER",
    "PRESETS",
    "AiResult",
    "ImageIdentity",
    "Preset",
    "SaliencyService",
    "ViewerImage",
    "Window",
    "auto_window",
    "identity_from_dataset",
    "initial_window",
    "load_viewer_image",
    "presets_for",
    "render",
    "resolve_preset",
]

log = logging.getLogger(__name__)

DISCLAIMER = "AI result – not for diagnostic use"
_AUTO_LOW, _AUTO_HIGH = 0.5, 99.5


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units (e.g. HU); ``source`` says where it came from."""

    center: float
    width: float
    source: str = "manual"  # header | auto | preset name | manual

    def adjusted(self, d_center: float, d_width: float) -> Window:
        return Window(self.center + d_center, max(1.0, self.width + d_width), "manual")


@dataclass(frozen=True)
class Preset:
    """A window preset: fixed values (CT, in HU) or percentiles of the image (DX/CR/other).

    Projection radiographs have no absolute unit (the stored values depend on the detector and
    processing), so their presets are ranges of the image's own histogram.
    """

    name: str
    center: float = 0.0
    width: float = 0.0
    low_pct: float | None = None
    high_pct: float | None = None
    width_factor: float = 1.0


_CT = (
    Preset("Soft tissue", 40, 400),
    Preset("Lung", -600, 1500),
    Preset("Liver", 90, 150),
    Preset("Bone", 480, 2500),
    Preset("Brain", 40, 80),
)
_PROJECTION = (
    Preset("Default", low_pct=_AUTO_LOW, high_pct=_AUTO_HIGH),
    Preset("Full range", low_pct=0.0, high_pct=100.0),
    Preset("High contrast", low_pct=5.0, high_pct=95.0),
    Preset("Low contrast", low_pct=_AUTO_LOW, high_pct=_AUTO_HIGH, width_factor=1.6),
    Preset("Dense detail", low_pct=40.0, high_pct=99.9),
)
#: Presets on keys 1–5, by modality; any other modality uses the projection presets.
PRESETS: Mapping[str, tuple[Preset, ...]] = {"CT": _CT, "DX": _PROJECTION, "CR": _PROJECTION}


def presets_for(modality: str) -> tuple[Preset, ...]:
    return PRESETS.get(modality.upper(), _PROJECTION)


@dataclass(frozen=True)
class ImageIdentity:
    """Who and which study the image on screen is of, from that very file's header.

    Shown in a corner of the viewer, as PACS viewers do, against reading the wrong patient's
    image. Shown on this device only: never sent, never logged. Empty strings where the
    header has no value.
    """

    name: str
    patient_id: str
    birth_date: str  # YYYY-MM-DD, or as the header has it when it is not a valid date
    study: str  # study date and time, YYYY-MM-DD HH:MM

    def lines(self) -> list[str]:
        return [
            self.name or "(no patient name)",
            f"ID {self.patient_id or '(none)'}",
            *([f"Born {self.birth_date}"] if self.birth_date else []),
            *([f"Study {self.study}"] if self.study else []),
        ]


def identity_from_dataset(ds: Dataset) -> ImageIdentity:
    """The identity of a data set already read (the name and ID as the worklist shows them)."""
    patient = patient_from_dataset(ds)
    try:
        with quiet_pydicom():
            birth = _dicom_date(ds.get("PatientBirthDate"))
            study = " ".join(
                part
                for part in (_dicom_date(ds.get("StudyDate")), _dicom_time(ds.get("StudyTime")))
                if part
            )
    except Exception as exc:  # noqa: BLE001 - a malformed date must not hide the image
        # The type only: pydicom's message quotes the raw value.
        log.debug("study details unreadable (%s)", type(exc).__name__)
        birth = study = ""
    return ImageIdentity(patient.name, patient.patient_id, birth, study)


def _dicom_date(value: object) -> str:
    """A DA value (``YYYYMMDD``) as ``YYYY-MM-DD``; other text as it is."""
    text = str(value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def _dicom_time(value: object) -> str:
    """A TM value (``HHMMSS.FFFFFF``, or shorter) as ``HH:MM``; other text as it is."""
    text = str(value or "").strip()
    digits = text.split(".")[0]
    if len(digits) >= 4 and digits.isdigit():
        return f"{digits[:2]}:{digits[2:4]}"
    return text


@dataclass(frozen=True, eq=False)
class ViewerImage:
    """Every frame of one file in modality units, with what the display needs to know."""

    frames: tuple[npt.NDArray[np.float32], ...]
    modality: str
    photometric: str
    header_window: tuple[float, float] | None
    selected_frame: int  # the frame the triage used
    identity: ImageIdentity | None = None

    @property
    def monochrome1(self) -> bool:
        return self.photometric.strip().upper() == "MONOCHROME1"


def load_viewer_image(path: str | Path) -> ViewerImage:
    """Decode a file for display; every frame when there are several greyscale ones.

    The identity comes from the header of the file decoded (no second read of it, and never
    another file's name over this file's pixels). Raises an ``InputError`` subclass when the
    file cannot be read (as the pipeline does).
    """
    image = load_image(path)
    info = image.info
    frames = _all_frames(image)
    values = tuple(apply_modality(frame, info, image.dataset) for frame in frames)
    selected = info.frame_index if len(values) == info.number_of_frames else 0
    return ViewerImage(
        frames=values,
        modality=info.modality,
        photometric=info.photometric,
        header_window=info.window,
        selected_frame=selected,
        identity=identity_from_dataset(image.dataset),
    )


def _all_frames(image: DicomImage) -> Sequence[npt.NDArray[Any]]:
    """All frames of a multi-frame greyscale image, else the one the reader decoded."""
    info = image.info
    if info.number_of_frames <= 1 or info.samples_per_pixel != 1:
        return (image.stored,)
    with quiet_pydicom():
        stack = np.asarray(image.dataset.pixel_array)
    if stack.ndim != 3 or stack.shape[0] != info.number_of_frames:
        log.debug("multi-frame stack has an unexpected shape; showing one frame")
        return (image.stored,)
    return tuple(stack)


def auto_window(values: npt.NDArray[np.float32], low_pct: float, high_pct: float) -> Window:
    """The window spanning two percentiles of the finite values."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return Window(0.0, 1.0, "auto")
    low, high = (float(v) for v in np.percentile(finite, [low_pct, high_pct]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    return Window((low + high) / 2.0, max(1.0, high - low), "auto")


def initial_window(image: ViewerImage, frame: int | None = None) -> Window:
    """The header's window when it has one, else the 0.5–99.5 percentile range."""
    if image.header_window is not None:
        center, width = image.header_window
        return Window(center, width, "header")
    index = image.selected_frame if frame is None else frame
    return auto_window(image.frames[index], _AUTO_LOW, _AUTO_HIGH)


def resolve_preset(preset: Preset, values: npt.NDArray[np.float32]) -> Window:
    """The window a preset gives for this frame."""
    if preset.low_pct is None or preset.high_pct is None:
        return Window(preset.center, preset.width, preset.name)
    auto = auto_window(values, preset.low_pct, preset.high_pct)
    return Window(auto.center, max(1.0, auto.width * preset.width_factor), preset.name)


_MAX_DISPLAY_LEVEL = 6  # 1/64: a 16k-pixel-wide image still fits a small viewer


def display_level(zoom: float) -> int:
    """How many times an image shown at ``zoom`` can be halved and still have at least one
    pixel per screen pixel (0 at 100 % and above).

    Why: windowing all of a 16-megapixel image on every mouse move of a window/level drag
    takes ~80 ms on the UI thread, and drawing it shrunk by the painter samples it without
    averaging (moiré on fine grids and noise). A reduced copy made once per level is both
    faster to window and a faithful average of the pixels it stands for.
    """
    if zoom >= 1.0:
        return 0
    return min(_MAX_DISPLAY_LEVEL, int(np.floor(np.log2(1.0 / zoom))))


def reduce_for_display(values: npt.NDArray[Any], level: int) -> npt.NDArray[Any]:
    """``values`` averaged down by ``2 ** level`` in each direction (area averaging)."""
    if level <= 0:
        return values
    rows, columns = values.shape
    factor = 2**level
    size = (max(1, -(-columns // factor)), max(1, -(-rows // factor)))  # (width, height)
    source = values if values.dtype == np.float32 else values.astype(np.float32)
    reduced: npt.NDArray[Any] = cv2.resize(source, size, interpolation=cv2.INTER_AREA)
    return reduced


def render(
    values: npt.NDArray[np.float32], window: Window, *, monochrome1: bool, invert: bool
) -> npt.NDArray[np.uint8]:
    """Greyscale 8-bit display pixels: window, then MONOCHROME1 and user inversion."""
    unit = window_to_unit(values, window.center, max(window.width, 1.0))
    if monochrome1 != invert:
        unit = 1.0 - unit
    out: npt.NDArray[np.uint8] = np.ascontiguousarray(
        np.rint(unit * 255.0).astype(np.uint8, copy=False)
    )
    return out


@dataclass(frozen=True)
class AiResult:
    """The result layer: what the device decided and on which terms, and what the central
    server answered (``central``: its lines, none before it has answered)."""

    label: str
    score: float
    threshold: str
    model: str
    why: str = ""  # for an out-of-scope image: what made it so, in words
    central: tuple[str, ...] = ()

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> AiResult:
        decision = str(result.get("decision", ""))
        reason = str(result.get("reason", ""))
        score = float(result.get("score", 0.0))
        thresholds = result.get("thresholds") or {}
        model = result.get("model") or {}
        why = out_of_scope_why(result)
        return cls(
            label=f"{decision} ({reason.replace('_', ' ')})" if reason else decision,
            score=score,
            # Out of scope, the score is shown but no threshold decided anything.
            threshold="not applied: out of scope"
            if why
            else _threshold_text(decision, score, thresholds),
            model=f"{model.get('name', '?')} {model.get('version', '?')}",
            why=why,
            central=_central_lines(result),
        )

    def lines(self) -> list[str]:
        # Out of scope, the score is the model's output on an image it was not made for.
        score = "n/a (out of scope)" if self.why else f"{self.score:.3f}"
        return [
            DISCLAIMER,
            f"Result: {self.label}",
            *([f"Why: {self.why}"] if self.why else []),
            f"Score: {score}",
            f"Threshold: {self.threshold}",
            f"Model: {self.model}",
            *self.central,
        ]


def _central_lines(result: Mapping[str, Any]) -> tuple[str, ...]:
    """The central verdict as the result layer shows it, under the device's result: label and
    score, whether it disagrees with the device, the central model and when it decided."""
    verdict = result.get(CENTRAL_VERDICT_KEY)
    if not isinstance(verdict, Mapping):
        return ()
    label, model, decided = verdict_parts(verdict)
    if isinstance(verdict.get("error"), Mapping):
        return (f"Central verdict: {label}",)
    disagrees = (
        urgency_of(
            str(result.get("decision", "")),
            float(result.get("score", 0.0)),
            str(verdict.get("verdict")),
            str(result.get("reason", "")),
        )
        is Urgency.CENTRE_DISAGREES
    )
    lines = [f"Central verdict: {label}" + (" – disagrees with the device" if disagrees else "")]
    if model:
        lines.append(f"Central model: {model}")
    if decided:
        lines.append(f"Central decided: {decided}")
    return tuple(lines)


def out_of_scope_why(result: Mapping[str, Any]) -> str:
    """For a result record escalated as out of scope, what made it so in words; else ""."""
    if result.get("reason") != OUT_OF_SCOPE:
        return ""
    scope = result.get("scope")
    findings = scope.get("findings") if isinstance(scope, Mapping) else None
    if not isinstance(findings, list) or not findings:
        return "not recorded"
    return describe_findings([str(code) for code in findings])


def _threshold_text(decision: str, score: float, thresholds: Mapping[str, Any]) -> str:
    """The threshold that applied, e.g. ``normal below 0.037``."""
    normal_below = thresholds.get("normal_below")
    abnormal_at = thresholds.get("abnormal_at_or_above")
    if normal_below is None or abnormal_at is None:
        return "not recorded"
    if decision == "normal":
        return f"normal below {float(normal_below):.3f}"
    if decision == "abnormal":
        return f"abnormal at or above {float(abnormal_at):.3f}"
    return f"escalated between {float(normal_below):.3f} and {float(abnormal_at):.3f}"


class SaliencyService:
    """Occlusion maps on demand; the model is loaded once, on first use, in a worker thread.

    ONNX Runtime sessions may be run from several threads, so one classifier serves all.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._classifier: Classifier | None = None

    def classifier(self) -> Classifier:
        with self._lock:
            if self._classifier is None:
                bundle = find_bundle(self._settings.model_name, self._settings.model_dir)
                self._classifier = Classifier(bundle, threads=1)
            return self._classifier

    def __call__(self, path: str, cancel: threading.Event) -> SaliencyMap:
        return occlusion_map(self.classifier(), load_image(path), cancel=cancel)
