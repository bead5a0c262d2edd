"""``python -m triage_app`` is the same as the ``triage-app`` command."""

from triage_app.cli import main

raise SystemExit(main())
