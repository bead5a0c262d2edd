"""Many inputs through the pipeline, on every core, results back in input order.

Worker processes (not threads) each load their own model session: on a 2-core box two
single-threaded processes reached 0.73–0.98 of the 2-core bound where one process with two
threads reached 0.38–0.61 (DESIGN §7). Workers only compute; the calling process is the single
writer to the case store. Processes are *spawned*, never forked, so no ONNX Runtime or SQLite
state is ever copied into a child.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2

from triage_app.model.manifest import verify_bundle
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import InputOutcome

_worker_pipeline: TriagePipeline | None = None


def expand_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders recursively in sorted order, skipping hidden entries.

    A path that does not exist is kept, so it is reported as unreadable instead of vanishing.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            found.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def _init_worker(config: PipelineConfig, log_level: int) -> None:
    """Set up one worker: the parent's logging, one OpenCV thread, its own model session.

    OpenCV starts a thread per core by default; with one worker per core that oversubscribes the
    CPU, so each worker computes single-threaded and the workers are the parallelism.
    """
    global _worker_pipeline
    cv2.setNumThreads(1)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its value checks quote PHI
    _worker_pipeline = TriagePipeline(config)


def _run_in_worker(path: Path) -> InputOutcome:
    assert _worker_pipeline is not None, "worker used before initialisation"
    return _worker_pipeline.run(path)


def triage_files(
    files: Sequence[Path],
    config: PipelineConfig,
    *,
    workers: int,
    pipeline: TriagePipeline | None = None,
) -> Iterator[InputOutcome]:
    """Yield one outcome per file, in order. One file (or one worker) runs in this process."""
    workers = max(1, min(workers, len(files)))
    if workers == 1:
        local = pipeline or TriagePipeline(config)
        yield from (local.run(path) for path in files)
        return
    verify_bundle(config.bundle_dir)  # fail here, clearly, rather than inside every worker
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with context.Pool(workers, initializer=_init_worker, initargs=(config, level)) as pool:
        yield from pool.imap(_run_in_worker, files, chunksize=4)
