"""snapguard.integrations.torch with the real DDP and FSDP2 on gloo, two ranks under torchrun.

One rank is SIGKILLed halfway through copying its snapshot of step 3; torchrun restarts both ranks,
which restore the newest step both hold. Every loss of every attempt and every byte of the final
model and optimizer state (FSDP2: each rank's shards) must equal the run of the same example
without snapguard and without failures. Then a restore into a model whose shapes or sharding differ
from the snapshot must fail, naming the first tensor that differs with both shapes.
"""

from __future__ import annotations

import os

import pytest

from integration_helpers import Run, layout_error, run_all, scenarios

STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("torch"))
    with scenarios(work, {"ddp": ("torch_ddp.py", ["--steps", str(STEPS)], STEPS),
                          "fsdp2": ("torch_fsdp2.py", ["--steps", str(STEPS)], STEPS)}) as s:
        yield work, s


def test_ddp_resumes_bit_exactly_after_sigkill(runs):
    runs[1]["ddp"].check()


def test_fsdp2_resumes_bit_exactly_after_sigkill(runs):
    s = runs[1]["fsdp2"]
    s.check()
    # each rank held only its own shards: FSDP2 splits the 128-row embedding in two
    assert s.daemon.held() == {0: [STEPS - 2, STEPS - 1], 1: [STEPS - 2, STEPS - 1]}


def test_restore_into_other_shapes_or_sharding_names_the_tensor(runs):
    work, s = runs
    wider = Run("torch_ddp.py", ["--steps", str(STEPS + 1), "--width", "48"], os.path.join(work, "wider"),
                env=s["ddp"].daemon.env)
    unsharded = Run("torch_ddp.py", ["--steps", str(STEPS + 1)], os.path.join(work, "unsharded"),
                    env=s["fsdp2"].daemon.env)
    assert run_all(wider, unsharded) != [0, 0]
    msg = layout_error(wider.log())
    assert "tensor '/model/0.weight': the snapshot has float32[128, 32], the model expects float32[128, 48]" in msg, msg
    assert "parameters not sharded" in msg, msg
    msg = layout_error(unsharded.log())
    assert "tensor '/model/0.weight': the snapshot has float32[64, 32], the model expects float32[128, 32]" in msg, msg


def test_optimizer_step_waits_for_the_copy_and_the_snapshot_holds_the_state_before_it(monkeypatch):
    """In one process: slow the background copy down, step right after snapshot(); the step must wait
    (the copy reads the parameters in place, without cloning them) and the snapshot must hold the
    parameters as they were before that step."""
    import torch

    from integration_helpers import check_step_waits_for_the_copy, private_daemon
    from snapguard.integrations.torch import protect

    with private_daemon("gate") as d:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        guard = protect(model, opt, job=d.job, node="n0", run_dir=d.run_dir, rank=0, world_size=1, timeout_s=10)

        def step():
            model(torch.ones(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()

        step()
        check_step_waits_for_the_copy(monkeypatch, guard, step, model, at=0)
        guard.close()
        assert not opt._optimizer_step_pre_hooks, "close() left the step pre-hook installed"


def test_sgd_without_momentum_restores_the_learning_rate_a_scheduler_set():
    """SGD without momentum keeps no per-parameter state: its param_groups alone carry the lr a scheduler
    changed. Restored into fresh objects, the lr and every later step must equal the run that never broke."""
    import torch

    from integration_helpers import private_daemon
    from snapguard.integrations.torch import protect

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def train(model, opt, sched, step):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    with private_daemon("sgd") as d:
        options = dict(job=d.job, node="n0", run_dir=d.run_dir, rank=0, world_size=1, timeout_s=10)
        model, opt, sched = build()
        guard = protect(model, opt, states={"scheduler": sched}, **options)
        for step in range(3):
            train(model, opt, sched, step)
            guard.snapshot(step)
        guard.close()
        assert not opt.state and opt.param_groups[0]["lr"] == 0.0125

        model2, opt2, sched2 = build()  # the restarted process: lr 0.1 again
        guard2 = protect(model2, opt2, states={"scheduler": sched2}, **options)
        assert guard2.restore() == 2
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for step in range(3, 5):
            train(model, opt, sched, step)
            train(model2, opt2, sched2, step)
            assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
        guard2.close()


def test_a_parameter_the_optimizer_has_no_state_for_yet_restores_and_trains_on_alike():
    """A parameter that has had no gradient yet (a head used later, an expert never routed to) has no
    optimizer state. The snapshot holds none for it; restore must take it as it is, and training that then
    uses that parameter too must follow the run that never broke."""
    import torch

    from integration_helpers import private_daemon
    from snapguard.integrations.torch import protect

    def build():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8), "later": torch.nn.Linear(8, 8)})
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    def train(model, opt, step, both=False):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        y = model["a"](x)
        (model["later"](y) if both else y).square().sum().backward()
        opt.step()
        opt.zero_grad()

    with private_daemon("unused") as d:
        options = dict(job=d.job, node="n0", run_dir=d.run_dir, rank=0, world_size=1, timeout_s=10)
        model, opt = build()
        guard = protect(model, opt, **options)
        for step in range(3):
            train(model, opt, step)
            guard.snapshot(step)
        guard.close()
        assert len(opt.state) == 2, "only a's weight and bias have state"

        model2, opt2 = build()
        guard2 = protect(model2, opt2, **options)
        assert guard2.restore() == 2
        assert len(opt2.state) == 2
        for step in range(3, 5):
            train(model, opt, step, both=True)
            train(model2, opt2, step, both=True)
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
        guard2.close()


def test_closing_a_guard_leaves_the_gate_a_later_guard_put_on_the_same_method():
    """Two adapter guards gate one object's `step` (a second protect() before the first one's close()): the first
    one's close() must leave the second one's wait in place, and the last close() must leave the method as it was."""
    from integration_helpers import private_daemon
    from snapguard.integrations._common import AdapterGuard

    class Stepper:
        def step(self) -> str:
            return "stepped"

    calls: list[str] = []
    with private_daemon("gates") as d:
        guards = {}
        for name in ("first", "second"):
            g = AdapterGuard(states={"x": {"t": __import__("torch").zeros(4)}}, guarded=None, layout=lambda: "",
                             job=d.job, node="n0", run_dir=d.run_dir, rank=0, world_size=1, timeout_s=10, rng=False)
            g.before_update = lambda name=name: calls.append(name)
            guards[name] = g
        for order in (("first", "second"), ("second", "first")):
            opt = Stepper()
            for name in ("first", "second"):
                guards[name]._undo.clear()
                guards[name].gate_method(opt, "step")
            assert opt.step() == "stepped" and calls == ["second", "first"]
            calls.clear()
            guards[order[0]]._undo.pop()()  # what close() does with it
            assert opt.step() == "stepped" and calls == [order[1]], (order, calls)
            calls.clear()
            guards[order[1]]._undo.pop()()
            assert opt.step() == "stepped" and calls == [] and "step" not in vars(opt), (order, calls)
        for g in guards.values():
            g.close()
