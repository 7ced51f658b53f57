"""What every framework adapter shares: the missing-framework error, a Guard that installs its own
hooks, and an optimizer state keyed by parameter names instead of positions."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from snapguard.errors import ConfigError, LayoutError
from snapguard.guard import Guard


def require(module: str, package: str, extra: str) -> Any:
    """Import a framework module, or fail with an ImportError that says which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"snapguard.integrations.{extra} needs {package} ({module} cannot be imported: {e});"
                          f" install it with `pip install snapguard[{extra}]`") from e


def add_user_states(named: dict[str, Any], extra: Any, states: dict[str, Any] | None) -> None:
    """Add the user's `extra` and `states` to an adapter's own named states; a name used twice is an error."""
    if extra is not None:
        named["extra"] = extra
    for k, v in (states or {}).items():
        if k in named:
            raise ConfigError(f"state name {k!r} is used twice")
        named[k] = v


class AdapterGuard(Guard):
    """A Guard built by an integration: it holds the hooks the integration installed in the framework
    (removed again by close()) and adds this process's parallel layout to a restore's layout errors."""

    def __init__(self, *, states: dict[str, Any], guarded: Callable[[], Iterable[torch.Tensor]] | None,
                 layout: Callable[[], str], **options: Any):
        self._undo: list[Callable[[], None]] = []
        self._describe_layout = layout
        super().__init__(states=states, guarded=guarded, **options)

    def gate_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make `optimizer.step()` wait, in a step pre-hook, until the running copy has left the guarded tensors."""
        handle = optimizer.register_step_pre_hook(lambda *_: self.before_update())
        self._undo.append(handle.remove)

    def gate_method(self, obj: Any, name: str) -> None:
        """Make `obj.name(...)` call before_update() first (an attribute on the instance, removed by close()).

        Another Guard may have gated the same method since (a second protect() before this one's close()): its
        wrapper calls this one, so close() then leaves this wrapper in place, passing calls straight through, and
        the later close() removes both."""
        original = getattr(obj, name)
        had_own = name in vars(obj)

        def gated(*args: Any, **kwargs: Any) -> Any:
            if gated.live:
                self.before_update()
            return original(*args, **kwargs)

        gated.live, gated.under = True, (original, had_own)

        def undo() -> None:
            gated.live = False
            if vars(obj).get(name) is not gated:  # a later wrapper calls this one: it stays in the chain
                return
            inner, own = gated.under
            while own and not getattr(inner, "live", True):  # wrappers closed before this one
                inner, own = inner.under
            if own:
                setattr(obj, name, inner)
            else:
                delattr(obj, name)

        setattr(obj, name, gated)
        self._undo.append(undo)

    def restore(self) -> int | None:
        try:
            return super().restore()
        except LayoutError as e:
            raise LayoutError(f"{self.who} cannot restore into this model: {e}. This process: {self._describe_layout()};"
                              " a snapshot restores only into the model, optimizer and parallel layout that took it") from e

    def close(self, shutdown_daemon: bool = False) -> None:
        while self._undo:
            self._undo.pop()()
        super().close(shutdown_daemon)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The parameters of a torch optimizer and the tensors of its state: what only its step() changes."""
    for group in optimizer.param_groups:
        yield from group["params"]
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                yield v


class NamedOptimizerState:
    """A torch optimizer's state_dict with parameters named as the model names them.

    `Optimizer.state_dict()` keys state by position (`state/17/exp_avg`); a snapshot keyed by names
    (`state/decoder.layers.0.mlp.linear_fc1.weight/exp_avg`) makes a restore into a changed model
    name the parameter that differs. Parameters the names do not cover keep their position.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[torch.Tensor, str]):
        self.optimizer = optimizer
        self._names = {id(p): n for p, n in names.items()}

    def _index_names(self) -> list[str]:
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                out.append(self._names.get(id(p), str(len(out))))
        if len(set(out)) != len(out):
            dup = sorted({n for n in out if out.count(n) > 1})
            raise LayoutError(f"the optimizer holds parameters {dup} more than once")
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        names = self._index_names()
        # The per-parameter dicts are the optimizer's own: build new ones, never change them.
        return {"state": {names[i]: dict(st) for i, st in sd["state"].items()},
                "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        index = {n: i for i, n in enumerate(self._index_names())}
        unknown = [n for n in sd["state"] if n not in index]
        if unknown:
            raise LayoutError(f"optimizer state for parameter {unknown[0]!r}: the snapshot has it, this optimizer does not")
        self.optimizer.load_state_dict({
            "state": {index[n]: st for n, st in sd["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in sd["param_groups"]]})


class CountersState:
    """Loop counters (iteration, consumed samples, ...) kept as attributes of a live object."""

    def __init__(self, obj: Any, names: Iterable[str]):
        self.obj, self.names = obj, tuple(names)

    def state_dict(self) -> dict[str, Any]:
        return {n: getattr(self.obj, n) for n in self.names}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        # All or nothing: a counter left at its fresh value would resume the loop at the wrong place.
        missing = [n for n in self.names if n not in sd]
        unexpected = [n for n in sd if n not in self.names]
        if missing or unexpected:
            raise LayoutError(f"counters of {type(self.obj).__name__}: the snapshot "
                              + (f"has no {missing}" if missing else f"has {unexpected}, which this process does not keep"))
        for n in self.names:
            setattr(self.obj, n, sd[n])
