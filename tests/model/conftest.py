"""A complete, valid model bundle built from scratch, independent of the shipped model.

The ONNX graph is tiny and fully known: ``logits = mean(image) * WEIGHTS + BIAS`` (global
average pool → flatten → matmul → add), so a test can compute the expected output itself. The
input profile is fitted on phantoms rendered and read exactly as the product reads a file, and
the manifest has the layout ``models/training/train.py`` writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from triage_app.dicom import DicomImage, load_image
from triage_app.model.input_profile import InputProfile
from triage_app.model.manifest import FORMAT_VERSION, MANIFEST_NAME, sha256_file
from triage_app.model.preprocess import PreprocessSpec, to_unit_image
from triage_app.synthetic import Phantom, PhantomConfig, phantom_to_dataset, render_phantom

SMALL = PhantomConfig(size_range=(160, 256))
PHANTOM_SEED = 4242
FIT_COUNT = 60  # phantoms the tiny bundle's input profile is fitted on
HELD_OUT = range(FIT_COUNT, FIT_COUNT + 10)  # phantoms it has never seen
PROFILE_COMPONENTS = 8  # few components for few images: 24 would overfit 60 images
SIDE = 128

# logits = mean(tensor) * WEIGHTS + BIAS; a bright image (positive mean) leans "abnormal".
WEIGHTS = np.array([[-1.5, 1.5]], dtype=np.float32)
BIAS = np.array([0.25, -0.25], dtype=np.float32)
TEMPERATURE = 1.7
NORMAL_BELOW = 0.2
ABNORMAL_AT_OR_ABOVE = 0.8
MODEL_NAME = "tiny-test-model"
MODEL_VERSION = "0.0.1"

FloatArray = npt.NDArray[np.float32]


def dicom_bytes(phantom: Phantom) -> bytes:
    buffer = io.BytesIO()
    phantom_to_dataset(phantom).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def phantom_image(index: int, seed: int = PHANTOM_SEED) -> DicomImage:
    """Phantom ``index`` written as a DICOM file and read back as the product reads it."""
    return load_image(dicom_bytes(render_phantom(seed, index, SMALL)))


def tiny_onnx_model(input_name: str = "image") -> onnx.ModelProto:
    """image [N,1,128,128] → GlobalAveragePool → Flatten → MatMul → Add → logits [N,2]."""
    nodes = [
        helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weights"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            numpy_helper.from_array(WEIGHTS, "weights"),
            numpy_helper.from_array(BIAS, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the IR version of opset 17; any ONNX Runtime of the era loads it
    onnx.checker.check_model(model)
    return model


def expected_logits(tensor: FloatArray) -> npt.NDArray[np.float64]:
    """What the tiny graph computes, done independently in numpy (float64)."""
    means = tensor.astype(np.float64).reshape(len(tensor), -1).mean(axis=1)
    logits = means[:, None] * WEIGHTS.astype(np.float64) + BIAS.astype(np.float64)
    return np.asarray(logits, dtype=np.float64)


def manifest_doc(bundle: Path, spec: PreprocessSpec) -> dict[str, Any]:
    """The manifest as ``models/training/train.py`` ``build()`` writes it."""
    return {
        "format_version": FORMAT_VERSION,
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "created": "2024-01-01T00:00:00Z",
        "file": "model.onnx",
        "sha256": sha256_file(bundle / "model.onnx"),
        "precision": "fp32",
        "input": {"name": "image", "shape": [1, 1, spec.rows, spec.columns], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits, one per label"},
        "preprocessing": spec.to_json(),
        "labels": ["normal", "abnormal"],
        "positive_label": "abnormal",
        "calibration": {
            "method": "temperature",
            "temperature": TEMPERATURE,
            "fitted_on": "test fixture",
        },
        "thresholds": {
            "normal_below": NORMAL_BELOW,
            "abnormal_at_or_above": ABNORMAL_AT_OR_ABOVE,
            "chosen_on": "test fixture",
        },
        "intended_use": {
            "modalities": ["DX", "CR"],
            "body_parts": ["CHEST"],
            "photometric": ["MONOCHROME1", "MONOCHROME2"],
            "allow_missing_body_part": True,
            "description": "test fixture, not for clinical use",
        },
        "input_profile": {
            "file": "input_profile.npz",
            "sha256": sha256_file(bundle / "input_profile.npz"),
            "method": f"PCA reconstruction error, {PROFILE_COMPONENTS} components",
        },
        "quantization": None,
        "reference_fp32": None,
        "training": None,
        "evaluation": None,
    }


def read_doc(bundle: Path) -> dict[str, Any]:
    doc = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def write_doc(bundle: Path, doc: dict[str, Any]) -> None:
    (bundle / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def lossless_re_encodings(phantom: Phantom) -> dict[str, DicomImage]:
    """The phantom's pixel values in three lossless encodings, read back as the product reads them.

    ``as_written``: the generator's 12-16 bit unsigned file. ``shifted_16_bit``: the same values
    shifted into 16 bits stored, Rescale Slope divided to match (identical modality values).
    ``float_pixels``: Float Pixel Data holding the stored values, same rescale.
    """
    written = phantom_to_dataset(phantom)
    shift = 16 - int(written.BitsStored)
    values = phantom.stored.astype(np.int64)
    shifted = phantom_to_dataset(phantom)
    shifted.BitsStored, shifted.HighBit = 16, 15
    shifted.RescaleSlope = float(written.RescaleSlope) / 2**shift
    shifted.PixelData = (values << shift).astype("<u2").tobytes()
    floats = phantom_to_dataset(phantom)
    del floats.PixelData, floats.BitsStored, floats.HighBit, floats.PixelRepresentation
    floats.BitsAllocated = 32
    floats.FloatPixelData = values.astype("<f4").tobytes()
    encoded = {"as_written": written, "shifted_16_bit": shifted, "float_pixels": floats}
    images = {}
    for name, ds in encoded.items():
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        images[name] = load_image(buffer.getvalue())
    return images


@pytest.fixture(scope="session")
def phantom_units() -> FloatArray:
    """Unit images of phantoms 0 .. FIT_COUNT + 9 (the last ten are held out of the profile)."""
    spec = PreprocessSpec()
    return np.stack([to_unit_image(phantom_image(i), spec) for i in range(HELD_OUT.stop)])


@pytest.fixture(scope="session")
def fitted_profile(phantom_units: FloatArray) -> InputProfile:
    return InputProfile.fit(phantom_units[:FIT_COUNT], components=PROFILE_COMPONENTS)


@pytest.fixture
def tiny_bundle(tmp_path: Path, fitted_profile: InputProfile) -> Path:
    """A valid bundle directory: model.onnx, input_profile.npz and manifest.json."""
    bundle = tmp_path / "tiny-bundle"
    bundle.mkdir()
    onnx.save(tiny_onnx_model(), str(bundle / "model.onnx"))
    fitted_profile.save(bundle / "input_profile.npz")
    write_doc(bundle, manifest_doc(bundle, PreprocessSpec()))
    return bundle
