"""Authenticated daemon-to-daemon links over ZeroMQ TCP.

Every message, request or reply, is `[request id, header, *bulk, tag]` where tag is a keyed BLAKE3
(a MAC, with a key derived from the job's secret) over the length-prefixed frames before it. The bulk
frames are pieces of chunks of shards, so the MAC's speed bounds protection's: keyed BLAKE3 runs at about
5 GB/s per core on the dev VM, HMAC-SHA256 at 0.6 GB/s. A message whose tag is missing or
wrong is rejected before its header is even decoded. Requests carry the sender's (boot, seq): boot
is the sender's start time in ns and seq grows with every message, so a captured message replayed
later is refused. Replies are bound to their request by the request id inside the tag.

Every message also carries the receiver's boot as the sender last heard it (`to_boot`, 0 before it
heard from it): a daemon refuses a PeerHeld or PeerChunk sent to an earlier run of itself, which its
replay check, reset at every start, would otherwise take once more. Until a peer hears of the new
run (from its first heartbeat or request, within a second) its messages are refused, and sent again.
A daemon that hears its own boot named as a later one than its run's (an earlier run on a clock that ran
ahead) moves its boot past it: its peers take only boots later than the newest they saw.
A message sent before its sender heard from the receiver at all carries 0, and is taken only if its
sender started after the receiver (boots are start times): a message captured before a run started
was sent by an older sender. Of two daemons, the older one's first messages to the newer are refused
until it hears from the newer one, whose messages it takes. Boots come from each node's clock: a
sender whose clock runs ahead of the receiver's by more than the time between the capture and the
receiver's restart could still have a captured message taken once.

Chunks travel on a link of their own to each peer (a second connection, with its own sequence), so
that the small messages the group's bookkeeping depends on (which steps every rank holds) never
wait behind hundreds of MiB of chunks.

The MAC is checked only once ZeroMQ has read a whole message, and ZeroMQ limits the size of a frame,
not the number of frames: anyone who reached the peer port could make a daemon buffer any amount of
memory. So connections are authenticated first (`ConnectionGate`): ZeroMQ's PLAIN mechanism, with
the job id as user name and a password derived from the job's secret, checked by a ZAP handler of our
own. A connection without them is closed at its handshake, before any of its messages is read. PLAIN
sends the password in the clear: it only decides who may connect, and an eavesdropper who learns it
still cannot forge a MAC (its key is derived from the secret for another purpose).
"""

from __future__ import annotations

import functools
import hmac
import itertools
import logging
import os
import secrets
import threading
import time
from typing import Callable

import blake3
import zmq

from snapguard import protocol as P
from snapguard.config import daemon_who
from snapguard.errors import DaemonUnavailable, ProtocolError, SnapGuardError

from snapguard.daemon.protect import PIECE

log = logging.getLogger(__name__)

ENV_SECRET = "SNAPGUARD_SECRET"  # hex or text; or --secret-file
_TAG = 32


class AuthError(SnapGuardError):
    """A peer message failed authentication or replay checks."""


def load_secret(path: str | None) -> bytes:
    if path:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_mode & 0o077:
                    raise SnapGuardError(f"secret file {path} must not be readable by group or others (chmod 600)")
                secret = f.read().strip()
        except OSError as e:
            raise SnapGuardError(f"cannot read the secret file {path}: {e.strerror}") from None
    else:
        secret = os.environ.get(ENV_SECRET, "").encode()
    if len(secret) < 16:
        raise SnapGuardError(f"daemon-to-daemon traffic needs a job secret of at least 16 bytes: set {ENV_SECRET}"
                             " or pass --secret-file")
    return secret


_KEY_CONTEXT = "snapguard 2026-11 daemon-to-daemon frames"


def _mac(secret: bytes, frames: list[bytes]) -> bytes:
    key = _mac_key(secret)
    h = blake3.blake3(key=key)
    for f in frames:
        h.update(len(f).to_bytes(8, "little"))
        h.update(f)
    return h.digest(_TAG)


@functools.lru_cache(maxsize=4)
def _mac_key(secret: bytes) -> bytes:
    """BLAKE3's key-derivation mode turns a secret of any length into the 32-byte MAC key."""
    return blake3.blake3(secret, derive_key_context=_KEY_CONTEXT).digest()


def seal_frames(secret: bytes, rid: bytes, msg: P.Message, bulk: list[bytes] = ()) -> list[bytes]:
    frames = [rid, P.encode(msg), *bulk]
    return frames + [_mac(secret, frames)]


def open_frames(secret: bytes, frames: list) -> tuple[bytes, P.Message, list]:
    """Check the tag, then decode the header; raise AuthError or ProtocolError saying why. Bulk frames
    come back as they came in (bytes, or read-only views of ZeroMQ's memory, see `recv_frames`)."""
    if len(frames) < 3 or len(frames[0]) != 8:
        raise AuthError(f"malformed peer message of {len(frames)} frame(s)")
    body, tag = frames[:-1], frames[-1]
    if len(tag) != _TAG or not hmac.compare_digest(bytes(tag), _mac(secret, body)):
        raise AuthError("authentication tag is missing or wrong")
    return bytes(body[0]), P.decode(bytes(body[1])), list(body[2:])


@functools.lru_cache(maxsize=4)
def connection_password(secret: bytes) -> bytes:
    """What a daemon presents to connect to its peers (PLAIN): derived from the secret, never the MAC key."""
    return blake3.blake3(secret, derive_key_context=_PASSWORD_CONTEXT).hexdigest().encode()


_PASSWORD_CONTEXT = "snapguard 2026-11 daemon-to-daemon connection password"
_ZAP_DOMAIN = b"snapguard-peers"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks a context's ZAP handler (RFC 27)


def require_credentials(sock: zmq.Socket) -> None:
    """Make a listening socket accept only connections whose PLAIN credentials a ConnectionGate allows."""
    sock.setsockopt(zmq.PLAIN_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)


def present_credentials(sock: zmq.Socket, job: str, secret: bytes) -> None:
    """Make a connecting socket present the job's PLAIN credentials."""
    sock.setsockopt(zmq.PLAIN_USERNAME, job.encode())
    sock.setsockopt(zmq.PLAIN_PASSWORD, connection_password(secret))


class ConnectionGate:
    """The ZAP handler of one ZeroMQ context: allows a connection to a `require_credentials` socket only with the
    job's PLAIN credentials. Runs in a thread of its own, so a handshake never waits for the daemon's loop."""

    def __init__(self, ctx: zmq.Context, job: str, secret: bytes, who: str):
        self.who = who
        self._allowed = (job.encode(), connection_password(secret))
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(_ZAP_ENDPOINT)  # before any socket that needs it binds
        self.denied = 0
        self._logged: dict[bytes, float] = {}  # address -> when its last denial was logged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="snapguard-peer-gate", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self._sock.poll(100):
                    self._answer(self._sock.recv_multipart())
        except BaseException:  # without this thread no peer can connect: say so loudly
            log.critical("%s the peer connection gate failed: no peer can connect to this daemon any more", self.who,
                         exc_info=True)
            raise
        finally:
            self._sock.close(0)

    def _answer(self, frames: list[bytes]) -> None:
        if len(frames) < 6:  # not a ZAP request: nothing to answer it with
            self._sock.send_multipart([b"1.0", b"", b"500", b"malformed ZAP request", b"", b""])
            return
        version, request_id, domain, address, _, mechanism, *credentials = frames
        ok = (version == b"1.0" and domain == _ZAP_DOMAIN and mechanism == b"PLAIN" and len(credentials) == 2
              and credentials[0] == self._allowed[0] and hmac.compare_digest(credentials[1], self._allowed[1]))
        self._sock.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                   b"OK" if ok else b"not this job's credentials", b"", b""])
        if not ok:
            self.denied += 1
            now = time.monotonic()
            if now - self._logged.get(address, -60.0) >= 60.0:  # a client retries every 100 ms: once a minute
                if len(self._logged) >= 1024:  # senders from many addresses: bounded, at worst logged more often
                    self._logged.clear()
                self._logged[address] = now
                log.warning("%s refused a peer connection from %s: it did not present job %s's credentials (%d"
                            " refused so far)", self.who, address.decode(errors="replace"),
                            self._allowed[0].decode(), self.denied)

    def close(self) -> bool:
        """Stop the handler; False if its thread did not stop within 5 s (its socket is then still open)."""
        self._stop.set()
        self._thread.join(5)
        return not self._thread.is_alive()


_ZERO_COPY = 1 << 16
RECV_HWM = 4  # messages ZeroMQ reads ahead per peer
# The largest frame a peer sends: a piece of a chunk (to the ROUTER, or a reply to a fetch on a DEALER), or a header
# (a chunk's carries its node's layout). ZeroMQ buffers a whole frame before the MAC can be checked, so a sender may
# make the daemon hold this much per frame; a larger one closes the sender's connection.
MAX_PEER_FRAME = PIECE + P.MAX_HEADER_BYTES + (1 << 16)


def recv_frames(sock: zmq.Socket) -> list:
    """One multipart message. Frames of a chunk's size stay in ZeroMQ's memory, as read-only views (no
    copy, and no fresh shard-sized allocation per message); small ones become bytes."""
    return [f.buffer if len(f) > _ZERO_COPY else f.bytes for f in sock.recv_multipart(copy=False)]


class PeerNet:
    """This daemon's listening socket for peers, plus one outgoing DEALER per peer."""

    def __init__(self, job: str, node: str, secret: bytes, bind: str, peers: dict[str, str]):
        self.job, self.node, self.secret = job, node, secret
        self.who = daemon_who(job, node)
        self.peers = dict(peers)
        self.boot = time.time_ns()
        self._seq = itertools.count(1)
        self._bulk_seq = itertools.count(1)
        self._seen: dict[tuple[str, bool], tuple[int, int]] = {}  # (node, bulk link) -> newest (boot, seq)
        self.boots: dict[str, int] = {}  # node -> the newest boot its authenticated messages carried
        # A context of its own: its ZAP handler (there is one per context) decides who may connect.
        self._ctx = zmq.Context()
        self.gate = ConnectionGate(self._ctx, job, secret, self.who)
        self.router = self._ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        require_credentials(self.router)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_PEER_FRAME)
        # A message can be a chunk of a shard (hundreds of MiB). ZeroMQ reads ahead of this daemon up to the high
        # water mark per peer; a low one leaves chunks of a holder that falls behind in its senders' queues (whose
        # senders then hold back their next step) instead of piling them up in its memory.
        self.router.setsockopt(zmq.RCVHWM, RECV_HWM)
        self.router.bind(bind)
        self._dealers: dict[tuple[str, bool], zmq.Socket] = {}  # (node, bulk link) -> DEALER
        self._asked: dict[bytes, str] = {}  # request id -> the node asked: its reply is awaited
        self._answers: dict[bytes, tuple[str, P.Message, list]] = {}  # request id -> (node, its reply), not taken yet
        self.rejected = 0

    def header(self, to: str | None = None, bulk: bool = False) -> dict:
        """The sender fields of a message to `to`; `bulk` for a PeerChunk, which goes out on the chunk link."""
        return {"job": self.job, "node": self.node, "boot": self.boot,
                "seq": next(self._bulk_seq if bulk else self._seq), "to_boot": self.boots.get(to, 0)}

    def _dealer(self, node: str, bulk: bool = False) -> zmq.Socket:
        s = self._dealers.get((node, bulk))
        if s is None:
            if node not in self.peers:
                raise SnapGuardError(f"node {node!r} is not a configured peer (peers: {sorted(self.peers)})")
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            present_credentials(s, self.job, self.secret)
            s.setsockopt(zmq.SNDHWM, 64)
            s.setsockopt(zmq.RCVHWM, 64)
            s.setsockopt(zmq.MAXMSGSIZE, MAX_PEER_FRAME)
            s.connect(self.peers[node])
            self._dealers[(node, bulk)] = s
        return s

    def _drop(self, node: str, bulk: bool = False) -> None:
        s = self._dealers.pop((node, bulk), None)
        if s is not None:
            s.close(0)

    def send(self, node: str, msg: P.Message, bulk: list[bytes] = ()) -> bool:
        """Fire and forget; False if the peer's queue is full (it is slow or gone): the message is dropped."""
        try:
            self._dealer(node).send_multipart(seal_frames(self.secret, bytes(8), msg, list(bulk)), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("%s peer %s is not keeping up; dropped %s", self.who, node, msg.TYPE)
            return False

    def send_tracked(self, node: str, msg: P.Message, data) -> zmq.MessageTracker | None:
        """Send one message whose bulk frame `data` ZeroMQ reads in place, without a copy: `data` must not change
        until the returned tracker is done. None if the peer's queue is full: nothing was sent, try again later."""
        frames = seal_frames(self.secret, bytes(8), msg, [data])
        frames[2] = zmq.Frame(data, track=True)
        try:
            self._dealer(node, bulk=True).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return frames[2].tracker

    def forget(self, node: str) -> None:
        """Close the chunk link to `node`, discarding what is queued on it; the next chunk opens a new one."""
        self._drop(node, bulk=True)

    def ask(self, node: str, msg: P.Message) -> bytes:
        """Send request `msg` to `node` and return its request id, without waiting: `take_answers` reads the reply
        once it comes, and `answer` hands it over. The request id is random: a reply captured from an earlier run of
        this daemon, whose requests counted from the same start, can never pass for the reply to this one."""
        rid = secrets.token_bytes(8)
        while rid == bytes(8) or rid in self._asked:  # bytes(8) marks a message that expects no reply
            rid = secrets.token_bytes(8)
        try:
            self._dealer(node).send_multipart(seal_frames(self.secret, rid, msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise DaemonUnavailable(f"peer {node} ({self.peers[node]}) is not accepting messages") from None
        self._asked[rid] = node
        return rid

    def awaited(self) -> list[zmq.Socket]:
        """The links on which replies to requests are awaited: poll them for `take_answers`."""
        return [s for s in (self._dealers.get((n, False)) for n in set(self._asked.values())) if s is not None]

    def take_answers(self) -> None:
        """Read, without waiting, the replies that came to requests (`ask`)."""
        for node in set(self._asked.values()):
            sock = self._dealers.get((node, False))
            while sock is not None and sock.poll(0):
                self._file(node, recv_frames(sock))

    def _file(self, node: str, frames: list) -> None:
        """Keep an authenticated reply of `node` to one of the requests awaited; drop a late or a forged one."""
        try:
            rid, reply, bulk = open_frames(self.secret, frames)
        except (AuthError, ProtocolError) as e:
            self.rejected += 1
            log.warning("%s rejected a reply from %s: %s", self.who, node, e)
            return
        if self._asked.get(rid) == node:  # else a late reply to a request given up on
            del self._asked[rid]
            self._answers[rid] = (node, reply, bulk)

    def answer(self, rid: bytes, msg: P.Message, expect: type) -> tuple[P.Message, list[bytes]] | None:
        """The reply to request `rid` (`ask`) of `msg`, of type `expect`; None while it has not come. A peer's Error
        reply is raised as a SnapGuardError."""
        got = self._answers.pop(rid, None)
        if got is None:
            return None
        node, reply, bulk = got
        if isinstance(reply, P.Error):
            raise SnapGuardError(f"peer {node} refused {msg.TYPE}: [{reply.code}] {reply.message}")
        if not isinstance(reply, expect):
            raise ProtocolError(f"peer {node} answered {msg.TYPE} with {reply.TYPE}, not {expect.TYPE}")
        return reply, bulk

    def cancel(self, rid: bytes) -> None:
        """Give up on request `rid`: its reply is dropped if it still comes."""
        self._asked.pop(rid, None)
        self._answers.pop(rid, None)

    def request(self, node: str, msg: P.Message, expect: type, timeout_s: float,
                serve: Callable[[list[bytes]], None] | None = None) -> tuple[P.Message, list[bytes]]:
        """Send `msg` to `node` and wait for its authenticated reply, of type `expect`, serving our own peers
        meanwhile. Replies to other requests (`ask`) that come meanwhile are kept for them."""
        got = self.request_all({node: msg}, expect, timeout_s, serve)[node]
        if isinstance(got, SnapGuardError):
            raise got
        return got

    def request_all(self, msgs: dict[str, P.Message], expect: type, timeout_s: float,
                    serve: Callable[[list[bytes]], None] | None = None
                    ) -> dict[str, tuple[P.Message, list[bytes]] | SnapGuardError]:
        """Send every node its request at once, and wait for their replies, of type `expect`, at most `timeout_s` in
        all, serving our own peers meanwhile: node -> (reply, bulk), or the error that stands for it (a refusal,
        or no answer in time: the link to that node is then closed, dropping what is queued on it)."""
        out: dict[str, tuple[P.Message, list[bytes]] | SnapGuardError] = {}
        rids: dict[str, bytes] = {}
        for node, msg in msgs.items():
            try:
                rids[node] = self.ask(node, msg)
            except SnapGuardError as e:
                out[node] = e
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                for node, rid in list(rids.items()):
                    try:
                        got = self.answer(rid, msgs[node], expect)
                    except SnapGuardError as e:
                        got = e
                    if got is not None:
                        out[node] = got
                        del rids[node]
                left = deadline - time.monotonic()
                if not rids or left <= 0:
                    break
                poller = zmq.Poller()
                for n in rids:
                    poller.register(self._dealer(n), zmq.POLLIN)
                if serve is not None:
                    poller.register(self.router, zmq.POLLIN)
                events = dict(poller.poll(int(left * 1000) + 1))
                if serve is not None and self.router in events:
                    serve(recv_frames(self.router))
                self.take_answers()
        finally:
            for rid in rids.values():
                self.cancel(rid)
        for node in rids:
            self._drop(node)
            out[node] = DaemonUnavailable(f"peer {node} ({self.peers[node]}) did not answer {msgs[node].TYPE} within"
                                          f" {timeout_s:.1f} s")
        return out

    def receive(self, frames: list[bytes]) -> tuple[bytes, bytes, P.PeerMessage, list[bytes]]:
        """Authenticate one message from the ROUTER; return (identity, request id, message, bulk)."""
        ident, rest = frames[0], frames[1:]
        rid, msg, bulk = open_frames(self.secret, rest)
        if not isinstance(msg, P.PeerMessage):
            raise ProtocolError(f"{msg.TYPE} is not a peer request")
        if msg.job != self.job:
            raise AuthError(f"message for job {msg.job!r}, this daemon serves {self.job!r}")
        if msg.node not in self.peers:
            raise AuthError(f"message from unknown node {msg.node!r}")
        if msg.to_boot > self.boot:
            self._behind(msg)
        # The sender's run, from an authentic message even when it is refused below: else two daemons that refuse
        # each other's heartbeats (one restarted on a clock between its last run's start and the other's: the
        # other names its last run, and it names no run of the other's) would never learn of each other's runs.
        # A replay names a run no newer than the one recorded; it changes nothing.
        self.boots[msg.node] = max(self.boots.get(msg.node, 0), msg.boot)
        if isinstance(msg, (P.PeerHeld, P.PeerChunk)):
            # `_seen` starts empty in every run: without these two checks, a message captured during an earlier run
            # would be taken once more. Requests change nothing here and are answered.
            # Both name the message as a replay does (its sender's boot and sequence number): the chaos harness
            # matches a duplicate that reached the next run of a daemon to the copy it sent.
            sent = f"{msg.TYPE} from {msg.node} (boot {msg.boot}, seq {msg.seq})"
            if msg.to_boot not in (0, self.boot):
                raise AuthError(f"{sent} was sent to an earlier run of this daemon (boot {msg.to_boot}, this run's is"
                                f" {self.boot})")
            if msg.to_boot == 0 and msg.boot < self.boot:
                raise AuthError(f"{sent} may predate this run of this daemon: its sender started before this run"
                                f" (boot {self.boot}) and had not heard from it")
        link = (msg.node, isinstance(msg, P.PeerChunk))
        last = self._seen.get(link, (0, 0))
        if (msg.boot, msg.seq) <= last:
            raise AuthError(f"replayed message from {msg.node} (boot {msg.boot}, seq {msg.seq}; already saw"
                            f" boot {last[0]}, seq {last[1]})")
        self._seen[link] = (msg.boot, msg.seq)
        return ident, rid, msg, bulk

    def _behind(self, msg: P.PeerMessage) -> None:
        """`msg` names a run of this daemon with a later boot than this run's: an earlier run, on a clock that ran
        ahead of this one (a replacement machine's, or one set back since). Its peers keep that boot as this node's
        newest and take only later ones: this run's messages would be refused as replays for good. Boots need
        only grow, so this run's moves past it; messages sent under the old one are refused, and sent again."""
        was, self.boot = self.boot, msg.to_boot + 1
        log.warning("%s %s knew an earlier run of this daemon with a later start (boot %d, this run's %d: this"
                    " node's clock is %.1f s behind that run's, at least); this run's boot is now %d", self.who,
                    msg.node, msg.to_boot, was, (msg.to_boot - was) / 1e9, self.boot)

    def reply(self, ident: bytes, rid: bytes, msg: P.Message, bulk: list = ()) -> None:
        """Answer a peer's request. ZeroMQ sends `bulk` in place (a frame above its copy threshold is not copied):
        the caller must not change it afterwards."""
        try:
            self.router.send_multipart([ident, *seal_frames(self.secret, rid, msg, list(bulk))], flags=zmq.NOBLOCK,
                                       copy=False)
        except zmq.Again:
            log.warning("%s could not reply %s to a peer: its queue is full", self.who, msg.TYPE)

    def close(self) -> None:
        for n, bulk in list(self._dealers):
            self._drop(n, bulk)
        self.router.close(0)
        if self.gate.close():
            self._ctx.term()  # every socket is closed: returns at once
        else:
            log.warning("%s the peer connection gate did not stop within 5 s", self.who)
