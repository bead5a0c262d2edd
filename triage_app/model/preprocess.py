"""Turn a decoded DICOM frame into the model's input tensor.

Training imports this module too, so what the model saw in training is exactly what it sees in
use. The order of operations is chosen for speed without changing the result in any way that
matters: the stored values are resized first (INTER_AREA on the integer image is a box average,
and the modality rescale and MONOCHROME1 inversion are linear, so they commute with it), and the
window percentiles are taken on the small image. On a 2500×2048 DX this is ~6 ms instead of ~50 ms
for converting to float at full size first (DESIGN §7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from triage_app.dicom.image import DicomImage
from triage_app.dicom.pixels import (
    apply_modality,
    apply_voi_to_unit,
    invert_if_monochrome1,
    percentile_to_unit,
)
from triage_app.errors import ManifestError

_RESIZABLE = (np.uint8, np.uint16, np.int16, np.float32, np.float64)
WINDOWING_METHODS = ("percentile", "header")


@dataclass(frozen=True)
class PreprocessSpec:
    """The manifest's ``preprocessing`` block, validated."""

    rows: int = 128
    columns: int = 128
    windowing: str = "percentile"  # percentile | header (header VOI, percentile fallback)
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    clahe_clip: float = 3.0  # contrast-limited adaptive histogram equalisation; 0 = off
    clahe_tiles: int = 4
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        if self.windowing not in WINDOWING_METHODS:
            raise ManifestError(f"preprocessing.windowing must be one of {WINDOWING_METHODS}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ManifestError("preprocessing percentiles must satisfy 0 <= low < high <= 100")
        if self.rows < 8 or self.columns < 8 or self.std <= 0:
            raise ManifestError("preprocessing size must be >= 8 and std > 0")
        if self.clahe_clip < 0 or not 1 <= self.clahe_tiles <= min(self.rows, self.columns):
            raise ManifestError("preprocessing CLAHE needs clip >= 0 and 1 <= tiles <= size")

    @classmethod
    def from_json(cls, block: dict[str, Any]) -> PreprocessSpec:
        try:
            rows, columns = block["size"]
            window = block["windowing"]
            norm = block["normalise"]
            clahe = block.get("clahe", {"clip_limit": 0.0, "tiles": 1})
            return cls(
                rows=int(rows),
                columns=int(columns),
                windowing=str(window["method"]),
                low_percentile=float(window.get("low", 0.5)),
                high_percentile=float(window.get("high", 99.5)),
                clahe_clip=float(clahe["clip_limit"]),
                clahe_tiles=int(clahe["tiles"]),
                mean=float(norm["mean"]),
                std=float(norm["std"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"preprocessing block is incomplete or malformed: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "size": [self.rows, self.columns],
            "interpolation": "area (stored values resized before windowing)",
            "windowing": {
                "method": self.windowing,
                "low": self.low_percentile,
                "high": self.high_percentile,
            },
            "monochrome1": "inverted so that dense structures are bright",
            "colour": "converted to luminance by the reader",
            "frame_policy": "middle frame of a multi-frame image",
            "clahe": {"clip_limit": self.clahe_clip, "tiles": self.clahe_tiles},
            "normalise": {"mean": self.mean, "std": self.std},
        }


def to_unit_image(image: DicomImage, spec: PreprocessSpec) -> np.ndarray:
    """The frame at model size, windowed to [0, 1] with dense structures bright."""
    stored = image.stored
    if stored.dtype.type not in _RESIZABLE:
        stored = stored.astype(np.float32)
    small = cv2.resize(stored, (spec.columns, spec.rows), interpolation=cv2.INTER_AREA)
    values = apply_modality(small.astype(np.float32, copy=False), image.info, image.dataset)
    unit = None
    if spec.windowing == "header":
        unit = apply_voi_to_unit(values, image.info, image.dataset)
    if unit is None:
        unit = percentile_to_unit(values, spec.low_percentile, spec.high_percentile)
    return invert_if_monochrome1(unit, image.info.photometric).astype(np.float32, copy=False)


def to_tensor(unit: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """NCHW float32 batch of one: locally equalised, then normalised as in training.

    CLAHE is the usual chest-radiograph enhancement: a small nodule over ribs and vessels is a
    local contrast change, and a CNN trained on globally windowed images learns it far more
    slowly (on the phantoms: validation AUROC 0.55 against 0.80 after the same short training).
    The input profile sees the image before equalisation, where global appearance is intact.
    """
    image = unit
    if spec.clahe_clip > 0:
        clahe = cv2.createCLAHE(
            clipLimit=spec.clahe_clip, tileGridSize=(spec.clahe_tiles, spec.clahe_tiles)
        )
        scaled = np.clip(unit * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
        image = clahe.apply(scaled).astype(np.float32) / np.float32(65535.0)
    return ((image - spec.mean) / spec.std).astype(np.float32)[None, None, :, :]
