"""The model bundle contract: manifest parsing, integrity check, bundle lookup."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.model.conftest import (
    ABNORMAL_AT_OR_ABOVE,
    MODEL_NAME,
    MODEL_VERSION,
    NORMAL_BELOW,
    TEMPERATURE,
    read_doc,
    write_doc,
)
from triage_app.errors import (
    ManifestError,
    ModelError,
    ModelIntegrityError,
    ModelNotFoundError,
)
from triage_app.model.classifier import Classifier
from triage_app.model.manifest import (
    MANIFEST_NAME,
    IntendedUse,
    ModelManifest,
    Thresholds,
    find_bundle,
    load_manifest,
    sha256_file,
    verify_bundle,
)
from triage_app.model.preprocess import PreprocessSpec


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_valid_bundle_loads_with_every_field(tiny_bundle: Path) -> None:
    manifest = verify_bundle(tiny_bundle)
    assert manifest.name == MODEL_NAME
    assert manifest.version == MODEL_VERSION
    assert manifest.key == f"{MODEL_NAME}@{MODEL_VERSION}"
    assert manifest.onnx_file == "model.onnx"
    assert manifest.sha256 == sha256_file(tiny_bundle / "model.onnx")
    assert manifest.input_name == "image"
    assert manifest.input_shape == (1, 1, 128, 128)
    assert manifest.labels == ("normal", "abnormal")
    assert manifest.positive_label == "abnormal"
    assert manifest.positive_index == 1
    assert manifest.temperature == TEMPERATURE
    assert manifest.thresholds == Thresholds(NORMAL_BELOW, ABNORMAL_AT_OR_ABOVE)
    assert manifest.preprocessing == PreprocessSpec()
    assert manifest.intended_use.modalities == ("DX", "CR")
    assert manifest.intended_use.body_parts == ("CHEST",)
    assert manifest.intended_use.allow_missing_body_part is True
    assert manifest.profile_file == "input_profile.npz"
    assert manifest.raw == read_doc(tiny_bundle)


def test_load_manifest_does_not_check_hashes_but_verify_does(tiny_bundle: Path) -> None:
    _flip_byte(tiny_bundle / "model.onnx", 20)
    assert load_manifest(tiny_bundle).name == MODEL_NAME  # the cheap header read
    with pytest.raises(ModelIntegrityError):
        verify_bundle(tiny_bundle)


@pytest.mark.parametrize("offset", [0, 57, -1])
def test_tampered_onnx_is_refused(tiny_bundle: Path, offset: int) -> None:
    onnx_path = tiny_bundle / "model.onnx"
    _flip_byte(onnx_path, offset % onnx_path.stat().st_size)
    with pytest.raises(ModelIntegrityError) as caught:
        verify_bundle(tiny_bundle)
    err = caught.value
    assert err.code == "model_hash_mismatch"
    assert "\n" not in str(err)
    assert "model.onnx" in str(err)


def test_tampered_input_profile_is_refused(tiny_bundle: Path) -> None:
    _flip_byte(tiny_bundle / "input_profile.npz", 100)
    with pytest.raises(ModelIntegrityError, match=r"input_profile\.npz"):
        verify_bundle(tiny_bundle)


def test_swapped_onnx_is_refused(tiny_bundle: Path) -> None:
    # A valid ONNX file, but not the one the manifest vouches for.
    onnx_path = tiny_bundle / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\x00")
    with pytest.raises(ModelIntegrityError):
        verify_bundle(tiny_bundle)


def test_uppercase_hash_in_manifest_is_accepted(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["sha256"] = doc["sha256"].upper()
    write_doc(tiny_bundle, doc)
    assert verify_bundle(tiny_bundle).sha256 == sha256_file(tiny_bundle / "model.onnx")


@pytest.mark.parametrize("missing", ["model.onnx", "input_profile.npz", MANIFEST_NAME])
def test_missing_file_is_model_not_found(tiny_bundle: Path, missing: str) -> None:
    (tiny_bundle / missing).unlink()
    with pytest.raises(ModelNotFoundError) as caught:
        verify_bundle(tiny_bundle)
    assert caught.value.code == "model_not_found"
    assert "\n" not in str(caught.value)


def test_missing_bundle_directory_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        verify_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '"a string"'])
def test_manifest_that_is_not_a_json_object_is_refused(tiny_bundle: Path, content: str) -> None:
    (tiny_bundle / MANIFEST_NAME).write_text(content, encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        load_manifest(tiny_bundle)
    assert caught.value.code == "manifest_invalid"


def test_manifest_that_is_not_utf8_is_refused(tiny_bundle: Path) -> None:
    (tiny_bundle / MANIFEST_NAME).write_bytes(b"\xff\xfe{\x00}")
    with pytest.raises(ManifestError):
        load_manifest(tiny_bundle)


def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return edit


def _set(value: Any, *keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _set_view(views: Any, allow_missing: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["intended_use"]["view_positions"] = views
        doc["intended_use"]["allow_missing_view_position"] = allow_missing

    return edit


MIRROR_FIGURES: dict[str, Any] = {
    "margin": 1.05,
    "data": "test",
    "images": 2000,
    "images_flagged": 0,
    "mirrored_flagged": 2000,
}


def _mirror(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        figures = {**MIRROR_FIGURES, **changes}
        doc["input_profile"]["mirror_check"] = {k: v for k, v in figures.items() if v is not None}

    return edit


MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "no format_version": _drop("format_version"),
    "format_version 2": _set(2, "format_version"),
    "format_version text": _set("one", "format_version"),
    "no name": _drop("name"),
    "no file": _drop("file"),
    "no sha256": _drop("sha256"),
    "no labels": _drop("labels"),
    "one label": _set(["abnormal"], "labels"),
    "positive label not a label": _set("sick", "positive_label"),
    "no calibration": _drop("calibration"),
    "temperature text": _set("warm", "calibration", "temperature"),
    "temperature zero": _set(0.0, "calibration", "temperature"),
    "temperature negative": _set(-1.0, "calibration", "temperature"),
    "temperature huge": _set(50.0, "calibration", "temperature"),
    "temperature null": _set(None, "calibration", "temperature"),
    "thresholds out of order": _set(
        {"normal_below": 0.9, "abnormal_at_or_above": 0.1}, "thresholds"
    ),
    "threshold above one": _set(1.5, "thresholds", "abnormal_at_or_above"),
    "threshold below zero": _set(-0.1, "thresholds", "normal_below"),
    "threshold missing": _drop("thresholds", "normal_below"),
    "no input name": _drop("input", "name"),
    "input shape not numbers": _set(["N", 1, 128, 128], "input", "shape"),
    "no intended use": _drop("intended_use"),
    "no modalities": _drop("intended_use", "modalities"),
    "no preprocessing": _drop("preprocessing"),
    "preprocessing size bad": _set([128], "preprocessing", "size"),
    "preprocessing not an object": _set("clahe", "preprocessing"),
    "clahe levels not allowed": _set(1024, "preprocessing", "clahe", "levels"),
    "resize dtype not allowed": _set("int32", "preprocessing", "resize_dtype"),
    "input shape not the preprocessing size": _set([1, 1, 96, 96], "input", "shape"),
    "intended use not an object": _set(["DX"], "intended_use"),
    "no input profile": _drop("input_profile"),
    "no input profile hash": _drop("input_profile", "sha256"),
    "view positions empty": _set([], "intended_use", "view_positions"),
    "view positions null": _set(None, "intended_use", "view_positions"),
    "view positions a string": _set("PA", "intended_use", "view_positions"),
    "view positions an object": _set({"PA": True}, "intended_use", "view_positions"),
    "view position a number": _set(["PA", 1], "intended_use", "view_positions"),
    "view position null": _set(["PA", None], "intended_use", "view_positions"),
    "view position empty": _set(["PA", ""], "intended_use", "view_positions"),
    "view position blank": _set(["PA", "  "], "intended_use", "view_positions"),
    "missing view flag text": _set_view(["PA"], "yes"),
    "missing view flag number": _set_view(["PA"], 1),
    "missing view flag null": _set_view(["PA"], None),
    "missing view flag without views": _set(True, "intended_use", "allow_missing_view_position"),
    "mirror check not an object": _set(True, "input_profile", "mirror_check"),
    "mirror check null": _set(None, "input_profile", "mirror_check"),
    "mirror check without figures": _set({"margin": 1.05}, "input_profile", "mirror_check"),
    "mirror margin missing": _mirror(margin=None),
    "mirror margin below one": _mirror(margin=0.9),
    "mirror margin text": _mirror(margin="1.05"),
    "mirror margin true": _mirror(margin=True),
    "mirror images not a count": _mirror(images="2000"),
    "mirror figures flag images": _mirror(images_flagged=40),
    "mirror figures miss mirrored": _mirror(mirrored_flagged=1900),
    "mirror figures of no images": _mirror(images=0, mirrored_flagged=0),
}


@pytest.mark.parametrize("edit", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_manifest_is_refused(
    tiny_bundle: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    doc = read_doc(tiny_bundle)
    ModelManifest.from_json(copy.deepcopy(doc))  # the unedited document is valid
    edit(doc)
    with pytest.raises(ManifestError) as caught:
        ModelManifest.from_json(doc)
    assert caught.value.code == "manifest_invalid"
    assert isinstance(caught.value, ModelError)
    assert "\n" not in str(caught.value)
    # The same refusal when the bundle is loaded from disk.
    write_doc(tiny_bundle, doc)
    with pytest.raises(ManifestError):
        verify_bundle(tiny_bundle)


@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
def test_temperature_range_is_inclusive(tiny_bundle: Path, temperature: float) -> None:
    doc = read_doc(tiny_bundle)
    doc["calibration"]["temperature"] = temperature
    assert ModelManifest.from_json(doc).temperature == temperature


def test_positive_label_may_be_any_label(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["positive_label"] = "normal"
    manifest = ModelManifest.from_json(doc)
    assert manifest.positive_index == 0


def test_intended_use_is_upper_cased_and_defaults_apply(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["intended_use"] = {
        "modalities": ["dx"],
        "body_parts": ["chest"],
        "photometric": ["monochrome2"],
    }
    use = ModelManifest.from_json(doc).intended_use
    assert (use.modalities, use.body_parts, use.photometric) == (
        ("DX",),
        ("CHEST",),
        ("MONOCHROME2",),
    )
    assert use.allow_missing_body_part is False  # the safe default
    assert use.to_json()["modalities"] == ["DX"]


def test_view_positions_are_read_upper_cased_and_stripped(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["intended_use"]["view_positions"] = ["pa", " AP "]
    doc["intended_use"]["allow_missing_view_position"] = True
    use = ModelManifest.from_json(doc).intended_use
    assert use.view_positions == ("PA", "AP")
    assert use.allow_missing_view_position is True
    assert use.to_json()["view_positions"] == ["PA", "AP"]
    assert IntendedUse.from_json(use.to_json()) == use


def test_a_missing_view_is_refused_unless_the_manifest_says_so(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["intended_use"]["view_positions"] = ["PA"]
    doc["intended_use"].pop("allow_missing_view_position", None)
    use = ModelManifest.from_json(doc).intended_use
    assert use.allow_missing_view_position is False  # the safe default
    assert use.to_json()["allow_missing_view_position"] is False


def test_a_manifest_without_view_positions_checks_no_view_and_round_trips(
    tiny_bundle: Path,
) -> None:
    """Bundles written before the field existed load and serialise exactly as before."""
    doc = read_doc(tiny_bundle)
    for field in ("view_positions", "allow_missing_view_position"):
        doc["intended_use"].pop(field, None)
    use = ModelManifest.from_json(doc).intended_use
    assert use.view_positions == ()
    assert use.allow_missing_view_position is False
    assert use.to_json() == doc["intended_use"]  # no view fields added


def test_the_view_error_is_one_clear_line(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["intended_use"]["view_positions"] = "PA"
    with pytest.raises(ManifestError, match=r"intended_use\.view_positions") as caught:
        ModelManifest.from_json(doc)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["chest-dx-demo", "central-dx-demo"])
def test_the_shipped_bundles_are_for_frontal_views(name: str) -> None:
    manifest = verify_bundle(find_bundle(name))  # unchanged model files: hashes still match
    assert manifest.intended_use.view_positions == ("PA", "AP")
    assert manifest.intended_use.allow_missing_view_position is True


@pytest.mark.parametrize(
    ("low", "high", "ok"),
    [
        (0.0, 1.0, True),
        (0.5, 0.5, True),
        (0.2, 0.8, True),
        (0.8, 0.2, False),
        (-0.01, 0.5, False),
        (0.5, 1.01, False),
    ],
)
def test_thresholds_validation(low: float, high: float, ok: bool) -> None:
    if ok:
        assert Thresholds(low, high).to_json() == {
            "normal_below": low,
            "abnormal_at_or_above": high,
        }
    else:
        with pytest.raises(ManifestError):
            Thresholds(low, high)


def test_find_bundle_uses_the_explicit_directory(tiny_bundle: Path) -> None:
    assert find_bundle("any-name", tiny_bundle) == tiny_bundle


def test_find_bundle_refuses_a_directory_without_manifest(tiny_bundle: Path) -> None:
    (tiny_bundle / MANIFEST_NAME).unlink()
    with pytest.raises(ModelNotFoundError, match=MANIFEST_NAME):
        find_bundle("any-name", tiny_bundle)


def test_find_bundle_refuses_a_missing_explicit_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        find_bundle("any-name", tmp_path / "does-not-exist")


def test_find_bundle_refuses_an_unknown_bundled_name() -> None:
    with pytest.raises(ModelNotFoundError):
        find_bundle("no-such-model-anywhere")


def test_manifest_round_trips_through_json(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    again = ModelManifest.from_json(json.loads(json.dumps(doc)))
    assert again == ModelManifest.from_json(doc)


def test_the_mirror_check_is_on_only_where_the_manifest_carries_its_figures(
    tiny_bundle: Path,
) -> None:
    """Older manifests (no ``input_profile.mirror_check``) run as they were validated: off."""
    assert Classifier(tiny_bundle).profile.mirror_margin is None
    doc = read_doc(tiny_bundle)
    doc["input_profile"]["mirror_check"] = {**MIRROR_FIGURES, "margin": 1.1}
    write_doc(tiny_bundle, doc)
    assert load_manifest(tiny_bundle).mirror_margin == 1.1
    assert Classifier(tiny_bundle).profile.mirror_margin == 1.1


@pytest.mark.parametrize("bundle", ["chest-dx-demo", "central-dx-demo"])
def test_the_shipped_models_check_for_mirrored_images(bundle: str) -> None:
    manifest = load_manifest(find_bundle(bundle))
    figures = manifest.raw["input_profile"]["mirror_check"]
    assert manifest.mirror_margin == figures["margin"] == 1.05
    assert figures["images_flagged"] == 0
    assert figures["mirrored_flagged"] >= 0.99 * figures["images"] >= 1980
