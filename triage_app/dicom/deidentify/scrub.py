"""The residual scrub: the patient's own identifiers, wherever text survived the profile.

The profile removes the attributes that are *meant* to identify; people still type names into
descriptions, IDs into comments and birth dates into SR text. After the profile, every remaining
text value (and any retained private or unknown bytes) is searched for this patient's name parts,
IDs, birth date and accession number, and each hit is removed.

Raw element bytes are checked first with a cheap lower-case byte search, so the common case — no
hit — never converts an element; only a hit decodes and rewrites the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

# Shorter tokens would erase ordinary words and numbers; a two-letter surname still counts.
MIN_NAME_PART = 2
MIN_ID = 2
# IDs at least this long are also removed inside longer tokens ("MRN12345678", UID components).
MIN_EMBEDDED_ID = 6

_NAME_SPLIT = re.compile(r"[\^=\s,.;]+")
_ISO_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
# Dates written in free text, any order of day/month/year with -, / or . between.
_FREE_TEXT_DATE = re.compile(
    r"(?<!\d)(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|"
    r"(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))(?!\d)"
)


def _text(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | PersonName):
        return [str(value)]
    if isinstance(value, Iterable):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def _date_forms(date: str) -> list[str]:
    """A DA value in the ways people write it (ISO, European, US; with -, / or .)."""
    match = _ISO_DATE.match(date.strip())
    if not match:
        return [date.strip()] if date.strip() else []
    year, month, day = match.groups()
    forms = {f"{year}{month}{day}"}
    for sep in "-/.":
        forms |= {f"{year}{sep}{month}{sep}{day}", f"{day}{sep}{month}{sep}{year}"}
        forms |= {f"{month}{sep}{day}{sep}{year}"}
    return sorted(forms)


@dataclass(frozen=True)
class PatientIdentifiers:
    """What identifies this patient, captured from the original before anything is changed."""

    name_parts: tuple[str, ...]
    ids: tuple[str, ...]  # Patient ID, other IDs, accession number
    birth_dates: tuple[str, ...]  # the birth date in every common written form
    patient_key: str  # what keys the patient pseudonym and date shift ("" if nothing known)

    @classmethod
    def capture(cls, ds: Dataset) -> PatientIdentifiers:
        names: list[str] = []
        for keyword in ("PatientName", "OtherPatientNames", "PatientBirthName"):
            names += _text(ds.get(keyword))
        ids = _text(ds.get("PatientID")) + _text(ds.get("OtherPatientIDs"))
        ids += _text(ds.get("AccessionNumber"))
        for item in ds.get("OtherPatientIDsSequence") or []:
            ids += _text(item.get("PatientID"))
        parts = {p for name in names for p in _NAME_SPLIT.split(name) if len(p) >= MIN_NAME_PART}
        birth = str(ds.get("PatientBirthDate") or "")
        patient_id = str(ds.get("PatientID") or "").strip()
        key = f"id:{patient_id}" if patient_id else f"name:{ds.get('PatientName') or ''!s}"
        return cls(
            name_parts=tuple(sorted(parts, key=lambda p: (-len(p), p))),
            ids=tuple(sorted({i.strip() for i in ids if len(i.strip()) >= MIN_ID})),
            birth_dates=tuple(_date_forms(birth)),
            patient_key=key if key not in ("id:", "name:") else "",
        )


class Scrubber:
    """Removes one patient's identifiers from text and tells whether raw bytes may hold any."""

    def __init__(self, identifiers: PatientIdentifiers) -> None:
        bounded = [*identifiers.name_parts, *identifiers.ids, *identifiers.birth_dates]
        embedded = [i for i in identifiers.ids if len(i) >= MIN_EMBEDDED_ID]
        alternatives: list[str] = []
        if embedded:
            alternatives.append("|".join(re.escape(i) for i in sorted(embedded, key=len)[::-1]))
        if bounded:
            words = "|".join(re.escape(t) for t in sorted(set(bounded), key=len)[::-1])
            alternatives.append(rf"(?<![0-9A-Za-z])(?:{words})(?![0-9A-Za-z])")
        self._pattern = re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None
        needles: set[bytes] = set()
        for token in bounded:
            for encoding in ("utf-8", "latin-1"):
                try:
                    needles.add(token.lower().encode(encoding))
                except UnicodeEncodeError:
                    continue
        self._needles = tuple(needles)
        self.empty = self._pattern is None

    def may_contain(self, raw: bytes) -> bool:
        """Cheap pre-check on undecoded bytes (ASCII-compatible encodings)."""
        if not self._needles:
            return False
        lowered = raw.lower()
        return any(needle in lowered for needle in self._needles)

    def scrub(self, text: str) -> str:
        """``text`` without this patient's identifiers (spacing tidied where a hit was)."""
        if self._pattern is None:
            return text
        cleaned, hits = self._pattern.subn("", text)
        if not hits:
            return text
        return re.sub(r"[ \t]{2,}", " ", cleaned).strip()

    def clean(self, text: str) -> str:
        """The Clean action on free text: the scrub, plus every written date."""
        return _FREE_TEXT_DATE.sub("", self.scrub(text)).strip()
