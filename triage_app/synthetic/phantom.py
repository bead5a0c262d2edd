"""Synthetic chest-radiograph-like phantoms with known labels.

No clinical data set can be downloaded where this project is built, so the demo model is trained
and evaluated on images this module renders. The renderer is physical enough that the pipeline
meets the problems real radiographs pose: an attenuation map of torso, lungs, heart, mediastinum,
spine, ribs and clavicles, lung texture, collimation, a log-transformed detector signal with
quantum noise that grows in dense regions and with smaller pixels, vendor-like edge enhancement,
12–16 bit storage, MONOCHROME1 or MONOCHROME2, and random positioning.

Abnormal images carry nodules or opacities of varied size and contrast. Contrast is drawn
log-uniformly down to levels that are genuinely hard to see, and normal images may carry
look-alikes (nipple shadows, end-on vessels), so a well-calibrated model is uncertain on some of
them — exactly the cases the product escalates.

Every phantom is a pure function of ``(seed, index)``: the same pair always gives the same image,
whatever order or process renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

LABELS = ("normal", "abnormal")

# Physical field of view across the image width, used to turn millimetres into image units.
FIELD_OF_VIEW_MM = 400.0
# Largest side at which anatomy is rendered before being resized to the stored size.
RENDER_MAX_SIDE = 320
MASK_SIDE = 32


@dataclass(frozen=True)
class Finding:
    """One planted lesion (or a look-alike in a normal image), in millimetres."""

    kind: str  # nodule | opacity | nipple_shadow | vessel_end_on
    x_mm: float
    y_mm: float
    size_mm: float  # radius for nodules, mean radius for opacities
    contrast: float  # added attenuation at the centre, in the detector's log units

    def to_json(self) -> dict[str, float | str]:
        return {
            "kind": self.kind,
            "x_mm": round(self.x_mm, 1),
            "y_mm": round(self.y_mm, 1),
            "size_mm": round(self.size_mm, 1),
            "contrast": round(self.contrast, 4),
        }


@dataclass(frozen=True)
class Acquisition:
    """What the (imaginary) device stored: enough to write an honest DICOM header."""

    modality: str  # DX or CR
    photometric: str  # MONOCHROME1 or MONOCHROME2
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float
    window_center: float
    window_width: float
    pixel_spacing_mm: float
    view_position: str  # PA or AP


@dataclass(frozen=True, eq=False)
class Phantom:
    seed: int
    index: int
    label: str
    findings: tuple[Finding, ...]
    acquisition: Acquisition
    stored: np.ndarray  # uint16, rows × columns, in stored values
    # Where the lesions are (1) at MASK_SIDE × MASK_SIDE over the whole image: ground truth for
    # dense supervision in training and for checking saliency maps; never written to files.
    lesion_mask: np.ndarray

    @property
    def is_abnormal(self) -> bool:
        return self.label == "abnormal"

    def label_record(self) -> dict[str, object]:
        """The ground truth kept next to the files (never inside them)."""
        return {
            "seed": self.seed,
            "index": self.index,
            "label": self.label,
            "findings": [f.to_json() for f in self.findings],
            "photometric": self.acquisition.photometric,
            "bits_stored": self.acquisition.bits_stored,
            "rows": int(self.stored.shape[0]),
            "columns": int(self.stored.shape[1]),
        }


@dataclass(frozen=True)
class PhantomConfig:
    """Knobs of the generated population; the defaults define the demo model's world."""

    abnormal_fraction: float = 0.35
    size_range: tuple[int, int] = (320, 1024)
    monochrome1_fraction: float = 0.3
    # Log-uniform contrast ranges: the low ends are near the noise and texture floor on purpose.
    nodule_contrast: tuple[float, float] = (0.35, 1.5)
    nodule_radius_mm: tuple[float, float] = (8.0, 30.0)
    opacity_contrast: tuple[float, float] = (0.25, 0.8)
    opacity_radius_mm: tuple[float, float] = (20.0, 70.0)
    lookalike_probability: float = 0.35


def render_phantom(seed: int, index: int, config: PhantomConfig | None = None) -> Phantom:
    """Render phantom number ``index`` of the population defined by ``seed``."""
    cfg = config or PhantomConfig()
    rng = np.random.default_rng([seed, index])
    label = "abnormal" if rng.random() < cfg.abnormal_fraction else "normal"

    columns = int(rng.integers(cfg.size_range[0], cfg.size_range[1] + 1))
    aspect = rng.uniform(0.95, 1.25)  # portrait detectors are common
    rows = round(columns * aspect)
    scale = min(1.0, RENDER_MAX_SIDE / max(rows, columns))
    r_rows, r_cols = max(round(rows * scale), 32), max(round(columns * scale), 32)

    grid = _patient_grid(rng, r_rows, r_cols)
    lungs = _lung_fields(grid)
    attenuation = _anatomy(rng, grid, lungs)
    attenuation += _lung_texture(rng, grid, lungs, r_rows, r_cols)

    findings: list[Finding] = []
    footprint = np.zeros_like(attenuation)
    if label == "abnormal":
        count = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        for _ in range(count):
            kind = "nodule" if rng.random() < 0.6 else "opacity"
            findings.append(_add_lesion(rng, kind, grid, lungs, attenuation, footprint, cfg))
    if rng.random() < cfg.lookalike_probability:
        findings.extend(_add_lookalikes(rng, grid, lungs, attenuation))

    attenuation = _collimate(rng, attenuation)
    full = cv2.resize(attenuation, (columns, rows), interpolation=cv2.INTER_CUBIC)
    signal = _detector(rng, full, columns)
    acquisition, stored = _store(rng, signal, columns, cfg)
    small = cv2.resize(footprint, (MASK_SIDE, MASK_SIDE), interpolation=cv2.INTER_AREA)
    lesion_mask = (small > 0.02).astype(np.uint8)
    return Phantom(seed, index, label, tuple(findings), acquisition, stored, lesion_mask)


# --- geometry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Patient coordinates for every render pixel: x across (-1..1 = image width), y down."""

    x: np.ndarray
    y: np.ndarray
    units_per_mm: float
    units_per_pixel: float


def _patient_grid(rng: np.random.Generator, rows: int, cols: int) -> _Grid:
    half_height = rows / cols
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float32)
    x = (xs + 0.5) / cols * 2.0 - 1.0
    y = ((ys + 0.5) / rows * 2.0 - 1.0) * half_height
    # Positioning: the patient is rotated, shifted and sized differently in every image.
    angle = math.radians(rng.normal(0.0, 3.0))
    size = rng.uniform(0.82, 1.08)
    dx, dy = rng.normal(0.0, 0.04), rng.normal(0.02, 0.05)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    px = (cos_a * (x - dx) + sin_a * (y - dy)) / size
    py = (-sin_a * (x - dx) + cos_a * (y - dy)) / size
    units_per_mm = 2.0 / FIELD_OF_VIEW_MM / size
    return _Grid(px, py, units_per_mm, 2.0 / cols / size)


def _ellipse_depth(
    grid: _Grid, cx: float, cy: float, ax: float, ay: float, p: float = 2.0
) -> np.ndarray:
    """Chord length through a (super)ellipsoid, 1 at its centre, 0 outside."""
    d = np.abs((grid.x - cx) / ax) ** p + np.abs((grid.y - cy) / ay) ** p
    return np.sqrt(np.clip(1.0 - d, 0.0, None)).astype(np.float32)


def _lung_fields(grid: _Grid) -> np.ndarray:
    right = _ellipse_depth(grid, -0.36, -0.08, 0.27, 0.56, 2.4)
    left = _ellipse_depth(grid, 0.37, -0.06, 0.25, 0.53, 2.4)
    lungs = np.maximum(right, left)
    # Diaphragm domes: the right one sits higher.
    dome = np.where(
        grid.x < 0, 0.36 + 0.5 * (grid.x + 0.36) ** 2, 0.42 + 0.5 * (grid.x - 0.37) ** 2
    )
    lungs = lungs * np.clip((dome - grid.y) / 0.05, 0.0, 1.0)
    # The heart takes a bite out of the left lung's medial base.
    heart = _ellipse_depth(grid, 0.08, 0.3, 0.33, 0.23)
    return np.asarray(lungs * np.clip(1.0 - 1.5 * heart, 0.0, 1.0), dtype=np.float32)


# --- anatomy -----------------------------------------------------------------------------------


def _anatomy(rng: np.random.Generator, grid: _Grid, lungs: np.ndarray) -> np.ndarray:
    habitus = rng.uniform(0.85, 1.2)
    a = 3.0 * habitus * _ellipse_depth(grid, 0.0, 0.15, 0.9, 1.15)
    a += 0.6 * _ellipse_depth(grid, 0.0, -1.05, 0.2, 0.35)  # neck
    a -= 2.0 * rng.uniform(0.85, 1.1) * lungs
    heart = _ellipse_depth(
        grid, 0.08 + rng.normal(0, 0.02), 0.3, 0.33 * rng.uniform(0.9, 1.15), 0.23
    )
    a += 0.75 * heart**0.6
    a += 0.7 * _ellipse_depth(grid, 0.0, -0.35, 0.12, 0.7)  # mediastinum
    a += 0.3 * _ellipse_depth(grid, 0.1, -0.3, 0.07, 0.06)  # aortic knob
    spine = np.clip(1.0 - np.abs(grid.x) / 0.06, 0.0, 1.0)
    a += spine * (0.55 + 0.08 * np.cos(grid.y * 38.0))
    for side in (-1.0, 1.0):
        a += _clavicle(grid, side) + _ribs(grid, side)
    # Soft hilar vessels fan out from each hilum.
    for side in (-1.0, 1.0):
        a += 0.35 * _ellipse_depth(grid, side * 0.17, -0.05, 0.08, 0.13)
    return a.astype(np.float32)


def _band(distance: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-0.5 * (distance / width) ** 2).astype(np.float32)


def _ribs(grid: _Grid, side: float) -> np.ndarray:
    """Ten posterior ribs on one side: arcs from the spine outwards and downwards.

    All ribs share one shape shifted by a fixed spacing, so the distance to the nearest rib is a
    modulo, computed once for the whole side instead of once per rib.
    """
    u = side * grid.x  # distance from the midline on this side
    spacing, first = 0.13, -0.75
    offset = grid.y - (-0.25 * u + 0.7 * u**2) - first
    index = np.floor(offset / spacing + 0.5)
    distance = offset - index * spacing
    in_range = (index >= 0) & (index < 10)
    mask = np.clip((u - 0.05) / 0.03, 0.0, 1.0) * np.clip((0.86 - u) / 0.05, 0.0, 1.0) * in_range
    return (0.22 * _band(distance, 0.018) * mask).astype(np.float32)


def _clavicle(grid: _Grid, side: float) -> np.ndarray:
    u = side * grid.x
    line = -0.8 - 0.12 * u
    mask = np.clip((u - 0.06) / 0.03, 0.0, 1.0) * np.clip((0.62 - u) / 0.05, 0.0, 1.0)
    return (0.35 * _band(grid.y - line, 0.026) * mask).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, sigma: float) -> np.ndarray:
    field = cv2.GaussianBlur(rng.standard_normal((rows, cols)).astype(np.float32), (0, 0), sigma)
    return np.asarray(field / (float(field.std()) + 1e-6), dtype=np.float32)


def _lung_texture(
    rng: np.random.Generator, grid: _Grid, lungs: np.ndarray, rows: int, cols: int
) -> np.ndarray:
    """Vessel-like texture that thins towards the periphery: the main nodule confounder."""
    px_per_mm = 1.0 / (grid.units_per_pixel / grid.units_per_mm)
    fine = _smooth_noise(rng, rows, cols, max(0.6, 1.2 * px_per_mm))
    coarse = _smooth_noise(rng, rows, cols, max(1.5, 5.0 * px_per_mm))
    hilar = np.exp(-((np.abs(grid.x) - 0.17) ** 2 + (grid.y + 0.05) ** 2) / 0.12)
    amplitude = rng.uniform(0.025, 0.045) * (1.0 + 1.5 * hilar)
    texture = amplitude * (0.6 * np.abs(fine) + 0.5 * coarse) * np.clip(lungs * 3, 0, 1)
    return np.asarray(texture, dtype=np.float32)


# --- findings ----------------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _point_in_lungs(
    rng: np.random.Generator, grid: _Grid, lungs: np.ndarray
) -> tuple[float, float]:
    candidates = np.argwhere(lungs > 0.25)
    r, c = candidates[int(rng.integers(len(candidates)))]
    return float(grid.x[r, c]), float(grid.y[r, c])


def _add_lesion(
    rng: np.random.Generator,
    kind: str,
    grid: _Grid,
    lungs: np.ndarray,
    attenuation: np.ndarray,
    footprint: np.ndarray,
    cfg: PhantomConfig,
) -> Finding:
    cx, cy = _point_in_lungs(rng, grid, lungs)
    if kind == "nodule":
        radius_mm = _log_uniform(rng, *cfg.nodule_radius_mm)
        contrast = _log_uniform(rng, *cfg.nodule_contrast)
        radius = radius_mm * grid.units_per_mm
        r2 = ((grid.x - cx) ** 2 + (grid.y - cy) ** 2) / radius**2
        lesion = np.sqrt(np.clip(1.0 - r2, 0.0, None))
    else:
        radius_mm = _log_uniform(rng, *cfg.opacity_radius_mm)
        contrast = _log_uniform(rng, *cfg.opacity_contrast)
        radius = radius_mm * grid.units_per_mm
        lesion = np.zeros_like(attenuation)
        for _ in range(int(rng.integers(3, 7))):
            ox, oy = rng.normal(0, 0.5 * radius, size=2)
            s = radius * rng.uniform(0.4, 0.8)
            lesion += np.exp(-((grid.x - cx - ox) ** 2 + (grid.y - cy - oy) ** 2) / (2 * s * s))
        lesion = np.clip(lesion / max(float(lesion.max()), 1e-6), 0.0, 1.0) ** 0.7
        # Consolidation is patchy, and stays inside the lung.
        rows, cols = attenuation.shape
        mottling = 0.75 + 0.25 * _smooth_noise(rng, rows, cols, sigma=3.0)
        lesion = lesion * np.clip(mottling, 0.3, 1.3) * np.clip(lungs * 4, 0, 1)
    attenuation += (contrast * lesion).astype(np.float32)
    np.maximum(footprint, (lesion > 0.1).astype(np.float32), out=footprint)
    return Finding(kind, cx / grid.units_per_mm, cy / grid.units_per_mm, radius_mm, contrast)


def _add_lookalikes(
    rng: np.random.Generator, grid: _Grid, lungs: np.ndarray, attenuation: np.ndarray
) -> list[Finding]:
    """Normal structures that resemble nodules: what makes some normal images genuinely hard."""
    found: list[Finding] = []
    if rng.random() < 0.5:
        # Nipple shadows: faint, bilateral, symmetric, over the lower lung fields.
        y = rng.uniform(0.1, 0.3)
        radius_mm = rng.uniform(5.0, 8.0)
        contrast = _log_uniform(rng, 0.03, 0.12)
        for side in (-1.0, 1.0):
            x = side * rng.uniform(0.38, 0.48)
            r2 = ((grid.x - x) ** 2 + (grid.y - y) ** 2) / (radius_mm * grid.units_per_mm) ** 2
            attenuation += (contrast * np.clip(1.0 - r2, 0.0, 1.0) ** 0.5).astype(np.float32)
            found.append(
                Finding(
                    "nipple_shadow",
                    x / grid.units_per_mm,
                    y / grid.units_per_mm,
                    radius_mm,
                    contrast,
                )
            )
    else:
        # End-on vessels near the hila: small, dense, round.
        for _ in range(int(rng.integers(1, 4))):
            side = -1.0 if rng.random() < 0.5 else 1.0
            x = side * rng.uniform(0.18, 0.32)
            y = rng.uniform(-0.2, 0.15)
            radius_mm = rng.uniform(2.5, 4.5)
            contrast = _log_uniform(rng, 0.05, 0.2)
            r2 = ((grid.x - x) ** 2 + (grid.y - y) ** 2) / (radius_mm * grid.units_per_mm) ** 2
            attenuation += (contrast * np.sqrt(np.clip(1.0 - r2, 0.0, None))).astype(np.float32)
            found.append(
                Finding(
                    "vessel_end_on",
                    x / grid.units_per_mm,
                    y / grid.units_per_mm,
                    radius_mm,
                    contrast,
                )
            )
    return found


# --- acquisition -------------------------------------------------------------------------------


def _collimate(rng: np.random.Generator, attenuation: np.ndarray) -> np.ndarray:
    """Shutters: outside them the detector sees no direct beam (very high apparent attenuation)."""
    if rng.random() < 0.4:
        return attenuation
    rows, cols = attenuation.shape
    top, bottom = (int(rows * rng.uniform(0, 0.06)) for _ in range(2))
    left, right = (int(cols * rng.uniform(0, 0.06)) for _ in range(2))
    shuttered = np.full_like(attenuation, 7.0)
    shuttered[top : rows - bottom, left : cols - right] = attenuation[
        top : rows - bottom, left : cols - right
    ]
    return shuttered


def _detector(rng: np.random.Generator, attenuation: np.ndarray, columns: int) -> np.ndarray:
    """Log signal with quantum noise: noisier where dense and where pixels are small."""
    rows, cols = attenuation.shape
    photons_at_512 = _log_uniform(rng, 3000.0, 30000.0)
    photons = photons_at_512 * (512.0 / columns) ** 2
    heel = 1.0 + rng.uniform(-0.12, 0.12) * np.linspace(-1, 1, rows, dtype=np.float32)[:, None]
    transmission = np.exp(-attenuation) * heel
    scatter = 0.04 * cv2.blur(transmission, (max(3, cols // 8), max(3, rows // 8)))
    expected = (transmission + scatter) * photons
    counts = expected + np.sqrt(expected) * rng.standard_normal((rows, cols), dtype=np.float32)
    signal = -np.log(np.clip(counts, 0.5, None) / photons)
    if rng.random() < 0.6:
        # Vendor "for presentation" processing: unsharp masking of varying strength.
        blur = cv2.GaussianBlur(signal, (0, 0), max(2.0, columns / 120))
        signal = signal + rng.uniform(0.2, 0.8) * (signal - blur)
    return np.asarray(signal, dtype=np.float32)


def _store(
    rng: np.random.Generator, signal: np.ndarray, columns: int, cfg: PhantomConfig
) -> tuple[Acquisition, np.ndarray]:
    bits = int(rng.choice([12, 14, 16], p=[0.45, 0.25, 0.3]))
    top = float(2**bits - 1)
    gain = top * 0.85 / 8.0
    offset = top * 0.04
    values = np.clip(np.rint(offset + gain * signal), 0, top)
    lo, hi = np.percentile(values[::4, ::4], [2.0, 98.0])
    photometric = "MONOCHROME1" if rng.random() < cfg.monochrome1_fraction else "MONOCHROME2"
    center, width = (lo + hi) / 2.0, max(hi - lo, 1.0)
    if photometric == "MONOCHROME1":
        values = top - values
        center = top - center
    stored = values.astype(np.uint16)
    slope, intercept = (1.0, 0.0) if rng.random() < 0.8 else (float(rng.choice([0.5, 2.0])), 0.0)
    acquisition = Acquisition(
        modality="DX" if rng.random() < 0.6 else "CR",
        photometric=photometric,
        bits_stored=bits,
        rescale_slope=slope,
        rescale_intercept=intercept,
        window_center=round(center * slope + intercept, 1),
        window_width=round(width * slope, 1),
        pixel_spacing_mm=round(FIELD_OF_VIEW_MM / columns, 4),
        view_position="PA" if rng.random() < 0.75 else "AP",
    )
    return acquisition, stored
