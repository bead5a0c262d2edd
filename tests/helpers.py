"""Shared test helpers: generated inputs (good and bad) and running the real CLI."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from triage_app.dicom.image import ImageInfo
from triage_app.results import CaseResult, EscalationRef, ModelRef
from triage_app.synthetic import PhantomConfig, phantom_to_dataset, render_phantom

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "chest-dx-demo"
SMALL = PhantomConfig(size_range=(256, 384))
#: A case's input path that looks like PHI on purpose: tests check that it is never logged.
PHI_LIKE_PATH = "/data/incoming/DOE^JANE/chest.dcm"


def write_phantoms(
    folder: Path, seed: int, count: int, *, config: PhantomConfig = SMALL
) -> dict[str, str]:
    """``count`` phantom files in ``folder``; returns file name → truth label."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for index in range(count):
        phantom = render_phantom(seed, index, config)
        name = f"p{index:03d}.dcm"
        phantom_to_dataset(phantom).save_as(folder / name, enforce_file_format=True)
        truth[name] = phantom.label
    return truth


def phantom_dataset(seed: int = 5, index: int = 0) -> Dataset:
    return phantom_to_dataset(render_phantom(seed, index, SMALL))


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """One file per failure mode; returns file name → expected error code."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notes.txt").write_text("Patient notes: not an image\n", encoding="utf-8")
    good = phantom_dataset(5, 1)
    good.save_as(folder / "whole.tmp", enforce_file_format=True)
    data = (folder / "whole.tmp").read_bytes()
    (folder / "whole.tmp").unlink()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    no_pixels = phantom_dataset(5, 2)
    del no_pixels.PixelData
    no_pixels.save_as(folder / "no_pixels.dcm", enforce_file_format=True)
    return {
        "empty.dcm": "empty_file",
        "notes.txt": "not_dicom",
        "truncated.dcm": "truncated",
        "no_pixels.dcm": "no_pixel_data",
    }


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def by_name(self) -> dict[str, dict[str, Any]]:
        return {Path(r["path"]).name: r for r in self.records}


def run_cli(
    *args: str | Path,
    data_dir: Path,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 240,
) -> CliRun:
    """The real command in a fresh process, as a user or a service manager runs it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "triage_app", *map(str, args), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        input=stdin if stdin is not None else "",
        timeout=timeout,
        env=full_env,
        check=False,
    )
    return CliRun(result.returncode, result.stdout, result.stderr)


def make_result(
    case_id: str = "case-0001",
    *,
    decision: str = "normal",
    reason: str = "confident_normal",
    score: float = 0.07,
    path: str = PHI_LIKE_PATH,
) -> CaseResult:
    """A triaged case's result record as the pipeline makes one, without reading an image."""
    return CaseResult(
        path=path,
        case_id=case_id,
        decision=decision,
        reason=reason,
        score=score,
        probabilities={"normal": 1 - score, "abnormal": score},
        model=ModelRef(name="tiny-cnn", version="1.2.0", sha256="ab" * 32),
        thresholds={"normal_below": 0.2, "abnormal_above": 0.8},
        scope={"modality": "DX", "body_part": "CHEST", "in_scope": True},
        image={"rows": 2500, "columns": 2048, "frames": 1},
        escalation=EscalationRef(state="queued") if decision == "escalate" else None,
        timings_ms={"read": 1.2, "infer": 0.9},
    )


def image_info(**overrides: Any) -> ImageInfo:
    """A single-frame 16-bit MONOCHROME2 image's facts; override what a test is about."""
    fields: dict[str, Any] = {
        "sop_class_uid": "",
        "sop_instance_uid": "",
        "modality": "",
        "body_part": "",
        "view_position": "",
        "photometric": "MONOCHROME2",
        "rows": 4,
        "columns": 4,
        "number_of_frames": 1,
        "frame_index": 0,
        "samples_per_pixel": 1,
        "bits_stored": 16,
        "bits_allocated": 16,
        "pixel_representation": 0,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "rescale_slope": 1.0,
        "rescale_intercept": 0.0,
        "window": None,
        "has_voi_lut_sequence": False,
        "has_modality_lut_sequence": False,
    }
    fields.update(overrides)
    return ImageInfo(**fields)


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout_s: float = 15.0,
    interval_s: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def serve_until_listening(
    command: Sequence[str], on_listening: Callable[[int], None] | None = None
) -> list[str]:
    """Run a ``central serve`` command line until it logs ``listening on`` (60 s at most), call
    ``on_listening`` with its pid while it listens, then kill it; the stderr lines it wrote.

    Unbuffered, so select() sees every line; a deadline, so a silent server fails the test.
    Killed, not stopped: a SIGTERM in the instant before uvicorn handles it is lost.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    lines: list[str] = []
    with subprocess.Popen(
        list(command), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, bufsize=0
    ) as server:
        assert server.stderr is not None
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and server.poll() is None:
                if not select.select([server.stderr], [], [], 0.5)[0]:
                    continue
                lines.append(server.stderr.readline().decode(errors="replace"))
                if "listening on" in lines[-1]:
                    if on_listening is not None:
                        on_listening(server.pid)
                    break
        finally:
            server.kill()
            server.wait()
    return lines
