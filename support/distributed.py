"""
Data parallelism under torchrun: the few helpers the stages need around PyTorch's DistributedDataParallel (DDP).
torchrun tells each process who it is (RANK, WORLD_SIZE, LOCAL_RANK); without those variables every helper is a no-op.
With them each process trains a copy of the model on its rows of the global batch, the gradients are joined over the
processes (by DDP in backward() for SFT and the reward model; by sum_gradients after a minibatch's backward passes
for PPO), and rank 0 alone prints and writes files. NCCL connects GPUs; gloo connects CPU processes (the tests).
"""
import atexit
import contextlib
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from support.cli import pick_device


def rank():
    return int(os.environ.get("RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))  # from the environment: argument checks run before setup()


def is_main():
    return rank() == 0


def setup(device="auto"):
    """Join torchrun's process group when torchrun started this process; return the device it computes on. A GPU
    process gets cuda:LOCAL_RANK (one GPU each). Without torchrun: pick_device(device) and nothing else."""
    device = pick_device(device)
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    if device.type == "cuda":
        # One GPU per process: more processes on this node than GPUs would die in set_device with a CUDA traceback.
        # Every process checks the same numbers, so all of them stop with this message before the group forms.
        procs, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if procs > gpus:
            raise ValueError(f"torchrun started {procs} processes on this node but {gpus} GPU(s) are visible: run "
                             f"with --nproc_per_node {gpus} (one process per GPU), or pass --device cpu to run "
                             f"{procs} CPU processes")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # after an error
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # one copy of each log line; errors still reach stderr
    return device


def finish():
    """The end of a successful run under torchrun: wait for every process, close the group and leave at once,
    without Python's interpreter teardown, which aborted now and then in gloo runs here ("terminate called without
    an active exception", about one run in fifteen) after all the work was done. Every file the stages write is
    closed or flushed by then, so nothing is lost. Without torchrun: nothing."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def wrap(model, device):
    """The model for training: inside DDP, which averages the gradients over the processes in backward(). Single
    process: the model itself. Only forward() goes through DDP, which is why model.py's response_logprobs and
    reward_at_eos are free functions of a module: they work the same on either. The model's only buffer is the
    constant mask of the padded vocabulary rows: no buffers to broadcast."""
    if not dist.is_initialized():
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def no_sync(model, skip):
    """Around the forward of all micro-batches of a step but the last: their gradients add up locally, unsynced."""
    model = getattr(model, "_orig_mod", model)  # the DDP module inside torch.compile's wrapper
    return model.no_sync() if skip and isinstance(model, DDP) else contextlib.nullcontext()


def check_batch(parser, batch_flag, batch, micro_flag, micro):
    """An argparse error unless batch (global: the same whatever the processes) = micro x accumulation x processes."""
    n = world_size()
    if batch % (micro * n):
        parser.error(f"--{batch_flag} {batch} is not a multiple of --{micro_flag} {micro}"
                     + (f" x {n} processes" if n > 1 else ""))


def shard(n):
    """This process's rows of n: a contiguous block, so joining the blocks in rank order (gather) restores the order."""
    return slice(rank() * n // world_size(), (rank() + 1) * n // world_size())


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it writes files: data caches); the others run it after, and read them."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_sum(t):
    """A tensor (on this process's device) summed over the processes; single process: t itself."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def sum_over_ranks(values):
    """A list of numbers summed elementwise over the processes (every process gets the sums)."""
    if not dist.is_initialized():
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def mean_over_ranks(values):
    """A list of numbers averaged over the processes: the mean of per-process means of equal shards."""
    return [v / world_size() for v in sum_over_ranks(values)]


def gather(part):
    """Every process's part of a sharded sequence (a list, numpy array or CPU tensor), joined in rank order, on every
    process. With shard() blocks this is the whole sequence in its original order. Single process: part itself."""
    if not dist.is_initialized():
        return part
    parts = [None] * world_size()
    dist.all_gather_object(parts, part)
    if isinstance(part, list):
        return [x for p in parts for x in p]
    return torch.cat(parts) if isinstance(part, torch.Tensor) else np.concatenate(parts)


def gather_rows(rows, index):
    """Every process's rows of a dict of tensors, on every process, in the order of their row numbers (index:
    this process's row numbers). One process: rows itself."""
    if world_size() == 1:
        return rows
    where = torch.as_tensor(gather(index.tolist())).argsort()
    return {k: gather(v)[where] for k, v in rows.items()}


def sum_gradients(params):
    """The gradients of params summed over the processes, on every process: after the backward passes of each
    process's part of a minibatch, the gradient of the whole minibatch's loss. Parameters without a gradient (the
    same ones in every process) are skipped. One process: nothing to do."""
    if dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
