"""Pixel value transforms: modality LUT/rescale, VOI (window or LUT), display scaling.

The model preprocessing runs these on small resized arrays and the viewer on the full frame, so
every function takes any 2-D (or N-D) array, never modifies its input and returns float32. The
order is the DICOM one (PS3.3 C.11): stored values → modality → VOI → presentation, where
MONOCHROME1 is inverted last so that 1.0 is always white.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.pixels.processing import apply_modality_lut, apply_voi

from triage_app.dicom.image import DicomImage, ImageInfo, frame_attribute
from triage_app.errors import InvalidDicomError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
# Reading a LUT item converts raw header values on first access; a malformed LUT raises one of
# these (pydicom raises NotImplementedError for LUT bit depths it does not handle).
_LUT_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    NotImplementedError,
    struct.error,
    BytesLengthException,
)


def apply_modality(
    values: npt.NDArray[Any], info: ImageInfo, dataset: Dataset | None = None
) -> FloatArray:
    """Stored values → modality values (e.g. Hounsfield units), as float32.

    A Modality LUT Sequence needs ``dataset`` (its table is not in ``ImageInfo``); otherwise the
    linear Rescale Slope/Intercept is applied.
    """
    if info.has_modality_lut_sequence:
        if dataset is None:
            raise ValueError("the image has a Modality LUT Sequence: pass its dataset")
        table, first_mapped = _lut_table(dataset, "ModalityLUTSequence", apply_modality_lut)
        return _lookup(values, table, first_mapped)
    out = values.astype(np.float32)
    if info.rescale_slope != 1.0:
        out *= np.float32(info.rescale_slope)
    if info.rescale_intercept != 0.0:
        out += np.float32(info.rescale_intercept)
    return out


def window_to_unit(
    values: npt.NDArray[Any], center: float, width: float, *, function: str = "LINEAR"
) -> FloatArray:
    """Window ``values`` into [0, 1] with the DICOM VOI LUT Function (PS3.3 C.11.2.1.2).

    LINEAR (the default): 0 for x <= c - 0.5 - (w - 1) / 2, 1 for x > c - 0.5 + (w - 1) / 2,
    else ((x - (c - 0.5)) / (w - 1) + 0.5); a width of 1 is a threshold at c - 0.5.
    LINEAR_EXACT and SIGMOID follow C.11.2.1.3.
    """
    function = function.strip().upper() or "LINEAR"
    if function not in _VOI_FUNCTIONS:
        raise ValueError(f"unknown VOI LUT function {function!r}")
    if function == "LINEAR" and width < 1:
        raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    if function == "LINEAR" and width == 1:
        return (values > center - 0.5).astype(np.float32)
    out = values.astype(np.float32)
    if function == "SIGMOID":
        out -= np.float32(center)
        out *= np.float32(-4.0 / width)
        np.exp(out, out=out)
        out += 1.0
        np.reciprocal(out, out=out)
        return out
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    out -= np.float32(center)
    out /= np.float32(width)
    out += 0.5
    np.clip(out, 0.0, 1.0, out=out)
    return out


def apply_voi_to_unit(
    values: npt.NDArray[Any], info: ImageInfo, dataset: Dataset | None = None
) -> FloatArray | None:
    """Modality values → [0, 1] with the header's VOI, or ``None`` if the header has none.

    The VOI LUT Sequence wins over the window (as in pydicom); it needs ``dataset``. With a
    dataset the window also honours VOI LUT Function (LINEAR_EXACT, SIGMOID).
    """
    if info.has_voi_lut_sequence:
        if dataset is None:
            raise ValueError("the image has a VOI LUT Sequence: pass its dataset")
        return _voi_lut_to_unit(values, dataset)
    if info.window is None:
        return None
    function = "LINEAR" if dataset is None else _voi_function(dataset, info.frame_index)
    center, width = info.window
    return window_to_unit(values, center, width, function=function)


def percentile_to_unit(values: npt.NDArray[Any], low_pct: float, high_pct: float) -> FloatArray:
    """Stretch the ``low_pct``..``high_pct`` percentile range to [0, 1], clipped.

    The robust fallback when the header gives no window: a few hot or dead pixels cannot set
    the contrast. Non-finite values (float pixel data) are ignored and map to 0.
    """
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"need 0 <= low < high <= 100, got {low_pct}, {high_pct}")
    sample = values
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            sample = values[finite]
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    low, high = (float(p) for p in np.percentile(sample, [low_pct, high_pct]))
    if high <= low:  # mostly flat image: fall back to the full range
        low, high = float(sample.min()), float(sample.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.float32)
    out = values.astype(np.float32)
    out -= np.float32(low)
    out /= np.float32(high - low)
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, copy=False, nan=0.0)


def invert_if_monochrome1(unit: npt.NDArray[Any], photometric: str) -> FloatArray:
    """Return ``1 - unit`` for MONOCHROME1 (low values are white), else ``unit`` as float32."""
    if photometric.strip().upper() == "MONOCHROME1":
        return (1.0 - unit).astype(np.float32, copy=False)
    return unit.astype(np.float32, copy=False)


def to_display(image: DicomImage) -> FloatArray:
    """The full-resolution frame as float32 in [0, 1], 1.0 = white, for the viewer.

    Modality LUT/rescale, then the header's VOI (fallback: 0.5-99.5 percentile stretch), then
    MONOCHROME1 inversion.
    """
    info, dataset = image.info, image.dataset
    values = apply_modality(image.stored, info, dataset)
    unit = apply_voi_to_unit(values, info, dataset)
    if unit is None:
        unit = percentile_to_unit(values, 0.5, 99.5)
    return invert_if_monochrome1(unit, info.photometric)


# --- Lookup tables -----------------------------------------------------------------------------


def _lut_table(
    dataset: Dataset,
    sequence: str,
    apply: Callable[[npt.NDArray[Any], Dataset], npt.NDArray[Any]],
) -> tuple[FloatArray, int]:
    """Decode the first LUT of ``sequence`` with pydicom's ``apply``: (table, first mapped value).

    pydicom's functions index with the input itself (integers only, and its uint16 index buffer
    wraps above 65535), so the table is decoded once over its own domain and the lookup is done
    by ``_lookup`` on rounded, clipped indices: any dtype and shape works.
    """
    try:
        n_entries, first_mapped, _ = (int(v) for v in dataset[sequence][0].LUTDescriptor)
        n_entries = n_entries or 65536  # PS3.3 C.11.1.1.1: 0 means 2**16 entries
        domain = np.arange(first_mapped, first_mapped + n_entries, dtype=np.int64)
        table = np.asarray(apply(domain, dataset), dtype=np.float32)
    except _LUT_ERRORS as exc:
        raise InvalidDicomError(f"{sequence} cannot be used") from exc
    if table.shape != domain.shape:
        raise InvalidDicomError(f"{sequence} has {table.size} entries, expected {n_entries}")
    return table, first_mapped


def _lookup(values: npt.NDArray[Any], table: FloatArray, first_mapped: int) -> FloatArray:
    """``table[x - first_mapped]``, with x rounded and clamped to the table (PS3.3 C.11.1)."""
    index = values
    if values.dtype.kind == "f":
        index = np.rint(np.nan_to_num(values, nan=first_mapped))
    index = np.clip(index, first_mapped, first_mapped + table.size - 1).astype(np.int64)
    index -= first_mapped
    out: FloatArray = table[index]
    return out


def _voi_lut_to_unit(values: npt.NDArray[Any], dataset: Dataset) -> FloatArray:
    """VOI LUT output scaled to [0, 1] by the table's own output range.

    The range is taken from the table, not its declared bit depth: vendors often declare 16
    bits for a table that only spans 12.
    """
    table, first_mapped = _lut_table(dataset, "VOILUTSequence", apply_voi)
    low, high = float(table.min()), float(table.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return _lookup(values, (table - low) / np.float32(high - low), first_mapped)


def _voi_function(dataset: Dataset, frame_index: int) -> str:
    """The frame's VOI LUT Function; LINEAR when absent, unreadable or unknown."""
    try:
        value = frame_attribute(dataset, frame_index, "FrameVOILUTSequence", "VOILUTFunction")
    except _LUT_ERRORS:
        value = None
    function = str(value or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        logger.debug("unknown VOI LUT function, using LINEAR")
        return "LINEAR"
    return function
