"""`snapguard`: status of the node's daemons, the one-node demo, and the chaos harness."""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys

from snapguard import protocol as P
from snapguard.config import check_seconds, default_job, default_run_dir
from snapguard.errors import SnapGuardError
from snapguard.shm import fmt_bytes


def _step(s: int) -> str:
    return str(s) if s >= 0 else "-"


def status_table(reports: list[P.StatusReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"daemon {r.job}/{r.node}  pid {r.pid}  shm {r.shm_dir}  used {fmt_bytes(r.shm_used)}"
                     f"  free {fmt_bytes(r.shm_free)}  daemon memory outside shm {fmt_bytes(r.memory_bytes)}"
                     f"  newest step held by all ranks: {r.common if r.common >= 0 else '-'}")
        if r.peers:
            lines.append(f"  erasure coding with {', '.join(r.peers)}: newest sealed here {_step(r.sealed)},"
                         f" newest protected {_step(r.protected)}, parity held {fmt_bytes(r.parity_bytes)},"
                         f" peer messages refused {r.rejected}")
        if r.persist_dir:
            disk = "; ".join(f"rank {x['rank']}: {', '.join(map(str, x.get('persisted', []))) or '-'}" for x in r.ranks)
            lines.append(f"  persisted to {r.persist_dir}: {disk or '(no ranks yet)'}")
        for x in r.ranks:
            rd = x.get("reading")
            if rd:
                done = f"{fmt_bytes(rd['done'])} of {fmt_bytes(rd['total'])}"
                if rd.get("source") == "peers":
                    lines.append(f"  rank {x['rank']}: step {rd['step']} is rebuilt from the peers: {done} of the"
                                 " node's shards")
                else:
                    lines.append(f"  rank {x['rank']} reads step {rd['step']} from disk: {done}")
        lines.append(f"  {'rank':>5}  {'slot':>4}  {'state':<10} {'step':>7}  {'size':>10}  {'age':>8}  {'of ranks':>8}")
        for rank in r.ranks:
            for s in rank["slots"]:
                age = f"{s['age_s']:.1f} s" if s["age_s"] >= 0 else "-"
                step = s["step"] if s["step"] >= 0 else "-"
                world = s.get("world_size") or "-"  # of the job that took the step: one of another size is not restored
                lines.append(f"  {rank['rank']:>5}  {s['slot']:>4}  {s['state']:<10} {step:>7}  {fmt_bytes(s['nbytes']):>10}"
                             f"  {age:>8}  {world:>8}")
        if not r.ranks:
            lines.append("  (no ranks yet)")
    return "\n".join(lines)


def cmd_status(a: argparse.Namespace) -> int:
    from snapguard.client import DaemonClient
    from snapguard.procs import listens

    timeout_s = check_seconds("--timeout", a.timeout)
    run_dir = default_run_dir(a.run_dir)
    pattern = f"{default_job(a.job)}@*.sock" if a.job or os.environ.get("SNAPGUARD_JOB") else "*.sock"
    socks = sorted(glob.glob(os.path.join(run_dir, pattern)))
    if not socks:
        print(f"no snapguard daemon sockets in {run_dir}", file=sys.stderr)
        if a.json:  # a monitor parses stdout: no daemon is an empty list, not an empty output
            print("[]")
        return 1
    reports, rc = [], 0
    for s in socks:
        if not listens(s):
            job, _, node = os.path.basename(s).removesuffix(".sock").partition("@")
            print(f"{s}: no daemon listens on it: the daemon of job {job} on node {node} that left it was killed or"
                  f" crashed. The snapshots it sealed stay in shared memory until a daemon of that job and node starts"
                  f" again (`snapguard-daemon --job {job} --node {node}`, with the same --shm-dir) and re-adopts them",
                  file=sys.stderr)
            rc = 1
            continue
        c = DaemonClient(f"ipc://{s}", timeout_s=timeout_s)
        try:
            reports.append(c.request(P.Status()))
        except SnapGuardError as e:
            print(f"{s}: {e}", file=sys.stderr)
            rc = 1
        finally:
            c.close()
    if reports or a.json:
        print(json.dumps([P.fields_of(r) for r in reports], indent=1) if a.json else status_table(reports))
    return rc


def cmd_demo(a: argparse.Namespace) -> int:
    from snapguard.demo_run import run_demo

    return run_demo(a)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's or a closed terminal's end): raised in the main thread, so that a command
    unwinds as on Ctrl-C, stopping the daemons and ranks it started and freeing their shared memory."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="snapguard")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="what each daemon on this node holds")
    st.add_argument("--job", help="only this job's daemons (default: $SNAPGUARD_JOB; without it, every job's)")
    st.add_argument("--run-dir", help="the daemons' run directory (default: $SNAPGUARD_RUN_DIR or"
                    " /tmp/snapguard-UID)")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each daemon (default 5)")
    st.add_argument("--json", action="store_true", help="print the daemons' reports as a JSON list (for monitoring):"
                    " every field `snapguard status` shows, bytes as numbers, ages in seconds")
    st.set_defaults(fn=cmd_status)
    de = sub.add_parser("demo", help="train on several ranks, SIGKILL trainers at random moments (--kills),"
                        " restore, compare with an unbroken run")
    de.add_argument("--nproc", type=int, default=4, help="ranks of the job (default 4)")
    de.add_argument("--steps", type=int, default=40, help="training steps (default 40; at least --kills + 2)")
    de.add_argument("--kills", type=int, default=2, help="how many trainers to SIGKILL, at random moments (default 2)")
    de.add_argument("--seed", type=int, default=None, help="seed of which rank dies when (default: random, printed)")
    de.add_argument("--workdir", default=None, help="keep the runs and their logs here (default: a temporary"
                    " directory, removed after a PASS)")
    de.set_defaults(fn=cmd_demo)
    from snapguard.chaos.run import add_parser as add_chaos_parser

    add_chaos_parser(sub)
    a = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    try:
        return a.fn(a)
    except KeyboardInterrupt as e:
        from snapguard.procs import STOP_SIGNALS

        for sig in STOP_SIGNALS:  # what it started is stopped: just exit now
            signal.signal(sig, signal.SIG_IGN)
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(f"snapguard: stopped by {signal.Signals(signum).name}; the processes it had started are stopped",
              file=sys.stderr)
        return 128 + signum
    except SnapGuardError as e:
        print(f"snapguard: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
