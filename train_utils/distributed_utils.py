"""Process and device set-up, logging meters, and the validation metrics that reduce across processes.

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
import torch.nn.functional as F

from .dice_coefficient_loss import build_target, dice_per_item
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


def init_distributed_mode(args):
    """Start the process group when launched by torchrun (or SLURM); otherwise run as one process.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` (the
    local rank) and ``args.dist_backend``: NCCL when the device is CUDA, gloo on the CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.setdefault("RANK", str(args.rank))
        os.environ.setdefault("WORLD_SIZE", str(args.world_size))
        os.environ.setdefault("LOCAL_RANK", str(args.gpu))
    else:
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        args.dist_backend = None
        return

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

    def log_every(self, iterable, print_freq, header=""):
        """Yield from ``iterable``, printing progress, ETA, step and data-loading time every ``print_freq`` steps."""
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


# ---------------------------------------------------------------------------
# validation metrics: accumulated on the device, one all-reduce each


class ConfusionMatrix:
    """Pixel confusion matrix (rows: target, columns: prediction); targets outside [0, n) are ignored."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.mat = None

    def update(self, a, b):
        """``a``: target class indices, ``b``: predicted indices, any shape (flattened)."""
        n = self.num_classes
        a = a.reshape(-1).to(torch.int64)
        b = b.reshape(-1).to(torch.int64)
        if self.mat is None:
            self.mat = torch.zeros((n, n), dtype=torch.int64, device=a.device)
        with torch.no_grad():
            # Ignored pixels go to an extra bin that is dropped: boolean indexing and bincount
            # would both wait for the host on CUDA.
            valid = (a >= 0) & (a < n)
            inds = torch.where(valid, n * a + b, n * n)
            counts = torch.zeros(n * n + 1, dtype=torch.int64, device=a.device)
            counts.index_add_(0, inds, torch.ones_like(inds))
            self.mat += counts[: n * n].view(n, n)

    def reset(self):
        if self.mat is not None:
            self.mat.zero_()

    def compute(self):
        h = self.mat.double()
        acc_global = torch.diag(h).sum() / h.sum()
        acc = torch.diag(h) / h.sum(1)
        iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
        return acc_global, acc, iu

    def reduce_from_all_processes(self):
        if is_dist_avail_and_initialized():
            if self.mat is None:  # a rank with no validation images still takes part
                self.mat = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)
            mat = self.mat.to(collective_device())
            dist.all_reduce(mat)
            self.mat = mat.to(self.mat.device)

    def summary(self):
        """The block's numbers as plain floats (percent), for the JSON log."""
        acc_global, acc, iu = self.compute()
        return {"global_correct": acc_global.item() * 100, "average_row_correct": (acc * 100).tolist(),
                "iou": (iu * 100).tolist(), "mean_iou": iu.nanmean().item() * 100}

    def __str__(self):
        s = self.summary()
        return ("global correct: {:.1f}\n"
                "average row correct: {}\n"
                "IoU: {}\n"
                "mean IoU: {:.1f}").format(s["global_correct"],
                                           ["{:.1f}".format(i) for i in s["average_row_correct"]],
                                           ["{:.1f}".format(i) for i in s["iou"]],
                                           s["mean_iou"])


class DiceCoefficient:
    """Validation dice: argmax, one-hot, background dropped, the dice formula; mean over images.

    The tutorial averages per batch with a validation batch size of 1, i.e. per
    image; summing per-image values makes the result independent of the batch
    size and exact under DDP, where each process holds different images.
    """

    def __init__(self, num_classes: int = 2, ignore_index: int = -100):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cumulative_dice = None
        self.count = None

    def update(self, pred, target):
        """``pred``: logits [N, C, H, W]; ``target``: class indices [N, H, W]."""
        if self.cumulative_dice is None:
            self.cumulative_dice = torch.zeros(1, dtype=torch.float64, device=pred.device)
            self.count = torch.zeros(1, dtype=torch.float64, device=pred.device)
        with torch.no_grad():
            one_hot = F.one_hot(pred.argmax(dim=1), self.num_classes).permute(0, 3, 1, 2).float()
            dice_target = build_target(target, self.num_classes, self.ignore_index)
            per_image = dice_per_item(one_hot[:, 1:], dice_target[:, 1:], self.ignore_index, 1e-6, keep_dims=2)
            self.cumulative_dice += per_image.mean(dim=1).sum()
            self.count += pred.shape[0]

    @property
    def value(self):
        if self.cumulative_dice is None:
            return torch.zeros(1)
        return torch.where(self.count > 0, self.cumulative_dice / self.count.clamp(min=1), 0)

    def reset(self):
        if self.cumulative_dice is not None:
            self.cumulative_dice.zero_()
        if self.count is not None:
            self.count.zero_()

    def reduce_from_all_processes(self):
        if not is_dist_avail_and_initialized():
            return
        if self.cumulative_dice is None:  # a rank with no validation images still takes part
            self.cumulative_dice = torch.zeros(1, dtype=torch.float64)
            self.count = torch.zeros(1, dtype=torch.float64)
        t = torch.cat([self.cumulative_dice, self.count]).to(collective_device())
        dist.all_reduce(t)
        self.cumulative_dice, self.count = t[:1], t[1:]
