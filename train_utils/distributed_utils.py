"""Process and device set-up and logging meters (the tutorial's ``utils``), with its metrics re-exported.

Every helper works the same with and without ``torch.distributed``: on one
process the reductions are no-ops, under DDP they all-reduce on the device the
process group uses (CUDA for NCCL, CPU for gloo).
"""
import builtins
import datetime
import errno
import os
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from .errors import UserError


# ---------------------------------------------------------------------------
# process helpers


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def save_on_master(*args, **kwargs):
    if is_main_process():
        torch.save(*args, **kwargs)


def mkdir(path):
    try:
        os.makedirs(path)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise


def collective_device():
    """The device a collective needs its tensors on: CUDA for NCCL, the CPU for gloo."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (itself on one process)."""
    if not is_dist_avail_and_initialized():
        return value
    value = value.detach().to(collective_device(), dtype=torch.float64, copy=True)
    dist.all_reduce(value)
    return value / get_world_size()


def broadcast_buffers(module, src=0):
    """Copy ``src``'s buffers (BatchNorm running statistics) to every process.

    DDP syncs buffers only in forward passes with gradients, so after training
    each process holds the statistics of its own last batch; validation and the
    saved checkpoint must use the same (rank 0's) ones.
    """
    if is_dist_avail_and_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src)


def setup_for_distributed(is_master):
    """Silence ``print`` on every process but the main one; ``print(..., force=True)`` still prints."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print


def resolve_device(requested=None, local_rank=0, distributed=False):
    """The torch.device to run on: what ``--device`` asks for, or CUDA when present, else the CPU.

    Asking for CUDA on a machine without it is an error, not a silent fall-back.
    Under torchrun (``distributed``) each process takes the GPU of its
    ``local_rank``; naming one GPU there (``cuda:0``) would put every process
    on it, so it is refused.
    """
    if requested in (None, "", "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device torch knows (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if distributed and device.index is not None:
            raise UserError(f"--device {requested}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                            "give --device cuda (use CUDA_VISIBLE_DEVICES to choose the GPUs)")
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested} was asked for but CUDA is not available on this machine "
                            "(use --device cpu)")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"--device asks for GPU {index} but only {torch.cuda.device_count()} are visible")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise UserError(f"--device {requested}: only cpu and cuda are supported")
    return device


def launch_environment():
    """(rank, world size, local rank) when launched by torchrun (or SLURM with several tasks), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                int(os.environ.get("SLURM_LOCALID", 0)))
    return None


def init_distributed_mode(args, silence_others=True):
    """Start the process group when launched by torchrun (or SLURM); otherwise run as one process.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` (the
    local rank) and ``args.dist_backend``: NCCL when the device is CUDA, gloo on the CPU.
    Then ``print`` speaks only on the first process, as the tutorial's does, unless
    ``silence_others`` is False.
    """
    launch = launch_environment()
    if launch is None:
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        args.dist_backend = None
        return
    args.rank, args.world_size, args.gpu = launch
    for name, value in (("RANK", args.rank), ("WORLD_SIZE", args.world_size), ("LOCAL_RANK", args.gpu)):
        os.environ.setdefault(name, str(value))  # SLURM: torch.distributed's env:// reads these

    args.distributed = True
    device = resolve_device(getattr(args, "device", None), local_rank=args.gpu, distributed=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        args.dist_backend = "nccl"
    else:
        args.dist_backend = "gloo"
    timeout = datetime.timedelta(minutes=float(getattr(args, "dist_timeout", 30)))
    dist_url = getattr(args, "dist_url", "env://")
    print(f"| distributed init (rank {args.rank}/{args.world_size}, backend {args.dist_backend}, pid {os.getpid()}): "
          f"{dist_url}", flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=dist_url, world_size=args.world_size,
                            rank=args.rank, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    if silence_others:
        setup_for_distributed(args.rank == 0)


def cleanup_distributed():
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Every ``num_replicas``-th index from ``rank``: each sample on exactly one process.

    ``DistributedSampler`` pads the last round with repeated samples so every rank
    gets as many; for validation that counts some images twice. Here ranks may get
    one sample fewer, and the metrics, which are sums, reduce to the exact totals.
    """

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_samples_total = len(dataset)
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank

    def __iter__(self):
        return iter(range(self.rank, self.num_samples_total, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.num_samples_total, self.num_replicas))


# ---------------------------------------------------------------------------
# logging meters


class SmoothedValue:
    """A series of values: a median/average over a window and the global average."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{value:.4f} ({global_avg:.4f})"

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over processes (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=collective_device())
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / self.count if self.count else 0.0

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    def __init__(self, delimiter="\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(v)

    def __getattr__(self, attr):
        if attr in self.meters:
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=None):
        """Yield from ``iterable``, printing progress, ETA, step and data-loading time every ``print_freq`` steps."""
        header = header or ""
        i = 0
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        total = len(iterable)
        space_fmt = ":" + str(len(str(total))) + "d"
        parts = [header, "[{0" + space_fmt + "}/{1}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        cuda = torch.cuda.is_available()
        if cuda:
            parts.append("max mem: {memory:.0f}")
        log_msg = self.delimiter.join(parts)
        mb = 1024.0 * 1024.0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_seconds = iter_time.global_avg * (total - i - 1)
                eta = str(datetime.timedelta(seconds=int(eta_seconds)))
                extra = {"memory": torch.cuda.max_memory_allocated() / mb} if cuda else {}
                print(log_msg.format(i, total, eta=eta, meters=str(self), time=str(iter_time),
                                     data=str(data_time), **extra), flush=True)
            i += 1
            end = time.time()
        total_time = time.time() - start_time
        total_str = str(datetime.timedelta(seconds=int(total_time)))
        print(f"{header} Total time: {total_str} ({total_time / max(total, 1):.4f} s / it)", flush=True)



def __getattr__(name):
    """The tutorial's ``utils.ConfusionMatrix`` and ``utils.DiceCoefficient``, which live in metrics.py.

    Looked up on first use rather than imported at the top: metrics.py itself
    imports this module's process helpers.
    """
    if name in ("ConfusionMatrix", "DiceCoefficient"):
        from . import metrics
        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
