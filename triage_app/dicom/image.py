"""The decoded image and the header facts that travel with it.

``ImageInfo`` holds only non-identifying facts (no names, IDs or dates), so it can go into result
records, logs and the policy's scope check as it is. ``DicomImage`` adds the selected frame's
pixels and the parsed dataset (kept whole: de-identification and escalation need it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class ImageInfo:
    """Non-identifying header facts the pipeline and policy need (never names/IDs/dates)."""

    sop_class_uid: str  # "" if absent
    sop_instance_uid: str  # "" if absent (used only for keyed pseudonyms, never logged)
    modality: str  # upper-case, "" if absent
    # Upper-case; "" if neither Body Part Examined nor the Anatomic Region Sequence states one.
    # Parts that disagree, an unknown region code or an unreadable value give a string in no
    # model's list, never "": see ``reader.body_part``.
    body_part: str
    # Upper-case; "" if neither View Position nor View Code Sequence states one. Anything that
    # is not one clear view (PA\LL, a lateral code, an unreadable value) is a string in no
    # model's list, never "": see ``reader.view_position``.
    view_position: str
    photometric: str  # PhotometricInterpretation as in the header (colour is grey in `stored`)
    rows: int
    columns: int
    number_of_frames: int
    frame_index: int  # index of the frame that was selected (frame policy: n // 2)
    samples_per_pixel: int
    bits_stored: int
    bits_allocated: int
    pixel_representation: int  # 0 unsigned, 1 signed
    transfer_syntax_uid: str
    rescale_slope: float  # 1.0 if absent
    rescale_intercept: float  # 0.0 if absent
    window: tuple[float, float] | None  # first (center, width) if present and width >= 1
    has_voi_lut_sequence: bool
    has_modality_lut_sequence: bool

    def to_json(self) -> dict[str, object]:
        """The image facts for the result record (DESIGN 4.2 ``image``); no UIDs."""
        return {
            "rows": self.rows,
            "columns": self.columns,
            "frames": self.number_of_frames,
            "frame_index": self.frame_index,
            "modality": self.modality,
            "body_part": self.body_part,
            "view_position": self.view_position,  # what view_not_intended refers to
            "photometric": self.photometric,
            "bits_stored": self.bits_stored,
            "transfer_syntax": self.transfer_syntax_uid,
        }


@dataclass(frozen=True, eq=False)
class DicomImage:
    """One selected frame, ready for preprocessing and display.

    ``stored`` is 2-D in *stored* values (before the modality LUT): the decoder's integer or
    float dtype for greyscale, float32 luminance for colour input (``info.photometric`` still
    names the original colour space). ``eq=False`` because arrays have no single truth value.
    """

    info: ImageInfo
    stored: npt.NDArray[Any]
    dataset: Dataset


def frame_attribute(ds: Dataset, frame_index: int, sequence: str, keyword: str) -> Any:
    """Return ``keyword`` for one frame, looking where enhanced multi-frame objects keep it.

    Enhanced CT/MR/XA put rescale and window values in functional group macros instead of the
    top level: the frame's Per-frame Functional Groups item wins over the Shared one, which wins
    over the top-level attribute. ``None`` when none of them has it.
    """
    for groups_keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        index = frame_index if groups_keyword.startswith("PerFrame") else 0
        if index >= len(groups):
            continue
        macro = groups[index].get(sequence)
        if macro and keyword in macro[0]:
            return macro[0].get(keyword)
    return ds.get(keyword)
