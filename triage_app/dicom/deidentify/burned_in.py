"""Burned-in text: which images may carry identifiers in their pixels, and masking them.

No header profile reaches text drawn into the pixels (ultrasound banners, screen captures,
scanned forms). An image is *at risk* when its header says Burned In Annotation is YES, or when
it is of a kind that usually carries burned-in text. An at-risk image is never escalated unless
a site's pixel-clean rule covers it: rectangles to black out, per device and image size, as RSNA
CTP's DicomPixelAnonymizer does. Rules live in a TOML file named by the
``deidentify.pixel_clean_rules`` setting::

    [[rule]]
    name = "Acme US-3000 patient banner"      # shown in results and logs
    modality = "US"                            # every key but name/rectangles is optional
    manufacturer = "ACME"                      # matched case-insensitively, whole value
    model = "US-3000"                          # Manufacturer's Model Name
    rows = 600
    columns = 800
    rectangles = [[0, 0, 800, 60]]             # x, y, width, height in pixels
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from triage_app.dicom.reader import ensure_file_meta
from triage_app.errors import ConfigError

# Kinds of image that usually carry burned-in text (PS3.15 E.3.1 names ultrasound, secondary
# capture and screen captures; angiography, fluoroscopy and endoscopy add patient banners).
RISKY_MODALITIES = frozenset({"US", "IVUS", "XA", "RF", "ES", "XC", "GM", "SM", "OP", "DOC"})
_SC = "1.2.840.10008.5.1.4.1.1.7"
# Matched by whole UID components: ".7" covers ".7.1" but never ".77.1.6" (whole slide imaging).
RISKY_SOP_CLASS_PREFIXES = (
    _SC,  # secondary capture, incl. the multi-frame SC classes (.7.1 - .7.4)
    "1.2.840.10008.5.1.4.1.1.6",  # ultrasound (single and multi-frame, and the retired ones)
    "1.2.840.10008.5.1.4.1.1.3.1",  # ultrasound multi-frame (retired)
    "1.2.840.10008.5.1.4.1.1.12",  # X-ray angiography and radiofluoroscopy
    "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL endoscopic image and video endoscopic
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated documents (PDF, CDA)
)
# Conversion Type: workstation, scanned document/image, drawing, synthetic image.
RISKY_CONVERSION_TYPES = frozenset({"WSD", "SD", "SI", "DRW", "SYN"})


@dataclass(frozen=True)
class PixelCleanRule:
    name: str
    rectangles: tuple[tuple[int, int, int, int], ...]  # x, y, width, height
    modality: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    rows: int | None = None
    columns: int | None = None

    def matches(self, ds: Dataset) -> bool:
        if "PixelData" not in ds:  # a rectangle cannot clean a PDF, an SR or float pixels
            return False
        wanted: Mapping[str, object | None] = {
            "Modality": self.modality,
            "Manufacturer": self.manufacturer,
            "ManufacturerModelName": self.model,
            "Rows": self.rows,
            "Columns": self.columns,
        }
        for keyword, expected in wanted.items():
            if expected is None:
                continue
            actual = ds.get(keyword)
            if isinstance(expected, str):
                if str(actual or "").strip().upper() != expected.strip().upper():
                    return False
            elif actual != expected:
                return False
        return True


def _rule(entry: object, index: int, path: Path) -> PixelCleanRule:
    where = f"{path}: rule {index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(entry) - {"name", "rectangles", "modality", "manufacturer", "model"}
    unknown -= {"rows", "columns"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: needs a name")
    rectangles = entry.get("rectangles")
    if not isinstance(rectangles, list) or not rectangles:
        raise ConfigError(f"{where} ({name}): needs at least one rectangle [x, y, width, height]")
    boxes: list[tuple[int, int, int, int]] = []
    for box in rectangles:
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in box)
            or box[2] == 0
            or box[3] == 0
        ):
            raise ConfigError(
                f"{where} ({name}): a rectangle must be [x, y, width, height] "
                f"in whole pixels, width and height above 0 (got {box!r})"
            )
        boxes.append((box[0], box[1], box[2], box[3]))
    matchers = {k: entry.get(k) for k in ("modality", "manufacturer", "model", "rows", "columns")}
    if all(v is None for v in matchers.values()):
        raise ConfigError(
            f"{where} ({name}): must name at least one of modality, manufacturer, "
            "model, rows or columns"
        )
    for key in ("modality", "manufacturer", "model"):
        if matchers[key] is not None and not isinstance(matchers[key], str):
            raise ConfigError(f"{where} ({name}): {key} must be text")
    for key in ("rows", "columns"):
        value = matchers[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{where} ({name}): {key} must be a whole number")
    return PixelCleanRule(name=name.strip(), rectangles=tuple(boxes), **matchers)


def load_pixel_clean_rules(path: Path | None) -> tuple[PixelCleanRule, ...]:
    """The site's rules; none configured means no image at risk is ever cleaned (or sent)."""
    if path is None:
        return ()
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the pixel-clean rules ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    entries = doc.get("rule", [])
    if not isinstance(entries, list) or set(doc) - {"rule"}:
        raise ConfigError(f"{path}: expected only [[rule]] tables")
    return tuple(_rule(entry, i, path) for i, entry in enumerate(entries))


def burned_in_reasons(ds: Dataset) -> tuple[str, ...]:
    """Why this image may carry burned-in identifiers; empty when nothing suggests it.

    A missing Burned In Annotation is judged by the kind of image: CT, MR, DX and CR rarely
    burn text in, and treating every one without the (Type 3) attribute as at risk would keep
    most of them on the device.
    """
    reasons: list[str] = []
    annotation = str(ds.get("BurnedInAnnotation") or "").strip().upper()
    if annotation and annotation != "NO":
        reasons.append("burned_in_annotation")
    if str(ds.get("Modality") or "").strip().upper() in RISKY_MODALITIES:
        reasons.append("modality")
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    if any(f"{sop_class}.".startswith(f"{prefix}.") for prefix in RISKY_SOP_CLASS_PREFIXES):
        reasons.append("sop_class")
    if str(ds.get("ConversionType") or "").strip().upper() in RISKY_CONVERSION_TYPES:
        reasons.append("conversion_type")
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else image_type  # VM 1 read as a str
    if "SCREEN SAVE" in "\\".join(str(v).upper() for v in values):
        reasons.append("screen_capture")
    return tuple(reasons)


def find_rule(ds: Dataset, rules: Sequence[PixelCleanRule]) -> PixelCleanRule | None:
    return next((rule for rule in rules if rule.matches(ds)), None)


def apply_rule(ds: Dataset, rule: PixelCleanRule) -> None:
    """Black out the rule's rectangles in every frame; compressed pixels are stored decoded."""
    if ensure_file_meta(ds).is_compressed:
        # Also sets the photometric interpretation and the transfer syntax; the instance keeps
        # its UID so that its pseudonym (and the case id) stay the same on every run.
        ds.decompress(generate_instance_uid=False)
    pixels = ds.pixel_array.copy()
    if ds.PhotometricInterpretation in ("YBR_FULL", "YBR_FULL_422"):
        ds.PhotometricInterpretation = "RGB"  # pixel_array converts them (422 upsampled)
    view = pixels if int(ds.get("NumberOfFrames") or 1) > 1 else pixels[np.newaxis, ...]
    for x, y, width, height in rule.rectangles:
        view[:, y : y + height, x : x + width, ...] = 0
    if "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = 0  # pixel_array is colour-by-pixel
    ds.PixelData = pixels.tobytes()
    ds.BurnedInAnnotation = "NO"
