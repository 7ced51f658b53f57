"""Stateful objects to (tensors, tree) and back: exact, typed, never pickled."""

from __future__ import annotations

import collections
import enum
import math
import random

import msgpack
import numpy as np
import pytest
import torch

from snapguard.errors import LayoutError, SnapGuardError
from snapguard.layout import plan_layout
from snapguard.state import (TORCH_DTYPES, DictState, RNGState, as_stateful, check_compatible, flatten, pack_tree,
                             tensor_spec, unflatten, unpack_tree)


def through_shard(state):
    """What a snapshot does to a state: tensors into one aligned byte buffer, the rest into msgpack, and back."""
    tensors, tree = flatten(state)
    lay = plan_layout(tensor_spec(n, t) for n, t in tensors)
    buf = torch.zeros(lay.nbytes, dtype=torch.uint8)
    for e, (_, t) in zip(lay.entries, tensors):
        buf[e.offset:e.offset + e.nbytes].view(TORCH_DTYPES[e.dtype]).view(e.shape).copy_(t)
    back = [buf[e.offset:e.offset + e.nbytes].view(TORCH_DTYPES[e.dtype]).view(e.shape).clone() for e in lay.entries]
    return unflatten(unpack_tree(pack_tree(tree)), back), tensors, lay


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def test_tree_keeps_python_types_exactly():
    state = {
        "step": 41, 3: "int key", (1, "a"): "tuple key", "big": 1 << 70, "neg": -(1 << 70), "f": 0.1, "inf": math.inf,
        "none": None, "flag": False, "raw": b"\x00\xff", "tuple": (1, [2, (3,)]), "list": [1, 2],
        "dtype": torch.bfloat16, "device": torch.device("cpu"), "np_scalar": np.float32(1.5), "np_int": np.int64(-3),
        "nested": {"empty": {}, "emptyl": [], "emptyt": ()},
    }
    got, tensors, _ = through_shard(state)
    assert tensors == []
    assert got == state
    assert type(got["tuple"]) is tuple and type(got["tuple"][1]) is list and type(got["tuple"][1][1]) is tuple
    assert type(got["np_scalar"]) is np.float32 and type(got["np_int"]) is np.int64
    assert (1, "a") in got and 3 in got and type(got["nested"]["emptyt"]) is tuple


def test_tensors_and_arrays_come_back_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    state = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
        "f64": torch.tensor([math.nan, -0.0, math.inf], dtype=torch.float64), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "b": torch.tensor([True, False]), "empty": torch.empty(0, 4), "scalar": torch.tensor(3.25),
        "strided": torch.randn(4, 6, generator=g)[:, ::2], "param": torch.nn.Parameter(torch.ones(2)),
        "arr": np.arange(12, dtype=np.uint16).reshape(3, 4), "c64": torch.randn(3, dtype=torch.complex64, generator=g),
    }
    got, _, lay = through_shard(state)
    assert all(e.offset % 64 == 0 for e in lay.entries)
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            assert isinstance(got[k], np.ndarray) and got[k].dtype == v.dtype and np.array_equal(got[k], v)
        else:
            assert same_bits(got[k], v.detach()), k


def test_an_optimizer_restored_through_a_shard_trains_on_bit_identically():
    def make():
        torch.manual_seed(3)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    def train(m, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            loss = m(torch.randn(4, 8, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    m1, o1 = make()
    train(m1, o1, 3, seed=1)
    got, _, _ = through_shard({"model": m1.state_dict(), "optimizer": o1.state_dict()})
    m2, o2 = make()
    m2.load_state_dict(got["model"])
    o2.load_state_dict(got["optimizer"])
    assert train(m1, o1, 2, seed=2).hex() == train(m2, o2, 2, seed=2).hex()
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert same_bits(a, b)


def test_rng_state_restores_every_generator():
    rng = RNGState()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved, _, _ = through_shard(rng.state_dict())
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng.load_state_dict(saved)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


class Sub(torch.Tensor):
    pass


class Phase(enum.IntEnum):
    WARMUP = 1


Point = collections.namedtuple("Point", "epoch batch")


@pytest.mark.parametrize(("state", "match"), [
    ({"s": {1, 2}}, r"/s: cannot snapshot a builtins.set"),
    ({"o": object()}, "cannot snapshot a builtins.object"),
    ({"a": [np.array([object()])]}, "/a/0: NumPy arrays of objects are not supported"),
    ({"t": torch.zeros(2).as_subclass(Sub)}, "Sub is not a plain tensor"),
    ({"t": torch.zeros(2, 2).to_sparse()}, "sparse and quantized tensors are not supported"),
    # subclasses would come back as their base type: a loop would fail only after a crash and a restore
    ({"counts": collections.defaultdict(int)}, r"/counts: a collections.defaultdict would come back as a plain dict"),
    ({"pos": Point(3, 17)}, r"/pos: a tests?.*Point would come back as a plain tuple"),
    ({"phase": Phase.WARMUP}, r"/phase: a .*Phase would come back as a plain int \(what it adds, such as a default"
                              r" factory, named fields or an enum's name, is not stored\)"),
    ({"shape": torch.Size([2, 3])}, r"/shape: a torch.Size would come back as a plain tuple"),
    ({Phase.WARMUP: 1}, r"/<key>: a .*Phase would come back as a plain int"),
    ({"t": torch.zeros(2, 2).to_sparse_csr()}, r"/t: sparse and quantized tensors are not supported \(this one:"
                                               r" torch.sparse_csr\)"),
    ({"t": torch.zeros(2, 2).to_mkldnn()}, r"not supported \(this one: torch._mkldnn\)"),
])
def test_flatten_refuses_what_it_cannot_store_exactly(state, match):
    with pytest.raises(LayoutError, match=match):
        flatten(state)


def test_non_tensor_state_too_large_for_the_seal_message_is_refused_when_it_is_packed():
    # snapshot() packs it before it returns: the error comes there, not from the daemon after the whole copy
    with pytest.raises(LayoutError, match=r"over the 8388608-byte limit: it travels in a message to the daemon"):
        pack_tree(flatten({"sampler": b"\1" * (9 << 20)})[1])
    # one sealed before that limit (a step on disk) is still read back
    assert unpack_tree(msgpack.packb({"sampler": b"\1" * (9 << 20)}, use_bin_type=True))["sampler"] == b"\1" * (9 << 20)


def test_an_ordered_dict_as_state_dict_returns_it_comes_back_as_a_dict_that_load_state_dict_takes():
    model = torch.nn.Linear(3, 2)
    got, _, _ = through_shard({"m": model.state_dict()})
    assert type(got["m"]) is dict and list(got["m"]) == ["weight", "bias"]
    torch.nn.Linear(3, 2).load_state_dict(got["m"])


def test_dict_state_updates_the_callers_dict_in_place():
    loop = {"step": 3, "epoch": 1}
    st = as_stateful(loop, "extra")
    saved = st.state_dict()
    loop["step"] = 99
    loop["new"] = True
    st.load_state_dict(saved)
    assert loop == {"step": 3, "epoch": 1}
    assert isinstance(st, DictState)
    with pytest.raises(SnapGuardError, match="extra: list is neither Stateful"):
        as_stateful([1], "extra")


def test_check_compatible_names_the_first_mismatch():
    shard, _ = flatten({"w": torch.zeros(2, 3), "exp_avg": torch.zeros(2, 3)})
    entries = plan_layout(tensor_spec(n, t) for n, t in shard).entries
    check_compatible(list(entries), flatten({"w": torch.ones(2, 3)})[0])  # a fresh optimizer lacks its moments: fine
    with pytest.raises(LayoutError, match=r"tensor '/w': the snapshot has float32\[2, 3\], the model expects float32\[3, 2\]"):
        check_compatible(list(entries), flatten({"w": torch.ones(3, 2)})[0])
    with pytest.raises(LayoutError, match=r"the snapshot has float32\[2, 3\], the model expects float16\[2, 3\]"):
        check_compatible(list(entries), flatten({"w": torch.ones(2, 3, dtype=torch.float16)})[0])
    with pytest.raises(LayoutError, match=r"tensor '/bias': the model has float32\[3\], the snapshot has no such tensor"):
        check_compatible(list(entries), flatten({"w": torch.ones(2, 3), "bias": torch.ones(3)})[0])


@pytest.mark.parametrize(("state", "first", "second", "name"), [
    ({"x": {1: torch.ones(1), "1": torch.zeros(1)}}, "['x'][1]", "['x']['1']", "/x/1"),
    ({"x": {"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}}}, "['x']['a/b']", "['x']['a']['b']", "/x/a/b"),
    ({"x": {0: np.ones(1), "0": torch.zeros(1)}}, "['x'][0]", "['x']['0']", "/x/0"),
], ids=["int-and-str-key", "slash-in-a-key", "array-and-tensor"])
def test_tensors_whose_names_would_collide_are_refused_naming_both_keys(state, first, second, name):
    # Restore finds a tensor by its name: two with one name would both get the same bytes back.
    with pytest.raises(LayoutError) as e:
        flatten(state)
    assert f"the tensors at {first} and {second} would both be named {name!r}" in str(e.value)


def test_zero_dimensional_arrays_and_numpy_scalars_keep_shape_dtype_and_type():
    state = {"a0": np.array(7.25), "i0": np.array(-3, dtype=np.int16), "f64": np.float64(0.1), "s": np.str_("ab"),
             "s0": np.str_(""), "b0": np.bytes_(b""), "b": np.bytes_(b"\x00x"), "f32": np.float32(1.5)}
    got, tensors, _ = through_shard(state)
    assert [n for n, _ in tensors] == ["/a0", "/i0"]
    for k in ("a0", "i0"):
        assert got[k].shape == () and got[k].dtype == state[k].dtype and got[k].tobytes() == state[k].tobytes(), k
    for k in ("f64", "s", "s0", "b0", "b", "f32"):
        assert type(got[k]) is type(state[k]) and got[k] == state[k], k


def test_arrays_torch_cannot_hold_are_a_layout_error():
    with pytest.raises(LayoutError, match=r"/a: a NumPy array of dtype >f4 cannot be stored exactly"):
        flatten({"a": np.arange(3, dtype=">f4")})
