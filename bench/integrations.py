"""Training stall per save, and restore time: Megatron's dist_checkpointing.save, DeepSpeed's
save_checkpoint, DCP's async_save and snapguard's snapshot, for the same model and state, in one run.

    torchrun --standalone --nproc-per-node=2 bench/integrations.py --hidden 1024 --layers 4 --saves 4

Every method saves one state: a Megatron-Core GPTModel with tensor-parallel size 2 (each rank its
shard) and an Adam optimizer over it, trained a step so that every moment exists. Each save is taken
right after an optimizer step, and the next training step runs before the next save, as in a loop
that saves every step. The stall of a save is the time the training loop is blocked by it: the call
itself, plus, for the asynchronous methods, any wait it forces later (DCP: the previous save must
finish before the next starts; snapguard: the optimizer step waits until the copy has left the
parameters). Restore is the time to load the last save back into the live model and optimizer.
File-based methods write under --dir (/dev/shm by default: the fastest target they can have).

On a CPU-only machine the script installs the test suite's framework shims (tests/framework_shims.py)
and makes Megatron's torch.cuda.synchronize/current_device calls no-ops: the real GPU code paths
need neither. Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from snapguard.procs import leave_process_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def cpu_shims() -> None:
    spec = importlib.util.spec_from_file_location("framework_shims", os.path.join(REPO, "tests", "framework_shims.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.install_import_hooks()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


def build(a):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    torch.manual_seed(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    cfg = TransformerConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=16,
                            use_cpu_initialization=True, hidden_dropout=0.1, attention_dropout=0.1,
                            tensor_model_parallel_size=dist.get_world_size())
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=a.vocab,
                     max_sequence_length=a.seq)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    causal = torch.triu(torch.ones(1, 1, a.seq, a.seq, dtype=torch.bool), 1)
    pos = torch.arange(a.seq).unsqueeze(0).expand(a.batch, a.seq)

    def step(i: int) -> float:
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        loss = model(x[:, :-1], pos, causal, labels=x[:, 1:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return model, opt, step


def state_bytes(model, opt) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def bench_snapguard(a, model, opt, step, it: int) -> dict:
    from snapguard.integrations.megatron import protect

    guard = protect(model, opt, start_daemon=True, job=a.job, node="bench")
    waited = [0.0]
    inner = guard.before_update

    def timed_before_update():
        t0 = time.perf_counter()
        inner()
        waited[0] += time.perf_counter() - t0

    guard.before_update = timed_before_update
    stalls = []
    for i in range(a.saves):
        it += 1
        waited[0] = 0.0
        if i:
            step(it)  # the optimizer step inside waits, if the copy of the previous snapshot is not done
            stalls[-1] += waited[0]
        t0 = time.perf_counter()
        guard.snapshot(it)
        stalls.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    guard.wait()
    last = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    restored = guard.restore()
    restore_s = time.perf_counter() - t0
    assert restored == it, (restored, it)
    guard.close(shutdown_daemon=dist.get_rank() == 0)
    return {"stalls": stalls, "restore_s": restore_s, "last_seal_wait_s": last}, it


def bench_dcp(a, model, opt, step, it: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def state():
        # Tensor-parallel shards share their names across ranks: key them by rank, or DCP would treat them as replicas.
        msd, osd = get_state_dict(model, opt)
        return {f"tp{dist.get_rank()}": {"model": msd, "optim": osd}}

    stalls, fut, path = [], None, None
    for i in range(a.saves):
        it += 1
        if i:
            step(it)
        t0 = time.perf_counter()
        if fut is not None:
            fut.result()  # one save in flight: the next one waits for it
        path = os.path.join(root, f"dcp-{i}")
        fut = dcp.async_save(state(), checkpoint_id=path)
        stalls.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fut.result()
    last = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    sd = state()
    dcp.load(sd, checkpoint_id=path)
    mine = sd[f"tp{dist.get_rank()}"]
    set_state_dict(model, opt, model_state_dict=mine["model"], optim_state_dict=mine["optim"])
    restore_s = time.perf_counter() - t0
    return {"stalls": stalls, "restore_s": restore_s, "last_seal_wait_s": last}, it


def bench_megatron(a, model, opt, step, it: int, root: str) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    def sharded():
        msd = model.sharded_state_dict()
        osd = opt.state_dict()
        osd = {"state": {k: dict(v) for k, v in osd["state"].items()}, "param_groups": osd["param_groups"]}
        ids = get_param_id_to_sharded_param_map(msd, (p for g in opt.param_groups for p in g["params"]))
        optim_state_to_sharding_state(osd, ids, exclude_keys=("step",))
        return {"model": msd, "optimizer": osd}

    stalls, path = [], None
    for i in range(a.saves):
        it += 1
        if i:
            step(it)
        path = os.path.join(root, f"megatron-{i}")
        if dist.get_rank() == 0:
            os.makedirs(path)
        dist.barrier()
        t0 = time.perf_counter()
        dist_checkpointing.save(sharded(), path)
        stalls.append(time.perf_counter() - t0)
    dist.barrier()
    t0 = time.perf_counter()
    loaded = dist_checkpointing.load(sharded(), path)
    model.load_state_dict(loaded["model"], strict=False)
    osd = loaded["optimizer"]
    params = [p for g in opt.param_groups for p in g["params"]]
    for k, st in osd["state"].items():
        st["step"] = opt.state[params[k]]["step"].clone()  # saved apart by Megatron-LM; here: unchanged
    opt.load_state_dict(osd)
    restore_s = time.perf_counter() - t0
    return {"stalls": stalls, "restore_s": restore_s}, it


def bench_deepspeed(a, model, it: int, root: str) -> dict:
    import deepspeed
    from megatron.core import parallel_state as ps

    class MPU:  # DeepSpeed's model-parallel interface, answered by Megatron's parallel state
        get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
        get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
        get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
        get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
        get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
        get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

    cfg = {"train_micro_batch_size_per_gpu": a.batch, "optimizer": {"type": "Adam", "params": {"lr": 1e-4,
                                                                                              "torch_adam": True}},
           "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, mpu=MPU())
    causal = torch.triu(torch.ones(1, 1, a.seq, a.seq, dtype=torch.bool), 1)
    pos = torch.arange(a.seq).unsqueeze(0).expand(a.batch, a.seq)

    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        engine.backward(engine(x[:, :-1], pos, causal, labels=x[:, 1:]).mean())
        engine.step()

    step(it)
    stalls = []
    for i in range(a.saves):
        it += 1
        if i:
            step(it)
        t0 = time.perf_counter()
        engine.save_checkpoint(root, tag=f"ds-{i}")
        stalls.append(time.perf_counter() - t0)
    dist.barrier()
    t0 = time.perf_counter()
    engine.load_checkpoint(root, tag=f"ds-{a.saves - 1}")
    restore_s = time.perf_counter() - t0
    return {"stalls": stalls, "restore_s": restore_s}, it


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--dir", default="/dev/shm", help="where file-based methods write")
    ap.add_argument("--job", default=f"bench-int-{os.getppid()}")
    ap.add_argument("--methods", default="snapguard,dcp,megatron,deepspeed")
    ap.add_argument("--json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        cpu_shims()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank = dist.get_rank()
    root = None
    if rank == 0:
        root = tempfile.mkdtemp(prefix="snapguard-bench-", dir=a.dir)
    holder = [root]
    dist.broadcast_object_list(holder)
    root = holder[0]
    model, opt, step = build(a)
    it = 0
    step(it)
    t0 = time.perf_counter()
    for _ in range(3):
        it += 1
        step(it)
    step_s = (time.perf_counter() - t0) / 3
    nbytes = state_bytes(model, opt)
    results = {}
    try:
        for m in a.methods.split(","):
            dist.barrier()
            if m == "snapguard":
                results[m], it = bench_snapguard(a, model, opt, step, it)
            elif m == "dcp":
                results[m], it = bench_dcp(a, model, opt, step, it, root)
            elif m == "megatron":
                results[m], it = bench_megatron(a, model, opt, step, it, root)
            elif m == "deepspeed":
                results[m], it = bench_deepspeed(a, model, it, root)
            else:
                raise SystemExit(f"unknown method {m}")
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"results": results, "bytes": nbytes})
    if rank == 0:
        report(a, step_s, gathered)
    leave_process_group()
    return 0


NAMES = {"snapguard": "snapguard `snapshot()` (integrations.megatron)", "dcp": "DCP `async_save` (thread)",
         "megatron": "Megatron `dist_checkpointing.save`", "deepspeed": "DeepSpeed `save_checkpoint` (ZeRO-1)"}


def report(a, step_s: float, gathered: list) -> None:
    nbytes = max(g["bytes"] for g in gathered)
    print(f"\nstate per rank: {nbytes / MIB:.0f} MiB (GPTModel hidden {a.hidden}, {a.layers} layers, vocab {a.vocab},"
          f" TP={len(gathered)}, fp32 + Adam); training step without saving: {step_s:.3f} s; {a.saves} saves each;"
          f" files under {a.dir}\n")
    print("| method | stall per save, median (max over ranks) s | stall per save, worst s | stall / step time |"
          " stall / snapguard's | restore s | restore / snapguard's |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    out = {}
    for m in gathered[0]["results"]:
        per_rank = [g["results"][m] for g in gathered]
        # the first save of a file-based method includes one-time set-up: report it apart from the steady state
        out[m] = {"stall_median_s": max(statistics.median(r["stalls"][1:] or r["stalls"]) for r in per_rank),
                  "stall_worst_s": max(max(r["stalls"]) for r in per_rank),
                  "restore_s": max(r["restore_s"] for r in per_rank), "stalls": [r["stalls"] for r in per_rank]}
    ours = out.get("snapguard")
    for m, r in out.items():
        ratios = [f"{r[k] / ours[k]:.1f}x" if ours and ours[k] > 0 else "-" for k in ("stall_median_s", "restore_s")]
        print(f"| {NAMES[m]} | {r['stall_median_s']:.3f} | {r['stall_worst_s']:.3f} | {r['stall_median_s'] / step_s:.0%} |"
              f" {ratios[0]} | {r['restore_s']:.3f} | {ratios[1]} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "step_s": step_s, "state_bytes_per_rank": nbytes, "results": out}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
