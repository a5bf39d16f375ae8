"""torch.distributed under torchrun: gloo on CPU, nccl on CUDA (the CUDA path is untested on CI)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from alignkit.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, x: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device).clone()
        if self.world_size > 1:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t

    def reduce_sums(self, sums: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Sum named values across processes in one all-reduce: metrics by name, never by position."""
        names = list(sums)
        if not names:
            return {}
        total = self.all_reduce_sum(torch.stack([torch.as_tensor(sums[n], dtype=torch.float64).detach().cpu().reshape(())
                                                 for n in names]))
        return dict(zip(names, total.tolist()))

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any of them (so all ranks take the same branch)."""
        return bool(flag) if self.world_size == 1 else self.all_reduce_sum(float(flag)).item() > 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """--device auto | cpu | cuda | cuda:N as a torch device; a CUDA device this machine lacks is a user error.
    Under torchrun `cuda` means cuda:LOCAL_RANK."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device != "auto" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    index = int(device[5:]) if device.startswith("cuda:") else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"--device {device}: no CUDA device {index} (this machine has {count}: "
                        f"{', '.join(f'cuda:{i}' for i in range(count))})")
    return torch.device(f"cuda:{index}")


def setup(device: str = "auto", fsdp: bool = False) -> Dist:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), or a 1-process group for
    --fsdp without torchrun (FSDP2 needs a device mesh), and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) > 1:
        raise UserError(f"--device {device} would put every process on this machine on one GPU; under torchrun use "
                        "--device cuda (process k takes cuda:LOCAL_RANK), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    dev = pick_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized() and (world_size > 1 or fsdp):
        if world_size > 1:
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        else:
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=torch_dist.HashStore(),
                                          rank=0, world_size=1)
        atexit.register(teardown)  # for commands run from Python rather than `cli`, before the interpreter winds down
    if world_size > 1 and not use_cuda:
        # Each process gets its share of the cores instead of all of them fighting over every core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


_keep_group = False


@contextlib.contextmanager
def keep_group():
    """Run a command inside another command's process group (self-reward's DPO step): its teardown leaves
    the group to the outer command (re-creating a destroyed group under torchrun is not reliable)."""
    global _keep_group
    kept, _keep_group = _keep_group, True
    try:
        yield
    finally:
        _keep_group = kept


def teardown() -> None:
    """Destroy the process group, after collecting garbage: DDP/FSDP objects (reference cycles among them) that
    still hold it and are freed after it is destroyed, or at interpreter shutdown, can hang or abort in gloo's
    threads. `cli` calls it once the command has returned and its models are gone."""
    if torch_dist.is_initialized() and not _keep_group:
        gc.collect()
        torch_dist.destroy_process_group()
