"""Training data: synthetic phantoms pushed through the app's own reader and preprocessing.

Each phantom is written to DICOM bytes and read back with ``triage_app.dicom.load_image``, then
``triage_app.model.preprocess.to_unit_image`` makes the model input: the exact path a file takes
in the product. Arrays are cached per (seed, count, spec) so re-running training is quick.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triage_app.dicom import load_image
from triage_app.model.preprocess import PreprocessSpec, to_unit_image
from triage_app.synthetic import PhantomConfig, phantom_to_dataset, render_phantom
from triage_app.synthetic.phantom import MASK_SIDE

logger = logging.getLogger(__name__)

RUNS_DIR = Path(__file__).resolve().parent / "runs"


@dataclass(frozen=True)
class Split:
    units: np.ndarray  # N×H×W float32 in [0, 1], exactly as the product computes them
    labels: np.ndarray  # N uint8, 1 = abnormal
    masks: np.ndarray  # N×32×32 uint8 lesion masks (dense supervision)
    findings: list[list[dict[str, object]]]


def _one(
    args: tuple[int, int, PreprocessSpec, PhantomConfig],
) -> tuple[np.ndarray, int, np.ndarray, list[dict[str, object]]]:
    seed, index, spec, config = args
    phantom = render_phantom(seed, index, config)
    buffer = io.BytesIO()
    phantom_to_dataset(phantom).save_as(buffer, enforce_file_format=True)
    image = load_image(buffer.getvalue())
    # float32 as in the product: float16 here once cost 5 points of local share through CLAHE.
    unit = to_unit_image(image, spec)
    return (
        unit,
        int(phantom.is_abnormal),
        phantom.lesion_mask,
        [dict(f.to_json()) for f in phantom.findings],
    )


def build_split(
    seed: int,
    count: int,
    spec: PreprocessSpec,
    *,
    config: PhantomConfig | None = None,
    workers: int = 2,
    cache: bool = True,
) -> Split:
    cfg = config or PhantomConfig()
    # Units are made before equalisation and normalisation: those may change without re-rendering.
    unit_spec = {k: v for k, v in spec.to_json().items() if k not in ("clahe", "normalise")}
    key = hashlib.sha256(json.dumps([seed, count, unit_spec, repr(cfg)]).encode()).hexdigest()[:16]
    path = RUNS_DIR / f"split-{seed}-{count}-{key}.npz"
    if cache and path.exists():
        with np.load(path, allow_pickle=False) as data:
            cached: list[list[dict[str, object]]] = json.loads(str(data["findings"]))
            return Split(data["units"], data["labels"], data["masks"], cached)
    jobs = [(seed, i, spec, cfg) for i in range(count)]
    units = np.empty((count, spec.rows, spec.columns), np.float32)
    labels = np.empty(count, np.uint8)
    masks = np.empty((count, MASK_SIDE, MASK_SIDE), np.uint8)
    findings: list[list[dict[str, object]]] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, (unit, label, mask, found) in enumerate(pool.map(_one, jobs, chunksize=32)):
            units[i], labels[i], masks[i] = unit, label, mask
            findings.append(found)
            if (i + 1) % 2000 == 0:
                logger.info("seed %d: %d/%d images", seed, i + 1, count)
    if cache:
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        np.savez(
            path, units=units, labels=labels, masks=masks, findings=np.array(json.dumps(findings))
        )
    return Split(units, labels, masks, findings)
