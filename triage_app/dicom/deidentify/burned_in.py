"""Burned-in text: which images may carry identifiers in their pixels, and masking them.

No header profile reaches text drawn into the pixels (ultrasound banners, screen captures,
scanned forms, dental panoramics). An image is *at risk* when its header says Burned In
Annotation is anything but NO, when it is of a kind that usually carries burned-in text whatever
its header says, or when it says nothing and is not of a kind known to rarely carry any (see
:func:`burned_in_reasons`). An at-risk image is never escalated unless
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
# capture and screen captures; angiography, fluoroscopy and endoscopy add patient banners): at
# risk even when their header says NO, which their devices often get wrong.
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
# The allow-list: kinds of image that may go without Burned In Annotation (see
# burned_in_reasons). Projection radiographs from CR and DX devices, the chest images the model
# is for, and CT and MR as acquired (Image Type ORIGINAL).
RARELY_ANNOTATED_MODALITIES = frozenset({"CR", "DX"})
RARELY_ANNOTATED_WHEN_ORIGINAL = frozenset({"CT", "MR"})


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

    PS3.15 E.1.1 lets no image with burned-in identifying information go out uncleaned, and
    E.3.1 names where such text is usual but cannot name every device that draws it (dental
    panoramics print the name and birth date, mammography and intra-oral images labels, NM and
    PET workstations whole report screens). So a header that says nothing (Burned In
    Annotation absent or empty) is trusted only for an allow-list of kinds known to rarely
    carry text; every other kind needs Burned In Annotation NO (reason
    ``burned_in_annotation_missing``), which the DX, MG and IO objects that carry text must
    declare anyway (it is Type 1 there). The allow-list:

    * CR and DX: the chest radiographs the model is for (DX objects must declare the
      attribute; CR's is Type 3 and rarely present);
    * CT and MR with Image Type ORIGINAL: acquired slices rarely burn text in, and where
      scanners do, it is in derived images (dose report screens, reformats, 3D captures),
      which need the attribute like every other kind.

    Known-risky kinds (US, XA/RF, endoscopy, secondary and screen captures, scanned documents)
    are at risk whatever the header says.
    """
    reasons: list[str] = []
    annotation = str(ds.get("BurnedInAnnotation") or "").strip().upper()
    if annotation and annotation != "NO":
        reasons.append("burned_in_annotation")
    modality = str(ds.get("Modality") or "").strip().upper()
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else image_type  # VM 1 read as a str
    image_type_values = [str(v).strip().upper() for v in values]
    if modality in RISKY_MODALITIES:
        reasons.append("modality")
    elif not annotation and not _rarely_annotated(modality, image_type_values):
        reasons.append("burned_in_annotation_missing")
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    if any(f"{sop_class}.".startswith(f"{prefix}.") for prefix in RISKY_SOP_CLASS_PREFIXES):
        reasons.append("sop_class")
    if str(ds.get("ConversionType") or "").strip().upper() in RISKY_CONVERSION_TYPES:
        reasons.append("conversion_type")
    if "SCREEN SAVE" in "\\".join(image_type_values):
        reasons.append("screen_capture")
    return tuple(reasons)


def _rarely_annotated(modality: str, image_type: list[str]) -> bool:
    """Whether an image of this kind may go without Burned In Annotation (the allow-list)."""
    if modality in RARELY_ANNOTATED_MODALITIES:
        return True
    original = bool(image_type) and image_type[0] == "ORIGINAL"
    return modality in RARELY_ANNOTATED_WHEN_ORIGINAL and original


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
