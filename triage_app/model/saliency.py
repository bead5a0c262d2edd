"""Where the model looks: an occlusion map over the model's own input.

Occlusion needs nothing from the model but its score, so it works for any ONNX model a site
plugs in (no gradients, no framework): grey out one patch at a time and see how far the score
of the positive label falls. It costs one inference per patch (about 200 at the defaults, a
fraction of a second on the demo model), so callers run it off the UI thread, on demand.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from triage_app.dicom.image import DicomImage
from triage_app.model.classifier import Classifier
from triage_app.model.preprocess import to_tensor, to_unit_image

__all__ = ["SaliencyCancelledError", "SaliencyMap", "occlusion_map"]

_EPSILON = 1e-12


class SaliencyCancelledError(Exception):
    """The caller stopped the map before it was finished."""


@dataclass(frozen=True, eq=False)
class SaliencyMap:
    """Evidence per model-input pixel, scaled to [0, 1] (1 = the largest drop).

    The drop is measured in log-odds of the positive label, not in probability: a confident
    score of 0.9999 hardly moves as a probability when a lesion is hidden, but its log-odds do.
    ``values`` has the model's input size and covers the whole frame, so it is stretched onto
    the displayed image. ``max_drop`` is the log-odds drop that 1.0 stands for; 0 means no
    patch lowered the score at all.
    """

    values: npt.NDArray[np.float32]
    base_score: float
    max_drop: float
    patch: int
    stride: int


def occlusion_map(
    classifier: Classifier,
    image: DicomImage,
    *,
    patch: int = 16,
    stride: int = 8,
    cancel: threading.Event | None = None,
) -> SaliencyMap:
    """Occlude ``patch``-sized squares every ``stride`` pixels of the model input.

    Each square is set to the image's mean (a neutral grey for this image, not black, which
    would itself look like a finding) after windowing and before the model's own equalisation,
    so the occluded input is preprocessed exactly as a real one.
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1 (got {patch}, {stride})")
    spec = classifier.manifest.preprocessing
    unit = to_unit_image(image, spec)
    base_score = classifier.predict(to_tensor(unit, spec)).score
    base = _log_odds(base_score)
    rows, columns = unit.shape
    fill = np.float32(unit.mean())
    drops = np.zeros((rows, columns), dtype=np.float64)
    counts = np.zeros((rows, columns), dtype=np.float64)
    for top in _starts(rows, patch, stride):
        for left in _starts(columns, patch, stride):
            if cancel is not None and cancel.is_set():
                raise SaliencyCancelledError("saliency map cancelled")
            occluded = unit.copy()
            occluded[top : top + patch, left : left + patch] = fill
            score = _log_odds(classifier.predict(to_tensor(occluded, spec)).score)
            drops[top : top + patch, left : left + patch] += base - score
            counts[top : top + patch, left : left + patch] += 1
    mean_drop = np.clip(drops / np.maximum(counts, 1), 0.0, None)
    peak = float(mean_drop.max())
    values = (mean_drop / peak if peak > 0 else mean_drop).astype(np.float32)
    return SaliencyMap(
        values=values, base_score=base_score, max_drop=peak, patch=patch, stride=stride
    )


def _log_odds(probability: float) -> float:
    p = min(max(probability, _EPSILON), 1.0 - _EPSILON)
    return math.log(p / (1.0 - p))


def _starts(size: int, patch: int, stride: int) -> list[int]:
    """Patch origins that cover every pixel, the last one flush with the edge."""
    last = max(size - patch, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts
