"""A loopback proxy on every daemon-to-daemon link, to drop, delay or duplicate their traffic.

Each directed link src->dst gets a ROUTER on a port of its own; src's daemon is told that dst lives
there (`--peer dst=tcp://127.0.0.1:PORT`), and a DEALER forwards to dst's real address. Whole ZeroMQ
multipart messages are forwarded, both ways (requests and replies), so the proxy never splits or
alters a message: what it does is what a lossy, slow or duplicating network does to whole messages.
A delayed link keeps its order (a FIFO per direction), as TCP does. Like a daemon, the proxy accepts
only connections that present the job's credentials, and presents them to the daemon it forwards to.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import random
import threading
import time
from dataclasses import dataclass

import zmq

from snapguard import protocol as P
from snapguard.daemon.peers import ConnectionGate, present_credentials, require_credentials
from snapguard.errors import SnapGuardError

# How long a window that has touched no message by its end stays open for one (`set_policy`)
WINDOW_GRACE_S = 60.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    action: str = "pass"  # pass | drop | delay | duplicate
    probability: float = 0.0
    delay_s: float = 0.0
    until: float = 0.0  # time.monotonic() at which the link goes back to passing everything, if the window touched
    window: int = 0  # which set_policy() call this came from: its own counters
    longest: float = 0.0  # ... and at which it does anyway, having touched no message (no traffic)


class _Link:
    def __init__(self, ctx: zmq.Context, src: str, dst: str, target: str, job: str, secret: bytes):
        self.src, self.dst, self.name = src, dst, f"{src}->{dst}"
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        require_credentials(self.front)
        self.port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.back = ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        present_credentials(self.back, job, secret)
        self.back.connect(target)
        # src's DEALERs (a control link and a chunk link, new ones after src restarts): a reply goes to the one
        # that sent the request with its request id
        self.client: bytes | None = None
        self.asked: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()  # request id -> identity
        self.policy = Policy()
        self.queues = {"req": collections.deque(), "rep": collections.deque()}  # (due, frames, window) when delayed

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


class PeerProxy:
    """All links of a cluster, served by one background thread. Start with `start()`, stop with `close()`."""

    def __init__(self, names: list[str], address_of, job: str, secret: bytes, seed: int = 0):
        self._ctx = zmq.Context()
        self._gate = ConnectionGate(self._ctx, job, secret, f"[{job} chaos proxy]")
        self._rnd = random.Random(seed)
        self.links = {(s, d): _Link(self._ctx, s, d, address_of(d), job, secret) for s in names for d in names if s != d}
        self._counts = collections.Counter()
        self._windows: dict[int, collections.Counter] = {}
        # window -> (receiver, sender, sender's boot, seq) of each request sent twice: what its replay refusal names
        self._twice: dict[int, set[tuple[str, str, int, int]]] = collections.defaultdict(set)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="chaos-peer-proxy", daemon=True)
        self._error: BaseException | None = None

    def routes(self) -> dict[tuple[str, str], str]:
        return {k: link.address for k, link in self.links.items()}

    def links_matching(self, pattern: str | None) -> list[tuple[str, str]]:
        """Links named like "node0->node1"; shell patterns ("node0->*") and None (all) work."""
        return [k for k, link in self.links.items() if pattern is None or fnmatch.fnmatch(link.name, pattern)]

    def set_policy(self, links: list[tuple[str, str]], action: str, probability: float, delay_s: float,
                   duration_s: float) -> int:
        """Apply a policy to `links` for a while; returns its window id, for `stats(window)`. A window that has not
        dropped, delayed or duplicated any message by its end (a quiet moment, a low probability) stays open until it
        does, for at most WINDOW_GRACE_S more: else it would have tested nothing."""
        if action not in ("drop", "delay", "duplicate"):
            raise SnapGuardError(f"unknown proxy action {action!r}")
        with self._lock:
            window = len(self._windows) + 1
            self._windows[window] = collections.Counter()
        now = time.monotonic()
        p = Policy(action, probability, delay_s, now + duration_s, window, now + duration_s + WINDOW_GRACE_S)
        for k in links:
            self.links[k].policy = p
        return window

    def stats(self, window: int | None = None) -> dict[str, int]:
        """Message counts: of the whole run, or of one set_policy() window."""
        with self._lock:
            c = self._counts if window is None else self._windows.get(window, collections.Counter())
            return {k: c[k] for k in ("forwarded", "dropped", "delayed", "duplicated", "duplicated_requests")}

    def sent_twice(self, window: int) -> set[tuple[str, str, int, int]]:
        """The requests one set_policy() window duplicated, as (receiving node, sending node, its boot, seq)."""
        with self._lock:
            return set(self._twice.get(window, ()))

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._thread.is_alive():
            raise SnapGuardError("the peer proxy thread did not stop within 10 s")
        if not self._gate.close():
            raise SnapGuardError("the peer proxy's connection gate did not stop within 5 s")
        self._ctx.term()
        if self._error is not None:
            raise SnapGuardError(f"the peer proxy failed: {self._error!r}") from self._error

    # ---- the proxy thread ----------------------------------------------------------------------

    def _touched(self, window: int) -> bool:
        with self._lock:
            c = self._windows.get(window, collections.Counter())
            return c["dropped"] + c["delayed"] + c["duplicated"] > 0

    def _count(self, key: str, window: int = 0) -> None:
        with self._lock:
            self._counts[key] += 1
            if window:
                self._windows[window][key] += 1

    def _send(self, link: _Link, direction: str, frames: list[bytes], window: int = 0) -> None:
        try:
            if direction == "req":
                link.back.send_multipart(frames, flags=zmq.NOBLOCK)
            else:
                client = link.asked.pop(bytes(frames[0]), link.client) if frames else link.client
                if client is None:
                    return
                link.front.send_multipart([client, *frames], flags=zmq.NOBLOCK)
            self._count("forwarded", window)
        except zmq.Again:
            self._count("dropped", window)  # the far side is gone or full: the network loses it

    def _forward(self, link: _Link, direction: str, frames: list[bytes]) -> None:
        p = link.policy
        now = time.monotonic()
        if p.action != "pass" and now > p.until and (now > p.longest or self._touched(p.window)):
            p = link.policy = Policy()
        q = link.queues[direction]
        if p.action == "drop" and self._rnd.random() < p.probability:
            self._count("dropped", p.window)
            return
        if p.action == "delay" or q:
            due = time.monotonic() + (p.delay_s if p.action == "delay" else 0.0)
            if q:
                due = max(due, q[-1][0])  # keep the order of the link
            q.append((due, frames, p.window))
            if p.action == "delay":
                self._count("delayed", p.window)
            return
        self._send(link, direction, frames, p.window)
        if p.action == "duplicate" and self._rnd.random() < p.probability:
            self._send(link, direction, frames, p.window)
            self._count("duplicated", p.window)
            if direction == "req":
                self._count("duplicated_requests", p.window)
                # its header names its sender and sequence number (frames: request id, header, ..., tag)
                msg = _peer_header(frames)
                if msg is not None:
                    with self._lock:
                        self._twice[p.window].add((link.dst, msg.node, msg.boot, msg.seq))

    def _serve(self) -> None:
        try:
            poller = zmq.Poller()
            by_sock = {}
            for link in self.links.values():
                poller.register(link.front, zmq.POLLIN)
                poller.register(link.back, zmq.POLLIN)
                by_sock[link.front] = (link, "req")
                by_sock[link.back] = (link, "rep")
            while not self._stop.is_set():
                now = time.monotonic()
                waits = [q[0][0] - now for link in self.links.values() for q in link.queues.values() if q]
                timeout = 100 if not waits else max(0, min(100, int(min(waits) * 1000) + 1))
                for sock, _ in poller.poll(timeout):
                    link, direction = by_sock[sock]
                    frames = sock.recv_multipart()
                    if direction == "req":
                        link.client, frames = frames[0], frames[1:]
                        if frames and frames[0] != bytes(8):  # a request that expects a reply
                            link.asked[bytes(frames[0])] = link.client
                            while len(link.asked) > 1024:
                                link.asked.popitem(last=False)
                    self._forward(link, direction, frames)
                now = time.monotonic()
                for link in self.links.values():
                    for direction, q in link.queues.items():
                        while q and q[0][0] <= now:
                            _, frames, window = q.popleft()
                            self._send(link, direction, frames, window)
            for link in self.links.values():
                link.front.close(0)
                link.back.close(0)
        except BaseException as e:  # reported by close()
            self._error = e
            log.exception("peer proxy failed")


def _peer_header(frames: list[bytes]) -> P.PeerMessage | None:
    """The header of a daemon-to-daemon request (decoded, never unpickled), or None if the frames hold none."""
    try:
        msg = P.decode(bytes(frames[1])) if len(frames) > 1 else None
    except SnapGuardError:
        return None
    return msg if isinstance(msg, P.PeerMessage) else None
