"""The shipped central model: the bundle the central server loads, checked with the app's own code.

The central diagnostic server runs a larger FP32 model on the cases edge devices escalate. These
tests load ``models/central-dx-demo`` exactly as the app loads a model (manifest, hash checks, ONNX
Runtime session), check that it is what its manifest says (FP32, a larger input than the edge
model), and run it on phantoms it has never seen through the app's own reader and preprocessing.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

from models.training.calibrate import auroc
from models.training.data import RUNS_DIR
from models.training.net import CentralNet, EdgeNet
from models.training.train import CENTRAL, EDGE, TARGETS, TRAIN_SEED, Plan, build
from triage_app.dicom import load_image
from triage_app.model.classifier import Classifier
from triage_app.model.manifest import find_bundle, load_manifest, sha256_file
from triage_app.model.preprocess import PreprocessSpec, to_tensor, to_unit_image
from triage_app.synthetic import phantom_to_dataset, render_phantom

CENTRAL_NAME = "central-dx-demo"
EDGE_NAME = "chest-dx-demo"
# Never used to train, calibrate or evaluate either model (1001, 1002, 4242) nor for samples (7777).
PHANTOM_SEED = 6161
PHANTOM_COUNT = 48
MIN_AUROC = 0.85  # chance is 0.5; the model scores ~0.99 on 4,000 unseen phantoms
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}


@pytest.fixture(scope="module")
def central() -> Classifier:
    return Classifier(find_bundle(CENTRAL_NAME), threads=1)


def test_the_bundle_loads_through_the_app_loader_and_matches_its_hashes(central):
    manifest = central.manifest
    bundle = central.bundle_dir
    assert manifest.name == CENTRAL_NAME
    assert sha256_file(bundle / manifest.onnx_file) == manifest.sha256
    assert sha256_file(bundle / manifest.profile_file) == manifest.profile_sha256
    assert manifest.raw["precision"] == "fp32"
    assert manifest.raw["reference_fp32"] is None  # nothing was quantized, so no reference copy
    assert manifest.raw["role"].startswith("central")
    assert manifest.labels == ("normal", "abnormal")
    assert 0 <= manifest.thresholds.normal_below <= manifest.thresholds.abnormal_at_or_above <= 1
    assert "Not for clinical use" in (bundle / "MODEL_CARD.md").read_text(encoding="utf-8")


def test_the_input_is_larger_than_the_edge_models_and_the_graph_agrees(central):
    edge = load_manifest(find_bundle(EDGE_NAME))
    rows, columns = central.manifest.input_shape[2:]
    assert rows > edge.input_shape[2] and columns > edge.input_shape[3]
    spec = central.manifest.preprocessing
    assert (spec.rows, spec.columns) == (rows, columns)
    graph = onnx.load(str(central.bundle_dir / central.manifest.onnx_file)).graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, rows, columns]


def test_it_is_trained_with_the_edge_models_preprocessing(central):
    """1.0.x equalised on 65,536 levels and resized the stored integers: the same pixels
    stored another way changed 4 of 200 verdicts. 1.1.0 is trained on 256 levels and float32
    resizing, as the edge model is, and says so in its manifest, not through a default."""
    block = central.manifest.raw["preprocessing"]
    assert (block["clahe"]["levels"], block["resize_dtype"]) == (256, "float32")
    edge = load_manifest(find_bundle(EDGE_NAME)).preprocessing
    spec = central.manifest.preprocessing
    assert (spec.clahe_levels, spec.resize_dtype) == (edge.clahe_levels, edge.resize_dtype)


def test_the_graph_is_plain_fp32(central):
    model = onnx.load(str(central.bundle_dir / central.manifest.onnx_file))
    assert not {node.op_type for node in model.graph.node} & QUANTIZED_OPS
    assert {init.data_type for init in model.graph.initializer} == {onnx.TensorProto.FLOAT}


def test_it_tells_abnormal_from_normal_phantoms_it_has_never_seen(central):
    spec = central.manifest.preprocessing
    scores, labels = [], []
    for index in range(PHANTOM_COUNT):
        phantom = render_phantom(PHANTOM_SEED, index)
        buffer = io.BytesIO()
        phantom_to_dataset(phantom).save_as(buffer, enforce_file_format=True)
        image = load_image(buffer.getvalue())
        tensor = to_tensor(to_unit_image(image, spec), spec)
        assert tensor.shape == (1, 1, spec.rows, spec.columns)
        scores.append(central.predict(tensor).score)
        labels.append(int(phantom.is_abnormal))
    score_array, label_array = np.array(scores), np.array(labels)
    assert 8 <= label_array.sum() <= PHANTOM_COUNT - 8  # both classes well represented
    assert auroc(score_array, label_array) >= MIN_AUROC
    assert score_array[label_array == 1].mean() > score_array[label_array == 0].mean() + 0.3


def test_the_default_target_is_still_the_edge_model():
    plan = Plan(1, 1, 1, 1, RUNS_DIR / "unused", "0")
    assert plan.target is EDGE and plan.work_dir == EDGE.work_dir
    assert EDGE.spec() == PreprocessSpec()
    assert EDGE.quantize and EDGE.name == EDGE_NAME
    edge_net, central_net = EDGE.make_net(), CENTRAL.make_net()
    assert type(edge_net) is EdgeNet
    assert isinstance(central_net, CentralNet)
    edge_params = sum(p.numel() for p in edge_net.parameters())
    central_params = sum(p.numel() for p in central_net.parameters())
    assert edge_params == 291_506  # the shipped edge architecture, unchanged
    assert central_params > 2 * edge_params
    assert set(TARGETS) == {"edge", "central"} and TARGETS["central"] is CENTRAL
    assert CENTRAL.spec().rows > EDGE.spec().rows and not CENTRAL.quantize


def test_a_tiny_central_training_run_writes_an_fp32_bundle_the_app_accepts(tmp_path):
    out = tmp_path / "bundle"
    plan = Plan(
        train_count=128,
        calibration_count=64,
        epochs=1,
        batch=32,
        out_dir=out,
        version="0.0.0-test",
        work_dir=tmp_path / "work",
        cache=False,
        target=CENTRAL,
    )
    manifest = build(plan)

    assert {p.name for p in out.iterdir()} == {
        "model.onnx",
        "manifest.json",
        "input_profile.npz",
        "MODEL_CARD.md",
    }
    assert manifest["precision"] == "fp32" and manifest["quantization"] is None
    assert manifest["training"]["data"].startswith(f"synthetic phantoms, seed {TRAIN_SEED}")
    classifier = Classifier(out)
    assert classifier.manifest.key == f"{CENTRAL_NAME}@0.0.0-test"
    assert classifier.manifest.input_shape == (1, 1, CENTRAL.side, CENTRAL.side)
    spec = classifier.manifest.preprocessing
    prediction = classifier.predict(np.zeros((1, 1, spec.rows, spec.columns), np.float32))
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-6
