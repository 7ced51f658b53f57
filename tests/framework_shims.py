"""CPU-only shims that let the real Megatron-Core and DeepSpeed run on a CPU-only machine with gloo.

They belong to the tests, never to the library: on a GPU, the frameworks' own code paths run. The
measured reasons for each are in ../shared/notes/frameworks-on-cpu.md:

- Megatron's `GlobalMemoryBuffer.get_tensor` allocates on `torch.cuda.current_device()`: allocate on
  the CPU instead.
- Megatron's `CudaRNGStatesTracker` swaps CUDA generator states in `fork()`, which every attention
  layer enters: keep the tracked states as CPU generator states and swap the CPU generator instead.
  Its `get_states()` / `set_states()` then carry exactly what they carry on a GPU (a dict of byte
  tensors), which is what snapguard's Megatron adapter must capture and restore.
- DeepSpeed's first `init_distributed` JIT-compiles a shared-memory op with g++ (about 2 minutes on
  a cold cache) that gloo does not need: skip it.

Examples stay free of any of this: the tests put `tests/cpu_shims` first on PYTHONPATH and set
SNAPGUARD_CPU_SHIMS=1; that directory's `sitecustomize.py` calls `install_import_hooks()`, which
patches each framework module right after it is first imported, in every process of the job. With
SNAPGUARD_TEST_NO_GUARD=1, the integrations' `protect()` returns a guard that does nothing: the example
then runs as it did before snapguard was added, which is the reference a test compares with. The GPU
tests (test_cuda_integrations.py) set SNAPGUARD_TEST_NO_GUARD alone: there the frameworks run unpatched.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
from typing import Callable

ENV_CPU_SHIMS = "SNAPGUARD_CPU_SHIMS"


# ---- Megatron-Core ---------------------------------------------------------------------------------

def _patch_megatron_utils(mod) -> None:
    import operator
    from functools import reduce

    import torch

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        need = reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < need:
            buf = self.buffer[(name, dtype)] = torch.empty(need, dtype=dtype, device="cpu", requires_grad=False)
        return buf[0:need].view(*tensor_shape)

    mod.GlobalMemoryBuffer.get_tensor = get_tensor


def _patch_megatron_random(mod) -> None:
    import torch

    base = mod.CudaRNGStatesTracker

    class CPURNGStatesTracker(base):
        """Megatron's tracker with the CPU generator standing in for the current CUDA device's."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mod._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    def initialize_rng_tracker(use_te_rng_tracker=False, inference_rng_tracker=False,
                               use_cudagraphable_rng=False, force_reset=False):
        if force_reset or not mod._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mod._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
            mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mod.CPURNGStatesTracker = CPURNGStatesTracker
    mod.initialize_rng_tracker = initialize_rng_tracker
    mod._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


# ---- DeepSpeed -------------------------------------------------------------------------------------

def _patch_deepspeed_comm(mod) -> None:
    # `deepspeed.comm.torch` the attribute is torch itself; the module object lives in sys.modules.
    mod.build_shm_op = lambda: None


# ---- reference runs: the example without snapguard ----------------------------------------------------

class NoGuard:
    """What `protect()` returns in a reference run: the example runs exactly as it would without snapguard."""

    def __init__(self, fresh_start):
        self._fresh_start = fresh_start
        self.counters: dict = {}

    def restore(self):
        return self._fresh_start

    def snapshot(self, *args, **kwargs) -> None:
        pass

    def before_update(self) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def close(self, *args, **kwargs) -> None:
        pass


def _no_guard(fresh_start):
    def patch(mod) -> None:
        mod.protect = lambda *args, **kwargs: NoGuard(fresh_start)

    return patch


# ---- installing ------------------------------------------------------------------------------------

# Module name -> what to patch in it right after its first import; install_import_hooks() fills it.
PATCHES: dict[str, Callable] = {}

CPU_SHIMS: dict[str, Callable] = {
    "megatron.core.utils": _patch_megatron_utils,
    "megatron.core.tensor_parallel.random": _patch_megatron_random,
    "deepspeed.comm.torch": _patch_deepspeed_comm,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, patch: Callable):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        self.patch(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        patch = PATCHES.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def install_import_hooks(cpu_shims: bool = True, no_guard: bool = False) -> None:
    """Patch each framework module right after its first import (and any already imported now): with
    `cpu_shims`, the CPU-only framework shims; with `no_guard`, the integrations' protect() becomes a no-op
    (reference runs). On a GPU, a reference run takes `no_guard` alone."""
    if cpu_shims:
        PATCHES.update(CPU_SHIMS)
    if no_guard:
        PATCHES.update({"snapguard.integrations.torch": _no_guard(None), "snapguard.integrations.deepspeed": _no_guard(None),
                        "snapguard.integrations.megatron": _no_guard(0)})
    if not any(isinstance(f, _PatchingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchingFinder())
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
