"""The model bundle contract (DESIGN 4.3): ``models/<name>/manifest.json`` and its files.

The manifest is the single source of truth about a model: what file, what hash, what input, how
to preprocess, what the labels mean, how to calibrate, default thresholds, intended use and the
evidence behind it. A bundle whose files do not match their recorded hashes is refused: a model
that was altered or swapped must never classify a patient image.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from triage_app.errors import ManifestError, ModelIntegrityError, ModelNotFoundError
from triage_app.model.preprocess import PreprocessSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Thresholds:
    """Score = calibrated probability of the positive label; between the two is uncertain."""

    normal_below: float
    abnormal_at_or_above: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.normal_below <= self.abnormal_at_or_above <= 1.0:
            raise ManifestError(
                "thresholds must satisfy 0 <= normal_below <= abnormal_at_or_above <= 1 "
                f"(got {self.normal_below}, {self.abnormal_at_or_above})"
            )

    def to_json(self) -> dict[str, float]:
        return {
            "normal_below": self.normal_below,
            "abnormal_at_or_above": self.abnormal_at_or_above,
        }


@dataclass(frozen=True)
class IntendedUse:
    """What the model was made for; an image outside it is escalated, never decided locally."""

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    photometric: tuple[str, ...]
    allow_missing_body_part: bool
    description: str
    # DICOM View Position values (upper case), e.g. ("PA", "AP") for a frontal chest model, so a
    # lateral is not classified as if frontal. Empty: bundles written before the field existed
    # declare none, and then no view is checked.
    view_positions: tuple[str, ...] = ()
    allow_missing_view_position: bool = False  # only with view_positions (CR often lacks it)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "modalities": list(self.modalities),
            "body_parts": list(self.body_parts),
            "photometric": list(self.photometric),
            "allow_missing_body_part": self.allow_missing_body_part,
        }
        if self.view_positions:  # absent in legacy bundles: they round-trip unchanged
            out["view_positions"] = list(self.view_positions)
            out["allow_missing_view_position"] = self.allow_missing_view_position
        out["description"] = self.description
        return out

    @classmethod
    def from_json(cls, use: dict[str, Any]) -> IntendedUse:
        view_positions, allow_missing_view = _view_positions(use)
        return cls(
            modalities=tuple(str(m).upper() for m in use["modalities"]),
            body_parts=tuple(str(b).upper() for b in use["body_parts"]),
            photometric=tuple(str(p).upper() for p in use["photometric"]),
            allow_missing_body_part=bool(use.get("allow_missing_body_part", False)),
            description=str(use.get("description", "")),
            view_positions=view_positions,
            allow_missing_view_position=allow_missing_view,
        )


def _view_positions(use: dict[str, Any]) -> tuple[tuple[str, ...], bool]:
    """The view check's two fields, validated: a typo must not silently switch the check off."""
    if "view_positions" not in use:
        if "allow_missing_view_position" in use:
            raise ManifestError(
                "intended_use.allow_missing_view_position is set without "
                "intended_use.view_positions"
            )
        return (), False
    values = use["view_positions"]
    if not isinstance(values, list) or not values:
        raise ManifestError(
            f"intended_use.view_positions must be a non-empty list of strings: {values!r}"
        )
    if not all(isinstance(value, str) and value.strip() for value in values):
        raise ManifestError(
            f"intended_use.view_positions must hold non-empty strings only: {values!r}"
        )
    allow_missing = use.get("allow_missing_view_position", False)
    if not isinstance(allow_missing, bool):
        raise ManifestError(
            f"intended_use.allow_missing_view_position must be true or false: {allow_missing!r}"
        )
    return tuple(value.strip().upper() for value in values), allow_missing


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    onnx_file: str
    sha256: str
    input_name: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    positive_label: str
    temperature: float
    thresholds: Thresholds
    intended_use: IntendedUse
    preprocessing: PreprocessSpec
    profile_file: str
    profile_sha256: str
    mirror_margin: float | None  # input_profile.mirror_check.margin; None: the check is off
    raw: dict[str, Any]  # the whole document, for display and for fields only tools read
    # SHA-256 of manifest.json's bytes as loaded (None: built from a dict, not read from a file).
    # Thresholds, calibration, preprocessing and scope decide outcomes too, and nothing vouches
    # for them: a record names this so cases decided under different manifests can be told apart.
    manifest_sha256: str | None = None

    @property
    def key(self) -> str:
        """``name@version``: what admin-approved thresholds are bound to."""
        return f"{self.name}@{self.version}"

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_label)

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, manifest_sha256: str | None = None) -> ModelManifest:
        try:
            if int(doc["format_version"]) != FORMAT_VERSION:
                raise ManifestError(f"unsupported manifest format_version {doc['format_version']}")
            labels = tuple(str(label) for label in doc["labels"])
            positive = str(doc["positive_label"])
            if positive not in labels or len(labels) < 2:
                raise ManifestError("positive_label must be one of at least two labels")
            temperature = float(doc["calibration"]["temperature"])
            if not 0.05 <= temperature <= 20:
                raise ManifestError(f"calibration.temperature out of range: {temperature}")
            use = doc["intended_use"]
            preprocessing = PreprocessSpec.from_json(doc["preprocessing"])
            input_shape = tuple(int(n) for n in doc["input"]["shape"])
            if input_shape != (1, 1, preprocessing.rows, preprocessing.columns):
                # Caught here, not as an ONNX Runtime error on the first patient image.
                raise ManifestError(
                    f"input.shape {list(input_shape)} does not match preprocessing.size "
                    f"[{preprocessing.rows}, {preprocessing.columns}]"
                )
            return cls(
                name=str(doc["name"]),
                version=str(doc["version"]),
                onnx_file=str(doc["file"]),
                sha256=str(doc["sha256"]).lower(),
                input_name=str(doc["input"]["name"]),
                input_shape=input_shape,
                labels=labels,
                positive_label=positive,
                temperature=temperature,
                thresholds=Thresholds(
                    float(doc["thresholds"]["normal_below"]),
                    float(doc["thresholds"]["abnormal_at_or_above"]),
                ),
                intended_use=IntendedUse.from_json(use),
                preprocessing=preprocessing,
                profile_file=str(doc["input_profile"]["file"]),
                profile_sha256=str(doc["input_profile"]["sha256"]).lower(),
                mirror_margin=_mirror_margin(doc["input_profile"]),
                raw=doc,
                manifest_sha256=manifest_sha256,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest is missing or has a malformed field: {exc}") from exc


#: The mirror check's held-out figures must show it works before a manifest may turn it on.
MIRROR_MAX_FLAGGED_SHARE = 0.01
MIRROR_MIN_CAUGHT_SHARE = 0.99


def _mirror_margin(profile: dict[str, Any]) -> float | None:
    """The margin of the mirror check the manifest turns on, with the held-out figures it was
    validated with (absent in manifests older than the check: off)."""
    if "mirror_check" not in profile:
        return None
    figures = profile["mirror_check"]
    if not isinstance(figures, dict):
        raise ManifestError("input_profile.mirror_check must be an object (its held-out figures)")
    margin = figures.get("margin")
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 1 <= margin <= 2:
        raise ManifestError("input_profile.mirror_check.margin must be a number from 1 to 2")
    counts = [figures.get(key) for key in ("images", "images_flagged", "mirrored_flagged")]
    if not isinstance(figures.get("data"), str) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts
    ):
        raise ManifestError(
            "input_profile.mirror_check needs its figures: data, images, images_flagged, "
            "mirrored_flagged"
        )
    images, flagged, caught = cast("list[int]", counts)
    if (
        images == 0
        or flagged > images * MIRROR_MAX_FLAGGED_SHARE
        or caught < images * MIRROR_MIN_CAUGHT_SHARE
    ):
        raise ManifestError(
            f"input_profile.mirror_check: its figures show it does not work for this profile "
            f"({flagged} of {images} images flagged, {caught} of their mirrored copies)"
        )
    return float(margin)


def load_manifest(bundle_dir: Path) -> ModelManifest:
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"no {MANIFEST_NAME} in model directory {bundle_dir}")
    try:
        # One read: the bytes hashed are the bytes parsed, so the hash describes this manifest.
        data = path.read_bytes()
        doc = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    return ModelManifest.from_json(doc, manifest_sha256=hashlib.sha256(data).hexdigest())


def verify_file(path: Path, expected_sha256: str, what: str) -> None:
    """Refuse a file whose content is not the one the manifest vouches for."""
    if not path.is_file():
        raise ModelNotFoundError(f"{what} {path.name} is missing from the model bundle")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ModelIntegrityError(
            f"{what} {path.name} does not match its manifest (sha256 {actual[:12]}…, "
            f"expected {expected_sha256[:12]}…): refusing a model that was altered or swapped"
        )


def bundled_models_dir() -> Path:
    """Where the project's own model bundles live: the source tree's ``models/``, or the copy
    installed under ``<prefix>/share/triage-app/models`` by a wheel."""
    source_tree = Path(__file__).resolve().parents[2] / "models"
    if source_tree.is_dir():
        return source_tree
    return Path(sys.prefix) / "share" / "triage-app" / "models"


def find_bundle(name: str, explicit_dir: Path | None = None) -> Path:
    """The bundle folder: the admin's explicit choice, else the bundled model of that name."""
    bundle = explicit_dir if explicit_dir is not None else bundled_models_dir() / name
    if not (bundle / MANIFEST_NAME).is_file():
        raise ModelNotFoundError(f"no model bundle with a {MANIFEST_NAME} at {bundle}")
    return bundle


def verify_bundle(bundle_dir: Path) -> ModelManifest:
    """Load the manifest and check every file it vouches for; the cheap part of loading."""
    manifest = load_manifest(bundle_dir)
    verify_file(bundle_dir / manifest.onnx_file, manifest.sha256, "model file")
    verify_file(bundle_dir / manifest.profile_file, manifest.profile_sha256, "input profile")
    return manifest
