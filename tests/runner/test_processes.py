"""Real processes: a run killed with SIGKILL and resumed, and a run split over two torchrun ranks,
each compared bitwise with one uninterrupted in-process run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fxattr.runner import attribute_dataset, load_attributions
from tests.runner.helpers import labelled
from tests.runner.worker import BATCH_SIZE, SHARD_SIZE, explainer

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def uninterrupted(out, n, fmt="safetensors"):
    explain, params = explainer()
    attribute_dataset(explain, params, labelled(n), out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE,
                      format=fmt, progress=False)


def files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_an_uninterrupted_run(tmp_path):
    n = 20  # 10 shards, 0.15 s of "decoding" per example: about 3 s of run to kill in
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(WORKER), str(out), str(n), "--slow", "0.15"],
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while len(list((out / "shards").glob("shard-*.safetensors"))) < 3:
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the worker wrote no shards in 90 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    written = len(list((out / "shards").glob("shard-*.safetensors")))
    assert 3 <= written < 10, written
    uninterrupted(tmp_path / "whole", n)
    explain, params = explainer()
    summary = attribute_dataset(explain, params, labelled(n), out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE,
                                resume=True, progress=False)
    assert summary.computed == 10 - written and summary.skipped == written
    assert files(out) == files(tmp_path / "whole")
    run = load_attributions(out)
    assert torch.equal(run["index"], torch.arange(n))


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_process(tmp_path):
    n = 9  # 5 shards of 2 (the last of 1): rank 0 takes 3, rank 1 takes 2
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(WORKER), str(out), str(n), "--format", "hdf5"]
    result = subprocess.run(command, check=False, env=environment(), capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    # the two ranks print to one pipe: their lines can interleave without a newline between them
    lines = sorted(re.findall(r"rank \d+ computed \d+ skipped \d+", result.stdout))
    assert lines == ["rank 0 computed 3 skipped 0", "rank 1 computed 2 skipped 0"], result.stdout
    uninterrupted(tmp_path / "one", n, fmt="hdf5")
    assert files(out) == files(tmp_path / "one")
    run = load_attributions(out)
    assert torch.equal(run["index"], torch.arange(n))
    assert run["attribution"].shape[0] == n
