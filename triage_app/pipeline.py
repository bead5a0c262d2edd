"""One image through the chain: read → deidentify → preprocess → infer → decide → gate.

This is the only place the steps are wired together (as MONAI Deploy's ``compose()``); the CLI,
GUI, watch service and receiver all call :meth:`TriagePipeline.run`. It never raises for a bad
input: a file that cannot be triaged comes back as a :class:`~triage_app.results.FailedInput`
with a stable error code, so one bad file never stops a batch. Recording results is the caller's
job (one writer per store; see ``batch.triage_and_record``).

The image is de-identified right after reading, before anything else sees the dataset. An
escalated case is encoded as the de-identified file it would send, and that payload passes the
independent PHI gate (``escalation.phi_gate``) and the burned-in text check first: a case that
fails either is *blocked* and stays on the device for review.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset

from triage_app.config import Settings
from triage_app.dicom import load_image
from triage_app.dicom.deidentify import (
    DeidConfig,
    DeidentificationReport,
    Deidentifier,
    ProfileOption,
)
from triage_app.dicom.deidentify.configure import deid_config
from triage_app.dicom.deidentify.files import encode
from triage_app.dicom.deidentify.pixel_data import UNVERIFIED as PIXEL_DATA_UNVERIFIED
from triage_app.dicom.pseudonym import case_id_for, pseudonymous_uid
from triage_app.errors import (
    InputError,
    InvalidDicomError,
    ProcessingFailedError,
    UnprocessableImageError,
    describe_unexpected,
)
from triage_app.escalation.envelope import Payload
from triage_app.escalation.phi_gate import IdentifyingValues, audit_payload
from triage_app.inputs import file_sha256
from triage_app.model.classifier import Classifier
from triage_app.model.manifest import find_bundle, load_manifest
from triage_app.model.preprocess import to_tensor, to_unit_image
from triage_app.policy import (
    ActiveThresholds,
    assess_scope,
    decide,
    resolve_thresholds,
)
from triage_app.results import (
    BLOCKED,
    HELD,
    CaseResult,
    EscalationRef,
    FailedInput,
    InputOutcome,
)
from triage_app.secrets import load_or_create_site_secret

log = logging.getLogger(__name__)

HELD_DETAIL = (
    "not queued: no central server configured, or its keys not known yet; kept on this device"
)
BURNED_IN_RISK = "burned_in_risk"
PHI_AUDIT = "phi_audit"
#: The image was triaged, but cannot be written as a valid DICOM payload (e.g. it has no SOP
#: Instance UID): the server could not store it as an instance, so it stays here for review.
INVALID_PAYLOAD = "invalid_payload"


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a worker process needs to build its own pipeline (plain and picklable)."""

    bundle_dir: Path
    site_secret: bytes
    ort_threads: int = 1
    thresholds: ActiveThresholds | None = None  # None: the model manifest's defaults
    deid: DeidConfig = field(default_factory=DeidConfig)

    @classmethod
    def from_settings(cls, settings: Settings) -> PipelineConfig:
        """Settle the thresholds once, here, not in every worker.

        Only the manifest is read: the files are hash-checked where the model is loaded (or,
        with several workers, once before they start; see ``batch``).
        """
        bundle_dir = find_bundle(settings.model_name, settings.model_dir)
        manifest = load_manifest(bundle_dir)
        return cls(
            bundle_dir=bundle_dir,
            site_secret=load_or_create_site_secret(settings.data_dir),
            ort_threads=settings.ort_threads_per_worker,
            thresholds=resolve_thresholds(
                manifest,
                settings.thresholds_model,
                settings.normal_below,
                settings.abnormal_at_or_above,
            ),
            deid=deid_config(settings),
        )


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = (time.perf_counter() - started) * 1e3


class TriagePipeline:
    def __init__(self, config: PipelineConfig) -> None:
        self.classifier = Classifier(config.bundle_dir, threads=config.ort_threads)
        manifest = self.classifier.manifest
        self.thresholds = config.thresholds or ActiveThresholds(manifest.thresholds, "manifest")
        self._secret = config.site_secret
        self.deidentifier = Deidentifier(config.site_secret, config.deid)

    def run(self, source: str | os.PathLike[str]) -> InputOutcome:
        path = os.fspath(source)
        try:
            return self._run(path)
        except InputError as err:
            return FailedInput(path, err.code, err.message, file_sha256(path))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - one file's failure never stops a batch
            # BaseException too: a native decoder's panic (pyo3's PanicException) is one.
            where = describe_unexpected(exc)
            log.error("triage failed on one input: %s", where)
            failed = ProcessingFailedError(f"triage failed on this file: {where}")
            return FailedInput(path, failed.code, failed.message, file_sha256(path))

    def _run(self, path: str) -> CaseResult:
        manifest = self.classifier.manifest
        timings: dict[str, float] = {}
        with _timed(timings, "read"):
            image = load_image(path)
        with _timed(timings, "deidentify"):
            retain_uids = ProfileOption.RETAIN_UIDS in self.deidentifier.config.options
            original = IdentifyingValues.capture(image.dataset, uids_remapped=not retain_uids)
            report = self.deidentifier.deidentify(image.dataset)
            case_id = self._case_id(report, image.stored)
        with _timed(timings, "preprocess"):
            try:
                unit = to_unit_image(image, manifest.preprocessing)
                tensor = to_tensor(unit, manifest.preprocessing)
            except (cv2.error, ValueError, FloatingPointError) as exc:
                # The reader vouched for the pixels; anything left is this image's, not the batch's.
                raise UnprocessableImageError(
                    f"image cannot be prepared for the model: {exc}"
                ) from exc
        with _timed(timings, "infer"):
            prediction = self.classifier.predict(tensor)
        with _timed(timings, "decide"):
            scope = assess_scope(image.info, unit, manifest.intended_use, self.classifier.profile)
            decision = decide(prediction.score, self.thresholds.thresholds, scope)
        result = CaseResult(
            path=path,
            case_id=case_id,
            decision=decision.decision,
            reason=decision.reason,
            score=prediction.score,
            probabilities=prediction.probabilities,
            model=self.classifier.ref,
            thresholds=self.thresholds.to_json(),
            scope=scope.to_json(),
            image=image.info.to_json(),
            timings_ms=timings,
            deidentification=report.to_json(),
            links=report.links,
        )
        if not decision.is_escalation:
            return result
        with _timed(timings, "gate"):
            escalation, payload = self._escalation(result, report, original, image.dataset)
        return replace(result, escalation=escalation, payload=payload)

    def _case_id(self, report: DeidentificationReport, stored: np.ndarray) -> str:
        """From the de-identified instance UID; for the rare file without one, its pixels."""
        if report.sop_instance_uid:
            return case_id_for(report.sop_instance_uid)
        digest = hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest()
        return case_id_for(pseudonymous_uid(self._secret, "pixels:" + digest))

    def _escalation(
        self,
        result: CaseResult,
        report: DeidentificationReport,
        original: IdentifyingValues,
        dataset: Dataset,
    ) -> tuple[EscalationRef, bytes | None]:
        """Where an escalated case goes: held for sending (with its payload), or blocked."""
        if report.burned_in_risk:
            reasons = ", ".join(report.burned_in_reasons)
            what = (
                "has pixel data that cannot be checked for hidden identifiers"
                if report.burned_in_reasons == (PIXEL_DATA_UNVERIFIED,)
                else "may carry burned-in identifiers"
            )
            return EscalationRef(
                state=BLOCKED,
                reason=BURNED_IN_RISK,
                detail=f"{what} ({reasons}); no pixel-clean rule covers it: kept on this device "
                "for review",
            ), None
        try:
            payload = encode(dataset)
        except InvalidDicomError as err:
            # The code and the type only: pydicom's text can quote a header value (PHI).
            log.warning(
                "case %s cannot be escalated: %s (%s)",
                result.case_id,
                err.code,
                type(err.__cause__ or err).__name__,
            )
            return EscalationRef(
                state=BLOCKED,
                reason=INVALID_PAYLOAD,
                detail=f"{err.message}: kept on this device for review",
            ), None
        sidecar = json.dumps(result.payload_json(), sort_keys=True).encode()
        hits = audit_payload(payload, sidecar, original)
        if hits:
            log.error("PHI gate blocked case %s: %s found in the payload", result.case_id, hits)
            return EscalationRef(
                state=BLOCKED,
                reason=PHI_AUDIT,
                detail=f"identifying values found in the payload ({', '.join(hits)}): "
                "kept on this device for review",
            ), None
        framed = Payload(result_json=sidecar, dicom=payload).to_bytes()
        return EscalationRef(
            state=HELD, payload_sha256=hashlib.sha256(framed).hexdigest(), detail=HELD_DETAIL
        ), framed
