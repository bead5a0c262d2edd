"""The generated leak corpus: DICOM data sets with one synthetic patient's identifiers planted
wherever identifiers hide, and a record of every planted value.

Everything is derived from a seed, so a failing case is reproduced by its seed alone. Planted
values are long and unusual on purpose (``QUIXWORTH``, an 8-digit MRN, times with microseconds)
so that finding one in an output is a leak, never a coincidence with pixel bytes or pseudonyms.

Each planted value has a :class:`Kind`; a profile option that legitimately retains something
(Retain Device Identity keeps the Station Name) retains whole kinds, and the checker is then run
on the planted values without those kinds.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ImplicitVRLittleEndian

from tests.helpers import phantom_dataset
from triage_app.dicom.deidentify.table import Rule

# A root under which the corpus builds UIDs from the MRN, as some sites really do.
MRN_UID_ROOT = "1.2.826.0.1.3680043.10"
# Secondary Capture: its class does not matter to the profile, and the referenced images use it.
SC_CLASS = UID("1.2.840.10008.5.1.4.1.1.7")
# A standard sequence the Annex E table does not name, so the profile keeps its items: the host
# for the nested table cases.
KEPT_HOST_KEYWORD = "PerformedProtocolCodeSequence"
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "LEAKCORPUS PRIVATE 1.0"
# An even-group tag no dictionary knows: written (and read back) with VR UN, like a newer
# standard attribute an old reader meets.
UNKNOWN_STANDARD_TAG = 0x00341999

_FAMILY = ("QUIXWORTH", "VANTERPOOL", "BRAMBLECOTE", "HALLSWORTHY", "ZELLINGHAM", "MORCAMBRIDGE")
_GIVEN = ("ZEBEDIAH", "PERPETUA", "THADDEUS", "MARISOLDE", "CORNELIUS", "EVANGELINA")
_MIDDLE = ("HOLLISTER", "FENWICKE", "ALDERIDGE", "PENROSSAN")
_MAIDEN = ("MARCHETTIO", "OSTERBRINK", "DELACROUX", "WYNDHAVEN")
_STAFF_FAMILY = ("WINTERBOTTOM", "FOTHERINGAY", "ACKROYDSON", "PEVERELLIS", "TREGARTHEN")
_STAFF_GIVEN = ("AUGUSTINA", "BARNABY", "CLEMENTINE", "DIGORY", "ESMERALDA")
_PLACE = ("LARKSPUR", "BRACKENFOLD", "QUILLONMERE", "ASHENDEAN")


class Kind(enum.Enum):
    """What a planted value is; the unit in which profile options retain things."""

    PATIENT_NAME = "patient name"
    PATIENT_ID = "patient id"
    BIRTH_DATE = "birth date"
    CONTACT = "patient contact"
    ACCESSION = "accession or order id"
    STAFF = "staff name"
    INSTITUTION = "institution"
    DEVICE = "device"
    NETWORK = "sending systems (file meta AE titles and addresses)"
    EVENT_DATE = "event date"
    EVENT_TIME = "event time"
    EVENT_DATETIME = "event datetime"
    UID = "uid"
    PRIVATE = "private payload"


@dataclass(frozen=True)
class Planted:
    kind: Kind
    value: str


@dataclass(frozen=True)
class PlantedIdentifiers:
    """Every value planted in a corpus item, each with its kind."""

    items: tuple[Planted, ...]

    def __iter__(self) -> Iterator[Planted]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def kinds(self) -> frozenset[Kind]:
        return frozenset(p.kind for p in self.items)

    def values(self, kind: Kind) -> tuple[str, ...]:
        return tuple(p.value for p in self.items if p.kind is kind)

    def excluding(self, kinds: Iterable[Kind]) -> PlantedIdentifiers:
        """The planted values without ``kinds`` (what an option legitimately retains)."""
        dropped = frozenset(kinds)
        return PlantedIdentifiers(tuple(p for p in self.items if p.kind not in dropped))


@dataclass(frozen=True)
class Patient:
    """One synthetic patient and the visit the corpus images come from."""

    seed: int
    family: str
    given: str
    middle: str
    maiden: str
    mrn: str  # digits only: it is also built into UIDs
    other_id: str  # Other Patient IDs
    other_id_in_sequence: str  # Other Patient IDs Sequence
    birth: date
    accession: str
    order_id: str
    step_id: str
    phone: str
    address: str
    referring: tuple[str, str]  # family, given
    operator: tuple[str, str]
    performing: tuple[str, str]
    institution: str
    institution_address: str
    department: str
    station: str
    device_serial: str
    ae_titles: tuple[str, str, str]  # source, sending, receiving
    hosts: tuple[str, str]  # in the source and sending presentation addresses
    study_day: date
    times: tuple[str, str, str, str]  # study, series, acquisition, content (TM)
    acquisition_datetime: str  # DT, on the study day; its time is none of ``times``
    private_payload: str

    @property
    def patient_name(self) -> str:
        return f"{self.family}^{self.given}^{self.middle}"

    @property
    def birth_da(self) -> str:
        return f"{self.birth:%Y%m%d}"

    @property
    def study_da(self) -> str:
        return f"{self.study_day:%Y%m%d}"

    def birth_written(self) -> tuple[str, ...]:
        """The birth date as people type it: ISO, day-first and month-first, - / and . ."""
        b = self.birth
        return (
            f"{b:%Y-%m-%d}",
            f"{b:%d/%m/%Y}",
            f"{b:%m/%d/%Y}",
            f"{b:%d.%m.%Y}",
            f"{b:%Y/%m/%d}",
        )

    def study_written(self) -> tuple[str, ...]:
        d = self.study_day
        return (f"{d:%Y-%m-%d}", f"{d:%d/%m/%Y}", f"{d:%m/%d/%Y}")

    def uid(self, *parts: int) -> str:
        """A UID built from the MRN (the leak the profile must still catch)."""
        return ".".join([MRN_UID_ROOT, self.mrn, *map(str, parts)])

    @property
    def study_uid(self) -> str:
        return self.uid(1)

    @property
    def series_uid(self) -> str:
        return self.uid(2)

    def instance_uid(self, index: int) -> str:
        return self.uid(3, index + 1)

    @property
    def frame_of_reference_uid(self) -> str:
        """A UID that does *not* contain the MRN: only Retain UIDs may keep it."""
        digest = hashlib.sha256(f"leak-corpus/{self.seed}/frame".encode()).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))


def make_patient(seed: int) -> Patient:
    rng = random.Random(seed)

    def digits(count: int) -> str:
        return str(rng.randrange(10 ** (count - 1) * 2, 10**count))

    families = rng.sample(_STAFF_FAMILY, 3)
    givens = rng.sample(_STAFF_GIVEN, 3)
    referring, operator, performing = zip(families, givens, strict=True)
    birth = date(1935, 1, 1) + timedelta(days=rng.randrange(0, 65 * 365))
    study_day = date(2015, 1, 1) + timedelta(days=rng.randrange(0, 9 * 365))
    place = rng.choice(_PLACE)
    clock = [
        f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
        f".{rng.randrange(10**5, 10**6)}"
        for _ in range(5)
    ]
    station_no = rng.randrange(10, 99)
    return Patient(
        seed=seed,
        family=rng.choice(_FAMILY),
        given=rng.choice(_GIVEN),
        middle=rng.choice(_MIDDLE),
        maiden=rng.choice(_MAIDEN),
        mrn=digits(8),
        other_id=f"XR{digits(7)}",
        other_id_in_sequence=f"NHS{digits(10)}",
        birth=birth,
        accession=f"RA{digits(8)}",
        order_id=f"RP{digits(7)}",
        step_id=f"SPS{digits(7)}",
        phone=f"+44 7700 {digits(6)}",
        address=f"{rng.randrange(2, 99)} Wrenfield Terrace, {place.title()}",
        referring=referring,
        operator=operator,
        performing=performing,
        institution=f"{place.title()} Valley Infirmary",
        institution_address=f"{rng.randrange(100, 999)} Quillon Row, {place.title()}",
        department=f"{place.title()} Thoracic Imaging",
        station=f"{place[:4]}-DXRM{station_no}",
        device_serial=f"SN{digits(9)}",
        ae_titles=(
            f"{place[:4]}DX{station_no}SRC",
            f"{place[:4]}GW{station_no}",
            f"PACS{digits(6)}",
        ),
        hosts=(
            f"{place.lower()}-dx{station_no}.example",
            f"{place.lower()}-gw{station_no}.example",
        ),
        study_day=study_day,
        times=(clock[0], clock[1], clock[2], clock[3]),
        acquisition_datetime=f"{study_day:%Y%m%d}{clock[4]}",
        private_payload=f"PRIVPAYLOAD{digits(6)}",
    )


def planted_identifiers(patient: Patient) -> PlantedIdentifiers:
    """Everything :func:`leak_dataset` plants for ``patient`` (the path adds nothing new)."""
    p = patient
    by_kind: dict[Kind, tuple[str, ...]] = {
        Kind.PATIENT_NAME: (p.patient_name, p.family, p.given, p.middle, p.maiden),
        Kind.PATIENT_ID: (p.mrn, p.other_id, p.other_id_in_sequence),
        Kind.BIRTH_DATE: (p.birth_da, *p.birth_written()),
        Kind.CONTACT: (p.phone, p.address),
        Kind.ACCESSION: (p.accession, p.order_id, p.step_id),
        Kind.STAFF: (*p.referring, *p.operator, *p.performing),
        Kind.INSTITUTION: (p.institution, p.institution_address, p.department),
        Kind.DEVICE: (p.station, p.device_serial),
        Kind.NETWORK: (*p.ae_titles, *p.hosts),
        Kind.EVENT_DATE: (p.study_da, *p.study_written()),
        Kind.EVENT_TIME: p.times,
        Kind.EVENT_DATETIME: (p.acquisition_datetime,),
        Kind.UID: (p.study_uid, p.series_uid, p.instance_uid(0), p.frame_of_reference_uid),
        Kind.PRIVATE: (p.private_payload,),
    }
    return PlantedIdentifiers(
        tuple(Planted(kind, value) for kind, values in by_kind.items() for value in values)
    )


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _reference(uid: str, **extra: object) -> Dataset:
    return _item(ReferencedSOPClassUID=SC_CLASS, ReferencedSOPInstanceUID=uid, **extra)


def _content(value_type: str, concept: str, **value: object) -> Dataset:
    return _item(
        RelationshipType="CONTAINS",
        ValueType=value_type,
        ConceptNameCodeSequence=Sequence([_code("121071", concept)]),
        **value,
    )


def _sr_content(p: Patient) -> Sequence:
    """An SR-like content tree: text, person name, date, time, datetime and a nested text."""
    birth_iso, birth_dmy = p.birth_written()[:2]
    return Sequence(
        [
            _content(
                "TEXT",
                "Finding",
                TextValue=(
                    f"{p.given.title()} {p.family.title()} (MRN {p.mrn}, DOB {birth_dmy}) "
                    f"seen for cough; born {birth_iso}; previously {p.maiden.lower()}."
                ),
            ),
            _content("PNAME", "Subject", PersonName=f"{p.family}^{p.given}"),
            _content("DATE", "Birth", Date=p.birth_da),
            _content("TIME", "Time", Time=p.times[3]),
            _content("DATETIME", "When", DateTime=p.acquisition_datetime),
            _content("UIDREF", "Study", UID=p.study_uid),
            _item(
                RelationshipType="CONTAINS",
                ValueType="CONTAINER",
                ContinuityOfContent="SEPARATE",
                ConceptNameCodeSequence=Sequence([_code("111028", "Image library")]),
                ContentSequence=Sequence(
                    [
                        _content(
                            "TEXT",
                            "Comment",
                            TextValue=f"Accession {p.accession}; id {p.other_id}; mrn{p.mrn}",
                        ),
                        _content(
                            "CODE",
                            "Subject",
                            ConceptCodeSequence=Sequence(
                                [_code("99LEAK", f"{p.family} {p.given}", scheme="99LEAK")]
                            ),
                        ),
                    ]
                ),
            ),
        ]
    )


def _nested_references(p: Patient, index: int, referenced: list[int]) -> Sequence:
    """ReferencedImageSequence → item → SourceImageSequence → item → DerivationCodeSequence →
    item → AnatomicRegionSequence → item: identifiers at every level, references to
    ``referenced`` instances at the first two."""
    first, second = referenced[0], referenced[-1]
    level4 = _code("51185008", f"Chest of {p.given.title()} born {p.birth_written()[3]}", "SCT")
    level4.PatientID = p.mrn
    level4.PatientBirthDate = p.birth_da
    level3 = _code("113040", f"Derived for {p.family} {p.mrn}")
    level3.PatientName = f"{p.family}^{p.given}"
    level3.StudyDescription = f"Prior of {p.given} {p.family}"
    level3.AnatomicRegionSequence = Sequence([level4])
    level2 = _reference(
        p.instance_uid(second), DerivationCodeSequence=Sequence([level3]), PatientID=p.mrn
    )
    level1 = _reference(
        p.instance_uid(first),
        PurposeOfReferenceCodeSequence=Sequence(
            [_code("121320", f"Predecessor of {p.family}, instance {index}")]
        ),
        SourceImageSequence=Sequence([level2]),
    )
    return Sequence([level1])


def _plant_private(ds: Dataset, p: Patient) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", f"{p.private_payload} {p.family}^{p.given}")
    block.add_new(0x02, "UN", f"MRN={p.mrn};{p.private_payload}".encode("ascii"))
    block.add_new(0x03, "SQ", Sequence([_item(PatientName=p.patient_name, PatientID=p.mrn)]))
    block.add_new(0x04, "DA", p.birth_da)


def _plant_graphics(ds: Dataset, p: Patient) -> None:
    """An overlay (60xx) and a retired curve (50xx) with text that identifies."""
    ds.add_new(0x60000010, "US", 8)  # Overlay Rows
    ds.add_new(0x60000011, "US", 8)  # Overlay Columns
    ds.add_new(0x60000040, "CS", "G")  # Overlay Type
    ds.add_new(0x60000050, "SS", [1, 1])  # Overlay Origin
    ds.add_new(0x60000100, "US", 1)  # Overlay Bits Allocated
    ds.add_new(0x60000102, "US", 0)  # Overlay Bit Position
    ds.add_new(0x60000022, "LO", f"Marker for {p.family} {p.given}")  # Overlay Description
    ds.add_new(0x60001500, "LO", f"MRN {p.mrn}")  # Overlay Label
    ds.add_new(0x60003000, "OW", b"\xff\x00" * 4)  # Overlay Data
    ds.add_new(0x60004000, "LT", f"Drawn on {p.given} {p.family}, {p.birth_written()[0]}")
    ds.add_new(0x50002500, "LO", f"ECG of {p.family}")  # Curve Label
    ds.add_new(0x50003000, "OB", b"\x01\x02\x03\x04")  # Curve Data (never searched: numbers)


def leak_dataset(seed: int, index: int = 0, *, series_size: int = 1) -> Dataset:
    """A valid DX phantom of ``make_patient(seed)`` with identifiers planted everywhere.

    Instance ``index`` of a series of ``series_size`` references the next instance in its
    Referenced Image Sequence and the one after in the nested Source Image Sequence (itself
    when the series has one instance).
    """
    p = make_patient(seed)
    ds = phantom_dataset(seed % 1000, index)
    birth = p.birth_written()
    study = p.study_written()
    following = [(index + 1) % series_size, (index + 2) % series_size]

    ds.PatientName = p.patient_name
    ds.PatientID = p.mrn
    ds.OtherPatientIDs = p.other_id
    ds.OtherPatientIDsSequence = Sequence(
        [_item(PatientID=p.other_id_in_sequence, TypeOfPatientID="TEXT")]
    )
    ds.PatientBirthName = f"{p.maiden}^{p.given}"
    ds.PatientBirthDate = p.birth_da
    ds.PatientAddress = p.address
    ds.PatientTelephoneNumbers = p.phone
    ds.AccessionNumber = p.accession
    ds.RequestAttributesSequence = Sequence(
        [
            _item(
                AccessionNumber=p.accession,
                RequestedProcedureID=p.order_id,
                ScheduledProcedureStepID=p.step_id,
                ScheduledPerformingPhysicianName="^".join(p.performing),
                RequestedProcedureDescription=f"CXR {p.family} {p.mrn}",
            )
        ]
    )
    ds.ReferringPhysicianName = "^".join(p.referring)
    ds.OperatorsName = "^".join(p.operator)
    ds.PerformingPhysicianName = "^".join(p.performing)
    ds.InstitutionName = p.institution
    ds.InstitutionAddress = p.institution_address
    ds.InstitutionalDepartmentName = p.department
    ds.StationName = p.station
    ds.DeviceSerialNumber = p.device_serial
    ds.StudyDescription = f"CXR {p.given.title()} {p.family.title()} {p.mrn} {birth[0]} {study[0]}"
    ds.SeriesDescription = f"{p.family}, {p.given} {birth[1]} {study[1]}"
    ds.ImageComments = (
        f"patient {p.family.lower()}, {p.given.lower()}; mrn{p.mrn}; born {birth[3]} "
        f"({birth[2]}, {birth[4]}, {p.birth_da}); acc {p.accession}; taken {study[2]}"
    )
    ds.ProcedureCodeSequence = Sequence([_code("RPID16", f"XR chest for {p.family} {p.mrn}")])
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = p.study_da
    ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime, ds.ContentTime = p.times
    ds.AcquisitionDateTime = p.acquisition_datetime
    ds.StudyInstanceUID = p.study_uid
    ds.SeriesInstanceUID = p.series_uid
    ds.SOPClassUID = SC_CLASS
    ds.SOPInstanceUID = p.instance_uid(index)
    ds.FrameOfReferenceUID = p.frame_of_reference_uid
    ds.InstanceNumber = index + 1
    ds.ReferencedImageSequence = _nested_references(p, index, following)
    ds.ReferencedSeriesSequence = Sequence(
        [
            _item(
                SeriesInstanceUID=p.series_uid,
                ReferencedInstanceSequence=Sequence([_reference(p.instance_uid(following[0]))]),
            )
        ]
    )
    ds.ContentSequence = _sr_content(p)
    ds.add(DataElement(UNKNOWN_STANDARD_TAG, "UN", f"{p.family} {p.mrn}".encode("ascii")))
    _plant_private(ds, p)
    _plant_graphics(ds, p)

    # The 128 free bytes before the header (dual-personality files put a TIFF header there).
    ds.preamble = f"II*\x00 {p.family}^{p.given} {p.mrn}".encode("ascii").ljust(128, b"\x00")
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = SC_CLASS
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    (
        meta.SourceApplicationEntityTitle,
        meta.SendingApplicationEntityTitle,
        meta.ReceivingApplicationEntityTitle,
    ) = p.ae_titles
    meta.SourcePresentationAddress = f"dicom://{p.hosts[0]}:104"
    meta.SendingPresentationAddress = f"dicom://{p.hosts[1]}:11112"
    return ds


def leak_series(seed: int, count: int = 3) -> list[Dataset]:
    """``count`` instances of one series that reference each other (see :func:`leak_dataset`)."""
    return [leak_dataset(seed, index, series_size=count) for index in range(count)]


def source_path(folder: Path, p: Patient, index: int) -> Path:
    """Where a site's export puts the file: folders and file names made of the identifiers."""
    return (
        folder
        / f"{p.family}_{p.given}_{p.mrn}"
        / f"{p.accession} {p.birth_written()[0]}"
        / f"{p.family}^{p.given} {p.mrn} {index}.dcm"
    )


def write_leak_files(
    folder: Path, seed: int, count: int = 3, *, implicit: bool = False
) -> list[Path]:
    """The series of :func:`leak_series` as Part 10 files under identifying names."""
    p = make_patient(seed)
    paths = []
    for index, ds in enumerate(leak_series(seed, count)):
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        path = source_path(folder, p, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- table coverage ------------------------------------------------------------------------

# Plausible values by VR: valid, non-empty and different from every dummy in values.py.
SAMPLE_BY_VR: dict[str, object] = {
    "AE": "LEAKAE",
    "AS": "045Y",
    "AT": 0x00100010,
    "CS": "LEAKCS",
    "DA": "20230415",
    "DS": "12.5",
    "DT": "20230415091512",
    "FD": 1.5,
    "FL": 1.5,
    "IS": "7",
    "LO": "LEAK LO VALUE",
    "LT": "leak long text",
    "OB": b"\x01\x02",
    "OD": b"\x01" * 8,
    "OF": b"\x01" * 4,
    "OL": b"\x01" * 4,
    "OV": b"\x01" * 8,
    "OW": b"\x01\x02",
    "PN": "WINTERBOTTOM^AUGUSTINA",
    "SH": "LEAKSH",
    "SL": 7,
    "SS": 7,
    "ST": "leak short text",
    "SV": 7,
    "TM": "091512",
    "UC": "leak unlimited",
    "UI": f"{MRN_UID_ROOT}.4041779.9",
    "UL": 7,
    "UN": b"LEAKUN",
    "UR": "http://example.org/leak",
    "US": 7,
    "UT": "leak unlimited text",
    "UV": 7,
}
TABLE_PATIENT = make_patient(0)


def rule_tag(rule: Rule) -> int:
    """The concrete tag of a by-tag rule ("(0010,0010)" → 0x00100010)."""
    return int(rule.tag_text.strip("()").replace(",", ""), 16)


def table_vr(tag: int) -> str:
    """The tag's VR from pydicom's dictionary (the first of "US or SS"), UN if it is unknown."""
    if not keyword_for_tag(tag):
        return "UN"
    return str(dictionary_VR(tag)).split(" or ")[0]


def sample_element(tag: int, vr: str) -> DataElement:
    """``tag`` with a plausible value; a sequence gets one item holding a PatientName and a
    ReferencedSOPInstanceUID, so that what happens *inside* it shows."""
    if vr == "SQ":
        item = _item(
            PatientName=TABLE_PATIENT.patient_name,
            ReferencedSOPInstanceUID=TABLE_PATIENT.instance_uid(7),
        )
        return DataElement(tag, vr, Sequence([item]))
    if tag == 0x00100010:
        return DataElement(tag, vr, TABLE_PATIENT.patient_name)
    if tag == 0x00100020:
        return DataElement(tag, vr, TABLE_PATIENT.mrn)
    return DataElement(tag, vr, SAMPLE_BY_VR[vr])


def table_case(elements: Iterable[DataElement], *, nested: bool) -> Dataset:
    """A data set of the table patient holding ``elements`` at top level, or inside the item of
    a sequence the profile keeps. File meta elements (group 2) go into the file meta at top
    level."""
    ds = _item(PatientName=TABLE_PATIENT.patient_name, PatientID=TABLE_PATIENT.mrn)
    ds.file_meta = FileMetaDataset()
    host = Dataset()
    if nested:
        setattr(ds, KEPT_HOST_KEYWORD, Sequence([host]))
    for element in elements:
        if nested:
            host.add(element)
        elif element.tag.group == 0x0002:
            ds.file_meta.add(element)
        else:
            ds.add(element)
    return ds


def graphics_elements(group_offset: int) -> list[DataElement]:
    """A whole overlay and a whole curve in the repeating groups 60xx and 50xx."""
    overlay = 0x6000 + group_offset
    curve = 0x5000 + group_offset
    return [
        DataElement((overlay << 16) | 0x0010, "US", 8),
        DataElement((overlay << 16) | 0x0011, "US", 8),
        DataElement((overlay << 16) | 0x0022, "LO", "overlay description"),
        DataElement((overlay << 16) | 0x3000, "OW", b"\xff\x00" * 4),
        DataElement((overlay << 16) | 0x4000, "LT", "overlay comments"),
        DataElement((curve << 16) | 0x0005, "US", 1),
        DataElement((curve << 16) | 0x2500, "LO", "curve label"),
        DataElement((curve << 16) | 0x3000, "OB", b"\x01\x02"),
    ]


def private_elements(group: int = PRIVATE_GROUP) -> list[DataElement]:
    """A private block: creator, a text, an unknown-VR and a sequence element."""
    return [
        DataElement((group << 16) | 0x0010, "LO", PRIVATE_CREATOR),
        DataElement((group << 16) | 0x1001, "LO", "private text"),
        DataElement((group << 16) | 0x1002, "UN", b"private bytes"),
        DataElement((group << 16) | 0x1003, "SQ", Sequence([_item(PatientName="PRIVATE^ITEM")])),
    ]


def as_read(ds: Dataset) -> Dataset:
    """``ds`` as the engine meets it coming off a disk: every element raw (undecoded).

    Only the data set goes through bytes (explicit VR little endian), so that command (0000)
    and file meta (0002) elements can be tested wherever they are put; the file meta is kept.
    """
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, ds)
    read = read_dataset(BytesIO(buffer.getvalue()), is_implicit_VR=False, is_little_endian=True)
    read.file_meta = ds.file_meta
    return read
