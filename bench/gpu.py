"""snapguard's CUDA path against the checkpoints a user would otherwise pick, on one GPU, in one run.

    python bench/gpu.py                               # GPT-style model on cuda:0, ~268M params + Adam: ~3.2 GB
    python bench/gpu.py --layers 2 --rounds 1         # a quick check
    python bench/gpu.py --accum 4 --modes none,snapguard --restore-reps 0   # shorter steps, snapguard alone

The model trains in bf16 autocast with fp32 parameters and fused Adam on the GPU; its state (parameters
and both Adam moments, fp32) lives in GPU memory. Four sections:

1. Device-to-host bandwidth: one GPU tensor copied into pageable memory, into memory torch pinned, and
   into a snapshot slot (shared memory that Guard page-locked with cudaHostRegister).
2. Step time with a save every step, against none: `guard.snapshot()` (a side-stream copy into the
   slot, checksums and the daemon's verification on host cores), `torch.save` to disk, and
   `dcp.async_save` (a new default stager per call; and one reused stager staging in the background,
   waited for before `optimizer.step()`, as torchtitan does: into pinned memory, or into pageable memory
   where this torch's stager cannot reuse pinned buffers). Interleaved blocks, the first step of each
   discarded, as in bench/core.py.
3. Restore time, back onto the GPU: `guard.restore()` in a fresh Guard against `torch.load(map_location=
   "cuda")` and `dcp.load` of the same state, with the files in the page cache and dropped from it.
   After every restore the state is compared with the saved bytes.

Run alone on the machine; a GPU is required.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("SNAPGUARD_TIMEOUT_S", "300")

import torch  # noqa: E402
import xxhash  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core  # noqa: E402
import core_util as U  # noqa: E402
from core import DcpMode, Mode, SnapguardMode, StepRecord, TorchSaveMode  # noqa: E402

from snapguard.guard import Guard  # noqa: E402
from snapguard.layout import default_hash_threads  # noqa: E402

GIB = 1 << 30


class GpuTrainer:
    """One optimizer step of `accum` micro-batches; the GPU is synchronized at the phase boundaries, as a
    loop that logs its loss every step is."""

    def __init__(self, model, optimizer, batches: torch.Tensor, vocab: int):
        self.model, self.optimizer, self.batches, self.vocab = model, optimizer, batches, vocab

    def step(self, mode: Mode, step: int, counted: bool = True) -> StepRecord:
        sync = torch.cuda.synchronize
        t0, c0 = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=False)
        for b in self.batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.model(b[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.float().reshape(-1, self.vocab), b[:, 1:].reshape(-1))
            (loss / len(self.batches)).backward()
        sync()
        t1 = time.perf_counter()
        mode.before_optimizer()
        t2 = time.perf_counter()
        self.optimizer.step()
        sync()
        t3 = time.perf_counter()
        mode.after_step(step)
        t4 = time.perf_counter()
        return StepRecord(mode.name, t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, time.process_time() - c0, counted)


REUSED_STAGERS = (("pinned memory", StagingOptions(True, False, True, True)),     # non-blocking copies
                  ("pageable memory", StagingOptions(False, False, True, False)))


def reused_stager(mode: DcpMode, model, optimizer) -> list[str]:
    """Give the reused-stager mode the fastest stager this torch can reuse: pinned memory with non-blocking
    copies, else pageable memory. Each is tried by staging the state twice (a reused stager takes another
    path the second time). Returns why each one tried failed: all of them, and the mode is left out."""
    failed = []
    for memory, options in REUSED_STAGERS:
        stager = DefaultStager(options)
        try:
            for _ in range(2):
                msd, osd = get_state_dict(model, optimizer)
                fut = stager.stage({"model": msd, "optim": osd})
                getattr(fut, "result", lambda: None)()
        except Exception as e:  # noqa: BLE001 (any failure: try the next, and say why)
            stager.close()
            failed.append(f"{memory}: {type(e).__name__}: {e}")
            continue
        mode.stager.close()
        mode.stager = stager
        mode.label = f"`dcp.async_save` (reused stager, {memory}, background staging)"
        return failed
    return failed


def on_gpu(fn) -> float:
    """Seconds `fn` takes, until the GPU has done what it queued."""
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def gbps(nbytes: int, fn, reps: int = 5) -> float:
    return nbytes / U.best_seconds(lambda: on_gpu(fn), reps) / U.GB


def bandwidth_section(slot: torch.Tensor) -> None:
    n = min(GIB, slot.numel())
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    pageable = torch.empty(n, dtype=torch.uint8)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream()
    rows = []
    for label, dst in (("pageable memory (torch.empty)", pageable), ("pinned memory (pin_memory=True)", pinned),
                       ("snapshot slot (shared memory, cudaHostRegister)", slot[:n])):
        def d2h(dst=dst):
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            stream.synchronize()

        def h2d(dst=dst):
            src.copy_(dst, non_blocking=True)
        rows.append([label, str(dst.is_pinned()), f"{gbps(n, d2h):.1f}", f"{gbps(n, h2d):.1f}"])
    assert torch.equal(slot[:n].cuda(), src), "the slot holds the bytes copied into it"
    print(U.table(["host memory", "is_pinned()", "GPU -> host GB/s (side stream)", "host -> GPU GB/s"], rows,
                  right=(2, 3)))
    print()


def snapshot_of_state(model, optimizer) -> list[torch.Tensor]:
    msd, osd = model.state_dict(), optimizer.state_dict()
    out = [t.detach().clone() for t in msd.values()]
    for st in osd["state"].values():
        out += [v.detach().clone() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def same_state(saved: list[torch.Tensor], model, optimizer) -> bool:
    now = snapshot_of_state(model, optimizer)
    return len(now) == len(saved) and all(a.device == b.device and torch.equal(a, b) for a, b in zip(saved, now))


def restore_section(trainer: GpuTrainer, guard: Guard, model, optimizer, make_guard, work: str, reps: int,
                    step: int) -> None:
    trainer.step(Mode(), step)
    guard.snapshot(step)
    guard.wait()
    saved = snapshot_of_state(model, optimizer)
    pt, dcp_dir = os.path.join(work, "state.pt"), os.path.join(work, "dcp")
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}, pt)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=dcp_dir, no_dist=True)
    guard.close()
    t = time.perf_counter()
    fresh = make_guard()
    construct = time.perf_counter() - t
    times: dict[str, list[float]] = {}

    def spoil() -> None:  # every restore must really write the state back
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)

    def sg() -> None:
        assert fresh.restore() == step

    def torch_into() -> None:
        core.torch_load_into(pt, model, optimizer, map_location="cuda")

    def dcp_into() -> None:
        core.dcp_load_into(dcp_dir, model, optimizer)

    methods = [("sg", sg), ("torch", torch_into), ("dcp", dcp_into)]
    for r in range(reps):
        for key, fn in methods:
            spoil()
            times.setdefault(key, []).append(on_gpu(fn))
            assert same_state(saved, model, optimizer), f"{key} restored other bytes than were saved"
        for key, path, fn in (("torch_cold", pt, torch_into), ("dcp_cold", dcp_dir, dcp_into)):
            U.sync_and_drop(path)
            resident = U.resident_fraction(path)
            spoil()
            times.setdefault(key, []).append(on_gpu(fn))
            assert same_state(saved, model, optimizer), f"{key} restored other bytes than were saved"
            times.setdefault(key + "_resident", []).append(resident if resident is not None else float("nan"))
        core.progress(f"restore rep {r + 1}/{reps}")
    fresh.close()
    sg_s = U.median(times["sg"])

    def resident(key: str) -> str:  # as fincore saw it, where it is installed
        x = U.mean(times[key + "_resident"])
        return "" if x != x else f" ({x * 100:.0f}% resident)"

    rows = [["snapguard `guard.restore()` (fresh Guard)", "daemon shared memory (page-locked)", sg_s]]
    rows += [["`torch.load(map_location='cuda')` + load_state_dict", "disk file, in page cache", U.median(times["torch"])],
             ["`torch.load(map_location='cuda')` + load_state_dict",
              f"disk file, dropped from page cache{resident('torch_cold')}",
              U.median(times["torch_cold"])],
             ["`dcp.load` + set_state_dict", "disk dir, in page cache", U.median(times["dcp"])],
             ["`dcp.load` + set_state_dict",
              f"disk dir, dropped from page cache{resident('dcp_cold')}",
              U.median(times["dcp_cold"])]]
    print(U.table(["restore onto the GPU", "source", "s (median)", "time / snapguard's"],
                  [[a, b, f"{s:.3f}", U.ratio(s, sg_s)] for a, b, s in rows], right=(2, 3)))
    print()
    print(f"Every restore above was checked: every parameter and Adam tensor equal to the saved bytes, on the GPU."
          f" Fresh Guard() construction (Reserve, mapping and page-locking the slots): {construct:.2f} s.")
    print(f"Target: restore at least 10x faster than torch.load from disk: {U.ratio(U.median(times['torch']), sg_s)}"
          f" (page cache), {U.ratio(U.median(times['torch_cold']), sg_s)} (dropped from it).")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=8, help="sequences per micro-batch (default 8)")
    ap.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step (default 8)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--restore-reps", type=int, default=3, help="0: no restore section")
    ap.add_argument("--hash-threads", type=int, help="Guard's and the daemon's (default: theirs)")
    ap.add_argument("--chunk-mib", type=int, default=4, help="checksum chunk in MiB (default 4, Guard's default)")
    ap.add_argument("--modes", default="none,snapguard,torch_save_disk,dcp_async,dcp_async_reuse")
    ap.add_argument("--disk-dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    t_start = time.monotonic()
    torch.backends.cuda.matmul.allow_tf32 = True
    model = U.build_gpt(a.width, a.layers, a.vocab, a.seq).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, a.vocab, (a.accum, a.micro, a.seq + 1), generator=g).cuda()
    trainer = GpuTrainer(model, optimizer, batches, a.vocab)
    trainer.step(Mode(), 0)  # creates Adam's moments
    state_gb = U.state_bytes(model, optimizer) / U.GB
    print(f"# snapguard GPU benchmark: {torch.cuda.get_device_name()}, torch {torch.__version__},"
          f" CUDA {torch.version.cuda}, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"# model: width {a.width}, {a.layers} layers, vocab {a.vocab}, seq {a.seq};"
          f" {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params; state (fp32 params + Adam) {state_gb:.2f} GB;"
          f" {a.accum} x {a.micro} sequences of {a.seq} tokens per step, bf16 autocast")
    print()

    run_dir = tempfile.mkdtemp(prefix="sg-gpubench-", dir="/tmp")
    work = tempfile.mkdtemp(prefix="sg-gpubench-", dir=a.disk_dir)
    job = f"gpubench{os.getpid()}"
    daemon = core.start_daemon(job, run_dir, ["--hash-threads", str(a.hash_threads)] if a.hash_threads else [])
    opts = {"chunk_size": a.chunk_mib << 20, **({"hash_threads": a.hash_threads} if a.hash_threads else {})}

    def make_guard() -> Guard:
        return Guard(model=model, optimizer=optimizer, job=job, node=core.NODE, run_dir=run_dir, rank=0, world_size=1,
                     **opts)

    try:
        t = time.perf_counter()
        guard = make_guard()
        core.progress(f"Guard() {time.perf_counter() - t:.2f} s (slots reserved, mapped, page-locked)")
        slot = next(iter(guard._maps.values())).t
        print("## 1. Device-to-host bandwidth")
        print()
        bandwidth_section(slot)

        paths = {"torch_save_disk": os.path.join(work, "step.pt"), "dcp": os.path.join(work, "step_dcp")}
        sg_mode = SnapguardMode(guard)
        reuse = DcpMode("dcp_async_reuse", "`dcp.async_save` (reused stager)", paths["dcp"] + "_r", model, optimizer,
                        reuse=True)
        failed = reused_stager(reuse, model, optimizer)
        left_out = len(failed) == len(REUSED_STAGERS)
        if failed:
            print(f"torch {torch.__version__}'s DefaultStager failed to stage this state twice, as a reused stager"
                  f" does, into {'; '.join(failed)}." + (" `dcp.async_save` with a reused stager is left out."
                                                         if left_out else ""))
            print()
        if left_out:
            reuse.close()
        all_modes = {"none": Mode(), "snapguard": sg_mode,
                     "torch_save_disk": TorchSaveMode("torch_save_disk", "`torch.save` to disk",
                                                      paths["torch_save_disk"], model, optimizer),
                     "dcp_async": DcpMode("dcp_async", "`dcp.async_save` (new default stager per call)", paths["dcp"],
                                          model, optimizer, reuse=False),
                     "dcp_async_reuse": reuse}
        if left_out:
            del all_modes["dcp_async_reuse"]
        modes = [all_modes[m] for m in a.modes.split(",") if m in all_modes]
        print("## 2. Step time with a save every step")
        print()
        records, daemon_cpu = core.run_interleaved(trainer, modes, a.rounds, a.block, a.warmup, daemon, 1)
        for m in modes:
            m.close()
        s1 = core.report_steps(records, modes, daemon_cpu, [], state_gb)  # its per-snapshot line is the CPU path's
        done = [j for j in sg_mode.jobs if j.sealed.is_set() and j.error is None]
        if done:
            parts = {k: U.median([getattr(j, k) for j in done]) for k in ("begin_s", "copy_s", "hash_s", "seal_s")}
            print(f"snapguard per snapshot (median of {len(done)}): slot grant {parts['begin_s']:.3f} s, device-to-host"
                  f" copy {parts['copy_s']:.3f} s ({state_gb / parts['copy_s']:.1f} GB/s), checksums"
                  f" {parts['hash_s']:.3f} s ({a.hash_threads or default_hash_threads()} threads, {a.chunk_mib} MiB chunks), seal {parts['seal_s']:.3f} s"
                  f" (the daemon's verification + round trip); xxhash {xxhash.VERSION}")
            print()
        core.print_targets(s1)
        print()
        if a.restore_reps:
            print("## 3. Restore onto the GPU")
            print()
            restore_section(trainer, guard, model, optimizer, make_guard, work, a.restore_reps, 10_000)
        else:
            guard.close()
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"# total {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
