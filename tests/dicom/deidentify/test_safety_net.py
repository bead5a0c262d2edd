"""The safety net under the Annex E table: identifying attributes the table does not name.

The table names attributes one by one; each case here is one the 2026c table misses (found by
review with crafted inputs). Expectations are stated from what the attributes are, not from the
engine: a person name is emptied, an instance UID remapped, an issuer or order identifier, a URL
and an unknown tag removed; what readers need stays.
"""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.helpers import phantom_dataset
from triage_app.dicom.deidentify import DeidConfig, Deidentifier, ProfileOption, load_table
from triage_app.dicom.deidentify.files import deidentify_file
from triage_app.dicom.pseudonym import pseudonymous_uid
from triage_app.dicom.reader import quiet_pydicom

SECRET = b"s" * 32
HOSPITAL = "STMARYS-RIS"
ORDERS = "STMARYS-ORDERS"
ROOT_UID = "2.16.840.1.113883.3.72.5.9.1"
TABLE = load_table().by_tag


def _deidentified(ds: Dataset, *options: ProfileOption) -> Dataset:
    """``ds`` written, read back (elements raw, as from a disk) and de-identified."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    deid = Deidentifier(SECRET, DeidConfig(options=frozenset(options)))
    result = deidentify_file(buffer.getvalue(), deid)
    with quiet_pydicom():
        return pydicom.dcmread(io.BytesIO(result.data))


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def test_the_cases_are_not_in_the_table() -> None:
    """Otherwise these would be tests of the table, not of the safety net under it."""
    tags = [0x00100024, 0x00080051, 0x00400026, 0x00400027, 0x00401006, 0x00401007]
    tags += [0x00402006, 0x00402007, 0x0040A067, 0x00142006, 0x00200242, 0x00081167]
    tags += [0x00081190, 0x00041500, 0x04000500]
    assert not [f"{tag:08X}" for tag in tags if tag in TABLE]


def test_issuer_and_order_identifier_sequences_are_removed() -> None:
    ds = phantom_dataset(61, 1)
    qualifiers = _item(UniversalEntityID=ROOT_UID, UniversalEntityIDType="ISO")
    qualifiers.AssigningFacilitySequence = Sequence([_item(LocalNamespaceEntityID=HOSPITAL)])
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
    ds.IssuerOfAccessionNumberSequence = Sequence([_item(LocalNamespaceEntityID=HOSPITAL)])
    ds.OrderPlacerIdentifierSequence = Sequence([_item(LocalNamespaceEntityID=ORDERS)])
    ds.OrderFillerIdentifierSequence = Sequence([_item(UniversalEntityID=ROOT_UID)])
    out = _deidentified(ds)
    for keyword in (
        "IssuerOfPatientIDQualifiersSequence",
        "IssuerOfAccessionNumberSequence",
        "OrderPlacerIdentifierSequence",
        "OrderFillerIdentifierSequence",
    ):
        assert keyword not in out, keyword
    kept = [str(element.value) for element in out.iterall() if element.VR != "SQ"]
    assert not [value for value in kept if value in {HOSPITAL, ORDERS, ROOT_UID}]


RETIRED_ORDER_NUMBERS = {
    0x00401006: "PLC-778899",  # Placer Order Number / Procedure
    0x00401007: "FIL-112233",  # Filler Order Number / Procedure
    0x00402006: "PLCI-4455",  # Placer Order Number / Imaging Service Request (retired)
    0x00402007: "FILI-6677",  # Filler Order Number / Imaging Service Request (retired)
}


def test_retired_order_numbers_are_removed() -> None:
    ds = phantom_dataset(61, 1)
    for tag, value in RETIRED_ORDER_NUMBERS.items():
        ds.add_new(tag, "SH", value)
    out = _deidentified(ds)
    assert not [f"{tag:08X}" for tag in RETIRED_ORDER_NUMBERS if tag in out]


@pytest.mark.parametrize(
    "tag",
    [0x0040A067, 0x00142006, 0x00140104],
    ids=["DocumentAuthorTrial", "EvaluatorName", "SecondaryReviewerName"],
)
def test_person_names_the_table_misses_are_emptied(tag: int) -> None:
    ds = phantom_dataset(61, 1)
    ds.add_new(tag, "PN", "WINTERBOTTOM^AUGUSTINA")
    out = _deidentified(ds)
    assert tag not in out or out[tag].is_empty


@pytest.mark.parametrize(
    "tag", [0x00200242, 0x00081167], ids=["ConcatenationSource", "MultiFrameSource"]
)
def test_instance_uids_the_table_misses_are_remapped(tag: int) -> None:
    original = "1.2.826.0.1.3680043.8.498.4242"
    ds = phantom_dataset(61, 1)
    ds.add_new(tag, "UI", original)
    out = _deidentified(ds)
    assert out[tag].value == pseudonymous_uid(SECRET, original)


def test_instance_uids_the_table_misses_stay_under_retain_uids() -> None:
    original = "1.2.826.0.1.3680043.8.498.4242"
    ds = phantom_dataset(61, 1)
    ds.add_new(0x00200242, "UI", original)
    assert _deidentified(ds, ProfileOption.RETAIN_UIDS)[0x00200242].value == original


def test_class_syntax_and_registered_uids_are_kept() -> None:
    """UIDs of a kind, not of an instance: nothing to link back, and readers need them."""
    ds = phantom_dataset(61, 1)
    reference = _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID="1.2.3.4")
    ds.ReferencedImageSequence = Sequence([reference])
    code = _item(CodeValue="T-D3000", CodingSchemeDesignator="SRT", CodeMeaning="Chest")
    code.MappingResourceUID = "1.2.840.10008.8.1.1"  # DICOM Content Mapping Resource
    code.CodingSchemeUID = "2.16.840.1.113883.6.96"
    ds.AnatomicRegionSequence = Sequence([code])
    out = _deidentified(ds)
    assert out.SOPClassUID == ds.SOPClassUID
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    (kept_reference,) = out.ReferencedImageSequence
    assert kept_reference.ReferencedSOPClassUID == CTImageStorage
    assert kept_reference.ReferencedSOPInstanceUID == pseudonymous_uid(SECRET, "1.2.3.4")
    (kept_code,) = out.AnatomicRegionSequence
    assert kept_code.MappingResourceUID == "1.2.840.10008.8.1.1"
    assert kept_code.CodingSchemeUID == "2.16.840.1.113883.6.96"


def test_urls_and_directory_file_ids_are_removed() -> None:
    ds = phantom_dataset(61, 1)
    ds.RetrieveURL = "https://pacs.stmarys-hospital.example/wado/studies/1.2.840.99.1"
    ds.add_new(0x00041500, "CS", ["SMITH_ANNA", "IMG0001"])  # Referenced File ID: a path
    out = _deidentified(ds)
    assert "RetrieveURL" not in out
    assert 0x00041500 not in out


def test_encrypted_attributes_are_removed() -> None:
    """Encrypted Attributes Sequence holds the original values for another recipient."""
    ds = phantom_dataset(61, 1)
    encrypted = _item(EncryptedContentTransferSyntaxUID=ExplicitVRLittleEndian)
    encrypted.EncryptedContent = b"CMS envelope of DOE^JOHN MRN4711"
    ds.EncryptedAttributesSequence = Sequence([encrypted])
    out = _deidentified(ds)
    assert "EncryptedAttributesSequence" not in out


def _un_sequence(tag: int, item: Dataset) -> bytes:
    """``item`` as a defined-length sequence in an explicit VR UN element, as an old writer
    encodes a tag it does not know."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_dataset(buffer, item)
    body = buffer.getvalue()
    value = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"UN", 0, len(value)) + value


def test_an_unknown_tag_in_un_with_nested_values_is_removed() -> None:
    unknown = 0x00540999
    item = Dataset()
    item.add(DataElement(0x00100010, "PN", "OTHERNAME^PERSON"))
    item.add(DataElement(0x00081155, "UI", "1.2.3.4.999.777"))
    item.add(DataElement(0x00080020, "DA", "20210304"))
    ds = phantom_dataset(61, 1)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    pixels = data.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    crafted = data[:pixels] + _un_sequence(unknown, item) + data[pixels:]
    result = deidentify_file(crafted, Deidentifier(SECRET))
    for planted in (b"OTHERNAME", b"1.2.3.4.999.777", b"20210304"):
        assert planted not in result.data


def test_an_unknown_public_tag_is_removed() -> None:
    ds = phantom_dataset(61, 1)
    ds.add_new(0x00540999, "LO", "ward 7 bed 3")
    assert 0x00540999 not in _deidentified(ds)


@pytest.mark.parametrize("option", [None, ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES])
def test_dates_the_table_misses_follow_the_date_rule(option: ProfileOption | None) -> None:
    ds = phantom_dataset(61, 1)
    ds.add_new(0x00140102, "DA", "20210304")  # Secondary Review Date
    out = _deidentified(ds, *([option] if option else []))
    assert out[0x00140102].value != "20210304"


def test_dates_the_table_misses_are_kept_under_full_dates() -> None:
    ds = phantom_dataset(61, 1)
    ds.add_new(0x00140102, "DA", "20210304")
    out = _deidentified(ds, ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES)
    assert out[0x00140102].value == "20210304"


def test_what_the_central_model_reads_is_kept() -> None:
    ds = phantom_dataset(61, 1)
    out = _deidentified(ds)
    for keyword in (
        "Modality",
        "BodyPartExamined",
        "ViewPosition",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "WindowCenter",
        "WindowWidth",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        if keyword in ds:
            assert out.get(keyword) == ds.get(keyword), keyword
    assert out.pixel_array.tobytes() == ds.pixel_array.tobytes()


# --- a decoded multi-valued UID -------------------------------------------------------------


@pytest.mark.parametrize("decoded", [False, True], ids=["raw", "decoded"])
def test_each_value_of_a_multi_valued_uid_is_remapped_on_its_own(decoded: bool) -> None:
    """pydicom decodes a multi-valued UI as a MultiValue, which is no list."""
    originals = ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"]
    ds = phantom_dataset(61, 1)
    ds.add_new(0x00080058, "UI", originals)  # Failed SOP Instance UID List (U)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with quiet_pydicom():
        read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    if decoded:
        assert isinstance(read[0x00080058].value, MultiValue)
    Deidentifier(SECRET).deidentify(read)
    assert list(read[0x00080058].value) == [pseudonymous_uid(SECRET, u) for u in originals]
