"""Transports and servers of uringloop.Loop.

The stream transport itself is C (``_core.StreamTransport``, see
server/us_stream.c) and so is the multishot accept of servers
(``_core.Acceptor``); this module connects them to the hooks through which
asyncio.BaseEventLoop builds connections and servers (``create_connection``,
``create_server``, ``connect_accepted_socket``, ``start_tls``, streams), so that
happy eyeballs, ``Server`` objects and TLS (asyncio's ``sslproto``, its
per-record methods in C: ``_ssl.py``) are reused, not rewritten.
"""

import contextvars
import errno
import os
import socket
import ssl
import stat
import subprocess
import sys

from asyncio import base_events, base_subprocess, constants, futures, tasks, trsock
from asyncio.log import logger

from . import _core, _ssl

# kinds of _core.StreamTransport (server/us_stream.c)
_READ_PIPE, _WRITE_PIPE = 1, 2

# what _reap() returns for a child whose status someone else collected
_REAPED_ELSEWHERE = object()
# absent from a Python built against headers older than Linux 5.4
_P_PIDFD = getattr(os, "P_PIDFD", None)
# create_unix_server(cleanup_socket=) is a 3.13 argument, on by default
# there; accepted on every version (as uvloop does), off by default before
# 3.13 so that a 3.11 program keeps the socket file asyncio 3.11 leaves
_CLEANUP_SOCKET_DEFAULT = sys.version_info >= (3, 13)
# ssl_shutdown_timeout is a 3.11 argument: 3.10's asyncio (its Server, its
# connection helpers, its sslproto) neither passes nor accepts it
_HAS_SSL_SHUTDOWN = sys.version_info >= (3, 11)
_SSL_SHUTDOWN_TIMEOUT = constants.SSL_SHUTDOWN_TIMEOUT if _HAS_SSL_SHUTDOWN else None
# Server._attach() and _detach() take the transport from 3.13 on
_SERVER_TRACKS_TRANSPORTS = sys.version_info >= (3, 13)


def _ssl_shutdown_kw(timeout):
    """ssl_shutdown_timeout as a keyword argument for asyncio's own code,
    where this Python's asyncio has it; on 3.10, refused as asyncio does."""
    if _HAS_SSL_SHUTDOWN:
        return {"ssl_shutdown_timeout": timeout}
    if timeout is not None:
        raise TypeError("ssl_shutdown_timeout requires Python 3.11 or later")
    return {}


def _is_socket_file(path):
    """Whether a Unix socket address names a file (not the abstract namespace)."""
    return path[0] not in (0, "\x00")


def _set_nodelay(sock):
    """TCP_NODELAY on every TCP transport. asyncio's own helper skips a
    socket whose proto is 0 (socket.socket() makes those, and so do the
    connections accepted on one), which is TCP all the same; uvloop sets it
    there too."""
    if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
            and sock.proto in (0, socket.IPPROTO_TCP)):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _socket_extra(sock, extra):
    info = dict(extra) if extra else {}
    info["socket"] = trsock.TransportSocket(sock)
    try:
        info["sockname"] = sock.getsockname()
    except OSError:
        info["sockname"] = None
    if "peername" not in info:
        try:
            info["peername"] = sock.getpeername()
        except OSError:
            info["peername"] = None
    return info


class _SubprocessTransport(base_subprocess.BaseSubprocessTransport):
    def _start(self, args, shell, stdin, stdout, stderr, bufsize, **kwargs):
        self._proc = subprocess.Popen(args, shell=shell, stdin=stdin, stdout=stdout, stderr=stderr,
                                      universal_newlines=False, bufsize=bufsize, **kwargs)


class NetworkMixin:
    """The transport half of uringloop.Loop (mixed into it)."""

    # ---- stream transports ----

    def _call_soon_all(self, calls):
        """Schedules each (callback, *args) of calls in order, or none of
        them: if one cannot be scheduled (out of memory), those already
        scheduled are cancelled and the error raised. A transport made
        halfway must not start later, since its caller then closes the
        socket and the fd can be reused (asyncio's loop would still start
        reading on it). Each call's handle takes its place in calls, which
        _cancel_all() undoes; replacing an item allocates nothing, where an
        append could fail after its call_soon() had scheduled the handle."""
        for i in range(len(calls)):
            try:
                calls[i] = self.call_soon(*calls[i])
            except BaseException:
                self._cancel_all(calls)
                raise

    @staticmethod
    def _cancel_all(calls):
        for handle in calls:
            if not isinstance(handle, tuple):  # scheduled
                handle.cancel()

    def _start_transport(self, fd, transport, protocol, start_reading, waiter):
        """Schedules connection_made(), then reading, then the waiter (the
        order asyncio has), and registers the transport as fd's: all of it
        or, out of memory, none of it."""
        calls = [(protocol.connection_made, transport), (start_reading,)]
        if waiter is not None:
            calls.append((futures._set_result_unless_cancelled, waiter, None))
        self._call_soon_all(calls)
        try:
            self._transports[fd] = transport
        except BaseException:
            self._cancel_all(calls)
            self._transports.pop(fd, None)
            raise

    def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None, server=None):
        _set_nodelay(sock)
        # A TCP transport keeps its addresses in C and makes asyncio's dict
        # only if _extra is read (us_stream.c, stream_take_addresses).
        info = None if extra is None and sock.family in _IP_FAMILIES else _socket_extra(sock, extra)
        transport = self._stream_new(sock, protocol, info, server)
        if server is not None:
            # At once, as asyncio's transport does in __init__: one collected
            # unclosed (a failure below, or a leak) leaves it (stream_finalize).
            # 3.13's Server tracks its transports (close_clients(), abort_clients())
            if _SERVER_TRACKS_TRANSPORTS:
                server._attach(transport)
            else:
                server._attach()
        self._start_transport(sock.fileno(), transport, protocol, transport._start, waiter)
        return transport

    def _make_ssl_transport(self, rawsock, protocol, sslcontext, waiter=None, *, server_side=False,
                            server_hostname=None, extra=None, server=None,
                            ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
                            ssl_shutdown_timeout=_SSL_SHUTDOWN_TIMEOUT):
        ssl_protocol = _ssl.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout, **_ssl_shutdown_kw(ssl_shutdown_timeout))
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    if _ssl.FAST_PATH:
        async def start_tls(self, transport, protocol, sslcontext, *, server_side=False, server_hostname=None,
                            ssl_handshake_timeout=None, ssl_shutdown_timeout=None):
            """Upgrade transport to TLS; the new transport is for protocol to use at once.

            asyncio's steps, with uringloop's SSL protocol (its record path in C).
            """
            if not isinstance(sslcontext, ssl.SSLContext):
                raise TypeError(f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}")
            if not getattr(transport, "_start_tls_compatible", False):
                raise TypeError(f"transport {transport!r} is not supported by start_tls()")
            waiter = self.create_future()
            ssl_protocol = _ssl.SSLProtocol(
                self, protocol, sslcontext, waiter, server_side, server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout, ssl_shutdown_timeout=ssl_shutdown_timeout,
                call_connection_made=False)
            # no data_received() on the SSL protocol before its connection_made()
            transport.pause_reading()
            transport.set_protocol(ssl_protocol)
            made = self.call_soon(ssl_protocol.connection_made, transport)
            resumed = self.call_soon(transport.resume_reading)
            try:
                await waiter
            except BaseException:
                transport.close()
                made.cancel()
                resumed.cancel()
                raise
            return ssl_protocol._app_transport

    async def _sendfile_native(self, transp, file, offset, count):
        # The transport's queued writes go first; then the kernel copies the
        # file with sendfile(2) (sock_sendfile), nothing passes through Python.
        del self._transports[transp._sock_fd]
        resume_reading = transp.is_reading()
        transp.pause_reading()
        await transp._make_empty_waiter()
        try:
            return await self.sock_sendfile(transp._sock, file, offset, count, fallback=False)
        finally:
            transp._reset_empty_waiter()
            if resume_reading:
                transp.resume_reading()
            self._transports[transp._sock_fd] = transp

    # ---- pipes: the same C transport, reading with READ and writing with WRITEV ----

    def _pipe_transport(self, pipe, protocol, waiter, extra, kind):
        fileno = pipe.fileno()
        mode = os.fstat(fileno).st_mode
        is_socket = stat.S_ISSOCK(mode)
        if not (stat.S_ISFIFO(mode) or is_socket or stat.S_ISCHR(mode)):
            # asyncio's two messages, word for word
            if kind == _READ_PIPE:
                raise ValueError("Pipe transport is for pipes/sockets only.")
            raise ValueError("Pipe transport is only for pipes, sockets and character devices")
        os.set_blocking(fileno, False)
        info = dict(extra) if extra else {}
        info["pipe"] = pipe
        transport = self._stream_new(pipe, protocol, info, None, kind)
        calls = [(protocol.connection_made, transport)]
        # A read pipe starts reading; a write pipe (socket or FIFO, not a
        # character device) starts watching for its reader to go away.
        if kind == _READ_PIPE or not stat.S_ISCHR(mode):
            calls.append((transport._start,))
        if waiter is not None:
            calls.append((futures._set_result_unless_cancelled, waiter, None))
        self._call_soon_all(calls)
        return transport

    def _make_read_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        return self._pipe_transport(pipe, protocol, waiter, extra, _READ_PIPE)

    def _make_write_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        return self._pipe_transport(pipe, protocol, waiter, extra, _WRITE_PIPE)

    # ---- subprocesses: stdio over pipe transports, exit seen through a pidfd ----

    async def _make_subprocess_transport(self, protocol, args, shell, stdin, stdout, stderr, bufsize,
                                         extra=None, **kwargs):
        waiter = self.create_future()
        watcher = self._reaping_child_watcher()
        if watcher is not None:
            with watcher:  # holds the zombie of a child that exits before it is registered
                transp = _SubprocessTransport(self, protocol, args, shell, stdin, stdout, stderr, bufsize,
                                              waiter=waiter, extra=extra, **kwargs)
                watcher.add_child_handler(transp.get_pid(), self._watcher_reported, transp)
        else:
            transp = _SubprocessTransport(self, protocol, args, shell, stdin, stdout, stderr, bufsize,
                                          waiter=waiter, extra=extra, **kwargs)
            try:
                self._watch_child(transp.get_pid(), transp)
            except BaseException:
                # Nothing would reap it: kill it and wait for it here (a
                # killed child is gone within microseconds).
                transp.close()
                try:
                    os.waitpid(transp.get_pid(), 0)
                except ChildProcessError:
                    pass
                raise
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    @staticmethod
    def _reaping_child_watcher():
        """asyncio's FastChildWatcher (3.11 child-watcher API) reaps every
        child with waitpid(-1): when one is installed, children must be
        handed to it, or it would take their exit status. Other watchers only
        reap what is registered with them and need nothing."""
        import asyncio
        from asyncio import unix_events
        fast = getattr(unix_events, "FastChildWatcher", None)
        watcher = getattr(asyncio.get_event_loop_policy(), "_watcher", None)
        if fast is not None and isinstance(watcher, fast) and watcher.is_active():
            return watcher
        return None

    def _watcher_reported(self, pid, returncode, transp):
        self.call_soon_threadsafe(transp._process_exited, returncode)

    def _watch_child(self, pid, transp):
        """Reaps `pid` when it exits, with no watcher thread and no SIGCHLD
        handler: the loop polls a pidfd (readable once the child has exited),
        then waitpid(WNOHANG) collects the status."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.call_soon(self._child_exited, pid, None, transp)
            return
        try:
            self._child_pidfds[pid] = pidfd
            self._add_reader(pidfd, self._child_exited, pid, pidfd, transp)
        except BaseException:
            # (out of memory) not watched: the caller ends the child
            self._child_pidfds.pop(pid, None)
            os.close(pidfd)
            raise

    def _child_exited(self, pid, pidfd, transp):
        if pidfd is not None:
            self._remove_reader(pidfd)
            self._child_pidfds.pop(pid, None)
        try:
            returncode = self._reap(pid, pidfd)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        if returncode is None:  # not yet (cannot happen once the pidfd is readable): look again
            self._watch_child(pid, transp)
            return
        if returncode is _REAPED_ELSEWHERE:
            # Popen.send_signal() and poll() reap with waitpid() themselves:
            # process.kill() on a child that has just exited takes its status
            # before the loop sees the pidfd; Popen keeps it.
            proc = transp._proc
            returncode = proc.returncode if proc is not None else None
            if returncode is None:
                logger.warning("Unknown child process pid %d, will report returncode 255", pid)
                returncode = 255
        elif self._debug:
            logger.debug("process %s exited with returncode %s", pid, returncode)
        transp._process_exited(returncode)

    @staticmethod
    def _reap(pid, pidfd):
        """The exit code of an exited child (None if it still runs), or
        _REAPED_ELSEWHERE. Through the pidfd where there is one, so that a
        pid reused after someone else reaped the child is never touched."""
        try:
            if pidfd is None or _P_PIDFD is None:
                wpid, status = os.waitpid(pid, os.WNOHANG)
                return os.waitstatus_to_exitcode(status) if wpid else None
            info = os.waitid(_P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return _REAPED_ELSEWHERE
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def _close_child_pidfds(self):
        for pidfd in self._child_pidfds.values():
            os.close(pidfd)
        self._child_pidfds.clear()

    def _uring_log_lost_write(self):
        logger.warning("socket.send() raised exception.")

    # ---- servers: one multishot accept per listening socket ----

    def _start_serving(self, protocol_factory, sock, sslcontext=None, server=None, backlog=100,
                       ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
                       ssl_shutdown_timeout=_SSL_SHUTDOWN_TIMEOUT):
        if sock in self._acceptors:
            return
        family, type_, proto = sock.family, sock.type, sock.proto

        def on_accept(fd):
            if fd < 0:
                # Out of descriptors or memory: say so, then retry later,
                # as asyncio does; connections wait in the backlog meanwhile.
                self.call_exception_handler({
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(-fd, os.strerror(-fd)),
                    "socket": trsock.TransportSocket(sock),
                })
                self.call_later(constants.ACCEPT_RETRY_DELAY, acceptor.resume)
                return
            try:
                # The accept made it non-blocking (SOCK_NONBLOCK); saying so
                # here spares the ioctl that conn.setblocking(False) makes.
                conn = socket.socket(family, type_ | socket.SOCK_NONBLOCK, proto, fileno=fd)
            except BaseException:
                os.close(fd)  # not taken by a socket object: nothing else will close it
                raise
            try:
                extra = None  # a TCP transport takes its peer's address itself
                if family not in _IP_FAMILIES:
                    try:
                        peer = conn.getpeername()
                    except OSError:
                        peer = None
                    extra = {"peername": peer}
                elif self._debug:
                    # as the transport has it: still there once the peer reset
                    peer = _core.peer_address(conn)
                if self._debug:
                    logger.debug("%r got a new connection from %r: %r", server, peer, conn)
                self.create_task(self._accept_connection2(
                    protocol_factory, conn, extra, sslcontext, server,
                    ssl_handshake_timeout, ssl_shutdown_timeout))
            except BaseException:
                # (out of memory) the client sees its connection end now,
                # not when the exception and its frames are let go
                conn.close()
                raise

        # Accepted connections are set up in (a copy of) the context that
        # started serving, as asyncio's reader handle for the socket has it.
        context = contextvars.copy_context()
        acceptor = self._acceptor_new(sock, lambda fd: context.run(on_accept, fd), sock in self._shared_sockets)
        try:
            self._acceptors[sock] = acceptor
        except BaseException:
            # (out of memory) the caller sees serving fail: nothing may be
            # accepted on the socket behind its back
            acceptor.cancel()
            raise

    async def _accept_connection2(self, protocol_factory, conn, extra, sslcontext=None, server=None,
                                  ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
                                  ssl_shutdown_timeout=_SSL_SHUTDOWN_TIMEOUT):
        protocol = transport = None
        try:
            protocol = protocol_factory()
            waiter = self.create_future()
            if sslcontext:
                transport = self._make_ssl_transport(
                    conn, protocol, sslcontext, waiter=waiter, server_side=True, extra=extra,
                    server=server, ssl_handshake_timeout=ssl_handshake_timeout,
                    **_ssl_shutdown_kw(ssl_shutdown_timeout))
            else:
                transport = self._make_socket_transport(conn, protocol, waiter=waiter, extra=extra,
                                                        server=server)
            try:
                await waiter
            except BaseException:
                transport.close()
                raise
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if self._debug:
                context = {"message": "Error on transport creation for incoming connection",
                           "exception": exc}
                if protocol is not None:
                    context["protocol"] = protocol
                if transport is not None:
                    context["transport"] = transport
                self.call_exception_handler(context)
            if transport is None:
                conn.close()

    def _stop_serving(self, sock):
        acceptor = self._acceptors.pop(sock, None)
        if acceptor is not None:
            acceptor.cancel()  # returns once the kernel has let go of the socket
        inode = self._unix_server_inodes.pop(sock, None)
        path = sock.getsockname() if inode is not None else None
        # No shutdown(): the socket may be shared with other processes (as
        # with uvicorn --workers), which must go on listening on it.
        sock.close()
        if path is not None:
            self._unlink_unix_socket_file(path, inode)

    @staticmethod
    def _unlink_unix_socket_file(path, inode):
        """Remove a closed server's socket file, unless something else has
        been bound or put at that path since (another inode)."""
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            logger.error("Unable to clean up listening UNIX socket %r: %r", path, err)

    # ---- Unix sockets (asyncio.unix_events semantics) ----

    async def create_unix_connection(self, protocol_factory, path=None, *, ssl=None, sock=None,
                                     server_hostname=None, ssl_handshake_timeout=None,
                                     ssl_shutdown_timeout=None):
        assert server_hostname is None or isinstance(server_hostname, str)
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            if ssl_handshake_timeout is not None:
                raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
            if ssl_shutdown_timeout is not None:
                raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, os.fspath(path))
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            sock.setblocking(False)
        return await self._create_connection_transport(
            sock, protocol_factory, ssl, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout, **_ssl_shutdown_kw(ssl_shutdown_timeout))

    async def create_server(self, protocol_factory, host=None, port=None, *, sock=None, **kwargs):
        if sock is not None:
            # A socket handed in may be shared with other processes (uvicorn
            # --workers binds once and forks): its acceptor polls instead of
            # holding the kernel's single exclusive accept wake-up.
            self._shared_sockets.add(sock)
        return await super().create_server(protocol_factory, host, port, sock=sock, **kwargs)

    def _remember_unix_socket_file(self, sock):
        path = sock.getsockname()
        if path and _is_socket_file(path):
            try:
                self._unix_server_inodes[sock] = os.stat(path).st_ino
            except FileNotFoundError:
                pass

    async def create_unix_server(self, protocol_factory, path=None, *, sock=None, backlog=100, ssl=None,
                                 ssl_handshake_timeout=None, ssl_shutdown_timeout=None,
                                 start_serving=True, cleanup_socket=_CLEANUP_SOCKET_DEFAULT):
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            if _is_socket_file(path):
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        os.remove(path)  # a stale socket file
                except FileNotFoundError:
                    pass
                except OSError as err:
                    logger.error("Unable to check or remove stale UNIX socket %r: %r", path, err)
            # made after the check, so that nothing raised by it leaves the socket open
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
                raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            self._shared_sockets.add(sock)
        sock.setblocking(False)
        if cleanup_socket:
            self._remember_unix_socket_file(sock)
        server = base_events.Server(self, [sock], protocol_factory, ssl, backlog, ssl_handshake_timeout,
                                    **_ssl_shutdown_kw(ssl_shutdown_timeout))
        if start_serving:
            server._start_serving()
            await tasks.sleep(0)
        return server
