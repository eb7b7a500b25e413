"""Train with DistributedDataParallel under torchrun: ``train.py``'s parser and loop plus the distributed flags.

    torchrun --nproc_per_node=4 train_multi_GPU.py --data-path /data --sync-bn      # 4 GPUs, one node
    torchrun --standalone --nproc_per_node=2 train_multi_GPU.py --device cpu ...    # CPU (gloo), for testing
    python train_multi_GPU.py ...                                                    # no torchrun: one process

``-b`` is the batch per process: the total batch is ``-b x processes``.
"""
import argparse

from train_utils.allocator import use_fast_allocator

if __name__ == "__main__":  # first, before torch loads: run again with a fast allocator (train_utils/allocator.py)
    use_fast_allocator()

import train
from train_utils.settings import Flag


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="PyTorch U-Net DDP training on DRIVE", add_help=add_help,
                                     parents=[train.get_args_parser(add_help=False)],
                                     argument_default=argparse.SUPPRESS)
    flag = Flag(parser.add_argument_group("distributed"))
    flag("--sync-bn", dest="sync_bn", action="store_true", aliases=("--sync_bn",),
         help="synchronise BatchNorm statistics across processes")
    flag("--world-size", dest="world_size", type=int, aliases=("--world_size",),
         help="kept for the original's command lines: torchrun's WORLD_SIZE decides")
    flag("--dist-url", dest="dist_url", aliases=("--dist_url",), help="url used to set up the process group")
    flag("--dist-timeout", dest="dist_timeout", type=float, metavar="MIN",
         help="minutes a collective may wait for a lost process before the run fails")
    return parser


if __name__ == "__main__":
    train.cli(get_args_parser())
