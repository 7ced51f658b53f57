"""Where the examples report progress: every step's loss, and a digest of the final state.

Without an output directory it prints to stdout. With one (`--out DIR`, as the tests pass), each rank
writes `loss.rRANK.jsonl` (one line per step: the loss as an exact float hex), `final.rRANK.json`
(sha256 of every tensor of its final state, after its dtype, shape and device type) and `pid.rRANK`, so
that a run interrupted by failures can be compared bit for bit with one that was not (see
`snapguard.demo.compare`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch


class RunLog:
    def __init__(self, out: str | None, rank: int):
        self.out, self.rank = out, rank
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self._losses = None
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"pid.r{rank}"), "w") as f:
                f.write(f"{os.getpid()} {self.attempt}\n")
            self._losses = open(os.path.join(out, f"loss.r{rank}.jsonl"), "a")

    def loss(self, step: int, loss: float) -> None:
        if self._losses is None:
            if self.rank == 0:
                print(f"step {step} loss {loss:.6f}", flush=True)
            return
        self._losses.write(json.dumps({"attempt": self.attempt, "step": step, "loss": float(loss).hex()}) + "\n")
        self._losses.flush()

    def final(self, **state: Any) -> None:
        """Digest every tensor (DTensors: this rank's shard) and every other value of the final state."""
        if not self.out:
            return
        digest: dict[str, str] = {}
        _walk("", state, digest)
        with open(os.path.join(self.out, f"final.r{self.rank}.json"), "w") as f:
            json.dump(digest, f, indent=0, sort_keys=True)


def _walk(prefix: str, node: Any, out: dict[str, str]) -> None:
    if isinstance(node, torch.Tensor):
        t = node.to_local() if hasattr(node, "to_local") else node
        where = t.device.type
        t = t.detach().cpu().contiguous()
        out[prefix] = f"{t.dtype}{list(t.shape)}@{where}:" + \
            hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    elif isinstance(node, dict):
        for k, v in node.items():
            _walk(f"{prefix}/{k}", v, out)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _walk(f"{prefix}/{i}", v, out)
    else:
        out[prefix] = repr(node)
