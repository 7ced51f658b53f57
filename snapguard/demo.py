"""A small data-parallel training job that snapguard protects, and the launcher around it.

The worker is what a user's script looks like: torch.distributed over gloo, DDP, a small
transformer with dropout, Adam, data that is a pure function of the step. It logs every step's loss
(as exact float hex) and, at the end, a digest of every byte of its model and optimizer state, so
a run with failures can be compared bit for bit with a run without. The demo, the tests and the
chaos harness all run it through torch's elastic launcher, which restarts every worker when one dies.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass


def build_model(width: int, layers: int, vocab: int = 64, seq: int = 16):
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(width)
            self.attn = torch.nn.MultiheadAttention(width, 4, dropout=0.1, batch_first=True)
            self.ln2 = torch.nn.LayerNorm(width)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                           torch.nn.Linear(4 * width, width), torch.nn.Dropout(0.1))

        def forward(self, x, mask):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class TinyGPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, width)
            self.pos = torch.nn.Parameter(torch.zeros(seq, width))
            self.drop = torch.nn.Dropout(0.1)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))
            self.head = torch.nn.Linear(width, vocab)
            self.register_buffer("mask", torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1))

        def forward(self, idx):
            x = self.drop(self.emb(idx) + self.pos[: idx.shape[1]])
            for b in self.blocks:
                x = b(x, self.mask[: idx.shape[1], : idx.shape[1]])
            return self.head(x)

    return TinyGPT()


def batch(step: int, rank: int, seed: int, bsz: int = 8, seq: int = 16, vocab: int = 64):
    """The synthetic data of one step on one rank: a pure function, so any restart sees the same order."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    x = torch.randint(0, vocab, (bsz, seq + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def state_digest(model, optimizer) -> dict[str, str]:
    """sha256 of every tensor's bytes (and the repr of every other value) of model and optimizer state."""
    import torch

    out = {}

    def walk(prefix, node):
        if isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            out[prefix] = f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}/{i}", v)
        else:
            out[prefix] = repr(node)

    walk("model", model.state_dict())
    walk("optimizer", optimizer.state_dict())
    return out


def worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="snapguard.demo worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--step-sleep", type=float, default=0.0, help="pause per step, to give faults room")
    ap.add_argument("--no-snapshot", action="store_true", help="the reference run: no snapguard at all")
    ap.add_argument("--no-rng", action="store_true", help="snapshot without RNG state (a broken restore, for tests)")
    ap.add_argument("--amnesia", action="store_true",
                    help="every restart trains from step 0 without snapguard (a restart that lost every snapshot, for tests)")
    ap.add_argument("--crash-once-at", type=int, metavar="STEP", action="append", default=[],
                    help="rank 0 exits with code 1 the first time it logs STEP (a failure that no fault injected,"
                         " for tests); may be given again, for another step")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model trains; cuda: rank LOCAL_RANK's GPU (modulo the GPUs there are)")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before its first use

    import torch
    import torch.distributed as dist

    import snapguard
    from snapguard.procs import leave_process_group

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {os.environ.get('RANK')}: %(message)s")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    os.makedirs(a.out, exist_ok=True)
    pid_file = os.path.join(a.out, f"pid.r{rank}")
    with open(f"{pid_file}.{os.getpid()}", "w") as f:
        f.write(f"{os.getpid()} {attempt}\n")
    os.replace(f"{pid_file}.{os.getpid()}", pid_file)  # whole: the demo and the tests poll it while it changes
    device = torch.device("cpu")
    if a.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        # A run with failures must compute exactly what the run without did: no atomics in backward, and
        # attention by its plain formula (the fused kernels' backward passes are not deterministic).
        torch.use_deterministic_algorithms(True)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(a.seed)
    # DDP re-orders its gradient buckets after the first iteration it runs, and a bucket's layout
    # decides the order in which gloo sums each element: the first step after any restart would
    # round differently from the same step in an unbroken run. find_unused_parameters=True keeps
    # the initial buckets for good, so every run reduces in the same order.
    model = torch.nn.parallel.DistributedDataParallel(build_model(a.width, a.layers).to(device),
                                                      find_unused_parameters=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loop = {"step": -1}
    guard = None
    start = 0
    if not a.no_snapshot and not (a.amnesia and attempt > 0):
        guard = snapguard.Guard(model, opt, loop, rng=not a.no_rng)
        restored = guard.restore()
        start = 0 if restored is None else restored + 1
        if restored is not None and loop["step"] != restored:
            raise SystemExit(f"rank {rank}: loop state says step {loop['step']}, restore said {restored}")
    losses = open(os.path.join(a.out, f"loss.r{rank}.jsonl"), "a")
    for step in range(start, a.steps):
        x, y = (t.to(device) for t in batch(step, rank, a.seed))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loop["step"] = step
        if guard is not None:
            guard.snapshot(step)
        losses.write(json.dumps({"attempt": attempt, "step": step, "loss": loss.item().hex(), "t": time.time()}) + "\n")
        losses.flush()
        crashed = os.path.join(a.out, f"crashed-once-at-{step}")
        if step in a.crash_once_at and rank == 0 and not os.path.exists(crashed):
            open(crashed, "w").close()
            os._exit(1)
        if a.step_sleep:
            time.sleep(a.step_sleep)
    if guard is not None:
        guard.close()
    with open(os.path.join(a.out, f"final.r{rank}.json"), "w") as f:
        json.dump(state_digest(model.module, opt), f, indent=0, sort_keys=True)
    leave_process_group()
    return 0


# ---- launching and judging -------------------------------------------------------------------

@dataclass
class JobSpec:
    out: str
    nproc: int = 4
    steps: int = 30
    width: int = 64
    layers: int = 2
    step_sleep: float = 0.0
    max_restarts: int = 3
    snapshot: bool = True
    rng: bool = True
    device: str = "cpu"
    env: dict | None = None


def launch(spec: JobSpec, log_path: str | None = None) -> subprocess.Popen:
    """Start the worker on `nproc` ranks under torch's elastic launcher, which restarts all ranks when one dies."""
    cmd = [sys.executable, "-m", "snapguard.torchrun", "--standalone", f"--nproc-per-node={spec.nproc}",
           f"--max-restarts={spec.max_restarts}", "--monitor-interval=0.1", "-m", "snapguard.demo", "worker",
           "--out", spec.out, "--steps", str(spec.steps), "--width", str(spec.width), "--layers", str(spec.layers),
           "--step-sleep", str(spec.step_sleep), "--device", spec.device]
    if not spec.snapshot:
        cmd.append("--no-snapshot")
    if not spec.rng:
        cmd.append("--no-rng")
    # A fresh store per restart: with the shared one, gloo finds the dead attempt's addresses and hangs.
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **(spec.env or {}))
    os.makedirs(spec.out, exist_ok=True)
    logf = open(log_path or os.path.join(spec.out, "launcher.log"), "ab")
    return subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


def read_losses(out: str, nproc: int) -> list[dict]:
    rows = []
    for r in range(nproc):
        path = os.path.join(out, f"loss.r{r}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        rows.append(dict(json.loads(line), rank=r))
    return rows


def progress(out: str, nproc: int) -> int:
    """The lowest step that every rank has logged in its current attempt, -1 if some rank has none."""
    rows = read_losses(out, nproc)
    best = {}
    for row in rows:
        best[row["rank"]] = row["step"]
    return min(best.get(r, -1) for r in range(nproc))


# A restart may train again at most this many of the steps trained before a failure: the step whose snapshot
# was in flight, and one more (a step some rank had sealed past the newest one every rank holds, or a newest
# step found corrupt). More means snapshots were lost: a job that starts again from step 0 reproduces every
# loss and byte of the reference too, so `compare` alone cannot tell.
MAX_STEPS_LOST = 2


def restarts(rows: list[dict]) -> list[tuple[int, int, int]]:
    """(attempt, the step it restored, -1 for none; the newest step any rank logged before it) for every attempt
    after the first that logged a step."""
    by: dict[int, list[int]] = {}
    for r in rows:
        by.setdefault(r["attempt"], []).append(r["step"])
    out = []
    for a in sorted(by):
        before = [s for b in by if b < a for s in by[b]]
        if before:
            out.append((a, min(by[a]) - 1, max(before)))
    return out


def steps_lost_problems(rows: list[dict], bound: int = MAX_STEPS_LOST) -> list[str]:
    """The restarts that went back further than `bound` steps, or to scratch."""
    return [f"attempt {a} " + (f"started from scratch after step {reached}: every snapshot was lost" if restored < 0 else
                               f"restored step {restored} after step {reached}: {reached - restored} steps lost,"
                               f" at most {bound} may be")
            for a, restored, reached in restarts(rows) if reached - restored > bound]


def compare(reference: str, run: str, nproc: int) -> list[str]:
    """Every difference between a run and the reference: per-step losses (of every attempt) and final state."""
    problems = []
    ref = {(r["rank"], r["step"]): r["loss"] for r in read_losses(reference, nproc)}
    got = read_losses(run, nproc)
    for row in got:
        want = ref.get((row["rank"], row["step"]))
        if want != row["loss"]:
            problems.append(f"rank {row['rank']} step {row['step']} (attempt {row['attempt']}): loss"
                            f" {float.fromhex(row['loss'])!r}, reference {want and float.fromhex(want)!r}")
    for r in range(nproc):
        missing = {s for (rr, s) in ref if rr == r} - {row["step"] for row in got if row["rank"] == r}
        if missing:
            problems.append(f"rank {r} never logged steps {sorted(missing)}")
        paths = [os.path.join(d, f"final.r{r}.json") for d in (reference, run)]
        if not all(os.path.exists(p) for p in paths):
            problems.append(f"rank {r}: final state missing in {[p for p in paths if not os.path.exists(p)]}")
            continue
        a, b = (json.load(open(p)) for p in paths)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            problems.append(f"rank {r}: final state differs from the reference in {len(diff)} entries, first {diff[:3]}")
    return problems


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        code = worker_main(sys.argv[2:])
        # Everything is written and the process group is destroyed. Leave without the interpreter's and
        # C++'s teardown: about one rank in a few dozen (with or without snapguard: it happened in the
        # no-snapshot reference runs) aborted there with "terminate called without an active
        # exception", after its work was done, and the supervisor took that for a crash.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print("usage: python -m snapguard.demo worker --out DIR ...", file=sys.stderr)
    sys.exit(2)
