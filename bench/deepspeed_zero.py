"""DeepSpeed ZeRO: the training stall per save and the restore time of `engine.save_checkpoint` /
`load_checkpoint` against snapguard's `snapshot()` / `restore()` (`snapguard.integrations.deepspeed`), for the
same engine and state, in one run.

    torchrun --standalone --nproc-per-node=2 bench/deepspeed_zero.py --zero 3
    torchrun --standalone --nproc-per-node=2 bench/deepspeed_zero.py --zero 3 --width 256 --saves 2   # quick
    torchrun --standalone --nproc-per-node=2 bench/deepspeed_zero.py --zero 3 --offload              # ZeRO-Offload

A causal language model (embedding, --layers transformer layers, output layer) trained by DeepSpeed with
ZeRO --zero over the ranks (data parallel, gloo on a CPU), fp32 with Adam. Each save follows an
optimizer step and the next training step runs before the next save, as in a loop that saves every step.
Stall: `save_checkpoint` blocks for its whole write; snapguard's `snapshot()` returns at once, and the
training loop then waits only if the copy is still running when the next optimizer step comes (timed here
as an explicit `guard.wait()` right before `engine.step()`). Restore: back to the last save, in the same
process. Checkpoint files go under --dir (/dev/shm by default: the fastest target they can have).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


class LM(torch.nn.Module):
    def __init__(self, vocab: int, width: int, layers: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.Sequential(*[
            torch.nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
            for _ in range(layers)])
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, x):
        return self.out(self.layers(self.emb(x)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--dir", default="/dev/shm", help="where save_checkpoint writes")
    ap.add_argument("--offload", action="store_true", help="ZeRO-Offload: fp32 partitions and optimizer state in CPU"
                    " memory (offload_optimizer; with --zero 3, offload_param too)")
    a = ap.parse_args()
    from framework_shims import install_import_hooks
    install_import_hooks()  # skips compiling DeepSpeed's shared-memory op, which gloo does not use
    import deepspeed

    from snapguard.integrations.deepspeed import protect
    from snapguard.procs import leave_process_group

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = {"train_micro_batch_size_per_gpu": a.batch,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": a.zero}, "steps_per_print": 10 ** 9}
    if a.offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if a.zero == 3:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    engine, *_ = deepspeed.initialize(model=LM(a.vocab, a.width, a.layers), config=cfg)

    def step(i: int, before_update=None) -> None:
        g = torch.Generator().manual_seed(i * world + rank)
        x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        engine.backward(F.cross_entropy(engine(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()))
        if before_update is not None:
            before_update()
        engine.step()

    it = 0
    step(it)
    t0 = time.perf_counter()
    for _ in range(3):
        it += 1
        step(it)
    step_s = (time.perf_counter() - t0) / 3
    holder = [tempfile.mkdtemp(prefix="snapguard-bench-ds-", dir=a.dir) if rank == 0 else None]
    dist.broadcast_object_list(holder)
    root = holder[0]
    results = {}
    try:
        # snapguard: snapshot() after each step; the next step waits (timed) only for a copy still running
        guard = protect(engine, start_daemon=True, job=f"bench-ds-{os.getppid()}")
        guard.snapshot()
        guard.wait()  # the first snapshot: slots and layout, outside the comparison
        stalls, waited = [], [0.0]

        def wait():
            t = time.perf_counter()
            guard.wait()
            waited[0] = time.perf_counter() - t

        for i in range(a.saves):
            it += 1
            step(it, wait)
            if i:
                stalls.append(call + waited[0])
            want = engine.global_steps
            t = time.perf_counter()
            guard.snapshot()
            call = time.perf_counter() - t
        it += 1
        step(it, wait)  # also something for the restore to undo
        stalls.append(call + waited[0])
        dist.barrier()
        t = time.perf_counter()
        got = guard.restore()
        restore_s = time.perf_counter() - t
        if got != want:
            raise SystemExit(f"restore gave step {got}, expected {want}")
        results["snapguard"] = {"stalls": stalls, "restore_s": restore_s}
        guard.close(shutdown_daemon=rank == 0)

        stalls = []
        for i in range(a.saves):
            it += 1
            step(it)
            dist.barrier()
            t = time.perf_counter()
            engine.save_checkpoint(root, tag=f"ds-{i}")
            stalls.append(time.perf_counter() - t)
        it += 1
        step(it)
        dist.barrier()
        t = time.perf_counter()
        engine.load_checkpoint(root, tag=f"ds-{a.saves - 1}")
        results["deepspeed"] = {"stalls": stalls, "restore_s": time.perf_counter() - t}
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    opt = engine.optimizer
    fp32 = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups")
    nbytes = 3 * sum(t.numel() * t.element_size() for t in fp32)  # master weights + Adam's two moments
    nparams = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: whole sizes
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        print(f"# bench/deepspeed_zero.py {' '.join(sys.argv[1:]) or '(defaults)'}: ZeRO {a.zero}"
              f"{' with ZeRO-Offload to the CPU' if a.offload else ''}, {world} ranks"
              f" (data parallel, gloo), {nparams / 1e6:.1f}M params,"
              f" fp32 + Adam: {nbytes / (1 << 20):.0f} MiB of partitions per rank;"
              f" training step without saving {step_s:.3f} s; {a.saves} saves each; checkpoints under {a.dir}")
        print()
        print("| method | stall per save, median (max over ranks) s | worst s | stall / step time | restore s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        row = {}
        for m, name in (("snapguard", "snapguard `snapshot()` / `restore()`"),
                        ("deepspeed", "DeepSpeed `save_checkpoint` / `load_checkpoint`")):
            med = max(statistics.median(g[m]["stalls"]) for g in gathered)
            worst = max(max(g[m]["stalls"]) for g in gathered)
            restore = max(g[m]["restore_s"] for g in gathered)
            row[m] = (med, restore)
            print(f"| {name} | {med:.3f} | {worst:.3f} | {med / step_s:.1%} | {restore:.3f} |")
        print()
        (sm, sr), (dm, dr) = row["snapguard"], row["deepspeed"]
        print(f"DeepSpeed / snapguard: stall {dm / max(sm, 1e-6):.1f}x, restore {dr / sr:.1f}x")
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
