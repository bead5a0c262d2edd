"""DICOM receive speed: our C-STORE receiver against dcmtk's ``storescp``, same run, same files.

Why this exists: issue #5 asks for "receiving 300 × 512² CT instances vs dcmtk's storescp in the
same run". A number from another day or machine proves nothing, so this script generates one
CT series and has dcmtk's ``storescu`` (the scanner) send it to each receiver in turn, rounds
interleaved, on loopback.

What it does:

1. Series: ``--instances`` slices (300) of one study, 512×512 16-bit, explicit VR little
   endian, about 525 kB each, written by the tests' generator (``tests/ct_series.py``).
2. Receivers, each started fresh per round with an empty output folder on the same disk
   (``--workdir``), start-up outside the timing:

   * ``ours``: :class:`triage_app.receiver.DicomReceiver` in this process (pynetdicom), the
     store-only path (no triage): each instance is written as received to a temp file,
     fsync-ed, renamed, its folder fsync-ed, and only then acknowledged;
   * ``storescp``: ``storescp +B -od DIR`` (bit-preserving: the data set written as received,
     like ours; no fsync, dcmtk has no option for it);
   * ``ours, no fsync``: ours with ``os.fsync`` patched out. A ceiling, not a setting: it
     shows how much of the gap is durability and how much is pynetdicom against C;
   * ``storescp + sync``: ``storescp +B -xcr "sync #p/#f #p" -xs``: before each answer it runs
     ``sync`` on the file and its folder, which makes it durable like ours, at the price of
     a shell and a ``sync`` process per instance (a few ms of the figure are process starts).

3. Timing: wall clock of one ``storescu +sd DIR`` run (``TCP_NODELAY=1``, as for every dcmtk
   process: without it dcmtk is 8-30× slower on loopback), its start-up included for every
   receiver alike; best and median of ``--repeat`` rounds (5), receiver order rotated each round.
   Every run is checked: storescu exit 0 and exactly ``--instances`` files received.

How to read it: ``instances/s`` and ``MB/s`` come from the best time (MB = 10^6 bytes of the
sent files); ``vs storescp`` is a receiver's best time over storescp's (above 1: slower). The
numbers are comparable only within one run; nothing is asserted.

Run from the repository root: ``.venv/bin/python benchmarks/receiver_speed.py [--instances 300]
[--repeat 5] [--workdir DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

from report import save_report

REPO = Path(__file__).resolve().parents[1]
# The CT series generator and the dcmtk helpers are the tests' own, so both measure the same.
sys.path.insert(0, str(REPO))

from tests import dcmtk  # noqa: E402
from tests.ct_series import CtSeries, write_ct_series  # noqa: E402
from triage_app.config import Settings  # noqa: E402
from triage_app.receiver import DicomReceiver  # noqa: E402

AE_TITLE = "BENCH_SCP"
SEED = 20240105

# A receiver under test: given an empty output folder and a port, a context in which it listens.
Receiver = Callable[[Path, int], AbstractContextManager[None]]


@contextmanager
def ours(output: Path, port: int) -> Iterator[None]:
    settings = Settings(
        {
            "receiver.storage_dir": output,
            "receiver.ae_title": AE_TITLE,
            "receiver.bind_address": dcmtk.HOST,
            "receiver.port": port,
            "paths.data_dir": output / "data",
        }
    )
    with DicomReceiver(settings):
        yield


@contextmanager
def ours_without_fsync(output: Path, port: int) -> Iterator[None]:
    with mock.patch("os.fsync"), ours(output, port):
        yield


@contextmanager
def storescp(output: Path, port: int) -> Iterator[None]:
    with dcmtk.storescp(port, output, ae_title=AE_TITLE):
        yield


@contextmanager
def storescp_with_sync(output: Path, port: int) -> Iterator[None]:
    extra = ("-xcr", "sync #p/#f #p", "-xs")
    with dcmtk.storescp(port, output, ae_title=AE_TITLE, extra=extra):
        yield


RECEIVERS: dict[str, Receiver] = {
    "ours": ours,
    "storescp": storescp,
    "ours, no fsync": ours_without_fsync,
    "storescp + sync": storescp_with_sync,
}


@dataclass
class Row:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def received_files(output: Path) -> int:
    return sum(1 for p in output.rglob("*") if p.is_file() and not p.name.startswith("."))


def one_run(receiver: Receiver, series: CtSeries, workdir: Path) -> float:
    """Seconds for storescu to send the series to a freshly started ``receiver``."""
    output = Path(tempfile.mkdtemp(prefix="rx-", dir=workdir))
    port = dcmtk.free_port()
    try:
        with receiver(output, port):
            start = time.perf_counter()
            result = dcmtk.storescu(port, series.folder, called=AE_TITLE)
            elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"storescu failed ({result.returncode}):\n{result.stderr[-2000:]}")
        count = received_files(output)
        if count != len(series.files):
            raise SystemExit(f"received {count} files, sent {len(series.files)}")
        return elapsed
    finally:
        shutil.rmtree(output, ignore_errors=True)


def table(rows: list[Row], series: CtSeries) -> str:
    megabytes = series.total_bytes / 1e6
    reference = next(r.best for r in rows if r.name == "storescp")
    lines = [
        f"{len(series.files)} CT instances, 512x512 16-bit, {megabytes:.1f} MB, "
        f"best of {len(rows[0].seconds)}",
        "",
        f"{'receiver':<17} {'best s':>7} {'median s':>9} {'inst/s':>8} {'MB/s':>7} "
        f"{'vs storescp':>12}",
    ]
    for row in rows:
        lines.append(
            f"{row.name:<17} {row.best:>7.2f} {row.median:>9.2f} "
            f"{len(series.files) / row.best:>8.0f} {megabytes / row.best:>7.1f} "
            f"{row.best / reference:>11.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, help="where the series and outputs go")
    parser.add_argument("--out", type=Path, help="folder for receiver_speed.json/.txt")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="receiver-speed-", dir=args.workdir))
    try:
        series = write_ct_series(workdir / "series", args.instances, seed=SEED)
        rows = [Row(name) for name in RECEIVERS]
        for round_index in range(args.repeat):
            shift = round_index % len(rows)
            for row in rows[shift:] + rows[:shift]:
                row.seconds.append(one_run(RECEIVERS[row.name], series, workdir))
                print(f"round {round_index + 1}: {row.name}: {row.seconds[-1]:.2f} s", flush=True)
        text = table(rows, series)
        print()
        print(text)
        if args.out:
            record = {
                "instances": args.instances,
                "bytes": series.total_bytes,
                "repeat": args.repeat,
                "rows": [asdict(row) for row in rows],
            }
            save_report(args.out, "receiver_speed", record, text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
