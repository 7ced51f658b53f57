"""snapguard for Megatron-Core: each rank's tensor/pipeline-parallel shard, its optimizer state and every RNG.

A Megatron-LM-style loop takes two calls: a restore where it would load a checkpoint, and a
snapshot after each optimizer step.

    from snapguard.integrations.megatron import protect
    guard = protect(model, optimizer, opt_param_scheduler=scheduler)
    iteration = guard.restore()                      # 0 on a fresh start, like load_checkpoint
    consumed = guard.counters.get("consumed_train_samples", 0)
    while iteration < train_iters:
        train_step(...)                              # forward, backward, optimizer.step(), scheduler.step()
        iteration += 1
        consumed += global_batch_size
        guard.snapshot(iteration, consumed_train_samples=consumed)   # returns at once

What each rank snapshots, all local, nothing gathered:
- `model`: the rank's shard of every model chunk (`state_dict()` of the unwrapped modules: DDP and
  Float16Module wrappers are looked through; with virtual pipeline stages, `model0`, `model1`, ...).
- `optimizer`: a torch optimizer over the model (keyed by parameter names), or a Megatron optimizer
  (`get_megatron_optimizer`: FP32Optimizer, Float16OptimizerWithFloat16Params, DistributedOptimizer,
  ChainedOptimizer): its inner torch optimizer's state, the fp32 main parameters (for the distributed
  optimizer this rank's shard of them) and the grad scaler.
- `scheduler`: the OptimizerParamScheduler, when given.
- `megatron_rng`: the states of `tensor_parallel.get_cuda_rng_tracker()` (data-, tensor- and
  expert-parallel dropout streams); snapguard's Guard adds the Python, NumPy, torch and CUDA RNGs.
- `counters`: the iteration and any counters passed to `snapshot()` (consumed samples, FLOPs).
- `parallel`: this rank's coordinates (tensor, pipeline, data, context, expert parallel rank and
  size). A restore into another layout is refused: a tensor whose shape differs is named with
  both shapes; a layout whose shapes happen to agree is named by its coordinates.

The optimizer's step waits, in a step pre-hook on the inner torch optimizer(s), only while the
previous snapshot is still being copied out of the tensors that step changes.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from snapguard.errors import ConfigError, LayoutError
from snapguard.integrations._common import (AdapterGuard, NamedOptimizerState, add_user_states, optimizer_tensors,
                                               require)

require("megatron.core", "megatron-core", "megatron")
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.utils import unwrap_model  # noqa: E402

__all__ = ["protect", "MegatronGuard"]


# ---- model -------------------------------------------------------------------------------------------

def _chunks(model: Any) -> list[torch.nn.Module]:
    chunks = unwrap_model(list(model) if isinstance(model, (list, tuple)) else [model])
    for c in chunks:
        if not isinstance(c, torch.nn.Module):
            raise ConfigError(f"protect() needs Megatron model modules, got {type(c).__name__}")
    return chunks


def _param_names(chunks: list[torch.nn.Module]) -> dict[torch.Tensor, str]:
    names = {}
    for i, c in enumerate(chunks):
        prefix = f"model{i}." if len(chunks) > 1 else ""
        for n, p in c.named_parameters():
            names.setdefault(p, prefix + n)
    return names


class ModelState:
    """The rank's shard of every model chunk. Transformer Engine's `_extra_state` (a BytesIO) travels as bytes."""

    def __init__(self, chunks: list[torch.nn.Module]):
        self.chunks = chunks

    @staticmethod
    def _plain(sd: dict) -> dict:
        return {k: (v.getvalue() if isinstance(v, io.BytesIO) else v) for k, v in sd.items()}

    def state_dict(self) -> dict[str, Any]:
        if len(self.chunks) == 1:
            return self._plain(self.chunks[0].state_dict())
        return {f"model{i}": self._plain(c.state_dict()) for i, c in enumerate(self.chunks)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        parts = [sd] if len(self.chunks) == 1 else [sd[f"model{i}"] for i in range(len(self.chunks))]
        for chunk, part in zip(self.chunks, parts):
            chunk.load_state_dict({k: (io.BytesIO(v) if isinstance(v, bytes) and k.endswith("_extra_state") else v)
                                   for k, v in part.items()})


# ---- optimizer ---------------------------------------------------------------------------------------

def _inner_optimizers(optimizer: Any) -> list[Any]:
    """The Megatron optimizers a (possibly chained) Megatron optimizer is made of."""
    if hasattr(optimizer, "chained_optimizers"):
        return [o for sub in optimizer.chained_optimizers for o in _inner_optimizers(sub)]
    return [optimizer]


class MegatronOptimizerState:
    """The local state of a Megatron optimizer: per inner optimizer, its torch optimizer's state keyed
    by model parameter names, its fp32 main parameters (this rank's shard with the distributed
    optimizer) and its grad scaler. A stub part (no parameters of it on this rank, e.g. the expert
    optimizer of a pipeline stage without expert layers) keeps only its grad scaler."""

    def __init__(self, optimizer: Any, names: dict[torch.Tensor, str]):
        self.parts = []
        model_params = {id(p) for p in names}
        for i, opt in enumerate(_inner_optimizers(optimizer)):
            inner = getattr(opt, "optimizer", None)
            if inner is None and getattr(opt, "is_stub_optimizer", False):
                self.parts.append((opt, None, None, {}))
                continue
            if not isinstance(inner, torch.optim.Optimizer):
                raise ConfigError(f"optimizer part {i} ({type(opt).__name__}) has no inner torch optimizer")
            main_names = dict(names)
            for p, n in names.items():  # Float16 and distributed optimizers hang the fp32 copy on the model param
                main = getattr(p, "main_param", None)
                if isinstance(main, torch.Tensor):
                    main_names[main] = n
            named = NamedOptimizerState(inner, main_names)
            mains = {}
            for k, p in zip(named._index_names(), (p for g in inner.param_groups for p in g["params"])):
                if id(p) not in model_params:
                    mains[k] = p
            self.parts.append((opt, inner, named, mains))

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [inner for _, inner, _, _ in self.parts if inner is not None]

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for i, (opt, _, named, mains) in enumerate(self.parts):
            part = {"stub": True} if named is None else {"optimizer": named.state_dict(), "main_params": dict(mains)}
            scaler = getattr(opt, "grad_scaler", None)
            if scaler is not None:
                part["grad_scaler"] = scaler.state_dict()
            out[str(i)] = part
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sorted(sd) != sorted(str(i) for i in range(len(self.parts))):
            raise LayoutError(f"optimizer: the snapshot holds {len(sd)} optimizer part(s), this optimizer has"
                              f" {len(self.parts)}")
        for i, (opt, _, named, mains) in enumerate(self.parts):  # check every part before changing any
            part = sd[str(i)]
            if ("stub" in part) != (named is None):
                raise LayoutError(f"optimizer part {i} ({type(opt).__name__}): " + (
                    "when the snapshot was taken this rank held no parameters of it (a stub optimizer); now it"
                    " holds some" if "stub" in part else "when the snapshot was taken this rank held parameters of"
                    " it; now it is a stub optimizer without any"))
            # A grad scaler on one side only would resume with another loss scale, or none.
            scaler = getattr(opt, "grad_scaler", None)
            if (scaler is None) != ("grad_scaler" not in part):
                raise LayoutError(f"optimizer part {i} ({type(opt).__name__}): "
                                  + ("the snapshot holds a grad scaler's state, this optimizer has no grad scaler"
                                     if scaler is None else "the snapshot holds no grad scaler state, this optimizer"
                                     f" has a {type(scaler).__name__}"))
            differ = sorted(set(part.get("main_params", {})) ^ set(mains))  # a stub's: none
            if differ:
                raise LayoutError(f"optimizer part {i}: fp32 main parameter {differ[0]!r} is in "
                                  + ("the snapshot, not in this optimizer" if differ[0] in part["main_params"]
                                     else "this optimizer, not in the snapshot"))
        for i, (opt, _, named, mains) in enumerate(self.parts):
            part = sd[str(i)]
            if named is not None:
                named.load_state_dict(part["optimizer"])
            with torch.no_grad():
                for k, p in mains.items():
                    p.copy_(part["main_params"][k])
            if "grad_scaler" in part:
                opt.grad_scaler.load_state_dict(part["grad_scaler"])


# ---- RNG and layout ---------------------------------------------------------------------------------

class TrackerRNGState:
    """The named RNG states of Megatron's `get_cuda_rng_tracker()` (data-, tensor-, expert-parallel)."""

    def state_dict(self) -> dict[str, Any]:
        tracker = tensor_parallel.get_cuda_rng_tracker()
        return {name: tensor_parallel.random.convert_cuda_rng_state(s, to_graphable=False)
                for name, s in tracker.get_states().items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        tracker = tensor_parallel.get_cuda_rng_tracker()
        graphable = getattr(tracker, "use_cudagraphable_rng", False)
        tracker.set_states({name: (tensor_parallel.random.convert_cuda_rng_state(s, to_graphable=True) if graphable
                                   else s.clone()) for name, s in sd.items()})


_AXES = (("tensor", "tensor_model_parallel"), ("pipeline", "pipeline_model_parallel"), ("data", "data_parallel"),
         ("context", "context_parallel"), ("expert", "expert_model_parallel"))


def parallel_layout() -> dict[str, list[int]]:
    """This rank's [rank, size] on each parallel axis Megatron was initialised with."""
    if not parallel_state.model_parallel_is_initialized():
        return {}
    out = {}
    for axis, fn in _AXES:
        get_rank = getattr(parallel_state, f"get_{fn}_rank", None)
        get_size = getattr(parallel_state, f"get_{fn}_world_size", None)
        if get_rank is not None and get_size is not None:
            out[axis] = [int(get_rank()), int(get_size())]
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    out["virtual_pipeline"] = [0, int(vpp or 1)]
    return out


def describe_layout(layout: dict[str, list[int]]) -> str:
    if not layout:
        return "Megatron parallel state not initialised"
    return ", ".join(f"{axis}-parallel rank {r} of {n}" for axis, (r, n) in layout.items()
                     if axis != "virtual_pipeline") + f", {layout['virtual_pipeline'][1]} virtual pipeline stage(s)"


class LayoutState:
    def state_dict(self) -> dict[str, Any]:
        return parallel_layout()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        live = parallel_layout()
        if sd != live:
            raise LayoutError(f"parallel layout: the snapshot was taken at {describe_layout(sd)}; this process is at"
                              f" {describe_layout(live)}")


# ---- the guard ---------------------------------------------------------------------------------------

class MegatronGuard(AdapterGuard):
    """A Guard for a Megatron-LM-style loop: `restore()` returns the iteration (0 on a fresh start),
    `snapshot(iteration, **counters)` keeps counters such as consumed_train_samples in `guard.counters`."""

    counters: dict[str, Any]

    def snapshot(self, iteration: int, **counters: Any) -> None:  # type: ignore[override]
        """Start a snapshot of the state after `iteration` iterations; returns at once. Called on every rank."""
        before = dict(self.counters)
        self.counters.update(counters)
        self.counters["iteration"] = iteration
        try:
            super().snapshot(iteration)
        except BaseException:  # refused (an iteration not newer than the last, say): the counters stay as they were
            self.counters.clear()
            self.counters.update(before)
            raise

    def restore(self) -> int:  # type: ignore[override]
        """Restore the newest iteration every rank holds and return it; 0 (and nothing changed) on a fresh start.
        Called on every rank, where a Megatron-LM loop would call load_checkpoint."""
        step = super().restore()
        return 0 if step is None else step


def protect(model: Any, optimizer: Any, *, opt_param_scheduler: Any = None, extra: Any = None,
            states: dict[str, Any] | None = None, **guard_options: Any) -> MegatronGuard:
    """Protect a Megatron-Core model (a module or a list of model chunks) and its optimizer. Called on
    every rank after `initialize_model_parallel` and `model_parallel_cuda_manual_seed`.

    `optimizer`: a torch.optim.Optimizer over the model, or what `get_megatron_optimizer` returns.
    `opt_param_scheduler`: Megatron-LM's OptimizerParamScheduler (anything Stateful).
    `extra`: a dict of loop state (restored in place) or any Stateful; `states`: more named Statefuls.
    `guard_options` go to snapguard.Guard (job=, node=, run_dir=, start_daemon=, timeout_s=, rng=, config=).
    """
    chunks = _chunks(model)
    names = _param_names(chunks)
    if isinstance(optimizer, torch.optim.Optimizer):
        opt_state: Any = NamedOptimizerState(optimizer, names)
        torch_optimizers = [optimizer]
    else:
        for opt in _inner_optimizers(optimizer):
            ddp = getattr(opt, "ddp_config", None)
            if ddp is not None and getattr(ddp, "overlap_param_gather", False):
                raise ConfigError("snapguard cannot protect a distributed optimizer with overlap_param_gather=True: the"
                                  " model's parameters are gathered only in the next forward, after the snapshot")
        opt_state = MegatronOptimizerState(optimizer, names)
        torch_optimizers = opt_state.torch_optimizers()
    counters: dict[str, Any] = {}
    named: dict[str, Any] = {"parallel": LayoutState(), "model": ModelState(chunks), "optimizer": opt_state}
    if opt_param_scheduler is not None:
        named["scheduler"] = opt_param_scheduler
    named["megatron_rng"] = TrackerRNGState()
    named["counters"] = counters
    add_user_states(named, extra, states)

    def guarded():
        for o in torch_optimizers:
            yield from optimizer_tensors(o)
        if not isinstance(optimizer, torch.optim.Optimizer):
            # Megatron's optimizers write the model's (bf16) weights from their fp32 main params only after the inner
            # torch optimizer has stepped, so after its step pre-hook waited for the copy: the weights are copied in
            # place too, not cloned on the device at every snapshot (a transient allocation the size of the shard).
            yield from names

    guard = MegatronGuard(states=named, guarded=guarded, layout=lambda: describe_layout(parallel_layout()),
                          **guard_options)
    guard.counters = counters
    for o in torch_optimizers:
        guard.gate_optimizer(o)
    return guard
