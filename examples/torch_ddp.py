"""A small causal language model trained with DistributedDataParallel, protected by snapguard.

    torchrun --nproc-per-node=2 examples/torch_ddp.py --steps 20

Kill any rank at any moment (or let torchrun's --max-restarts do it for you): the restarted job
resumes from the last step every rank snapshotted, bit for bit as if nothing had happened.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runlog import RunLog
from snapguard.integrations.torch import protect
from snapguard.procs import leave_process_group

VOCAB, SEQ = 128, 16


def build_model(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, width),
        torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.1, batch_first=True),
        torch.nn.Linear(width, VOCAB))


def batch(step: int, rank: int, device: str):
    """This rank's data for one step: a pure function of (step, rank), so a restarted job sees the same stream."""
    g = torch.Generator().manual_seed(step * 1009 + rank)
    x = torch.randint(0, VOCAB, (8, SEQ + 1), generator=g).to(device)
    return x[:, :-1], x[:, 1:]


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
    model = torch.nn.parallel.DistributedDataParallel(build_model(a.width).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    guard = protect(model, opt, start_daemon=True)      # snapguard: protect model, optimizer, RNGs
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

    log.final(model=model.module.state_dict(), optimizer=opt.state_dict())
    leave_process_group()


if __name__ == "__main__":
    main()
