"""The generated leak corpus through the engine: nothing planted survives, references hold,
and every attribute of the Annex E table gets its action, at top level and nested."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from tests.dicom.deidentify.corpus import (
    KEPT_HOST_KEYWORD,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SAMPLE_BY_VR,
    TABLE_PATIENT,
    Kind,
    Planted,
    PlantedIdentifiers,
    as_read,
    graphics_elements,
    make_patient,
    planted_identifiers,
    private_elements,
    rule_tag,
    sample_element,
    table_case,
    table_vr,
    write_leak_files,
)
from tests.dicom.deidentify.leak_check import Leak, find_leaks
from triage_app.dicom.deidentify import (
    DEFAULT_SAFE_PRIVATE,
    DeidConfig,
    Deidentifier,
    ProfileOption,
    SafePrivateTag,
    load_table,
    parse_safe_private,
)
from triage_app.dicom.deidentify.files import DeidentifiedFile, deidentify_file
from triage_app.dicom.deidentify.table import _COMPOUND, Action, Rule
from triage_app.dicom.reader import quiet_pydicom

SECRET = b"leak-corpus-site-secret-0123456789"
OTHER_SECRET = b"another-site-secret-9876543210abcd"
SEED = 3
SERIES = 3
PATIENT = make_patient(SEED)
PLANTED = planted_identifiers(PATIENT)

# What each option legitimately keeps of the planted values, and nothing more: the checker runs
# without exactly these kinds, and each of them must really be found (or the option did not
# retain what it claims, and the exclusion would hide a leak).
RETAINED_BY: dict[ProfileOption, frozenset[Kind]] = {
    ProfileOption.RETAIN_UIDS: frozenset({Kind.UID}),
    ProfileOption.RETAIN_DEVICE_IDENTITY: frozenset({Kind.DEVICE}),
    ProfileOption.RETAIN_INSTITUTION_IDENTITY: frozenset({Kind.INSTITUTION}),
    ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: frozenset(),
    ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES: frozenset(
        {Kind.EVENT_DATE, Kind.EVENT_TIME, Kind.EVENT_DATETIME}
    ),
    # Dates move by whole days: the time of day is kept.
    ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: frozenset({Kind.EVENT_TIME}),
    ProfileOption.RETAIN_SAFE_PRIVATE: frozenset(),  # the corpus's private block is not safe
    ProfileOption.CLEAN_DESCRIPTORS: frozenset(),
    ProfileOption.CLEAN_STRUCTURED_CONTENT: frozenset(),
    ProfileOption.CLEAN_GRAPHICS: frozenset(),
}


def _config(*options: ProfileOption) -> DeidConfig:
    safe = parse_safe_private(DEFAULT_SAFE_PRIVATE)
    return DeidConfig(options=frozenset(options), safe_private=safe)


def _decode(data: bytes) -> Dataset:
    with quiet_pydicom():
        return dcmread(io.BytesIO(data))


def _describe(leaks: list[Leak]) -> str:
    return "\n".join(str(leak) for leak in leaks)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_leak_files(tmp_path_factory.mktemp("export"), SEED, SERIES)


@pytest.fixture(scope="module")
def implicit_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_leak_files(tmp_path_factory.mktemp("implicit"), SEED, SERIES, implicit=True)


def _run(paths: list[Path], config: DeidConfig, secret: bytes = SECRET) -> list[DeidentifiedFile]:
    deid = Deidentifier(secret, config)
    return [deidentify_file(path, deid) for path in paths]


def _leaks(outputs: list[DeidentifiedFile], planted: PlantedIdentifiers) -> list[Leak]:
    return [
        leak
        for out in outputs
        for leak in find_leaks(planted, data=out.data, path=out.relative_path)
    ]


# --- the checker is not vacuous -------------------------------------------------------------


def test_the_checker_finds_every_planted_value_in_the_source(sources: list[Path]) -> None:
    data = sources[0].read_bytes()
    leaks = find_leaks(PLANTED, data=data, path=sources[0])
    assert {leak.planted for leak in leaks} == set(PLANTED)
    decoded = {
        leak.planted for leak in leaks if not leak.where.startswith(("bytes", "path", "preamble"))
    }
    assert decoded == set(PLANTED), "every planted value is in a decoded attribute"
    assert {leak.planted for leak in leaks if leak.where.startswith("bytes")} == set(PLANTED)

    places = {leak.where for leak in leaks}
    expected = [
        # three and four sequence levels down
        r"^\(0008,1140\) ReferencedImageSequence\[0\] > \(0008,2112\) SourceImageSequence\[0\] "
        r"> \(0008,9215\) DerivationCodeSequence\[0\] > \(0010,0010\) PatientName$",
        r"> \(0008,2218\) AnatomicRegionSequence\[0\] > \(0010,0020\) PatientID$",
        r"^\(0011,1002\) ",  # the UN private element
        r"^\(0011,1003\) .*\[0\] > \(0010,0010\) PatientName$",  # inside a private sequence
        r"^\(0034,1999\) ",  # an unknown standard attribute (UN)
        r"^file meta > \(0002,0016\) SourceApplicationEntityTitle$",
        r"^\(0040,A730\) ContentSequence\[6\] > \(0040,A730\) ContentSequence\[0\] > .*TextValue$",
        r"^\(6000,4000\) ",
        r"^\(5000,2500\) ",
        r"^preamble$",
        r"^path$",
    ]
    for pattern in expected:
        assert any(re.search(pattern, place) for place in places), pattern


def test_the_checker_finds_one_value_put_back_into_a_deidentified_output(
    sources: list[Path],
) -> None:
    (out,) = _run(sources[:1], _config())
    assert find_leaks(PLANTED, data=out.data) == []
    ds = _decode(out.data)
    deep = ds.ReferencedImageSequence[0].SourceImageSequence[0].DerivationCodeSequence[0]
    deep.CodeMeaning = f"about {PATIENT.given.lower()}"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)

    leaks = find_leaks(PLANTED, data=buffer.getvalue(), path=Path("x", PATIENT.mrn))
    found = {(leak.planted.value, leak.where.split(" @")[0]) for leak in leaks}
    place = (
        "(0008,1140) ReferencedImageSequence[0] > (0008,2112) SourceImageSequence[0] > "
        "(0008,9215) DerivationCodeSequence[0] > (0008,0104) CodeMeaning"
    )
    assert found == {(PATIENT.given, place), (PATIENT.given, "bytes"), (PATIENT.mrn, "path")}


def test_the_planted_values_cover_every_kind_once_and_come_from_the_seed() -> None:
    assert PLANTED.kinds() == frozenset(Kind)
    assert len({p.value.lower() for p in PLANTED}) == len(PLANTED), "no value planted twice"
    assert PATIENT.mrn in PATIENT.study_uid, "UIDs are built from the MRN"
    assert planted_identifiers(make_patient(SEED)) == PLANTED, "deterministic from the seed"
    assert planted_identifiers(make_patient(SEED + 1)) != PLANTED


# --- nothing survives -----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["explicit", "implicit"])
def test_nothing_planted_survives_the_default_profile(
    encoding: str, sources: list[Path], implicit_sources: list[Path]
) -> None:
    paths = sources if encoding == "explicit" else implicit_sources
    outputs = _run(paths, _config())
    leaks = _leaks(outputs, PLANTED)
    assert leaks == [], _describe(leaks)


@pytest.mark.parametrize("option", list(ProfileOption), ids=lambda o: o.value)
def test_each_option_retains_exactly_what_it_may(
    option: ProfileOption, sources: list[Path]
) -> None:
    retained = RETAINED_BY[option]
    outputs = _run(sources, _config(option))
    leaks = _leaks(outputs, PLANTED.excluding(retained))
    assert leaks == [], _describe(leaks)
    kept = {leak.planted.kind for leak in _leaks(outputs, PLANTED)}
    assert kept == retained, f"{option.value} should keep exactly {retained}, kept {kept}"


def test_a_uid_built_from_the_mrn_is_replaced_even_under_retain_uids(
    sources: list[Path],
) -> None:
    (out,) = _run(sources[:1], _config(ProfileOption.RETAIN_UIDS))
    ds = _decode(out.data)
    assert ds.FrameOfReferenceUID == PATIENT.frame_of_reference_uid, "an ordinary UID is kept"
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert uid.startswith("2.25.")
    report = out.report
    assert (report.study_instance_uid, report.series_instance_uid, report.sop_instance_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    ), "the report (and so the case id and file name) names the UIDs that were written"


def test_safe_private_attributes_keep_their_value_but_lose_the_patient(
    sources: list[Path],
) -> None:
    safe = tuple(SafePrivateTag(PRIVATE_GROUP, PRIVATE_CREATOR, e) for e in (0x01, 0x02, 0x04))
    config = DeidConfig(options=frozenset({ProfileOption.RETAIN_SAFE_PRIVATE}), safe_private=safe)
    (out,) = _run(sources[:1], config)
    leaks = find_leaks(PLANTED.excluding({Kind.PRIVATE}), data=out.data, path=out.relative_path)
    assert leaks == [], _describe(leaks)
    ds = _decode(out.data)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    kept = block[0x01].value
    assert kept.startswith(PATIENT.private_payload), "safe text kept, the name cut out"
    assert 0x02 not in block, "bytes holding the MRN cannot be cleaned: removed"
    assert 0x03 not in block, "not listed as safe"
    assert 0x04 not in block or block[0x04].is_empty, "the birth date is not kept"


# --- file names -----------------------------------------------------------------------------


def test_output_names_carry_nothing_of_the_source_path(sources: list[Path]) -> None:
    outputs = _run(sources, _config())
    names = {out.relative_path for out in outputs}
    assert len(names) == SERIES
    source_words = {
        word.lower()
        for path in sources
        for part in path.parts[-3:]
        for word in re.split(r"[^0-9A-Za-z]+", part)
        if len(word) >= 4 and word.lower() != "dcm"
    }
    for name in names:
        assert find_leaks(PLANTED, path=name) == []
        assert not {w for w in source_words if w in str(name).lower()}
        assert len(name.parts) == 3
        assert all(re.fullmatch(r"[0-9a-f]{16}", part) for part in (*name.parts[:2], name.stem))
    assert len({name.parent for name in names}) == 1, "one series folder"


# --- reference integrity --------------------------------------------------------------------


def _decoded_all(outputs: list[DeidentifiedFile]) -> list[Dataset]:
    return [_decode(out.data) for out in outputs]


@pytest.mark.parametrize(
    "options", [(), (ProfileOption.RETAIN_UIDS,)], ids=["default", "retain-uids"]
)
def test_a_series_keeps_its_study_series_and_references(
    options: tuple[ProfileOption, ...], sources: list[Path]
) -> None:
    outputs = _run(sources, _config(*options))
    series = _decoded_all(outputs)
    assert len({ds.StudyInstanceUID for ds in series}) == 1
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    instances = [ds.SOPInstanceUID for ds in series]
    assert len(set(instances)) == SERIES
    study, series_uid = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
    for index, (ds, out) in enumerate(zip(series, outputs, strict=True)):
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.startswith("2.25.") and PATIENT.mrn not in uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert out.report.sop_instance_uid == ds.SOPInstanceUID
        assert out.report.study_instance_uid == study
        assert out.report.series_instance_uid == series_uid
        first = ds.ReferencedImageSequence[0]
        assert first.ReferencedSOPInstanceUID == instances[(index + 1) % SERIES]
        nested = first.SourceImageSequence[0]
        assert nested.ReferencedSOPInstanceUID == instances[(index + 2) % SERIES]
        referenced_series = ds.ReferencedSeriesSequence[0]
        assert referenced_series.SeriesInstanceUID == series_uid
        ref = referenced_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert ref == instances[(index + 1) % SERIES]
        uidref = next(item for item in ds.ContentSequence if item.ValueType == "UIDREF")
        assert study == uidref.UID


def test_the_same_secret_gives_the_same_output_and_another_secret_other_uids(
    sources: list[Path],
) -> None:
    first = _run(sources, _config())
    again = _run(sources, _config())
    assert [out.data for out in first] == [out.data for out in again]
    assert [out.relative_path for out in first] == [out.relative_path for out in again]

    other = _run(sources, _config(), secret=OTHER_SECRET)

    def uids(outputs: list[DeidentifiedFile]) -> set[str]:
        return {
            str(v)
            for ds in _decoded_all(outputs)
            for v in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        }

    assert len(uids(other)) == len(uids(first)) == SERIES + 2
    assert not uids(other) & uids(first)
    assert _leaks(other, PLANTED) == []
    assert {out.relative_path for out in other}.isdisjoint({out.relative_path for out in first})


# --- the table, attribute by attribute ------------------------------------------------------

TABLE = load_table()
DEFAULT = Deidentifier(SECRET, DeidConfig())
HOST = Tag(KEPT_HOST_KEYWORD)
PSEUDONYM_TAGS = (0x00100010, 0x00100020)  # Z/D on these gives the patient pseudonym


def _table_params() -> list[object]:
    return [
        pytest.param(tag, rule, placement, id=f"{rule.tag_text}-{rule.keyword}-{placement}")
        for tag, rule in TABLE.by_tag.items()
        for placement in ("top", "nested")
    ]


def _expected(rule: Rule) -> Action:
    """The rule's action from its text, compound actions resolved as ``table._COMPOUND`` says."""
    return _COMPOUND.get(rule.basic_text) or Action(rule.basic_text)


def _deidentified(elements: list[DataElement], nested: bool) -> tuple[Dataset, str]:
    """The container the elements ended up in after the default profile, and the pseudonym."""
    ds = as_read(table_case(elements, nested=nested))
    report = DEFAULT.deidentify(ds)
    if nested:
        (host,) = ds[HOST].value
        return host, report.patient_pseudonym
    return ds, report.patient_pseudonym


def test_the_nesting_host_is_a_sequence_the_profile_keeps() -> None:
    assert HOST not in TABLE.by_tag


@pytest.mark.parametrize(("tag", "rule", "placement"), _table_params())
def test_every_table_attribute_gets_its_action(tag: int, rule: Rule, placement: str) -> None:
    assert rule_tag(rule) == tag
    expected = _expected(rule)
    assert rule.action(frozenset()) is expected
    vr = table_vr(tag)
    original = sample_element(tag, vr)
    nested = placement == "nested"
    ds, pseudonym = _deidentified([original], nested)
    where = f"{rule.tag_text} {rule.keyword} ({vr}, {rule.basic_text}) {placement}"
    if tag >> 16 == 0x0002:
        if nested:  # file meta elements belong in the file meta: in a data set they go
            assert tag not in ds, where
            return
        ds = ds.file_meta
    if expected is Action.REMOVE:
        assert tag not in ds, where
        return
    assert tag in ds, where
    with quiet_pydicom():
        element = ds[tag]
    value = element.value
    if vr == "SQ":
        _check_sequence(value, expected, pseudonym, where)
    elif expected is Action.ZERO:
        if tag in PSEUDONYM_TAGS:
            assert str(value) == pseudonym, where
        else:
            assert element.is_empty, where
    elif expected is Action.DUMMY:
        assert not element.is_empty and str(value) != str(original.value), where
        if tag in PSEUDONYM_TAGS:
            assert str(value) == pseudonym, where
    elif expected is Action.UID:
        assert vr == "UI", where
        assert str(value).startswith("2.25.") and value != original.value, where
    elif expected is Action.KEEP:
        assert value == original.value, where
    else:
        pytest.fail(f"{where}: no basic-profile rule should have the action {expected}")


def _check_sequence(items: Sequence, action: Action, pseudonym: str, where: str) -> None:
    if action is Action.ZERO:
        assert len(items) == 0, where
        return
    # D, U* and K keep the items and de-identify what is inside them.
    assert action in (Action.DUMMY, Action.UID_REFERENCES, Action.KEEP), where
    (item,) = items
    assert item.PatientName == pseudonym, where
    reference = item.ReferencedSOPInstanceUID
    assert reference.startswith("2.25.") and TABLE_PATIENT.mrn not in reference, where


def test_every_vr_the_table_uses_has_a_sample_value() -> None:
    vrs = {table_vr(tag) for tag in TABLE.by_tag}
    assert vrs - {"SQ"} <= set(SAMPLE_BY_VR)
    assert "UN" in vrs, "the table has attributes pydicom does not know (sent as UN)"


@pytest.mark.parametrize("placement", ["top", "nested"])
@pytest.mark.parametrize("group_offset", [0x00, 0x1E], ids=["6000-5000", "601E-501E"])
def test_overlays_and_curves_are_removed(group_offset: int, placement: str) -> None:
    assert TABLE.overlay_data.basic is TABLE.overlay_comments.basic is Action.REMOVE
    assert TABLE.curve.basic is Action.REMOVE
    ds, _ = _deidentified(graphics_elements(group_offset), placement == "nested")
    assert not [e.tag for e in ds if e.tag.group & 0xFF00 in (0x5000, 0x6000)]


@pytest.mark.parametrize("placement", ["top", "nested"])
def test_curves_stay_and_overlays_go_under_clean_graphics(placement: str) -> None:
    """An overlay bitmap may be a rendered name no rule can clean: it goes with its group."""
    deid = Deidentifier(SECRET, DeidConfig(options=frozenset({ProfileOption.CLEAN_GRAPHICS})))
    elements = graphics_elements(0)
    ds = as_read(table_case(elements, nested=placement == "nested"))
    deid.deidentify(ds)
    if placement == "nested":
        (ds,) = ds[HOST].value
    with quiet_pydicom():
        kept = {e.tag: e.value for e in ds if e.tag.group & 0xFF00 in (0x5000, 0x6000)}
    assert kept == {e.tag: e.value for e in elements if e.tag.group == 0x5000}


@pytest.mark.parametrize("placement", ["top", "nested"])
@pytest.mark.parametrize("group", [PRIVATE_GROUP, 0x0009, 0x7FDF])
def test_private_attributes_are_removed(group: int, placement: str) -> None:
    assert TABLE.private.basic is Action.REMOVE
    ds, _ = _deidentified(private_elements(group), placement == "nested")
    assert not [e.tag for e in ds if e.tag.group & 1]


def test_planted_identifiers_exclude_only_what_they_are_told() -> None:
    without = PLANTED.excluding({Kind.DEVICE})
    assert Kind.DEVICE not in without.kinds()
    assert set(PLANTED) - set(without) == {
        Planted(Kind.DEVICE, v) for v in PLANTED.values(Kind.DEVICE)
    }
