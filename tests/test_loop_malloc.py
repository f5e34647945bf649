"""Importing uringloop raises glibc's heap-trim threshold (see
us_raise_malloc_thresholds in server/us_module.c): a batch of received
bytes objects freed together must not hand the heap top back to the kernel,
or the next batch faults it all in again. Run in fresh interpreters, since
this process's allocator has long since adjusted itself."""

import os
import subprocess
import sys

# Heap break before, growth during, and change after freeing a 4 MB batch
# of 10 KiB bytes objects (the size an echo of 10 KiB on 400 connections
# keeps alive for one loop iteration).
PROBE = """
import ctypes
import uringloop
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
before = libc.sbrk(0)
batch = [bytes(10240) for _ in range(400)]
grown = libc.sbrk(0)
del batch
print(grown - before, libc.sbrk(0) - grown)
"""



def heap_after_batch(**extra):
    env = {**os.environ, **extra}
    if "libasan" in env.get("LD_PRELOAD", ""):
        # The sanitizer run: the probe needs glibc's allocator, not ASan's, so
        # it runs without the preloaded runtime and thus against the installed
        # (unsanitized) package rather than the sanitized build.
        for name in ("LD_PRELOAD", "PYTHONPATH"):
            env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    return [int(x) for x in out.stdout.split()]


def test_freed_batch_stays_in_the_heap():
    grown, change = heap_after_batch()
    assert grown > 0  # the batch came from the heap top, as the probe means it to
    assert change == 0


def test_a_trim_threshold_set_by_the_user_is_kept():
    grown, change = heap_after_batch(MALLOC_TRIM_THRESHOLD_="131072")
    assert grown > 0
    assert change < 0  # glibc trimmed, as the user asked
