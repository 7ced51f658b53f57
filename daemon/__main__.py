"""`snapguard-daemon --job ID`: the per-node snapshot daemon."""

from __future__ import annotations

import argparse
import logging
import sys

from snapguard.config import check_name, default_job, default_node, default_run_dir, default_shm_dir
from snapguard.daemon.peers import ENV_SECRET, load_secret
from snapguard.daemon.server import AlreadyRunning, Daemon, DaemonConfig
from snapguard.errors import SnapGuardError


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="snapguard-daemon", description=__doc__)
    ap.add_argument("--job", help="job id (default: $SNAPGUARD_JOB, $TORCHELASTIC_RUN_ID, 'default')")
    ap.add_argument("--node", help="node id (default: $SNAPGUARD_NODE or the host name)")
    ap.add_argument("--run-dir", help="0700 directory of the IPC socket (default: $SNAPGUARD_RUN_DIR or /tmp/snapguard-UID)")
    ap.add_argument("--shm-dir", help="where slots live (default: $SNAPGUARD_SHM_DIR or /dev/shm)")
    ap.add_argument("--shm-limit", type=parse_size, help="most shared memory this daemon may allocate, e.g. 8G")
    ap.add_argument("--slots-per-rank", type=int, default=2)
    ap.add_argument("--keep-on-exit", action="store_true", help="leave the slots in shared memory when stopping")
    ap.add_argument("--peer-bind", help="TCP address peers reach this daemon at, e.g. tcp://10.0.0.5:7100")
    ap.add_argument("--peer", action="append", default=[], metavar="NODE=ADDRESS",
                    help="another daemon of the job (repeat for each)")
    ap.add_argument("--ec-group", help="comma-separated nodes of this node's EC group, same order on every member"
                    " (default: this node and every peer, sorted)")
    ap.add_argument("--ec-m", type=int, default=1, help="parity chunks per codeword: lost nodes the group survives")
    ap.add_argument("--secret-file", help=f"file (0600) with the job's secret for peer traffic (default: ${ENV_SECRET})")
    ap.add_argument("--peer-timeout", type=float, default=10.0, help="seconds before a silent peer counts as lost")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        peers = []
        for item in a.peer:
            node, sep, addr = item.partition("=")
            if not sep or not addr:
                raise SnapGuardError(f"--peer {item!r} is not NODE=ADDRESS")
            peers.append((check_name("node", node), addr))
        group = tuple(n.strip() for n in a.ec_group.split(",")) if a.ec_group else ()
        cfg = DaemonConfig(default_job(a.job), default_node(a.node), default_run_dir(a.run_dir),
                           default_shm_dir(a.shm_dir), a.shm_limit, a.slots_per_rank, not a.keep_on_exit,
                           peer_bind=a.peer_bind, peers=tuple(peers), ec_group=group, ec_m=a.ec_m,
                           secret=load_secret(a.secret_file) if a.peer_bind else b"",
                           peer_timeout_s=a.peer_timeout)
        d = Daemon(cfg)
        d.start()
    except AlreadyRunning as e:
        print(e, file=sys.stderr)
        return 3
    except SnapGuardError as e:
        print(f"snapguard-daemon: {e}", file=sys.stderr)
        return 2
    d.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
