"""Allocation failures on the loop's and the server's I/O paths lose nothing
without a word and crash nothing.

tests/nomemory_child.py runs each scenario once per allocation index: the
i-th allocation after the clients have sent fails (CPython's
_testcapi.set_nomemory), then every client must get its echo or answer, or
see its connection end, and a new client must be served. The ranges cover
every allocation the 20 ms run makes (fewer for TLS, whose handshakes make
thousands: every other one up to 400). In the ASan+UBSan pass the child
runs against the sanitized build, like every other test.

What these found (2026-12-06): a write whose flush could not be scheduled
(the flush list failed to grow) left its data queued and its transport's
flush flag set, so the stream or HTTP connection never sent again; an
accepted connection whose socket object could not be made leaked its
descriptor with the client waiting; a stream transport half made stayed
registered for its descriptor, and could start reading a reused one.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("_testcapi")  # CPython builds ship it (Debian: libpython3.x-stdlib)

CHILD = Path(__file__).with_name("nomemory_child.py")

CASES = {  # scenario: range of allocation indexes
    "tcp": (0, 240),
    "unix": (0, 240),
    "buffered": (0, 320),
    "udp": (0, 40),
    "http": (0, 200),
    "subprocess": (0, 60),
    "sock": (0, 60),
    "tls": (0, 400, 2),
}

SANITIZER_WORDS = ("AddressSanitizer", "runtime error:", "Fatal Python error", "Segmentation fault")


@pytest.mark.parametrize("kind", list(CASES))
def test_an_allocation_failure_loses_nothing_unsaid(kind):
    args = [sys.executable, str(CHILD), kind, *map(str, CASES[kind])]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    tail = "\n".join(r.stdout.splitlines()[-30:])
    assert r.returncode == 0, f"exit {r.returncode}\n{tail}\n{r.stderr[-3000:]}"
    assert not any(word in r.stderr for word in SANITIZER_WORDS), r.stderr[-5000:]
    assert f"{kind}: 0 failed" in r.stdout, tail
