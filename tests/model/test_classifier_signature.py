"""A bundle whose manifest misdescribes its model's input or output is refused when it loads.

Loaded anyway, such a bundle would fail every image as ``processing_failed``; refused, the app
does not start (``ModelError``, exit 2) and says what does not match, in one line.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tests.model.conftest import read_doc, tiny_onnx_model, write_doc
from triage_app.errors import ModelError
from triage_app.model import Classifier
from triage_app.model.manifest import sha256_file


def _replace_model(bundle: Path, model: onnx.ModelProto) -> None:
    """Put ``model`` in the bundle with an honest hash: only the description is wrong."""
    onnx.checker.check_model(model)
    onnx_path = bundle / "model.onnx"
    onnx.save(model, str(onnx_path))
    doc = read_doc(bundle)
    doc["sha256"] = sha256_file(onnx_path)
    write_doc(bundle, doc)


def _refused(bundle: Path, match: str) -> None:
    with pytest.raises(ModelError, match=match) as caught:
        Classifier(bundle)
    assert "\n" not in str(caught.value)


def test_more_labels_than_the_model_has_outputs_is_refused(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["labels"] = ["normal", "abnormal", "other"]
    write_doc(tiny_bundle, doc)
    _refused(tiny_bundle, r"output has shape \[1, 2\].*3 labels")


def test_an_image_size_the_model_does_not_take_is_refused(tiny_bundle: Path) -> None:
    doc = read_doc(tiny_bundle)
    doc["preprocessing"]["size"] = [64, 64]
    doc["input"]["shape"] = [1, 1, 64, 64]  # consistent with itself, not with the model
    write_doc(tiny_bundle, doc)
    _refused(tiny_bundle, r"input has shape \['N', 1, 128, 128\].*\[1, 1, 64, 64\]")


def test_an_input_type_other_than_float32_is_refused(tiny_bundle: Path) -> None:
    model = tiny_onnx_model(input_name="raw")
    graph = model.graph
    graph.node.insert(0, helper.make_node("Cast", ["image"], ["raw"], to=TensorProto.FLOAT))
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info("image", TensorProto.DOUBLE, ["N", 1, 128, 128])
    )
    _replace_model(tiny_bundle, model)
    _refused(tiny_bundle, r"tensor\(double\)")


def test_a_model_that_cannot_run_on_the_manifests_size_is_refused(tiny_bundle: Path) -> None:
    """Its input declares any height and width, but its graph needs 128 x 128."""
    model = tiny_onnx_model(input_name="fixed")
    graph = model.graph
    shape = helper.make_tensor("fixed_shape", TensorProto.INT64, [4], [-1, 1, 128, 128])
    graph.initializer.append(shape)
    graph.node.insert(0, helper.make_node("Reshape", ["image", "fixed_shape"], ["fixed"]))
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])
    )
    _replace_model(tiny_bundle, model)
    doc = read_doc(tiny_bundle)
    doc["preprocessing"]["size"] = [64, 64]
    doc["input"]["shape"] = [1, 1, 64, 64]
    write_doc(tiny_bundle, doc)
    _refused(tiny_bundle, r"cannot run on a \[1, 1, 64, 64\] input")
