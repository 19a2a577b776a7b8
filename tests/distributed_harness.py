"""Runs a function in several processes joined by a process group (gloo on the CPU), for the tests of
sharded training (tests/test_distributed.py). A failed assertion in any rank fails the test, with
that rank's traceback."""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, backend, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # several ranks share two cores
    # A rank that waits on a failed one gives up after two minutes (spawn usually ends it sooner).
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that passed leaves without running C++ destructors: gloo's threads, torn down at exit
    # while another rank still works, sometimes abort ("terminate called without an active
    # exception"), which would fail a test whose every check passed.
    os._exit(0)


def spawn(fn, world: int, *args, backend: str = "gloo") -> None:
    """fn(rank, world, *args) in `world` processes (fn must be importable: a module-level function),
    joined by a `backend` process group ("nccl": one GPU per rank)."""
    mp.spawn(_entry, args=(fn, world, free_port(), backend, args), nprocs=world, join=True)


def in_turn(rank, world, fn, runs) -> None:
    """fn(rank, world, *args) for each args of `runs`, in one process group (one spawn, where each
    run would start its processes anew), a barrier after each: what one run's rank 0 writes, the next
    run's ranks may read."""
    for args in runs:
        fn(rank, world, *args)
        dist.barrier()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    err = float((actual - expected).norm())
    ref = float(expected.norm())
    return err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))


def full(t) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), or the tensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class CountingAllReduce:
    """Counts torch.distributed.all_reduce calls while active (the optimizers call it through the
    module, so the patched function is the one they reach)."""

    def __enter__(self):
        self.count = 0
        self._original = dist.all_reduce

        def counting(*args, **kwargs):
            self.count += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def train_steps(model, opt, steps, loss_of) -> None:
    """One optimizer step per step number, on loss_of(model, step)."""
    for step in steps:
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()


def save_checkpoint(model, opt, path: str) -> None:
    """The model's and the optimizer's state dicts with torch.distributed.checkpoint (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)


def load_checkpoint(model, opt, path: str) -> None:
    """`save_checkpoint`'s checkpoint into the model and the optimizer, at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
