"""torchrun, with rank 0's store on a port outside the kernel's ephemeral range: how the demo and the tests
launch their workers (``python -m snapguard.torchrun`` takes torchrun's arguments).

They run ``--standalone`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the launcher's shared store,
restarted gloo workers hang. torchrun then probes a free port with ``bind(0)``, closes it and hands it to
the workers as MASTER_PORT; rank 0 binds it seconds later, once it has imported torch. A port from the
ephemeral range can be taken in between by any outgoing connection on the machine (gloo's and ZeroMQ's of
jobs running beside it), and the attempt then dies with EADDRINUSE. ``free_port`` picks outside that range.
"""

from __future__ import annotations

from torch.distributed import run
from torch.distributed.elastic.rendezvous import api as rendezvous_api

from snapguard.procs import free_port


def main() -> None:
    if hasattr(rendezvous_api, "get_free_port"):  # where torchrun picks the workers' port
        rendezvous_api.get_free_port = free_port
    run.main()


if __name__ == "__main__":
    main()
