"""Is this image like the ones the model was trained on?

A header can say ``DX``/``CHEST`` and still hold an MR slice, a CT scout or a photograph; a
classifier fed such an image still returns a confident-looking probability. The profile is a
principal-component model of the training images at 32×32: an image the components cannot
reconstruct well is atypical and is escalated as out of scope instead of being called normal.
It is cheap (one 1024×k matrix product) and explainable (one score against one limit).

The same components also tell a mirrored image (``mirror_margin``): a chest is not left-right
symmetric (heart, aortic arch, gastric bubble), so an image stored or acquired mirrored is
reconstructed *better* once flipped back. Mirrored, it is still "typical" by its score, and a
model never trained on mirrored chests decides it with confidence it has not earned. Framing
moves the midline (a chest cut off on one side), so each orientation is scored at its best
alignment among a few one-sided crops, and the flipped one must win by a margin.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from triage_app.errors import ManifestError

PROFILE_SIDE = 32
# A windowed radiograph always spans its grey range (training images: std 0.20–0.35); an image
# with almost none is blank or flat whatever the components say (a black image is close to a
# multiple of the mean chest, so its reconstruction error alone looks typical).
MIN_UNIT_STD = 0.05
#: Shares of the width cut off one side or the other when aligning an image for the mirror check.
MIRROR_CROPS = (0.05, 0.10, 0.15)


def _features(unit: np.ndarray) -> np.ndarray:
    small = cv2.resize(
        unit.astype(np.float32), (PROFILE_SIDE, PROFILE_SIDE), interpolation=cv2.INTER_AREA
    )
    return small.reshape(-1)


@dataclass(frozen=True, eq=False)
class InputProfile:
    mean: np.ndarray  # (1024,)
    components: np.ndarray  # (k, 1024), orthonormal rows
    limit: float  # reconstruction error above which an image is atypical
    #: The mirror check's margin as the manifest validated it for this profile; None: off.
    mirror_margin: float | None = None

    def score(self, unit: np.ndarray) -> float:
        """Root-mean-square reconstruction error of the 32×32 image (0 = perfectly typical)."""
        centred = _features(unit) - self.mean
        residual = centred - (self.components.T @ (self.components @ centred))
        return float(np.sqrt(np.mean(residual * residual)))

    def is_typical(self, score: float, unit: np.ndarray | None = None) -> bool:
        """Within the limit, and (given the image) not blank or flat."""
        if unit is not None and float(unit.std()) < MIN_UNIT_STD:
            return False
        return score <= self.limit

    def aligned_score(self, unit: np.ndarray) -> float:
        """The best score of the image and its one-sided crops (:data:`MIRROR_CROPS`)."""
        width = unit.shape[1]
        scores = [self.score(unit)]
        for share in MIRROR_CROPS:
            cut = round(width * share)
            if 0 < cut < width:
                scores += [self.score(unit[:, cut:]), self.score(unit[:, : width - cut])]
        return min(scores)

    def mirror_ratio(self, unit: np.ndarray) -> float:
        """How much better the flipped image is reconstructed than the image, each at its best
        alignment: above 1, it looks mirrored."""
        flipped = self.aligned_score(unit[:, ::-1])
        return self.aligned_score(unit) / max(flipped, 1e-12)

    def looks_mirrored(self, unit: np.ndarray) -> bool:
        """With the mirror check on, the flipped image wins by more than the margin."""
        margin = self.mirror_margin
        return margin is not None and self.mirror_ratio(unit) > margin

    @classmethod
    def fit(
        cls, units: np.ndarray, components: int = 24, quantile: float = 0.999, margin: float = 1.5
    ) -> InputProfile:
        """Fit on training images (N×H×W in [0, 1]); the limit is a high quantile times a margin."""
        feats = np.stack([_features(u) for u in units]).astype(np.float64)
        mean = feats.mean(axis=0)
        _, _, vt = np.linalg.svd(feats - mean, full_matrices=False)
        profile = cls(mean.astype(np.float32), vt[:components].astype(np.float32), limit=0.0)
        scores = np.array([profile.score(u) for u in units])
        return cls(profile.mean, profile.components, float(np.quantile(scores, quantile) * margin))

    def save(self, path: Path) -> None:
        with path.open("wb") as handle:
            np.savez(
                handle, mean=self.mean, components=self.components, limit=np.float32(self.limit)
            )

    @classmethod
    def load(cls, path: Path, *, mirror_margin: float | None = None) -> InputProfile:
        try:
            # Open the file here: np.load leaks its own handle when the zip is broken.
            with path.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
                mean = data["mean"].astype(np.float32)
                components = data["components"].astype(np.float32)
                limit = float(data["limit"])
        # EOFError: empty file; BadZipFile: damaged archive; TypeError: a bare .npy, not an .npz.
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ManifestError(f"input profile {path.name} cannot be read: {exc}") from exc
        if mean.shape != (PROFILE_SIDE * PROFILE_SIDE,) or components.shape[1:] != mean.shape:
            raise ManifestError(f"input profile {path.name} has the wrong shape")
        return cls(mean, components, limit, mirror_margin)
