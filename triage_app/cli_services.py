"""``triage-app watch`` and ``triage-app receive``: the unattended services, and ``health``."""

from __future__ import annotations

import argparse
import logging
import sys
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

if TYPE_CHECKING:
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
        ("watch.inbox_dir", settings.watch_inbox),
        ("watch.done_dir", settings.watch_done),
        ("watch.quarantine_dir", settings.watch_quarantine),
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
        runtime.ready()
        summary = service.run(stop, once=args.once)
    print(
        f"triage-app watch: {summary.triaged} triaged, {summary.quarantined} quarantined, "
        f"{summary.left_incomplete} left in the inbox (still being written)",
        file=sys.stderr,
    )
    # A one-off run reports like `classify`; a service stopped on purpose has done its job.
    return EXIT_SOME_FAILED if args.once and summary.quarantined else EXIT_OK


def _receive(args: argparse.Namespace) -> int:
    from triage_app.headless import ServiceRuntime, stop_on_signals
    from triage_app.receiver import run_receiver

    settings = settings_from_args(args)
    if args.port is not None:
        settings = settings.with_values(**{"receiver.port": args.port})
    if args.ae_title is not None:
        settings = settings.with_values(**{"receiver.ae_title": args.ae_title})
    _require_folders(("receiver.storage_dir", settings.receiver_storage))
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


def _require_folders(*folders: tuple[str, Path]) -> None:
    """Refuse a service folder that exists as something else (a file): a settings mistake the
    admin fixes, not a crash (exit 70) at the first mkdir."""
    for key, path in folders:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}: not a folder: {path}")


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
