"""Replacement values that are valid for their VR and reveal nothing.

Peers write dummies a validator rejects (``00010101`` for a date) or that look real; every value
here is a legal value of its VR (PS3.5 6.2) and is obviously a placeholder.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from types import MappingProxyType

# One placeholder per VR (the "D" action). UI and SQ never get here: UIDs are remapped with the
# site key and sequences are kept with their items de-identified.
DUMMY_BY_VR: Mapping[str, object] = MappingProxyType(
    {
        "AE": "ANONYMOUS",
        "AS": "000D",
        "CS": "ANONYMIZED",
        "DA": "19000101",
        "DS": "0",
        "DT": "19000101000000",
        "IS": "0",
        "LO": "ANONYMIZED",
        "LT": "ANONYMIZED",
        "PN": "ANONYMIZED",
        "SH": "ANONYMIZED",
        "ST": "ANONYMIZED",
        "TM": "000000",
        "UC": "ANONYMIZED",
        "UR": "urn:x-anonymized",
        "UT": "ANONYMIZED",
        "FL": 0.0,
        "FD": 0.0,
        "SL": 0,
        "SS": 0,
        "SV": 0,
        "UL": 0,
        "US": 0,
        "UV": 0,
        "AT": 0,
        "OB": b"\x00\x00",
        "OD": b"\x00" * 8,
        "OF": b"\x00" * 4,
        "OL": b"\x00" * 4,
        "OV": b"\x00" * 8,
        "OW": b"\x00\x00",
        "UN": b"\x00\x00",
    }
)

_DA = re.compile(r"^(\d{4})(\d{2})?(\d{2})?$")
# YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX] (PS3.5 Table 6.2-1): date, time of day, UTC offset.
_DT = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"
)


def dummy_value(vr: str) -> object:
    """The placeholder for ``vr``; unknown VRs are treated as unknown bytes."""
    return DUMMY_BY_VR.get(vr, DUMMY_BY_VR["UN"])


def _shift(year: str, month: str | None, day: str | None, days: int) -> str | None:
    """Shift a full or partial date, keeping the original precision; None if not a date."""
    try:
        date = dt.date(int(year), int(month or 1), int(day or 1)) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    text = f"{date.year:04d}{date.month:02d}{date.day:02d}"  # strftime drops the year's zeros
    return text[: 4 + (2 if month else 0) + (2 if day else 0)]


def shift_date(value: str, days: int) -> str:
    """A DA value (or range ``A-B``) moved by ``days``; anything unreadable becomes the dummy."""
    parts: list[str] = []
    pieces = value.strip().split("-")
    if len(pieces) > 2:  # neither a date nor a range (an ISO "2020-01-31", say)
        return str(DUMMY_BY_VR["DA"])
    for part in pieces:
        if not part:
            parts.append(part)
            continue
        match = _DA.match(part.strip())
        shifted = _shift(match[1], match[2], match[3], days) if match else None
        parts.append(shifted if shifted is not None else str(DUMMY_BY_VR["DA"]))
    return "-".join(parts)


def shift_datetime(value: str, days: int) -> str:
    """A DT value moved by whole ``days``: the time of day and the UTC offset are kept."""
    match = _DT.match(value.strip())
    if not match:
        return str(DUMMY_BY_VR["DT"])
    year, month, day, time, offset = match.groups()
    shifted = _shift(year, month, day, days)
    if shifted is None:
        return str(DUMMY_BY_VR["DT"])
    return shifted + (time or "") + (offset or "")
