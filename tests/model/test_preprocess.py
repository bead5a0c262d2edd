"""Preprocessing: DICOM frame → unit image → model tensor, and the manifest's spec block."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from tests.dicom.conftest import synthetic
from tests.helpers import BUNDLE
from tests.model.conftest import PHANTOM_SEED, SMALL, lossless_re_encodings
from triage_app.dicom import DicomImage, load_image
from triage_app.errors import ManifestError
from triage_app.model import Classifier
from triage_app.model.preprocess import PreprocessSpec, to_tensor, to_unit_image
from triage_app.policy import assess_scope, decide
from triage_app.synthetic import Phantom, PhantomConfig, phantom_to_dataset, render_phantom

SPEC = PreprocessSpec()
HEADER_SPEC = PreprocessSpec(windowing="header")

FloatArray = npt.NDArray[np.float64]


def _load(ds: Dataset) -> DicomImage:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return load_image(buffer.getvalue())


def _phantom(index: int, config: PhantomConfig = SMALL) -> Phantom:
    return render_phantom(PHANTOM_SEED, index, config)


def _first_with(photometric: str) -> Phantom:
    for index in range(40):
        phantom = _phantom(index)
        if phantom.acquisition.photometric == photometric:
            return phantom
    raise AssertionError(f"no {photometric} phantom among the first 40")


def _reference_unit(image: DicomImage, spec: PreprocessSpec) -> FloatArray:
    """The straightforward order: float at full size → modality → percentile window on the full
    image → MONOCHROME1 inversion → resize (area) to model size."""
    info = image.info
    values = image.stored.astype(np.float64) * info.rescale_slope + info.rescale_intercept
    low, high = np.percentile(values, [spec.low_percentile, spec.high_percentile])
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    if info.photometric == "MONOCHROME1":
        unit = 1.0 - unit
    small = cv2.resize(unit, (spec.columns, spec.rows), interpolation=cv2.INTER_AREA)
    return np.asarray(small, dtype=np.float64)


@pytest.mark.parametrize("index", range(4))
def test_unit_image_shape_dtype_and_range(index: int) -> None:
    unit = to_unit_image(_load(phantom_to_dataset(_phantom(index))), SPEC)
    assert unit.shape == (SPEC.rows, SPEC.columns)
    assert unit.dtype == np.float32
    assert float(unit.min()) >= 0.0
    assert float(unit.max()) <= 1.0
    # The percentile window stretches the image: both ends are reached.
    assert float(unit.min()) == 0.0
    assert float(unit.max()) == 1.0


def test_non_square_size_keeps_rows_and_columns_apart() -> None:
    # Values grow from left to right only: the output must too, whatever its shape.
    pixels = np.tile(np.arange(200, dtype=np.uint16) * 100, (64, 1))
    image = _load(synthetic(pixels, bits_stored=16))
    spec = PreprocessSpec(rows=16, columns=40)
    unit = to_unit_image(image, spec)
    assert unit.shape == (16, 40)
    np.testing.assert_allclose(unit, np.tile(unit[0], (16, 1)))  # constant down each column
    assert np.all(np.diff(unit[0]) >= 0)
    assert unit[0, 0] == 0.0
    assert unit[0, -1] == 1.0


@pytest.mark.parametrize(
    "dtype", ["uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"]
)
def test_any_pixel_dtype_is_preprocessed(dtype: str) -> None:
    base = np.tile(np.arange(256, dtype=np.int64) - 100, (32, 1))
    if np.dtype(dtype).kind == "u":
        base = base + 100
    pixels = base.astype(dtype)
    if np.dtype(dtype).itemsize <= 2 and np.dtype(dtype).kind in "iu":
        image = _load(synthetic(pixels))
    else:  # pydicom cannot write these as plain Pixel Data; the decoder can still return them
        image = replace(_load(synthetic(pixels.astype(np.int16))), stored=pixels)
    assert image.stored.dtype == np.dtype(dtype)
    unit = to_unit_image(image, PreprocessSpec(rows=8, columns=32))
    assert unit.dtype == np.float32
    assert np.all(np.diff(unit[0]) > 0)
    assert unit[0, 0] == pytest.approx(0.0, abs=0.02)
    assert unit[0, -1] == pytest.approx(1.0, abs=0.02)


def test_monochrome1_and_monochrome2_of_the_same_phantom_agree() -> None:
    phantom = _first_with("MONOCHROME2")
    top = 2**phantom.acquisition.bits_stored - 1
    as_m2 = phantom_to_dataset(phantom)
    as_m1 = phantom_to_dataset(phantom)
    as_m1.PixelData = (top - phantom.stored).astype("<u2").tobytes()
    as_m1.PhotometricInterpretation = "MONOCHROME1"
    unit_m2 = to_unit_image(_load(as_m2), SPEC)
    unit_m1 = to_unit_image(_load(as_m1), SPEC)
    # Exact up to the integer rounding of the area resize (one stored value in a window that
    # spans hundreds to thousands of them).
    np.testing.assert_allclose(unit_m1, unit_m2, atol=2e-3)
    # And the inversion really happened: without it the images would be negatives.
    assert float(np.abs(unit_m2 - (1.0 - unit_m1)).mean()) > 0.2


def test_monochrome1_phantom_shows_dense_structures_bright() -> None:
    # The spine/mediastinum column in the middle is denser than the lungs on either side, in
    # both photometric interpretations.
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        unit = to_unit_image(_load(phantom_to_dataset(_first_with(photometric))), SPEC)
        middle = float(unit[40:90, 58:70].mean())
        lungs = float(np.concatenate([unit[40:90, 25:45], unit[40:90, 83:103]]).mean())
        assert middle > lungs + 0.1, photometric


@pytest.mark.parametrize(("slope", "intercept"), [(2.0, 0.0), (0.5, -1000.0), (3.7, 250.0)])
def test_linear_rescale_does_not_change_the_percentile_result(
    slope: float, intercept: float
) -> None:
    phantom = _phantom(1)
    plain = phantom_to_dataset(phantom)
    rescaled = phantom_to_dataset(phantom)
    rescaled.RescaleSlope = slope
    rescaled.RescaleIntercept = intercept
    image = _load(rescaled)
    assert (image.info.rescale_slope, image.info.rescale_intercept) == (slope, intercept)
    np.testing.assert_allclose(
        to_unit_image(image, SPEC), to_unit_image(_load(plain), SPEC), atol=1e-4
    )


@pytest.mark.parametrize(
    ("index", "config"),
    [(i, SMALL) for i in range(10)] + [(i, PhantomConfig(size_range=(600, 900))) for i in range(2)],
)
def test_resizing_first_is_close_to_the_straightforward_order(
    index: int, config: PhantomConfig
) -> None:
    """Resizing the stored values first is the design's speed-up (DESIGN §7); it must not change
    the image in a way that matters.

    The modality rescale and MONOCHROME1 inversion are linear and commute exactly with the area
    resize. What does not commute is the percentile window: on the small image the quantum noise
    is averaged away, so its 0.5/99.5 percentiles lie a little inside those of the full image,
    and clipping before vs after averaging differs at the window ends. That is a mild, global
    contrast change, not a structural one. Tolerances: mean absolute difference <= 0.07 of the
    unit range and correlation >= 0.99 (measured on these phantoms: mean <= 0.065, correlation
    >= 0.998; a wrong order of inversion, a transposed resize or a wrong window fails both).
    """
    image = _load(phantom_to_dataset(render_phantom(7, index, config)))
    fast = to_unit_image(image, SPEC).astype(np.float64)
    reference = _reference_unit(image, SPEC)
    assert float(np.abs(fast - reference).mean()) <= 0.07
    assert float(np.corrcoef(fast.ravel(), reference.ravel())[0, 1]) >= 0.99


def _header_window(values: FloatArray, center: float, width: float) -> FloatArray:
    """PS3.3 C.11.2.1.2.1 linear window, written out."""
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("custom", [False, True])
def test_header_windowing_uses_the_header_window(photometric: str, custom: bool) -> None:
    phantom = _first_with(photometric)
    ds = phantom_to_dataset(phantom)
    if custom:  # a narrow window around the median, far from any percentile window
        ds.WindowCenter = float(np.median(phantom.stored))
        ds.WindowWidth = 200.0
    image = _load(ds)
    assert image.info.window is not None
    center, width = image.info.window
    stored = image.stored.astype(np.float32)
    small = cv2.resize(stored, (SPEC.columns, SPEC.rows), interpolation=cv2.INTER_AREA)
    values = small.astype(np.float64) * image.info.rescale_slope + image.info.rescale_intercept
    expected = _header_window(values, center, width)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    unit = to_unit_image(image, HEADER_SPEC)
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, expected, atol=1e-5)
    if custom:
        assert float(np.abs(unit - to_unit_image(image, SPEC)).mean()) > 0.05


def test_header_windowing_falls_back_to_percentiles_without_a_window() -> None:
    ds = phantom_to_dataset(_phantom(2))
    del ds.WindowCenter
    del ds.WindowWidth
    image = _load(ds)
    assert image.info.window is None
    np.testing.assert_array_equal(to_unit_image(image, HEADER_SPEC), to_unit_image(image, SPEC))


def test_percentile_windowing_ignores_the_header_window() -> None:
    phantom = _phantom(2)
    narrow = phantom_to_dataset(phantom)
    narrow.WindowCenter = float(np.median(phantom.stored))
    narrow.WindowWidth = 10.0
    np.testing.assert_array_equal(
        to_unit_image(_load(narrow), SPEC),
        to_unit_image(_load(phantom_to_dataset(phantom)), SPEC),
    )


def test_custom_percentiles_change_the_contrast() -> None:
    image = _load(phantom_to_dataset(_phantom(0)))
    wide = to_unit_image(image, PreprocessSpec(low_percentile=0.0, high_percentile=100.0))
    narrow = to_unit_image(image, PreprocessSpec(low_percentile=10.0, high_percentile=90.0))
    # A narrower percentile range saturates more pixels.
    assert np.mean((narrow == 0.0) | (narrow == 1.0)) > np.mean((wide == 0.0) | (wide == 1.0))
    assert float(narrow.std()) > float(wide.std())


def test_to_tensor_normalises_into_a_batch_of_one() -> None:
    unit = np.random.default_rng(0).random((SPEC.rows, SPEC.columns)).astype(np.float32)
    spec = PreprocessSpec(mean=0.4, std=0.2, clahe_clip=0.0)
    tensor = to_tensor(unit, spec)
    assert tensor.shape == (1, 1, SPEC.rows, SPEC.columns)
    assert tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0, 0] * 0.2 + 0.4, unit, atol=1e-6)
    assert to_tensor(np.full((4, 4), 0.4, np.float32), spec).max() == pytest.approx(0.0)


def test_clahe_raises_local_contrast_of_a_faint_blob() -> None:
    """A faint blob on a smooth ramp: equalisation makes it stand out more, deterministically."""
    ys, xs = np.mgrid[0 : SPEC.rows, 0 : SPEC.columns]
    ramp = (0.2 + 0.3 * xs / SPEC.columns).astype(np.float32)
    blob = 0.02 * (((ys - 64) ** 2 + (xs - 64) ** 2) < 16)
    unit = (ramp + blob).astype(np.float32)
    plain = to_tensor(unit, PreprocessSpec(clahe_clip=0.0))[0, 0]
    equalised = to_tensor(unit, SPEC)[0, 0]
    assert SPEC.clahe_clip > 0
    inside, around = ((ys - 64) ** 2 + (xs - 64) ** 2) < 16, np.abs(ys - 64) + np.abs(xs - 72) < 3

    def contrast(t: np.ndarray) -> float:
        return float(t[inside].mean() - t[around].mean())

    assert contrast(equalised) > 1.5 * contrast(plain)
    np.testing.assert_array_equal(equalised, to_tensor(unit, SPEC)[0, 0])


@pytest.mark.parametrize("index", range(4))
def test_lossless_re_encodings_give_the_same_tensor(index: int) -> None:
    """The same pixel values stored differently must give the model the same input, exactly.

    Resizing the integers rounded at the stored bit depth (unit images up to ~5e-4 apart), and
    equalisation turned that into different inputs: mean tensor differences of 0.15-0.5 on 65,536
    levels, ~0.005 on 256 levels, both enough to change decisions near a threshold.
    """
    images = lossless_re_encodings(render_phantom(777, index))
    units = {name: to_unit_image(image, SPEC) for name, image in images.items()}
    reference = units.pop("as_written")
    for name, unit in units.items():
        np.testing.assert_array_equal(unit, reference, err_msg=name)
        np.testing.assert_array_equal(to_tensor(unit, SPEC), to_tensor(reference, SPEC), name)


def test_legacy_bundles_resize_the_stored_integers() -> None:
    """Bundles trained before float32 resizing are still run on the rounded integer resize."""
    images = lossless_re_encodings(render_phantom(777, 1))  # 12 bits stored
    legacy = PreprocessSpec(resize_dtype="stored")
    as_written = to_unit_image(images["as_written"], legacy)
    assert not np.array_equal(as_written, to_unit_image(images["shifted_16_bit"], legacy))
    exact = to_unit_image(images["as_written"], SPEC)
    assert not np.array_equal(as_written, exact)
    np.testing.assert_allclose(as_written, exact, atol=1e-3)  # rounding, nothing more


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier(BUNDLE)


# Seed 777 phantoms whose local decision changed with the encoding under 16-bit equalisation
# (the review's scan: 19 of 200), and three that did not.
REVIEW_FLIPS = (5, 18, 32, 34, 43, 73, 96, 164, 176)


@pytest.mark.parametrize("index", (0, 1, 2, *REVIEW_FLIPS))
def test_the_shipped_models_decision_does_not_depend_on_the_encoding(
    shipped: Classifier, index: int
) -> None:
    """A case must not be decided locally as normal or escalated depending on whether the
    scanner stored 12 bits, 16 bits with a smaller Rescale Slope or float pixel data."""
    spec = shipped.manifest.preprocessing
    outcomes = {}
    for name, image in lossless_re_encodings(render_phantom(777, index)).items():
        unit = to_unit_image(image, spec)
        score = shipped.predict(to_tensor(unit, spec)).score
        scope = assess_scope(image.info, unit, shipped.manifest.intended_use, shipped.profile)
        outcomes[name] = (decide(score, shipped.manifest.thresholds, scope).decision, score)
    assert len(set(outcomes.values())) == 1, outcomes  # same decision, same score


@pytest.fixture(scope="module")
def shipped_central() -> Classifier:
    return Classifier(BUNDLE.parent / "central-dx-demo")


# Seed 777 phantoms whose central verdict changed with the encoding under central-dx-demo 1.0.x's
# 16-bit equalisation and integer resize (4 of 200; scores up to 0.80 apart), and three that
# did not.
CENTRAL_FLIPS = (151, 180, 185, 193)


@pytest.mark.parametrize("index", (0, 1, 2, *CENTRAL_FLIPS))
def test_the_central_verdict_does_not_depend_on_the_encoding(
    shipped_central: Classifier, index: int
) -> None:
    """The central verdict is what a radiologist is shown for a hard case: the same pixels
    stored another way must not turn it from normal to abnormal."""
    spec = shipped_central.manifest.preprocessing
    outcomes = {}
    for name, image in lossless_re_encodings(render_phantom(777, index)).items():
        prediction = shipped_central.predict(to_tensor(to_unit_image(image, spec), spec))
        label = max(prediction.probabilities, key=prediction.probabilities.__getitem__)
        outcomes[name] = (label, prediction.score)
    assert len(set(outcomes.values())) == 1, outcomes  # same verdict, same score


def test_spec_round_trips_through_json() -> None:
    spec = PreprocessSpec(
        rows=96, columns=112, windowing="header", low_percentile=1.0, high_percentile=98.0,
        mean=0.45, std=0.3,
    )  # fmt: skip
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_json(PreprocessSpec().to_json()) == PreprocessSpec()
    legacy = PreprocessSpec(clahe_levels=65536, resize_dtype="stored")
    assert PreprocessSpec.from_json(legacy.to_json()) == legacy


def test_bundles_without_the_new_fields_keep_the_preprocessing_they_were_trained_with() -> None:
    block = PreprocessSpec().to_json()
    del block["clahe"]["levels"], block["resize_dtype"]
    spec = PreprocessSpec.from_json(block)
    assert (spec.clahe_levels, spec.resize_dtype) == (65536, "stored")
    # What new models are trained with.
    assert (PreprocessSpec().clahe_levels, PreprocessSpec().resize_dtype) == (256, "float32")


def test_clahe_levels_change_the_tensor() -> None:
    unit = np.random.default_rng(1).random((SPEC.rows, SPEC.columns)).astype(np.float32)
    eight_bit = to_tensor(unit, PreprocessSpec(clahe_levels=256))
    sixteen_bit = to_tensor(unit, PreprocessSpec(clahe_levels=65536))
    assert float(np.abs(eight_bit - sixteen_bit).max()) > 0
    # 256 levels: the equalised image holds at most 256 distinct values.
    assert len(np.unique(eight_bit)) <= 256 < len(np.unique(sixteen_bit))


def test_spec_percentiles_default_when_absent() -> None:
    block = PreprocessSpec().to_json()
    block["windowing"] = {"method": "percentile"}
    spec = PreprocessSpec.from_json(block)
    assert (spec.low_percentile, spec.high_percentile) == (0.5, 99.5)


def _block(**changes: Any) -> dict[str, Any]:
    block = PreprocessSpec().to_json()
    for key, value in changes.items():
        if value is None:
            del block[key]
        else:
            block[key] = value
    return block


@pytest.mark.parametrize(
    "block",
    [
        _block(size=None),
        _block(size=[128]),
        _block(size=[128, 128, 1]),
        _block(size=["big", 128]),
        _block(size=128),
        _block(windowing=None),
        _block(windowing={"low": 1.0}),
        _block(windowing={"method": "sigmoid"}),
        _block(windowing={"method": "percentile", "low": 50, "high": 50}),
        _block(windowing={"method": "percentile", "low": -1, "high": 99}),
        _block(windowing={"method": "percentile", "low": 1, "high": 101}),
        _block(windowing={"method": "percentile", "low": "one", "high": 99}),
        _block(normalise=None),
        _block(normalise={"mean": 0.5}),
        _block(normalise={"mean": 0.5, "std": 0.0}),
        _block(normalise={"mean": 0.5, "std": -0.25}),
        _block(size=[4, 128]),
        _block(size=[128, 7]),
        _block(clahe=3.0),
        _block(clahe={"clip_limit": 3.0}),
        _block(clahe={"clip_limit": 3.0, "tiles": 4, "levels": 4096}),
        _block(clahe={"clip_limit": 3.0, "tiles": 4, "levels": "256"}),
        _block(clahe={"clip_limit": 3.0, "tiles": 4, "levels": 256.0}),
        _block(clahe={"clip_limit": 3.0, "tiles": 4, "levels": True}),
        _block(clahe={"clip_limit": -1.0, "tiles": 4, "levels": 256}),
        _block(clahe={"clip_limit": 3.0, "tiles": 0, "levels": 256}),
        _block(windowing="percentile"),
        _block(resize_dtype="float64"),
    ],
)
def test_malformed_spec_blocks_are_refused(block: dict[str, Any]) -> None:
    with pytest.raises(ManifestError) as caught:
        PreprocessSpec.from_json(block)
    assert caught.value.code == "manifest_invalid"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"windowing": "auto"},
        {"low_percentile": 60.0, "high_percentile": 40.0},
        {"rows": 7},
        {"columns": 0},
        {"std": 0.0},
        {"clahe_levels": 4096},
        {"clahe_levels": 0},
        {"resize_dtype": "uint16"},
    ],
)
def test_invalid_spec_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ManifestError):
        PreprocessSpec(**kwargs)
