"""The Qt binding itself: a build that corrupts reference counts would abort the app in use.

PySide6 6.12.0 under Python 3.11 releases a reference to ``True`` on every ``emit()`` it never
took; after a few thousand emits (minutes of an idle worklist) the interpreter aborts with
"bool_dealloc". pyproject pins below it; this keeps the pin honest if it is ever raised.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

EMITS = 20_000


def test_emitting_signals_leaves_reference_counts_alone() -> None:
    # In a child: the failure is an abort of the whole interpreter, not an exception.
    script = textwrap.dedent(
        f"""
        import sys
        from PySide6.QtCore import QCoreApplication, QObject, Signal

        class Source(QObject):
            number = Signal(int)
            plain = Signal()

        app = QCoreApplication([])
        source = Source()
        source.number.connect(lambda value: None)
        before = sys.getrefcount(True)
        for i in range({EMITS}):
            source.number.emit(i)
            source.plain.emit()
        print(before, sys.getrefcount(True))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-500:]
    before, after = (int(n) for n in run.stdout.split())
    assert abs(after - before) < 100, f"True's reference count went from {before} to {after}"
