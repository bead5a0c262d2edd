"""dcmtk's network tools: ``storescu``/``echoscu`` as the scanner, ``storescp`` as a peer receiver.

Every dcmtk process gets ``TCP_NODELAY=1`` in its environment: without it dcmtk leaves Nagle's
algorithm on and is 8-30× slower on loopback, which would make any timing meaningless and the
tests needlessly slow. A missing binary is an error with the install hint, never a skip: the
suite must not pass quietly on a machine that cannot run the scanner.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "dcmtk is not installed: `bash .ci/system-packages` installs it"
TIMEOUT_S = 120.0
HOST = "127.0.0.1"


class DcmtkError(RuntimeError):
    """A dcmtk tool is missing or did not start."""


def executable(name: str) -> str:
    """Path of dcmtk's ``name`` (``storescu``, ``echoscu``, ``storescp``); raises if missing."""
    path = shutil.which(name)
    if path is None:
        raise DcmtkError(f"{name} not found. {INSTALL_HINT}")
    return path


def environment() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=environment(),
        check=False,
    )


def storescu(
    port: int,
    *inputs: Path,
    called: str,
    calling: str = "STORESCU",
    verbose: bool = False,
    timeout: float = TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Send files, or every file under folders (recursively), in one association.

    ``verbose`` makes storescu print each response's status ("Refused: OutOfResources").
    """
    command = [executable("storescu"), "-aet", calling, "-aec", called, "+sd", "+r"]
    if verbose:
        command.append("-v")
    return _run([*command, HOST, str(port), *map(str, inputs)], timeout)


def echoscu(
    port: int, *, called: str, calling: str = "ECHOSCU", timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """One C-ECHO (verification) round trip."""
    command = [executable("echoscu"), "-aet", calling, "-aec", called, HOST, str(port)]
    return _run(command, timeout)


@contextmanager
def storescp(
    port: int, output: Path, *, ae_title: str = "STORESCP", extra: Sequence[str] = ()
) -> Iterator[None]:
    """dcmtk's receiver on loopback, writing what it receives into ``output`` as it came
    (``+B``, bit-preserving), until the block ends; ``extra`` options go before the port."""
    output.mkdir(parents=True, exist_ok=True)
    command = [executable("storescp"), "-aet", ae_title, "+B", "-od", str(output), *extra]
    command.append(str(port))
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10.0
        while echoscu(port, called=ae_title).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise DcmtkError(f"storescp did not start on port {port}")
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)
