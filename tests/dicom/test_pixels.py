"""Pixel transforms: DICOM window formula, percentile stretch, LUTs, MONOCHROME1, display."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.dicom.conftest import bundled, ramp, save, synthetic
from tests.helpers import image_info
from triage_app.dicom import load_image
from triage_app.dicom.pixels import (
    apply_modality,
    apply_voi_to_unit,
    invert_if_monochrome1,
    percentile_to_unit,
    to_display,
    window_to_unit,
)
from triage_app.errors import InvalidDicomError

BASE_INFO = image_info(
    modality="CT",
)


def lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)  # explicit VRs: the dictionary's are ambiguous
    item.add_new("LUTData", "US", data)
    return item


# --- window_to_unit ----------------------------------------------------------------------------


def test_linear_window_edges_follow_ps3_3_c_11_2_1_2() -> None:
    # c = 50, w = 11: 0 up to c - 0.5 - (w - 1) / 2 = 44.5, 1 from c - 0.5 + (w - 1) / 2 = 54.5.
    x = np.array([0, 44, 44.5, 45, 49.5, 54, 54.5, 55, 1000], dtype=np.float64)
    out = window_to_unit(x, 50, 11)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0, 0.05, 0.5, 0.95, 1, 1, 1], atol=1e-6)


def test_ct_soft_tissue_window() -> None:
    hu = np.array([-1000, -160, 40, 239, 1000], dtype=np.int16)
    out = window_to_unit(hu, 40, 400)
    assert out[0] == 0.0 and out[1] == 0.0 and out[-1] == 1.0
    assert out[2] == pytest.approx((40 - 39.5) / 399 + 0.5)
    assert out[3] == pytest.approx((239 - 39.5) / 399 + 0.5)


def test_width_one_is_a_threshold_at_center_minus_half() -> None:
    out = window_to_unit(np.array([9, 9.5, 9.6, 10, 11]), 10, 1)
    np.testing.assert_array_equal(out, [0, 0, 1, 1, 1])


def test_width_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="width"):
        window_to_unit(np.zeros(3), 0, 0.5)


def test_linear_exact_and_sigmoid() -> None:
    x = np.array([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0])
    np.testing.assert_allclose(
        window_to_unit(x, 0, 10, function="LINEAR_EXACT"), [0, 0, 0.5, 0.75, 1, 1]
    )
    sigmoid = window_to_unit(x, 0, 10, function="SIGMOID")
    assert sigmoid[2] == pytest.approx(0.5)
    assert sigmoid[3] == pytest.approx(1 / (1 + np.exp(-1)))
    assert np.all(np.diff(sigmoid) > 0) and sigmoid.min() > 0 and sigmoid.max() < 1
    with pytest.raises(ValueError, match="unknown VOI LUT function"):
        window_to_unit(x, 0, 10, function="CUBIC")


def test_window_keeps_shape_and_never_modifies_its_input() -> None:
    values = ramp(6, 5).astype(np.int32)
    before = values.copy()
    out = window_to_unit(values, 10, 20)
    assert out.shape == (6, 5)
    np.testing.assert_array_equal(values, before)


# --- percentile_to_unit ------------------------------------------------------------------------


def test_percentile_stretch_ignores_a_few_extreme_pixels() -> None:
    values = np.tile(np.arange(100, dtype=np.uint16), (10, 1))
    values[0, 0] = 60000  # one hot pixel
    out = percentile_to_unit(values, 0.5, 99.5)
    assert out.dtype == np.float32 and out.shape == values.shape
    assert out.min() == 0.0 and out.max() == 1.0
    # Without the clip at the 99.5th percentile the body would be squashed near 0.
    assert out[1, 50] == pytest.approx(50 / 99, abs=0.02)


def test_percentile_stretch_of_a_flat_image() -> None:
    assert not percentile_to_unit(np.full((3, 3), 7, dtype=np.uint8), 1, 99).any()
    mostly_flat = np.zeros((40, 40), dtype=np.uint16)
    mostly_flat[0, 0] = 500  # both percentiles are 0: fall back to min/max
    out = percentile_to_unit(mostly_flat, 0.5, 99.5)
    assert out[0, 0] == 1.0 and out[5, 5] == 0.0


def test_percentile_stretch_ignores_non_finite_values() -> None:
    values = np.array([[0.0, 1.0, np.nan], [2.0, np.inf, 3.0]], dtype=np.float32)
    out = percentile_to_unit(values, 0, 100)
    assert np.isfinite(out).all()
    assert out[0, 2] == 0.0
    np.testing.assert_allclose(out[1, [0, 2]], [2 / 3, 1.0])


def test_percentile_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="low < high"):
        percentile_to_unit(np.zeros(4), 50, 50)


# --- MONOCHROME1 -------------------------------------------------------------------------------


def test_monochrome1_is_inverted_and_monochrome2_is_not() -> None:
    unit = np.array([0.0, 0.25, 1.0], dtype=np.float32)
    np.testing.assert_allclose(invert_if_monochrome1(unit, "MONOCHROME1"), [1.0, 0.75, 0.0])
    np.testing.assert_allclose(invert_if_monochrome1(unit, " monochrome1 "), [1.0, 0.75, 0.0])
    np.testing.assert_array_equal(invert_if_monochrome1(unit, "MONOCHROME2"), unit)
    np.testing.assert_array_equal(unit, [0.0, 0.25, 1.0])  # input untouched


# --- Modality ----------------------------------------------------------------------------------


def test_linear_rescale_without_overflow() -> None:
    info = replace(BASE_INFO, rescale_slope=2.0, rescale_intercept=-1024.0)
    stored = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    out = apply_modality(stored, info)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[-1024, 976], [78976, 130046]])
    assert stored[1, 1] == 65535  # input untouched


def test_identity_rescale_still_returns_float32_copy() -> None:
    stored = np.array([1, 2, 3], dtype=np.int16)
    out = apply_modality(stored, BASE_INFO)
    assert out.dtype == np.float32
    out[0] = 99
    assert stored[0] == 1


def test_modality_lut_sequence() -> None:
    ds = Dataset()
    ds.ModalityLUTSequence = [lut_item([4, 10, 16], [100, 200, 300, 400])]
    info = replace(BASE_INFO, has_modality_lut_sequence=True, rescale_slope=5.0)
    values = np.array([[9, 10, 11], [12, 13, 50]], dtype=np.uint16)
    out = apply_modality(values, info, ds)
    np.testing.assert_array_equal(out, [[100, 100, 200], [300, 400, 400]])  # LUT wins over slope
    # Resized (float) inputs are rounded to the nearest entry.
    np.testing.assert_array_equal(apply_modality(np.array([10.4, 11.6]), info, ds), [100, 300])
    with pytest.raises(ValueError, match="dataset"):
        apply_modality(values, info)


def test_broken_lut_is_an_input_error() -> None:
    ds = Dataset()
    ds.ModalityLUTSequence = [lut_item([4, 0, 16], [1, 2])]  # two entries, four declared
    info = replace(BASE_INFO, has_modality_lut_sequence=True)
    with pytest.raises(InvalidDicomError, match="ModalityLUTSequence"):
        apply_modality(np.zeros(3, dtype=np.uint16), info, ds)


# --- VOI ---------------------------------------------------------------------------------------


def test_voi_lut_sequence_scaled_by_the_tables_own_range() -> None:
    ds = Dataset()
    # Declares 16 bits, spans 12: the table's own range decides what is white.
    ds.VOILUTSequence = [lut_item([4, 100, 16], [0, 1000, 2000, 4000])]
    info = replace(BASE_INFO, has_voi_lut_sequence=True, window=(0.0, 10.0))
    values = np.array([[50, 100, 101], [102, 103, 5000]], dtype=np.int32)
    out = apply_voi_to_unit(values, info, ds)
    assert out is not None and out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0, 0.25], [0.5, 1, 1]])  # the LUT wins over the window


def test_voi_without_lut_or_window_is_none() -> None:
    assert apply_voi_to_unit(np.zeros((2, 2)), BASE_INFO) is None


def test_voi_window_and_its_function_from_the_dataset() -> None:
    info = replace(BASE_INFO, window=(0.0, 10.0))
    values = np.array([-5.0, 0.0, 2.5])
    linear = apply_voi_to_unit(values, info)
    assert linear is not None
    np.testing.assert_allclose(linear, window_to_unit(values, 0, 10))
    ds = Dataset()
    ds.VOILUTFunction = "LINEAR_EXACT"
    exact = apply_voi_to_unit(values, info, ds)
    assert exact is not None
    np.testing.assert_allclose(exact, [0.0, 0.5, 0.75])


def test_voi_lut_needs_the_dataset() -> None:
    with pytest.raises(ValueError, match="dataset"):
        apply_voi_to_unit(np.zeros(2), replace(BASE_INFO, has_voi_lut_sequence=True))


# --- to_display --------------------------------------------------------------------------------


def test_display_of_a_monochrome1_image_with_a_window(tmp_path: Path) -> None:
    pixels = ramp(8, 8)
    ds = synthetic(pixels, photometric="MONOCHROME1", WindowCenter="32", WindowWidth="41")
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-10"
    image = load_image(save(ds, tmp_path / "m1.dcm"))
    shown = to_display(image)
    assert shown.shape == (8, 8) and shown.dtype == np.float32
    expected = 1.0 - window_to_unit(pixels.astype(np.float64) - 10, 32, 41)
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert shown[0, 0] == 1.0  # lowest values are white in MONOCHROME1


def test_display_without_window_uses_the_percentile_stretch(tmp_path: Path) -> None:
    pixels = ramp(10, 10)
    image = load_image(save(synthetic(pixels), tmp_path / "plain.dcm"))
    np.testing.assert_allclose(to_display(image), percentile_to_unit(pixels, 0.5, 99.5))


def test_display_of_a_real_monochrome1_cr() -> None:
    image = load_image(bundled("dicomdirtests/77654033/CR1/6154"))
    assert image.info.photometric == "MONOCHROME1" and image.info.window is not None
    values = apply_modality(image.stored, image.info)
    expected = 1.0 - window_to_unit(values, *image.info.window)
    np.testing.assert_allclose(to_display(image), expected, atol=1e-6)


def test_display_of_ct_uses_hounsfield_units() -> None:
    image = load_image(bundled("CT_small.dcm"))
    shown = to_display(image)
    hu = image.stored.astype(np.float64) - 1024
    np.testing.assert_allclose(shown, percentile_to_unit(hu, 0.5, 99.5), atol=1e-6)
    assert 0.0 <= shown.min() < shown.max() <= 1.0


def test_display_with_a_voi_lut_sequence_from_a_file(tmp_path: Path) -> None:
    pixels = (ramp(4, 4) % 4).astype(np.uint16)
    ds = synthetic(pixels, bits_stored=12)
    ds.VOILUTSequence = [lut_item([4, 0, 12], [0, 10, 20, 40])]
    image = load_image(save(ds, tmp_path / "voi.dcm"))
    assert image.info.has_voi_lut_sequence
    np.testing.assert_allclose(to_display(image), np.choose(pixels, [0, 0.25, 0.5, 1.0]))


def test_transforms_work_on_small_resized_arrays() -> None:
    # The model preprocessing works on resized float arrays, not the full frame.
    image = load_image(bundled("MR_small.dcm"))
    small = image.stored[::8, ::8].astype(np.float32) + 0.3
    unit = apply_voi_to_unit(apply_modality(small, image.info), image.info, image.dataset)
    assert unit is not None and unit.shape == (8, 8)
    assert 0.0 <= unit.min() <= unit.max() <= 1.0
    assert pydicom.dcmread(bundled("MR_small.dcm")).WindowWidth == 1600  # the window used
