"""The occlusion map over the bundled model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.helpers import BUNDLE, phantom_dataset
from triage_app.dicom import DicomImage, load_image
from triage_app.model.classifier import Classifier
from triage_app.model.preprocess import to_tensor, to_unit_image
from triage_app.model.saliency import SaliencyCancelledError, _starts, occlusion_map


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(BUNDLE)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> DicomImage:
    path = tmp_path_factory.mktemp("saliency") / "img.dcm"
    phantom_dataset(5, 0).save_as(path, enforce_file_format=True)
    return load_image(path)


def test_map_covers_the_model_input(classifier: Classifier, image: DicomImage) -> None:
    result = occlusion_map(classifier, image, patch=32, stride=16)
    spec = classifier.manifest.preprocessing
    assert result.values.shape == (spec.rows, spec.columns)
    assert result.values.dtype == np.float32
    assert float(result.values.min()) >= 0.0 and float(result.values.max()) <= 1.0
    if result.max_drop > 0:
        assert float(result.values.max()) == pytest.approx(1.0)
    assert 0.0 <= result.base_score <= 1.0
    unoccluded = classifier.predict(to_tensor(to_unit_image(image, spec), spec))
    assert result.base_score == pytest.approx(unoccluded.score)


def test_cancel_and_bad_arguments(classifier: Classifier, image: DicomImage) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SaliencyCancelledError):
        occlusion_map(classifier, image, cancel=cancel)
    with pytest.raises(ValueError, match="patch and stride"):
        occlusion_map(classifier, image, patch=0)


@pytest.mark.parametrize(("size", "patch", "stride"), [(128, 16, 8), (100, 16, 8), (10, 16, 8)])
def test_patches_cover_every_pixel(size: int, patch: int, stride: int) -> None:
    starts = _starts(size, patch, stride)
    covered = np.zeros(size, dtype=bool)
    for start in starts:
        covered[start : start + patch] = True
    assert covered.all()
    assert starts[-1] == max(size - patch, 0)
