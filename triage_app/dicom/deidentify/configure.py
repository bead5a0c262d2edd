"""The de-identification configuration from the site's settings.

Kept apart from the pipeline so that ``triage-app deidentify`` builds its configuration without
importing the model stack (ONNX Runtime and OpenCV add a quarter of a second to start-up).
"""

from __future__ import annotations

from triage_app.config import Settings
from triage_app.dicom.deidentify.burned_in import load_pixel_clean_rules
from triage_app.dicom.deidentify.engine import DeidConfig, parse_safe_private


def deid_config(settings: Settings) -> DeidConfig:
    """The de-identification settings (the pixel-clean rules file is read and checked here)."""
    return DeidConfig(
        options=settings.deid_options,
        safe_private=parse_safe_private(settings.safe_private_tags),
        pixel_rules=load_pixel_clean_rules(settings.pixel_clean_rules),
    )
