"""The training script runs end to end on a tiny budget and writes a bundle the app accepts.

The shipped model takes ~20 minutes to train; this smoke run (a few hundred phantoms, one epoch)
proves the script itself — data through the app's reader and preprocessing, export, INT8 gate,
calibration, bundle — still works, so the model can always be rebuilt from the repository.
"""

from __future__ import annotations

import json

import numpy as np

from models.training.train import Plan, build
from triage_app.model.classifier import Classifier
from triage_app.model.manifest import load_manifest


def test_tiny_training_run_writes_a_loadable_bundle(tmp_path):
    out = tmp_path / "bundle"
    plan = Plan(
        train_count=160,
        calibration_count=96,
        epochs=1,
        batch=32,
        out_dir=out,
        version="0.0.0-test",
        work_dir=tmp_path / "work",
        cache=False,
    )
    manifest = build(plan)

    assert {p.name for p in out.iterdir()} >= {
        "model.onnx",
        "manifest.json",
        "input_profile.npz",
        "MODEL_CARD.md",
    }
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["quantization"]["shipped"] in {"int8", "fp32"}
    assert (
        0
        <= manifest["thresholds"]["normal_below"]
        <= manifest["thresholds"]["abnormal_at_or_above"]
        <= 1
    )
    assert load_manifest(out).key == "chest-dx-demo@0.0.0-test"
    classifier = Classifier(out)
    spec = classifier.manifest.preprocessing
    prediction = classifier.predict(np.zeros((1, 1, spec.rows, spec.columns), np.float32))
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-6
    assert "Not for clinical use" in (out / "MODEL_CARD.md").read_text()
