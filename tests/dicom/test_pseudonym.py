"""Keyed pseudonyms and case ids: deterministic, secret-dependent, valid DICOM UIDs."""

from __future__ import annotations

import hashlib
import re

import pytest
from pydicom.uid import UID

from triage_app.dicom.pseudonym import (
    MAX_DATE_SHIFT_DAYS,
    case_id_for,
    date_shift_days,
    patient_pseudonym,
    pseudonymous_uid,
    text_pseudonym,
)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
UIDS = [
    "1.2.840.113619.2.55.3.604688119.971.1234567890.1",
    "1.2.3",
    "2.25.339523396178240395372541812359842306812",
    "1.3.6.1.4.1.9590.100.1.2.1",
    "9" * 64,
]
_UID_PATTERN = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def _assert_valid_uid(uid: str) -> None:
    assert _UID_PATTERN.match(uid), uid
    assert len(uid) <= 64
    assert UID(uid).is_valid
    assert int(uid.removeprefix("2.25.")) < 2**128


@pytest.mark.parametrize("uid", UIDS)
def test_pseudonym_is_a_valid_uuid_derived_uid(uid: str) -> None:
    _assert_valid_uid(pseudonymous_uid(SECRET, uid))


def test_pseudonyms_stay_valid_over_many_inputs() -> None:
    # Leading zeros in the digest must never become a leading zero after the root.
    for n in range(2000):
        _assert_valid_uid(pseudonymous_uid(SECRET, f"1.2.826.0.1.3680043.8.498.{n}"))


@pytest.mark.parametrize("uid", UIDS)
def test_pseudonym_is_deterministic(uid: str) -> None:
    assert pseudonymous_uid(SECRET, uid) == pseudonymous_uid(bytes(SECRET), str(uid))


@pytest.mark.parametrize("uid", UIDS)
def test_pseudonym_depends_on_the_secret(uid: str) -> None:
    assert pseudonymous_uid(SECRET, uid) != pseudonymous_uid(OTHER_SECRET, uid)
    assert pseudonymous_uid(SECRET, uid) != pseudonymous_uid(SECRET[:-1], uid)


def test_different_uids_get_different_pseudonyms() -> None:
    outputs = {pseudonymous_uid(SECRET, f"1.2.3.{n}") for n in range(1000)}
    assert len(outputs) == 1000


def test_pseudonym_does_not_reveal_the_original() -> None:
    uid = UIDS[0]
    pseudonym = pseudonymous_uid(SECRET, uid)
    assert uid not in pseudonym
    assert "113619" not in pseudonym  # the vendor root is gone too
    # Not an unkeyed hash of the UID (which anyone could recompute).
    unkeyed = "2.25." + str(int.from_bytes(hashlib.sha256(uid.encode()).digest()[:16], "big"))
    assert pseudonym != unkeyed


@pytest.mark.parametrize("padded", ["1.2.3 ", " 1.2.3", "1.2.3\n", "\t1.2.3  "])
def test_whitespace_padding_maps_like_the_stripped_uid(padded: str) -> None:
    assert pseudonymous_uid(SECRET, padded) == pseudonymous_uid(SECRET, "1.2.3")


def test_case_id_is_stable_hex_of_fixed_length() -> None:
    pseudonym = pseudonymous_uid(SECRET, UIDS[0])
    case_id = case_id_for(pseudonym)
    assert case_id == case_id_for(pseudonym)
    assert re.fullmatch(r"[0-9a-f]{64}", case_id)  # the escalation protocol's shape


def test_case_id_is_derivable_by_the_central_server() -> None:
    # DESIGN 4.2: anyone holding the de-identified instance derives the same id, without the
    # site secret. This pins the derivation (SHA-256 of the UID, first 128 bits in hex), since
    # the central server computes it independently.
    uid = "2.25.123456789012345678901234567890"
    assert case_id_for(uid) == hashlib.sha256(uid.encode("ascii")).hexdigest()


def test_case_ids_differ_per_instance_and_per_site() -> None:
    ids = {case_id_for(pseudonymous_uid(SECRET, f"1.2.3.{n}")) for n in range(500)}
    assert len(ids) == 500
    assert case_id_for(pseudonymous_uid(SECRET, "1.2.3")) != case_id_for(
        pseudonymous_uid(OTHER_SECRET, "1.2.3")
    )


# --- patient pseudonyms, text pseudonyms, date shifts ------------------------------------------

PATIENT_KEYS = ["id:PID-7734521", "id:1", "name:Doe^Jane", "id:" + "9" * 64, "id:Müller"]
_SH = re.compile(r"^[^\\\x00-\x1f]{1,16}$")  # SH/AE: at most 16 characters, no backslash


@pytest.mark.parametrize("key", PATIENT_KEYS)
def test_patient_pseudonym_is_deterministic_and_fits_sh(key: str) -> None:
    pseudonym = patient_pseudonym(SECRET, key)
    assert pseudonym == patient_pseudonym(bytes(SECRET), str(key))
    assert len(pseudonym) == 16
    assert _SH.match(pseudonym)
    assert re.fullmatch(r"[0-9A-Z]+", pseudonym)  # also a valid LO, PN and CS value
    assert key.split(":", 1)[1][:4] not in pseudonym


@pytest.mark.parametrize("key", PATIENT_KEYS)
def test_patient_pseudonym_depends_on_the_secret(key: str) -> None:
    assert patient_pseudonym(SECRET, key) != patient_pseudonym(OTHER_SECRET, key)


def test_patient_pseudonyms_differ_per_patient() -> None:
    pseudonyms = {patient_pseudonym(SECRET, f"id:{n}") for n in range(2000)}
    assert len(pseudonyms) == 2000


def test_patient_pseudonym_is_keyed_apart_from_other_purposes() -> None:
    # The same input under another purpose must not give the same digits.
    key = "id:PID-7734521"
    assert patient_pseudonym(SECRET, key)[1:] != text_pseudonym(SECRET, "ae", key)[:15]


@pytest.mark.parametrize("length", [1, 8, 16])
def test_text_pseudonym_has_the_asked_length_and_fits_ae(length: int) -> None:
    pseudonym = text_pseudonym(SECRET, "ae", "CT_SCANNER_7", length)
    assert len(pseudonym) == length
    assert _SH.match(pseudonym)
    assert pseudonym == pseudonym.upper()


def test_text_pseudonym_is_deterministic_keyed_and_purpose_bound() -> None:
    value = "CT_SCANNER_7"
    first = text_pseudonym(SECRET, "ae", value)
    assert first == text_pseudonym(SECRET, "ae", f"  {value} ")  # padding is not identity
    assert len(first) == 16
    assert first != text_pseudonym(OTHER_SECRET, "ae", value)
    assert first != text_pseudonym(SECRET, "station", value)
    assert first != text_pseudonym(SECRET, "ae", "CT_SCANNER_8")
    assert "SCANNER" not in first


@pytest.mark.parametrize("key", PATIENT_KEYS)
def test_date_shift_is_deterministic_and_always_back(key: str) -> None:
    days = date_shift_days(SECRET, key)
    assert days == date_shift_days(bytes(SECRET), str(key))
    assert -MAX_DATE_SHIFT_DAYS <= days <= -1


def test_date_shifts_cover_the_range_and_never_zero() -> None:
    shifts = [date_shift_days(SECRET, f"id:{n}") for n in range(20000)]
    assert min(shifts) >= -MAX_DATE_SHIFT_DAYS
    assert max(shifts) <= -1
    assert 0 not in shifts
    # Spread over the whole range, not bunched: each tenth of it is hit.
    tenths = {(-s - 1) * 10 // MAX_DATE_SHIFT_DAYS for s in shifts}
    assert tenths == set(range(10))
    assert MAX_DATE_SHIFT_DAYS <= 3660  # within ten years, as documented


def test_date_shift_depends_on_the_secret_and_the_patient() -> None:
    keys = [f"id:{n}" for n in range(200)]
    ours = [date_shift_days(SECRET, k) for k in keys]
    theirs = [date_shift_days(OTHER_SECRET, k) for k in keys]
    # Equal by chance for about 1 in 3650 patients; here for none or nearly none.
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) <= 2
    # 200 patients over 3650 offsets share a few by chance (about 5), never many.
    assert len(set(ours)) > 180
