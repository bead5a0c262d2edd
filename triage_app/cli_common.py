"""What every ``triage-app`` command module shares: settings from flags, secrets, exit codes."""

from __future__ import annotations

import argparse
import getpass
import sys

from triage_app.config import Settings, load_settings
from triage_app.errors import AdminAuthError, ConfigError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def add_log_format_option(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` of the services (``watch``, ``receive``, ``central serve``): having it
    also makes the command log its progress without ``-v`` (``cli._configure_logging``)."""
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: one JSON object per log line, for journald or a log shipper",
    )


def settings_from_args(args: argparse.Namespace, *, for_saving: bool = False) -> Settings:
    """The settings a command runs with: the file, the environment, then the flags.

    An explicit ``--config`` that does not exist is an error (a typo must not run on the
    defaults), except ``for_saving``: ``config set`` and ``set-admin-password`` create the file.
    """
    config = getattr(args, "config", None)
    if for_saving:
        # What is saved must be the file's own values, not the environment's or the flags';
        # the audit entry goes with them too (to the case store this file configures).
        return load_settings(config, env={})
    if config is not None:
        try:
            config.stat()
        except FileNotFoundError:
            raise ConfigError(f"{config}: no such settings file (--config)") from None
        except OSError:
            pass  # there, but not for this user: reading it says why, with the fix
    overrides: dict[str, object] = {}
    # Relative folders mean "from here", as every other path typed on the command line does.
    if getattr(args, "data_dir", None) is not None:
        overrides["paths.data_dir"] = args.data_dir.expanduser().absolute()
    if getattr(args, "model_dir", None) is not None:
        overrides["paths.model_dir"] = args.model_dir.expanduser().absolute()
    if getattr(args, "workers", None) is not None:
        overrides["processing.workers"] = args.workers  # 0 is refused by the setting's bounds
    if getattr(args, "options", None) is not None:
        overrides["deidentify.options"] = args.options
    return load_settings(config, overrides=overrides)


def read_secret(prompt: str, from_stdin: bool, *, flag: str) -> str:
    """A password from stdin (``from_stdin``) or typed on the terminal. ``flag`` is the
    caller's option that pipes it (``--admin-password-stdin``, ``--stdin``): without a
    terminal, the error must name one the admin can type, not a pattern."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise AdminAuthError(f"no terminal to ask for the password on; pipe it with {flag}")
    try:
        return getpass.getpass(prompt)
    except EOFError:
        return ""


def read_new_secret(prompt: str, from_stdin: bool, *, flag: str) -> str:
    """A new password: typed twice on a terminal, since a typo there cannot be seen."""
    secret = read_secret(prompt, from_stdin, flag=flag)
    again = f"{prompt.rstrip(': ')} (again): "
    if not from_stdin and read_secret(again, from_stdin, flag=flag) != secret:
        raise AdminAuthError("the two passwords differ; nothing was changed")
    return secret
