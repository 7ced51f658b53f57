"""The CUDA save and restore paths: state on a GPU, copied on a side stream into page-locked shared memory.

These tests need a CUDA device and are skipped on machines without one (CI has none); everything they
exercise besides the device copies is covered on the CPU by the rest of the suite. Run them on a GPU
machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import random

import pytest
import torch

from snapguard.demo import JobSpec, build_model, compare, state_digest

from conftest import flip_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NPROC = 2
STEPS = 20
RUN_TIMEOUT_S = 300


def _train(model, opt, steps: range) -> list[float]:
    """A few steps of the demo model on the GPU; dropout draws from the CUDA generator."""
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 64, (8, 17), generator=g).cuda()
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _model_and_adam(seed: int):
    torch.manual_seed(seed)
    model = build_model(64, 2).cuda()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def test_gpu_state_restores_bit_exactly_from_page_locked_slots(daemon):
    """Model, Adam moments and the CUDA generator live on the GPU. Snapshots are copied into slots that
    are page-locked; a fresh model and optimizer in the same process restore the last step's bytes, on
    the GPU, and then train exactly as the original goes on to train."""
    model, opt = _model_and_adam(0)
    loop = {"step": -1}
    guard = daemon.guard(model, opt, loop)
    try:
        assert guard._maps and all(m.pinned and m.t.is_pinned() for m in guard._maps.values()), \
            "slot mappings of a GPU state are page-locked at construction"
        for step in range(4):
            _train(model, opt, range(step, step + 1))
            loop["step"] = step
            guard.snapshot(step)
        guard.wait()
        saved = state_digest(model, opt)
        saved_rng = torch.cuda.get_rng_state()
        expected = _train(model, opt, range(4, 7))  # the trajectory after step 3
    finally:
        guard.close()
    assert not guard._maps, "close() unmaps (and unregisters) every slot"

    model2, opt2 = _model_and_adam(1)  # other weights, and no Adam state yet
    loop2 = {"step": -1}
    _train(model2, opt2, range(100, 103))  # moves the CUDA generator on
    guard2 = daemon.guard(model2, opt2, loop2)
    try:
        assert guard2.restore() == 3
        assert loop2["step"] == 3
        assert state_digest(model2, opt2) == saved
        assert torch.equal(torch.cuda.get_rng_state(), saved_rng)
        assert all(p.is_cuda for p in model2.parameters())
        assert all(v.is_cuda for st in opt2.state.values() for k, v in st.items() if k != "step")
        assert _train(model2, opt2, range(4, 7)) == expected
    finally:
        guard2.close()


def test_gpu_training_killed_at_random_moments_resumes_bit_identically(node, jobs, tmp_path):
    """The demo job on the GPU (2 ranks, DDP over gloo, dropout on the device): two SIGKILLs of a random
    rank at random moments; every loss of every attempt and every byte of the final state equal a run
    without failures."""
    from test_training import sigkill_rank, wait_for_attempt, wait_for_progress

    ref = JobSpec(out=str(tmp_path / "reference"), nproc=NPROC, steps=STEPS, snapshot=False, max_restarts=0,
                  device="cuda")
    assert jobs.finish(jobs.launch(ref), ref.out, RUN_TIMEOUT_S) == 0, f"see {ref.out}/launcher.log"
    node.start(["--log-level", "INFO"])
    kills = 2
    spec = JobSpec(out=str(tmp_path / "run"), nproc=NPROC, steps=STEPS, max_restarts=kills, step_sleep=0.02,
                   env=node.env, device="cuda")
    proc = jobs.launch(spec)
    rnd = random.Random(0xC0DA)
    for k in range(kills):
        wait_for_attempt(spec.out, k, proc, NPROC)
        wait_for_progress(spec.out, k, (k + 1) * STEPS // (kills + 1), proc, NPROC)
        sigkill_rank(spec.out, rnd.randrange(NPROC), k, NPROC)
    assert jobs.finish(proc, spec.out, RUN_TIMEOUT_S) == 0, f"see {spec.out}/launcher.log"
    assert compare(ref.out, spec.out, NPROC) == []
    assert node.held() == {r: [STEPS - 2, STEPS - 1] for r in range(NPROC)}


def test_gpu_restore_refuses_a_corrupt_step_and_uses_the_one_before(daemon):
    """A flipped byte in the newest sealed slot: restoring onto the GPU detects it before any byte reaches
    the device, and restores the step before it, bit-exactly."""
    model, opt = _model_and_adam(0)
    loop = {"step": -1}
    guard = daemon.guard(model, opt, loop, rng=False)
    digests = []
    try:
        for step in range(2):
            _train(model, opt, range(step, step + 1))
            loop["step"] = step
            guard.snapshot(step)
            guard.wait()
            digests.append(state_digest(model, opt))
    finally:
        guard.close()
    flip_bits(daemon.slot_file(0, 1), 4096, 0x01)

    model2, opt2 = _model_and_adam(1)
    loop2 = {"step": -1}
    guard2 = daemon.guard(model2, opt2, loop2, rng=False)
    try:
        assert guard2.restore() == 0
        assert loop2["step"] == 0 and state_digest(model2, opt2) == digests[0]
    finally:
        guard2.close()
    assert "shard for step 1 has checksum" in daemon.log()
