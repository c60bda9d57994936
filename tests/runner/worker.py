"""A run as its own process: ``python tests/runner/worker.py OUT N [--slow SECONDS] [--resume]``.

The killed-and-resumed test runs it and kills it with SIGKILL part-way; the distributed test
runs it under ``python -m torch.distributed.run --nproc_per_node 2``. Prints one line per rank:
``rank R computed C skipped S``.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fxattr
from fxattr.runner import attribute_dataset
from tests.runner.helpers import labelled, tiny_cnn

BATCH_SIZE = 2
SHARD_SIZE = 2


class Slow(torch.utils.data.Dataset):
    """Decoding that takes time: the run is still going when the test kills it."""

    def __init__(self, data, seconds):
        self.data, self.seconds = data, seconds

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return self.data[i]


def explainer():
    f, params = fxattr.functionalize(tiny_cnn())
    return fxattr.lrp(f, composite="epsilon_plus"), params


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("n", type=int)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--format", default="safetensors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    explain, params = explainer()
    data = labelled(args.n)
    summary = attribute_dataset(explain, params, Slow(data, args.slow) if args.slow else data, args.out,
                                batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, resume=args.resume,
                                format=args.format, progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(
        __import__("os").environ.get("RANK", 0))
    print(f"rank {rank} computed {summary.computed} skipped {summary.skipped}", flush=True)


if __name__ == "__main__":
    main()
