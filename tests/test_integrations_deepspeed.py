"""snapguard.integrations.deepspeed with the real DeepSpeed on gloo: ZeRO stages 1 and 2, two ranks under
torchrun (the CPU shim from framework_shims.py only skips compiling a shared-memory op gloo does not use).

One rank is SIGKILLed halfway through copying its snapshot of step 3; torchrun restarts both, which
restore the newest step both hold. Every loss of every attempt and every byte of the final module,
fp32 partitions, optimizer state, learning rate, engine counters and client state must equal the
run without snapguard and without failures. Then a restore into a wider model must fail, naming
the first tensor that differs.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from integration_helpers import Run, layout_error, run_all, scenarios

STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("deepspeed"))
    with scenarios(work, {f"zero{z}": ("deepspeed_zero.py", ["--zero", str(z), "--steps", str(STEPS)], STEPS)
                          for z in (1, 2)}) as s:
        yield work, s


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_resumes_bit_exactly_after_sigkill(runs, stage):
    s = runs[1][f"zero{stage}"]
    s.check()
    # snapshot() names each snapshot by engine.global_steps, the count of steps taken
    assert s.daemon.held() == {0: [STEPS - 1, STEPS], 1: [STEPS - 1, STEPS]}


def test_restore_into_a_wider_model_names_the_tensor(runs):
    work, s = runs
    wider = Run("deepspeed_zero.py", ["--zero", "2", "--steps", str(STEPS + 1), "--width", "48"],
                os.path.join(work, "wider"), env=s["zero2"].daemon.env)
    assert run_all(wider) != [0]
    msg = layout_error(wider.log())
    assert "tensor '/module/0.weight': the snapshot has float32[128, 32], the model expects float32[128, 48]" in msg, msg
    assert "ZeRO stage 2" in msg, msg


def test_missing_deepspeed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.delitem(sys.modules, "snapguard.integrations.deepspeed", raising=False)
    with pytest.raises(ImportError, match=r"pip install snapguard\[deepspeed\]"):
        importlib.import_module("snapguard.integrations.deepspeed")
