"""The model bundle: manifest and integrity check, preprocessing, ONNX Runtime session."""

from triage_app.model.classifier import Classifier, Prediction
from triage_app.model.manifest import ModelManifest, Thresholds, find_bundle, load_manifest
from triage_app.model.preprocess import PreprocessSpec, to_tensor, to_unit_image

__all__ = [
    "Classifier",
    "ModelManifest",
    "Prediction",
    "PreprocessSpec",
    "Thresholds",
    "find_bundle",
    "load_manifest",
    "to_tensor",
    "to_unit_image",
]
