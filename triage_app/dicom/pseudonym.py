"""Keyed pseudonyms: the same input always maps to the same output under one site's secret.

HMAC-SHA256 under the per-site secret means nobody without the secret can link a pseudonym back
to the original, while the device itself maps the same image to the same pseudonym every time —
so a re-sent image is the same case, never a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac

# UIDs derived from a UUID-sized integer under the "2.25." root are valid without a registered
# root (PS3.5 B.2); 128 bits keep the UID within 64 characters.
_UUID_ROOT = "2.25."


def _keyed(secret: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def pseudonymous_uid(secret: bytes, uid: str) -> str:
    """A valid ``2.25.`` UID standing for ``uid`` at this site."""
    return _UUID_ROOT + str(int.from_bytes(_keyed(secret, "uid", uid.strip())[:16], "big"))


def case_id_for(deidentified_sop_instance_uid: str) -> str:
    """The case id is a digest of the de-identified instance UID (DESIGN 4.2).

    Anyone holding the de-identified instance — the central server included — derives the same
    id, and it reveals nothing the de-identified UID does not.
    """
    return hashlib.sha256(deidentified_sop_instance_uid.encode()).hexdigest()[:32]
