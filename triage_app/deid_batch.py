"""Many files through the de-identification engine into a folder: ``triage-app deidentify``.

Header-level work only: pixel bytes are copied as they are (unless a pixel-clean rule applies),
so the cost per file is parsing and writing. Workers are *forked* here, unlike the triage
workers (``batch``): this parent has loaded no model session and started no threads, and a fork
saves each worker re-importing pydicom (a quarter of a second, more than the work on a few
hundred small files). Workers write their output files; the parent is the one writer to the
case store, where the pseudonym links stay.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triage_app.config import Settings
from triage_app.dicom.deidentify import DeidConfig, Deidentifier
from triage_app.dicom.deidentify.configure import deid_config
from triage_app.dicom.deidentify.files import deidentify_file, write_atomically
from triage_app.errors import (
    ConfigError,
    InputError,
    ProcessingFailedError,
    describe_unexpected,
)
from triage_app.inputs import expand_inputs, file_sha256
from triage_app.ordered_pool import WORKER_CRASHED, ordered_map
from triage_app.results import FailedInput
from triage_app.secrets import load_or_create_site_secret
from triage_app.store import CaseStore

log = logging.getLogger(__name__)

_worker: tuple[Deidentifier, Path] | None = None
LINK_BATCH = 512


@dataclass(frozen=True)
class DeidentifiedOutput:
    """One input written de-identified under the output folder."""

    path: str
    output: str  # relative to the output folder; neutral (no source name or folder)
    deidentification: dict[str, Any]
    timings_ms: dict[str, float]
    links: tuple[tuple[str, str, str], ...]

    ok: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": True,
            "output": self.output,
            "deidentification": self.deidentification,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


DeidOutcome = DeidentifiedOutput | FailedInput


def _init(secret: bytes, config: DeidConfig, destination: Path) -> None:
    global _worker
    _worker = (Deidentifier(secret, config), destination)


def _one(path: Path) -> DeidOutcome:
    assert _worker is not None, "worker used before initialisation"
    deid, destination = _worker
    started = time.perf_counter()
    try:
        result = deidentify_file(path, deid)
    except InputError as err:
        return FailedInput(os.fspath(path), err.code, err.message, file_sha256(path))
    except Exception as exc:  # noqa: BLE001 - one file's failure never stops a batch
        failed = ProcessingFailedError(f"de-identification failed: {describe_unexpected(exc)}")
        log.error("de-identification failed on one input: %s", describe_unexpected(exc))
        return FailedInput(os.fspath(path), failed.code, failed.message, file_sha256(path))
    relative = result.relative_path
    try:
        write_atomically(result.data, destination / relative)
    except OSError as err:
        message = f"cannot write output ({err.strerror})"
        return FailedInput(os.fspath(path), "write_failed", message, file_sha256(path))
    return DeidentifiedOutput(
        path=os.fspath(path),
        output=relative.as_posix(),
        deidentification=result.report.to_json(),
        timings_ms={"deidentify": (time.perf_counter() - started) * 1e3},
        links=result.report.links,
    )


def deidentify_sources(
    sources: Sequence[Path], destination: Path, settings: Settings
) -> Iterator[DeidOutcome]:
    """What ``triage-app deidentify`` runs: files and folders into ``destination``.

    The destination is checked before anything starts, and files already inside it (a second
    run into the same folder) are never taken as inputs.
    """
    destination = destination.absolute()
    if destination.exists() and not destination.is_dir():
        raise ConfigError(f"{destination}: the destination must be a folder")
    files = [f for f in expand_inputs(sources) if destination not in f.absolute().parents]
    return deidentify_to_folder(
        files,
        destination,
        secret=load_or_create_site_secret(settings.data_dir),
        config=deid_config(settings),
        store_path=settings.case_store_path,
        workers=settings.workers,
    )


def deidentify_to_folder(
    files: Sequence[Path],
    destination: Path,
    *,
    secret: bytes,
    config: DeidConfig,
    store_path: Path,
    workers: int,
) -> Iterator[DeidOutcome]:
    """De-identify ``files`` into ``destination``; yield one outcome per file, in order."""
    workers = max(1, min(workers, len(files)))
    if workers == 1:
        _init(secret, config, destination)
        with CaseStore.open(store_path) as store:
            yield from _recorded(map(_one, files), store)
        return
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")

    def new_executor() -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init, initargs=(secret, config, destination)
        )
        # Start the workers now: the first ones fork before the case store's connection opens.
        # (A pool replaced after a crash forks with it open; the workers never touch it.)
        wait([executor.submit(_started) for _ in range(workers)])
        return executor

    outcomes = ordered_map(new_executor, _one, files, window=8 * workers, crashed=_crashed)
    first = next(outcomes, None)  # the pool exists now
    if first is None:
        return
    with CaseStore.open(store_path) as store:
        yield from _recorded(itertools.chain([first], outcomes), store)


def _started() -> None:
    """Nothing: a worker that runs it has been started and initialised."""


def _crashed(path: Path, crashes: int) -> DeidOutcome:
    message = f"the worker died {crashes} times while reading this file"
    return FailedInput(os.fspath(path), WORKER_CRASHED, message, file_sha256(path))


def _recorded(outcomes: Iterator[DeidOutcome], store: CaseStore) -> Iterator[DeidOutcome]:
    """Keep links and failures in the store, links in batches of :data:`LINK_BATCH`.

    A durable commit per file would cost more than de-identifying it; links are deterministic,
    so any lost to a crash come back when the files are de-identified again.
    """
    links: list[tuple[str, str, str]] = []
    try:
        for outcome in outcomes:
            if isinstance(outcome, DeidentifiedOutput):
                links.extend(outcome.links)
                if len(links) >= LINK_BATCH:
                    store.record_links(links)
                    links.clear()
            else:
                store.record_failure(outcome)
            yield outcome
    finally:
        store.record_links(links)
