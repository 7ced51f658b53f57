"""snapguard for DeepSpeed: a DeepSpeedEngine with ZeRO stage 0, 1, 2 or 3.

    from snapguard.integrations.deepspeed import protect
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())
    guard = protect(engine, client_state=loop_state)    # after initialize, on every rank
    guard.restore()                                      # before training: engine.global_steps is restored
    for step in range(engine.global_steps, steps):
        loss = engine(batch(step)); engine.backward(loss); engine.step()
        guard.snapshot()                                 # after engine.step(); returns at once

At stages 1 and 2 the engine's optimizer must be DeepSpeed's ZeRO optimizer: an engine that uses another one
(DeepSpeed's `BF16_Optimizer`, which some bf16 configurations select) is refused by protect(), naming it.

With gradient accumulation, call `guard.snapshot()` after every `engine.step()`: it snapshots only
after the steps that updated the weights (when `engine.global_steps` moved), and the loop resumes
from `engine.global_steps` optimizer steps, i.e. `global_steps * gradient_accumulation_steps()`
micro-batches.

What each rank snapshots, all local, nothing gathered:
- `module`: `engine.module.state_dict()` (ZeRO 1 and 2 keep the whole low-precision model on every rank);
  with ZeRO 3, whose parameters are partitioned, the module's buffers only.
- `optimizer`: for ZeRO 1, 2 and 3, the ZeRO optimizer's own state dict for this rank (its partition of
  the fp32 master weights, the base optimizer's state over that partition, the loss scaler), restored
  through DeepSpeed's `load_state_dict([...], load_from_fp32_weights=True)` so that DeepSpeed
  re-links its fragments as after load_checkpoint; with ZeRO 3 that also writes this rank's partition of
  the low-precision parameters from the fp32 one, and gathers the persistent parameters again; for stage
  0 without mixed precision, the torch optimizer's state. With ZeRO-Offload to the CPU
  (`offload_optimizer`, and with ZeRO 3 `offload_param`, `"device": "cpu"`) the same tensors live in CPU
  memory and are snapshotted from there; offloading to NVMe (ZeRO-Infinity) is refused: those partitions
  are on disk, not in memory.
- `engine`: `global_steps`, `global_samples`, `skipped_steps`, `micro_steps`; `lr_scheduler`: the lr
  scheduler, or that there is none (a restore into an engine that differs is refused).
- `grad_scaler`: at stage 0 with `torch_autocast` in fp16, the torch GradScaler the engine steps through (its
  loss scale and growth tracker); `data_sampler`: with curriculum learning (data efficiency), the training
  data loader's sampler (its curriculum step and difficulties, the samples consumed); `random_ltd`: with
  random-LTD, its scheduler. DeepSpeed's own checkpoint saves the same three.
- `deepspeed_rng`: the states of DeepSpeed's model-parallel RNG tracker
  (`deepspeed.checkpointing.get_cuda_rng_tracker()`), when anything seeded it; snapguard's Guard adds the
  Python, NumPy, torch and CUDA RNGs.
- `client`: the `client_state` dict you pass (restored in place), like save_checkpoint's client_state.

The ZeRO optimizer is no torch optimizer, so `protect` wraps `engine.optimizer.step` on the instance:
it waits first, only while the previous snapshot is still being copied out of the fp32 partitions,
the optimizer state and the model weights that step rewrites. close() removes the wrapper. At stage 0
the torch optimizer gets a step pre-hook instead, as with a plain Guard.

Why no `CheckpointEngine`: DeepSpeed lets a CheckpointEngine choose where `save_checkpoint` writes,
but not what: it hands over pickled-object state dicts (the loss scaler object, the whole config)
written by data-parallel rank 0 for the model and per rank for the optimizer, and
`load_checkpoint` finds them by reading the `latest` file and globbing `*_model_states.pt` and
`*_optim_states.pt` on disk, so a memory-only engine cannot serve a restore. The direct route above
saves the same state, per rank, without pickling and without the file system.
"""

from __future__ import annotations

from typing import Any

import torch

from snapguard.errors import ConfigError, LayoutError
from snapguard.integrations._common import AdapterGuard, CountersState, add_user_states, optimizer_tensors, require

deepspeed = require("deepspeed", "deepspeed", "deepspeed")
from deepspeed.checkpoint import constants as C  # noqa: E402
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing  # noqa: E402
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402

__all__ = ["protect", "DeepSpeedGuard"]

_SCALAR = (bool, int, float, str, type(None), torch.dtype)
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


class ZeroOptimizerState:
    """One rank's ZeRO-1/2/3 optimizer state, in DeepSpeed's own (rigid, per-rank) checkpoint format,
    minus what only pickling could carry: the loss scaler object becomes its attributes."""

    def __init__(self, optimizer: DeepSpeedZeroOptimizer | DeepSpeedZeroOptimizer_Stage3):
        self.opt = optimizer

    def state_dict(self) -> dict[str, Any]:
        opt = self.opt
        elastic = opt.elastic_checkpoint
        opt.elastic_checkpoint = False  # this rank's partitions as they are: restored into the same layout only
        try:
            sd = opt.state_dict()
        finally:
            opt.elastic_checkpoint = elastic
        sd = dict(sd)
        scaler = sd.pop(C.LOSS_SCALER)
        sd[C.LOSS_SCALER] = {k: v for k, v in vars(scaler).items() if isinstance(v, _SCALAR + (torch.Tensor,))}
        sd[C.ZERO_STAGE] = int(sd[C.ZERO_STAGE])
        # Only DeepSpeed's universal checkpoints read these: fragment addresses of every parameter.
        sd.pop(C.PARAM_SLICE_MAPPINGS, None)
        sd.pop(C.UNIVERSAL_CHECKPOINT_INFO, None)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        opt = self.opt
        sd = dict(sd)
        scaler = opt.loss_scaler
        for k, v in sd.pop(C.LOSS_SCALER).items():
            setattr(scaler, k, v)
        sd[C.LOSS_SCALER] = scaler
        dp_rank = torch.distributed.get_rank(group=opt.dp_process_group)
        dp_size = torch.distributed.get_world_size(group=opt.dp_process_group)
        per_rank: list[Any] = [None] * dp_size
        per_rank[dp_rank] = sd  # a rigid checkpoint loads from this rank's entry alone
        elastic = opt.elastic_checkpoint
        opt.elastic_checkpoint = False
        stage3 = isinstance(opt, DeepSpeedZeroOptimizer_Stage3)
        if stage3:
            opt.checkpoint_event_prologue()  # as load_checkpoint: every parameter partitioned first
        try:
            opt.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
        finally:
            opt.elastic_checkpoint = elastic
            if stage3:
                opt.checkpoint_event_epilogue()  # the persistent parameters gathered again, from their partitions


class BuffersState:
    """A ZeRO-3 module's buffers (its parameters are partitioned; the optimizer's fp32 partitions restore them)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        params = {n for n, _ in self.module.named_parameters(remove_duplicate=False)}
        return {k: v for k, v in self.module.state_dict().items() if k not in params}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        mine = self.state_dict()
        if set(sd) != set(mine):
            raise LayoutError(f"module: the snapshot holds the buffers {sorted(sd)}, the model has {sorted(mine)}")
        with torch.no_grad():
            for k, v in sd.items():
                if v is not mine[k]:
                    mine[k].copy_(v)


class SchedulerState:
    """The engine's lr scheduler under `scheduler`, or nothing when the engine has none."""

    def __init__(self, engine: Any):
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        s = self.engine.lr_scheduler
        return {} if s is None else {"scheduler": s.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        # Either way round, training on would follow another learning-rate schedule than the snapshot's run.
        s = self.engine.lr_scheduler
        if s is None and "scheduler" in sd:
            raise LayoutError("lr_scheduler: the snapshot holds a scheduler's state, this engine has no scheduler")
        if s is not None and "scheduler" not in sd:
            raise LayoutError(f"lr_scheduler: the snapshot holds no scheduler state, this engine has a"
                              f" {type(s).__name__}")
        if s is not None:
            s.load_state_dict(sd["scheduler"])


class GradScalerState:
    """A torch GradScaler, its scale and growth tracker kept as the tensors it holds: its own state_dict() reads
    them with .item(), which on a GPU would wait for the optimizer step's kernels at every snapshot."""

    def __init__(self, scaler: Any):
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        sc = self.scaler
        scale, tracker = getattr(sc, "_scale", None), getattr(sc, "_growth_tracker", None)
        if not sc.is_enabled() or not isinstance(scale, torch.Tensor) or not isinstance(tracker, torch.Tensor):
            return sc.state_dict()  # disabled ({}), or before its first step: plain numbers, nothing to wait for
        return {"scale": scale, "growth_factor": sc.get_growth_factor(), "backoff_factor": sc.get_backoff_factor(),
                "growth_interval": sc.get_growth_interval(), "_growth_tracker": tracker}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.scaler.load_state_dict({k: v.item() if isinstance(v, torch.Tensor) else v for k, v in sd.items()})


class TrackerRNGState:
    """The named RNG states of DeepSpeed's model-parallel tracker (`deepspeed.checkpointing.get_cuda_rng_tracker()`).

    `model_parallel_cuda_manual_seed` or `tracker.add` seed it; dropout in model-parallel regions draws from it,
    and activation checkpointing replays it. Empty (nothing seeded it), it saves nothing and a restore leaves it empty.
    """

    def state_dict(self) -> dict[str, Any]:
        return ds_checkpointing.get_cuda_rng_tracker().get_states()  # snapshot() clones them before it returns

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        # Clones: the restored tensors may be the Guard's, which the tracker must not share.
        ds_checkpointing.get_cuda_rng_tracker().set_states({name: s.clone() for name, s in sd.items()})


class DeepSpeedGuard(AdapterGuard):
    """A Guard for a DeepSpeedEngine: `snapshot()` defaults its step to `engine.global_steps`."""

    engine: Any
    _last_global_step = -1

    def snapshot(self, step: int | None = None) -> None:
        """Start a snapshot after engine.step(); returns at once. Called on every rank.

        `step` defaults to engine.global_steps, and then a call after an engine.step() that only
        accumulated gradients (no optimizer step since the last snapshot) does nothing: with gradient
        accumulation, calling snapshot() after every engine.step() snapshots each optimizer step once,
        right after it, when no gradients are half accumulated.
        """
        if step is None:
            step = self.engine.global_steps
            if step == self._last_global_step:
                return
        super().snapshot(step)
        self._last_global_step = step  # once taken: a refused snapshot is not skipped next time

    def restore(self) -> int | None:
        step = super().restore()
        self._last_global_step = self.engine.global_steps
        return step


def engine_states(engine: Any) -> dict[str, Any]:
    """The engine's optional parts that DeepSpeed's own checkpoint saves too, where the engine has them."""
    named: dict[str, Any] = {}
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:  # stage 0 with torch_autocast in fp16: the engine steps through a torch GradScaler
        named["grad_scaler"] = GradScalerState(scaler)
    loader = getattr(engine, "training_dataloader", None)
    if loader is not None and engine.curriculum_learning_enabled():
        named["data_sampler"] = loader.data_sampler  # where the curriculum is, and which samples were consumed
    if engine.random_ltd_enabled():
        named["random_ltd"] = engine.random_ltd_scheduler
    return named


def protect(engine: Any, *, client_state: dict | None = None, extra: Any = None,
            states: dict[str, Any] | None = None, **guard_options: Any) -> DeepSpeedGuard:
    """Protect a DeepSpeedEngine (ZeRO stage 0, 1, 2 or 3). Called on every rank after deepspeed.initialize.

    `client_state`: a dict of your own loop state, restored in place (save_checkpoint's client_state).
    `extra`, `states`: more Statefuls. `guard_options` go to snapguard.Guard (job=, node=, run_dir=,
    start_daemon=, timeout_s=, rng=, config=). restore() returns the step of the snapshot loaded, or None.
    """
    if not isinstance(engine, deepspeed.DeepSpeedEngine):
        raise ConfigError(f"protect() needs a DeepSpeedEngine, got {type(engine).__name__}")
    stage = engine.zero_optimization_stage()
    opt = engine.optimizer
    if stage in (1, 2):
        if not isinstance(opt, DeepSpeedZeroOptimizer):
            raise ConfigError(f"ZeRO stage {stage} with a {type(opt).__name__} optimizer is not supported")
        opt_state: Any = ZeroOptimizerState(opt)

        def guarded():
            yield from opt.single_partition_of_fp32_groups
            yield from optimizer_tensors(opt.optimizer)
            for group in opt.bit16_groups:  # the module's weights: step() copies the partitions back into them
                yield from group
    elif stage == 3 and isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        if opt.swap_optimizer or opt.params_in_nvme_and_cpu:
            raise ConfigError("snapguard does not support ZeRO stage 3 offloading to NVMe (offload_optimizer or"
                              " offload_param with \"device\": \"nvme\"): those partitions live on disk, not in"
                              " memory. Offloading to the CPU is supported")
        opt_state = ZeroOptimizerState(opt)

        def guarded():  # what the snapshot takes and only step() rewrites: the fp32 partitions, the optimizer state
            yield from opt.fp32_partitioned_groups_flat
            yield from optimizer_tensors(opt.optimizer)
    elif stage == 0 and isinstance(opt, torch.optim.Optimizer):
        opt_state = opt

        def guarded():
            yield from optimizer_tensors(opt)
    else:
        raise ConfigError(f"snapguard supports DeepSpeed ZeRO stages 0 (torch optimizer), 1, 2 and 3; this engine"
                          f" runs stage {stage} with {type(opt).__name__}")
    if engine.lr_scheduler is not None and not hasattr(engine.lr_scheduler, "state_dict"):
        raise ConfigError(f"the engine's lr scheduler ({type(engine.lr_scheduler).__name__}) has no state_dict():"
                          " snapguard cannot snapshot it")
    named: dict[str, Any] = {"module": BuffersState(engine.module) if stage == 3 else engine.module,
                             "optimizer": opt_state,
                             "engine": CountersState(engine, ENGINE_COUNTERS), "lr_scheduler": SchedulerState(engine),
                             "deepspeed_rng": TrackerRNGState()}
    # the engine's own optional parts, unless the user snapshots one under that name already
    named |= {k: v for k, v in engine_states(engine).items() if k not in (states or {})}
    if client_state is not None:
        named["client"] = client_state
    add_user_states(named, extra, states)
    dp = engine.dp_world_size

    guard = DeepSpeedGuard(states=named, guarded=guarded,
                           layout=lambda: f"ZeRO stage {stage}, global rank {engine.global_rank}, data-parallel size {dp}",
                           **guard_options)
    guard.engine = engine
    if stage == 0:  # a torch optimizer: its step pre-hook, which keeps `step` a bound method (lr schedulers wrap it)
        guard.gate_optimizer(opt)
    else:
        guard.gate_method(opt, "step")
    return guard
