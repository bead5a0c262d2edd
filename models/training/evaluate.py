"""Figures for the shipped bundle, on a seed never used in training or calibration.

    python -m models.training.evaluate              # ~2,000 held-out images + speed figures
    python -m models.training.evaluate --no-write   # print only; leave manifest and card alone

Prints tables and, unless ``--no-write``, stores the figures in the manifest's ``evaluation``
block and regenerates ``MODEL_CARD.md``. Speed is measured, never asserted: ratios come from the
same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from models.training.calibrate import auroc, expected_calibration_error, operating_point
from models.training.data import RUNS_DIR
from models.training.model_card import write_model_card
from triage_app.batch import triage_files
from triage_app.dicom import load_image
from triage_app.model.classifier import Classifier, make_session, softmax_with_temperature
from triage_app.model.manifest import MANIFEST_NAME, sha256_file
from triage_app.model.preprocess import to_tensor, to_unit_image
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import CaseResult
from triage_app.secrets import load_or_create_site_secret
from triage_app.synthetic import write_phantom_set

EVAL_SEED = 4242  # never used by train.py (1001, 1002) or make_samples.py (7777)
BUNDLE = Path(__file__).resolve().parents[1] / "chest-dx-demo"


def held_out_folder(count: int) -> Path:
    folder = RUNS_DIR / f"eval-{EVAL_SEED}-{count}"
    if not (folder / "labels.jsonl").exists():
        print(f"rendering {count} held-out images (seed {EVAL_SEED}) into {folder} …", flush=True)
        write_phantom_set(folder, EVAL_SEED, count, workers=2)
    return folder


def read_truth(folder: Path) -> dict[str, dict[str, Any]]:
    with (folder / "labels.jsonl").open(encoding="utf-8") as handle:
        return {r["file"]: r for r in map(json.loads, handle)}


def accuracy_figures(results: list[CaseResult], truth: dict[str, dict[str, Any]]) -> dict[str, Any]:
    labels = np.array([truth[Path(r.path).name]["label"] == "abnormal" for r in results], np.int64)
    scores = np.array([r.score for r in results])
    thresholds = results[0].thresholds
    point = operating_point(
        scores, labels, thresholds["normal_below"], thresholds["abnormal_at_or_above"]
    )
    decided = [r for r in results if r.decision != "escalate"]
    reasons: dict[str, int] = {}
    for r in results:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    local_errors = sum(
        1
        for r in decided
        if (r.decision == "abnormal") != (truth[Path(r.path).name]["label"] == "abnormal")
    )
    return {
        "n": len(results),
        "abnormal_share": round(float(labels.mean()), 4),
        "auroc": round(auroc(scores, labels), 5),
        "ece": round(expected_calibration_error(scores, labels), 5),
        "local_share": round(len(decided) / len(results), 4),
        "local_error_rate": round(local_errors / max(len(decided), 1), 5),
        "local_errors": local_errors,
        "missed_abnormal_rate": round(point.missed_abnormal_rate, 5),
        "reasons": reasons,
    }


def int8_vs_fp32(
    units: np.ndarray, labels: np.ndarray, manifest: dict[str, Any]
) -> dict[str, Any] | None:
    reference = manifest.get("reference_fp32")
    if manifest["precision"] != "int8" or not reference:
        return None
    int8 = make_session(BUNDLE / manifest["file"])
    fp32 = make_session(BUNDLE / reference["file"])
    sample = units[:1]
    for sess in (int8, fp32):
        for _ in range(30):
            sess.run(None, {"image": sample})
    t_int8: list[float] = []
    t_fp32: list[float] = []
    for i in range(600):
        x = units[i % len(units)][None]
        for sess, times in ((fp32, t_fp32), (int8, t_int8)):
            t = time.perf_counter()
            sess.run(None, {"image": x})
            times.append(time.perf_counter() - t)
    temperature = float(manifest["calibration"]["temperature"])
    thresholds = manifest["thresholds"]

    def scores(sess: ort.InferenceSession) -> np.ndarray:
        logits = np.concatenate(
            [sess.run(None, {"image": units[i : i + 64]})[0] for i in range(0, len(units), 64)]
        )
        return softmax_with_temperature(logits, temperature)[:, 1]

    s_int8, s_fp32 = scores(int8), scores(fp32)

    def decisions(s: np.ndarray) -> np.ndarray:
        return np.where(
            s < thresholds["normal_below"],
            0,
            np.where(s >= thresholds["abnormal_at_or_above"], 2, 1),
        )

    return {
        "fp32_ms_median": round(statistics.median(t_fp32) * 1e3, 4),
        "int8_ms_median": round(statistics.median(t_int8) * 1e3, 4),
        "speedup": round(statistics.median(t_fp32) / statistics.median(t_int8), 3),
        "auroc_fp32": round(auroc(s_fp32, labels), 5),
        "auroc_int8": round(auroc(s_int8, labels), 5),
        "auroc_change": round(auroc(s_int8, labels) - auroc(s_fp32, labels), 5),
        "decision_agreement": round(float((decisions(s_int8) == decisions(s_fp32)).mean()), 5),
    }


def isolated_floor(files: list[Path], bundle: Path) -> dict[str, float]:
    """Decode + preprocess + infer per image, in this process, one thread: the work itself.

    Single-threaded like a worker, so "× 2 cores" is the honest bound for two workers.
    """
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    classifier = Classifier(bundle, threads=1)
    spec = classifier.manifest.preprocessing
    read, prep, infer = [], [], []
    for path in files:
        t0 = time.perf_counter()
        image = load_image(path)
        t1 = time.perf_counter()
        tensor = to_tensor(to_unit_image(image, spec), spec)
        t2 = time.perf_counter()
        classifier.predict(tensor)
        t3 = time.perf_counter()
        read.append(t1 - t0)
        prep.append(t2 - t1)
        infer.append(t3 - t2)
    cv2.setNumThreads(threads)
    per_image = (sum(read) + sum(prep) + sum(infer)) / len(files)
    return {
        "decode_ms_mean": round(statistics.fmean(read) * 1e3, 3),
        "preprocess_ms_mean": round(statistics.fmean(prep) * 1e3, 3),
        "infer_ms_mean": round(statistics.fmean(infer) * 1e3, 3),
        "floor_images_per_s_2_cores": round(2.0 / per_image, 1),
    }


#: In the command line of every worker the "spawn" start method starts (``triage_app.batch``'s),
#: not of multiprocessing's resource tracker; fork and forkserver workers do not carry it.
SPAWNED_WORKER = b"spawn_main"


def _ppid(pid: int) -> int | None:
    """The parent of ``pid`` from ``/proc/<pid>/stat``; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid …": comm may hold spaces and parentheses, so split after the last ")".
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _descendants(root: int) -> list[int]:
    """Every live process below ``root``, at any depth (walked by PPid): a worker is found
    also when something between (a launcher, a pool's helper) started it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := _ppid(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = deque(children.get(root, []))
    while todo:
        pid = todo.popleft()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _spawned_worker_hwm_kib(pid: int) -> int | None:
    """VmHWM (peak resident set, KiB) of ``pid`` if it is a spawned worker still running."""
    try:
        if SPAWNED_WORKER not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None  # a zombie: its memory is gone, and with it the figure


class WorkerMemory:
    """Peak resident memory (VmHWM, KiB) of each spawned worker below this process, by pid.

    Not ``RUSAGE_CHILDREN``: it counts a child only once reaped, and ``triage_files`` shuts its
    pool down without waiting, so the workers are still running when the run ends (it read 0);
    and a child started by fork+exec carries into its ``ru_maxrss`` the parent's peak from before
    the exec, so even a reaped worker would report this process's memory, not its own. VmHWM is
    the worker's own high-water mark: one sample after the work, before the worker exits, is
    its peak. A background thread samples meanwhile for workers that end mid-run (a crash).
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.peaks_kib: dict[int, int] = {}
        self._root = os.getpid()
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def sample(self) -> None:
        for pid in _descendants(self._root):
            hwm = _spawned_worker_hwm_kib(pid)
            if hwm is not None:
                with self._lock:
                    self.peaks_kib[pid] = max(hwm, self.peaks_kib.get(pid, 0))


def pipeline_throughput(files: list[Path], config: PipelineConfig) -> dict[str, float]:
    """The real batch path with 2 spawned workers, recording nothing (workers only compute).

    ``worker_peak_rss_mb`` is the largest worker's peak resident memory (``WorkerMemory``),
    sampled once the last result is in and the workers have not been told to stop yet. ``main``
    runs this in a fresh child process (``--throughput-child``), so no other spawned process
    of its own is counted.
    """
    started = time.perf_counter()
    first: float | None = None
    ended: float | None = None
    count = 0
    with WorkerMemory() as memory:
        for _ in triage_files(files, config, workers=2):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count == len(files):
                ended = time.perf_counter()
                memory.sample()  # all work done, the pool not closed: every worker's peak
    assert first is not None and ended is not None, "fewer outcomes than files"
    if not memory.peaks_kib:
        raise RuntimeError("no worker process was seen: worker_peak_rss_mb would be made up")
    return {
        "images": count,
        "images_per_s_end_to_end": round(count / (ended - started), 1),
        "images_per_s_steady": round((count - 1) / (ended - first), 1),
        "worker_peak_rss_mb": round(max(memory.peaks_kib.values()) / 1024, 1),
    }


def throughput_in_child(files: list[Path], secret_dir: Path) -> dict[str, float]:
    listing = secret_dir / "files.json"
    listing.write_text(json.dumps([str(f) for f in files]), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "models.training.evaluate", "--throughput-child", str(listing)],
        check=True,
        capture_output=True,
        text=True,
    )
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def cold_start(sample: Path, runs: int = 5) -> dict[str, float]:
    """Process start to first result, as a user runs it: ``triage-app classify one.dcm``."""
    times = []
    with tempfile.TemporaryDirectory() as data_dir:
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "triage_app",
                    "classify",
                    "--data-dir",
                    data_dir,
                    str(sample),
                ],
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - t)
    return {
        "cold_start_s_median": round(statistics.median(times), 3),
        "cold_start_s_max": round(max(times), 3),
    }


def stage_timings(results: list[CaseResult]) -> dict[str, dict[str, float]]:
    stages = results[0].timings_ms.keys()
    out = {}
    for stage in stages:
        values = sorted(r.timings_ms[stage] for r in results)
        out[stage] = {
            "median_ms": round(statistics.median(values), 3),
            "p95_ms": round(values[int(0.95 * (len(values) - 1))], 3),
        }
    return out


def _table(title: str, rows: dict[str, Any]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"  {key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--throughput-count", type=int, default=500)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--throughput-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.throughput_child:
        files = [Path(f) for f in json.loads(args.throughput_child.read_text(encoding="utf-8"))]
        secret = args.throughput_child.parent / "secret"
        config = PipelineConfig(BUNDLE, load_or_create_site_secret(secret))
        print(json.dumps(pipeline_throughput(files, config)))
        return 0

    folder = held_out_folder(args.count)
    truth = read_truth(folder)
    files = sorted(folder.glob("*.dcm"))
    with tempfile.TemporaryDirectory() as data_dir:
        config = PipelineConfig(BUNDLE, load_or_create_site_secret(Path(data_dir)))
        pipeline = TriagePipeline(config)
        results = [r for r in map(pipeline.run, files) if isinstance(r, CaseResult)]
        if len(results) != len(files):
            raise SystemExit(f"{len(files) - len(results)} held-out files failed to triage")
        accuracy = accuracy_figures(results, truth)
        spec = pipeline.classifier.manifest.preprocessing
        units = np.stack([to_tensor(to_unit_image(load_image(p), spec), spec)[0] for p in files])
        labels = np.array([truth[p.name]["label"] == "abnormal" for p in files], np.int64)
        manifest = json.loads((BUNDLE / MANIFEST_NAME).read_text(encoding="utf-8"))
        quant = int8_vs_fp32(units, labels, manifest)
        floor = isolated_floor(files[: args.throughput_count], BUNDLE)
        throughput = throughput_in_child(files[: args.throughput_count], Path(data_dir))
        throughput["ratio_to_floor_end_to_end"] = round(
            throughput["images_per_s_end_to_end"] / floor["floor_images_per_s_2_cores"], 3
        )
        throughput["ratio_to_floor_steady"] = round(
            throughput["images_per_s_steady"] / floor["floor_images_per_s_2_cores"], 3
        )
        startup = cold_start(files[0])
    stages = stage_timings(results)

    _table(f"Accuracy on held-out seed {EVAL_SEED} (n={accuracy['n']})", accuracy)
    if quant:
        _table("INT8 vs FP32 (alternating, batch 1, 1 thread)", quant)
    _table("Per-stage timings in the pipeline (ms)", stages)
    _table(
        f"Throughput on {throughput['images']} images, 2 worker processes", {**floor, **throughput}
    )
    _table("Cold start: process to first result", startup)

    evaluation = {
        "data": f"synthetic phantoms, seed {EVAL_SEED} (never used in training or calibration), "
        f"n={accuracy['n']}, abnormal share {accuracy['abnormal_share']}",
        "accuracy": accuracy,
        "int8_vs_fp32": quant,
        "stage_timings_ms": stages,
        "throughput": {**floor, **throughput},
        "cold_start": startup,
        "machine": f"{_cpu_name()}, {_cores()} cores",
        "measured": time.strftime("%Y-%m-%d"),
    }
    if not args.no_write:
        manifest["evaluation"] = evaluation
        (BUNDLE / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        write_model_card(BUNDLE, manifest)
        print(f"\nwrote the figures to {BUNDLE / MANIFEST_NAME} and MODEL_CARD.md")
    assert sha256_file(BUNDLE / manifest["file"]) == manifest["sha256"]
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
