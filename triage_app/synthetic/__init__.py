"""Synthetic chest phantoms written as real DICOM: the project's own training and test data."""

from triage_app.synthetic.dicom_writer import (
    phantom_to_dataset,
    read_labels,
    write_phantom,
    write_phantom_set,
)
from triage_app.synthetic.phantom import LABELS, Phantom, PhantomConfig, render_phantom

__all__ = [
    "LABELS",
    "Phantom",
    "PhantomConfig",
    "phantom_to_dataset",
    "read_labels",
    "render_phantom",
    "write_phantom",
    "write_phantom_set",
]
