"""Train with DistributedDataParallel under torchrun: ``train.py``'s parser and loop plus the distributed flags.

    torchrun --nproc_per_node=4 train_multi_GPU.py --data-path /data --sync-bn      # 4 GPUs, one node
    torchrun --standalone --nproc_per_node=2 train_multi_GPU.py --device cpu ...    # CPU (gloo), for testing
    python train_multi_GPU.py ...                                                    # no torchrun: one process

``-b`` is the batch per process: the total batch is ``-b x processes``.
"""
from train_utils.allocator import use_fast_allocator
from train_utils.cli import parse_args, train_multi_gpu_parser as get_args_parser

# First, before torch loads: --help and mistyped flags are answered at once (train_utils/cli.py imports no
# torch); then the script runs again with a fast allocator (train_utils/allocator.py).
if __name__ == "__main__":
    cli_args = parse_args(get_args_parser(doc=__doc__))
    use_fast_allocator()

import train

if __name__ == "__main__":
    train.cli(cli_args)
