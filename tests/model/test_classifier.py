"""The ONNX Runtime classifier on the tiny bundle: probabilities, temperature, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest

from tests.model.conftest import (
    MODEL_NAME,
    MODEL_VERSION,
    TEMPERATURE,
    expected_logits,
    phantom_image,
    read_doc,
    tiny_onnx_model,
    write_doc,
)
from triage_app.errors import ModelError, ModelIntegrityError
from triage_app.model import Classifier, PreprocessSpec, to_tensor, to_unit_image
from triage_app.model.classifier import softmax_with_temperature
from triage_app.model.input_profile import InputProfile
from triage_app.model.manifest import sha256_file


def _softmax(logits: npt.NDArray[np.float64], temperature: float) -> npt.NDArray[np.float64]:
    """Reference: the textbook formula, on logits small enough not to overflow."""
    exp = np.exp(logits / temperature)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True), dtype=np.float64)


def _constant(value: float, batch: int = 1) -> npt.NDArray[np.float32]:
    return np.full((batch, 1, 128, 128), value, dtype=np.float32)


def _set_temperature(bundle: Path, temperature: float) -> None:
    doc = read_doc(bundle)
    doc["calibration"]["temperature"] = temperature
    write_doc(bundle, doc)


def test_loads_and_describes_the_model(tiny_bundle: Path, fitted_profile: InputProfile) -> None:
    classifier = Classifier(tiny_bundle)
    assert classifier.ref.to_json() == {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "sha256": sha256_file(tiny_bundle / "model.onnx"),
        "manifest_sha256": sha256_file(tiny_bundle / "manifest.json"),
    }
    assert classifier.profile.limit == pytest.approx(fitted_profile.limit)
    np.testing.assert_array_equal(classifier.profile.components, fitted_profile.components)


def test_prediction_on_a_phantom_matches_a_direct_computation(tiny_bundle: Path) -> None:
    classifier = Classifier(tiny_bundle)
    spec = classifier.manifest.preprocessing
    tensor = to_tensor(to_unit_image(phantom_image(3), spec), spec)
    prediction = classifier.predict(tensor)

    expected = _softmax(expected_logits(tensor), TEMPERATURE)[0]
    assert set(prediction.probabilities) == {"normal", "abnormal"}
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert prediction.probabilities["normal"] == pytest.approx(expected[0], abs=1e-5)
    assert prediction.probabilities["abnormal"] == pytest.approx(expected[1], abs=1e-5)
    assert prediction.score == prediction.probabilities["abnormal"]


@pytest.mark.parametrize("value", [-2.0, -0.5, 0.0, 0.4, 3.0])
def test_probabilities_sum_to_one_and_follow_the_graph(tiny_bundle: Path, value: float) -> None:
    classifier = Classifier(tiny_bundle)
    prediction = classifier.predict(_constant(value))
    expected = _softmax(expected_logits(_constant(value)), TEMPERATURE)[0]
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert [prediction.probabilities[k] for k in ("normal", "abnormal")] == pytest.approx(
        list(expected), abs=1e-5
    )


def test_higher_temperature_moves_probabilities_towards_one_half(tiny_bundle: Path) -> None:
    tensor = _constant(2.0)  # logits [-2.75, 2.75]: confidently "abnormal" at T = 1
    scores = {}
    for temperature in (0.5, 1.0, 3.0, 10.0):
        _set_temperature(tiny_bundle, temperature)
        score = Classifier(tiny_bundle).predict(tensor).score
        assert score == pytest.approx(
            _softmax(expected_logits(tensor), temperature)[0, 1], abs=1e-5
        )
        scores[temperature] = score
    distances = [abs(scores[t] - 0.5) for t in (0.5, 1.0, 3.0, 10.0)]
    assert distances == sorted(distances, reverse=True)
    assert distances[0] > distances[-1] + 0.3
    assert all(s > 0.5 for s in scores.values())  # temperature never flips the decision side


def test_score_is_the_positive_labels_probability(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["positive_label"] = "normal"
    write_doc(tiny_bundle, doc)
    prediction = Classifier(tiny_bundle).predict(_constant(1.0))
    assert prediction.score == prediction.probabilities["normal"]
    assert prediction.score < 0.5  # this input leans "abnormal" (see conftest WEIGHTS)


def test_labels_follow_the_manifest_order(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["labels"] = ["abnormal", "normal"]  # output 0 now means "abnormal"
    write_doc(tiny_bundle, doc)
    prediction = Classifier(tiny_bundle).predict(_constant(1.0))
    expected = _softmax(expected_logits(_constant(1.0)), TEMPERATURE)[0]
    assert prediction.probabilities["abnormal"] == pytest.approx(expected[0], abs=1e-5)
    assert prediction.score == prediction.probabilities["abnormal"]


def test_batch_logits_match_the_graph(tiny_bundle: Path) -> None:
    rng = np.random.default_rng(5)
    batch = rng.normal(0.0, 1.0, size=(3, 1, 128, 128)).astype(np.float32)
    batch += np.array([-1.0, 0.0, 2.0], dtype=np.float32)[:, None, None, None]
    logits = Classifier(tiny_bundle).logits(batch)
    assert logits.shape == (3, 2)
    np.testing.assert_allclose(logits, expected_logits(batch), atol=1e-5)


def test_input_name_mismatch_is_refused(tiny_bundle: Path) -> None:
    onnx_path = tiny_bundle / "model.onnx"
    onnx.save(tiny_onnx_model(input_name="pixels"), str(onnx_path))
    doc = read_doc(tiny_bundle)
    doc["sha256"] = sha256_file(onnx_path)  # an honest manifest for a model it misdescribes
    write_doc(tiny_bundle, doc)
    with pytest.raises(ModelError, match="pixels") as caught:
        Classifier(tiny_bundle)
    assert "\n" not in str(caught.value)


def test_tampered_model_is_refused_before_loading(tiny_bundle: Path) -> None:
    onnx_path = tiny_bundle / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError):
        Classifier(tiny_bundle)


def test_unloadable_onnx_with_matching_hash_is_a_model_error(tiny_bundle: Path) -> None:
    onnx_path = tiny_bundle / "model.onnx"
    onnx_path.write_bytes(b"this is not an ONNX protobuf")
    doc = read_doc(tiny_bundle)
    doc["sha256"] = sha256_file(onnx_path)
    write_doc(tiny_bundle, doc)
    with pytest.raises(ModelError, match="cannot load") as caught:
        Classifier(tiny_bundle)
    assert "\n" not in str(caught.value)


def test_softmax_with_temperature_is_stable_for_huge_logits() -> None:
    probs = softmax_with_temperature(np.array([[1000.0, -1000.0], [-800.0, 800.0]]), 0.5)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.0, 1.0]], atol=1e-12)


def test_softmax_with_temperature_matches_the_formula() -> None:
    logits = np.random.default_rng(1).normal(0.0, 3.0, size=(50, 3))
    for temperature in (0.3, 1.0, 4.0):
        np.testing.assert_allclose(
            softmax_with_temperature(logits, temperature), _softmax(logits, temperature), rtol=1e-12
        )


def test_preprocessing_spec_used_by_the_classifier_is_the_manifests(tiny_bundle: Path) -> None:
    assert Classifier(tiny_bundle).manifest.preprocessing == PreprocessSpec()
