"""The residual scrub: the patient's own identifiers, wherever text survived the profile.

The profile removes the attributes that are *meant* to identify; people still type names into
descriptions, IDs into comments and birth dates into SR text. After the profile, every remaining
text value (and any retained private or unknown bytes) is searched for this patient's name parts
(also as written without accents: "Müller" is typed "Mueller" and "Muller"), IDs, birth date and
accession number, and each hit is removed.

The Clean options (Clean Descriptors, Clean Structured Content) promise text that identifies no
one, so :meth:`Scrubber.clean` also removes, by pattern, what identifies anyone: written dates,
phone numbers, runs of four digits or more (record numbers, IDs), titled names ("Dr House")
and street addresses. Patterns cannot find an untitled name or a place: text that must not keep
those is removed by the profile, which the Clean options relax only for descriptions and content.

Raw element bytes are checked first with a cheap lower-case byte search, so the common case — no
hit — never converts an element; only a hit decodes and rewrites the value.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

# Shorter tokens would erase ordinary words and numbers; a two-letter surname still counts.
MIN_NAME_PART = 2
MIN_ID = 2
# IDs at least this long are also removed inside longer tokens ("MRN12345678", UID components).
MIN_EMBEDDED_ID = 6

_NAME_SPLIT = re.compile(r"[\^=\s,.;-]+")  # "Smith-Jones" is also written "Jones"
_ISO_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
# German-style transliterations; any other accent is simply dropped ("José" → "Jose").
_TRANSLITERATIONS = str.maketrans(
    {"Ä": "AE", "Ö": "OE", "Ü": "UE", "ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss"}
)
_MONTH = (  # "Feb", "February", "Sept."
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_I = "(?i:{})"  # case-insensitive part of a pattern that is otherwise case-sensitive
# What Clean removes from free text by pattern (see the module docstring), in this order.
# Titles and street words are matched by case: "DR CHEST" and "MR BRAIN" are not names.
_CLEANED_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        # Dates: any order of day, month and year with -, / or . between; compact ISO dates;
        # and with the month's name ("15th Feb 1980", "15-FEB-1980", "Feb 15, 1980").
        r"(?<!\d)(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|"
        r"(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))(?!\d)",
        _I.format(rf"(?<![0-9a-z]){_DAY}[\s./-]*{_MONTH}(?:[\s.,/-]*\d{{4}})?(?![0-9a-z])"),
        _I.format(rf"(?<![0-9a-z]){_MONTH}\s*{_DAY},?\s+\d{{4}}(?!\d)"),
        # Phone numbers: seven digits or more, grouped by spaces, dots, dashes, brackets.
        r"(?<![\w+])\+?\(?\d(?:[\s().-]{0,2}\d){6,}(?!\w)",
        # A title and the name after it.
        r"(?<![0-9A-Za-z])(?:Dr|Prof|Mr|Mrs|Ms|Miss)\.?\s+[A-Z][\w'-]*",
        # A house number and a street.
        r"(?<![0-9A-Za-z])\d+[A-Za-z]?,?\s+(?:[A-Z][\w'-]*\s+){1,3}"
        r"(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Way|Close|Court|Place|Square|"
        r"Boulevard|Blvd|Strasse|Straße|Str)\.?(?![0-9A-Za-z])",
        # What IDs, record and phone numbers are made of: runs of four digits or more.
        r"(?<!\d)\d{4,}(?!\d)",
    )
)


def text_values(value: object) -> list[str]:
    """An element value as its list of strings; a person name is one string, not its letters."""
    if value is None:
        return []
    if isinstance(value, str | PersonName):
        return [str(value)]
    if isinstance(value, Iterable):
        return [str(v) for v in value if v is not None]
    return [str(value)]


_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


def _spellings(part: str) -> set[str]:
    """A name part as written, transliterated ("MUELLER") and without its accents ("MULLER")."""
    stripped = "".join(
        c for c in unicodedata.normalize("NFKD", part) if not unicodedata.combining(c)
    )
    return {part, part.translate(_TRANSLITERATIONS), stripped}


def _date_forms(date: str) -> list[str]:
    """A DA value in the ways people write it.

    ISO, European and US orders with -, / or . (also with two-digit years: "07/03/65"), and
    with the month's name or its three letters ("7 March 1965", "07-MAR-1965", "07MAR1965",
    "Mar 7, 1965"). Matching ignores case.
    """
    match = _ISO_DATE.match(date.strip())
    if not match:
        return [date.strip()] if date.strip() else []
    year, month, day = match.groups()
    forms = {f"{year}{month}{day}"}
    for sep in "-/.":
        forms.add(f"{year}{sep}{month}{sep}{day}")
        for d, m in ((day, month), (day.lstrip("0"), month.lstrip("0"))):  # "07/03", "7/3"
            for y in (year, year[2:]):
                forms |= {f"{d}{sep}{m}{sep}{y}", f"{m}{sep}{d}{sep}{y}"}
    if 1 <= int(month) <= 12:
        full = _MONTHS[int(month) - 1]
        for name in (full, full[:3]):
            for d in {day, day.lstrip("0")}:
                forms |= {
                    f"{d} {name} {year}",
                    f"{d}-{name}-{year}",
                    f"{d}{name}{year}",
                    f"{name} {d}, {year}",
                    f"{name} {d} {year}",
                }
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
            names += text_values(ds.get(keyword))
        ids = text_values(ds.get("PatientID")) + text_values(ds.get("OtherPatientIDs"))
        ids += text_values(ds.get("AccessionNumber"))
        for item in ds.get("OtherPatientIDsSequence") or []:
            ids += text_values(item.get("PatientID"))
        parts = {
            spelling
            for name in names
            for part in _NAME_SPLIT.split(name)
            for spelling in _spellings(part)
            if len(spelling) >= MIN_NAME_PART
        }
        birth = str(ds.get("PatientBirthDate") or "")
        patient_id = str(ds.get("PatientID") or "").strip()
        key = f"id:{patient_id}" if patient_id else f"name:{ds.get('PatientName') or ''!s}"
        return cls(
            name_parts=tuple(sorted(parts, key=lambda p: (-len(p), p))),
            ids=tuple(sorted({i.strip() for i in ids if len(i.strip()) >= MIN_ID})),
            birth_dates=tuple(_date_forms(birth)),
            patient_key=key if key not in ("id:", "name:") else "",
        )


def _needles(token: str) -> set[bytes]:
    """Byte strings one of which is in any lowered, encoded text the scrub would hit for ``token``.

    ``bytes.lower`` folds ASCII only, so a token with other letters ("MÜLLER" against "Müller")
    is searched by its longest ASCII run; one with no ASCII at all by its usual case forms
    (as written, lower, upper, capitalised).
    """
    if token.isascii():
        return {token.lower().encode("ascii")}
    runs = re.findall(r"[\x00-\x7f]+", token)
    if runs:
        return {max(runs, key=len).lower().encode("ascii")}
    needles: set[bytes] = set()
    for form in {token, token.lower(), token.upper(), token.capitalize()}:
        for encoding in ("utf-8", "latin-1"):
            try:
                needles.add(form.encode(encoding).lower())
            except UnicodeEncodeError:
                continue
    return needles


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
        # Compiled on first use: most files never need it, and compiling costs more than the
        # rest of the file's de-identification.
        self._source = "|".join(alternatives)
        self._compiled: re.Pattern[str] | None = None
        self._needles = tuple({n for token in bounded for n in _needles(token)})
        self.empty = not alternatives

    @property
    def _pattern(self) -> re.Pattern[str] | None:
        if self._compiled is None and self._source:
            self._compiled = re.compile(self._source, re.IGNORECASE)
        return self._compiled

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
        """The Clean action on free text: the scrub, plus what identifies anyone by pattern
        (dates, phone numbers, IDs, titled names, addresses); spacing tidied where it cut."""
        cleaned = self.scrub(text)
        for pattern in _CLEANED_PATTERNS:
            cleaned = pattern.sub("", cleaned)
        if cleaned == text:
            return text
        cleaned = re.sub(r"\s+([,;:.])", r"\1", re.sub(r"[ \t]{2,}", " ", cleaned))
        return re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", cleaned).strip(" ,;:")
