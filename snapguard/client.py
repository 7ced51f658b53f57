"""The trainer's side of the trainer-daemon wire: one DEALER socket, request ids, timeouts."""

from __future__ import annotations

import itertools
import os
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from snapguard import protocol as P
from snapguard.errors import DaemonError, DaemonUnavailable, ProtocolError

_LAST_REPLY_MS = 100  # how long a request whose daemon closed the connection still looks for the reply it sent first
_ABORT_POLL_MS = 100  # how soon a request that waits for its reply notices `abort()`


class DaemonClient:
    """Send typed requests to one daemon and wait, never forever, for the typed reply.

    Thread-safe: the training thread and the background copy thread share one client.
    """

    def __init__(self, address: str, timeout_s: float = 60.0, who: str = ""):
        self.address = address
        self.timeout_s = timeout_s
        self.who = who or f"pid {os.getpid()}"
        self._ctx = zmq.Context.instance()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sock = self._monitor = self._poller = None
        self._aborted = False

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            # No ZMQ_IMMEDIATE: with it, a reply that arrives just before the daemon disconnects (the
            # reply to Shutdown) is dropped with the connection. A request to no daemon times out below.
            # The monitor tells a request that the daemon's end of the connection closed: a daemon that
            # dies while a request waits will never answer it, and a restarted one never saw it. It also
            # tells whether a daemon is connected at all when a request is sent (`_up`).
            self._monitor = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self._up = False
            s.connect(self.address)
            self._poller = zmq.Poller()
            self._poller.register(s, zmq.POLLIN)
            self._poller.register(self._monitor, zmq.POLLIN)
            self._sock = s
        return self._sock

    def request(self, msg: P.Message, timeout_s: float | None = None) -> P.Message:
        """Send `msg`; return the reply, raising DaemonError for an Error reply or a timeout.

        A longer `timeout_s` than the client's own is for a daemon that is connected and working on it: while
        no daemon is connected (its connection closed before this request, and none took its place), the
        request waits for one at most the client's own timeout."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._aborted:
                raise DaemonUnavailable(f"{self.who}: {msg.TYPE} not sent: the connection to the daemon at"
                                        f" {self.address} was given up (abort)")
            sock = self._socket()
            rid = next(self._ids)
            start = time.monotonic()
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
            self._events()  # a connection closed before this request says nothing about it, but whether one is up
            limit = timeout if self._up else min(timeout, self.timeout_s)
            try:
                sock.send_multipart([rid.to_bytes(8, "little"), P.encode(msg)])
            except zmq.Again:
                self._reset()
                raise DaemonUnavailable(f"{self.who}: no daemon accepted a connection on {self.address}"
                                        f" within {timeout:.1f} s (sending {msg.TYPE})") from None
            while True:
                left = start + limit - time.monotonic()
                ready = dict(self._poller.poll(min(int(left * 1000) + 1, _ABORT_POLL_MS))) if left > 0 else {}
                if self._aborted:
                    self._reset()
                    raise DaemonUnavailable(f"{self.who}: {msg.TYPE} was given up while it waited for its reply"
                                            f" from the daemon at {self.address} (abort)")
                if sock in ready:  # a reply is taken first: a daemon may answer (Shutdown) and then close
                    reply = self._take_reply(sock, rid, msg)
                    if reply is not None:
                        return reply
                    continue
                if self._monitor in ready:
                    if self._events():
                        # The monitor may tell of the close before the reply sent just ahead of it (Shutdown's)
                        # can be read: take what has come by then.
                        while sock.poll(_LAST_REPLY_MS):
                            reply = self._take_reply(sock, rid, msg)
                            if reply is not None:
                                return reply
                        self._reset()  # drop the socket so a late reply cannot be taken for the next request's
                        raise DaemonUnavailable(f"{self.who}: the daemon at {self.address} closed the connection"
                                                f" while {msg.TYPE} waited for its reply (it died or was restarted)")
                    if self._up:
                        limit = timeout  # a daemon connected: it has the whole timeout to answer
                    continue
                if left > 0:
                    continue
                up = self._up
                self._reset()
                raise DaemonUnavailable(f"{self.who}: daemon at {self.address} did not answer {msg.TYPE} within"
                                        f" {limit:.1f} s" + ("" if up else " (no daemon was connected)"))

    def _take_reply(self, sock: zmq.Socket, rid: int, msg: P.Message) -> P.Message | None:
        """The reply waiting on `sock`, if it answers request `rid` (None: a stale reply to an earlier request that
        timed out); an Error reply is raised as DaemonError."""
        frames = sock.recv_multipart()
        if len(frames) != 2 or int.from_bytes(frames[0], "little") != rid:
            return None
        reply = P.decode(frames[1])
        if isinstance(reply, P.Error):
            raise DaemonError(f"{self.who}: daemon refused {msg.TYPE}: [{reply.code}] {reply.message}", reply.code)
        return reply

    def _events(self) -> bool:
        """Take the monitor's events, keeping `_up`; whether a connection closed among them."""
        closed = False
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self._up = True
            elif event == zmq.EVENT_DISCONNECTED:
                self._up, closed = False, True
        return closed

    def wait_ready(self, timeout_s: float) -> None:
        """Poll with Ping until the daemon answers; raise DaemonUnavailable naming the socket otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.request(P.Ping(), timeout_s=min(1.0, max(0.05, deadline - time.monotonic())))
                return
            except (DaemonUnavailable, ProtocolError):
                if time.monotonic() >= deadline:
                    raise DaemonUnavailable(f"{self.who}: no daemon answered on {self.address} within"
                                            f" {timeout_s:.1f} s") from None
                time.sleep(0.05)

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)
            self._sock = self._monitor = self._poller = None

    def close(self) -> None:
        with self._lock:
            self._reset()

    def abort(self) -> None:
        """Close for good, from any thread: a request that waits for its reply gives up within 0.1 s, and no
        request is sent any more. For a thread whose work must not reach the daemon after its owner stopped."""
        self._aborted = True
        self.close()
