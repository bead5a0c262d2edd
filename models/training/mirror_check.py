"""The mirror check's figures for a model bundle, stored in its manifest (which turns it on).

    python -m models.training.mirror_check models/chest-dx-demo            # held-out seed 4242
    python -m models.training.mirror_check models/chest-dx-demo --no-write # print only

The check (``InputProfile.looks_mirrored``) escalates an image that the input profile, at its
best alignment, reconstructs better left-right flipped, by more than a margin. A manifest turns
it on with these figures (the loader refuses figures that show it failing): how many held-out
images it flags (it should flag none), how many of their mirrored copies (it should flag all),
and the same for images cut off on one side (``framing``: where the check gets unsure). Only the
manifest's ``input_profile.mirror_check`` and the model card change: the model and profile files
do not, so their hashes stay valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.training.evaluate import EVAL_SEED, held_out_folder
from models.training.model_card import write_model_card
from triage_app.dicom import DicomImage, load_image
from triage_app.model.input_profile import MIRROR_CROPS, InputProfile
from triage_app.model.manifest import MANIFEST_NAME, load_manifest
from triage_app.model.preprocess import PreprocessSpec, to_unit_image

#: The margin the shipped bundles use: chosen on images cut off on one side (module docstring).
MARGIN = 1.05
#: Shares of the width cut off one side of the stored image for the framing figures.
FRAMING_CUTS = (0.10, 0.15)


def mirror_figures(
    profile: InputProfile, units: Iterable[np.ndarray], data: str, margin: float = MARGIN
) -> dict[str, Any]:
    """Images flagged and mirrored copies caught by the check at ``margin``, and the largest
    ratio of an image (above the margin it is flagged)."""
    checked = dataclasses.replace(profile, mirror_margin=margin)
    count = flagged = caught = 0
    nearest = 0.0
    for unit in units:
        ratio = checked.mirror_ratio(unit)
        count += 1
        flagged += ratio > margin
        caught += checked.looks_mirrored(unit[:, ::-1])
        nearest = max(nearest, ratio)
    crops = ", ".join(f"{share:.0%}" for share in MIRROR_CROPS)
    return {
        "rule": "escalated as out of scope (looks_mirrored) when the left-right flipped image, "
        f"at its best alignment (as is, or {crops} cut off either side), is reconstructed "
        f"better than the image by more than the margin",
        "margin": margin,
        "data": data,
        "images": count,
        "images_flagged": flagged,
        "mirrored_flagged": caught,
        "nearest_ratio": round(nearest, 4),
    }


def framing_figures(
    profile: InputProfile, images: list[DicomImage], spec: PreprocessSpec, margin: float = MARGIN
) -> dict[str, Any]:
    """The check on images cut off on one side (each side in turn), upright and mirrored."""
    checked = dataclasses.replace(profile, mirror_margin=margin)
    figures: dict[str, Any] = {}
    for share in FRAMING_CUTS:
        flagged = caught = total = 0
        for image in images:
            stored = image.stored
            cut = round(stored.shape[1] * share)
            for part in (stored[:, cut:], stored[:, : stored.shape[1] - cut]):
                total += 1
                for pixels, mirrored in ((part, False), (part[:, ::-1], True)):
                    cropped = dataclasses.replace(image, stored=np.ascontiguousarray(pixels))
                    flag = checked.looks_mirrored(to_unit_image(cropped, spec))
                    caught += flag and mirrored
                    flagged += flag and not mirrored
        figures[f"cut_{round(share * 100)}pct"] = {
            "images": total,
            "images_flagged": flagged,
            "mirrored_flagged": caught,
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--margin", type=float, default=MARGIN)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.bundle)
    profile = InputProfile.load(args.bundle / manifest.profile_file)
    images = [load_image(path) for path in sorted(held_out_folder(args.count).glob("*.dcm"))]
    spec = manifest.preprocessing
    data = f"synthetic phantoms, seed {EVAL_SEED} (never used in training), n={len(images)}"
    units = (to_unit_image(image, spec) for image in images)
    figures = mirror_figures(profile, units, data, args.margin)
    figures["framing"] = framing_figures(profile, images, spec, args.margin)
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
