"""The mirror check's figures for a model bundle, stored in its manifest (which turns it on).

    python -m models.training.mirror_check models/chest-dx-demo            # held-out seed 4242
    python -m models.training.mirror_check models/chest-dx-demo --no-write # print only

The check (``InputProfile.looks_mirrored``) escalates an image that the input profile reconstructs
better left-right flipped. It is on only for a bundle whose manifest carries these figures:
how many held-out images it flags (it should flag none) and how many of their mirrored copies
(it should flag all), and how close the nearest image came to being flagged. Only the manifest's
``input_profile.mirror_check`` and the model card change: the model and profile files do not, so
their hashes stay valid.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.training.evaluate import EVAL_SEED, held_out_folder
from models.training.model_card import write_model_card
from triage_app.dicom import load_image
from triage_app.model.input_profile import InputProfile
from triage_app.model.manifest import MANIFEST_NAME, load_manifest
from triage_app.model.preprocess import to_unit_image


def mirror_figures(profile: InputProfile, units: Iterable[np.ndarray], data: str) -> dict[str, Any]:
    """Flagged images and mirrored copies, and the largest score/flipped-score ratio of an
    image (1.0 or more is flagged: the margin left is how far below 1.0 it stayed)."""
    count = flagged = mirrored_flagged = 0
    nearest = 0.0
    for unit in units:
        score = profile.score(unit)
        flipped = profile.score(unit[:, ::-1])
        count += 1
        flagged += flipped < score
        mirrored_flagged += score < flipped
        nearest = max(nearest, score / flipped)
    return {
        "rule": "escalated as out of scope (looks_mirrored) when the left-right flipped image "
        "is reconstructed better than the image",
        "data": data,
        "images": count,
        "images_flagged": flagged,
        "mirrored_flagged": mirrored_flagged,
        "nearest_ratio": round(nearest, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.bundle)
    profile = InputProfile.load(args.bundle / manifest.profile_file)
    files = sorted(held_out_folder(args.count).glob("*.dcm"))
    units = (to_unit_image(load_image(path), manifest.preprocessing) for path in files)
    data = f"synthetic phantoms, seed {EVAL_SEED} (never used in training), n={len(files)}"
    figures = mirror_figures(profile, units, data)
    print(json.dumps(figures, indent=2))
    if not args.no_write:
        doc = json.loads((args.bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
        doc["input_profile"]["mirror_check"] = figures
        (args.bundle / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
        write_model_card(args.bundle, doc)
        print(f"wrote the figures to {args.bundle / MANIFEST_NAME} and MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
