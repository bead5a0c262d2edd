"""The input profile: phantoms are typical, clearly different images are not."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from tests.model.conftest import FIT_COUNT, HELD_OUT, PROFILE_COMPONENTS, phantom_image
from triage_app.errors import ManifestError
from triage_app.model.input_profile import PROFILE_SIDE, InputProfile
from triage_app.model.manifest import find_bundle, load_manifest
from triage_app.model.preprocess import to_unit_image

FloatArray = npt.NDArray[np.float32]
SIDE = 128


def _ellipse(cx: float, cy: float, ax: float, ay: float) -> npt.NDArray[np.bool_]:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1.0)
    return np.asarray(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1.0)


def _head_like() -> FloatArray:
    """An axial head slice: bright skull ring, grey brain, dark background."""
    image = np.zeros((SIDE, SIDE), np.float32)
    image[_ellipse(0.5, 0.5, 0.38, 0.46)] = 0.95
    image[_ellipse(0.5, 0.5, 0.33, 0.41)] = 0.45
    image[_ellipse(0.5, 0.35, 0.05, 0.08)] = 0.2  # a ventricle
    return image


def _atypical(name: str, phantom_units: FloatArray) -> FloatArray:
    rng = np.random.default_rng(11)
    if name == "uniform grey":
        return np.full((SIDE, SIDE), 0.5, np.float32)
    if name == "black":
        return np.zeros((SIDE, SIDE), np.float32)
    if name == "random noise":
        return rng.random((SIDE, SIDE)).astype(np.float32)
    if name == "head-like ellipse":
        return _head_like()
    chest: FloatArray = phantom_units[HELD_OUT.start]
    if name == "inverted chest":
        return (1.0 - chest).astype(np.float32)
    if name == "chest on its side":
        return np.rot90(chest).astype(np.float32)
    raise AssertionError(name)


def test_held_out_phantoms_are_typical(
    fitted_profile: InputProfile, phantom_units: FloatArray
) -> None:
    for index in HELD_OUT:
        score = fitted_profile.score(phantom_units[index])
        assert fitted_profile.is_typical(score), (index, score, fitted_profile.limit)


def test_training_phantoms_are_typical(
    fitted_profile: InputProfile, phantom_units: FloatArray
) -> None:
    scores = np.array([fitted_profile.score(u) for u in phantom_units[:FIT_COUNT]])
    # The limit is the 99.9 % quantile times a 1.5 margin.
    assert np.all(scores <= fitted_profile.limit)
    assert fitted_profile.limit == pytest.approx(float(np.quantile(scores, 0.999)) * 1.5, rel=1e-4)


@pytest.mark.parametrize(
    "name",
    [
        "uniform grey",
        "black",
        "random noise",
        "head-like ellipse",
        "inverted chest",
        "chest on its side",
    ],
)
def test_clearly_different_images_are_atypical(
    fitted_profile: InputProfile, phantom_units: FloatArray, name: str
) -> None:
    score = fitted_profile.score(_atypical(name, phantom_units))
    assert not fitted_profile.is_typical(score)
    assert score > 1.3 * fitted_profile.limit, (score, fitted_profile.limit)


def test_score_is_the_rms_reconstruction_error(fitted_profile: InputProfile) -> None:
    # Written out independently: 32×32 area resize, project onto the components, RMS residual.
    image = _head_like()
    small = cv2.resize(image, (PROFILE_SIDE, PROFILE_SIDE), interpolation=cv2.INTER_AREA)
    centred = small.reshape(-1).astype(np.float64) - fitted_profile.mean
    basis = fitted_profile.components.astype(np.float64)
    residual = centred - basis.T @ (basis @ centred)
    assert fitted_profile.score(image) == pytest.approx(
        float(np.sqrt(np.mean(residual**2))), rel=1e-4
    )


def test_fit_gives_an_orthonormal_basis(fitted_profile: InputProfile) -> None:
    components = fitted_profile.components.astype(np.float64)
    assert components.shape == (PROFILE_COMPONENTS, PROFILE_SIDE * PROFILE_SIDE)
    np.testing.assert_allclose(components @ components.T, np.eye(PROFILE_COMPONENTS), atol=1e-4)
    assert fitted_profile.mean.shape == (PROFILE_SIDE * PROFILE_SIDE,)


def test_an_image_in_the_span_scores_zero(fitted_profile: InputProfile) -> None:
    # mean + a combination of components, as a 32×32 image (the area resize is the identity).
    features = fitted_profile.mean + 0.5 * fitted_profile.components[0]
    image = features.reshape(PROFILE_SIDE, PROFILE_SIDE).astype(np.float32)
    assert fitted_profile.score(image) == pytest.approx(0.0, abs=1e-5)


def test_save_and_load_round_trip(tmp_path: Path, fitted_profile: InputProfile) -> None:
    path = tmp_path / "profile.npz"
    fitted_profile.save(path)
    loaded = InputProfile.load(path)
    np.testing.assert_array_equal(loaded.mean, fitted_profile.mean)
    np.testing.assert_array_equal(loaded.components, fitted_profile.components)
    assert loaded.limit == pytest.approx(fitted_profile.limit, rel=1e-6)
    image = _head_like()
    assert loaded.score(image) == pytest.approx(fitted_profile.score(image), rel=1e-6)


@pytest.mark.parametrize(
    ("mean_shape", "components_shape"),
    [((512,), (4, 512)), ((1024,), (4, 1000)), ((32, 32), (4, 1024)), ((1024,), (1024,))],
)
def test_wrong_shapes_are_refused(
    tmp_path: Path, mean_shape: tuple[int, ...], components_shape: tuple[int, ...]
) -> None:
    path = tmp_path / "profile.npz"
    with path.open("wb") as handle:
        np.savez(
            handle,
            mean=np.zeros(mean_shape, np.float32),
            components=np.zeros(components_shape, np.float32),
            limit=np.float32(0.1),
        )
    with pytest.raises(ManifestError) as caught:
        InputProfile.load(path)
    assert caught.value.code == "manifest_invalid"


def test_limit_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "profile.npz"
    with path.open("wb") as handle:
        np.savez(
            handle,
            mean=np.zeros(1024, np.float32),
            components=np.zeros((4, 1024), np.float32),
            limit=np.array([0.1, 0.2], np.float32),
        )
    with pytest.raises(ManifestError):
        InputProfile.load(path)


def test_missing_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "profile.npz"
    with path.open("wb") as handle:
        np.savez(handle, mean=np.zeros(1024, np.float32), limit=np.float32(0.1))
    with pytest.raises(ManifestError, match=r"profile\.npz"):
        InputProfile.load(path)


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(1024, np.float32))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content",
    [b"", b"not an npz at all", b"PK\x03\x04broken zip", _npy_bytes()],
    ids=["empty", "text", "broken zip", "bare npy"],
)
def test_unreadable_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "profile.npz"
    path.write_bytes(content)
    with pytest.raises(ManifestError):
        InputProfile.load(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError):
        InputProfile.load(tmp_path / "absent.npz")


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "profile.npz"
    with path.open("wb") as handle:
        np.savez(
            handle,
            mean=np.array([object()] * 1024, dtype=object),
            components=np.zeros((4, 1024), np.float32),
            limit=np.float32(0.1),
        )
    with pytest.raises(ManifestError):
        InputProfile.load(path)


def test_a_blank_image_is_atypical_even_when_reconstructable(fitted_profile) -> None:
    blank = np.zeros((128, 128), np.float32)
    assert not fitted_profile.is_typical(fitted_profile.score(blank), blank)
    assert fitted_profile.is_typical(
        0.0, np.linspace(0, 1, 128 * 128, dtype=np.float32).reshape(128, 128)
    )


def test_mirrored_phantoms_look_mirrored_and_phantoms_do_not() -> None:
    """A chest is not left-right symmetric: flipped, a phantom is reconstructed worse by the
    shipped profile, so a mirrored one is reconstructed better once flipped back. (A profile
    of a few dozen phantoms does not tell them apart reliably: hence the figures per bundle.)"""
    bundle = find_bundle("chest-dx-demo")
    manifest = load_manifest(bundle)
    profile = InputProfile.load(bundle / manifest.profile_file, mirror_margin=1.05)
    for i in HELD_OUT:
        image = phantom_image(i)
        width = image.stored.shape[1]
        cut = width // 10
        # As acquired, and cut off on one side or the other (the midline moves).
        for stored in (image.stored, image.stored[:, cut:], image.stored[:, : width - cut]):
            framed = dataclasses.replace(image, stored=np.ascontiguousarray(stored))
            unit = to_unit_image(framed, manifest.preprocessing)
            assert not profile.looks_mirrored(unit), (i, stored.shape)
            assert profile.looks_mirrored(np.ascontiguousarray(unit[:, ::-1])), (i, stored.shape)


def test_the_margin_decides(fitted_profile: InputProfile, phantom_units: FloatArray) -> None:
    unit = phantom_units[HELD_OUT.start]
    ratio = fitted_profile.mirror_ratio(unit)
    assert ratio > 0
    assert dataclasses.replace(fitted_profile, mirror_margin=ratio * 0.99).looks_mirrored(unit)
    assert not dataclasses.replace(fitted_profile, mirror_margin=ratio * 1.01).looks_mirrored(unit)


def test_without_the_mirror_check_nothing_looks_mirrored(
    fitted_profile: InputProfile, phantom_units: FloatArray
) -> None:
    assert fitted_profile.mirror_margin is None
    mirrored = np.ascontiguousarray(phantom_units[HELD_OUT.start][:, ::-1])
    assert not fitted_profile.looks_mirrored(mirrored)


def test_the_mirror_margin_is_set_at_load(tmp_path: Path, fitted_profile: InputProfile) -> None:
    path = tmp_path / "profile.npz"
    fitted_profile.save(path)
    assert InputProfile.load(path).mirror_margin is None
    assert InputProfile.load(path, mirror_margin=1.05).mirror_margin == 1.05
