"""Turn Stateful objects into (tensors, tree) and back.

Everything snapguard saves follows one contract, `Stateful`: `state_dict()` and
`load_state_dict(sd)`. A state dict is split into the tensors it holds (copied byte for byte into
the shard) and a msgpack tree of everything else, in which containers carry a tag so that tuples
stay tuples and integer keys stay integers. Objects of any other type are refused by name: a
snapshot never pickles.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Protocol, runtime_checkable

import msgpack
import numpy as np
import torch

from snapguard.errors import LayoutError, SnapGuardError
from snapguard.layout import TensorEntry

TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "complex128",
                 "complex64", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool")
    if hasattr(torch, name)
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
_MAX_TREE_BYTES = 8 << 20  # it travels in the Seal message, whose header may hold 16 MiB (protocol.MAX_HEADER_BYTES)
_MAX_TREE_READ = 16 << 20  # what a seal could carry before that limit: a step persisted then is read back


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class DictState:
    """Adapts a plain dict (loop counters, sampler position) to Stateful; restore updates it in place."""

    def __init__(self, d: dict):
        self.d = d

    def state_dict(self) -> dict:
        return dict(self.d)

    def load_state_dict(self, sd: dict) -> None:
        self.d.clear()
        self.d.update(sd)


class RNGState:
    """Every RNG a training loop relies on: Python's, NumPy's global one, torch's CPU one and each CUDA device's."""

    def state_dict(self) -> dict:
        sd = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["cuda"] = torch.cuda.get_rng_state_all()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        random.setstate(sd["python"])
        np.random.set_state(sd["numpy"])
        torch.set_rng_state(sd["torch"])
        if "cuda" in sd:
            if not torch.cuda.is_available() or torch.cuda.device_count() < len(sd["cuda"]):
                raise SnapGuardError(f"the snapshot holds RNG states of {len(sd['cuda'])} CUDA devices, this process sees"
                                     f" {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
            torch.cuda.set_rng_state_all(sd["cuda"])


def as_stateful(obj: Any, name: str) -> Stateful:
    if isinstance(obj, dict):
        return DictState(obj)
    if isinstance(obj, Stateful):
        return obj
    raise SnapGuardError(f"{name}: {type(obj).__name__} is neither Stateful (state_dict/load_state_dict) nor a dict")


def flatten(tree: Any, path: str = "") -> tuple[list[tuple[str, torch.Tensor]], Any]:
    """Split a state into its tensors (with path names) and a msgpack-able tagged tree.

    A tensor's name is its path of keys joined with '/'. Restore finds tensors by name, so two tensors
    whose keys print alike ({1: a, "1": b}, or {"a/b": x, "a": {"b": y}}) are refused, never mixed up."""
    tensors: list[tuple[str, torch.Tensor]] = []
    keys_of: dict[str, tuple] = {}  # tensor name -> the keys that lead to it

    def add(where: str, keys: tuple, t: torch.Tensor) -> int:
        if where in keys_of:
            raise LayoutError(f"the tensors at {_describe(keys_of[where])} and {_describe(keys)} would both be named"
                              f" {where!r} (a name joins the keys with '/'): rename one of these keys")
        keys_of[where] = keys
        tensors.append((where, t))
        return len(tensors) - 1

    def enc(node: Any, where: str, keys: tuple) -> Any:
        if isinstance(node, torch.Tensor):
            if type(node) is not torch.Tensor and not isinstance(node, torch.nn.Parameter):
                raise LayoutError(f"{where}: {type(node).__name__} is not a plain tensor; an integration must turn it into"
                                  " its local shard first")
            if node.layout != torch.strided or node.is_quantized:  # sparse (COO, CSR, BSR...), mkldnn
                raise LayoutError(f"{where}: sparse and quantized tensors are not supported (this one: {node.layout}"
                                  f"{', quantized' if node.layout == torch.strided else ''})")
            if node.dtype not in DTYPE_NAMES:
                raise LayoutError(f"{where}: dtype {node.dtype} is not supported")
            return ["T", add(where, keys, node)]
        if isinstance(node, np.generic):  # first: np.float64, np.str_ and np.bytes_ subclass float, str and bytes
            return ["g", node.dtype.str, node.tobytes()]
        if node is None or type(node) in (bool, str, bytes, float):
            return node
        if type(node) is int:
            return node if -(1 << 63) <= node < (1 << 64) else ["I", str(node)]
        if isinstance(node, np.ndarray):
            if node.dtype == object:
                raise LayoutError(f"{where}: NumPy arrays of objects are not supported")
            # A Fortran-ordered array (column-major, as from np.asfortranarray, .T, or Fortran-backed libraries) is
            # stored as its transpose, which is C-ordered, and comes back transposed again: Fortran-ordered.
            fortran = node.ndim > 1 and node.flags.f_contiguous and not node.flags.c_contiguous
            try:
                # a copy (the background copy must not see later writes); not np.ascontiguousarray: it makes a 0-d
                # array 1-d
                t = torch.from_numpy((node.T if fortran else node).copy(order="C"))
            except (TypeError, ValueError) as e:  # a dtype torch lacks (strings, dates), or a non-native byte order
                why = f"{where}: a NumPy array of dtype {node.dtype.str} cannot be stored exactly: {e}"
                raise LayoutError(why) from None
            return ["N", add(where, keys, t), "F"] if fortran else ["N", add(where, keys, t)]
        if isinstance(node, torch.dtype):
            return ["D", DTYPE_NAMES.get(node) or str(node)]
        if isinstance(node, torch.device):
            return ["V", str(node)]
        if type(node) in (dict, collections.OrderedDict):  # a state_dict() is an OrderedDict, loaded as well from a dict
            return ["d", [[enc(k, f"{where}/<key>", (*keys, "<key>")), enc(v, f"{where}/{k}", (*keys, k))]
                          for k, v in node.items()]]
        if type(node) in (list, tuple):
            items = [enc(v, f"{where}/{i}", (*keys, i)) for i, v in enumerate(node)]
            return ["t" if type(node) is tuple else "l", items]
        base = next((b for b in (dict, list, tuple, int, float, str, bytes) if isinstance(node, b)), None)
        if base is not None:  # it would come back as its base type, and code that uses what it adds would fail then
            raise LayoutError(f"{where or '/'}: a {type(node).__module__}.{type(node).__qualname__} would come back as a"
                              f" plain {base.__name__} (what it adds, such as a default factory, named fields or an"
                              f" enum's name, is not stored): snapshot a plain {base.__name__} instead")
        raise LayoutError(f"{where or '/'}: cannot snapshot a {type(node).__module__}.{type(node).__name__};"
                          " state must be tensors, arrays, numbers, strings, bytes and containers of them")

    return tensors, enc(tree, path, ())


def _describe(keys: tuple) -> str:
    return "".join(f"[{k!r}]" for k in keys) or "the root"


def unflatten(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of flatten: rebuild the state with `tensors` in place of the references."""

    def dec(node: Any) -> Any:
        if not isinstance(node, list):
            return node
        tag, val = node[0], node[1:]
        if tag == "T":
            return tensors[val[0]]
        if tag == "N":
            a = tensors[val[0]].numpy()
            return a.T if val[1:] == ["F"] else a
        if tag == "I":
            return int(val[0])
        if tag == "g":
            dt = np.dtype(val[0])
            return dt.type() if dt.itemsize == 0 else np.frombuffer(val[1], dtype=dt)[0]  # np.str_("") has none
        if tag == "D":
            return TORCH_DTYPES.get(val[0]) or getattr(torch, val[0].removeprefix("torch."))
        if tag == "V":
            return torch.device(val[0])
        if tag == "d":
            return {_hashable(dec(k)): dec(v) for k, v in val[0]}
        if tag == "l":
            return [dec(v) for v in val[0]]
        if tag == "t":
            return tuple(dec(v) for v in val[0])
        raise LayoutError(f"state tree has an unknown tag {tag!r}")

    return dec(tree)


def arrays_in(tree: Any) -> dict[int, bool]:
    """The NumPy arrays of a flattened state: tensor index -> stored transposed (the array was Fortran-ordered)."""
    out: dict[int, bool] = {}

    def walk(node: Any) -> None:
        if not isinstance(node, list):
            return
        tag, val = node[0], node[1:]
        if tag == "N":
            out[val[0]] = val[1:] == ["F"]
        elif tag == "d":
            for k, v in val[0]:
                walk(k)
                walk(v)
        elif tag in ("l", "t"):
            for v in val[0]:
                walk(v)

    walk(tree)
    return out


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def pack_tree(tree: Any) -> bytes:
    data = msgpack.packb(tree, use_bin_type=True)
    if len(data) > _MAX_TREE_BYTES:
        raise LayoutError(f"the non-tensor state packs to {len(data)} bytes, over the {_MAX_TREE_BYTES}-byte limit: it"
                          " travels in a message to the daemon; keep large data in tensors or NumPy arrays, which go"
                          " into the shared-memory slot")
    return data


def unpack_tree(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=_MAX_TREE_READ,
                           max_str_len=_MAX_TREE_READ, max_array_len=1 << 24, max_map_len=1 << 24)


def tensor_spec(name: str, t: torch.Tensor) -> tuple[str, str, list[int]]:
    return name, DTYPE_NAMES[t.dtype], list(t.shape)


def check_compatible(entries: list[TensorEntry], current: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse to restore a shard into a state whose tensors differ; name the first mismatch.

    Tensors present in the shard but not in the live state (optimizer moments of a fresh optimizer)
    are fine: load_state_dict creates them. A live tensor the shard lacks, or one whose dtype or
    shape differs, is an error.
    """
    saved = {e.name: e for e in entries}
    for name, t in current:
        e = saved.get(name)
        want = f"{DTYPE_NAMES.get(t.dtype, t.dtype)}{list(t.shape)}"
        if e is None:
            raise LayoutError(f"tensor {name!r}: the model has {want}, the snapshot has no such tensor")
        if e.dtype != DTYPE_NAMES.get(t.dtype) or list(e.shape) != list(t.shape):
            raise LayoutError(f"tensor {name!r}: the snapshot has {e.describe()}, the model expects {want}")
