"""``--workers N`` and ``--reload``: a parent that binds once and forks
the workers.

Each worker is a `Server` with its own uringloop loop and io_uring ring,
created after the fork, and imports the app itself: the parent never does
(it only checks, in a child, that the app loads), so a worker started later
runs the code as it is on disk then. The parent replaces a worker that
dies, stops all of them gracefully on SIGTERM/SIGINT, replaces them one by
one on SIGHUP (a new worker is serving before an old one is told to stop,
so no connection is refused), and adds or removes one on SIGTTIN/SIGTTOU.
With ``--reload`` it also watches the source files and does what SIGHUP
does when one changes; new code that fails to start leaves the old worker
serving. With ``--reuse-port`` every worker binds its own SO_REUSEPORT
socket instead of sharing one.
"""

import fnmatch
import logging
import os
import select
import signal
import threading
import time

from .config import AppLoadError
from .server import Server

logger = logging.getLogger("uringserve.error")

# workers[pid] for a worker whose ready pipe closed without the byte that
# says it serves: it failed at startup and waits to be reaped
STARTUP_FAILED = -1

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


class Supervisor:
    def __init__(self, config):
        self.config = config
        self.target = config.workers
        self.workers = {}  # pid -> ready-pipe read fd (None once ready, STARTUP_FAILED)
        self.heartbeats = {}  # pid -> [heartbeat-pipe read fd, when its last beat came]
        self.retiring = set()  # pids told to stop
        self.signals = []
        self.sockets = None
        self.failures = []
        self.watcher = FileWatcher(config) if config.reload else None

    # -- the parent --

    def run(self):
        config = self.config
        if not self._app_loads() and self.watcher is None:
            return 1  # fail fast on an app that cannot load (the child logged why)
        if not config.reuse_port:
            try:
                self.sockets = config.bind_sockets()
            except OSError as exc:
                logger.error("[Errno %s] error while attempting to bind on address %r: %s", exc.errno,
                             config.uds or (config.host, config.port), (exc.strerror or str(exc)).lower())
                return 1
        if self.watcher is not None:
            logger.info("Will watch for changes in these directories: %s", sorted(self.watcher.dirs))
            logger.info("Started reloader process [%d] using StatReload", os.getpid())
        else:
            logger.info("Started parent process [%d]", os.getpid())
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        for sig in HANDLED:
            signal.signal(sig, self._on_signal)
        try:
            for _ in range(self.target):
                self.spawn()
            return self.loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig in HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)
            for sock in self.sockets or ():
                sock.close()

    def _on_signal(self, sig, frame):
        self.signals.append(sig)

    def _app_loads(self):
        """Whether the app imports, tried in a child so that the parent's
        interpreter never holds the app's modules."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.config.load()
                code = 0
            except AppLoadError as exc:
                logger.error("Error loading ASGI app. %s", exc)
            except KeyboardInterrupt:
                pass  # Ctrl-C reached the whole process group: not the app's fault
            except BaseException:
                logger.exception("Error loading ASGI app.")
            finally:
                os._exit(code)
        pidfd = os.pidfd_open(pid)  # to signal this child and no other, even once reaped
        try:
            _, status = os.waitpid(pid, 0)
        except KeyboardInterrupt:
            try:  # a SIGINT sent to the parent alone: the check ends with it
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass  # already reaped: the interrupt came as waitpid() returned
            raise
        finally:
            os.close(pidfd)
        return os.waitstatus_to_exitcode(status) == 0

    def loop(self, wake_r):
        while True:
            timeout = self.config.reload_delay if self.watcher is not None else 1.0
            beats = [hb[0] for hb in self.heartbeats.values()]
            readable, _, _ = select.select([wake_r] + self._pending_ready() + beats, [], [], timeout)
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            self._collect_ready()
            self._collect_heartbeats(readable)
            self.reap()
            self._kill_unresponsive()
            while self.signals:
                sig = self.signals.pop(0)
                if sig in (signal.SIGINT, signal.SIGTERM):
                    return self.stop(sig)
                if sig == signal.SIGHUP:
                    self.reload()
                elif sig == signal.SIGTTIN:
                    self.target += 1
                    logger.info("SIGTTIN: adding a worker (%d)", self.target)
                    self.spawn()
                elif sig == signal.SIGTTOU and self.target > 1:
                    self.target -= 1
                    # the newest, as uvicorn does (self.workers is in spawn order;
                    # the largest pid need not be the newest once pids wrap)
                    serving = [p for p in self.workers if p not in self.retiring]
                    if serving:
                        logger.info("SIGTTOU: removing worker [%d] (%d left)", serving[-1], self.target)
                        self.retire(serving[-1])
            if self.watcher is not None:
                self._reload_on_change()
            elif len(self.failures) >= 5 and self.failures[-1] - self.failures[-5] < 10:
                logger.error("Workers keep failing at startup; stopping.")
                self.stop(signal.SIGTERM)
                return 1

    def _reload_on_change(self):
        changed = self.watcher.changed()
        if not changed:
            return
        logger.warning("StatReload detected changes in %s. Reloading...",
                       ", ".join(repr(os.path.relpath(p)) for p in changed[:5]))
        if not self.workers:  # the code could not start before: try again
            for _ in range(self.target):
                self.spawn()
        else:
            self.reload("Changes")

    def spawn(self):
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        beat_r, beat_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The child starts with the parent's Python signal handlers: a
        # SIGTERM that reached it before it reset them would run the
        # parent's handler in the child and be lost (a worker retired at
        # birth would serve on). So the signals stay blocked across the
        # fork, and the child unblocks them after the reset: one sent
        # before then ends it by the default action, before it serves.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:
            os.close(ready_r)
            os.close(beat_r)
            code = 1
            try:
                code = self.child(ready_w, beat_w, mask)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(ready_w)
        os.close(beat_w)
        self.workers[pid] = ready_r
        self.heartbeats[pid] = [beat_r, time.monotonic()]
        return pid

    # -- health checks (uvicorn's --timeout-worker-healthcheck): each worker
    # has a thread that writes a byte a second; one silent for longer than
    # the timeout (stopped, or stuck holding the GIL) is killed and replaced

    def _collect_heartbeats(self, readable):
        now = time.monotonic()
        for pid, hb in self.heartbeats.items():
            if hb[0] in readable:
                try:
                    while os.read(hb[0], 512):
                        pass
                except BlockingIOError:
                    pass
                hb[1] = now

    def _kill_unresponsive(self):
        timeout = self.config.timeout_worker_healthcheck
        now = time.monotonic()
        for pid, (_, last) in list(self.heartbeats.items()):
            if pid not in self.retiring and now - last > timeout:
                logger.warning("Worker [%d] did not answer the health check for %.0f s; killing it", pid, now - last)
                self.heartbeats[pid][1] = now  # once: reap() replaces it when it is gone
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _forget_heartbeat(self, pid):
        hb = self.heartbeats.pop(pid, None)
        if hb is not None:
            os.close(hb[0])

    def _pending_ready(self):
        return [fd for fd in self.workers.values() if fd is not None and fd >= 0]

    def _collect_ready(self, timeout=0):
        fds = self._pending_ready()
        if not fds:
            return
        readable, _, _ = select.select(fds, [], [], timeout)
        for pid, fd in list(self.workers.items()):
            if fd in readable:
                serving = os.read(fd, 1) == b"1"  # else EOF: it exited first
                os.close(fd)
                self.workers[pid] = None if serving else STARTUP_FAILED
                if serving:
                    logger.info("Worker [%d] is serving", pid)

    def wait_ready(self, pid, timeout=30):
        deadline = time.monotonic() + timeout
        while self.workers.get(pid, STARTUP_FAILED) not in (None, STARTUP_FAILED) and time.monotonic() < deadline:
            self._collect_ready(0.1)
            self.reap()
        return pid in self.workers and self.workers[pid] is None

    def retire(self, pid):
        self.retiring.add(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._forget_heartbeat(pid)
            fd = self.workers.pop(pid, None)
            if fd is not None and fd >= 0:
                os.close(fd)
            if fd is not None and pid not in self.retiring:
                self.failures = self.failures[-4:] + [time.monotonic()]  # the last five startup failures
            code = os.waitstatus_to_exitcode(status)
            if pid in self.retiring:
                self.retiring.discard(pid)
                logger.info("Worker [%d] stopped (exit code %d)", pid, code)
                continue
            reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            if fd is not None and self.watcher is not None:
                # under --reload, code that cannot start waits for the next change
                logger.warning("Worker [%d] failed to start (%s); waiting for changes", pid, reason)
                continue
            logger.warning("Worker [%d] died (%s); starting a new one", pid, reason)
            if len([p for p in self.workers if p not in self.retiring]) < self.target:
                self.spawn()

    def reload(self, why="SIGHUP"):
        logger.info("%s: replacing %d worker(s) one by one", why, len(self.workers))
        for old in [p for p in self.workers if p not in self.retiring]:
            new = self.spawn()
            if not self.wait_ready(new):
                logger.error("The new worker [%d] did not start; keeping [%d]", new, old)
                if self.workers.get(new, STARTUP_FAILED) != STARTUP_FAILED:
                    self.retire(new)  # still starting: it must not join later, one worker too many
                continue
            self.retire(old)

    def stop(self, sig):
        logger.info("Stopping parent process [%d]", os.getpid())
        for pid in list(self.workers):
            self.retire(pid)
        grace = self.config.timeout_graceful_shutdown
        deadline = time.monotonic() + (float(grace) + 5 if grace is not None else 60)
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in list(self.workers):
            logger.warning("Worker [%d] did not stop in time; killing it", pid)
            os.kill(pid, signal.SIGKILL)
        while self.workers:
            pid, _ = os.waitpid(-1, 0)
            self._forget_heartbeat(pid)
            fd = self.workers.pop(pid, None)
            if fd is not None and fd >= 0:
                os.close(fd)
        return 0

    # -- a worker --

    def child(self, ready_w, beat_w, mask):
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in [hb[0] for hb in self.heartbeats.values()] + [fd for fd in self.workers.values() if fd and fd > 0]:
            os.close(fd)  # the other workers' pipes, inherited from the parent
        self.heartbeats.clear()
        self.workers.clear()
        interval = min(1.0, self.config.timeout_worker_healthcheck / 4)

        def beat():
            while True:
                try:
                    os.write(beat_w, b".")
                except BlockingIOError:
                    pass  # the parent has not read the last ones: it knows we live
                except OSError:
                    return  # the parent is gone
                time.sleep(interval)

        threading.Thread(target=beat, name="uringserve-heartbeat", daemon=True).start()
        server = Server(self.config)

        def started():
            os.write(ready_w, b"1")
            os.close(ready_w)

        server.on_started = started
        return server.run(sockets=self.sockets)


class FileWatcher:
    """uvicorn's StatReload: polls the modification times of the files under
    --reload-dir (default: the current directory) that match
    --reload-include (default *.py) and none of --reload-exclude."""

    def __init__(self, config):
        self.dirs = {os.path.abspath(d) for d in (config.reload_dirs or [os.getcwd()])}
        self.include = list(config.reload_includes or ["*.py"])
        self.exclude = list(config.reload_excludes or []) + [".*", "*.pyc", "__pycache__", "*~"]
        self.mtimes = self._scan()

    def _watched(self, name):
        return (any(fnmatch.fnmatch(name, p) for p in self.include)
                and not any(fnmatch.fnmatch(name, p) for p in self.exclude))

    def _scan(self):
        mtimes = {}
        for top in self.dirs:
            for root, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in self.exclude)]
                for name in files:
                    if self._watched(name):
                        path = os.path.join(root, name)
                        try:
                            mtimes[path] = os.stat(path).st_mtime_ns
                        except OSError:
                            pass
        return mtimes

    def changed(self):
        """The files added, changed or removed since the last call."""
        now = self._scan()
        old, self.mtimes = self.mtimes, now
        return sorted(p for p in old.keys() | now.keys() if old.get(p) != now.get(p))
