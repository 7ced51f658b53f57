"""The per-node snapshot daemon: shared-memory slots, local commit protocol, restore serving."""
