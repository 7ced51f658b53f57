"""One restore in a fresh process, as after a trainer crash: bench/core.py runs this as a subprocess.

The model is built as the training script builds it (its parameters exist, the optimizer has no state
yet), then the state is restored one way, and the timings are printed as one JSON line.

    python bench/core_restore.py METHOD PATH --job J --run-dir D [model options]
    METHOD: snapguard | torch_load | dcp_load
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core_util as U  # noqa: E402

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=("snapguard", "torch_load", "dcp_load"))
    ap.add_argument("path", nargs="?", default="")
    ap.add_argument("--job", default="")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--node", default="bench")
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    a = ap.parse_args()
    t = time.perf_counter()
    model = U.build_gpt(a.width, a.layers, a.vocab, a.seq)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    out = {"build_s": time.perf_counter() - t}
    if a.method == "snapguard":
        from snapguard.guard import Guard  # imported before the clock starts, as a training script does
    elif a.method == "dcp_load":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    if a.method == "snapguard":
        guard = Guard(model=model, optimizer=optimizer, job=a.job, node=a.node, run_dir=a.run_dir, rank=0, world_size=1)
        out["guard_s"] = time.perf_counter() - t0
        out["step"] = guard.restore()
        guard.close()
    elif a.method == "torch_load":
        sd = torch.load(a.path, weights_only=True)
        out["read_s"] = time.perf_counter() - t0
        model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optim"])
        out["step"] = sd["step"]
    else:
        msd, osd = get_state_dict(model, optimizer)  # creates the optimizer's state, to load into
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=a.path, no_dist=True)
        out["read_s"] = time.perf_counter() - t0
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    out["total_s"] = time.perf_counter() - t0
    out["minflt"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    out["state_bytes"] = U.state_bytes(model, optimizer)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
