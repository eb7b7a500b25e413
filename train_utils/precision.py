"""Mixed precision: the autocast dtype ``--amp`` asks for on a device, and whether the CPU has bfloat16 hardware."""
import torch

from .settings import amp_dtype_name


def cpu_has_native_bf16():
    """Does this CPU multiply bfloat16 in hardware (AMX tiles or AVX512-BF16)?

    Only there is bfloat16 autocast faster than float32 on the CPU (a U-Net
    training step 2.6-3.6x faster with AMX, in channels_last:
    ``benchmarks/benchmark.py --mode precision``); elsewhere oneDNN emulates
    it, slower than float32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()))
    except AttributeError:  # a PyTorch without these probes: assume the common case, no bfloat16 hardware
        return False


def autocast_dtype(device, amp, dtype=None):
    """The torch dtype autocast runs in for ``--amp`` on ``device`` (None without AMP): ``dtype`` if named,
    else float16 on CUDA and bfloat16 on the CPU (``settings.amp_dtype_name``)."""
    name = amp_dtype_name(device.type, amp, dtype)
    return getattr(torch, name) if name else None
