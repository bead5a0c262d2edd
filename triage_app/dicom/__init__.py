"""DICOM reading, validation and pixel decoding.

``load_image`` turns a file (or its bytes) into a ``DicomImage``: the middle frame decoded to a
2-D array plus non-identifying header facts (``ImageInfo``). ``read_dataset`` is the header-only
fast path. Every failure is a ``triage_app.errors.InputError`` with a stable code.
"""

from triage_app.dicom.image import DicomImage, ImageInfo
from triage_app.dicom.reader import load_image, read_dataset

__all__ = ["DicomImage", "ImageInfo", "load_image", "read_dataset"]
