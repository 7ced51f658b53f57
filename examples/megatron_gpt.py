"""A Megatron-Core GPT with tensor parallelism and dropout, protected by snapguard.

    torchrun --nproc-per-node=2 examples/megatron_gpt.py --tp 2 --iters 20

The loop is shaped like Megatron-LM's: restore where it would load a checkpoint, snapshot after
every iteration. By default plain torch Adam over the Megatron model keeps the example short. On a
GPU, `--megatron-optimizer` trains the way Megatron-LM does: a bf16 model under Megatron's own DDP,
and the distributed optimizer from `get_megatron_optimizer` over fp32 main parameters; snapguard
protects it with the same two calls.
"""

import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import finalize_model_grads
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


def megatron_ddp_and_optimizer(model, config):
    """Megatron-LM's wrapping: the bf16 module under Megatron's DDP (gradients in fp32 buffers), and the
    distributed optimizer over this rank's shard of the fp32 main parameters."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(config, ddp_config, Float16Module(config, model))
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16,
                                 use_distributed_optimizer=True)
    return model, get_megatron_optimizer(opt_config, [model])


def local_optimizer_state(optimizer):
    """What this rank's optimizer holds: a torch optimizer's state, or for a Megatron optimizer each inner
    torch optimizer's state and the fp32 main parameters it steps."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer.state_dict()
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [{"state": p.optimizer.state_dict(), "main_params": [q for g in p.optimizer.param_groups for q in g["params"]]}
            for p in parts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--megatron-optimizer", action="store_true",
                    help="bf16 model, Megatron's DDP and distributed optimizer (needs a GPU)")
    ap.add_argument("--out", help="write losses and a final-state digest here")
    a = ap.parse_args()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if a.megatron_optimizer and device == "cpu":
        ap.error("--megatron-optimizer needs a GPU: Megatron's DDP and optimizers allocate on CUDA")
    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device != "cpu" else "gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=a.tp)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    log = RunLog(a.out, dist.get_rank())

    config = TransformerConfig(num_layers=2, hidden_size=a.hidden, num_attention_heads=4, use_cpu_initialization=True,
                               hidden_dropout=0.1, attention_dropout=0.1, tensor_model_parallel_size=a.tp,
                               bf16=a.megatron_optimizer,
                               params_dtype=torch.bfloat16 if a.megatron_optimizer else torch.float32)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ).to(device)
    if a.megatron_optimizer:
        model, optimizer = megatron_ddp_and_optimizer(model, config)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device=device), 1)
    positions = torch.arange(SEQ, device=device).unsqueeze(0).expand(MICRO_BATCH, SEQ)

    guard = protect(model, optimizer, start_daemon=True)   # snapguard: shards, optimizer, RNG tracker, counters
    iteration = guard.restore()                              # snapguard: where load_checkpoint would be; 0 if fresh
    consumed = guard.counters.get("consumed_train_samples", 0)
    while iteration < a.iters:
        tokens, labels = batch(iteration, parallel_state.get_data_parallel_rank(), device)
        if a.megatron_optimizer:
            model.zero_grad_buffer()
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, positions, causal, labels=labels).mean()
        loss.backward()
        if a.megatron_optimizer:
            finalize_model_grads([model])
        optimizer.step()
        iteration += 1
        consumed += MICRO_BATCH * parallel_state.get_data_parallel_world_size()
        guard.snapshot(iteration, consumed_train_samples=consumed)   # snapguard: returns at once
        log.loss(iteration - 1, loss.item())
    guard.close()

    log.final(model=model.state_dict(), optimizer=local_optimizer_state(optimizer), consumed_train_samples=consumed,
              rng=tensor_parallel.get_cuda_rng_tracker().get_states())
    parallel_state.destroy_model_parallel()
    leave_process_group()


if __name__ == "__main__":
    main()
