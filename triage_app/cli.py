"""``triage-app``: argument parsing and output only; every subcommand calls into the core.

Exit codes (DESIGN 4.1): 0 every input handled; 1 some inputs failed (all others were still
processed); 2 usage or configuration error; 75 (``EX_TEMPFAIL``) a temporary failure, worth
trying again (an error whose class is ``temporary``); 70 (``EX_SOFTWARE``) an unexpected error,
a bug. Errors go to stderr as one line; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from triage_app import __version__, cli_central, cli_queue, cli_services
from triage_app.admin import current_user, save_audited
from triage_app.cli_common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    read_new_secret,
    read_secret,
    settings_from_args,
)
from triage_app.config import (
    SPECS,
    THRESHOLD_KEYS,
    Settings,
    apply_change,
    describe,
    set_admin_password,
    unused_thresholds,
    verify_admin_password,
)
from triage_app.dicom.deidentify import ProfileOption
from triage_app.errors import AdminAuthError, ConfigError, TriageError, describe_unexpected
from triage_app.inputs import expand_inputs
from triage_app.logs import configure_logging, print_outcome
from triage_app.results import CaseResult, FailedInput, InputOutcome

logger = logging.getLogger("triage_app.cli")

EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): neither the input nor the settings, a bug
# EX_TEMPFAIL (sysexits.h): a condition that passes (a lock, a port not yet freed, a server
# down). Not 2: the systemd units prevent a restart on 2 only, so a service stopped by one of
# these is restarted instead of staying failed for good.
EXIT_TEMPFAIL = 75
# 128 + SIGPIPE, what the shell reports for a C filter stopped by a closed pipe: the output was
# cut short (under `set -o pipefail` the pipeline says so), yet it is neither a bug (70) nor
# "every input handled" (0), which would be untrue for the inputs never reported.
EXIT_BROKEN_PIPE = 141

RESTART_REMINDER = (
    "triage-app: note: running services (watch, receive, the desktop app) read the settings "
    "when they start; restart them to apply this (e.g. systemctl restart triage-watch "
    "triage-receive)"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        result: int = args.handler(args)
        return result
    except TriageError as err:
        if args.debug:
            logger.exception("failed")
        print_outcome(
            f"triage-app: error: {err.code}: {err}",
            logger=logger,
            level=logging.ERROR,
            message=str(err),
            code=err.code,
        )
        return EXIT_TEMPFAIL if err.temporary else EXIT_USAGE
    except KeyboardInterrupt:
        print_outcome(
            "triage-app: interrupted", logger=logger, level=logging.WARNING, message="interrupted"
        )
        return 130
    except BrokenPipeError:
        # The reader went away (`triage-app config show | head -1`): stop quietly. Python's
        # recipe: point stdout at /dev/null, so the flush at exit does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as err:  # the last resort: one line without PHI, not Python's traceback
        if args.debug:
            logger.exception("unexpected error")
        message = f"{describe_unexpected(err)}; run again with --debug for the traceback"
        print_outcome(
            f"triage-app: error: internal_error: {message}",
            logger=logger,
            level=logging.ERROR,
            message=message,
            code="internal_error",
        )
        return EXIT_INTERNAL


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, help="settings file (default: the platform's config dir)"
    )
    common.add_argument("--data-dir", type=Path, help="override paths.data_dir (case store, keys)")
    common.add_argument(
        "--model-dir", type=Path, help="override paths.model_dir (a model bundle folder)"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    common.add_argument("--debug", action="store_true", help="debug logging and tracebacks")

    # Common options live on the leaf commands only: argparse lets a subcommand's default
    # overwrite a value given before the subcommand name.
    parser = argparse.ArgumentParser(prog="triage-app", description="On-device DICOM triage.")
    parser.add_argument("--version", action="version", version=f"triage-app {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = sub.add_parser(
        "classify",
        parents=[common],
        help="triage DICOM files or folders; one JSON object per input file",
        description="Runs the full pipeline on each file (folders recursively) and prints one "
        "JSON object per input (JSON Lines). Results are recorded in the local case store.",
    )
    classify.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    classify.add_argument(
        "--workers", type=int, help="worker processes (default: processing.workers)"
    )
    classify.set_defaults(handler=_classify)

    deidentify = sub.add_parser(
        "deidentify",
        parents=[common],
        help="de-identify DICOM files or folders into DST (PS3.15 Annex E); JSON Lines report",
        description="Applies the PS3.15 Annex E Basic Profile (and the selected options) to "
        "each file (folders recursively) and writes it under DST as "
        "<study>/<series>/<instance>.dcm, names derived from the de-identified UIDs. Prints one "
        "JSON object per input. The links from pseudonyms back to the originals are kept in the "
        "local case store only.",
    )
    deidentify.add_argument("sources", nargs="+", type=Path, metavar="SRC")
    deidentify.add_argument("destination", type=Path, metavar="DST")
    deidentify.add_argument(
        "--option",
        dest="options",
        action="append",
        choices=[option.value for option in ProfileOption],
        metavar="OPTION",
        help="a profile option (repeat for several); given at least once, these replace the "
        "deidentify.options setting. One of: "
        + ", ".join(option.value for option in ProfileOption),
    )
    deidentify.add_argument(
        "--workers", type=int, help="worker processes (default: processing.workers)"
    )
    deidentify.set_defaults(handler=_deidentify)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="triage the bundled synthetic sample images and show the split",
        description="Runs the pipeline on the bundled synthetic images in a throwaway data "
        "folder (unless --data-dir is given) and prints each decision next to the truth.",
    )
    demo.add_argument("--json", action="store_true", help="print JSON Lines instead of a table")
    demo.set_defaults(handler=_demo)

    gui = sub.add_parser(
        "gui",
        parents=[common],
        help="the clinician desktop app: worklist, viewer, import",
        description="Opens the desktop app on the local case store: the worklist (most urgent "
        "first), the image viewer with the device's result as a separate layer, and import of "
        "files or folders. Needs the 'gui' extra (PySide6).",
    )
    gui.set_defaults(handler=_gui)
    cli_services.register(sub, common)
    cli_queue.register(sub, common)
    cli_central.register(sub, common)
    device = sub.add_parser(
        "device",
        parents=[common],
        help="this device's id and public key (to register it with the central server)",
    )
    device.set_defaults(handler=_device)

    config = sub.add_parser("config", help="show, check or change settings")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser(
        "show", parents=[common], help="every setting, its value and meaning"
    )
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_config_show)
    get = config_sub.add_parser("get", parents=[common], help="print one setting's value")
    get.add_argument("key")
    get.set_defaults(handler=_config_get)
    set_ = config_sub.add_parser(
        "set", parents=[common], help="change one setting (admin fields need the admin password)"
    )
    set_.add_argument("key")
    set_.add_argument("value")
    set_.add_argument(
        "--admin-password-stdin",
        action="store_true",
        help="read the admin password from standard input instead of prompting",
    )
    set_.set_defaults(handler=_config_set)
    validate = config_sub.add_parser("validate", parents=[common], help="check the settings file")
    validate.set_defaults(handler=_config_validate)
    password = config_sub.add_parser(
        "set-admin-password",
        parents=[common],
        help="set the admin password (the current one is required to change it)",
    )
    password.add_argument("--stdin", action="store_true", help="read passwords from standard input")
    password.set_defaults(handler=_config_set_admin_password)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    # A service's log is its only voice, so services log progress without -v.
    service = hasattr(args, "log_format")  # cli_common.add_log_format_option
    level = logging.INFO if args.verbose or service else logging.WARNING
    configure_logging(
        logging.DEBUG if args.debug else level,
        json_lines=getattr(args, "log_format", "text") == "json",
    )


# --- classify and demo -------------------------------------------------------------------------


def _triage(
    settings: Settings, files: list[Path], out: TextIO, *, as_json: bool
) -> list[InputOutcome]:
    # Imported here: ONNX Runtime and OpenCV cost a quarter of a second that the commands
    # without a model (deidentify, config) should not pay at start-up.
    from triage_app.batch import triage_and_record
    from triage_app.escalation.service import open_escalation

    outcomes: list[InputOutcome] = []
    # With a central server configured, escalated cases are sealed into the outbox here;
    # `queue drain` (or the GUI / watch service) sends them.
    link = open_escalation(settings)
    try:
        queue = link.queue if link is not None else None
        for outcome in triage_and_record(files, settings, queue=queue):
            outcomes.append(outcome)
            if as_json:
                print(json.dumps(outcome.to_json()), file=out, flush=True)
            if isinstance(outcome, FailedInput):
                print(
                    f"triage-app: {outcome.path}: {outcome.code}: {outcome.message}",
                    file=sys.stderr,
                )
    finally:
        if link is not None:
            link.close()
    return outcomes


def _summary(outcomes: Sequence[InputOutcome], seconds: float) -> str:
    cases = [o for o in outcomes if isinstance(o, CaseResult)]
    decisions = Counter(c.decision for c in cases)
    failed = len(outcomes) - len(cases)
    local = decisions["normal"] + decisions["abnormal"]
    return (
        f"{len(outcomes)} inputs in {seconds:.1f} s: {local} decided locally "
        f"({decisions['normal']} normal, {decisions['abnormal']} abnormal), "
        f"{decisions['escalate']} escalated, {failed} failed"
    )


def _gui(args: argparse.Namespace) -> int:
    try:
        from triage_app.gui.app import run_gui
    except ImportError as err:
        raise ConfigError(
            f"the desktop app needs PySide6 (pip install 'triage-app[gui]'): {err}"
        ) from None
    return run_gui(settings_from_args(args), config_path=args.config)


def _classify(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    files = expand_inputs(args.paths)
    started = time.perf_counter()
    outcomes = _triage(settings, files, sys.stdout, as_json=True)
    print(_summary(outcomes, time.perf_counter() - started), file=sys.stderr)
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_SOME_FAILED


def _demo(args: argparse.Namespace) -> int:
    from triage_app.demo import run_demo
    from triage_app.demo_data import demo_images

    _, truth = demo_images()
    with tempfile.TemporaryDirectory(prefix="triage-demo-") as scratch:
        data_dir = args.data_dir or Path(scratch)
        started = time.perf_counter()
        run = run_demo(data_dir)
        seconds = time.perf_counter() - started
    if args.json:
        for outcome in run.outcomes:
            record = outcome.to_json()
            if isinstance(outcome, CaseResult) and outcome.case_id in run.verdicts:
                record["central_verdict"] = run.verdicts[outcome.case_id]
            print(json.dumps(record))
    else:
        _print_demo_table(run.outcomes, truth, run.verdicts, run.states)
    out = sys.stderr if args.json else sys.stdout
    print(_summary(run.outcomes, seconds), file=out)
    delivered = [a for a in run.attempts if a.outcome == "delivered"]
    print(
        f"central server {run.server_url} (model: {run.central_model or 'none'}): "
        f"{len(delivered)} delivered exactly once "
        f"({sum(a.deliveries == 1 for a in delivered)} first deliveries), "
        f"{len(run.verdicts)} verdicts back",
        file=out,
    )
    return EXIT_OK if all(o.ok for o in run.outcomes) else EXIT_SOME_FAILED


def _deidentify(args: argparse.Namespace) -> int:
    from triage_app.deid_batch import DeidentifiedOutput, deidentify_sources

    started = time.perf_counter()
    counts: Counter[str] = Counter()
    outcomes = deidentify_sources(args.sources, args.destination, settings_from_args(args))
    for outcome in outcomes:
        print(json.dumps(outcome.to_json()), flush=True)
        if isinstance(outcome, DeidentifiedOutput):
            counts["done"] += 1
            counts["burned_in_risk"] += bool(outcome.deidentification["burned_in_risk"])
        else:
            counts["failed"] += 1
            print(f"triage-app: {outcome.path}: {outcome.code}: {outcome.message}", file=sys.stderr)
    print(
        f"{counts['done'] + counts['failed']} inputs in {time.perf_counter() - started:.1f} s: "
        f"{counts['done']} de-identified into {args.destination.absolute()} "
        f"({counts['burned_in_risk']} at burned-in text risk), "
        f"{counts['failed']} failed",
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if counts["failed"] else EXIT_OK


def _print_demo_table(
    outcomes: Sequence[InputOutcome],
    truth: dict[str, str],
    verdicts: dict[str, dict[str, Any]],
    states: dict[str, str],
) -> None:
    print(
        f"{'image':<30} {'truth':<13} {'decision':<10} {'reason':<19} {'score':>6}  "
        f"{'escalation':<18} central"
    )
    right = wrong = 0
    for outcome in outcomes:
        name = Path(outcome.path).name
        expected = truth.get(name, "?")
        if not isinstance(outcome, CaseResult):
            print(f"{name:<30} {expected:<13} {'failed':<10} {outcome.code:<19}")
            continue
        escalation = central = ""
        if outcome.decision in ("normal", "abnormal"):
            agrees = outcome.decision == expected
            right, wrong = right + agrees, wrong + (not agrees)
            central = "" if agrees else "LOCAL ERROR"
        elif outcome.escalation is not None:
            escalation = states.get(outcome.case_id, outcome.escalation.state)
            verdict = verdicts.get(outcome.case_id)
            if verdict is not None and verdict.get("error"):
                central = f"no verdict: {verdict['error']['code']}"
            elif verdict is not None:
                central = f"{verdict['verdict']} ({float(verdict['score']):.3f})"
            elif outcome.escalation.reason:
                central = f"not sent: {outcome.escalation.reason}"
        print(
            f"{name:<30} {expected:<13} {outcome.decision:<10} {outcome.reason:<19} "
            f"{outcome.score:>6.3f}  {escalation:<18} {central}"
        )
    print(f"local decisions matching the truth: {right}/{right + wrong}")


def _device(args: argparse.Namespace) -> int:
    from triage_app.escalation.keys import load_or_create_device_identity

    identity = load_or_create_device_identity(settings_from_args(args).data_dir)
    print(json.dumps({"device_id": identity.device_id, "public_key": identity.public_key_b64()}))
    return EXIT_OK


# --- config ------------------------------------------------------------------------------------


def _config_show(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    rows = describe()
    if args.json:
        doc = {row.key: settings.get_text(row.key) for row in rows}
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    for row in rows:
        marker = " [admin]" if row.admin else ""
        print(f"{row.key} = {settings.get_text(row.key)}{marker}")
        print(f"    {row.description} ({row.type}; default {row.default})")
    return EXIT_OK


def _config_get(args: argparse.Namespace) -> int:
    print(settings_from_args(args).get_text(args.key))
    return EXIT_OK


def _config_validate(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    changed = settings.changed_keys()
    print(f"settings are valid ({len(changed)} differ from the defaults)")
    return EXIT_OK


def _config_set(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, for_saving=True)
    spec = SPECS.get(args.key)
    # Without an admin password set there is nothing to ask: apply_change refuses clearly.
    ask = spec is not None and spec.admin and settings.has_admin_password
    password = (
        read_secret("admin password: ", args.admin_password_stdin, flag="--admin-password-stdin")
        if ask
        else None
    )
    updated, change = apply_change(settings, args.key, args.value, admin_password=password)
    if change.old == change.new:
        # Nothing to save or audit: the file is left as it is (bytes, owner, time), which
        # matters when root runs this on the service user's file.
        print(f"{change.key}: {change.new!s} (unchanged)")
        return EXIT_OK
    # The audit entry lands in the case store the saved file configures, whatever --data-dir or
    # the environment say: the log must be found next to the settings it describes.
    path = save_audited(
        updated,
        args.config,
        updated.case_store_path,
        base=settings,  # only this key is written: others saved meanwhile stay
        actor=current_user(),
        action="config.set",
        change=change,
    )
    print(f"{change.key}: {change.old!s} -> {change.new!s} (saved to {path})")
    unused = unused_thresholds(updated) if change.key in THRESHOLD_KEYS else None
    if unused is not None:
        print(f"triage-app: warning: {unused}", file=sys.stderr)
    print(RESTART_REMINDER, file=sys.stderr)
    return EXIT_OK


def _config_set_admin_password(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, for_saving=True)
    if settings.has_admin_password:
        current = read_secret("current admin password: ", args.stdin, flag="--stdin")
        if not verify_admin_password(settings, current):
            raise AdminAuthError("the current admin password is wrong")
    new = read_new_secret("new admin password: ", args.stdin, flag="--stdin")
    path = save_audited(
        set_admin_password(settings, new),
        args.config,
        settings.case_store_path,  # the file's own store, as for `config set`
        base=settings,
        actor=current_user(),
        action="config.admin_password_set",
    )
    print(f"admin password set (saved to {path})")
    print(RESTART_REMINDER, file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
