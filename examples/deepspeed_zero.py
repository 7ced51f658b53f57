"""A small causal language model trained by DeepSpeed with ZeRO stage 1, 2 or 3, protected by snapguard.

    torchrun --nproc-per-node=2 examples/deepspeed_zero.py --zero 2 --steps 20
    torchrun --nproc-per-node=2 examples/deepspeed_zero.py --zero 3 --offload --steps 20   # ZeRO-Offload

(or `deepspeed --num_gpus 2 examples/deepspeed_zero.py ...`). Each rank snapshots its own partition
of the fp32 master weights and optimizer state every step, in memory.
"""

import argparse
import os

import deepspeed
import torch
import torch.nn.functional as F

from runlog import RunLog
from snapguard.integrations.deepspeed import protect
from snapguard.procs import leave_process_group
from torch_ddp import batch, build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--offload", action="store_true", help="ZeRO-Offload: the fp32 weights and optimizer state in CPU"
                    " memory, the optimizer step on the CPU; with --zero 3, the partitioned parameters too")
    ap.add_argument("--out", help="write losses and a final-state digest here")
    # The `deepspeed` launcher passes --local_rank=N; LOCAL_RANK in the environment says the same.
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    deepspeed.init_distributed(dist_backend="nccl" if device != "cpu" else "gloo")
    rank = torch.distributed.get_rank()
    log = RunLog(a.out, rank)
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
        "zero_optimization": {"stage": a.zero},
        "steps_per_print": 10 ** 9,
    }
    if a.zero == 3:  # this small model's larger parameters partitioned, its small ones kept whole on every rank
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 1024
    if a.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if a.zero == 3:
            config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    engine, _, _, _ = deepspeed.initialize(model=build_model(a.width), config=config)
    seen = {"tokens": 0}

    guard = protect(engine, client_state=seen, start_daemon=True)   # snapguard: module, ZeRO partitions, counters
    guard.restore()                                                  # snapguard: engine.global_steps restored
    for step in range(engine.global_steps, a.steps):
        x, y = batch(step, rank, device)
        loss = F.cross_entropy(engine(x).flatten(0, 1), y.flatten())
        engine.backward(loss)
        engine.step()
        seen["tokens"] += x.numel()
        guard.snapshot()                                             # snapguard: returns at once
        log.loss(step, loss.item())
    guard.close()

    opt = engine.optimizer
    if a.zero == 3:  # the parameters are partitioned: this rank's fp32 partition and the optimizer state over it
        fp32 = opt.fp32_partitioned_groups_flat
        optim = opt.state_dict()["optimizer_state_dict"]  # its fp32_flat_groups are `fp32`, digested once
    else:
        fp32, optim = getattr(opt, "single_partition_of_fp32_groups", None), getattr(opt, "optimizer", opt).state_dict()
    offloaded = {k: getattr(opt, k) for k in ("cpu_offload", "offload_optimizer", "offload_param") if hasattr(opt, k)}
    log.final(module=engine.module.state_dict(), fp32=fp32, optimizer=optim, lr=engine.get_lr(), seen=seen,
              counters=[engine.global_steps, engine.global_samples], offloaded=offloaded)
    leave_process_group()


if __name__ == "__main__":
    main()
