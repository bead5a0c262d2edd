"""On-device DICOM triage: de-identify, classify locally, escalate the hard cases.

The core (``pipeline``, ``dicom``, ``model``, ``policy``, ``store``) is free of Qt, argparse and
web frameworks; the CLI, GUI, watch service, receiver and central server are shells around it.
"""

import logging
import sys

__version__ = "0.1.0"

# Library code only logs; entry points decide where the records go (as pydicom does).
logging.getLogger(__name__).addHandler(logging.NullHandler())


def _import_pydicom_without_requests() -> None:
    """Import pydicom while ``requests`` looks absent to it.

    pydicom imports requests (about 40 ms) only to download its own test data, which the app
    never does (it falls back to urllib if it ever had to). Every command pays pydicom's import
    at start-up, and most of them never open a connection; the uploader imports requests itself
    when it needs it, unaffected.
    """
    if "pydicom" in sys.modules or "requests" in sys.modules:
        return
    sys.modules["requests"] = None  # type: ignore[assignment]  # "import requests" fails
    try:
        import pydicom  # noqa: F401
    finally:
        del sys.modules["requests"]


_import_pydicom_without_requests()
