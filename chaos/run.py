"""`snapguard chaos run`: the command, and `run_scenario`, its library form (used by the tests)."""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from typing import Callable

from snapguard.errors import ConfigError

from snapguard.chaos import report as R
from snapguard.chaos.harness import Run, run_reference
from snapguard.chaos.scenario import Scenario, default, generate, load


def run_scenario(scenario: Scenario, out_dir: str, seed: int | None = None, reference_dir: str | None = None,
                 say: Callable[[str], None] = print) -> dict:
    """Run the reference (or reuse one under reference_dir), then the protected run; write report.json and
    loss.png into out_dir and return the report. The report's "verdict" is "PASS" or "FAIL"."""
    if any(c in os.path.abspath(out_dir) for c in ",%#"):
        raise ConfigError(f"the output directory {out_dir} holds one of ',', '%', '#', which separate the settings of"
                          " the ranks' fault points (SNAPGUARD_FAULTS): choose another")
    for d in filter(None, (out_dir, reference_dir)):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot use {d} as a directory: {e.strerror}") from None
    ref = run_reference(scenario.cluster, reference_dir or out_dir, say)
    work = tempfile.mkdtemp(prefix="run-", dir=out_dir)
    if len(work) > 60:  # the daemons' IPC socket paths must stay under the OS limit of 107 bytes
        os.rmdir(work)
        work = tempfile.mkdtemp(prefix="snapguard-chaos-run-", dir="/tmp")
        say(f"the run's files go to {work} (a short path: {out_dir} is too long for IPC sockets)")
    run = Run(scenario, work, ref, seed=seed, say=say)
    run.execute()
    rep = run.judge()
    rep["files"] = R.save_all(rep, out_dir)
    return rep


# The options that shape a random scenario (`--faults`): flag, type, default, what it sets.
RANDOM_OPTIONS = (("--mtbf-steps", float, 4.0, "mean steps between failures"),
                  ("--nodes", int, 3, "nodes"),
                  ("--ranks-per-node", int, 2, "ranks per node"),
                  ("--m", int, 1, "parity chunks per codeword (nodes it survives losing)"))


def add_parser(sub) -> None:
    """Add `chaos run` to the `snapguard` command's subparsers."""
    ch = sub.add_parser("chaos", help="failure-injection harness: prove that no failure loses work")
    chsub = ch.add_subparsers(dest="chaos_cmd", required=True)
    r = chsub.add_parser("run", help="run a scenario (built-in default, a TOML file, or random) and judge it")
    r.add_argument("--scenario", metavar="FILE", help="TOML scenario (see chaos/README.md); default: the built-in one")
    r.add_argument("--seed", type=int, help="seed of the random choices (and of a random scenario)")
    r.add_argument("--faults", type=int, help="generate a random scenario with this many faults")
    for flag, kind, default, what in RANDOM_OPTIONS:
        r.add_argument(flag, type=kind, help=f"with --faults: {what} (default {default})")
    r.add_argument("--out", metavar="DIR", help="where the runs, logs, report.json and loss.png go"
                   " (default: a new directory under /tmp)")
    r.add_argument("--reference", metavar="DIR", help="keep (and reuse) reference runs under DIR")
    r.set_defaults(fn=cmd_run)


def cmd_run(a: argparse.Namespace) -> int:
    if a.faults is not None and a.scenario:
        print("snapguard chaos run: give --scenario or --faults, not both", file=sys.stderr)
        return 2
    shape = {flag: getattr(a, flag[2:].replace("-", "_")) for flag, *_ in RANDOM_OPTIONS}
    if a.faults is None and any(v is not None for v in shape.values()):
        given = ", ".join(f for f, v in shape.items() if v is not None)
        print(f"snapguard chaos run: {given} only shape a random scenario: give --faults as well (a scenario, the"
              " built-in one too, sets its own cluster)", file=sys.stderr)
        return 2
    if a.faults is not None:
        seed = a.seed if a.seed is not None else random.randrange(1 << 30)
        mtbf, nodes, per_node, m = (v if v is not None else default
                                    for v, (_, _, default, _) in zip(shape.values(), RANDOM_OPTIONS))
        scenario = generate(seed, a.faults, mtbf, nodes=nodes, ranks_per_node=per_node, m=m)
    else:
        scenario = load(a.scenario) if a.scenario else default()
        seed = a.seed
    out = a.out or tempfile.mkdtemp(prefix="snapguard-chaos-")
    t0 = time.monotonic()
    print(f"snapguard chaos run: scenario {scenario.name!r}, {len(scenario.faults)} faults, seed"
          f" {seed if seed is not None else scenario.seed}, output in {out}", flush=True)
    rep = run_scenario(scenario, out, seed=seed, reference_dir=a.reference,
                       say=lambda line: print(line, flush=True))
    print()
    print(R.table(rep))
    print(f"report: {rep['files']['json']}" + (f"; plot: {rep['files']['png']}" if "png" in rep["files"] else
                                               " (no plot: matplotlib is not installed)"))
    print(f"({time.monotonic() - t0:.0f} s in all)")
    return 0 if rep["verdict"] == "PASS" else 1
