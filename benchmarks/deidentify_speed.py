"""De-identification speed: ``triage-app deidentify`` against dicognito and dicom-anonymizer.

Why this exists: the de-identification issue sets a speed target, "files/s on >= 200 small
files, measured in the same run against dicognito and dicom-anonymizer; ours with 2 workers at
least 2x the faster peer". A number measured on another day or another machine proves nothing,
so this script builds one corpus, installs the peers into their own virtualenv and times all
tools back to back, interleaved, on the same files.

What it does:

1. Corpus. The small, valid image files that ship with pydicom (``get_testdata_files()``: under
   300 kB, read without any warning, pixel data present and decodable, Part 10 preamble, SOP
   Class/Instance UIDs; DICOMDIRs and the deliberately broken files drop out) are copied
   round-robin to ``--files`` files in a few subfolders, grouped in series of
   ``--series-size`` instances (10 by default, as a scanner exports them; 1 makes every file
   its own study). Each series gets one patient's planted identifiers (name, MRN, birth date,
   accession number, institution, station, referring physician, a study description naming
   the patient, Other Patient IDs Sequence, a private tag holding the MRN) and its own
   Study/Series UIDs; each file a fresh SOP Instance UID; all from a fixed seed. Pixel bytes
   are not changed.
2. Tools, each timed by wall clock on the whole corpus, process start-up included, best of
   ``--repeat`` runs, each run into a fresh output folder, tool order rotated every round:

   * ours: ``python -m triage_app deidentify SRC DST --workers N --data-dir D`` (N = 2 and 1),
     its bytecode compiled first, as the peers' was when pip installed them;
   * dicognito: ``PEER_PY -m dicognito SRC --output-directory DST`` (its ``dicognito`` console
     script is broken in 0.19.0, ``main()`` wants an argument; ``-m`` runs the same code);
   * dicom-anonymizer: its CLI reads one folder without recursion (``os.listdir``), so a small
     driver in the peer venv calls the tool's own ``anonymize(folder, out, {}, True)`` once per
     subfolder, all in one process (the same code path as its CLI, without 4 start-ups).

   Peers run single-process, as they ship; nobody gets a warm-up beyond best-of-N.
3. Checks on each tool's output (outside the timing): one output file per input (``outputs``,
   ``failed``), how many outputs still contain a planted surname or MRN anywhere in the file
   (plain byte search: ``leaks``), and how many kept the exact pixel bytes of their input
   (``pixels kept``; header-level work should keep them all).

How to read it: ``files/s`` = corpus size / best wall-clock seconds; ``vs faster peer`` divides a
tool's files/s by that of the faster of the two peers; the last line is the target's verdict.
A tool with failed outputs or leaks is fast at doing less, so read those columns first. The
numbers are only comparable within one run; the script asserts nothing about them.

Run from the repository root: ``.venv/bin/python benchmarks/deidentify_speed.py [--files 240]
[--repeat 3] [--peers-venv PATH] [--out DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import importlib.metadata
import os
import platform
import random
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from report import save_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEERS_VENV = REPO / ".bench-venv"
# Pinned so that a re-run measures the same peers; bump deliberately.
PEER_REQUIREMENTS = ("dicognito==0.19.0", "dicom-anonymizer==2.1.0")
MAX_SOURCE_BYTES = 300_000
SUBFOLDERS = 4
DEFAULT_SEED = 20240611
# A scanner exports series, not unrelated single images; 10 is a small series.
DEFAULT_SERIES_SIZE = 10
RUN_TIMEOUT_S = 900.0
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
DEFLATED_TS = "1.2.840.10008.1.2.1.99"

SURNAMES = ("HARTWELL", "OKONKWO", "LINDQVIST", "MORENO", "TANAKA", "KOWALSKI", "DUBOIS", "OSEI")
GIVEN_NAMES = ("JOHN", "AMARA", "SVEN", "LUCIA", "HARUKI", "EWA", "CLAIRE", "KWAME")
INSTITUTIONS = ("ST ELSEWHERE GENERAL HOSPITAL", "NORTHFIELD CLINIC", "RIVERSIDE MEDICAL CENTRE")
PHYSICIANS = ("WELBY^MARCUS", "QUINN^MICHAELA", "KILDARE^JAMES", "HOUSE^GREGORY")

# Runs inside the peer venv: dicom-anonymizer's own folder routine, once per folder that holds
# files, in a single process (its CLI does one non-recursive folder per call).
DICOM_ANONYMIZER_DRIVER = """\
import os, sys
from dicomanonymizer.anonymizer import anonymize

src, dst = sys.argv[1], sys.argv[2]
for dirpath, _dirs, files in sorted(os.walk(src)):
    if files:
        out = os.path.join(dst, os.path.relpath(dirpath, src))
        os.makedirs(out, exist_ok=True)
        anonymize(dirpath, out, {}, True)
"""


# --------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class Corpus:
    root: Path
    files: list[Path]
    sources: list[str]
    name_needles: frozenset[bytes]
    mrn_needles: frozenset[bytes]
    pixel_digests: frozenset[str]
    total_bytes: int
    series_size: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_clean(path: Path) -> Dataset | None:
    """The dataset if ``path`` is a valid, warning-free Part 10 image file; else None."""
    try:
        with path.open("rb") as fh:
            if fh.read(132)[128:] != b"DICM":
                return None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = pydicom.dcmread(path)
            meta = ds.file_meta
            if (
                "PixelData" not in ds
                or "TransferSyntaxUID" not in meta
                or meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY
                or "SOPClassUID" not in ds
                or "SOPInstanceUID" not in ds
            ):
                return None
            ds.pixel_array  # noqa: B018 - decodable pixel data, no "excess bytes" warning
    except Exception:  # noqa: BLE001 - any failure means "not a clean source file"
        return None
    return ds


def select_sources() -> list[Path]:
    """Small, valid, readable pydicom test images, de-duplicated by content, sorted by path."""
    chosen: dict[str, Path] = {}
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file() or path.stat().st_size > MAX_SOURCE_BYTES:
            continue
        if "DICOMDIR" in path.name.upper() or _read_clean(path) is None:
            continue
        chosen.setdefault(_sha256(path.read_bytes()), path)
    return sorted(chosen.values())


@dataclass(frozen=True)
class _Patient:
    """One patient's planted identifiers, shared by every instance of their series."""

    surname: str
    given: str
    mrn: str
    other_mrn: str
    birth: str
    accession: str
    institution: str
    station: str
    physician: str

    @classmethod
    def draw(cls, rng: random.Random) -> _Patient:
        return cls(
            surname=rng.choice(SURNAMES) + "".join(rng.choices(string.ascii_uppercase, k=3)),
            given=rng.choice(GIVEN_NAMES),
            mrn=f"MRN{rng.randrange(10**7, 10**8)}",
            other_mrn=f"NC-{rng.randrange(10**6, 10**7)}",
            birth=f"{rng.randrange(1930, 2006):04d}{rng.randrange(1, 13):02d}"
            f"{rng.randrange(1, 29):02d}",
            accession=f"A{rng.randrange(10**8, 10**9)}",
            institution=rng.choice(INSTITUTIONS),
            station=f"SCANNER-{rng.randrange(1, 10)}",
            physician=rng.choice(PHYSICIANS),
        )


def _plant(ds: Dataset, patient: _Patient, series: int, index: int, seed: int) -> None:
    """Plants the patient's identifiers, the series' Study/Series UIDs and a fresh SOP UID."""
    ds.PatientName = f"{patient.surname}^{patient.given}"
    ds.PatientID = patient.mrn
    ds.PatientBirthDate = patient.birth
    ds.AccessionNumber = patient.accession
    ds.InstitutionName = patient.institution
    ds.StationName = patient.station
    ds.ReferringPhysicianName = patient.physician
    ds.StudyDescription = f"FOLLOW-UP {patient.given} {patient.surname}"
    other = Dataset()
    other.PatientID = patient.other_mrn
    other.IssuerOfPatientID = "NORTH CAMPUS"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    ds.private_block(0x0011, "TRIAGE BENCH", create=True).add_new(0x01, "LO", patient.mrn)

    def uid(*parts: object) -> str:
        return str(generate_uid(entropy_srcs=[str(seed), *map(str, parts)]))

    ds.StudyInstanceUID = uid(series, "study")
    ds.SeriesInstanceUID = uid(series, "series")
    ds.SOPInstanceUID = uid(index, "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def build_corpus(root: Path, n_files: int, seed: int, series_size: int) -> Corpus:
    sources = select_sources()
    if not sources:
        raise SystemExit("no usable pydicom test files found")
    rng = random.Random(seed)
    files: list[Path] = []
    names: set[bytes] = set()
    mrns: set[bytes] = set()
    digests: set[str] = set()
    total = 0
    patient = _Patient.draw(rng)
    for i in range(n_files):
        series, first_of_series = divmod(i, series_size)
        if i and first_of_series == 0:
            patient = _Patient.draw(rng)
        source = sources[i % len(sources)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source)
            _plant(ds, patient, series, i, seed)
            dest = root / f"batch_{series % SUBFOLDERS}" / f"img_{i:04d}.dcm"
            dest.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(dest, enforce_file_format=True)
        names.add(patient.surname.encode("ascii"))
        mrns.update((patient.mrn.encode("ascii"), patient.other_mrn.encode("ascii")))
        digests.add(_sha256(bytes(ds.PixelData)))
        total += dest.stat().st_size
        files.append(dest)
    return Corpus(
        root=root,
        files=files,
        sources=[p.name for p in sources],
        name_needles=frozenset(names),
        mrn_needles=frozenset(mrns),
        pixel_digests=frozenset(digests),
        total_bytes=total,
        series_size=series_size,
    )


# --------------------------------------------------------------------------------------------
# Running the tools


@dataclass
class RunResult:
    seconds: float
    returncode: int
    stdout: str
    stderr: str


def timed_run(cmd: Sequence[str], env: dict[str, str]) -> RunResult:
    """Wall clock of one tool process, start-up included."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            list(cmd),
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        elapsed = time.perf_counter() - start
        return RunResult(elapsed, -1, "", f"timed out after {exc.timeout:.0f} s")
    except OSError as exc:
        return RunResult(time.perf_counter() - start, -1, "", f"could not start: {exc}")
    return RunResult(time.perf_counter() - start, proc.returncode, proc.stdout, proc.stderr)


def ours_command(src: Path, dst: Path, workers: int, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "triage_app",
        "deidentify",
        str(src),
        str(dst),
        "--workers",
        str(workers),
        "--data-dir",
        str(data_dir),
    ]


def run_ours(src: Path, dst: Path, workers: int, data_dir: Path, env: dict[str, str]) -> RunResult:
    """``triage-app deidentify`` over the whole corpus (JSON Lines report on stdout)."""
    return timed_run(ours_command(src, dst, workers, data_dir), env)


@dataclass
class Tool:
    key: str
    label: str
    version: str
    mode: str
    run: Callable[[Path, Path], RunResult]
    command: str
    note: str = ""


@dataclass
class OutputCheck:
    outputs: int = 0
    unreadable: int = 0
    name_leaks: int = 0
    mrn_leaks: int = 0
    pixels_kept: int = 0


@dataclass
class ToolResult:
    key: str
    label: str
    version: str
    mode: str
    command: str
    note: str
    files: int
    runs_s: list[float] = field(default_factory=list)
    returncodes: list[int] = field(default_factory=list)
    outputs_per_run: list[int] = field(default_factory=list)
    check: OutputCheck | None = None
    error: str = ""

    @property
    def best_s(self) -> float | None:
        return min(self.runs_s) if self.runs_s else None

    @property
    def files_per_s(self) -> float | None:
        best = self.best_s
        return self.files / best if best else None

    @property
    def failed(self) -> int | None:
        return self.files - min(self.outputs_per_run) if self.outputs_per_run else None


def _output_files(dst: Path) -> list[Path]:
    return sorted(p for p in dst.rglob("*") if p.is_file()) if dst.is_dir() else []


def _searchable_bytes(data: bytes) -> bytes:
    """The file's bytes, plus the inflated dataset if it uses the Deflated transfer syntax."""
    if DEFLATED_TS.encode("ascii") not in data[:1024]:
        return data
    try:
        meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) value, explicit VR LE
        return data + zlib.decompress(data[144 + meta_length :], -zlib.MAX_WBITS)
    except zlib.error:
        return data


def check_outputs(dst: Path, corpus: Corpus) -> OutputCheck:
    """Output count, planted-identifier leaks (byte search) and untouched pixel data."""
    names = re.compile(b"|".join(re.escape(n) for n in sorted(corpus.name_needles)))
    mrns = re.compile(b"|".join(re.escape(n) for n in sorted(corpus.mrn_needles)))
    check = OutputCheck()
    for path in _output_files(dst):
        check.outputs += 1
        data = _searchable_bytes(path.read_bytes())
        check.name_leaks += bool(names.search(data))
        check.mrn_leaks += bool(mrns.search(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
            kept = "PixelData" in ds and _sha256(bytes(ds.PixelData)) in corpus.pixel_digests
        except Exception:  # noqa: BLE001 - an unreadable output is counted, not fatal
            check.unreadable += 1
            continue
        check.pixels_kept += kept
    return check


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _distribution_version(python: Path | str, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    proc = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    return proc.stdout.strip() if proc.returncode == 0 else "?"


def ensure_peers_venv(venv: Path) -> Path:
    """The peer venv's python, creating the venv and installing the peers if needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating peer venv {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run(
        [str(python), "-c", "import dicognito, dicomanonymizer"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        print(f"installing {' '.join(PEER_REQUIREMENTS)} into {venv}", file=sys.stderr)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS],
            check=True,
            stderr=subprocess.DEVNULL,
        )
    return python


def _ours_version() -> str:
    try:
        return importlib.metadata.version("triage-app")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def make_tools(peer_python: Path, work: Path, env: dict[str, str]) -> list[Tool]:
    data_dir = work / "ours-data"
    driver = work / "dicom_anonymizer_driver.py"
    driver.write_text(DICOM_ANONYMIZER_DRIVER, encoding="utf-8")
    ours_version = _ours_version()

    def ours(workers: int) -> Tool:
        def run(src: Path, dst: Path) -> RunResult:
            return run_ours(src, dst, workers, data_dir, env)

        cmd = " ".join(ours_command(Path("SRC"), Path("DST"), workers, data_dir))
        unit = "worker" if workers == 1 else "workers"
        label = f"triage-app ({workers} {unit})"
        return Tool(f"ours_w{workers}", label, ours_version, f"--workers {workers}", run, cmd)

    def dicognito(src: Path, dst: Path) -> RunResult:
        cmd = [str(peer_python), "-m", "dicognito", str(src), "--output-directory", str(dst)]
        return timed_run(cmd, env)

    def dicom_anonymizer(src: Path, dst: Path) -> RunResult:
        return timed_run([str(peer_python), str(driver), str(src), str(dst)], env)

    return [
        ours(2),
        ours(1),
        Tool(
            "dicognito",
            "dicognito",
            _distribution_version(peer_python, "dicognito"),
            "1 process (CLI)",
            dicognito,
            f"{peer_python} -m dicognito SRC --output-directory DST",
            "recursive folder walk, one process; output files named by new SOP Instance UID",
        ),
        Tool(
            "dicom_anonymizer",
            "dicom-anonymizer",
            _distribution_version(peer_python, "dicom-anonymizer"),
            "1 process (driver)",
            dicom_anonymizer,
            f"{peer_python} {driver.name} SRC DST",
            "CLI is one flat folder per call; driver calls its anonymize() per subfolder",
        ),
    ]


def benchmark(
    tools: list[Tool], corpus: Corpus, work: Path, repeat: int, keep: bool
) -> list[ToolResult]:
    results = {
        t.key: ToolResult(
            t.key, t.label, t.version, t.mode, t.command, t.note, files=len(corpus.files)
        )
        for t in tools
    }
    for round_no in range(repeat):
        shift = round_no % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            result = results[tool.key]
            if result.error:
                continue
            dst = work / "out" / tool.key / f"run{round_no}"
            run = tool.run(corpus.root, dst)
            outputs = len(_output_files(dst))
            print(
                f"  round {round_no + 1}/{repeat} {tool.label:<26} {run.seconds:7.2f} s  "
                f"exit {run.returncode}  outputs {outputs}/{len(corpus.files)}",
                file=sys.stderr,
            )
            if run.returncode not in (0, 1) or outputs == 0:
                result.error = f"exit {run.returncode}, {outputs} outputs"
                print(f"  {tool.label} failed; its stderr:\n{_tail(run.stderr)}", file=sys.stderr)
                continue
            result.runs_s.append(run.seconds)
            result.returncodes.append(run.returncode)
            result.outputs_per_run.append(outputs)
            if result.check is None:
                result.check = check_outputs(dst, corpus)
            if not keep:
                shutil.rmtree(dst, ignore_errors=True)
    return list(results.values())


# --------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def faster_peer(results: list[ToolResult]) -> ToolResult | None:
    peers = [r for r in results if not r.key.startswith("ours") and r.files_per_s]
    return max(peers, key=lambda r: r.files_per_s or 0.0, default=None)


def render_table(results: list[ToolResult], corpus: Corpus, repeat: int) -> str:
    peer = faster_peer(results)
    peer_rate = peer.files_per_s if peer else None
    header = (
        "tool",
        "version",
        "mode",
        "files",
        "outputs",
        "failed",
        "best s",
        "files/s",
        "vs faster peer",
        "leaks name/MRN",
        "pixels kept",
    )
    rows: list[tuple[str, ...]] = [header]
    for r in results:
        rate = r.files_per_s
        ratio = rate / peer_rate if rate and peer_rate else None
        check = r.check
        rows.append(
            (
                r.label,
                r.version,
                r.mode,
                str(r.files),
                str(min(r.outputs_per_run)) if r.outputs_per_run else "-",
                "-" if r.failed is None else str(r.failed),
                _fmt(r.best_s, ".2f"),
                _fmt(rate, ".1f"),
                "-" if ratio is None else f"{ratio:.2f}x",
                f"{check.name_leaks}/{check.mrn_leaks}" if check else "-",
                f"{check.pixels_kept}/{check.outputs}" if check else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mb = corpus.total_bytes / 1e6
    lines += [
        "",
        f"corpus: {len(corpus.files)} files ({mb:.1f} MB) copied round-robin from "
        f"{len(corpus.sources)} pydicom test images into {SUBFOLDERS} subfolders, "
        f"series of {corpus.series_size} instances (one patient, study and series each); "
        f"wall clock incl. process start-up, best of {repeat}, tool order rotated per round.",
        "peers run single-process as they ship; ours uses --workers N processes.",
    ]
    for r in results:
        lines.append(f"{r.label}: {r.command}" + (f"  ({r.note})" if r.note else ""))
        if r.error:
            lines.append(f"  NOT MEASURED: {r.error}")
    lines.append(verdict(results))
    return "\n".join(lines)


def verdict(results: list[ToolResult]) -> str:
    ours = next((r for r in results if r.key == "ours_w2"), None)
    peer = faster_peer(results)
    if ours is None or not ours.files_per_s or peer is None or not peer.files_per_s:
        return "ours(2 workers) / faster peer = n/a (a side was not measured)"
    ratio = ours.files_per_s / peer.files_per_s
    line = f"ours(2 workers) / faster peer = {ratio:.2f}× (faster peer: {peer.label})"
    caveats = []
    if ours.failed:
        caveats.append(f"{ours.failed} inputs without output")
    if ours.check and (ours.check.name_leaks or ours.check.mrn_leaks):
        leaking = ours.check.name_leaks + ours.check.mrn_leaks
        caveats.append(f"{leaking} planted-identifier hits in our outputs")
    return line + (f"; CAUTION: {', '.join(caveats)}" if caveats else "")


def to_json(results: list[ToolResult], corpus: Corpus, repeat: int, seed: int) -> dict[str, Any]:
    peer = faster_peer(results)
    tools = []
    for r in results:
        entry = asdict(r)
        entry.update(best_s=r.best_s, files_per_s=r.files_per_s, failed=r.failed)
        if peer and peer.files_per_s and r.files_per_s:
            entry["ratio_vs_faster_peer"] = r.files_per_s / peer.files_per_s
        tools.append(entry)
    return {
        "benchmark": "deidentify_speed",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "pydicom": pydicom.__version__,
        },
        "corpus": {
            "files": len(corpus.files),
            "bytes": corpus.total_bytes,
            "sources": corpus.sources,
            "subfolders": SUBFOLDERS,
            "series_size": corpus.series_size,
            "seed": seed,
        },
        "repeat": repeat,
        "faster_peer": peer.key if peer else None,
        "tools": tools,
        "verdict": verdict(results),
    }


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=240, help="corpus size (default 240)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool, best counts")
    parser.add_argument(
        "--peers-venv", type=Path, default=DEFAULT_PEERS_VENV, help="virtualenv for the peers"
    )
    parser.add_argument("--out", type=Path, help="folder for deidentify_speed.json/.txt")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="corpus seed")
    parser.add_argument(
        "--series-size",
        type=int,
        default=DEFAULT_SERIES_SIZE,
        help=f"instances per patient/study/series (default {DEFAULT_SERIES_SIZE}; 1 = every "
        "file its own study, the worst case for a per-study output tree)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (path printed)")
    args = parser.parse_args(argv)
    if args.files < 1 or args.repeat < 1:
        parser.error("--files and --repeat must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    peer_python = ensure_peers_venv(args.peers_venv.resolve())
    work = Path(tempfile.mkdtemp(prefix="deid-bench-"))
    try:
        # Keep every tool away from the user's settings, data and caches.
        env = dict(os.environ)
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
            env[var] = str(work / "xdg" / var.lower())
        corpus = build_corpus(work / "corpus", args.files, args.seed, args.series_size)
        print(
            f"corpus: {len(corpus.files)} files from {len(corpus.sources)} sources in {work}",
            file=sys.stderr,
        )
        # The peers are pip-installed, so their bytecode was compiled at install time; ours
        # runs from the checkout, where PYTHONDONTWRITEBYTECODE would make every run compile
        # it again (~35 ms). Compile it once, as an install would.
        compileall.compile_dir(REPO / "triage_app", quiet=1)
        tools = make_tools(peer_python, work, env)
        results = benchmark(tools, corpus, work, args.repeat, args.keep)
        table = render_table(results, corpus, args.repeat)
        print(table)
        if args.out:
            report = to_json(results, corpus, args.repeat, args.seed)
            save_report(args.out, "deidentify_speed", report, table)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
