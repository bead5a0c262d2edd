"""A verified model bundle loaded into ONNX Runtime on the CPU.

One ``Classifier`` per process: sessions are not shared across processes (each worker loads its
own), and each uses few threads, because two single-threaded worker processes beat one process
with two threads on a 2-core box (DESIGN §7).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from triage_app.errors import ModelError
from triage_app.model.input_profile import InputProfile
from triage_app.model.manifest import ModelManifest, verify_bundle
from triage_app.results import ModelRef

logger = logging.getLogger(__name__)

# ONNX Runtime's own exceptions (InvalidProtobuf, InvalidGraph, Fail, NoSuchFile, ...) derive from
# Exception directly, not from RuntimeError or ValueError: name them all, so that a file ORT cannot
# load (or run on the manifest's input) is a one-line ModelError instead of a traceback.
_ORT_LOAD_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    *(
        cls
        for cls in vars(_ort_state).values()
        if isinstance(cls, type) and issubclass(cls, Exception)
    ),
)


@dataclass(frozen=True)
class Prediction:
    probabilities: dict[str, float]
    score: float  # calibrated probability of the positive label


def softmax_with_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True), dtype=np.float64)


class Classifier:
    """The model, its input profile and its manifest, verified and ready to run."""

    def __init__(self, bundle_dir: Path, *, threads: int = 1) -> None:
        self.bundle_dir = bundle_dir
        self.manifest: ModelManifest = verify_bundle(bundle_dir)
        self.profile = InputProfile.load(
            bundle_dir / self.manifest.profile_file, mirror_margin=self.manifest.mirror_margin
        )
        self._session = make_session(bundle_dir / self.manifest.onnx_file, threads)
        self._output_name = self._session.get_outputs()[0].name
        self._check_signature()
        # Both hashes, once per load: the log then shows which manifest (thresholds, scope,
        # calibration) a run used, not only which ONNX file.
        logger.info(
            "loaded model %s (sha256 %.12s…, manifest sha256 %.12s…)",
            self.manifest.key,
            self.manifest.sha256,
            self.manifest.manifest_sha256,
        )

    def _check_signature(self) -> None:
        """Refuse a model whose input or output the manifest misdescribes, here at start-up:
        loaded anyway, it would fail every image (``processing_failed``) instead."""
        manifest = self.manifest
        declared = self._session.get_inputs()[0]
        if declared.name != manifest.input_name:
            raise ModelError(
                f"model input is named {declared.name!r} but the manifest says "
                f"{manifest.input_name!r}"
            )
        if declared.type != "tensor(float)":
            raise ModelError(f"model input is {declared.type}, but preprocessing gives float32")
        if not _accepts(declared.shape, manifest.input_shape):
            raise ModelError(
                f"model input has shape {declared.shape}, but the manifest's input.shape is "
                f"{list(manifest.input_shape)}"
            )
        # Symbolic dimensions (and the output width) are settled by one run on a blank input of
        # the size preprocessing gives.
        spec = manifest.preprocessing
        fed = (1, 1, spec.rows, spec.columns)
        try:
            logits = self.logits(np.zeros(fed, dtype=np.float32))
        except _ORT_LOAD_ERRORS as exc:
            raise ModelError(f"model cannot run on a {list(fed)} input: {exc}") from exc
        if logits.shape != (1, len(manifest.labels)):
            raise ModelError(
                f"model output has shape {list(logits.shape)} for one image, but the manifest "
                f"has {len(manifest.labels)} labels"
            )

    @property
    def ref(self) -> ModelRef:
        manifest = self.manifest
        return ModelRef(manifest.name, manifest.version, manifest.sha256, manifest.manifest_sha256)

    def predict(self, tensor: np.ndarray) -> Prediction:
        logits = self._session.run([self._output_name], {self.manifest.input_name: tensor})[0]
        probs = softmax_with_temperature(np.asarray(logits)[0], self.manifest.temperature)
        labelled = {label: float(p) for label, p in zip(self.manifest.labels, probs, strict=True)}
        return Prediction(labelled, labelled[self.manifest.positive_label])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for a batch (evaluation and calibration tools)."""
        return np.asarray(
            self._session.run([self._output_name], {self.manifest.input_name: batch})[0]
        )


def _accepts(declared: Sequence[int | str | None], shape: tuple[int, ...]) -> bool:
    """Whether an input declared with ``declared`` (symbolic dimensions: any) takes ``shape``."""
    return len(declared) == len(shape) and all(
        not isinstance(dim, int) or dim == size for dim, size in zip(declared, shape, strict=True)
    )


def make_session(onnx_path: Path, threads: int = 1) -> ort.InferenceSession:
    """The CPU session every caller uses: full graph optimisation, sequential, few threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except _ORT_LOAD_ERRORS as exc:
        raise ModelError(f"ONNX Runtime cannot load {onnx_path.name}: {exc}") from exc
