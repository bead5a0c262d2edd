"""Keyed pseudonyms: the same input always maps to the same output under one site's secret.

HMAC-SHA256 under the per-site secret means nobody without the secret can link a pseudonym back
to the original, while the device itself maps the same value to the same pseudonym every time —
across files, studies and runs — so references still resolve, a study is never split, and a
re-sent image is the same case, never a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac

# UIDs derived from a UUID-sized integer under the "2.25." root are valid without a registered
# root (PS3.5 B.2); 128 bits keep the UID within 64 characters.
_UUID_ROOT = "2.25."
# Shifted dates move back by 1..MAX_DATE_SHIFT_DAYS days: never zero, so a shifted date never
# equals the original, and within ten years, so ages and seasons stay roughly plausible.
MAX_DATE_SHIFT_DAYS = 3650


def _keyed(secret: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def pseudonymous_uid(secret: bytes, uid: str) -> str:
    """A valid ``2.25.`` UID standing for ``uid`` at this site."""
    return _UUID_ROOT + str(int.from_bytes(_keyed(secret, "uid", uid.strip())[:16], "big"))


def patient_pseudonym(secret: bytes, patient_key: str) -> str:
    """A 16-character pseudonym for a patient (fits every VR a patient ID or name uses)."""
    return "P" + _keyed(secret, "patient", patient_key).hex()[:15].upper()


def text_pseudonym(secret: bytes, purpose: str, value: str, length: int = 16) -> str:
    """An upper-case pseudonym of ``length`` characters, e.g. for an AE title (max 16)."""
    return _keyed(secret, purpose, value.strip()).hex()[:length].upper()


def date_shift_days(secret: bytes, patient_key: str) -> int:
    """The keyed per-patient date offset (negative days); intervals within a patient are kept."""
    digest = _keyed(secret, "date-shift", patient_key)
    return -(1 + int.from_bytes(digest[:4], "big") % MAX_DATE_SHIFT_DAYS)


def case_id_for(deidentified_sop_instance_uid: str) -> str:
    """The case id is a digest of the de-identified instance UID (DESIGN 4.2).

    Anyone holding the de-identified instance — the central server included — derives the same
    id, and it reveals nothing the de-identified UID does not.
    """
    return hashlib.sha256(deidentified_sop_instance_uid.encode()).hexdigest()
