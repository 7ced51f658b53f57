"""A small causal language model sharded with FSDP2 (`fully_shard`), protected by snapguard.

    torchrun --nproc-per-node=2 examples/torch_fsdp2.py --steps 20

Each rank snapshots only its own shard of every parameter and optimizer moment: nothing is gathered.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from runlog import RunLog
from snapguard.integrations.torch import protect
from snapguard.procs import leave_process_group
from torch_ddp import batch, build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--out", help="write losses and a final-state digest here")
    a = ap.parse_args()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    log = RunLog(a.out, rank)
    torch.manual_seed(0)
    model = build_model(a.width).to(device)
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    fully_shard(model[1], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    guard = protect(model, opt, start_daemon=True)      # snapguard: local shards of model, optimizer; RNGs
    restored = guard.restore()                           # snapguard: the last step snapshotted, or None
    for step in range(0 if restored is None else restored + 1, a.steps):
        x, y = batch(step, rank, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        guard.snapshot(step)                             # snapguard: returns at once, copies in the background
        log.loss(step, loss.item())
    guard.close()

    model_sd, optim_sd = get_state_dict(model, opt)
    log.final(model=model_sd, optimizer=optim_sd)
    leave_process_group()


if __name__ == "__main__":
    main()
