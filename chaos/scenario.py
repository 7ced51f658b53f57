"""Scenarios: a cluster shape plus a schedule of faults, from a TOML file or drawn at random.

    [cluster]                 # every key optional; unknown keys are refused
    nodes = 3
    ranks_per_node = 2
    m = 1
    steps = 40

    [[fault]]
    kind = "kill_rank"        # see chaos.faults.KINDS
    at_step = 5               # inject once every rank has logged this step (and the last failure recovered)
    rank = 3                  # the kind's own parameters

Pure data and pure functions: nothing here starts a process.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tomllib
from dataclasses import dataclass, field

from snapguard.errors import ConfigError

from snapguard.chaos.faults import KINDS, RANDOM_KINDS, check_params


@dataclass(frozen=True)
class ClusterConf:
    nodes: int = 3
    ranks_per_node: int = 2
    m: int = 1
    steps: int = 40
    width: int = 32
    layers: int = 1
    step_sleep: float = 0.05
    # 2, not the daemon's default under erasure coding (3): with two slots a rank never seals more than one step
    # beyond the newest protected step, which the verdict's bound on steps lost to a node loss relies on
    slots_per_rank: int | None = 2
    hang_timeout_s: float = 8.0  # torchrun-style: no new step for this long kills and restarts every rank
    timeout_s: float = 1200.0  # the whole protected run
    max_restarts: int | None = None  # default: 2 x the number of faults + 3
    worker_args: tuple[str, ...] = ()  # e.g. ("--no-rng",): a deliberately broken restore
    persist_every: int | None = None  # daemons also persist one step in every N to disk (`--persist-every`)


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    at_step: int
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.kind}({args})" if args else self.kind


@dataclass(frozen=True)
class Scenario:
    name: str
    cluster: ClusterConf
    faults: tuple[FaultSpec, ...]
    seed: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "cluster": dataclasses.asdict(self.cluster),
                "faults": [{"kind": f.kind, "at_step": f.at_step, **f.params} for f in self.faults]}


# What TOML must give for each [cluster] key (a float may be written as an integer).
_CLUSTER_TYPES: dict[str, type | tuple[type, ...]] = {
    "nodes": int, "ranks_per_node": int, "m": int, "steps": int, "width": int, "layers": int,
    "step_sleep": (int, float), "slots_per_rank": int, "hang_timeout_s": (int, float), "timeout_s": (int, float),
    "max_restarts": int, "worker_args": list, "persist_every": int,
}


def _cluster_conf(d: dict, where: str) -> ClusterConf:
    known = {f.name: f for f in dataclasses.fields(ClusterConf)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown [cluster] key(s) {unknown}; known: {sorted(known)}")
    for k, v in d.items():
        want = _CLUSTER_TYPES[k]
        ok = isinstance(v, want) and not isinstance(v, bool)
        if k == "worker_args":
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        if not ok:
            what = {int: "an integer", list: "a list of strings"}.get(want, "a number")  # type: ignore[call-overload]
            raise ConfigError(f"{where}: [cluster] {k} must be {what}, got {v!r}")
    d = dict(d)
    if "worker_args" in d:
        d["worker_args"] = tuple(d["worker_args"])
    conf = ClusterConf(**d)
    if conf.nodes < 2 or conf.ranks_per_node < 1 or not 1 <= conf.m < conf.nodes or conf.steps < 2:
        raise ConfigError(f"{where}: need nodes >= 2, ranks_per_node >= 1, 1 <= m < nodes, steps >= 2; got {conf}")
    # NaN fails every comparison, so each bound is written to refuse it
    bounds = (("persist_every", 1, None), ("width", 4, None), ("layers", 1, None), ("max_restarts", 0, None),
              ("slots_per_rank", 2, None), ("step_sleep", 0, 60), ("hang_timeout_s", 0.1, 3600),
              ("timeout_s", 1, 7 * 86400))
    for k, least, most in bounds:
        v = getattr(conf, k)
        if v is not None and not (v >= least and (most is None or v <= most)):
            raise ConfigError(f"{where}: [cluster] {k} must be "
                              + (f"in [{least}, {most}]" if most is not None else f"at least {least}") + f", got {v!r}")
    if conf.width % 4:
        raise ConfigError(f"{where}: [cluster] width must be a multiple of 4 (the model's attention heads), got"
                          f" {conf.width}")
    return conf


def from_dict(d: dict, name: str = "scenario", where: str = "scenario") -> Scenario:
    unknown = sorted(set(d) - {"name", "seed", "cluster", "fault"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; expected name, seed, [cluster], [[fault]]")
    if not isinstance(d.get("cluster", {}), dict):
        raise ConfigError(f"{where}: cluster must be a table ([cluster]), got {d['cluster']!r}")
    listed = d.get("fault", [])
    if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
        raise ConfigError(f"{where}: fault must be an array of tables, each fault under a [[fault]] header of its"
                          f" own, got {listed!r}")
    seed = d.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: seed must be an integer, got {seed!r}")
    if not isinstance(d.get("name", name), str):
        raise ConfigError(f"{where}: name must be a string, got {d['name']!r}")
    conf = _cluster_conf(d.get("cluster", {}), where)
    faults = []
    for i, f in enumerate(listed):
        f = dict(f)
        kind = f.pop("kind", None)
        if kind not in KINDS:
            raise ConfigError(f"{where}: fault {i} has kind {kind!r}; known kinds: {sorted(KINDS)}")
        at = f.pop("at_step", None)
        if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at < conf.steps - 1:
            raise ConfigError(f"{where}: fault {i} ({kind}) needs an integer at_step in [0, {conf.steps - 1}), got {at!r}")
        check_params(kind, f, conf, where=f"{where}: fault {i} ({kind})")
        faults.append(FaultSpec(kind, at, f))
    steps = [f.at_step for f in faults]
    if steps != sorted(steps):
        raise ConfigError(f"{where}: faults must be listed in the order of their at_step, got {steps}")
    return Scenario(d.get("name", name), conf, tuple(faults), seed)


def load(path: str) -> Scenario:
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read the scenario {path}: {e.strerror}") from None
    return from_dict(d, name=path.rsplit("/", 1)[-1].removesuffix(".toml"), where=path)


# The built-in scenario of `snapguard chaos run`: every kind of fault survivable with m=1 (kill_rank thrice: at
# a random moment, mid-copy, mid-restore), on 3 nodes x 2 ranks, in a few minutes. Each restart costs the time to start the ranks again.
DEFAULT_TOML = """
name = "default"

[cluster]
nodes = 3
ranks_per_node = 2
m = 1
steps = 44
step_sleep = 0.05

[[fault]]
kind = "net_duplicate"
at_step = 2
probability = 0.5
duration_s = 6.0

[[fault]]
kind = "kill_rank"
at_step = 4

[[fault]]
kind = "kill_rank"
at_step = 8
phase = "copy.mid"
rank = 3

[[fault]]
kind = "hang_rank"
at_step = 12
rank = 1

[[fault]]
kind = "kill_daemon"
at_step = 16
node = "node1"

[[fault]]
kind = "corrupt_slot"
at_step = 20
node = "node2"

[[fault]]
kind = "net_delay"
at_step = 23
delay_ms = 40
duration_s = 4.0

[[fault]]
kind = "net_drop"
at_step = 24
probability = 0.3
duration_s = 4.0

[[fault]]
kind = "lose_node"
at_step = 28
node = "node0"

[[fault]]
kind = "kill_rank"
at_step = 32
phase = "restore.mid"

[[fault]]
kind = "fill_shm"
at_step = 36
node = "node2"
"""


def default() -> Scenario:
    return from_dict(tomllib.loads(DEFAULT_TOML), where="built-in default scenario")


def generate(seed: int, faults: int, mtbf_steps: float, nodes: int = 3, ranks_per_node: int = 2, m: int = 1,
             kinds: tuple[str, ...] = RANDOM_KINDS, **cluster: object) -> Scenario:
    """`faults` faults of random kinds at random places; gaps between them exponential with mean `mtbf_steps`.

    Only kinds a correct system survives with `m` parity chunks are drawn, so the expected verdict is PASS.
    Gaps are at least two steps: a fault is injected only after training has moved on from the previous
    recovery.
    """
    if faults < 1 or not 0 < mtbf_steps < math.inf:  # NaN too
        raise ConfigError(f"need faults >= 1 and mtbf_steps > 0, got {faults} and {mtbf_steps}")
    where = f"random scenario (seed {seed})"
    # the shape is checked before anything is drawn; `steps` here is the fewest the draw below can give
    _cluster_conf({"nodes": nodes, "ranks_per_node": ranks_per_node, "m": m, "steps": 2 * faults + 7, **cluster}, where)
    rnd = random.Random(seed)
    kinds = tuple(k for k in kinds if KINDS[k].min_m <= m)
    names = [f"node{i}" for i in range(nodes)]
    world = nodes * ranks_per_node
    at, out = 1, []
    for _ in range(faults):
        at += max(2, math.ceil(rnd.expovariate(1.0 / mtbf_steps)))
        kind = rnd.choice(kinds)
        params: dict = {}
        if kind == "kill_rank":
            params["rank"] = rnd.randrange(world)
            phase = rnd.choice([None, None, "copy.mid", "copy.done", "restore.mid"])
            if phase:
                params["phase"] = phase
        elif kind == "hang_rank":
            params["rank"] = rnd.randrange(world)
        elif kind in ("kill_daemon", "lose_node", "corrupt_slot", "fill_shm", "lose_node_in_rebuild"):
            params["node"] = rnd.choice(names)
        elif kind in ("net_drop", "net_duplicate"):
            params["probability"] = round(rnd.uniform(0.1, 0.5), 2)
            params["duration_s"] = round(rnd.uniform(2.0, 6.0), 1)
        elif kind == "net_delay":
            params["delay_ms"] = rnd.randrange(10, 80)
            params["duration_s"] = round(rnd.uniform(2.0, 6.0), 1)
        out.append({"kind": kind, "at_step": at, **params})
    d = {"name": f"random-seed{seed}", "seed": seed,
         "cluster": {"nodes": nodes, "ranks_per_node": ranks_per_node, "m": m, "steps": at + 6, **cluster},
         "fault": out}
    return from_dict(d, where=where)
