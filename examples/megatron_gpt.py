"""A Megatron-Core GPT with tensor parallelism and dropout, protected by snapguard.

    torchrun --nproc-per-node=2 examples/megatron_gpt.py --tp 2 --iters 20

The loop is shaped like Megatron-LM's: restore where it would load a checkpoint, snapshot after
every iteration. Plain torch Adam over the Megatron model keeps the example short; what
`megatron.core.optimizer.get_megatron_optimizer` returns is protected the same way.
"""

import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from runlog import RunLog
from snapguard.integrations.megatron import protect
from snapguard.procs import leave_process_group

VOCAB, SEQ, MICRO_BATCH = 128, 32, 4


def batch(iteration: int, dp_rank: int, device: str):
    """One micro-batch: a pure function of (iteration, data-parallel rank); tensor-parallel peers share it."""
    g = torch.Generator().manual_seed(iteration * 1009 + dp_rank)
    x = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g).to(device)
    return x[:, :-1], x[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", help="write losses and a final-state digest here")
    a = ap.parse_args()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device != "cpu" else "gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=a.tp)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    log = RunLog(a.out, dist.get_rank())

    config = TransformerConfig(num_layers=2, hidden_size=a.hidden, num_attention_heads=4, use_cpu_initialization=True,
                               hidden_dropout=0.1, attention_dropout=0.1, tensor_model_parallel_size=a.tp)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device=device), 1)
    positions = torch.arange(SEQ, device=device).unsqueeze(0).expand(MICRO_BATCH, SEQ)

    guard = protect(model, optimizer, start_daemon=True)   # snapguard: shards, optimizer, RNG tracker, counters
    iteration = guard.restore()                              # snapguard: where load_checkpoint would be; 0 if fresh
    consumed = guard.counters.get("consumed_train_samples", 0)
    while iteration < a.iters:
        tokens, labels = batch(iteration, parallel_state.get_data_parallel_rank(), device)
        loss = model(tokens, positions, causal, labels=labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        consumed += MICRO_BATCH * parallel_state.get_data_parallel_world_size()
        guard.snapshot(iteration, consumed_train_samples=consumed)   # snapguard: returns at once
        log.loss(iteration - 1, loss.item())
    guard.close()

    log.final(model=model.state_dict(), optimizer=optimizer.state_dict(), consumed_train_samples=consumed,
              rng=tensor_parallel.get_cuda_rng_tracker().get_states())
    parallel_state.destroy_model_parallel()
    leave_process_group()


if __name__ == "__main__":
    main()
