"""What every ``triage-app`` command module shares: settings from flags, secrets, exit codes."""

from __future__ import annotations

import argparse
import getpass
import sys

from triage_app.config import Settings, load_settings
from triage_app.errors import AdminAuthError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def settings_from_args(args: argparse.Namespace, *, for_saving: bool = False) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "data_dir", None):
        overrides["paths.data_dir"] = args.data_dir
    if getattr(args, "model_dir", None):
        overrides["paths.model_dir"] = args.model_dir
    if getattr(args, "workers", None):
        overrides["processing.workers"] = args.workers
    if getattr(args, "options", None):
        overrides["deidentify.options"] = args.options
    if for_saving:
        # What is saved must be the file's own values, not the environment's or the flags';
        # the effective settings (e.g. which case store gets the audit entry) come from
        # a second call without ``for_saving``.
        return load_settings(args.config, env={})
    return load_settings(args.config, overrides=overrides)


def read_secret(prompt: str, from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise AdminAuthError("no terminal to ask for the password on; pipe it with --*-stdin")
    try:
        return getpass.getpass(prompt)
    except EOFError:
        return ""
