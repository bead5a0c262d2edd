"""The bundled demo images: synthetic chest phantoms (and two out-of-scope images) with truth.

They are made by ``models/training/make_samples.py`` from a seed never used in training, stored
with a mix of transfer syntaxes (uncompressed, RLE, JPEG 2000 lossless) so the demo exercises the
decoders too.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

DEMO_PACKAGE = "triage_app.demo_data"


def demo_data_dir() -> Path:
    return Path(str(resources.files(DEMO_PACKAGE)))


def demo_images() -> tuple[list[Path], dict[str, str]]:
    """The sample files in order, and file name → truth ("normal", "abnormal", "out_of_scope")."""
    root = demo_data_dir()
    truth = json.loads((root / "truth.json").read_text(encoding="utf-8"))
    return sorted((root / "images").glob("*.dcm")), {str(k): str(v) for k, v in truth.items()}
