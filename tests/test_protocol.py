"""Typed, versioned msgpack messages: every type round-trips, every malformed frame is refused by name."""

from __future__ import annotations

import typing

import msgpack
import pytest

from snapguard import protocol as P
from snapguard.errors import ProtocolError

# One well-formed instance of every trainer<->daemon message.
SAMPLES = [
    P.Ping(),
    P.Hello("job", 1, 4, 1234, "0123456789abcdef"),
    P.Reserve("job", 3, 4, 1 << 20),
    P.Begin("job", 0, 4, 17, 4096),
    P.Seal("job", 2, 17, 1, {"version": 1, "nested": [1, 2, b"\x00"]}),
    P.Inventory("job", 0),
    P.Open("job", 1, 16),
    P.Drop("job", 1, -1),
    P.Status(),
    P.Shutdown(remove=False),
    P.Ok({"slots": [["/dev/shm/x", 64]]}),
    P.Error("LayoutError", "rank 1: bad"),
    P.Welcome("n0", 99, "/dev/shm/snapguard-job-n0"),
    P.Granted(1, "/dev/shm/x", 4096),
    P.Allocating(1 << 30, 3 << 30),
    P.Wait(5, 4),
    P.Sealed(17, 16),
    P.Steps([15, 16], ["rank 0: shard for step 17 has checksum ..."]),
    P.Shard("/dev/shm/x", {"k": "v"}),
    P.Loading(16, 1 << 20, 4 << 20),
    P.Loading(16, 0, 4 << 20, source="peers"),
    P.Loading(16, 0, 4 << 20, reserved=1 << 20, slot=8 << 20),
    P.StatusReport("n0", "job", 1, "/dev/shm/d", 10, 20, [{"rank": 0, "slots": []}], -1),
]


def raw(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def fields_of(msg: P.Message) -> dict:
    return {"v": P.VERSION, "type": msg.TYPE, **P.fields_of(msg)}


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_every_message_roundtrips(msg):
    assert P.decode(P.encode(msg)) == msg
    assert P.decode(P.encode(msg), expect=(type(msg),)) == msg


def test_samples_cover_every_trainer_daemon_message():
    core = {"Ping", "Hello", "Reserve", "Begin", "Seal", "Inventory", "Open", "Drop", "Status", "Shutdown",
            "Ok", "Error", "Welcome", "Granted", "Allocating", "Wait", "Sealed", "Steps", "Shard", "Loading",
            "StatusReport"}
    assert {m.TYPE for m in SAMPLES} == core


def test_a_message_is_one_msgpack_map_with_version_and_type():
    d = msgpack.unpackb(P.encode(P.Begin("job", 0, 4, 17, 4096)), raw=False)
    assert d == {"v": 4, "type": "Begin", "job": "job", "rank": 0, "world_size": 4, "step": 17, "nbytes": 4096}


def test_fields_with_defaults_may_be_left_out():
    assert P.decode(raw({"v": 4, "type": "Shutdown"})) == P.Shutdown(remove=True)
    assert P.decode(raw({"v": 4, "type": "Ok"})) == P.Ok({})


BEGIN = fields_of(P.Begin("job", 0, 4, 17, 4096))


@pytest.mark.parametrize(("frame", "match"), [
    (b"", "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),                                    # a byte msgpack never uses
    (P.encode(P.Begin("job", 0, 4, 17, 4096))[:-3], "not valid msgpack"),  # truncated
    (P.encode(P.Ping()) + b"\x00", "not valid msgpack"),               # trailing bytes
    (raw([1, "Ping"]), "must be a map, got list"),
    (raw(7), "must be a map, got int"),
    (raw({"type": "Ping"}), "version None is not supported"),
    (raw({"v": 2, "type": "Ping"}), "version 2 is not supported"),
    (raw({"v": "1", "type": "Ping"}), "version '1' is not supported"),
    (raw({"v": 4, "type": "Bogus"}), "unknown message type 'Bogus'"),
    (raw({"v": 4, "type": 5}), "unknown message type 5"),
    (raw({"v": 4, "type": "Message"}), "unknown message type"),        # the base class is no message
    (raw({**BEGIN, "extra": 1}), r"Begin has unknown fields \['extra'\]"),
    (raw({k: v for k, v in BEGIN.items() if k != "step"}), "Begin lacks field 'step'"),
    (raw({**BEGIN, "step": "17"}), "Begin.step has type str, expected int"),
    (raw({**BEGIN, "step": 17.0}), "Begin.step has type float, expected int"),
    (raw({**BEGIN, "rank": True}), "Begin.rank has type bool, expected int"),
    (raw({**BEGIN, "job": b"job"}), "Begin.job has type bytes, expected str"),
    (raw({**BEGIN, "nbytes": None}), "Begin.nbytes has type NoneType"),
    (raw({**BEGIN, "step": -1}), "Begin.step must be >= 0, got -1"),
    (raw({**BEGIN, "rank": 4}), "Begin.rank 4 is outside world_size 4"),
    (raw({**fields_of(P.Hello("job", 0, 2, 1, "0123456789abcdef")), "rank": 2}), "Hello.rank 2 is outside world_size 2"),
    # the daemon builds a file name of it: a path, or anything but the token a trainer makes, is refused
    (raw({**fields_of(P.Hello("job", 0, 2, 1, "0123456789abcdef")), "lock": "../../x/0123456789"}),
     "Hello.lock must be 16 lowercase hex digits"),
    (raw({**fields_of(P.Seal("job", 0, 1, 0, {})), "manifest": [1]}), "Seal.manifest has type list, expected dict"),
    (raw({**fields_of(P.Seal("job", 0, 1, 0, {})), "slot": -2}), "Seal.slot must be >= 0"),
    (raw({**fields_of(P.Allocating(0, 1)), "done": -1}), "Allocating.done must be >= 0"),
    (raw({**fields_of(P.Steps([1], [])), "steps": [1, "2"]}), r"Steps.steps\[1\] has type str, expected int"),
    (raw({**fields_of(P.Steps([1], [])), "steps": 1}), "Steps.steps has type int"),
    (raw({"v": 4, "type": "Shutdown", "remove": 1}), "Shutdown.remove has type int, expected bool"),
    (raw(fields_of(P.Loading(1, 5, 4))), "Loading.done 5 exceeds Loading.total 4"),
    (raw({**fields_of(P.Loading(1, 0, 4)), "source": "tape"}), "Loading.source 'tape' is neither 'disk' nor 'peers'"),
    (raw({**fields_of(P.Loading(1, 0, 4)), "reserved": 9, "slot": 8}), "Loading.reserved 9 exceeds Loading.slot 8"),
])
def test_decode_refuses_malformed_messages_saying_why(frame, match):
    with pytest.raises(ProtocolError, match=match):
        P.decode(frame)


def test_decode_refuses_an_unexpected_type():
    with pytest.raises(ProtocolError, match=r"unexpected Ping, expected one of \['Granted', 'Wait'\]"):
        P.decode(P.encode(P.Ping()), expect=(P.Granted, P.Wait))


def test_decode_refuses_oversized_frames_before_parsing():
    big = raw({"v": 4, "type": "Error", "code": "x", "message": "y" * 100}) + b"\x00" * P.MAX_HEADER_BYTES
    with pytest.raises(ProtocolError, match=f"over the {P.MAX_HEADER_BYTES}-byte limit"):
        P.decode(big)


def test_decode_never_unpickles():
    import pickle

    with pytest.raises(ProtocolError, match="not valid msgpack|must be a map"):
        P.decode(pickle.dumps({"v": 4, "type": "Ping"}))


def test_every_registered_field_type_has_a_validator():
    # A message type whose field type decode() cannot check would fail only when first received.
    for cls in P._REGISTRY.values():
        for name, t in typing.get_type_hints(cls).items():
            if name == "TYPE":
                continue
            try:
                P._check(None, t, f"{cls.TYPE}.{name}")
            except ProtocolError as e:
                assert "no validator" not in str(e), e


RESERVE = fields_of(P.Reserve("job", 0, 4, 4096))
HELD = fields_of(P.PeerHeld("job", "b", 1, 1, held=[[0, 3, 4]], parity=[[1, 1, 3]]))


@pytest.mark.parametrize(("frame", "match"), [
    pytest.param(raw({**RESERVE, "world_size": 0}), "Reserve.world_size must be in 1..16777216, got 0", id="world-0"),
    pytest.param(raw({**RESERVE, "rank": 4}), "Reserve.rank 4 is outside world_size 4", id="reserve-rank-outside"),
    pytest.param(raw({**RESERVE, "rank": -1}), "Reserve.rank -1 is outside world_size 4", id="reserve-rank-negative"),
    pytest.param(raw({**BEGIN, "world_size": 40_000_000}), "Begin.world_size must be in 1..16777216, got 40000000",
                 id="world-4e7"),
    pytest.param(raw({**BEGIN, "world_size": -3}), "Begin.world_size must be in 1", id="world-negative"),
    pytest.param(raw({**fields_of(P.Hello("job", 0, 2, 1, "0123456789abcdef")), "world_size": (1 << 24) + 1}),
                 "Hello.world_size must be in 1", id="hello-world-over-max"),
    pytest.param(raw({**fields_of(P.Seal("job", 0, 1, 0, {})), "rank": 1 << 40}), "Seal.rank must be in 0..16777215",
                 id="seal-rank-huge"),
    pytest.param(raw({**fields_of(P.Open("job", 0, 1)), "rank": -1}), "Open.rank must be in 0..16777215, got -1",
                 id="open-rank-negative"),
])
def test_world_size_and_rank_are_bounded(frame, match):
    """The daemon loops over a job's ranks: a world of 4e7 ranks, or a rank outside its world, never reaches it."""
    with pytest.raises(ProtocolError, match=match):
        P.decode(frame)


@pytest.mark.parametrize(("over", "match"), [
    ({"held": [[]]}, r"PeerHeld.held row \[\] is not \[rank, step, ...\]"),
    ({"held": [[0, 3], [-1, 3]]}, r"PeerHeld.held row \[-1, 3\]"),
    ({"held": [[0, -3]]}, r"PeerHeld.held row \[0, -3\]"),
    ({"held": [[1 << 24, 3]]}, "PeerHeld.held row"),
    ({"parity": [[1, 1]]}, r"PeerHeld.parity row \[1, 1\] is not \[codeword, position, step\]"),
    ({"parity": [[1, 1, 3, 4]]}, "PeerHeld.parity row"),
    ({"parity": [[-1, 1, 3]]}, r"PeerHeld.parity row \[-1, 1, 3\]"),
    ({"parity": [[1, 1, 3], [1, -1, 3]]}, r"PeerHeld.parity row \[1, -1, 3\]"),
    ({"sending": -2}, "PeerHeld.sending must be >= -1, got -2"),
])
def test_peer_held_rows_are_checked_on_decoding(over, match):
    assert P.decode(raw(HELD)).held == [[0, 3, 4]]
    with pytest.raises(ProtocolError, match=match):
        P.decode(raw({**HELD, **over}))


STOCK = fields_of(P.PeerStock("b", sealed=[3, 4], parity=[[1, 1, 3]],
                              blobs={"3": {"nbytes": 64, "ranks": [[0, 0, {"step": 3}]]}}))


@pytest.mark.parametrize(("over", "match"), [
    ({"sealed": [3, -4]}, r"PeerStock.sealed holds a negative step"),
    ({"parity": [[1, 1]]}, r"PeerStock.parity row \[1, 1\] is not \[codeword, position, step\]"),
    ({"parity": [[1, -1, 3]]}, r"PeerStock.parity row \[1, -1, 3\]"),
    ({"blobs": {"x3": {"nbytes": 64, "ranks": []}}}, r"PeerStock.blobs maps 'x3' to a dict: expected a step"),
    ({"blobs": {"3": [1, 2]}}, r"PeerStock.blobs maps '3' to a list"),
    ({"blobs": {"3": {"nbytes": -1, "ranks": []}}}, r"PeerStock.blobs\[3\] is malformed"),
    ({"blobs": {"3": {"nbytes": 64, "ranks": [[0, 65, {}]]}}}, r"PeerStock.blobs\[3\] is malformed"),
    ({"blobs": {"3": {"nbytes": 64, "ranks": [[0, 0]]}}}, r"PeerStock.blobs\[3\] is malformed"),
])
def test_a_peer_stock_reply_is_checked_on_decoding(over, match):
    """A rebuild reads steps, parity and blob layouts out of the peers' stocks: a malformed reply is refused
    as it is decoded (the asker then counts that peer as lost), never half-used."""
    assert P.decode(raw(STOCK)).blobs["3"]["nbytes"] == 64
    with pytest.raises(ProtocolError, match=match):
        P.decode(raw({**STOCK, **over}))
