"""Write the bundled demo images into ``triage_app/demo_data`` (run once; the output is committed).

    python -m models.training.make_samples

Fourteen chest phantoms from a seed never used in training or calibration, in a mix of transfer
syntaxes, plus two images the model must not judge: a CT slice (wrong modality) and a head image
whose header wrongly claims to be a chest radiograph (caught only by the input-distribution
check).
"""

from __future__ import annotations

import json

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless

from triage_app.demo_data import demo_data_dir
from triage_app.synthetic import PhantomConfig, phantom_to_dataset, render_phantom

SAMPLE_SEED = 7777
CHEST_COUNT = 14


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.asarray((((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2) <= 1.0, dtype=bool)


def _like(template: Dataset, pixels: np.ndarray, *, modality: str, body_part: str) -> Dataset:
    """A copy of a phantom's header around other pixels (same synthetic identifiers)."""
    ds = template.copy()
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.BitsStored, ds.HighBit = 16, 15
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = float(np.percentile(pixels, 50)), float(np.ptp(pixels) or 1)
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID + ".9"
    return ds


def _ct_slice(rng: np.random.Generator) -> np.ndarray:
    """An axial chest CT slice in Hounsfield units: body, lungs, spine, table."""
    hu = np.full((512, 512), -1000.0)
    hu[_ellipse(hu.shape, 256, 256, 170, 230)] = 40
    for cx in (170, 342):
        hu[_ellipse(hu.shape, 240, cx, 120, 70)] = -850
    hu[_ellipse(hu.shape, 380, 256, 30, 30)] = 700
    hu[_ellipse(hu.shape, 230, 270, 55, 60)] = 45
    hu[440:450, 60:452] = 300
    return (hu + rng.normal(0, 12, hu.shape)).astype(np.int16)


def _head_image(rng: np.random.Generator) -> np.ndarray:
    """A head-like image: skull ring, brain, ventricles — not a chest, whatever the header says."""
    img = np.full((640, 560), 200.0)
    img[_ellipse(img.shape, 320, 280, 290, 240)] = 2600
    img[_ellipse(img.shape, 320, 280, 265, 215)] = 1500
    img[_ellipse(img.shape, 300, 250, 60, 18)] = 900
    img[_ellipse(img.shape, 300, 310, 60, 18)] = 900
    return np.clip(img + rng.normal(0, 40, img.shape), 0, 4095).astype(np.uint16)


def main() -> int:
    root = demo_data_dir()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.dcm"):
        old.unlink()
    config = PhantomConfig(size_range=(448, 640))
    truth: dict[str, str] = {}
    syntaxes = [None, RLELossless, JPEG2000Lossless]
    template: Dataset | None = None
    for index in range(CHEST_COUNT):
        phantom = render_phantom(SAMPLE_SEED, index, config)
        ds = phantom_to_dataset(phantom)
        template = template or ds
        syntax = syntaxes[index % len(syntaxes)]
        if syntax is not None:
            ds.compress(syntax)
        name = f"chest_{index + 1:02d}.dcm"
        ds.save_as(images / name, enforce_file_format=True)
        truth[name] = phantom.label
    assert template is not None
    rng = np.random.default_rng(SAMPLE_SEED)
    ct = _like(template, _ct_slice(rng), modality="CT", body_part="CHEST")
    ct.save_as(images / "other_ct_slice.dcm", enforce_file_format=True)
    head = _like(template, _head_image(rng), modality="DX", body_part="CHEST")
    head.compress(RLELossless)
    head.save_as(images / "other_head_labelled_chest.dcm", enforce_file_format=True)
    truth["other_ct_slice.dcm"] = truth["other_head_labelled_chest.dcm"] = "out_of_scope"
    (root / "truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in images.glob("*.dcm"))
    print(f"wrote {len(truth)} images ({total / 1e6:.1f} MB) to {images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
