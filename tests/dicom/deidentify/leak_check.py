"""The leak checker: every planted identifier found in a de-identified output, with where.

It looks in three places, independently of how the engine works:

* the raw bytes of the output file, case-insensitively (so a value that survived anywhere —
  the preamble, a private element, an undecodable UN value, padding, the file meta — is found
  even if a DICOM parser would never show it);
* every decoded element value of the data set and its file meta, at every sequence depth
  (so a hit says which attribute it is in);
* the output file's name and path.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tests.dicom.deidentify.corpus import Planted, PlantedIdentifiers
from triage_app.dicom.reader import quiet_pydicom

_CONTEXT = 24


@dataclass(frozen=True)
class Leak:
    """One planted value found in an output."""

    planted: Planted
    where: str  # "path", "preamble", "bytes @0x1a2b", or an attribute path such as
    # "(0008,1140) ReferencedImageSequence[0] > (0010,0010) PatientName"
    context: str  # the text around the hit

    def __str__(self) -> str:
        return f"{self.planted.kind.value} {self.planted.value!r} in {self.where}: {self.context!r}"


def find_leaks(
    planted: PlantedIdentifiers,
    *,
    data: bytes | None = None,
    dataset: Dataset | None = None,
    path: PurePath | str | None = None,
) -> list[Leak]:
    """Every planted value in ``data`` (raw and decoded), ``dataset`` and ``path``."""
    leaks: list[Leak] = []
    if path is not None:
        leaks += _in_text(planted, str(path), "path")
    if data is not None:
        leaks += _in_bytes(planted, data)
        if data[128:132] == b"DICM":  # name the preamble, which no parser shows
            leaks += _in_text(planted, data[:128].decode("latin-1"), "preamble")
        with quiet_pydicom():
            parsed = dcmread(io.BytesIO(data), force=True)
        leaks += _in_dataset(planted, parsed)
    if dataset is not None:
        leaks += _in_dataset(planted, dataset)
    return leaks


def _in_text(planted: PlantedIdentifiers, text: str, where: str) -> Iterator[Leak]:
    lowered = text.lower()
    for item in planted:
        needle = item.value.lower()
        start = lowered.find(needle)
        if start >= 0:
            context = text[max(0, start - _CONTEXT) : start + len(needle) + _CONTEXT]
            yield Leak(item, where, context)


def _in_bytes(planted: PlantedIdentifiers, data: bytes) -> Iterator[Leak]:
    lowered = data.lower()
    for item in planted:
        needle = item.value.lower().encode("utf-8")
        start = lowered.find(needle)
        while start >= 0:
            around = data[max(0, start - _CONTEXT) : start + len(needle) + _CONTEXT]
            yield Leak(item, f"bytes @0x{start:x}", around.decode("latin-1"))
            start = lowered.find(needle, start + 1)


def _in_dataset(planted: PlantedIdentifiers, ds: Dataset) -> Iterator[Leak]:
    with quiet_pydicom():  # decoding values must not warn (the suite turns warnings into errors)
        values = list(_values(ds, ""))
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            values += _values(meta, "file meta > ")
    for where, text in values:
        yield from _in_text(planted, text, where)


def _values(ds: Dataset, prefix: str) -> Iterator[tuple[str, str]]:
    """(attribute path, value as text) for every element, depth first."""
    for element in ds:
        where = f"{prefix}{element.tag} {element.keyword or element.name}"
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                yield from _values(item, f"{where}[{index}] > ")
        else:
            yield where, _text(element.value)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    return str(value)
