"""Training inputs are exactly what the product computes from a file on disk."""

from __future__ import annotations

import numpy as np

from models.training.data import build_split
from triage_app.dicom import load_image
from triage_app.model.preprocess import PreprocessSpec, to_unit_image
from triage_app.synthetic import PhantomConfig, render_phantom, write_phantom


def test_training_units_equal_the_product_path_bit_for_bit(tmp_path):
    spec = PreprocessSpec()
    config = PhantomConfig(size_range=(200, 320))
    split = build_split(77, 4, spec, config=config, workers=1, cache=False)
    assert split.units.dtype == np.float32  # float16 once skewed scores by up to 0.8 via CLAHE
    for index in range(4):
        path = tmp_path / f"{index}.dcm"
        write_phantom(render_phantom(77, index, config), path)
        np.testing.assert_array_equal(split.units[index], to_unit_image(load_image(path), spec))
    assert split.masks.shape == (4, 32, 32)
    assert [int(m.any()) for m in split.masks] == [int(label) for label in split.labels]
