"""snapguard.chaos: run a training job on a simulated cluster, inject faults, prove nothing was lost.

    snapguard chaos run                          # the built-in scenario
    snapguard chaos run --scenario FILE.toml     # a declared one
    snapguard chaos run --faults 50 --mtbf-steps 4 --seed 7   # a random one

See chaos/README.md.
"""

from snapguard.chaos.run import run_scenario
from snapguard.chaos.scenario import Scenario, default, generate, load

__all__ = ["run_scenario", "Scenario", "default", "generate", "load"]
