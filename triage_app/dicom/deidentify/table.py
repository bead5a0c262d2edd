"""The PS3.15 Annex E table, loaded as data: which action applies to which attribute.

The Basic Profile actions come from the 2026c table and the option columns from the 2024e
table (``annex_e/``, copied verbatim from the standard's tables). Nothing here is a hand-written
list of tags: a new edition of the standard is a new CSV file.

Two rules fill gaps the tables leave, and both only ever *retain less*:

* Rows new in 2026c have no option columns (the 2024e table predates them). For those, Retain
  UIDs keeps their ``U`` attributes and the two date options apply to their DA/DT/TM attributes,
  as they do for every older row of the same kind; no other option retains them.
* Where several selected options name the same attribute, the more protective action wins
  (clean ``C`` before keep ``K``): Retain Device Identity keeps a calibration *date* only when
  neither date option is also selected to shift it.
"""

from __future__ import annotations

import csv
import enum
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType

from pydicom.datadict import dictionary_VR
from pydicom.tag import BaseTag, Tag

BASIC_TABLE = "annex_e_2026c.csv"
OPTIONS_TABLE = "annex_e_with_options_2024e.csv"

_TAG_PATTERN = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")
_PRIVATE_ROW = "(GGGG,EEEE) WHERE GGGG IS ODD"
_CURVE_ROW = "(50XX,XXXX)"
_OVERLAY_DATA_ROW = "(60XX,3000)"
_OVERLAY_COMMENTS_ROW = "(60XX,4000)"
_DATE_VRS = frozenset({"DA", "DT", "TM"})
# For tags newer than pydicom's data dictionary, the VR of a date or time attribute is read off its
# keyword (the standard names every DA/DT/TM attribute of the new rows this way).
_KEYWORD_VRS = (("DateTime", "DT"), ("Date", "DA"), ("Time", "TM"))


class Action(enum.Enum):
    """The single-letter actions of PS3.15 Table E.1-1 (compound ones resolved, see below)."""

    REMOVE = "X"
    ZERO = "Z"  # zero-length value (or, for names and IDs, a keyed pseudonym)
    DUMMY = "D"  # a non-empty value of the right VR that reveals nothing
    KEEP = "K"  # unchanged; a sequence is kept and its items are de-identified
    CLEAN = "C"  # values of similar meaning that reveal nothing
    UID = "U"  # a keyed pseudonymous UID, consistent across files and runs
    UID_REFERENCES = "U*"  # keep the sequence, remap the UIDs inside it


# Compound actions depend on whether the attribute is Type 1, 2 or 3 in the object's IOD, which
# the device does not track per SOP class. We take the branch that is valid in every IOD that
# uses the attribute, so output never loses conformance; none of these branches keeps a value.
_COMPOUND = MappingProxyType(
    {
        "X/Z": Action.ZERO,
        "X/D": Action.DUMMY,
        "X/Z/D": Action.DUMMY,
        "Z/D": Action.DUMMY,
        "X/Z/U*": Action.UID_REFERENCES,
    }
)


class ProfileOption(enum.Enum):
    """The Annex E profile options, by the name used in settings and on the command line."""

    RETAIN_UIDS = "retain-uids"
    RETAIN_DEVICE_IDENTITY = "retain-device-identity"
    RETAIN_INSTITUTION_IDENTITY = "retain-institution-identity"
    RETAIN_PATIENT_CHARACTERISTICS = "retain-patient-characteristics"
    RETAIN_LONGITUDINAL_FULL_DATES = "retain-longitudinal-full-dates"
    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain-longitudinal-modified-dates"
    RETAIN_SAFE_PRIVATE = "retain-safe-private"
    CLEAN_DESCRIPTORS = "clean-descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean-structured-content"
    CLEAN_GRAPHICS = "clean-graphics"

    @classmethod
    def parse(cls, names: Iterable[str]) -> frozenset[ProfileOption]:
        """Options from their names; raises ``ValueError`` naming an unknown or clashing one."""
        chosen: set[ProfileOption] = set()
        for name in names:
            try:
                chosen.add(cls(name.strip()))
            except ValueError:
                known = ", ".join(option.value for option in cls)
                raise ValueError(f"unknown de-identification option {name!r} ({known})") from None
        if {cls.RETAIN_LONGITUDINAL_FULL_DATES, cls.RETAIN_LONGITUDINAL_MODIFIED_DATES} <= chosen:
            raise ValueError(
                "retain-longitudinal-full-dates and retain-longitudinal-modified-dates "
                "exclude each other"
            )
        return frozenset(chosen)


_OPTION_COLUMNS = MappingProxyType(
    {
        ProfileOption.RETAIN_SAFE_PRIVATE: "rtnSafePrivOpt",
        ProfileOption.RETAIN_UIDS: "rtnUIDsOpt",
        ProfileOption.RETAIN_DEVICE_IDENTITY: "rtnDevIdOpt",
        ProfileOption.RETAIN_INSTITUTION_IDENTITY: "rtnInstIdOpt",
        ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: "rtnPatCharsOpt",
        ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES: "rtnLongFullDatesOpt",
        ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: "rtnLongModifDatesOpt",
        ProfileOption.CLEAN_DESCRIPTORS: "cleanDescOpt",
        ProfileOption.CLEAN_STRUCTURED_CONTENT: "cleanStructContOpt",
        ProfileOption.CLEAN_GRAPHICS: "cleanGraphOpt",
    }
)
# Protective order among option actions: a clean beats a keep when both options are selected.
_OPTION_PRECEDENCE = (Action.CLEAN, Action.KEEP)


@dataclass(frozen=True)
class Rule:
    """One row of the table: the Basic Profile action and what each option changes."""

    tag_text: str  # as printed in the standard, e.g. "(0010,0010)" or "(60XX,3000)"
    keyword: str
    name: str
    basic: Action
    basic_text: str  # the action as the table writes it, e.g. "X/Z/D"
    options: Mapping[ProfileOption, Action]

    def action(self, selected: frozenset[ProfileOption]) -> Action:
        """The action under the selected options."""
        chosen = {self.options[o] for o in selected if o in self.options}
        for action in _OPTION_PRECEDENCE:
            if action in chosen:
                return action
        return self.basic


@dataclass(frozen=True)
class ProfileTable:
    """Rules by tag, plus the three pattern rows (curves, overlays, private attributes)."""

    edition: str
    by_tag: Mapping[int, Rule]
    curve: Rule
    overlay_data: Rule
    overlay_comments: Rule
    private: Rule

    def __len__(self) -> int:
        return len(self.by_tag) + 4

    def rules(self) -> tuple[Rule, ...]:
        return (*self.by_tag.values(), self.curve, self.overlay_data, self.overlay_comments)


def _action(text: str) -> Action:
    if text in _COMPOUND:
        return _COMPOUND[text]
    return Action(text)


def _read(name: str) -> list[dict[str, str]]:
    text = resources.files(__package__).joinpath("annex_e", name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _vr(tag: BaseTag, keyword: str) -> str:
    """The attribute's VR; for a tag the installed pydicom does not know yet, from its keyword."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return next((vr for suffix, vr in _KEYWORD_VRS if keyword.endswith(suffix)), "")


def _inferred_options(basic: Action, vr: str) -> dict[ProfileOption, Action]:
    """Options for a row the option table does not have yet (see the module docstring)."""
    if basic in (Action.UID, Action.UID_REFERENCES):
        return {ProfileOption.RETAIN_UIDS: Action.KEEP}
    if vr in _DATE_VRS:
        return {
            ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES: Action.KEEP,
            ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: Action.CLEAN,
        }
    return {}


@cache
def load_table() -> ProfileTable:
    """The table shipped with the app (parsed once per process)."""
    basic_rows = _read(BASIC_TABLE)
    option_rows = {row["tag"]: row for row in _read(OPTIONS_TABLE)}
    by_tag: dict[int, Rule] = {}
    patterns: dict[str, Rule] = {}
    for row in basic_rows:
        text = row["tag"].strip()
        basic = _action(row["basic_action"].strip())
        extra = option_rows.get(text, {})
        options = {
            option: _action(extra[column].strip())
            for option, column in _OPTION_COLUMNS.items()
            if extra.get(column, "").strip()
        }
        match = _TAG_PATTERN.fullmatch(text)
        tag = Tag(int(match.group(1), 16), int(match.group(2), 16)) if match else None
        if not options and tag is not None and "2024e" not in extra.get("source_editions", ""):
            options = _inferred_options(basic, _vr(tag, row["keyword"].strip()))
        rule = Rule(
            tag_text=text,
            keyword=row["keyword"].strip(),
            name=row["name"].strip(),
            basic=basic,
            basic_text=row["basic_action"].strip(),
            options=MappingProxyType(options),
        )
        if tag is not None:
            by_tag[int(tag)] = rule
        else:
            patterns[text] = rule
    missing = {_PRIVATE_ROW, _CURVE_ROW, _OVERLAY_DATA_ROW, _OVERLAY_COMMENTS_ROW} - set(patterns)
    if missing:
        raise ValueError(f"the Annex E table lacks the pattern rows {sorted(missing)}")
    return ProfileTable(
        edition=BASIC_TABLE.removeprefix("annex_e_").removesuffix(".csv"),
        by_tag=MappingProxyType(by_tag),
        curve=patterns[_CURVE_ROW],
        overlay_data=patterns[_OVERLAY_DATA_ROW],
        overlay_comments=patterns[_OVERLAY_COMMENTS_ROW],
        private=patterns[_PRIVATE_ROW],
    )
