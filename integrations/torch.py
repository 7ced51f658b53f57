"""snapguard for plain PyTorch: DistributedDataParallel and FSDP2 (`fully_shard`).

    from snapguard.integrations.torch import protect
    guard = protect(model, optimizer)            # after the model is wrapped and the optimizer built
    restored = guard.restore()                   # the step of the snapshot loaded, or None
    for step in range(0 if restored is None else restored + 1, steps):
        loss = model(batch(step)).sum(); loss.backward(); optimizer.step(); optimizer.zero_grad()
        guard.snapshot(step)                     # returns at once; the copy overlaps the next step

State goes through `torch.distributed.checkpoint.state_dict` (`get_model_state_dict`,
`get_optimizer_state_dict` and their `set_` twins) with `full_state_dict=False`, so every name is
the parameter's fully qualified name whatever wraps the model (DDP's `module.` prefix is gone), and
FSDP2's sharded DTensors stay sharded: each rank snapshots the local shard of every parameter and of
every optimizer moment, never gathering anything. On restore the local shards are rebuilt into
DTensors on the live model's device mesh with its placements, and a snapshot whose placements or
shapes differ from the model's is refused with the name of the first tensor that differs.

`optimizer.step()` waits (in a step pre-hook) only while the previous snapshot is still being
copied out of the parameters and optimizer state it is about to change.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, _get_fqns, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from snapguard.errors import ConfigError, LayoutError
from snapguard.integrations._common import AdapterGuard, add_user_states, optimizer_tensors

__all__ = ["protect", "ModelState", "OptimizerState"]


def _options(strict: bool = True) -> StateDictOptions:
    return StateDictOptions(full_state_dict=False, cpu_offload=False, strict=strict)


def _describe(t: DTensor) -> str:
    return f"{list(t.shape)} as {_placements(t)} over mesh {t.device_mesh.mesh.tolist()}"


def _placements(t: DTensor) -> str:
    return "(" + ", ".join(str(p) for p in t.placements) + ")"


def _local(sd: dict, where: str, dtensors: dict[str, list]) -> dict:
    """A copy of a (nested) state dict with every DTensor replaced by its local shard; `dtensors` records them."""
    out = {}
    for k, v in sd.items():
        path = f"{where}/{k}" if where else str(k)
        if isinstance(v, DTensor):
            with torch.no_grad():
                out[k] = v.to_local()
            dtensors[path] = [_placements(v), list(v.shape), v.device_mesh.mesh.tolist()]
        elif isinstance(v, dict):
            out[k] = _local(v, path, dtensors)
        else:
            out[k] = v
    return out


def _as_dtensor(local: torch.Tensor, template: DTensor, saved: list, name: str) -> DTensor:
    """Rebuild a DTensor from its local shard on the live template's mesh, after checking that they agree."""
    placements, shape, mesh = saved
    live = [_placements(template), list(template.shape), template.device_mesh.mesh.tolist()]
    if live != [placements, shape, mesh]:
        raise LayoutError(f"tensor {name!r}: the snapshot holds a shard of {shape} as {placements} over mesh {mesh},"
                          f" the model has {_describe(template)}")
    return DTensor.from_local(local.to(template.device), template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())


DTENSORS = "<dtensors>"  # where a state dict keeps its DTensors' placements: no parameter has such a name


class ModelState:
    """A DDP or FSDP2 model's state dict through DCP, with DTensors as their local shards."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        dtensors: dict[str, list] = {}
        sd = _local(get_model_state_dict(self.model, options=_options()), "", dtensors)
        sd[DTENSORS] = dtensors
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        live = get_model_state_dict(self.model, options=_options())
        tensors = dict(sd)
        dtensors = tensors.pop(DTENSORS, {})
        for name, value in tensors.items():
            saved, template = dtensors.get(name), live.get(name)
            if isinstance(template, DTensor) != (saved is not None):
                raise LayoutError(f"tensor 'model/{name}': the snapshot holds "
                                  + (f"a shard of {saved[1]} as {saved[0]}" if saved else "a plain tensor")
                                  + ", the model has " + (_describe(template) if isinstance(template, DTensor)
                                                          else "a plain tensor"))
            if saved is not None:
                tensors[name] = _as_dtensor(value, template, saved, f"model/{name}")
        set_model_state_dict(self.model, tensors, options=_options())


class OptimizerState:
    """An optimizer's state dict through DCP: keyed by parameter names, moments of sharded parameters as local
    shards. Without per-parameter state (SGD without momentum, or no step yet), its param_groups alone."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, name: str = "optimizer"):
        self.model, self.optimizer, self.name = model, optimizer, name

    def _fqns(self) -> list[str]:
        """The name DCP gives each of the optimizer's parameters, in the optimizer's order."""
        # DCP's own naming (no DDP `module.` prefix, no compile or checkpoint-wrapper prefixes), so that both
        # routes below key param_groups alike.
        fqn = {p: next(iter(_get_fqns(self.model, n))) for n, p in self.model.named_parameters()}
        try:
            return [fqn[p] for g in self.optimizer.param_groups for p in g["params"]]
        except KeyError:
            raise ConfigError(f"{self.name} holds a parameter that is not the model's") from None

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizer.state:
            # No per-parameter state (an optimizer that has not stepped yet, or one that keeps none, like SGD
            # without momentum): only param_groups, which carry the lr a scheduler set. Not through DCP, which
            # would first run step() with zero gradients and lr 0 to create the state, counting a step (Adam's
            # bias correction) the training never took.
            names = self._fqns()
            groups = self.optimizer.state_dict()["param_groups"]
            return {"state": {}, "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in groups],
                    DTENSORS: {}}
        dtensors: dict[str, list] = {}
        sd = _local(get_optimizer_state_dict(self.model, self.optimizer, options=_options()), "", dtensors)
        sd[DTENSORS] = dtensors
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        missing = [k for k in ("state", "param_groups", DTENSORS) if k not in sd]
        if missing:
            raise LayoutError(f"{self.name}: the snapshot holds no {missing[0]!r} for this optimizer")
        if not sd["state"]:
            self._load_param_groups(sd["param_groups"])
            return
        dtensors = sd[DTENSORS]
        params = get_model_state_dict(self.model, options=_options())
        state = {}
        for fqn, st in sd["state"].items():
            state[fqn] = dict(st)
            for key, value in st.items():
                saved = dtensors.get(f"state/{fqn}/{key}")
                if saved is None:
                    continue
                template = params.get(fqn)
                name = f"{self.name}/state/{fqn}/{key}"
                if not isinstance(template, DTensor):
                    raise LayoutError(f"tensor {name!r}: the snapshot holds a shard of {saved[1]} as {saved[0]},"
                                      f" the model's parameter {fqn!r} is not sharded")
                state[fqn][key] = _as_dtensor(value, template, saved, name)
        # Not strict: a parameter that has had no gradient yet (a head used later, an expert never routed to) has
        # no optimizer state, in the snapshot as in the optimizer that took it. The live state was checked against
        # the snapshot's tensors before this (`check_compatible`).
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": sd["param_groups"]},
                                 options=_options(strict=False))

    def _load_param_groups(self, groups: list[dict]) -> None:
        """Load a snapshot without per-parameter state: its param_groups, and no state (as it held none)."""
        # torch's own load_state_dict, not DCP's, whose initialising step() on a fresh optimizer is not needed here.
        names = self._fqns()
        live, at = [], 0
        for g in self.optimizer.param_groups:
            live.append(names[at:at + len(g["params"])])
            at += len(g["params"])
        saved = [list(g["params"]) for g in groups]
        if len(saved) != len(live):
            raise LayoutError(f"{self.name}: the snapshot has {len(saved)} param_groups, this optimizer {len(live)}")
        for i, (had, has) in enumerate(zip(saved, live)):
            if had != has:
                raise LayoutError(f"{self.name}: param_groups[{i}] holds parameters {had} in the snapshot, {has} in"
                                  " this optimizer")
        index = {n: i for i, n in enumerate(names)}
        self.optimizer.load_state_dict({"state": {},
                                        "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in groups]})


def _local_tensors(optimizer: torch.optim.Optimizer):
    for t in optimizer_tensors(optimizer):
        yield t.to_local() if isinstance(t, DTensor) else t


def _layout(model: torch.nn.Module) -> str:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    for p in model.parameters():
        if isinstance(p, DTensor):
            return f"rank {rank} of {world}, parameters sharded as {_placements(p)} over mesh {p.device_mesh.mesh.tolist()}"
    return f"rank {rank} of {world}, parameters not sharded ({type(model).__name__})"


def protect(model: torch.nn.Module, optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer], *,
            extra: Any = None, states: dict[str, Any] | None = None, **guard_options: Any) -> AdapterGuard:
    """Protect a DDP, FSDP2 (or unwrapped) model and its optimizer(s). Called on every rank, after
    torch.distributed is initialised and the model is wrapped.

    `extra`: a dict of loop state (restored in place) or any Stateful; `states`: more named Statefuls. An lr
    scheduler or an AMP GradScaler is not found from the model and optimizer: pass it here (e.g.
    `states={"scheduler": scheduler, "scaler": scaler}`), or a resumed run follows another schedule or loss scale.
    `guard_options` go to snapguard.Guard (job=, node=, run_dir=, start_daemon=, timeout_s=, rng=, config=).
    Returns the Guard: `snapshot(step)` after each optimizer step, `restore()` before training, `close()`.
    """
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for o in optimizers:
        if not isinstance(o, torch.optim.Optimizer):
            raise ConfigError(f"protect() needs torch.optim.Optimizer instances, got {type(o).__name__}")
    named: dict[str, Any] = {"model": ModelState(model)}
    for i, o in enumerate(optimizers):
        name = "optimizer" if len(optimizers) == 1 else f"optimizer{i}"
        named[name] = OptimizerState(model, o, name)
    add_user_states(named, extra, states)

    def guarded():
        for o in optimizers:
            yield from _local_tensors(o)

    guard = AdapterGuard(states=named, guarded=guarded, layout=lambda: _layout(model), **guard_options)
    for o in optimizers:
        guard.gate_optimizer(o)
    return guard
