"""A rank of ``memopt run`` whose training raises finishes its in-flight save BEFORE it ends
the process group (session 17).

Before: ``main()``'s ``finally`` destroyed the default process group at once, and the save
still in flight was left to the checkpoint exit hook at interpreter exit. Its disk
publication still went through (the checkpointer's own gloo group outlives
``destroy_process_group()`` on gloo), but everything that needs the default group after it
failed: with ``checkpoint.redundancy`` every rank printed "in-memory redundancy: protecting a
save on peers failed: ValueError('Default process group has not been initialized ...')".
Now the error path finishes the save (bounded on 2+ ranks, as the hook is) while the group
is up, then tears it down.

Two ranks on gloo (the processes started directly, a file store: the entry point skips its
own ``init_process_group``), run as ``python -m memopt.cli.train`` through ``runpy``. The
data stream fails in step 2 on both ranks, or on rank 1 alone (rank 0 then fails in the
step's all-reduce once rank 1 is gone). The disk write of step 1's save waits until the
saves are being finished (the exit hook on the old code, the error path on the new one), so
the publication always comes after the error, deterministically.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memopt.checkpoint.publish import published_steps, step_name

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 120  # two children importing torch on a busy 2-core machine, then a short run
TINY = """
model: {preset: llama-tiny, device: cpu, overrides: {hidden_size: 32, intermediate_size: 64,
        num_hidden_layers: 1}}
data: {source: stdlib, max_bytes: 20000}
train: {steps: 3, batch_size: 1, seq_len: 16}
optimizer: {name: adamw}
checkpoint: {directory: ck, every_n_steps: 1, fsync: false, redundancy: replicate}
"""

# argv: store, rank, "fail"/"ok", marker file, recipe. The write of step 1 waits (at most
# 30 s: never a hang) until exit_hook.finish runs; the publication records whether the
# default process group was still up.
_CHILD = textwrap.dedent("""
    import runpy, sys, threading
    from pathlib import Path
    import torch.distributed as dist
    import memopt.checkpoint.checkpointer as checkpointer
    import memopt.checkpoint.exit_hook as exit_hook
    import memopt.config.workload as workload

    store, rank, fail, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fail", sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    finishing = threading.Event()
    write, settle, finish, stream = (checkpointer.AsyncCheckpointer._write,
                                     checkpointer.settle, exit_hook.finish, workload.batches)

    def held_write(self, job):
        if job.step == 1 and fail:
            finishing.wait(30)
        write(self, job)

    def recorded_settle(job, *args, **kwargs):
        if job.step == 1:
            Path(marker).write_text(f"group up at publication: {dist.is_initialized()}")
        return settle(job, *args, **kwargs)

    def marked_finish(*args, **kwargs):
        finishing.set()
        return finish(*args, **kwargs)

    def failing_batches(*args, **kwargs):
        source = stream(*args, **kwargs)
        yield next(source)
        raise RuntimeError("boom: the data stream failed in step 2")

    checkpointer.AsyncCheckpointer._write = held_write
    checkpointer.settle = recorded_settle
    exit_hook.finish = marked_finish
    if fail:
        workload.batches = failing_batches
    sys.argv = ["memopt.cli.train", sys.argv[5]]
    runpy.run_module("memopt.cli.train", run_name="__main__", alter_sys=True)
""")


@pytest.mark.parametrize("failing", [(0, 1), (1,)], ids=["both-ranks-raise", "rank1-raises"])
def test_in_flight_save_is_finished_before_the_group_ends(
    tmp_path: Path, failing: tuple[int, ...]
) -> None:
    (tmp_path / "r.yaml").write_text(TINY)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(tmp_path / "store"),
                str(rank),
                "fail" if rank in failing else "ok",
                str(tmp_path / f"marker{rank}"),
                "r.yaml",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        errs = [p.communicate(timeout=WAIT_S)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    for rank, (p, err) in enumerate(zip(procs, errs, strict=True)):
        assert p.returncode == 1, f"rank {rank}:\n{err[-3000:]}"
        # (rank 0 alone: its step-2 all-reduce fails once rank 1 is gone)
        assert ("boom" if rank in failing else "RuntimeError") in err, err[-3000:]
        # before: the exit hook published after destroy_process_group(); the redundancy
        # tier then failed on every rank with "Default process group has not been initialized"
        assert "protecting a save on peers failed" not in err, err[-3000:]
        assert "has not been initialized" not in err, err[-3000:]
        got = (tmp_path / f"marker{rank}").read_text()
        assert got == "group up at publication: True", f"rank {rank}: {got}"
    for rank in failing:
        assert ("training stopped (RuntimeError) with a save in flight; waiting until the save "
                "of step(s) [1]") in errs[rank], errs[rank][-3000:]  # fmt: skip
    ck = tmp_path / "ck"
    assert published_steps(str(ck)) == [1]  # all ranks wrote it: published, and nothing else
    assert [n for n in os.listdir(ck) if n.startswith(".tmp-")] == [], os.listdir(ck)
    assert (ck / step_name(1) / "manifest.json").exists()
