"""Adapters that add snapguard to a framework's training loop in one or two lines.

- `snapguard.integrations.torch`: DDP and FSDP2 through torch.distributed.checkpoint's state dicts;
  sharded DTensors are snapshotted as each rank's local shard, never gathered.
- `snapguard.integrations.megatron`: Megatron-Core models (tensor/pipeline-parallel shards), torch or
  Megatron optimizers, the RNG tracker, iteration and consumed-samples counters
  (`pip install snapguard[megatron]`).
- `snapguard.integrations.deepspeed`: a DeepSpeedEngine with ZeRO stage 0 to 3 (offload to the CPU, not
  NVMe): module, partitioned optimizer state, engine counters, lr scheduler, client state
  (`pip install snapguard[deepspeed]`).

Each module's `protect(...)` returns a `snapguard.Guard` (restore() before training, snapshot() after
each optimizer step, close() at the end) and installs the hook that makes the optimizer's step wait
for a snapshot still being copied. Importing this package imports no framework; importing an
adapter whose framework is missing raises an ImportError that names the extra to install.
"""
