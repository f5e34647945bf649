"""uringloop.Loop: asyncio's BaseEventLoop with an io_uring core in C.

The C base (``_core.LoopCore``) owns the ring, the ready queue and the timer
heap and implements the hot methods (call_soon, call_later, call_at, time,
the iteration, add/remove_reader/writer, the sock_* operations). What asyncio
already does right and off the hot path (tasks, futures, executors, DNS in
the executor, exception handling, async generators) is inherited from
``asyncio.BaseEventLoop`` unchanged.
"""

import asyncio
import collections
import errno
import io
import os
import signal
import socket
import sys
import threading
import weakref

from asyncio import base_events, coroutines, events, exceptions, format_helpers, trsock
from asyncio.log import logger

from . import _core
from ._dgram import DatagramTransport
from ._net import NetworkMixin

# Operation codes of LoopCore._sock_op (server/us_sockops.c).
_RECV, _RECV_INTO, _RECVFROM, _RECVFROM_INTO, _SENDALL, _SENDTO, _CONNECT, _ACCEPT = range(8)
# Which results share a stash: a cancelled op's data waits for the next call
# that reads the same kind of thing from the same socket.
_STASH_GROUP = {
    _RECV: "stream", _RECV_INTO: "stream",
    _RECVFROM: "dgram", _RECVFROM_INTO: "dgram",
    _ACCEPT: "accept",
}
_NATIVE_ADDR_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


def _unix_datagrams(sock):
    """AF_UNIX SOCK_DGRAM or SOCK_SEQPACKET: see _sock_send_by_poll."""
    return sock.family == socket.AF_UNIX and sock.type != socket.SOCK_STREAM


class _TransportRegistry(weakref.WeakValueDictionary):
    """fd -> transport, as asyncio's loop keeps it; the C core is told of
    each fd a transport takes, so that sock_* calls on it make asyncio's
    _ensure_fd_no_transport() check and others skip it."""

    def __init__(self, loop):
        super().__init__()
        self._fd_added = loop._transport_fd_added

    def __setitem__(self, fd, transport):
        super().__setitem__(fd, transport)
        self._fd_added(fd)


class _SockFuture(asyncio.Future):
    """The future of one io_uring socket operation: cancelling it cancels the op."""

    __slots__ = ("_uring_op",)

    def cancel(self, msg=None):
        op = getattr(self, "_uring_op", None)
        if op is not None and not self.done():
            self._uring_op = None
            op.cancel()
        return super().cancel(msg=msg)


def _handle_repr(handle):
    """repr() of a C Handle/TimerHandle, formatted exactly as asyncio's."""
    info = [type(handle).__name__]
    if handle._cancelled:
        info.append("cancelled")
    if handle._callback is not None:
        info.append(format_helpers._format_callback_source(handle._callback, handle._args))
    if handle._source_traceback:
        frame = handle._source_traceback[-1]
        info.append(f"created at {frame[0]}:{frame[1]}")
    if isinstance(handle, _core.TimerHandle):
        info.insert(2 if handle._cancelled else 1, f"when={handle._when}")
    return "<{}>".format(" ".join(info))


_core._set_hooks(_handle_repr, _SockFuture, base_events.ssl.SSLSocket if base_events.ssl else None,
                 trsock.TransportSocket)


def _sighandler_noop(signum, frame):
    """Dummy signal handler: the work happens through the wakeup fd."""


class Loop(_core.LoopCore, NetworkMixin, base_events.BaseEventLoop):
    """An asyncio event loop whose I/O, timers and wakeups run on io_uring."""

    def __init__(self):
        base_events.BaseEventLoop.__init__(self)
        self._signal_handlers = {}
        self._ssock = self._csock = None
        self._sock_stashes = weakref.WeakKeyDictionary()
        self._sock_stashed = False  # something may be in _sock_stashes
        self._transports = _TransportRegistry(self)
        self._acceptors = {}
        self._shared_sockets = weakref.WeakSet()  # listening sockets that came in through sock=
        self._unix_server_inodes = {}  # listening Unix socket -> inode of its file, to unlink on close
        self._child_pidfds = {}

    def __repr__(self):
        return (f"<{self.__class__.__name__} running={self.is_running()} "
                f"closed={self.is_closed()} debug={self.get_debug()}>")

    # ---- running and closing ----

    def run_forever(self):
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self._debug)
        old_agen_hooks = sys.get_asyncgen_hooks()
        try:
            self._thread_id = threading.get_ident()
            sys.set_asyncgen_hooks(firstiter=self._asyncgen_firstiter_hook,
                                   finalizer=self._asyncgen_finalizer_hook)
            events._set_running_loop(self)
            if "_run_once" in self.__dict__ or type(self)._run_once is not Loop._run_once:
                # _run_once was replaced (tests and subclasses do that): honour
                # it as asyncio would, one Python call per iteration.
                while True:
                    self._run_once()
                    if self._stopping:
                        break
            else:
                self._run_forever_inner()
        finally:
            self._stopping = False
            self._thread_id = None
            events._set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*old_agen_hooks)

    def close(self):
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        if self._signal_handlers:
            if sys.is_finalizing():
                import warnings
                warnings.warn(f"Closing the loop {self!r} on interpreter shutdown "
                              f"stage, skipping signal handlers removal",
                              ResourceWarning, source=self)
                self._signal_handlers.clear()
            else:
                for sig in list(self._signal_handlers):
                    self.remove_signal_handler(sig)
        base_events.BaseEventLoop.close(self)
        self._close_core()
        self._close_child_pidfds()
        self._close_self_pipe()
        # The servers' listening sockets are theirs to close; a closed loop
        # only stops referring to them, as asyncio's closed selector does.
        self._acceptors.clear()
        self._unix_server_inodes.clear()

    def _uring_slow_callback(self, item, dt):
        if dt >= self.slow_callback_duration:
            handle = getattr(item, "handle", item)
            logger.warning("Executing %s took %.3f seconds",
                           base_events._format_handle(handle), dt)

    # ---- readers and writers ----

    def _ensure_fd_no_transport(self, fd):
        fileno = fd
        if not isinstance(fileno, int):
            try:
                fileno = int(fileno.fileno())
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"Invalid file object: {fd!r}") from None
        transport = self._transports.get(fileno)
        if transport is not None and not transport.is_closing():
            raise RuntimeError(f"File descriptor {fd!r} is used by transport {transport!r}")

    def add_reader(self, fd, callback, *args):
        self._ensure_fd_no_transport(fd)
        self._add_reader(fd, callback, *args)

    def remove_reader(self, fd):
        self._ensure_fd_no_transport(fd)
        return self._remove_reader(fd)

    def add_writer(self, fd, callback, *args):
        self._ensure_fd_no_transport(fd)
        self._add_writer(fd, callback, *args)

    def remove_writer(self, fd):
        self._ensure_fd_no_transport(fd)
        return self._remove_writer(fd)

    # ---- signals: signal.set_wakeup_fd on a socketpair the loop watches ----

    def _make_self_pipe(self):
        if self._ssock is None:
            self._ssock, self._csock = socket.socketpair()
            self._ssock.setblocking(False)
            self._csock.setblocking(False)
            self._add_reader(self._ssock.fileno(), self._read_from_self)

    def _close_self_pipe(self):
        if self._ssock is not None:
            if not self.is_closed():
                self._remove_reader(self._ssock.fileno())
            self._ssock.close()
            self._csock.close()
            self._ssock = self._csock = None

    def _read_from_self(self):
        while True:
            try:
                data = self._ssock.recv(4096)
            except InterruptedError:
                continue
            except BlockingIOError:
                return
            if not data:
                return
            for signum in data:
                self._handle_signal(signum)

    def _handle_signal(self, sig):
        handle = self._signal_handlers.get(sig)
        if handle is None:
            return
        if handle._cancelled:
            self.remove_signal_handler(sig)
        else:
            self.call_soon(handle._run)

    def _check_signal(self, sig):
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig, callback, *args):
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        self._make_self_pipe()
        try:
            # Raises ValueError outside the main thread.
            signal.set_wakeup_fd(self._csock.fileno())
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc))
        self._signal_handlers[sig] = events.Handle(callback, args, self, None)
        try:
            signal.signal(sig, _sighandler_noop)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if not self._signal_handlers:
                try:
                    signal.set_wakeup_fd(-1)
                except (ValueError, OSError) as nexc:
                    logger.info("set_wakeup_fd(-1) failed: %s", nexc)
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught")
            raise

    def remove_signal_handler(self, sig):
        self._check_signal(sig)
        try:
            del self._signal_handlers[sig]
        except KeyError:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught")
            raise
        if not self._signal_handlers:
            try:
                signal.set_wakeup_fd(-1)
            except (ValueError, OSError) as exc:
                logger.info("set_wakeup_fd(-1) failed: %s", exc)
        return True

    # ---- sock_*: io_uring operations (see server/us_sockops.c) ----

    def _check_sock(self, sock):
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    # A cancelled op whose data had already come hands it to _sock_stash();
    # the next call of the same kind on that socket returns it first. The
    # C side makes asyncio's checks (_check_sock) in _sock_op, so the calls
    # below make them only on the way to a stash.

    def _sock_stash(self, sock, kind, value):
        """Called by the core when a cancelled op had already taken data."""
        groups = self._sock_stashes.get(sock)
        if groups is None:
            groups = self._sock_stashes[sock] = {}
        groups.setdefault(_STASH_GROUP[kind], collections.deque()).append(value)
        self._sock_stashed = True

    def _stash_pop(self, sock, kind):
        self._check_sock(sock)
        value = None
        groups = self._sock_stashes.get(sock)
        queue = groups.get(_STASH_GROUP[kind]) if groups else None
        if queue:
            value = queue.popleft()
            if not queue:
                del groups[_STASH_GROUP[kind]]
                if not groups:
                    del self._sock_stashes[sock]
        self._sock_stashed = bool(self._sock_stashes)
        return value

    def _stash_push_front(self, sock, kind, value):
        groups = self._sock_stashes.setdefault(sock, {})
        groups.setdefault(_STASH_GROUP[kind], collections.deque()).appendleft(value)
        self._sock_stashed = True

    @staticmethod
    def _copy_into(buf, data):
        view = memoryview(buf).cast("B")
        n = min(len(view), len(data))
        view[:n] = data[:n]
        return n

    async def sock_recv(self, sock, n):
        if self._sock_stashed:
            data = self._stash_pop(sock, _RECV)
            if data is not None:
                if len(data) > n:
                    self._stash_push_front(sock, _RECV, data[n:])
                    data = data[:n]
                return data
        return await self._sock_op(_RECV, sock, n)

    async def sock_recv_into(self, sock, buf):
        if self._sock_stashed:
            data = self._stash_pop(sock, _RECV_INTO)
            if data is not None:
                n = self._copy_into(buf, data)
                if n < len(data):
                    self._stash_push_front(sock, _RECV_INTO, data[n:])
                return n
        return await self._sock_op(_RECV_INTO, sock, buf)

    async def sock_recvfrom(self, sock, bufsize):
        if self._sock_stashed:
            item = self._stash_pop(sock, _RECVFROM)
            if item is not None:
                return item[0][:bufsize], item[1]
        return await self._sock_op(_RECVFROM, sock, bufsize)

    async def sock_recvfrom_into(self, sock, buf, nbytes=0):
        if self._sock_stashed:
            item = self._stash_pop(sock, _RECVFROM_INTO)
            if item is not None:
                data = item[0][:nbytes] if nbytes else item[0]
                return self._copy_into(buf, data), item[1]
        return await self._sock_op(_RECVFROM_INTO, sock, buf, nbytes)

    async def sock_sendall(self, sock, data):
        try:
            return await self._sock_op(_SENDALL, sock, data)
        except _core.AddressFallback:  # a Unix datagram socket
            pass
        await self._sock_send_by_poll(sock, "send", data)
        return None

    async def _sock_send_by_poll(self, sock, method, *args):
        """sock.<method>(*args), waiting for the socket to be writable while
        it is full; returns what the method returned (looked up on every try,
        as asyncio does: CPython's test_sendto_blocking swaps it meanwhile). For addresses io_uring cannot take,
        and for Unix datagram sockets, whose full peer makes an io_uring send
        fail after it has copied the data out of the request; the kernel's
        retry then sends an empty datagram (seen on 6.18)."""
        while True:
            try:
                return getattr(sock, method)(*args)
            except (BlockingIOError, InterruptedError):
                await self._sock_wait_writable(sock)

    async def _sock_resolve(self, sock, address):
        if sock.family == socket.AF_INET or (base_events._HAS_IPv6 and sock.family == socket.AF_INET6):
            resolved = await self._ensure_resolved(address, family=sock.family, type=sock.type,
                                                   proto=sock.proto, loop=self)
            return resolved[0][4]
        return address

    async def sock_sendto(self, sock, data, address):
        # asyncio passes the address to socket.sendto(), which checks it and
        # resolves a name there and then (blocking). The C op checks it with
        # the socket module's messages; only a name goes to the resolver.
        self._check_sock(sock)
        if sock.family in _NATIVE_ADDR_FAMILIES and not _unix_datagrams(sock):
            try:
                return await self._sock_op(_SENDTO, sock, data, address)
            except _core.AddressFallback:
                address = await self._sock_resolve(sock, address)
                try:
                    return await self._sock_op(_SENDTO, sock, data, address)
                except _core.AddressFallback:
                    pass
        return await self._sock_send_by_poll(sock, "sendto", data, address)

    async def sock_connect(self, sock, address):
        self._check_sock(sock)
        address = await self._sock_resolve(sock, address)
        if sock.family in _NATIVE_ADDR_FAMILIES:
            try:
                # connect() runs here: what it raises is raised as it is
                fut = self._sock_op(_CONNECT, sock, address)
            except _core.AddressFallback:
                pass
            else:
                try:
                    return await fut
                except OSError as exc:  # a connect that failed once under way
                    raise OSError(exc.errno, f"Connect call failed {address}") from None
        return await self._sock_connect_by_poll(sock, address)

    async def _sock_connect_by_poll(self, sock, address):
        """Families io_uring's CONNECT is not given an address for here."""
        try:
            sock.connect(address)
            return None
        except (BlockingIOError, InterruptedError):
            pass
        await self._sock_wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            raise OSError(err, f"Connect call failed {address}")
        return None

    async def _sock_wait_writable(self, sock):
        fut = self.create_future()
        fd = sock.fileno()
        self._add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._remove_writer(fd)

    async def sock_accept(self, sock):
        item = self._stash_pop(sock, _ACCEPT) if self._sock_stashed else None
        if item is None:
            item = await self._sock_op(_ACCEPT, sock)
        fd, address = item
        try:
            # non-blocking from the accept (SOCK_NONBLOCK): saying so here
            # spares the ioctl that conn.setblocking(False) would make
            conn = socket.socket(sock.family, sock.type | socket.SOCK_NONBLOCK, sock.proto, fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        return conn, address

    async def _sock_sendfile_native(self, sock, file, offset, count):
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation) as err:
            raise exceptions.SendfileNotAvailableError("not a regular file") from err
        try:
            fsize = os.fstat(fileno).st_size
        except OSError:
            raise exceptions.SendfileNotAvailableError("not a regular file")
        blocksize = count if count else fsize
        if not blocksize:
            return 0  # empty file
        blocksize = min(blocksize, 0x7FFF_F000)
        end_pos = min(offset + count, fsize) if count else fsize
        total_sent = 0
        try:
            while offset < end_pos:
                try:
                    sent = os.sendfile(sock.fileno(), fileno, offset, min(end_pos - offset, blocksize))
                except (BlockingIOError, InterruptedError):
                    await self._sock_wait_writable(sock)
                    continue
                except OSError as exc:
                    if total_sent == 0 and exc.errno == errno.ENOTSOCK:
                        raise exceptions.SendfileNotAvailableError("os.sendfile call failed") from exc
                    raise
                if sent == 0:
                    break  # the file ended early
                offset += sent
                total_sent += sent
        finally:
            if total_sent > 0:
                file.seek(offset)
        return total_sent

    # ---- datagrams ----

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):
        transport = DatagramTransport(self, sock, protocol, address, extra)
        self._start_transport(sock.fileno(), transport, protocol, transport._start_reading, waiter)
        return transport




