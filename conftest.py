"""Loaded by every pytest run from the repository's root (tests/ and e2e/).

A test command started in the background by a shell without job control
(`bash scripts/test.sh &` in a script, some CI runners) inherits SIGINT
ignored, and so would every process the tests start: the tests of what
Ctrl-C does to a loop or a server would then fail, and the suites run as
child processes would wait out their timeouts. The default handling is put
back here; a signal handled in this process is at its default in every
child after exec."""

import signal

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
