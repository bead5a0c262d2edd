"""Worklist poll cost: reading every case (the old way) against reading only what changed.

Why this exists: the desktop worklist polls the case store every second, and a clinic's store
grows by thousands of cases a week. It used to read every case (every column, each result's
JSON parsed) and rebuild and sort every row on each poll; now it asks the store for the cases
changed since its last poll (``CaseStore.cases_changed_since``, an index on a change sequence)
and keeps its rows. This measures both on the same store in the same run.

What it does:

1. Store: a fresh case store (WAL, ``synchronous=FULL``, as shipped) filled through its own API
   (``CaseStore.record_result``, one transaction per case, as the watch service records them)
   with ``--sizes`` cases (5,000, then topped up to 20,000): generated result records
   (``tests.helpers.make_result``), 70 % local normal, 10 % local abnormal, 20 % escalated and
   queued, each with its own input path (no file there: the patient header is read, and
   found missing, once per file, as the worklist does for a moved file).
2. Rows, each timed on its own, ``--repeat`` rounds:

   * ``full read (old way)``: what ``WorklistSource.rows()`` did before: ``list_cases()``,
     one row per case (patient labels from a warm cache), sorted;
   * ``rows(), N changed``: ``WorklistSource.rows()`` now, every case's row, sorted, after N
     cases changed since the previous call;
   * ``changed_rows(), N changed``: what the desktop's poller calls now: only the changed
     rows, which are all the table model is given.

   The changes are ``--changes`` (10) cases re-recorded (a new result record, as when the same
   image is sent again) by another connection, between polls and outside the timing.
   ``first poll`` is the source's first call (every case read, patient headers looked for).
3. Every round checks that ``rows()`` equals the full read, row for row.

How to read it: milliseconds per poll, best and median; ``speed-up`` = full read best / this
row's best. The machine is shared and noisy; nothing is asserted. Run from the repository
root: ``.venv/bin/python benchmarks/worklist_poll.py [--sizes 5000,20000] [--repeat 7]
[--changes 10] [--workdir DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from report import save_report

REPO = Path(__file__).resolve().parents[1]
# The result records are the tests' own, so the tests and this benchmark store the same cases.
sys.path.insert(0, str(REPO))

from tests.helpers import make_result  # noqa: E402
from triage_app.states import CaseEvent  # noqa: E402
from triage_app.store import CaseStore  # noqa: E402
from triage_app.worklist import (  # noqa: E402
    PatientLabel,
    WorklistRow,
    WorklistSource,
    read_patient,
    row_for,
    sort_rows,
)

SEED = 7


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


@dataclass
class Size:
    cases: int
    rows: list[Row]


def input_path(index: int) -> str:
    return f"/bench/incoming/{index:06d}.dcm"


def record_cases(store: CaseStore, start: int, stop: int) -> None:
    """Cases ``start`` to ``stop - 1``: 70 % local normal, 10 % abnormal, 20 % escalated."""
    rng = random.Random(SEED + start)
    for i in range(start, stop):
        draw = rng.random()
        if draw < 0.7:
            decision, reason, event = "normal", "confident_normal", CaseEvent.DECIDE_LOCAL_NORMAL
            score = rng.uniform(0.0, 0.05)
        elif draw < 0.8:
            decision, reason = "abnormal", "confident_abnormal"
            event, score = CaseEvent.DECIDE_LOCAL_ABNORMAL, rng.uniform(0.95, 1.0)
        else:
            decision, reason, event = "escalate", "uncertain", CaseEvent.ENQUEUE
            score = rng.uniform(0.05, 0.95)
        result = make_result(
            f"case-{i:06d}", decision=decision, reason=reason, score=score, path=input_path(i)
        )
        store.record_result(result, event)


def full_read(store: CaseStore, patients: dict[str, PatientLabel]) -> list[WorklistRow]:
    """The worklist's poll before it read changes only: every case, every row, sorted."""
    rows = []
    for case in store.list_cases():
        path = str(case.result.get("path", ""))
        patient = patients.get(path)
        if patient is None:
            patient = patients[path] = read_patient(path)
        rows.append(row_for(case, patient))
    return sort_rows(rows)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(db: Path, cases: int, repeat: int, changes: int) -> Size:
    rng = random.Random(SEED)
    names = [
        "full read (old way)",
        "first poll",
        "rows(), 0 changed",
        f"rows(), {changes} changed",
        "changed_rows(), 0 changed",
        f"changed_rows(), {changes} changed",
    ]
    rows = {name: Row(name) for name in names}
    source = WorklistSource(db)
    with CaseStore.open(db) as reader, CaseStore.open(db) as writer:

        def touch() -> None:
            for i in rng.sample(range(cases), changes):
                again = make_result(f"case-{i:06d}", path=input_path(i))
                writer.record_result(again, CaseEvent.DECIDE_LOCAL_NORMAL)

        patients: dict[str, PatientLabel] = {}
        full_read(reader, patients)  # the old source's patient cache, warm
        rows["first poll"].seconds.append(timed(source.rows))
        try:
            for _ in range(repeat):
                rows["full read (old way)"].seconds.append(
                    timed(lambda: full_read(reader, patients))
                )
                rows["rows(), 0 changed"].seconds.append(timed(source.rows))
                touch()
                rows[f"rows(), {changes} changed"].seconds.append(timed(source.rows))
                rows["changed_rows(), 0 changed"].seconds.append(timed(source.changed_rows))
                touch()
                rows[f"changed_rows(), {changes} changed"].seconds.append(
                    timed(source.changed_rows)
                )
                if source.rows() != full_read(reader, patients):
                    raise SystemExit(f"{cases} cases: the polled rows differ from a full read")
        finally:
            source.close()
    return Size(cases, list(rows.values()))


def table(sizes: list[Size], repeat: int) -> str:
    lines = [f"worklist poll, ms per poll, best and median of {repeat} (first poll: once)", ""]
    lines.append(f"{'cases':>7}  {'poll':<26} {'best ms':>9} {'median ms':>10} {'speed-up':>9}")
    for size in sizes:
        reference = size.rows[0].best
        for row in size.rows:
            lines.append(
                f"{size.cases:>7,}  {row.name:<26} {row.best * 1e3:>9.2f} "
                f"{row.median * 1e3:>10.2f} {reference / row.best:>8.1f}x"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        type=lambda text: sorted(int(n) for n in text.split(",")),
        default=[5_000, 20_000],
        help="store sizes, comma-separated (the store is topped up from one to the next)",
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--changes", type=int, default=10, help="cases changed between polls")
    parser.add_argument("--workdir", type=Path, help="where the case store goes")
    parser.add_argument("--out", type=Path, help="folder for worklist_poll.json/.txt")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="worklist-poll-", dir=args.workdir))
    db = workdir / "cases.sqlite3"
    sizes = []
    try:
        recorded = 0
        for cases in args.sizes:
            start = time.perf_counter()
            with CaseStore.open(db) as store:
                record_cases(store, recorded, cases)
            print(f"{cases:,} cases recorded in {time.perf_counter() - start:.1f} s", flush=True)
            recorded = cases
            sizes.append(measure(db, cases, args.repeat, args.changes))
        text = table(sizes, args.repeat)
        print()
        print(text)
        if args.out:
            record = {
                "repeat": args.repeat,
                "changes": args.changes,
                "sizes": [asdict(size) for size in sizes],
            }
            save_report(args.out, "worklist_poll", record, text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
