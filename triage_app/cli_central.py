"""``triage-app central ...``: run and administer the central diagnostic server (DESIGN 4.1).

The server's modules (FastAPI, uvicorn, the central model) are imported by the handlers only,
so the device's commands never load them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage_app.central.config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PARALLEL_UPLOADS,
    DEFAULT_UPLOAD_IDLE_TIMEOUT_S,
)
from triage_app.cli_common import EXIT_OK, add_log_format_option

if TYPE_CHECKING:
    from triage_app.central.config import CentralConfig

# Ten years: longer than any envelope waits, and far below what a date can hold (a huge value
# made timedelta overflow after the key ring had already been rotated).
MAX_DAYS = 3650


def _days(least: int) -> Callable[[str], int]:
    """An argparse type: whole days from ``least`` to :data:`MAX_DAYS`, checked before acting."""

    def parse(text: str) -> int:
        try:
            days = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number of days (got {text!r})"
            ) from None
        if not least <= days <= MAX_DAYS:
            raise argparse.ArgumentTypeError(f"must be {least} to {MAX_DAYS} days (got {days})")
        return days

    return parse


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``central`` command and its actions to the top-level subparsers."""
    central = sub.add_parser("central", help="the central diagnostic server")
    actions = central.add_subparsers(dest="central_command", required=True, metavar="ACTION")

    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--data-dir", type=Path, required=True, help="the server's data folder (keys, cases)"
    )
    server.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    server.add_argument("--debug", action="store_true", help="debug logging and tracebacks")

    serve = actions.add_parser(
        "serve",
        parents=[server],
        help="receive escalated cases over HTTPS and return verdicts",
        description="Runs the central API (POST /v1/cases/{id}, GET /v1/cases/{id}/verdict, "
        "/v1/health, /v1/keys, /metrics) over TLS until SIGINT or SIGTERM. Keys are created "
        "in the data folder on first run. Under systemd (Type=notify) it says READY=1 once it "
        "listens, pings the watchdog (WatchdogSec=) and says STOPPING=1 when it stops. Exit 0 "
        "after SIGINT or SIGTERM, 2 for a configuration mistake, 75 for a temporary failure "
        "(its port taken by another program, its database locked): worth starting again.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default 127.0.0.1; 0.0.0.0 for every IPv4 address)",
    )
    serve.add_argument(
        "--port", type=int, default=8443, help="the TCP port to listen on (default 8443)"
    )
    serve.add_argument("--tls-cert", type=Path, required=True, help="server certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, required=True, help="its private key (PEM)")
    serve.add_argument(
        "--model-dir",
        type=Path,
        help="the central model bundle (default: models/central-dx-demo if present)",
    )
    serve.add_argument(
        "--max-queue-age-days",
        type=_days(1),
        default=30,
        help="oldest envelope accepted, and how long retired keys are kept (default 30)",
    )
    serve.add_argument(
        "--max-parallel-uploads",
        type=int,
        default=DEFAULT_MAX_PARALLEL_UPLOADS,
        help="uploads checked and stored at once; more wait, unread "
        f"(default {DEFAULT_MAX_PARALLEL_UPLOADS})",
    )
    serve.add_argument(
        "--upload-idle-timeout",
        type=float,
        default=DEFAULT_UPLOAD_IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="cut off (408) an upload that sends nothing this long "
        f"(default {DEFAULT_UPLOAD_IDLE_TIMEOUT_S:g})",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="client connections served at once, idle ones included; a request on one more "
        f"is answered 503 at once and devices retry later (default {DEFAULT_MAX_CONNECTIONS})",
    )
    # As the device services: its log is its only voice ("listening on", the start-up
    # clean-up counts), so it logs progress without -v, as JSON Lines for the journal.
    add_log_format_option(serve)
    serve.set_defaults(handler=_serve)

    add = actions.add_parser("add-device", parents=[server], help="register a device's public key")
    add.add_argument("public_key", help="the device's Ed25519 key, as `triage-app device` prints")
    add.add_argument("--label", default="", help="a name for people (site, room)")
    add.set_defaults(handler=_add_device)

    revoke = actions.add_parser(
        "revoke-device", parents=[server], help="refuse everything a device sends from now on"
    )
    revoke.add_argument("device_id")
    revoke.set_defaults(handler=_revoke_device)

    devices = actions.add_parser("devices", parents=[server], help="list registered devices")
    devices.set_defaults(handler=_devices)

    cases = actions.add_parser(
        "cases", parents=[server], help="received cases with deliveries and verdicts"
    )
    cases.add_argument("--json", action="store_true", help="one JSON object per case")
    cases.set_defaults(handler=_cases)

    cert = actions.add_parser(
        "make-cert",
        parents=[server],
        help="a self-signed TLS certificate for the server, and the pin devices need",
        description="Writes <data-dir>/central/tls/server-cert.pem and server-key.pem (0600) "
        "and prints the SHA-256 devices put in escalation.tls_pin. Refuses if either file "
        "exists: a new certificate has a new pin, and every device refuses the server until "
        "it is given that pin.",
    )
    cert.add_argument(
        "--host",
        dest="hosts",
        action="append",
        help="a name or address the server is reached by (repeat; default: loopback names)",
    )
    cert.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key and certificate (then set the new tls_pin on every "
        "device, and restart the server)",
    )
    cert.set_defaults(handler=_make_cert)

    keys = actions.add_parser(
        "keys",
        parents=[server],
        help="the public keys devices need (JSON)",
        description="Prints the server's public keys; --rotate and --prune-days change the key "
        "files. A running server keeps the keys it read when it started until it is restarted: "
        "only then does it announce a rotated-in key on GET /v1/keys and open envelopes sealed "
        "to it (422 unknown_server_key before), and drop pruned keys.",
    )
    keys.add_argument(
        "--rotate",
        action="store_true",
        help="make a new active encryption key (restart a running server to use it)",
    )
    keys.add_argument(
        "--prune-days",
        type=_days(0),
        help="delete retired keys retired longer than this (the longest queue age)",
    )
    keys.set_defaults(handler=_keys)


def _offline_config(args: argparse.Namespace) -> CentralConfig:
    """A configuration for the administrative actions, which do not listen."""
    from triage_app.central.config import CentralConfig

    return CentralConfig(data_dir=args.data_dir, allow_plain_http=True)


def _server_config(args: argparse.Namespace) -> CentralConfig:
    """:func:`_offline_config` for the actions on the server's own data (devices, cases, keys).

    Refused when the folder holds no central store: ``central serve`` makes it when it first
    starts, so a folder without one is not the server's, and the action would register a
    device, or print keys, in a store and key ring the server never reads.
    """
    from triage_app.errors import ConfigError

    config = _offline_config(args)
    if not config.db_path.is_file():
        raise ConfigError(
            f"central: no central store in {config.data_dir} ({config.db_path.name} is "
            "missing): give the --data-dir `central serve` runs with (the unit's is "
            "/var/lib/triage-central); the server makes its store when it first starts"
        )
    return config


CENTRAL_MODEL_NAME = "central-dx-demo"


def default_central_model() -> Path | None:
    """The central model shipped with the project, if it is installed."""
    from triage_app.errors import ModelNotFoundError
    from triage_app.model.manifest import find_bundle

    try:
        return find_bundle(CENTRAL_MODEL_NAME)
    except ModelNotFoundError:
        return None


def _serve(args: argparse.Namespace) -> int:
    from triage_app.central.config import CentralConfig
    from triage_app.central.server import serve

    config = CentralConfig(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        model_dir=args.model_dir or default_central_model(),
        max_envelope_age=timedelta(days=args.max_queue_age_days),
        max_parallel_uploads=args.max_parallel_uploads,
        upload_idle_timeout_s=args.upload_idle_timeout,
        max_connections=args.max_connections,
    )
    serve(config)
    return EXIT_OK


def _add_device(args: argparse.Namespace) -> int:
    from triage_app.central.storage import CentralStore

    with CentralStore.for_config(_server_config(args)) as store:
        record = store.registry.add_device(args.public_key, args.label)
    print(json.dumps(record.to_json()))
    return EXIT_OK


def _revoke_device(args: argparse.Namespace) -> int:
    from triage_app.central.storage import CentralStore

    with CentralStore.for_config(_server_config(args)) as store:
        record = store.registry.revoke_device(args.device_id)
    print(json.dumps(record.to_json()))
    return EXIT_OK


def _devices(args: argparse.Namespace) -> int:
    from triage_app.central.storage import CentralStore

    with CentralStore.for_config(_server_config(args)) as store:
        for record in store.registry.list_devices():
            print(json.dumps(record.to_json()))
    return EXIT_OK


def _cases(args: argparse.Namespace) -> int:
    from triage_app.central.storage import CentralStore

    with CentralStore.for_config(_server_config(args)) as store:
        cases = store.cases()
    if args.json:
        for case in cases:
            print(json.dumps(case.to_json()))
        return EXIT_OK
    print(f"{'case_id':<16} {'device':<20} {'deliveries':>10}  {'verdict':<9} received")
    for case in cases:
        verdict = case.verdict.verdict if case.verdict is not None else "pending"
        print(
            f"{case.case_id[:16]:<16} {case.device_id:<20} {case.deliveries:>10}  "
            f"{verdict:<9} {case.received_at}"
        )
    return EXIT_OK


def _keys(args: argparse.Namespace) -> int:
    from triage_app.central.server import load_key_ring

    ring = load_key_ring(_server_config(args))
    if args.rotate:
        ring.rotate()
    if args.prune_days is not None:
        ring.prune(timedelta(days=args.prune_days))
    print(json.dumps(ring.public_info(), indent=2))
    return EXIT_OK


def _make_cert(args: argparse.Namespace) -> int:
    from triage_app.central.certificates import DEFAULT_HOSTS, make_self_signed

    config = _offline_config(args)
    made = make_self_signed(
        config.central_dir / "tls", args.hosts or DEFAULT_HOSTS, force=args.force
    )
    print(json.dumps({"cert": str(made.cert), "key": str(made.key), "tls_pin": made.sha256}))
    return EXIT_OK
