"""Crash trials: SIGKILL a training process at random moments while it checkpoints every step.

Each trial starts a child process (forked from a server that imported torch) that trains a
small MLP with AdamW and calls ``AsyncCheckpointer.save`` after every optimizer step
(``keep=3``), so a save is nearly always being copied, written or published. Before each
``save(step)`` the child appends ``step sha1`` to a side log: the SHA-1 of the model's and
optimizer's tensors at that step (the values the snapshot must hold). The parent waits until
the child has published its first snapshot, sleeps a random time (seeded), and kills it with
SIGKILL. Then, with a fresh ``AsyncCheckpointer`` on the directory:

- killed mid-save: the log names a step newer than the newest published one (that save was
  being captured, copied, written or published); a leftover ``.tmp-step_*`` directory (files
  partly written) is counted too;
- ``latest()`` must name a step from the log; every published step must load (checksums
  verified, no fallback to an older snapshot: ``load(step=...)``) and its tensors must hash to
  the logged value. A partial, corrupt or wrong snapshot is a failure;
- negative control: one byte of the newest snapshot's data file is then flipped, and loading it
  must fail (the checksum catches it), so the check above can fail.

Prints the counts (trials, killed mid-save, loaded OK, no snapshot yet, failures) and exits
non-zero on any failure.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.checkpoint import AsyncCheckpointer


def make(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def digest(model: nn.Module, opt: torch.optim.Optimizer) -> str:
    """SHA-1 of the parameters, buffers and optimizer state tensors, in a fixed order."""
    h = hashlib.sha1()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for p in model.parameters():
        for key in sorted(opt.state.get(p, {})):
            t = opt.state[p][key]
            if isinstance(t, torch.Tensor):
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def child(directory: str, log: str, width: int) -> None:
    torch.set_num_threads(1)
    model, opt = make(width)
    x = torch.randn(64, width)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    ckpt = AsyncCheckpointer(directory, keep=3)
    for step in range(1, 1_000_000):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # Logged before save: once save returns the snapshot may be published at any moment.
        os.write(fd, f"{step} {digest(model, opt)}\n".encode())
        ckpt.save(step, model=model, optimizer=opt, extra={"step": step})


def read_log(log: Path) -> dict[int, str]:
    out = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # a line cut by the kill is ignored
            out[int(parts[0])] = parts[1]
    return out


def corruption_caught(ckpt: AsyncCheckpointer, directory: Path, step: int, width: int) -> bool:
    """Negative control: flip one byte of the step's data file; loading it must then fail."""
    (data,) = (directory / f"step_{step:010d}").glob("*.safetensors")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    model, opt = make(width)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt.load(step=step, model=model, optimizer=opt)
    except Exception:
        return True
    return False


def check(directory: Path, log: Path, width: int) -> tuple[str, str]:
    """('ok' | 'empty' | 'fail', detail) for one killed child's directory."""
    expected = read_log(log)
    ckpt = AsyncCheckpointer(directory, keep=3)
    try:
        latest, steps = ckpt.latest(), ckpt.steps()
        if latest is None:
            return "empty", "no snapshot published before the kill"
        for step in steps:
            if step not in expected:
                return "fail", f"published step {step} was never saved (log: {len(expected)})"
            model, opt = make(width)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fallback to another snapshot is a failure
                extra = ckpt.load(step=step, model=model, optimizer=opt)
            if extra.get("step") != step or digest(model, opt) != expected[step]:
                return "fail", f"step {step} loads but its values differ from what was saved"
        if not corruption_caught(ckpt, directory, latest, width):
            return "fail", f"a flipped byte in step {latest}'s file was not detected on load"
        return "ok", f"latest {latest}, published {steps}, logged up to {max(expected)}"
    except Exception as e:  # any load error on a published snapshot is a failure
        return "fail", f"{type(e).__name__}: {e}"
    finally:
        ckpt.close()


def trial(
    ctx: Any, root: Path, rng: random.Random, width: int, max_delay: float
) -> tuple[str, tuple[bool, bool], str]:  # fmt: skip
    d, log = root / "ckpt", root / "expected.log"
    shutil.rmtree(d, ignore_errors=True)
    log.unlink(missing_ok=True)
    proc = ctx.Process(target=child, args=(str(d), str(log), width))
    proc.start()
    deadline = time.monotonic() + 300
    while not (d.exists() and any(p.name.startswith("step_") for p in d.iterdir())):
        if not proc.is_alive() or time.monotonic() > deadline:  # a first snapshot is published
            proc.kill()
            return "fail", (False, False), f"child published nothing (exit {proc.exitcode})"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, max_delay))
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    partial = any(p.name.startswith(".tmp-step_") for p in d.iterdir())
    published = [int(p.name[5:]) for p in d.iterdir() if p.name.startswith("step_")]
    in_flight = max(read_log(log), default=0) > max(published, default=0)
    status, detail = check(d, log, width)
    return status, (in_flight, partial), detail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=512, help="MLP width (2 layers)")
    ap.add_argument("--max-delay", type=float, default=2.0, help="kill within this many s")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir in /tmp)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_crash_", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    # Children fork from a server that imported torch and memopt once (seconds per import on
    # a loaded machine) and never ran a torch op (so no thread pool is inherited by a fork).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "memopt.checkpoint"])
    n_params = 2 * (args.width * args.width + args.width)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.trials} "
          f"trials, seed {args.seed}, MLP {n_params / 1e6:.2f}M params + AdamW, save every "
          f"step, SIGKILL within {args.max_delay} s of the first publish; dir {root}",
          flush=True)  # fmt: skip
    counts = {"ok": 0, "empty": 0, "fail": 0}
    in_flight = partial = 0
    for i in range(args.trials):
        status, (flying, part), detail = trial(ctx, root, rng, args.width, args.max_delay)
        counts[status] += 1
        in_flight += flying
        partial += part
        if status == "fail" or i < 3 or (i + 1) % 10 == 0:
            print(f"trial {i}: {status} (save in flight: {flying}, partial directory: {part}): "
                  f"{detail}", flush=True)  # fmt: skip
    print(f"trials {args.trials} | killed mid-save {in_flight} (partial directory on disk: "
          f"{partial}) | loaded OK {counts['ok']} | no snapshot yet {counts['empty']} | "
          f"failures {counts['fail']}")  # fmt: skip
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if counts["fail"] else 0)


if __name__ == "__main__":
    main()
