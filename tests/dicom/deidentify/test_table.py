"""The Annex E table as loaded, checked against the CSV files read independently here."""

from __future__ import annotations

import csv
import random
import re
from importlib import resources
from types import MappingProxyType

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.tag import Tag

from triage_app.dicom.deidentify.table import (
    BASIC_TABLE,
    OPTIONS_TABLE,
    Action,
    ProfileOption,
    Rule,
    load_table,
)

# The option columns of the 2024e table, named as the standard's spreadsheet names them.
COLUMNS = {
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
# PS3.15 Table E.1-1 legend; the compound codes resolve to the branch valid in every IOD.
SINGLE = {"X": Action.REMOVE, "Z": Action.ZERO, "D": Action.DUMMY, "K": Action.KEEP}
SINGLE |= {"C": Action.CLEAN, "U": Action.UID}
COMPOUND = {
    "X/Z": Action.ZERO,
    "X/D": Action.DUMMY,
    "X/Z/D": Action.DUMMY,
    "Z/D": Action.DUMMY,
    "X/Z/U*": Action.UID_REFERENCES,
}
PATTERN_ROWS = {
    "(50XX,XXXX)": "curve",
    "(60XX,3000)": "overlay_data",
    "(60XX,4000)": "overlay_comments",
    "(GGGG,EEEE) WHERE GGGG IS ODD": "private",
}
_TAG = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")


def _csv(name: str) -> list[dict[str, str]]:
    path = resources.files("triage_app.dicom.deidentify").joinpath("annex_e", name)
    with path.open("rb") as handle:
        text = handle.read().decode("utf-8")
    return list(csv.DictReader(text.splitlines()))


BASIC_ROWS = _csv(BASIC_TABLE)
OPTION_ROWS = {row["tag"]: row for row in _csv(OPTIONS_TABLE)}


def _rule(tag_text: str) -> Rule:
    table = load_table()
    match = _TAG.fullmatch(tag_text)
    if match:
        return table.by_tag[int(Tag(int(match[1], 16), int(match[2], 16)))]
    rule = getattr(table, PATTERN_ROWS[tag_text])
    assert isinstance(rule, Rule)
    return rule


def _expected(text: str) -> Action:
    return COMPOUND[text] if "/" in text else SINGLE[text]


def _is_new_in_2026c(tag_text: str) -> bool:
    row = OPTION_ROWS.get(tag_text)
    return row is None or "2024e" not in row["source_editions"]


# --- the basic profile ---------------------------------------------------------------------------


def test_every_row_of_the_basic_table_is_loaded() -> None:
    table = load_table()
    assert len(BASIC_ROWS) > 600  # the CSV itself was read, not an empty file
    assert len(table) == len(BASIC_ROWS)
    assert len(table.by_tag) == len(BASIC_ROWS) - len(PATTERN_ROWS)
    assert {rule.tag_text for rule in table.rules()} | {table.private.tag_text} == {
        row["tag"] for row in BASIC_ROWS
    }


def test_the_table_is_read_only_and_loaded_once() -> None:
    table = load_table()
    assert load_table() is table
    assert isinstance(table.by_tag, MappingProxyType)
    rule = next(iter(table.by_tag.values()))
    with pytest.raises(TypeError):
        rule.options[ProfileOption.RETAIN_UIDS] = Action.KEEP


def test_every_basic_action_maps_as_the_legend_says() -> None:
    seen = set()
    for row in BASIC_ROWS:
        rule = _rule(row["tag"])
        assert rule.basic_text == row["basic_action"]
        assert rule.basic is _expected(row["basic_action"]), row["tag"]
        assert rule.keyword == row["keyword"]
        seen.add(row["basic_action"])
    # Every code of the legend occurs, so none of the mappings above is untested.
    assert {"X", "Z", "D", "U"} | set(COMPOUND) <= seen


@pytest.mark.parametrize(("text", "action"), sorted(COMPOUND.items()))
def test_compound_actions_never_keep_a_value(text: str, action: Action) -> None:
    rules = [r for r in load_table().rules() if r.basic_text == text]
    assert rules, f"no row uses {text}"
    assert all(rule.basic is action for rule in rules)
    assert action not in (Action.KEEP, Action.CLEAN, Action.REMOVE)


def test_sample_rows_match_the_standard() -> None:
    # A few rows as printed in PS3.15 Table E.1-1, independently of the CSV.
    assert _rule("(0010,0010)").basic is Action.ZERO  # Patient's Name
    assert _rule("(0010,0020)").basic is Action.DUMMY  # Patient ID (Z/D)
    assert _rule("(0008,0018)").basic is Action.UID  # SOP Instance UID
    assert _rule("(0008,0080)").basic is Action.DUMMY  # Institution Name (X/Z/D)
    assert _rule("(0008,103E)").basic is Action.REMOVE  # Series Description
    assert _rule("(0008,0020)").basic is Action.ZERO  # Study Date
    assert _rule("(0008,1140)").basic is Action.UID_REFERENCES  # Referenced Image Sequence
    assert _rule("(0018,1000)").basic is Action.DUMMY  # Device Serial Number (X/Z/D)
    assert _rule("(60XX,3000)").basic is Action.REMOVE
    assert _rule("(GGGG,EEEE) WHERE GGGG IS ODD").basic is Action.REMOVE


# --- the option columns --------------------------------------------------------------------------


def _options_from_csv(tag_text: str) -> dict[ProfileOption, Action]:
    row = OPTION_ROWS[tag_text]
    return {option: _expected(row[col]) for option, col in COLUMNS.items() if row[col].strip()}


@pytest.mark.parametrize(
    "tag_text",
    [
        "(0008,0020)",  # Study Date: K full dates, C modified dates
        "(0018,1000)",  # Device Serial Number: K device identity
        "(0008,0080)",  # Institution Name: K institution identity
        "(0010,1010)",  # Patient's Age: K patient characteristics
        "(0008,103E)",  # Series Description: C clean descriptors
        "(0020,000D)",  # Study Instance UID: K retain UIDs
        "(0014,407E)",  # Calibration Date: K device identity, K full dates, C modified dates
        "(GGGG,EEEE) WHERE GGGG IS ODD",  # C retain safe private
    ],
)
def test_sample_option_columns(tag_text: str) -> None:
    options = _options_from_csv(tag_text)
    assert options, f"{tag_text} has no options in the CSV"
    assert dict(_rule(tag_text).options) == options


def test_all_2024e_rows_carry_their_option_columns() -> None:
    checked = 0
    for row in BASIC_ROWS:
        if _is_new_in_2026c(row["tag"]):
            continue
        assert dict(_rule(row["tag"]).options) == _options_from_csv(row["tag"]), row["tag"]
        checked += 1
    assert checked > 600


def test_every_option_is_used_by_some_row() -> None:
    used = {option for rule in load_table().rules() for option in rule.options}
    used |= set(load_table().private.options)
    assert used == set(ProfileOption)


def test_rows_new_in_2026c_get_only_the_inferred_options() -> None:
    new_rows = [row for row in BASIC_ROWS if _is_new_in_2026c(row["tag"])]
    assert len(new_rows) >= 10
    dates, uids = 0, 0
    for row in new_rows:
        rule = _rule(row["tag"])
        if rule.basic in (Action.UID, Action.UID_REFERENCES):
            assert dict(rule.options) == {ProfileOption.RETAIN_UIDS: Action.KEEP}, row["tag"]
            uids += 1
        elif row["keyword"].endswith(("DateTime", "Date", "Time")):
            # Dates are judged by keyword here, since pydicom's dictionary may predate the row.
            assert dict(rule.options) == {
                ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES: Action.KEEP,
                ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: Action.CLEAN,
            }, row["tag"]
            dates += 1
        else:
            assert dict(rule.options) == {}, row["tag"]
    assert uids >= 1
    assert dates >= 1


def test_new_date_rows_get_the_date_options_whatever_pydicom_knows() -> None:
    # Effective Start DateTime is new in 2026c; pydicom 3.0's dictionary has no VR for it.
    rule = _rule("(0040,A034)")
    assert rule.keyword == "EffectiveStartDateTime"
    assert rule.options[ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES] is Action.CLEAN
    assert rule.options[ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES] is Action.KEEP


def test_new_rows_that_are_neither_uids_nor_dates_are_never_retained() -> None:
    for row in BASIC_ROWS:
        if not _is_new_in_2026c(row["tag"]):
            continue
        rule = _rule(row["tag"])
        match = _TAG.fullmatch(row["tag"])
        assert match
        try:
            vr = str(dictionary_VR(Tag(int(match[1], 16), int(match[2], 16))))
        except KeyError:
            vr = ""
        if vr in ("DA", "DT", "TM") or rule.basic in (Action.UID, Action.UID_REFERENCES):
            continue
        if row["keyword"].endswith(("DateTime", "Date", "Time")):
            continue
        everything = frozenset(ProfileOption) - {ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES}
        assert rule.action(everything) is rule.basic, row["tag"]


# --- resolving the action under selected options ---------------------------------------------


def test_no_options_gives_the_basic_action_everywhere() -> None:
    for rule in load_table().rules():
        assert rule.action(frozenset()) is rule.basic


def test_a_single_option_gives_its_column() -> None:
    for rule in load_table().rules():
        for option, action in rule.options.items():
            assert rule.action(frozenset({option})) is action


def test_clean_wins_over_keep_when_two_options_name_the_attribute() -> None:
    calibration_date = _rule("(0014,407E)")
    device = ProfileOption.RETAIN_DEVICE_IDENTITY
    modified = ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES
    full = ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES
    assert calibration_date.action(frozenset({device})) is Action.KEEP
    assert calibration_date.action(frozenset({device, modified})) is Action.CLEAN
    assert calibration_date.action(frozenset({device, full})) is Action.KEEP


def test_precedence_holds_for_every_row_and_every_pair_of_options() -> None:
    rng = random.Random(7050)
    options = list(ProfileOption)
    for rule in load_table().rules():
        for _ in range(8):
            chosen = frozenset(rng.sample(options, rng.randint(1, len(options))))
            named = {rule.options[o] for o in chosen if o in rule.options}
            expected = (
                Action.CLEAN
                if Action.CLEAN in named
                else Action.KEEP
                if Action.KEEP in named
                else rule.basic
            )
            assert rule.action(chosen) is expected, (rule.tag_text, chosen)


# --- option names ------------------------------------------------------------------------------


def test_parse_reads_every_option_name() -> None:
    names = [
        o.value for o in ProfileOption if o is not ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES
    ]
    assert ProfileOption.parse(names) == frozenset(ProfileOption) - {
        ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES
    }
    assert ProfileOption.parse([" retain-uids ", "retain-uids"]) == {ProfileOption.RETAIN_UIDS}
    assert ProfileOption.parse([]) == frozenset()


@pytest.mark.parametrize("name", ["retain-everything", "RETAIN-UIDS", "retain_uids", ""])
def test_parse_refuses_unknown_names(name: str) -> None:
    with pytest.raises(ValueError, match="unknown de-identification option") as err:
        ProfileOption.parse(["clean-graphics", name])
    assert repr(name) in str(err.value)
    assert "retain-safe-private" in str(err.value)  # the message lists what is known


def test_parse_refuses_full_and_modified_dates_together() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        ProfileOption.parse(
            ["retain-longitudinal-full-dates", "retain-uids", "retain-longitudinal-modified-dates"]
        )
