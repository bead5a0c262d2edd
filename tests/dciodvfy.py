"""Run David Clunie's ``dciodvfy`` (Debian ``dicom3tools``) and compare what it finds.

``dciodvfy`` checks a file against the IOD of its SOP class and the VR rules of PS3.5. It
writes everything to stderr, one finding a line, in two shapes::

    Error - Missing attribute Type 2 Required Element=<StudyID> Module=<GeneralStudy>
    (0x3109,0x000d) LO PrivateCreator  - Error - Bad private owner value - element must be ...

plus the IOD's name on a line of its own, and occasionally a multi-line value (XML in a UT)
that continues a finding. Its exit status says little (1 for most errors, yet 0 with parse-time
errors), so the findings are read from the text.

:func:`normalise` removes what is specific to one instance (values, UIDs, quoted text, lengths)
and keeps what a finding is *about* (the tag, the attribute or module name, the kind of problem),
so ``errors(after) - errors(before)`` is the set of problems de-identification introduced.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "dciodvfy is not installed: `bash .ci/system-packages` installs it (dicom3tools)"
TIMEOUT_SECONDS = 30.0

# "<prefix>Error - <message>" or "<prefix>Warning - <message>": the prefix, when present, is the
# tag and name of the element read when the problem was found.
_FINDING = re.compile(r"^(?P<prefix>.*?)\b(?P<kind>Error|Warning) - (?P<message>.*)$")
_TAG = re.compile(r"\(0x[0-9a-fA-F]{4},0x[0-9a-fA-F]{4}\)")
# A bracketed value, as opposed to a bracketed attribute or module name ("Element=<StudyID>",
# "Module=<Patient>", "attribute <Rescale Slope>", "Explicit <LO> Dictionary <PN>" are kept):
# values follow "value ", "term ", "= " (as in "PN [1] = <...>") or a UID's keyword.
_BRACKETED_VALUE = re.compile(r"(?P<lead>\bvalue |\bterm |= |UID )<[^>]*>?")
_UID = re.compile(r"\b\d+(?:\.\d+){2,}\b")  # three or more components: not "0.5"
_UID_AFTER_KEYWORD = re.compile(r"UID [0-9.]+\b")  # "ReferencedSOPInstanceUID 0"
_QUOTED = re.compile(r"\"[^\"]*\"|= '[^']*'")  # "9.8.7.6"; "for this VR = '.'"
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")
_DECIMAL_LENGTH = re.compile(r"\b\d+ dec\b")
_CHARACTER_CODE = re.compile(r"\((?:0x#|\d+)\)")  # "(0x2e)" after a quoted character
_SPACES = re.compile(r"\s+")


class DciodvfyError(RuntimeError):
    """``dciodvfy`` could not check the file at all (crash, time-out, unreadable file)."""


@dataclass(frozen=True)
class Findings:
    """What ``dciodvfy`` said about one file, normalised; ``raw`` keeps its words verbatim."""

    iod: str  # the IOD it checked against ("CTImage"), "" if it recognised none
    errors: frozenset[str]
    warnings: frozenset[str]
    raw: str

    def new_errors(self, before: Findings) -> frozenset[str]:
        """Errors here that ``before`` (the original file) did not have."""
        return self.errors - before.errors


def executable() -> str:
    """Path of ``dciodvfy``; raises with the install hint when it is missing."""
    path = shutil.which("dciodvfy")
    if path is None:
        raise DciodvfyError(INSTALL_HINT)
    return path


def _masked_tags(text: str) -> tuple[str, list[str]]:
    """``text`` with its tags replaced by placeholders (so the number rules leave them alone)."""
    tags: list[str] = []

    def keep(match: re.Match[str]) -> str:
        tags.append(match.group(0).lower())
        return f"\x00{len(tags) - 1}\x00"

    return _TAG.sub(keep, text), tags


def normalise(prefix: str, message: str) -> str:
    """One finding without its instance-specific parts: ``(tag) message`` or ``message``."""
    masked, tags = _masked_tags(message)
    masked = _BRACKETED_VALUE.sub(lambda m: m.group("lead") + "<…>", masked)
    masked = _UID.sub("<uid>", masked)
    masked = _UID_AFTER_KEYWORD.sub("UID <uid>", masked)
    masked = _QUOTED.sub(lambda m: "= '…'" if m.group(0).startswith("=") else '"…"', masked)
    masked = _HEX.sub("0x#", masked)
    masked = _DECIMAL_LENGTH.sub("# dec", masked)
    masked = _CHARACTER_CODE.sub("(…)", masked)
    text = re.sub(r"\x00(\d+)\x00", lambda m: tags[int(m.group(1))], masked)
    text = _SPACES.sub(" ", text).strip()
    tag = _TAG.search(prefix)
    return f"{tag.group(0).lower()} {text}" if tag else text


def parse(output: str) -> Findings:
    """Read ``dciodvfy``'s text into normalised error and warning sets."""
    errors: set[str] = set()
    warnings: set[str] = set()
    iod = ""
    for line in output.splitlines():
        match = _FINDING.match(line)
        if match is None:
            # The IOD's name stands alone ("CTImage"); other lines continue a multi-line value.
            if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", line.strip()) and not iod:
                iod = line.strip()
            continue
        finding = normalise(match.group("prefix"), match.group("message"))
        (errors if match.group("kind") == "Error" else warnings).add(finding)
    return Findings(iod, frozenset(errors), frozenset(warnings), output)


def check(path: Path, *, timeout: float = TIMEOUT_SECONDS) -> Findings:
    """Run ``dciodvfy`` on ``path``; raises :class:`DciodvfyError` if it cannot check it."""
    command = [executable(), str(path)]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DciodvfyError(f"dciodvfy timed out after {timeout} s on {path}") from exc
    output = result.stderr + result.stdout
    # 0: no error found, 1: errors found; anything else (a signal, "Abort - ...") is a failure.
    if result.returncode not in (0, 1) or output.startswith("Abort - "):
        raise DciodvfyError(
            f"dciodvfy failed on {path} (exit status {result.returncode}):\n{output[-2000:]}"
        )
    return parse(output)
