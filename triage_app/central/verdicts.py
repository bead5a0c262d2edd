"""The central model: a verdict for each stored case, computed off the request path.

Why a worker thread with a queue: a device's POST must be answered as soon as the case is stored
(its receipt is what lets the device delete its copy), and the model may be much slower than the
transfer. The worker is fed new cases by the API and, on start, every stored case that has no
verdict yet, so a restart never loses one. It reuses the app's own model loading (hash-checked
bundle, ONNX Runtime session) and preprocessing, so the central model sees images exactly as its
training code prepared them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2

from triage_app.central.storage import CentralStore, Verdict, VerdictFailure, utc_now_text
from triage_app.dicom import load_image
from triage_app.errors import (
    CorruptPixelDataError,
    EmptyFileError,
    InputError,
    InvalidDicomError,
    ModelError,
    NoPixelDataError,
    NotDicomError,
    StoreError,
    TruncatedError,
    UnprocessableImageError,
    UnreadableFileError,
    UnsupportedPhotometricError,
    UnsupportedTransferSyntaxError,
)
from triage_app.model.classifier import Classifier
from triage_app.model.preprocess import to_tensor, to_unit_image
from triage_app.policy import OUT_OF_SCOPE, assess_scope
from triage_app.results import ModelRef

log = logging.getLogger(__name__)

__all__ = ["CentralModel", "Verdict", "VerdictWorker", "failure_message"]

#: What the device is told (and shows clinicians) when the central model cannot read a case: a
#: fixed text per code. The error's own message may carry a decoder's or OpenCV's text, which
#: is for the server's log only.
FAILURE_MESSAGES: dict[str, str] = {
    UnreadableFileError.code: "the stored image cannot be read",
    EmptyFileError.code: "the image is empty",
    NotDicomError.code: "the image is not a DICOM file",
    TruncatedError.code: "the DICOM file is cut short",
    InvalidDicomError.code: "the DICOM file is not valid",
    NoPixelDataError.code: "the DICOM file has no pixel data",
    UnsupportedTransferSyntaxError.code: "the image's transfer syntax is not supported",
    CorruptPixelDataError.code: "the image's pixel data cannot be decoded",
    UnsupportedPhotometricError.code: "the image's photometric interpretation is not supported",
    UnprocessableImageError.code: "the image cannot be prepared for the central model",
}
_OTHER_FAILURE = "the central model cannot read this image"


def failure_message(code: str) -> str:
    """The fixed message of a verdict failure's code (``FAILURE_MESSAGES``)."""
    return FAILURE_MESSAGES.get(code, _OTHER_FAILURE)


class CentralModel:
    """A verified model bundle that turns a stored DICOM into a verdict."""

    def __init__(self, bundle_dir: Path, *, threads: int = 1) -> None:
        self.classifier = Classifier(bundle_dir, threads=threads)

    @property
    def ref(self) -> ModelRef:
        return self.classifier.ref

    def decide(self, case_id: str, dicom: bytes) -> Verdict:
        """The verdict is the label with the highest calibrated probability.

        Raises an :class:`~triage_app.errors.InputError` subclass for an image the model
        cannot read or prepare.
        """
        spec = self.classifier.manifest.preprocessing
        image = load_image(dicom)
        try:
            unit = to_unit_image(image, spec)
            tensor = to_tensor(unit, spec)
        except (cv2.error, ValueError, FloatingPointError) as exc:
            raise UnprocessableImageError(f"image cannot be prepared for the model: {exc}") from exc
        prediction = self.classifier.predict(tensor)
        label = max(prediction.probabilities, key=prediction.probabilities.__getitem__)
        scope = assess_scope(
            image.info, unit, self.classifier.manifest.intended_use, self.classifier.profile
        )
        if not scope.in_scope:
            # The central model's intended use is checked as on the device: a CT slice or an
            # image unlike its training data gets no label, whatever the score says.
            label = OUT_OF_SCOPE
        return Verdict(
            case_id=case_id,
            verdict=label,
            score=prediction.score,
            probabilities=prediction.probabilities,
            model=self.ref,
            decided_at=utc_now_text(),
        )


class VerdictWorker:
    """One background thread that runs the central model on queued case ids.

    Without a model (``model is None``) it does nothing: verdicts stay pending.
    """

    def __init__(
        self,
        store: CentralStore,
        model: CentralModel | None,
        *,
        on_verdict: Callable[[Verdict], None] | None = None,
    ) -> None:
        self._store = store
        self.model = model
        self._on_verdict = on_verdict
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def model_info(self) -> dict[str, Any] | None:
        """The model's name, version and sha256 for ``/v1/health``; ``None`` without a model."""
        return None if self.model is None else self.model.ref.to_json()

    def start(self) -> None:
        """Start the thread and queue every stored case that still lacks a verdict.

        A queue and a stop flag of its own for each thread: cases a stopped thread left queued
        are among those read from the store again, and a thread that outlived its stop's
        timeout cannot take cases from the new one.
        """
        if self.model is None or self._thread is not None:
            return
        self._queue, self._stopping = queue.Queue(), threading.Event()
        pending = self._store.without_verdict()
        for case_id in pending:
            self._queue.put(case_id)
        self._thread = threading.Thread(
            target=self._run,
            args=(self._queue, self._stopping),
            name="central-verdicts",
            daemon=True,
        )
        self._thread.start()
        log.info("verdict worker started (%d stored cases pending)", len(pending))

    def alive(self) -> bool:
        """Whether verdicts are being made: the thread runs (or there is no model to run)."""
        return self.model is None or (self._thread is not None and self._thread.is_alive())

    def submit(self, case_id: str) -> None:
        """Queue a newly stored case (ignored without a model)."""
        if self.model is not None:
            self._queue.put(case_id)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every queued case is decided; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the case in hand, then stop; cases still queued are resumed on next start.

        Why a flag rather than only a marker at the end of the queue: the marker would wait
        for the whole backlog, while the store is about to be closed.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._queue.put(None)  # wakes a thread waiting for work
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("verdict worker did not stop within %.0f s", timeout_s)

    def _run(self, cases: queue.Queue[str | None], stopping: threading.Event) -> None:
        while True:
            case_id = cases.get()
            try:
                if case_id is None or stopping.is_set():
                    return
                self._decide(case_id)
            except StoreError as err:
                log.error(
                    "case %s: verdict not stored (%s); retried on the next start", case_id, err
                )
            finally:
                cases.task_done()

    def _decide(self, case_id: str) -> None:
        model = self.model
        if model is None:
            return
        if self._store.get_verdict(case_id) is not None:
            return
        try:
            verdict = model.decide(case_id, self._store.read_dicom(case_id))
        except InputError as err:
            # The detail (reader, decoder or OpenCV text, no patient data: the image is
            # de-identified and the reader never quotes values) stays in this log.
            log.warning(
                "case %s: the central model cannot read it (%s: %s)", case_id, err.code, err
            )
            self._store.set_verdict_failure(
                VerdictFailure(case_id, err.code, failure_message(err.code), utc_now_text())
            )
            return
        except (ModelError, StoreError) as err:
            log.error("case %s: no verdict (%s); retried on the next start", case_id, err.code)
            return
        except Exception:
            # ONNX Runtime raises its own exception types; one case must not stop the worker.
            log.exception("case %s: the central model failed; retried on the next start", case_id)
            return
        self._store.set_verdict(verdict)
        if self._on_verdict is not None:
            self._on_verdict(verdict)
