"""De-identification: PS3.15 Annex E Basic Profile with options, driven by the standard's table.

``Deidentifier(secret, DeidConfig(...)).deidentify(dataset)`` de-identifies one dataset in place
and returns a :class:`DeidentificationReport`; the pipeline, the ``deidentify`` command and the
escalation path all use this one engine. ``deidentify_file`` wraps it for files on disk.
"""

from triage_app.dicom.deidentify.burned_in import PixelCleanRule, load_pixel_clean_rules
from triage_app.dicom.deidentify.engine import (
    DEFAULT_SAFE_PRIVATE,
    DeidConfig,
    DeidentificationReport,
    Deidentifier,
    SafePrivateTag,
    parse_safe_private,
)
from triage_app.dicom.deidentify.table import ProfileOption, load_table

__all__ = [
    "DEFAULT_SAFE_PRIVATE",
    "DeidConfig",
    "DeidentificationReport",
    "Deidentifier",
    "PixelCleanRule",
    "ProfileOption",
    "SafePrivateTag",
    "load_pixel_clean_rules",
    "load_table",
    "parse_safe_private",
]
