"""The framework integrations on a GPU: the examples' state on CUDA, the frameworks unpatched.

The CPU integration tests run Megatron-Core and DeepSpeed through CPU shims (framework_shims.py); here
nothing is patched but `protect()` in the reference runs: Megatron's `CudaRNGStatesTracker` swaps real
CUDA generator states, DeepSpeed's ZeRO-2 partitions and torch's FSDP2 shards live on the GPU, and the
process group is NCCL. One Megatron run trains in bf16 under Megatron's DDP with the distributed
optimizer from `get_megatron_optimizer`, which the CPU tests can only stand in for.

Each example runs as a one-rank job on the first GPU, once without snapguard and once with a SIGKILL
halfway through enqueuing its snapshot's device-to-host copies of step 3; torchrun restarts it, it
restores, and every loss and every byte of its final state must equal the reference's.

Skipped without a CUDA device (CI has none). Run on a GPU machine with
`python -m pytest tests/test_cuda_integrations.py`.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from integration_helpers import scenarios

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 6
EXAMPLES = {
    "ddp": ("torch_ddp.py", ["--steps", str(STEPS)], STEPS),
    "fsdp2": ("torch_fsdp2.py", ["--steps", str(STEPS)], STEPS),
    "zero2": ("deepspeed_zero.py", ["--zero", "2", "--steps", str(STEPS)], STEPS),
    "megatron": ("megatron_gpt.py", ["--tp", "1", "--iters", str(STEPS)], STEPS),
    # bf16 under Megatron's DDP, the distributed optimizer's fp32 main parameters: what Megatron-LM trains with
    "megatron_distopt": ("megatron_gpt.py", ["--tp", "1", "--iters", str(STEPS), "--megatron-optimizer"], STEPS),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS picks the same reductions in every run
        with scenarios(str(tmp_path_factory.mktemp("cuda-integrations")), EXAMPLES, nproc=1, cpu_shims=False) as s:
            yield s


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_on_a_gpu_resumes_bit_exactly_after_sigkill(runs, name):
    runs[name].check()
    final = json.load(open(os.path.join(runs[name].run.out, "final.r0.json")))
    model = {k: v for k, v in final.items() if k.split("/")[1] in ("model", "module") and "@" in v}
    on_cpu = [k for k, v in model.items() if "@cuda:" not in v]
    assert model and not on_cpu, f"{name}: model tensors {on_cpu[:3]} were not on the GPU"
