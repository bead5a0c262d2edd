"""Run a plain function off the UI thread and get its result back on it (napari's workers).

The function runs in Qt's global thread pool (or, for long jobs the user can abandon, in a
thread of its own: :func:`run_detached`); its result or exception comes back through a
signal, which Qt delivers in the UI thread. Workers are kept referenced until they finish, so
Python does not collect one while Qt still runs it; a result whose ``owner`` widget has been
deleted meanwhile (a dialog closed during a slow job) is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import shiboken6
from PySide6.QtCore import QObject, QRunnable, Qt, QThread, QThreadPool, QTimer, Signal

__all__ = ["FunctionWorker", "QtPoller", "run_detached", "run_in_thread"]

log = logging.getLogger(__name__)

_running: set[FunctionWorker] = set()


class _Signals(QObject):
    finished = Signal(object)
    errored = Signal(object)


class FunctionWorker(QRunnable):
    def __init__(self, function: Callable[[], Any]) -> None:
        super().__init__()
        self.setAutoDelete(False)
        self._function = function
        self.signals = _Signals()

    def run(self) -> None:
        # Any exception is handed to the UI thread's error handler: nothing escapes a pool thread.
        try:
            result = self._function()
        except Exception as exc:  # noqa: BLE001
            self.signals.errored.emit(exc)
        else:
            self.signals.finished.emit(result)


def _connect(
    signals: _Signals,
    on_done: Callable[[Any], None],
    on_error: Callable[[BaseException], None],
    owner: QObject | None,
    finish: Callable[[], None],
) -> None:
    """Deliver a job's result or error in the UI thread, unless ``owner`` is gone by then."""

    def wanted() -> bool:
        return owner is None or shiboken6.isValid(owner)

    def done(result: object) -> None:
        finish()
        if wanted():
            on_done(result)

    def failed(exc: object) -> None:
        finish()
        assert isinstance(exc, BaseException)
        if wanted():
            on_error(exc)

    signals.finished.connect(done)
    signals.errored.connect(failed)


def run_in_thread(
    function: Callable[[], Any],
    on_done: Callable[[Any], None],
    on_error: Callable[[BaseException], None],
    *,
    owner: QObject | None = None,
) -> FunctionWorker:
    """Start ``function`` in the pool; ``on_done``/``on_error`` run in the UI thread.

    With ``owner``, neither runs once the owner's C++ object is gone.
    """
    worker = FunctionWorker(function)
    _connect(worker.signals, on_done, on_error, owner, lambda: _running.discard(worker))
    _running.add(worker)
    QThreadPool.globalInstance().start(worker)
    return worker


_detached: set[_Signals] = set()


def run_detached(
    function: Callable[[], Any],
    on_done: Callable[[Any], None],
    on_error: Callable[[BaseException], None],
    *,
    owner: QObject | None = None,
    name: str,
) -> None:
    """As :func:`run_in_thread`, but in a thread of its own, outside the shared pool.

    For long jobs the user can walk away from (scoring a validation folder takes minutes):
    in the pool, a few of them would hold every thread and starve the image loads and
    history reads queued behind them, and closing the window would wait for them. Nothing in
    the app waits for this thread; only Python does, once the app has quit (a thread still
    inside ONNX Runtime or OpenCV while the interpreter tears down aborts the process), so
    ``function`` must stop soon once its owner cancels it.
    """
    signals = _Signals()  # created here: it lives in the UI thread, where results arrive
    _connect(signals, on_done, on_error, owner, lambda: _detached.discard(signals))
    _detached.add(signals)

    def run() -> None:
        # As FunctionWorker.run: everything goes to the UI thread's handlers.
        try:
            result = function()
        except Exception as exc:  # noqa: BLE001
            signals.errored.emit(exc)
        else:
            signals.finished.emit(result)

    threading.Thread(target=run, name=name).start()


def wait_for_workers(timeout_ms: int = 10_000) -> bool:
    """Block until the pool is idle (on shutdown and in tests)."""
    return QThreadPool.globalInstance().waitForDone(timeout_ms)


class QtPoller(QObject):
    """Calls ``worker.poll`` in a thread of its own every ``interval_ms``, one read at a time.

    ``worker`` is a QObject with ``poll`` and ``close`` slots (it may hold a SQLite connection,
    which must be opened, used and closed in one thread: ``close`` runs in that thread when it
    stops). The owner connects the worker's result signal and calls :meth:`ready` once a
    result (or failure) has arrived, so a slow read never piles up requests.
    """

    requested = Signal()

    def __init__(self, worker: QObject, name: str, interval_ms: int, parent: QObject) -> None:
        super().__init__(parent)
        self._busy = False
        self._worker = worker  # a parentless QObject lives as long as Python holds it
        self._thread = QThread(self)
        self._thread.setObjectName(name)
        worker.moveToThread(self._thread)
        self.requested.connect(worker.poll)  # type: ignore[attr-defined]
        # finished is emitted from the worker thread itself: the worker closes there.
        self._thread.finished.connect(worker.close, Qt.ConnectionType.DirectConnection)  # type: ignore[attr-defined]
        self._thread.start()
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.refresh)
        self._timer.start()

    def refresh(self) -> None:
        """Ask for a fresh read unless one is already under way."""
        if self._busy or not self._thread.isRunning():
            return
        self._busy = True
        self.requested.emit()

    def ready(self) -> None:
        self._busy = False

    def stop(self) -> None:
        """Stop polling and let the worker close in its thread; call before the app quits."""
        self._timer.stop()
        if self._thread.isRunning():
            self._thread.quit()
            self._thread.wait()
