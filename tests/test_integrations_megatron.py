"""snapguard.integrations.megatron with the real Megatron-Core on gloo: a GPTModel with tensor-parallel
size 2 and dropout, two ranks under torchrun (CPU shims from framework_shims.py).

One rank is SIGKILLed halfway through copying its snapshot of iteration 3; torchrun restarts both,
which restore the newest iteration both hold, RNG tracker states included. Every loss of every
attempt and every byte of the final model shards, optimizer state, consumed-samples counter and
tracker RNG states must equal the run without snapguard and without failures. Then restoring the
TP=2 snapshot into TP=1 must fail, naming the first tensor whose shard differs.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from integration_helpers import Run, layout_error, run_all, scenarios
from snapguard.errors import ConfigError

ITERS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("megatron"))
    with scenarios(work, {"tp2": ("megatron_gpt.py", ["--tp", "2", "--iters", str(ITERS)], ITERS)}) as s:
        yield work, s["tp2"]


def test_tensor_parallel_gpt_resumes_bit_exactly_after_sigkill(runs):
    runs[1].check()


def test_restore_into_another_tensor_parallel_size_names_the_tensor(runs):
    work, s = runs
    tp1 = Run("megatron_gpt.py", ["--tp", "1", "--iters", str(ITERS + 1)], os.path.join(work, "tp1"), env=s.daemon.env)
    assert run_all(tp1) != [0]
    msg = layout_error(tp1.log())
    assert ("tensor '/model/embedding.word_embeddings.weight': the snapshot has float32[64, 64], the model expects"
            " float32[128, 64]") in msg, msg
    assert "tensor-parallel rank 0 of 1" in msg, msg


def test_missing_megatron_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # import of megatron.core raises ImportError
    monkeypatch.delitem(sys.modules, "snapguard.integrations.megatron", raising=False)
    with pytest.raises(ImportError, match=r"pip install snapguard\[megatron\]"):
        importlib.import_module("snapguard.integrations.megatron")


def test_megatron_optimizer_state_keeps_main_params_and_grad_scaler_by_name():
    """The route for get_megatron_optimizer's optimizers, which need CUDA to build: a stand-in with their
    shape (a chained optimizer of one mixed-precision part whose torch optimizer steps fp32 main
    params that the model params point to as `main_param`, and a grad scaler; then a stub part, as a
    pipeline stage without expert layers has for the expert optimizer, with a grad scaler of its own)
    round-trips by name."""
    from types import SimpleNamespace

    import torch

    from snapguard.errors import LayoutError
    from snapguard.integrations.megatron import MegatronOptimizerState, _param_names

    class Scaler:
        def __init__(self):
            self.scale, self.growth = torch.tensor([1024.0]), 0

        def state_dict(self):
            return {"scale": self.scale, "growth_tracker": self.growth}

        def load_state_dict(self, sd):
            self.scale, self.growth = sd["scale"].clone(), sd["growth_tracker"]

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    for p in model.parameters():
        p.main_param = p.detach().float().clone().requires_grad_()
    inner = torch.optim.Adam([p.main_param for p in model.parameters()], lr=0.1)
    part = SimpleNamespace(optimizer=inner, grad_scaler=Scaler())
    stub = SimpleNamespace(optimizer=None, is_stub_optimizer=True, grad_scaler=Scaler())
    state = MegatronOptimizerState(SimpleNamespace(chained_optimizers=[part, stub]), _param_names([model]))
    assert state.torch_optimizers() == [inner]
    for p in inner.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    inner.step()
    part.grad_scaler.growth, stub.grad_scaler.growth = 7, 3

    sd = state.state_dict()
    assert sorted(sd["0"]["main_params"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert set(sd["0"]["optimizer"]["state"]["1.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    sd = _clone(sd)  # what a snapshot holds: copies taken before the next step
    sd["0"]["grad_scaler"]["scale"] = torch.tensor([8.0])
    saved = sd["0"]["main_params"]
    moments = {k: v["exp_avg"] for k, v in sd["0"]["optimizer"]["state"].items()}
    inner.step()  # move everything on, then restore
    part.grad_scaler.growth = stub.grad_scaler.growth = 0
    state.load_state_dict(sd)
    for n, p in zip(["0.weight", "0.bias", "1.weight", "1.bias"], inner.param_groups[0]["params"]):
        assert torch.equal(p, saved[n]) and torch.equal(inner.state[p]["exp_avg"], moments[n])
    assert part.grad_scaler.growth == 7 and part.grad_scaler.scale.item() == 8.0
    assert stub.grad_scaler.growth == 3

    # the same optimizer with the parts' roles swapped on this rank: refused, naming the part, nothing changed
    swapped = MegatronOptimizerState(SimpleNamespace(chained_optimizers=[stub, part]), _param_names([model]))
    with pytest.raises(LayoutError, match=r"optimizer part 0 \(SimpleNamespace\): when the snapshot was taken this"
                                          " rank held parameters of it; now it is a stub optimizer without any"):
        swapped.load_state_dict(_clone(sd))
    swapped = MegatronOptimizerState(SimpleNamespace(chained_optimizers=[part, part]), _param_names([model]))
    with pytest.raises(LayoutError, match="optimizer part 1 .*held no parameters of it .a stub optimizer.; now it"
                                          " holds some"):
        swapped.load_state_dict(_clone(sd))
    assert stub.grad_scaler.growth == 3 and part.grad_scaler.growth == 7


def test_megatron_bf16_weights_are_copied_in_place_and_the_step_waits_for_them(monkeypatch):
    """With a Megatron optimizer (the stand-in above: bf16 model weights, fp32 main params in the torch optimizer,
    and a stub part),
    the model's weights are read in place by the background copy, not cloned at every snapshot (on a GPU, a
    transient device allocation the size of the shard). That is safe because the optimizer writes them only
    after its torch optimizer's step pre-hook has waited for the copy: a step right after snapshot() must wait,
    and the snapshot must hold the weights from before that step."""
    from types import SimpleNamespace

    import torch

    from integration_helpers import check_step_waits_for_the_copy, private_daemon
    from snapguard.integrations.megatron import protect

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    for p in model.parameters():
        p.main_param = p.detach().float().clone().requires_grad_()
    inner = torch.optim.Adam([p.main_param for p in model.parameters()], lr=0.1)
    stub = SimpleNamespace(optimizer=None, is_stub_optimizer=True, grad_scaler=None)  # no expert layers here
    optimizer = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=inner, grad_scaler=None), stub])

    def step():  # as Float16OptimizerWithFloat16Params.step: the inner step, then main params into the model's
        for p in model.parameters():
            p.main_param.grad = torch.randn_like(p.main_param)
        inner.step()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.main_param)

    with private_daemon("mbf16") as d:
        guard = protect(model, optimizer, job=d.job, node="n0", run_dir=d.run_dir, rank=0, world_size=1, rng=False,
                        timeout_s=10)
        try:
            step()
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            assert weights <= guard._guarded_storages(), "the bf16 weights would be cloned at every snapshot"
            check_step_waits_for_the_copy(monkeypatch, guard, step, model, at=1)
            guard.snapshot(2, consumed_train_samples=64)
            with pytest.raises(ConfigError, match=r"snapshot\(2\) after snapshot or restore of step 2"):
                guard.snapshot(2, consumed_train_samples=96)  # refused: the counters stay those of iteration 2
            assert guard.counters == {"iteration": 2, "consumed_train_samples": 64}
        finally:
            guard.close()


def test_megatron_optimizer_state_refuses_a_grad_scaler_on_one_side_only():
    """A snapshot with a grad scaler's state restored into an optimizer without one (or the other way round)
    would resume with another loss scale: refused, naming the part, never skipped."""
    from types import SimpleNamespace

    import torch

    from snapguard.errors import LayoutError
    from snapguard.integrations.megatron import MegatronOptimizerState, _param_names

    class Scaler:
        def state_dict(self):
            return {"scale": torch.tensor([1024.0])}

        def load_state_dict(self, sd):
            raise AssertionError("a refused restore must change nothing")

    def state(scaler):
        model = torch.nn.Linear(4, 3)
        part = SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=scaler)
        return MegatronOptimizerState(SimpleNamespace(chained_optimizers=[part]), _param_names([model]))

    with_scaler, without = state(Scaler()), state(None)
    with pytest.raises(LayoutError, match=r"optimizer part 0 \(SimpleNamespace\): the snapshot holds a grad scaler's"
                                          " state, this optimizer has no grad scaler"):
        without.load_state_dict(_clone(with_scaler.state_dict()))
    with pytest.raises(LayoutError, match="the snapshot holds no grad scaler state, this optimizer has a Scaler"):
        with_scaler.load_state_dict(_clone(without.state_dict()))
    with pytest.raises(LayoutError, match="the snapshot holds 2 optimizer part"):
        without.load_state_dict({"0": _clone(without.state_dict()["0"]), "1": _clone(without.state_dict()["0"])})
    without.load_state_dict(_clone(without.state_dict()))  # no grad scaler on either side (fp32, bf16)


def _clone(node):
    import torch

    if isinstance(node, torch.Tensor):
        return node.detach().clone()
    if isinstance(node, dict):
        return {k: _clone(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_clone(v) for v in node]
    return node
