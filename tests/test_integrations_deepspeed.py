"""snapguard.integrations.deepspeed with the real DeepSpeed on gloo: ZeRO stages 1 and 3, and 2 and 3 with
ZeRO-Offload to the CPU, two ranks under torchrun (the CPU shim from framework_shims.py only skips compiling a
shared-memory op gloo does not use).

One rank is SIGKILLed halfway through copying its snapshot of step 3; torchrun restarts both, which
restore the newest step both hold. Every loss of every attempt and every byte of the final module,
fp32 partitions, optimizer state, learning rate, engine counters and client state must equal the
run without snapguard and without failures. Then a restore into a wider model must fail, naming
the first tensor that differs.

A model whose dropout draws from DeepSpeed's own model-parallel RNG tracker (seeded with `tracker.add`,
replayed by activation checkpointing's recompute) must resume as bit-exactly: the tracker's states are
part of the snapshot. Restores that cannot apply some saved state (a lr scheduler on one side only,
missing engine counters) must fail and say what.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from types import SimpleNamespace

import pytest

from integration_helpers import EXAMPLES, Run, layout_error, run_all, scenarios

STEPS = 6

# An example of its own (the examples stay as users see them): dropout in a model-parallel region, drawn from
# DeepSpeed's tracker inside fork(), under deepspeed.checkpointing.checkpoint, whose recompute replays the
# tracker's states. On a CPU, DeepSpeed's accelerator is the CPU one, and the tracker swaps the CPU generator.
TRACKER_EXAMPLE = f"""
import argparse, sys
sys.path.insert(0, {EXAMPLES!r})

import deepspeed
import torch
import torch.nn.functional as F

from runlog import RunLog
from snapguard.integrations.deepspeed import protect
from snapguard.procs import leave_process_group
from torch_ddp import VOCAB, batch


class TrackedDropout(torch.nn.Module):
    def forward(self, x):
        with deepspeed.checkpointing.get_cuda_rng_tracker().fork():
            return F.dropout(x, 0.3, self.training)


class Net(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), TrackedDropout(),
                                       torch.nn.Linear(4 * width, width))
        self.out = torch.nn.Linear(width, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        return self.out(h + deepspeed.checkpointing.checkpoint(self.mlp, h))


ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int)
ap.add_argument("--out")
a = ap.parse_args()
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
log = RunLog(a.out, rank)
torch.manual_seed(0)
# What model_parallel_cuda_manual_seed does, without an mpu: each (tensor-parallel) rank its own stream.
deepspeed.checkpointing.get_cuda_rng_tracker().add("model-parallel-rng", 1234 + rank)
config = {{"train_micro_batch_size_per_gpu": 8, "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-2,
          "torch_adam": True}}}}, "zero_optimization": {{"stage": 1}}, "steps_per_print": 10 ** 9}}
engine, _, _, _ = deepspeed.initialize(model=Net(32), config=config)
guard = protect(engine, start_daemon=True)
guard.restore()
for step in range(engine.global_steps, a.steps):
    x, y = batch(step, rank, "cpu")
    loss = F.cross_entropy(engine(x).flatten(0, 1), y.flatten())
    engine.backward(loss)
    engine.step()
    guard.snapshot()
    log.loss(step, loss.item())
guard.close()
log.final(module=engine.module.state_dict(), tracker=deepspeed.checkpointing.get_cuda_rng_tracker().get_states())
leave_process_group()
"""


# ZeRO-Offload: the fp32 partitions and the optimizer state in CPU memory, stepped there (ZeRO 3: the parameters too).
# Stage 2 runs only offloaded: it is stage 1's optimizer with gradients partitioned, so stage 1 and stage 2
# offloaded cover what stage 2 alone would (each scenario costs the suite about 20 s of start-ups).
OFFLOADED = {"2-offload": {"/offloaded/cpu_offload": "True"},
             "3-offload": {"/offloaded/offload_optimizer": "True", "/offloaded/offload_param": "True"}}
# What the example's engine says of offloading, per scenario
OFFLOAD_FLAGS = {"1": {"/offloaded/cpu_offload": "False"},
                 "3": {"/offloaded/offload_optimizer": "False", "/offloaded/offload_param": "False"}, **OFFLOADED}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("deepspeed"))
    # --local_rank as the `deepspeed` launcher passes it (the example reads LOCAL_RANK instead)
    specs = {f"zero{z}": ("deepspeed_zero.py", ["--zero", str(z), "--steps", str(STEPS), "--local_rank=0"], STEPS)
             for z in (1, 3)}
    specs |= {f"zero{z}": ("deepspeed_zero.py", ["--zero", z[0], "--offload", "--steps", str(STEPS)], STEPS)
              for z in OFFLOADED}
    with scenarios(work, specs) as s:
        yield work, s


@pytest.mark.parametrize("stage", OFFLOAD_FLAGS)
def test_zero_resumes_bit_exactly_after_sigkill(runs, stage):
    s = runs[1][f"zero{stage}"]
    s.check()
    # snapshot() names each snapshot by engine.global_steps, the count of steps taken
    assert s.daemon.held() == {0: [STEPS - 1, STEPS], 1: [STEPS - 1, STEPS]}
    final = json.load(open(os.path.join(s.run.out, "final.r0.json")))
    assert {k: v for k, v in final.items() if k.startswith("/offloaded/")} == OFFLOAD_FLAGS[stage]


@pytest.mark.parametrize(("stage", "first"), [
    ("2-offload", "tensor '/module/0.weight': the snapshot has float32[128, 32], the model expects float32[128, 48]"),
    # ZeRO 3 partitions the parameters into flat groups: the first to differ is this rank's partition
    ("3", "tensor '/optimizer/fp32_flat_groups/0': the snapshot has float32[10512], the model expects float32[20344]"),
])
def test_restore_into_a_wider_model_names_the_tensor(runs, stage, first):
    work, s = runs
    wider = Run("deepspeed_zero.py", ["--zero", stage[0], "--steps", str(STEPS + 1), "--width", "48"],
                os.path.join(work, f"wider{stage}"), env=s[f"zero{stage}"].daemon.env)
    assert run_all(wider) != [0]
    msg = layout_error(wider.log())
    assert first in msg, msg
    assert f"ZeRO stage {stage[0]}" in msg, msg


def test_missing_deepspeed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.delitem(sys.modules, "snapguard.integrations.deepspeed", raising=False)
    with pytest.raises(ImportError, match=r"pip install snapguard\[deepspeed\]"):
        importlib.import_module("snapguard.integrations.deepspeed")


def test_deepspeed_rng_tracker_resumes_bit_exactly_after_sigkill(tmp_path):
    script = tmp_path / "deepspeed_tracker.py"
    script.write_text(TRACKER_EXAMPLE)
    with scenarios(str(tmp_path), {"tracker": (str(script), ["--steps", str(STEPS)], STEPS)}) as s:
        s["tracker"].check()


def test_deepspeed_rng_tracker_state_round_trips_and_an_empty_tracker_stays_empty():
    import deepspeed
    import torch

    from snapguard.integrations.deepspeed import TrackerRNGState

    tracker = deepspeed.checkpointing.get_cuda_rng_tracker()
    state = TrackerRNGState()
    saved_states = tracker.get_states()
    try:
        tracker.reset()
        assert state.state_dict() == {}  # nothing seeded it: nothing to save, and a restore leaves it empty
        state.load_state_dict({})
        assert tracker.get_states() == {}

        tracker.add("model-parallel-rng", 99)
        sd = {k: v.clone() for k, v in state.state_dict().items()}
        with tracker.fork():
            first = torch.rand(4)
        state.load_state_dict(sd)
        with tracker.fork():
            assert torch.equal(torch.rand(4), first)
        assert tracker.get_states()["model-parallel-rng"] is not sd["model-parallel-rng"]
    finally:
        tracker.set_states(saved_states)


def test_lr_scheduler_on_one_side_only_is_refused():
    import torch
    from deepspeed.runtime.lr_schedules import WarmupLR

    from snapguard.errors import LayoutError
    from snapguard.integrations.deepspeed import SchedulerState

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with_scheduler = SimpleNamespace(lr_scheduler=WarmupLR(opt, warmup_num_steps=5))
    with_scheduler.lr_scheduler.step()
    without = SimpleNamespace(lr_scheduler=None)
    saved = SchedulerState(with_scheduler).state_dict()
    with pytest.raises(LayoutError, match="the snapshot holds a scheduler's state, this engine has no scheduler"):
        SchedulerState(without).load_state_dict(saved)
    with pytest.raises(LayoutError, match="the snapshot holds no scheduler state, this engine has a WarmupLR"):
        SchedulerState(with_scheduler).load_state_dict(SchedulerState(without).state_dict())
    SchedulerState(without).load_state_dict({})  # no scheduler on either side: nothing to restore

    fresh = SimpleNamespace(lr_scheduler=WarmupLR(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                                                  warmup_num_steps=5))
    SchedulerState(fresh).load_state_dict(saved)
    assert fresh.lr_scheduler.state_dict() == with_scheduler.lr_scheduler.state_dict()


def test_engine_counters_missing_from_a_snapshot_are_refused():
    from snapguard.errors import LayoutError
    from snapguard.integrations._common import CountersState
    from snapguard.integrations.deepspeed import ENGINE_COUNTERS

    engine = SimpleNamespace(global_steps=0, global_samples=0, skipped_steps=0, micro_steps=0)
    counters = CountersState(engine, ENGINE_COUNTERS)
    with pytest.raises(LayoutError, match=r"the snapshot has no \['global_samples', 'micro_steps'\]"):
        counters.load_state_dict({"global_steps": 3, "skipped_steps": 0})
    with pytest.raises(LayoutError, match=r"the snapshot has \['tokens'\], which this process does not keep"):
        counters.load_state_dict(dict.fromkeys(ENGINE_COUNTERS, 1) | {"tokens": 5})
    assert vars(engine) == dict.fromkeys(ENGINE_COUNTERS, 0)  # nothing half-restored
    counters.load_state_dict({"global_steps": 3, "global_samples": 24, "skipped_steps": 1, "micro_steps": 3})
    assert vars(engine) == {"global_steps": 3, "global_samples": 24, "skipped_steps": 1, "micro_steps": 3}


# Stage 0 with torch_autocast in fp16: the engine keeps a torch GradScaler and a plain torch optimizer. One process
# trains 3 steps (the second overflows, and the scaler halves its scale), snapshotting each, then trains 3 more: the
# run with no failure. A second engine, as a restarted process builds it (with a torch lr scheduler made after
# protect(), which wraps the optimizer's step), restores and trains the same 3 steps.
AUTOCAST_EXAMPLE = """
import json, sys
import deepspeed, torch
import torch.nn.functional as F
from snapguard.integrations.deepspeed import protect

deepspeed.init_distributed(dist_backend="gloo")
config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "torch_autocast": {"enabled": True, "dtype": "torch.float16"}}


def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    return deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())[0]


def train(e, guard, steps):
    losses = []
    for step in steps:
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        loss = F.mse_loss(e(x).float(), torch.ones(4, 4))
        if step == 1:
            loss = loss * float("inf")  # an overflow: the scaler skips the step and halves its scale
        e.backward(loss)
        e.step()
        if guard is not None:
            guard.snapshot()
        losses.append(loss.item())
    return losses


def final(e):
    return {"losses": None, "scale": e.torch_autocast_z0_gradscaler.get_scale(), "global_steps": e.global_steps,
            "params": [p.detach().double().sum().item() for p in e.module.parameters()]}


a = engine()
guard = protect(a, start_daemon=False)
assert guard.restore() is None
train(a, guard, range(3))
guard.close()
saved = a.torch_autocast_z0_gradscaler.get_scale()
ref = final(a) | {"losses": train(a, None, range(3, 6))}
ref |= {k: v for k, v in final(a).items() if k != "losses"}

b = engine()
guard = protect(b, start_daemon=False)
torch.optim.lr_scheduler.LambdaLR(b.optimizer, lambda s: 1.0)  # wraps b.optimizer.step, which must stay a method
restored = guard.restore()
got = {"restored": restored, "scale_restored": b.torch_autocast_z0_gradscaler.get_scale(), "saved": saved,
       "names": sorted(guard.states)}
got |= {"losses": train(b, guard, range(3, 6))} | {k: v for k, v in final(b).items() if k != "losses"}
guard.close()
print("RESULT " + json.dumps({"ref": ref, "got": got}))
"""


def test_stage0_with_fp16_autocast_restores_the_loss_scale_and_takes_a_scheduler_made_after_protect(tmp_path):
    import subprocess

    from integration_helpers import SHIMS, private_daemon
    from snapguard.procs import free_port

    script = tmp_path / "autocast.py"
    script.write_text(AUTOCAST_EXAMPLE)
    with private_daemon("autocast") as d:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGUARD_")} | d.env
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", SNAPGUARD_CPU_SHIMS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (SHIMS, os.environ.get("PYTHONPATH")) if p))
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    ref, got = out["ref"], out["got"]
    assert "grad_scaler" in got["names"], got["names"]
    assert got["saved"] < 65536.0, "the overflow should have lowered the scale"  # else the test tests nothing
    assert got["restored"] == 3 and got["scale_restored"] == got["saved"], got
    assert got["losses"] == ref["losses"] and got["params"] == ref["params"], (got, ref)
    assert (got["scale"], got["global_steps"]) == (ref["scale"], ref["global_steps"]), (got, ref)


def test_the_engines_optional_parts_are_snapshotted_where_it_has_them():
    """DeepSpeed's own checkpoint saves the curriculum's data sampler and the random-LTD scheduler when they are on,
    and the fp16 autocast GradScaler is the stage-0 engine's loss scale: each is a state of the snapshot exactly then."""
    from snapguard.integrations.deepspeed import engine_states

    sampler, ltd, scaler = object(), object(), object()

    def engine(curriculum: bool, random_ltd: bool, with_scaler: bool) -> SimpleNamespace:
        return SimpleNamespace(torch_autocast_z0_gradscaler=scaler if with_scaler else None,
                               training_dataloader=SimpleNamespace(data_sampler=sampler),
                               curriculum_learning_enabled=lambda: curriculum, random_ltd_enabled=lambda: random_ltd,
                               random_ltd_scheduler=ltd)

    assert engine_states(engine(False, False, False)) == {}
    parts = engine_states(engine(True, True, True))
    assert parts.pop("grad_scaler").scaler is scaler
    assert parts == {"data_sampler": sampler, "random_ltd": ltd}
    assert engine_states(engine(True, False, False)) == {"data_sampler": sampler}
    no_loader = engine(True, False, False)
    no_loader.training_dataloader = None  # curriculum on, but the engine was given no training data
    assert engine_states(no_loader) == {}


def test_a_grad_scaler_is_snapshotted_as_the_tensors_it_holds_and_restores_its_numbers():
    """GradScaler.state_dict() reads its scale with .item(): on a GPU, a wait for the step's kernels at every snapshot."""
    import torch

    from snapguard.integrations.deepspeed import GradScalerState

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sc = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    assert GradScalerState(sc).state_dict() == sc.state_dict()  # before its first step: plain numbers
    for _ in range(2):
        sc.scale(p.sum()).backward()
        sc.step(opt)
        sc.update()
    sd = GradScalerState(sc).state_dict()
    assert sd["scale"] is sc._scale and sd["_growth_tracker"] is sc._growth_tracker
    other = torch.amp.GradScaler("cpu", init_scale=7.0)
    GradScalerState(other).load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()})
    assert other.state_dict() == sc.state_dict() and sc.get_scale() == 4096.0
