"""The profile engine: one dataset through PS3.15 Annex E, in place, at every nesting depth.

:class:`Deidentifier` walks the dataset (and its file meta) once. For each element it looks the
tag up in the Annex E table (:mod:`.table`), resolves the action under the selected options and
applies it; sequences are de-identified item by item however deep they go. What the table does
not name falls to a safety net (:meth:`_Walk.untabled`): the table lists attributes by name, and
every edition leaves out some that identify (retired order numbers, newer person names and
UIDs, issuer sequences, unknown tags). The rest is kept, but still passes the residual scrub
(:mod:`.scrub`). The file meta is rebuilt from an allow-list, and the pixel data loses what is
not the image (:mod:`.pixel_data`). Finally the output is marked (PS3.15 E.1.1: Patient Identity
Removed, De-identification Method and its code sequence, CID 7050).

Speed: elements are read through ``Dataset.get_item``, which returns pydicom's undecoded raw
element; an element is only decoded when it must change or when the scrub's byte pre-check
finds a candidate. Native pixel data is only rewritten when it has bytes or bits that are not
the image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from triage_app import __version__
from triage_app.dicom.deidentify.burned_in import (
    PixelCleanRule,
    apply_rule,
    burned_in_reasons,
    find_rule,
)
from triage_app.dicom.deidentify.pixel_data import clean_pixel_data
from triage_app.dicom.deidentify.scrub import PatientIdentifiers, Scrubber, text_values
from triage_app.dicom.deidentify.table import Action, ProfileOption, ProfileTable, load_table
from triage_app.dicom.deidentify.values import dummy_value, shift_date, shift_datetime
from triage_app.dicom.pseudonym import (
    date_shift_days,
    patient_pseudonym,
    pseudonymous_uid,
    text_pseudonym,
)
from triage_app.dicom.reader import quiet_pydicom
from triage_app.dicom.writer import ascii_compatible

log = logging.getLogger(__name__)

# Identifies this software in the file meta (a fixed UUID-derived UID, nothing site-specific).
IMPLEMENTATION_CLASS_UID = "2.25.153173212530961245786093375040297346097"
IMPLEMENTATION_VERSION_NAME = f"TRIAGE_{__version__}"[:16]

_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_UID_KEYWORDS = {
    "study": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "instance": "SOPInstanceUID",
}
_FILE_META_GROUP = 0x0002
# Groups whose attributes belong to something other than an instance, removed where the table
# does not name them: directory records (0004: file IDs are paths, often a patient's name) and
# signatures, MACs and encrypted attributes (0400: invalid after de-identification, and an
# Encrypted Attributes Sequence holds the original values for some other recipient).
_FOREIGN_GROUPS = frozenset({0x0004, 0x0400})
# Keywords of attributes the table does not name that identify an order or an ID's issuer
# (Issuer of Accession Number Sequence, Order Placer Identifier Sequence, the retired Placer
# and Filler Order Numbers) or locate the instance (Retrieve URL, Pixel Data Provider URL).
_IDENTIFYING_KEYWORD = re.compile(r"Issuer|OrderNumber|Order\w*Identifier|UR[LI]$")
# UIDs of a kind, not of an instance: SOP classes, transfer syntaxes, coding schemes.
_KIND_UID_KEYWORD = re.compile(r"ClassUID|TransferSyntax|CodingScheme")
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
# Free text the residual scrub searches. Coded values (CS), ages and numbers are not free text:
# scrubbing a name part "CT" out of Modality would break the object, not protect anyone.
_SCRUBBED_VRS = frozenset({"AE", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Text a dummy replaces inside a dummied sequence: the scrubbed VRs that are not AE, URL or date.
_FREE_TEXT_VRS = _SCRUBBED_VRS - {"AE", "UR", "DA", "DT", "TM"}
# Prose, never a code: what a Clean option cleans by pattern wherever the table leaves it.
_PROSE_VRS = frozenset({"LT", "ST", "UT", "UC"})
# Character sets whose bytes contain ASCII text as ASCII: the raw pre-check is reliable.

# CID 7050 De-identification Method (PS3.16), scheme DCM.
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA_CODE = ("113101", "Clean Pixel Data Option")
OPTION_CODES = {
    ProfileOption.CLEAN_GRAPHICS: ("113103", "Clean Graphics Option"),
    ProfileOption.CLEAN_STRUCTURED_CONTENT: ("113104", "Clean Structured Content Option"),
    ProfileOption.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
    ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES: (
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: (
        "113108",
        "Retain Patient Characteristics Option",
    ),
    ProfileOption.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    ProfileOption.RETAIN_UIDS: ("113110", "Retain UIDs Option"),
    ProfileOption.RETAIN_SAFE_PRIVATE: ("113111", "Retain Safe Private Option"),
    ProfileOption.RETAIN_INSTITUTION_IDENTITY: ("113112", "Retain Institution Identity Option"),
}

# "GGGG,CREATOR,EE": an odd (private) group, a non-blank creator, the element byte. The settings
# validate with the same pattern, so a setting that passes always parses.
SAFE_PRIVATE_PATTERN = (
    r"\s*([0-9A-Fa-f]{3}[13579BDFbdf])\s*,\s*([^,]*?[^,\s])\s*,\s*([0-9A-Fa-f]{2})\s*"
)


@dataclass(frozen=True, order=True)
class SafePrivateTag:
    """One private attribute a site considers safe: group, creator and element byte."""

    group: int
    creator: str
    element: int  # the low byte, xx in (gggg,00xx)'s block

    @classmethod
    def parse(cls, text: str) -> SafePrivateTag:
        """Read ``"0019,SIEMENS MR HEADER,0A"``; raises ``ValueError`` with the reason."""
        match = re.fullmatch(SAFE_PRIVATE_PATTERN, text)
        if not match:
            raise ValueError(
                f"a safe private tag must look like GGGG,CREATOR,EE with an odd group "
                f"(got {text!r})"
            )
        return cls(int(match.group(1), 16), match.group(2), int(match.group(3), 16))

    def __str__(self) -> str:
        return f"{self.group:04X},{self.creator},{self.element:02X}"


# Private attributes PS3.15 Table E.3.10-1 lists as safe (diffusion and mosaic geometry).
DEFAULT_SAFE_PRIVATE: tuple[str, ...] = (
    "0019,SIEMENS MR HEADER,0A",
    "0019,SIEMENS MR HEADER,0C",
    "0019,SIEMENS MR HEADER,0D",
    "0019,SIEMENS MR HEADER,0E",
    "0019,SIEMENS MR HEADER,27",
)


@dataclass(frozen=True)
class DeidConfig:
    """What to de-identify and how; plain and picklable so worker processes can take it."""

    options: frozenset[ProfileOption] = frozenset()
    safe_private: tuple[SafePrivateTag, ...] = ()
    pixel_rules: tuple[PixelCleanRule, ...] = ()

    def describe(self) -> list[str]:
        """The profile and options, as written into De-identification Method."""
        basic = f"PS3.15 E Basic Profile ({load_table().edition})"
        return [basic, *sorted(option.value for option in self.options)]


@dataclass(frozen=True)
class DeidentificationReport:
    """What was done to one instance. ``links`` hold originals: they never leave the device."""

    sop_instance_uid: str  # de-identified ("" if the source had none)
    study_instance_uid: str
    series_instance_uid: str
    patient_pseudonym: str
    method: tuple[str, ...]
    burned_in_reasons: tuple[str, ...]
    pixel_rule: str | None
    links: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)  # kind, new, old

    @property
    def burned_in_risk(self) -> bool:
        """At risk of burned-in identifiers and no pixel-clean rule covered the image."""
        return bool(self.burned_in_reasons) and self.pixel_rule is None

    def to_json(self) -> dict[str, object]:
        return {
            "method": list(self.method),
            "patient_pseudonym": self.patient_pseudonym,
            "burned_in_risk": self.burned_in_risk,
            "burned_in_reasons": list(self.burned_in_reasons),
            "pixel_clean_rule": self.pixel_rule,
        }


def _vr_of(tag: BaseTag, element: DataElement | RawDataElement) -> str:
    """The element's VR; implicit or explicit ``UN`` take the dictionary's VR where known."""
    vr = element.VR
    if vr and vr != "UN":
        return str(vr)
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def _element(ds: Dataset, tag: BaseTag) -> DataElement | RawDataElement:
    """The element as stored: undecoded (raw) until something decodes it."""
    # pydicom's overload omits RawDataElement, which is what an unread element is.
    return cast("DataElement | RawDataElement", ds.get_item(tag))


def _strings(raw: bytes) -> list[str]:
    return raw.decode("ascii", "replace").rstrip("\x00 ").split("\\")


class Deidentifier:
    """De-identifies datasets in place under one site secret and one configuration."""

    def __init__(
        self, secret: bytes, config: DeidConfig | None = None, table: ProfileTable | None = None
    ) -> None:
        self.secret = secret
        self.config = config or DeidConfig()
        self._table = table or load_table()
        options = self.config.options
        self.actions = {tag: rule.action(options) for tag, rule in self._table.by_tag.items()}
        self.curve_action = self._table.curve.action(options)
        self.private_action = self._table.private.action(options)
        # What some Clean option cleans (descriptions, dates): inside a sequence being cleaned
        # these are cleaned instead of removed. IDs and names have no C and are still removed.
        self.cleanable = frozenset(
            tag for tag, rule in self._table.by_tag.items() if Action.CLEAN in rule.options.values()
        )
        self.safe_private = {
            (s.group, s.creator.upper(), s.element) for s in self.config.safe_private
        }
        self.shift_dates = ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in options
        # The table's rule for every dated attribute, applied to those it does not name.
        self.untabled_date_action = (
            Action.KEEP if ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES in options else Action.CLEAN
        )
        self._method = tuple(self.config.describe())

    def uid(self, uid: str) -> str:
        """The de-identified form of ``uid`` (itself under Retain UIDs).

        A UID the standard registers (a class, a transfer syntax, a well-known frame of
        reference or mapping resource) names no instance: it is kept, so that references to it
        keep their meaning.
        """
        if ProfileOption.RETAIN_UIDS in self.config.options or not uid or UID(uid).keyword:
            return uid
        return pseudonymous_uid(self.secret, uid)

    def deidentify(self, ds: Dataset) -> DeidentificationReport:
        """De-identify ``ds`` (and its file meta) in place; the decoded image is left as it is."""
        with quiet_pydicom():  # pydicom's value warnings would quote the (identifying) value
            return self._deidentify(ds)

    def _deidentify(self, ds: Dataset) -> DeidentificationReport:
        identifiers = PatientIdentifiers.capture(ds)
        # Both read the overlay groups, so before the walk removes them. What the pixel data
        # hides and cannot be cut out is a risk like burned-in text: a rule stores it decoded.
        reasons = burned_in_reasons(ds) + clean_pixel_data(ds)
        rule = find_rule(ds, self.config.pixel_rules) if reasons else None
        if rule is not None:
            apply_rule(ds, rule)
            log.info("pixel-clean rule %r applied", rule.name)
        originals = {k: str(ds.get(keyword) or "") for k, keyword in _UID_KEYWORDS.items()}
        walk = _Walk(self, identifiers, ds)
        walk.dataset(ds, clean=False)
        if getattr(ds, "file_meta", None) is not None:
            ds.file_meta = self._file_meta(ds, ds.file_meta)
        self._mark(ds, cleaned_pixels=rule is not None)
        if getattr(ds, "preamble", None):
            ds.preamble = bytes(128)  # free bytes before the header: anything may be in them
        # As written: under Retain UIDs a UID built from an ID is still replaced.
        report_uids = {k: str(ds.get(keyword) or "") for k, keyword in _UID_KEYWORDS.items()}
        links = tuple(
            (kind, report_uids[kind], original) for kind, original in originals.items() if original
        )
        if identifiers.patient_key:
            links += (("patient", walk.patient_pseudonym, identifiers.patient_key),)
        return DeidentificationReport(
            sop_instance_uid=report_uids["instance"],
            study_instance_uid=report_uids["study"],
            series_instance_uid=report_uids["series"],
            patient_pseudonym=walk.patient_pseudonym,
            method=self._method,
            burned_in_reasons=reasons,
            pixel_rule=rule.name if rule is not None else None,
            links=links,
        )

    def _file_meta(self, ds: Dataset, source: Dataset) -> FileMetaDataset:
        """Group 2 rebuilt from an allow-list: what a reader needs, and this software's name.

        An allow-list, because the meta is a free-for-all the Annex E table does not cover:
        AE titles and presentation addresses name the sending station, Private Information and
        the RTV elements carry anything, and elements no dictionary knows carry more. The
        instance UID is the de-identified one.
        """
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        if "SOPClassUID" in ds or "MediaStorageSOPClassUID" in source:
            meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or source.MediaStorageSOPClassUID
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        elif "MediaStorageSOPInstanceUID" in source:  # no instance UID in the data set to copy
            meta.MediaStorageSOPInstanceUID = UID(self.uid(source.MediaStorageSOPInstanceUID))
        if "TransferSyntaxUID" in source:
            meta.TransferSyntaxUID = source.TransferSyntaxUID
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        return meta

    def _mark(self, ds: Dataset, *, cleaned_pixels: bool) -> None:
        """PS3.15 E.1.1 marking, with the profile and each option as CID 7050 codes."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = list(self._method) if len(self._method) > 1 else self._method[0]
        codes = [BASIC_PROFILE_CODE]
        if cleaned_pixels:
            codes.append(CLEAN_PIXEL_DATA_CODE)
        codes += sorted(OPTION_CODES[o] for o in self.config.options)
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
        options = self.config.options
        if ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES in options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"


class _Walk:
    """One dataset's de-identification: the per-instance state the element rules share."""

    def __init__(self, deid: Deidentifier, identifiers: PatientIdentifiers, root: Dataset) -> None:
        self.deid = deid
        self.scrubber = Scrubber(identifiers)
        key = identifiers.patient_key
        self.patient_pseudonym = patient_pseudonym(deid.secret, key) if key else ""
        self.shift_days = date_shift_days(deid.secret, key) if deid.shift_dates else 0
        self.raw_precheck = ascii_compatible(root)
        # Inside a sequence the profile replaces with a dummy (D: Content Sequence, Verifying
        # Observer...), free text the table does not name is replaced too, not merely scrubbed.
        self.dummy_depth = 0

    # --- the walk ---------------------------------------------------------------------------

    def dataset(self, ds: Dataset, *, clean: bool) -> None:
        deid = self.deid
        actions = deid.actions
        for tag in list(ds.keys()):
            group = tag >> 16
            if group & 1:
                self.private(ds, tag)
                continue
            if tag & 0xFFFF == 0 or group == _FILE_META_GROUP:
                del ds[tag]  # group lengths; file meta elements only belong in the file meta
                continue
            action = actions.get(tag)
            if action is None and group & 0xFF01 == 0x5000:
                action = deid.curve_action
            elif action is None and group & 0xFF01 == 0x6000:
                # The whole overlay group goes, under Clean Graphics too: its bitmap may be
                # rendered text (a name banner) no rule can clean, and its rows, columns and
                # origin are meaningless without it.
                action = Action.REMOVE
            # Clean Graphics keeps curves; only their text can be cleaned (their data are
            # numbers, kept as they are).
            if (
                action is Action.CLEAN
                and group & 0xFF01 == 0x5000
                and _vr_of(tag, _element(ds, tag)) not in _TEXT_VRS
            ):
                action = Action.KEEP
            if action is None:
                action = self.untabled(ds, tag)
            if action is None and self.dummy_depth and not clean:
                vr = _vr_of(tag, _element(ds, tag))
                if vr in _FREE_TEXT_VRS:
                    action = Action.DUMMY
            if action is None:
                self.keep(ds, tag, clean=clean)
                continue
            self.apply(ds, tag, action, clean=clean)

    def apply(self, ds: Dataset, tag: BaseTag, action: Action, *, clean: bool) -> None:
        element = _element(ds, tag)
        vr = _vr_of(tag, element)
        # Inside a sequence being cleaned, text the profile would remove is cleaned instead; if
        # nothing is left of it, it is removed after all (an empty value may break the IOD).
        cleaned_instead = (
            clean and action is Action.REMOVE and vr in _TEXT_VRS and tag in self.deid.cleanable
        )
        if cleaned_instead:
            action = Action.CLEAN
        if action is Action.REMOVE:
            del ds[tag]
        elif vr == "SQ":
            self.sequence(ds, tag, action, clean=clean)
        elif action is Action.KEEP:
            self.keep(ds, tag, clean=clean)
        elif vr == "UI" and action is not Action.ZERO:
            self.remap_uids(ds, tag, element)
        elif tag in (_PATIENT_NAME, _PATIENT_ID) and action in (Action.ZERO, Action.DUMMY):
            ds[tag] = DataElement(tag, vr, self.patient_pseudonym or None)
        elif action is Action.ZERO:
            ds[tag] = DataElement(tag, vr, None)
        elif action is Action.DUMMY:
            ds[tag] = DataElement(tag, vr, dummy_value(vr))
        elif action is Action.CLEAN:
            self.clean_value(ds, tag, vr)
            if cleaned_instead and tag in ds and ds[tag].is_empty:
                del ds[tag]
        else:  # UID / UID_REFERENCES on something that is neither a UID nor a sequence
            ds[tag] = DataElement(tag, vr, dummy_value(vr))

    def sequence(self, ds: Dataset, tag: BaseTag, action: Action, *, clean: bool) -> None:
        if action is Action.ZERO:
            ds[tag].value = DicomSequence()
            return
        # D, K, C and U* keep the items and de-identify what is in them; the Clean options
        # keep free text inside their sequences (cleaned) where the profile would drop it.
        inner_clean = clean or action is Action.CLEAN
        dummy = action is Action.DUMMY and not inner_clean
        self.dummy_depth += dummy
        try:
            for item in ds[tag].value:
                self.dataset(item, clean=inner_clean)
        finally:
            self.dummy_depth -= dummy

    def untabled(self, ds: Dataset, tag: BaseTag) -> Action | None:
        """The safety net for a standard attribute the table does not name; None keeps it.

        The table names attributes one by one, so each edition misses some that identify:
        an unknown tag (or UN no dictionary knows) may hold anything, a person name is a name
        whatever its attribute, a UID of an instance links back to the original, an issuer
        or order identifier points into the hospital's systems, a URL names the archive. Dates
        get the table's date rule. What the model and the central server read (image pixel
        attributes, LUTs, SOP and transfer syntax UIDs) falls under none of these.
        """
        keyword = keyword_for_tag(tag)
        if not keyword or tag >> 16 in _FOREIGN_GROUPS:
            return Action.REMOVE
        vr = _vr_of(tag, _element(ds, tag))
        if vr == "PN":
            return Action.ZERO
        if vr == "UR" or _IDENTIFYING_KEYWORD.search(keyword):
            return Action.REMOVE
        if vr == "UI" and not _KIND_UID_KEYWORD.search(keyword):
            return Action.UID
        if vr in _DATE_VRS:
            return self.deid.untabled_date_action
        return None

    def keep(self, ds: Dataset, tag: BaseTag, *, clean: bool, search_bytes: bool = False) -> None:
        """An attribute the profile keeps: still scrubbed for this patient's identifiers.

        Binary values are searched only when their meaning is unknown (UN, or a retained
        private value, ``search_bytes``); pixel data, LUTs and waveforms are never searched:
        a name part turns up in image bytes by chance. Inside what a Clean option cleans, prose
        is cleaned whether or not it holds this patient's identifiers: others' dates, phone
        numbers and IDs are no less identifying (codes and short text keep the plain scrub).
        """
        element = _element(ds, tag)
        vr = _vr_of(tag, element)
        if vr == "SQ":
            for item in ds[tag].value:
                self.dataset(item, clean=clean)
            return
        if clean and vr in _PROSE_VRS:
            self.scrub_text(ds, tag, clean=True)
            return
        if self.scrubber.empty:
            return
        if vr in _BYTES_VRS:
            value = element.value
            searched = search_bytes or vr == "UN"
            if searched and isinstance(value, bytes) and self.scrubber.may_contain(value):
                del ds[tag]  # identifiers inside bytes cannot be cut out safely
            return
        if vr not in _SCRUBBED_VRS and vr != "UI":
            return
        if isinstance(element, RawDataElement):
            if self.raw_precheck and not self.scrubber.may_contain(element.value or b""):
                return
        else:
            # Already decoded (read earlier, e.g. Modality): the same check on its text.
            text = "\\".join(text_values(element.value))
            if not self.scrubber.may_contain(text.encode("utf-8", "replace")):
                return
        if vr == "UI":
            if self._hit(ds[tag].value):
                self.remap_uids(ds, tag, _element(ds, tag))
        else:
            self.scrub_text(ds, tag, clean=clean)

    def private(self, ds: Dataset, tag: BaseTag) -> None:
        if self.deid.private_action is Action.REMOVE or not self.deid.safe_private:
            del ds[tag]
            return
        element = tag & 0xFFFF
        group = tag >> 16
        if 0x0010 <= element <= 0x00FF:
            creator = str(ds[tag].value or "").strip().upper()
            if not any(g == group and c == creator for g, c, _ in self.deid.safe_private):
                del ds[tag]
            return
        creator_tag = (group << 16) | (element >> 8)
        creator = str(ds[creator_tag].value if creator_tag in ds else "").strip().upper()
        if element < 0x1000 or (group, creator, element & 0xFF) not in self.deid.safe_private:
            del ds[tag]
            return
        # Safe values still lose this patient's identifiers, bytes included; the Clean options'
        # patterns are not for them (a vendor's number is no record number).
        self.keep(ds, tag, clean=False, search_bytes=True)

    # --- values -----------------------------------------------------------------------------

    def _hit(self, value: object) -> bool:
        return any(v != self.scrubber.scrub(v) for v in text_values(value))

    def remap_uids(self, ds: Dataset, tag: BaseTag, element: DataElement | RawDataElement) -> None:
        if isinstance(element, RawDataElement):
            values: Sequence[str] = _strings(element.value or b"")
        else:  # a decoded multi-valued UI is a MultiValue, not a list: each value on its own
            values = text_values(element.value)
        remapped = [self.deid.uid(v.strip()) for v in values if v.strip()]
        if ProfileOption.RETAIN_UIDS in self.deid.config.options and self._hit(remapped):
            # A UID built from an ID is replaced even under Retain UIDs.
            remapped = [pseudonymous_uid(self.deid.secret, v) for v in remapped]
        ds[tag] = DataElement(tag, "UI", remapped[0] if len(remapped) == 1 else remapped or None)

    def clean_value(self, ds: Dataset, tag: BaseTag, vr: str) -> None:
        """The C action: a value of similar meaning that reveals nothing."""
        if vr in ("DA", "DT", "TM"):
            self.clean_date(ds, tag, vr)
        elif vr == "AE":
            values = text_values(ds[tag].value)
            new = [text_pseudonym(self.deid.secret, "ae", v) for v in values if v]
            ds[tag] = DataElement(tag, vr, new[0] if len(new) == 1 else new or None)
        elif vr in _TEXT_VRS:
            self.scrub_text(ds, tag, clean=True)
        elif vr in _BYTES_VRS:
            del ds[tag]  # no safe way to clean arbitrary bytes
        else:
            ds[tag] = DataElement(tag, vr, dummy_value(vr))

    def clean_date(self, ds: Dataset, tag: BaseTag, vr: str) -> None:
        if not self.deid.shift_dates:
            ds[tag] = DataElement(tag, vr, dummy_value(vr))
            return
        if vr == "TM":  # whole-day shifts keep the time of day
            return
        shift = shift_date if vr == "DA" else shift_datetime
        new = [shift(v, self.shift_days) for v in text_values(ds[tag].value) if v]
        ds[tag] = DataElement(tag, vr, new[0] if len(new) == 1 else new or None)

    def scrub_text(self, ds: Dataset, tag: BaseTag, *, clean: bool) -> None:
        element = ds[tag]
        vr = element.VR
        fix = self.scrubber.clean if clean else self.scrubber.scrub
        values = text_values(element.value)
        new = [fix(v) for v in values]
        if new == values:
            return
        if vr in ("DA", "DT", "TM") and any(new):  # a date cannot be half a date
            new = [v if v == old else "" for v, old in zip(new, values, strict=True)]
        kept = [v for v in new if v]
        ds[tag] = DataElement(tag, vr, kept[0] if len(kept) == 1 else kept or None)


def parse_safe_private(entries: Iterable[str]) -> tuple[SafePrivateTag, ...]:
    return tuple(sorted({SafePrivateTag.parse(entry) for entry in entries}))
