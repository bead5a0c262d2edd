"""``triage-app watch`` and ``triage-app receive``: the unattended services, and ``health``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage_app.cli_common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    add_log_format_option,
    settings_from_args,
)
from triage_app.errors import ConfigError
from triage_app.logs import print_outcome
from triage_app.paths import FOLDER_ACCESS, access_problem

if TYPE_CHECKING:
    from triage_app.config import Settings
    from triage_app.metrics import ServiceMetrics
    from triage_app.receiver import DicomReceiver

log = logging.getLogger(__name__)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    service = argparse.ArgumentParser(add_help=False)
    add_log_format_option(service)
    service.add_argument(
        "--workers", type=int, help="worker processes (default: processing.workers)"
    )

    watch = sub.add_parser(
        "watch",
        parents=[common, service],
        help="triage every image that lands in the watch folder (a headless service)",
        description="Watches the inbox (watch.inbox_dir, or DIR) and triages each file once it "
        "has settled. A triaged file moves to the done folder next to its JSON result; a file "
        "that cannot be triaged moves to quarantine/<error_code>/ with a JSON reason file. "
        "Runs until SIGTERM or Ctrl-C, finishing the files in progress.",
    )
    watch.add_argument("inbox", nargs="?", type=Path, metavar="DIR", help="the inbox folder")
    watch.add_argument("--once", action="store_true", help="process what is there, then exit")
    watch.set_defaults(handler=_watch)

    receive = sub.add_parser(
        "receive",
        parents=[common, service],
        help="receive images from a scanner over DICOM (C-STORE) and triage each study",
        description="Listens for DICOM associations (receiver.ae_title, receiver.port) from "
        "the allowed calling AEs, stores every instance durably before acknowledging it, and "
        "triages a study once it has been quiet for receiver.study_quiet_s (or, while it "
        "keeps receiving, every receiver.study_max_wait_s). Runs until SIGTERM or Ctrl-C.",
    )
    receive.add_argument("--port", type=int, help="override receiver.port")
    receive.add_argument("--ae-title", help="override receiver.ae_title")
    receive.set_defaults(handler=_receive)

    health = sub.add_parser(
        "health",
        parents=[common],
        help="ask a running watch or receive service whether it is healthy (exit 0 or 1)",
        description="Asks the service's /health on 127.0.0.1 (metrics.watch_port or "
        "metrics.receive_port). Exit 0: ok or degraded; 1: failing or not answering.",
    )
    health.add_argument("service", choices=("watch", "receive"))
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.set_defaults(handler=_health)


def _watch(args: argparse.Namespace) -> int:
    from triage_app.headless import ServiceRuntime, stop_on_signals
    from triage_app.watch import WatchService

    settings = settings_from_args(args)
    if args.inbox is not None:
        settings = settings.with_values(**{"watch.inbox_dir": args.inbox.absolute()})
    _require_folders(
        settings,
        ("watch.inbox_dir", settings.watch_inbox),
        ("watch.done_dir", settings.watch_done),
        ("watch.quarantine_dir", settings.watch_quarantine),
        quarantine=settings.watch_quarantine,
    )
    stop = stop_on_signals()
    # A one-off run leaves delivery to `queue drain` or the running services, and serves no
    # metrics: nothing would be there to scrape them.
    with ServiceRuntime(
        settings,
        metrics_port=0 if args.once else settings.metrics_watch_port,
        disk_paths={"inbox": settings.watch_inbox},
        uploader=not args.once,
    ) as runtime:
        service = WatchService(
            settings, queue=runtime.queue, on_filed=runtime.filed, on_tick=runtime.tick
        )
        runtime.checks["inbox"] = lambda: service.unreadable.health()
        runtime.ready()
        summary = service.run(stop, once=args.once)
    message = summary.line(central_server=settings.central_url is not None)
    print_outcome(
        f"triage-app watch: {message}",
        logger=log,
        level=logging.INFO,
        message=message,
        **asdict(summary),
    )
    # A one-off run reports like `classify`; a service stopped on purpose has done its job.
    return EXIT_SOME_FAILED if args.once and summary.failed else EXIT_OK


def _receive(args: argparse.Namespace) -> int:
    from triage_app.headless import ServiceRuntime, stop_on_signals
    from triage_app.receiver import run_receiver

    settings = settings_from_args(args)
    if args.port is not None:
        settings = settings.with_values(**{"receiver.port": args.port})
    if args.ae_title is not None:
        settings = settings.with_values(**{"receiver.ae_title": args.ae_title})
    storage = settings.receiver_storage
    _require_folders(
        settings,
        ("receiver.storage_dir", storage),
        *(("receiver.storage_dir", storage / name) for name in ("incoming", "done", "quarantine")),
        quarantine=storage / "quarantine",
    )
    stop = stop_on_signals()
    with ServiceRuntime(
        settings,
        metrics_port=settings.metrics_receive_port,
        disk_paths={"storage": settings.receiver_storage},
    ) as runtime:
        watched: list[DicomReceiver] = []

        def on_tick(receiver: DicomReceiver) -> None:
            if not watched:  # the first turn: the receiver listens, its figures exist
                watched.append(receiver)
                _receiver_metrics(runtime.metrics, receiver)
                runtime.ready()
            runtime.tick()

        run_receiver(settings, stop, queue=runtime.queue, on_filed=runtime.filed, on_tick=on_tick)
    return EXIT_OK


def _require_folders(
    settings: Settings, *folders: tuple[str, Path], quarantine: Path | None = None
) -> None:
    """Refuse, before the service starts, a folder of its own that this user may not use, or
    that exists as something else (a file): a setup mistake the admin fixes (exit 2), not an
    internal error (70) at the first mkdir, nor a "temporary" one (75) restarted for ever.

    Checked: the data folder, the case store (the file, its journals and its folder), the
    outbox with a central server, the service's own ``folders`` and the code folders in its
    ``quarantine``. The key folder and its files are checked where they are read (the site
    secret, the device key); folders below the inbox, ``done/`` and the spool are not (their
    names may come from the sender, and a message must not quote them), and a file there that
    cannot be filed waits in the inbox, the service reporting it on ``/health``.
    """
    data_dir = settings.data_dir
    store = settings.case_store_path
    store_tree = data_dir if store.is_relative_to(data_dir) else store.parent
    _require_folder("paths.data_dir", data_dir, tree=data_dir)
    # SQLite makes its journals next to the store: a folder it may write in, not list.
    _require_usable("paths.case_store", store.parent, os.W_OK | os.X_OK, tree=store_tree)
    for suffix in ("", "-wal", "-shm", "-journal"):  # SQLite's own names
        journal = store.with_name(store.name + suffix)
        if journal.exists():
            _require_usable("paths.case_store", journal, os.R_OK | os.W_OK, tree=store_tree)
    if settings.central_url is not None:
        _require_folder("paths.data_dir", settings.outbox_dir, tree=data_dir)
    # A folder outside the data folder is fixed from the setting's own folder down.
    trees: dict[str, Path] = {}
    for key, path in folders:
        trees.setdefault(key, data_dir if path.is_relative_to(data_dir) else path)
        _require_folder(key, path, tree=trees[key])
    if quarantine is not None and quarantine.is_dir():
        key = next(key for key, path in folders if path == quarantine)
        for code in quarantine.iterdir():  # quarantine/<error code>/
            if code.is_dir() and not code.is_symlink():
                _require_folder(key, code, tree=trees[key])


def _require_folder(key: str, path: Path, *, tree: Path) -> None:
    try:
        not_a_folder = path.exists() and not path.is_dir()
    except OSError:
        not_a_folder = False  # it cannot be told: the access check below says why
    if not_a_folder:
        raise ConfigError(f"{key}: not a folder: {path}")
    _require_usable(key, path, FOLDER_ACCESS, tree=tree)


def _require_usable(key: str, path: Path, need: int, *, tree: Path) -> None:
    problem = access_problem(path, need, tree=tree)
    if problem is not None:
        raise ConfigError(f"{key}: cannot use {path}: {problem}")


def _receiver_metrics(metrics: ServiceMetrics, receiver: DicomReceiver) -> None:
    metrics.counter_function(
        "triage_receiver_instances_stored",
        "DICOM instances stored durably and acknowledged.",
        lambda: receiver.instances_stored,
    )
    metrics.counter_function(
        "triage_receiver_instances_refused",
        "DICOM instances refused, by reason.",
        lambda: receiver.instances_refused,
        label="reason",
    )
    metrics.counter_function(
        "triage_receiver_study_hand_overs",
        "Studies handed over to triage, by why: quiet, or max_wait (still receiving: the part "
        "received so far).",
        lambda: receiver.study_hand_overs,
        label="why",
    )
    metrics.counter_function(
        "triage_receiver_associations_rejected",
        "Associations rejected (wrong called AE, calling AE not allowed, too many).",
        lambda: receiver.associations_rejected,
    )
    metrics.gauge(
        "triage_receiver_low_disk",
        "1 while stores are refused because free disk is below the reserve.",
        function=lambda: float(receiver.low_disk),
    )


def _health(args: argparse.Namespace) -> int:
    from triage_app.metrics import probe_health

    settings = settings_from_args(args)
    port = settings.metrics_watch_port if args.service == "watch" else settings.metrics_receive_port
    if port == 0:
        print(
            f"triage-app health: {args.service}: metrics are turned off (port 0)", file=sys.stderr
        )
        return EXIT_USAGE
    code, line = probe_health(port, timeout_s=args.timeout)
    print(f"{args.service}: {line}")
    return code
