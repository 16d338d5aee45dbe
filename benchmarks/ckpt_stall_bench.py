"""Checkpoint stall and time to durable: memopt AsyncCheckpointer vs torch.save vs DCP async_save.

One process, one run, one model (~100M parameters: a stack of square ``nn.Linear`` layers) with
torch AdamW state, trained on the CPU. Methods: ``none`` (no checkpoint: the baseline),
``memopt`` (``AsyncCheckpointer.save``), ``torch.save`` (synchronous, of ``{"model":
state_dict, "optim": state_dict}``) and ``dcp`` (``torch.distributed.checkpoint.async_save`` on
a 1-rank gloo group, thread executor, default stager). The machine is shared and noisy, so the
methods are interleaved: each round runs K steps of every method in turn, the method saving
once, right after the ``optimizer.step()`` of its interval's first step; after each interval
the method is drained (untimed) so its background work does not spill into the next one.

Per checkpoint at step s:
- stall: (t[s] - base) + (t[s+1] - base), the extra wall time of the step that saved and of the
  next one (memopt's fence wait before the next ``optimizer.step`` lands there); base is the
  median step time of the ``none`` intervals;
- blocking: time spent inside the save call (plus, for memopt, its fence waits, from
  ``ckpt.stats``): a direct measure, not a difference of two noisy step times;
- overhead: the extra time of all K steps of the interval (background copies and writes compete
  with training for the 2 cores);
- durable: from the save call until the bytes are on disk: memopt's ``durable_s`` (files and
  directory fsynced, renamed); torch.save's call plus an ``fsync`` of the file (done outside the
  timed steps: a favour to torch.save); DCP's future completing (its writer fsyncs).
Throughput is bytes / durable (while training, and for one save each with the training loop
idle: the write path alone), against fio's sequential O_DIRECT write bandwidth (libaio, 1 MiB
blocks, queue depth 32) measured before and after in the same directory (the best of the two).
Ratios printed: memopt stall / DCP stall (target <= 0.1), memopt stall / torch.save stall
(target <= 0.02), memopt throughput / fio (target >= 0.8); the same for blocking time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from memopt.checkpoint import AsyncCheckpointer


def make_model(params_m: float, layers: int) -> nn.Module:
    width = int((params_m * 1e6 / layers) ** 0.5)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Method:
    """A way to checkpoint: ``save`` runs inside the timed step, ``drain`` after the interval."""

    name = "none"

    def __init__(self) -> None:
        self.intervals: list[list[float]] = []  # per interval: its K step times
        self.blocking: list[float] = []
        self.durable: list[float] = []
        self.nbytes: list[int] = []

    def save(self, step: int) -> None:
        pass

    def drain(self) -> None:
        pass


class Memopt(Method):
    name = "memopt AsyncCheckpointer"

    def __init__(self, d: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.ckpt = AsyncCheckpointer(d, keep=2)
        self.phases: list[tuple[float, float]] = []  # (copy to host done, then write) seconds
        self.model, self.opt = model, opt

    def save(self, step: int) -> None:
        self.ckpt.save(step, model=self.model, optimizer=self.opt)

    def drain(self) -> None:
        self.ckpt.wait()
        rec = self.ckpt.stats.records[-1]
        assert rec.ok, rec
        self.blocking.append(rec.stall_s)  # capture + slot wait + fence waits
        self.phases.append((rec.copied_s, rec.written_s - rec.copied_s))
        self.durable.append(rec.durable_s)
        self.nbytes.append(rec.nbytes)


class TorchSave(Method):
    name = "torch.save (sync)"

    def __init__(self, d: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.d, self.model, self.opt = d, model, opt

    def save(self, step: int) -> None:
        self.path = self.d / f"torch_{step}.pt"
        t0 = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()}, self.path)
        self.blocking.append(time.perf_counter() - t0)

    def drain(self) -> None:
        t0 = time.perf_counter()
        fd = os.open(self.path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        self.durable.append(self.blocking[-1] + time.perf_counter() - t0)
        self.nbytes.append(self.path.stat().st_size)
        self.path.unlink()


class DCPAsync(Method):
    name = "DCP async_save"

    def __init__(self, d: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.d, self.model, self.opt = d, model, opt
        self.done: list[float] = []

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.path = self.d / f"dcp_{step}"
        t0 = time.perf_counter()
        msd, osd = get_state_dict(self.model, self.opt)
        self.fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(self.path))
        self.fut.add_done_callback(lambda _: self.done.append(time.perf_counter() - t0))
        self.blocking.append(time.perf_counter() - t0)

    def drain(self) -> None:
        self.fut.result()
        while len(self.done) < len(self.blocking):  # the callback may run just after result()
            time.sleep(0.001)
        self.durable.append(self.done[-1])
        self.nbytes.append(dir_bytes(self.path))
        shutil.rmtree(self.path)


def run_rounds(
    methods: list[Method], model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
    rounds: int, every: int,
) -> None:  # fmt: skip
    """Interleave the methods: each round, K steps of each, rotated so none is always first."""
    step = 0
    for r in range(rounds):
        for meth in methods[r % len(methods) :] + methods[: r % len(methods)]:
            times = []
            for i in range(every):
                t0 = time.perf_counter()
                train_step(model, opt, x)
                if i == 0:
                    meth.save(step)
                times.append(time.perf_counter() - t0)
                step += 1
            meth.drain()
            meth.intervals.append(times)
        print(f"# round {r + 1}/{rounds} done", flush=True)


def idle_durable(methods: list[Method], step: int) -> dict[str, tuple[float, int]]:
    """Each method saves once with the training loop idle: (seconds to durable, bytes)."""
    out = {}
    for meth in methods:
        meth.save(step)
        meth.drain()
        out[meth.name] = (meth.durable.pop(), meth.nbytes.pop())
        meth.blocking.pop()
        step += 1
    return out


def fio_write(d: Path, size: int) -> float | None:
    if not shutil.which("fio"):
        print("# fio: not installed (apt-get install -y fio): peer missing")
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from nvme_bench import fio_run

    try:
        return fio_run(d, size, 1 << 20, 32, "write") * 1e9
    finally:
        (d / "fio.dat").unlink(missing_ok=True)


def summarize(meth: Method, base: float, skip: int) -> dict[str, float]:
    """Medians over the method's saves, the first ``skip`` (warm-up) rounds left out."""
    ivs = meth.intervals[skip:]
    k = len(ivs[0])
    med = statistics.median
    row = {
        "stall_s": med(t[0] + t[1] - 2 * base for t in ivs),
        "blocking_s": med(meth.blocking[skip:]),
        "overhead_s": med(sum(t) - k * base for t in ivs),
        "durable_s": med(meth.durable[skip:]),
        "bytes": med(meth.nbytes[skip:]),
        "throughput_Bps": med(
            b / d for b, d in zip(meth.nbytes[skip:], meth.durable[skip:], strict=True)
        ),
        "stall_each_s": [t[0] + t[1] - 2 * base for t in ivs],
    }
    print(
        f"| {meth.name} | {row['stall_s']:.3f} | {row['blocking_s']:.3f} | "
        f"{row['overhead_s']:.3f} | {row['durable_s']:.2f} | {row['bytes'] / 1e9:.2f} | "
        f"{row['throughput_Bps'] / 1e9:.2f} |"
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params-m", type=float, default=100.0, help="model size, millions")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--every", type=int, default=3, help="steps per interval (save every K)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; the first is a warm-up")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in /tmp)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    if args.every < 2 or args.rounds < 2:
        raise SystemExit("--every >= 2 (stall spans 2 steps) and --rounds >= 2 (1 is warm-up)")
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_stall_", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)  # DCP's async_save wants a group
    torch.manual_seed(0)
    model = make_model(args.params_m, args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    width = model[0].in_features
    x = torch.randn(args.batch, width)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"# model: {args.layers} x Linear({width}, {width}) = {n_params / 1e6:.1f}M params, "
          f"AdamW (fp32 state), batch {args.batch}; {args.rounds} rounds (first = warm-up) of "
          f"{args.every} steps per method; dir {root}", flush=True)  # fmt: skip
    train_step(model, opt, x)  # the optimizer state exists from here on
    fio = [fio_write(root, 1 << 30)]
    methods = [
        Method(),
        Memopt(root / "memopt", model, opt),
        TorchSave(root, model, opt),
        DCPAsync(root, model, opt),
    ]
    run_rounds(methods, model, opt, x, args.rounds, args.every)
    idle = idle_durable(methods[1:], 10**6)
    phases = methods[1].phases[1:]  # type: ignore[attr-defined]
    methods[1].ckpt.close()  # type: ignore[attr-defined]
    fio.append(fio_write(root, 1 << 30))
    base_steps = [t for iv in methods[0].intervals[1:] for t in iv]
    base = statistics.median(base_steps)
    q = statistics.quantiles(base_steps, n=4)
    print(f"# baseline step: median {base:.3f} s (IQR {q[0]:.3f}-{q[2]:.3f}, "
          f"{len(base_steps)} steps)")  # fmt: skip
    print("| method | stall s (2 steps) | blocking s | overhead s (K steps) | durable s | GB "
          "| GB/s |\n|---|---|---|---|---|---|---|")  # fmt: skip
    results = {m.name: summarize(m, base, 1) for m in methods[1:]}
    copy_s, write_s = (statistics.median(p[i] for p in phases) for i in (0, 1))
    print(f"# memopt while training: copy to host done at {copy_s:.2f} s, then write + fsync + "
          f"publish {write_s:.2f} s (medians)")  # fmt: skip
    print("# saved with the training loop idle (one save each): seconds to durable, GB/s")
    for name, (sec, nbytes) in idle.items():
        results[name]["idle_durable_s"] = sec
        results[name]["idle_throughput_Bps"] = nbytes / sec
        print(f"#   {name}: {sec:.2f} s, {nbytes / sec / 1e9:.2f} GB/s")
    report(list(results.values()), base, [v for v in fio if v], args)
    dist.destroy_process_group()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


def report(rows: list[dict], base: float, fio: list[float], args: argparse.Namespace) -> None:
    m, t, d = rows

    def ratio(key: str, peer: dict, target: str) -> str:
        if peer[key] <= 0:
            return f"n/a (peer {key} <= 0: within noise)"
        return f"{m[key] / peer[key]:.3f} ({target})"

    for key in ("stall_s", "blocking_s"):
        print(f"memopt {key} / DCP async_save:  {ratio(key, d, 'target <= 0.1')}")
        print(f"memopt {key} / torch.save:      {ratio(key, t, 'target <= 0.02')}")
    if fio:
        bw = max(fio)
        runs = ", ".join(f"{v / 1e9:.2f}" for v in fio)
        print(f"fio O_DIRECT write GB/s: {runs} (best {bw / 1e9:.2f})")
        for key, what in (("throughput_Bps", "while training"), ("idle_throughput_Bps", "idle")):
            print(f"memopt throughput / fio ({what}): {m[key] / bw:.3f} (target >= 0.8); "
                  f"DCP {d[key] / bw:.3f}, torch.save {t[key] / bw:.3f}")  # fmt: skip
    if args.json:
        names = ("memopt", "torch.save", "dcp")
        payload = {"args": vars(args), "base_step_s": base, "fio_Bps": fio}
        payload.update(dict(zip(names, rows, strict=True)))
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
