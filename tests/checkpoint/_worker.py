"""Subprocess side of the resume and crash tests (a fresh interpreter per phase).

``python -m tests.checkpoint._worker save DIR K NAME...``: train K steps, save, wait, exit.
``python -m tests.checkpoint._worker resume DIR N OUT NAME...``: fresh process: load the
latest snapshot, train to step N, write the parameters to OUT/<name>.safetensors.
``python -m tests.checkpoint._worker loop DIR``: train and save every step forever (killed
by the crash test at a random moment).
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

from memopt.checkpoint import AsyncCheckpointer
from tests.checkpoint import _common as T


def save(root: str, k: int, names: list[str]) -> None:
    for name in names:
        model, opt, sched = T.make_all(name)
        T.train(model, opt, sched, 0, k)
        with AsyncCheckpointer(os.path.join(root, name), keep=2) as ckpt:
            ckpt.save(k, model=model, optimizer=opt, scheduler=sched, extra={"next_step": k})
            ckpt.wait()


def resume(root: str, n: int, out: str, names: list[str]) -> None:
    for name in names:
        model, opt, sched = T.make_all(name)
        torch.manual_seed(1234)  # a different RNG: the load must restore the saved one
        with AsyncCheckpointer(os.path.join(root, name)) as ckpt:
            start = ckpt.load(model=model, optimizer=opt, scheduler=sched)["next_step"]
        T.train(model, opt, sched, start, n)
        save_file(T.full_params(model), os.path.join(out, f"{name}.safetensors"))


def loop(root: str) -> None:
    model, opt, sched = T.make_all("adamw")
    ckpt = AsyncCheckpointer(root, keep=2, max_inflight=1)
    step = 0
    while True:
        T.train(model, opt, sched, step, step + 1)
        step += 1
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, extra={"next_step": step})
        print(step, flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd, root = sys.argv[1], sys.argv[2]
    if cmd == "save":
        save(root, int(sys.argv[3]), sys.argv[4:])
    elif cmd == "resume":
        resume(root, int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    else:
        loop(root)
