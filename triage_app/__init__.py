"""On-device DICOM triage: de-identify, classify locally, escalate the hard cases.

The core (``pipeline``, ``dicom``, ``model``, ``policy``, ``store``) is free of Qt, argparse and
web frameworks; the CLI, GUI, watch service, receiver and central server are shells around it.
"""

import logging

__version__ = "0.1.0"

# Library code only logs; entry points decide where the records go (as pydicom does).
logging.getLogger(__name__).addHandler(logging.NullHandler())
