"""Checkpoint stall and time to durable: memopt AsyncCheckpointer vs torch.save vs DCP async_save.

One process, one run, one model (~100M parameters: a stack of square ``nn.Linear`` layers) with
torch AdamW state, trained on the CPU. Methods: ``none`` (no checkpoint: the baseline),
``memopt`` (``AsyncCheckpointer.save``), ``torch.save`` (synchronous, of ``{"model":
state_dict, "optim": state_dict}``) and two ``dcp`` (``torch.distributed.checkpoint.async_save``
on a 1-rank gloo group, thread executor): with the default stager, which copies the state in
the call, and with DCP's async staging (the copy in a background thread, waited for before the
next ``optimizer.step``, as memopt's fence does). The machine is shared and noisy, so the
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
Throughput of memopt's saves, two definitions, from the checkpointer's own ``stats``:
(a) writer = bytes / (first byte written -> files fsynced and snapshot published), the
writer's own rate, the like-for-like comparison with fio; (b) save = bytes / (save call ->
published), which adds the copy to host staging before the first write. fio (``_fio.py``:
libaio, O_DIRECT, 1 MiB blocks, end_fsync, the checkpoint's size, in the same directory, at
the queue depth that holds as many bytes in flight as memopt's writer: 64 x 1 MiB against
8 x 8 MiB) runs right before and right after every memopt save, and each save is compared with
the higher of its two adjacent fio figures (conservative; the mean is printed too); the
median of these per-save ratios is reported, while training and with the loop idle
(``--idle-saves`` saves). ``--ab-follow`` adds a second memopt method whose writer starts as
soon as the first chunk is staged and follows the copy (the previous design), interleaved
like the others, for an A/B in one run; ``--ab-nice N`` likewise adds one with
``background_nice=N`` (niced copier and writer threads), ``--ab-team`` one that stages CPU
tensors as before 2026-11-23 (torch's ``copy_`` on an OpenMP team of every core; now the
copier thread copies alone) and ``--ab-two-pass`` one with ``checksum_in_copy=False`` (copy,
then a crc32c pass in the writer; the default is one pass, ``memopt/checkpoint/copy_crc.py``).
torch.save and
DCP get bytes / durable.
Ratios printed: memopt stall / each DCP's stall (target <= 0.1), memopt stall / torch.save stall
(target <= 0.02), memopt writer throughput / adjacent fio (target >= 0.8); the same for
blocking time and the save throughput.
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
from memopt.checkpoint.writer import bytes_in_flight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fio import MIB, Adjacent  # noqa: E402


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

    def begin(self) -> None:
        """Before the interval (untimed): memopt runs fio here."""

    def save(self, step: int) -> None:
        pass

    def drain(self) -> None:
        pass


class Memopt(Method):
    name = "memopt AsyncCheckpointer"

    def __init__(
        self, d: Path, model: nn.Module, opt: torch.optim.Optimizer, fio: dict, follow: bool,
        nice: int = 0, team: bool = False, two_pass: bool = False,
    ) -> None:
        super().__init__()
        self.ckpt = AsyncCheckpointer(d, keep=2, background_nice=nice,
                                      checksum_in_copy=not two_pass)  # fmt: skip
        if two_pass:
            self.name = "memopt, checksum_in_copy=False"
        if follow:  # the A/B variant: the writer overlaps the copy (the previous design)
            self.ckpt._pipeline.follow_copy = True
            self.name = "memopt, writer following the copy"
        if nice:
            self.name = f"memopt, background_nice={nice}"
        if team:  # the A/B variant: the staging path before 2026-11-23 (see --ab-team)
            self.ckpt._pipeline.copy_team = True
            self.name = "memopt, copy by torch's OpenMP team"
        self.phases: list[tuple[float, float]] = []  # (copy to host done, then write) seconds
        self.cpu: list[float] = []  # the save's copier + writer thread CPU seconds
        self.idle_cpu: list[float] = []  # the same for the saves with the loop idle
        self.model, self.opt = model, opt
        self.train_adj, self.idle_adj = Adjacent(**fio), Adjacent(**fio)
        self.adj = self.train_adj

    def begin(self) -> None:
        self.adj.before()

    def save(self, step: int) -> None:
        self.ckpt.save(step, model=self.model, optimizer=self.opt)

    def drain(self) -> None:
        self.ckpt.wait()
        rec = self.ckpt.stats.records[-1]
        assert rec.ok, rec
        self.blocking.append(rec.stall_s)  # capture + slot wait + fence waits
        self.phases.append((rec.copied_s, rec.written_s - rec.copied_s))
        self.cpu.append(rec.background_cpu_s)
        self.durable.append(rec.durable_s)
        self.nbytes.append(rec.nbytes)
        self.adj.after(writer=rec.writer_Bps, save=rec.save_Bps)
        if self.adj.saves:
            self.adj.saves[-1].update(copied_s=rec.copied_s, write_start_s=rec.write_start_s,
                                      durable_s=rec.durable_s)  # fmt: skip


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
    """DCP ``async_save`` on its thread executor. ``staged=False``: the default stager, which
    copies the state inside the call. ``staged=True``: DCP's own non-blocking staging
    (``DefaultStager(StagingOptions(use_async_staging=True))``, no pinned or shared memory: a
    CPU-only build cannot pin), the copy in a background thread; as DCP asks, the next
    ``optimizer.step`` waits for ``staging_completion`` (a step pre-hook: the analogue of
    memopt's fence), and that wait counts as blocking."""

    def __init__(
        self, d: Path, model: nn.Module, opt: torch.optim.Optimizer, staged: bool = False
    ) -> None:
        super().__init__()
        self.d, self.model, self.opt, self.staged = d, model, opt, staged
        self.name = "DCP async_save, async staging" if staged else "DCP async_save"
        self.done: list[float] = []
        self.stager = None
        self.staging = None  # the staging future the next optimizer.step waits for
        if staged:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self.stager = DefaultStager(StagingOptions(False, False, True, False))
            opt.register_step_pre_hook(self._fence)

    def _fence(self, *_: object) -> None:
        if self.staging is not None:
            t0 = time.perf_counter()
            self.staging.result()
            self.staging = None
            self.blocking[-1] += time.perf_counter() - t0

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.path = self.d / f"dcp_{step}{'_staged' if self.staged else ''}"
        t0 = time.perf_counter()
        msd, osd = get_state_dict(self.model, self.opt)
        kw = {"async_stager": self.stager} if self.staged else {}
        fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(self.path), **kw)
        if self.staged:  # an AsyncSaveResponse: staging, then upload
            self.staging, fut = fut.staging_completion, fut.upload_completion
        self.fut = fut
        self.fut.add_done_callback(lambda _: self.done.append(time.perf_counter() - t0))
        self.blocking.append(time.perf_counter() - t0)

    def drain(self) -> None:
        self._fence()  # an idle save: nothing stepped since
        self.fut.result()
        while len(self.done) < len(self.blocking):  # the callback may run just after result()
            time.sleep(0.001)
        self.durable.append(self.done[-1])
        self.nbytes.append(dir_bytes(self.path))
        shutil.rmtree(self.path)

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


def run_rounds(
    methods: list[Method], model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
    rounds: int, every: int,
) -> None:  # fmt: skip
    """Interleave the methods: each round, K steps of each, rotated so none is always first."""
    step = 0
    for r in range(rounds):
        for meth in methods[r % len(methods) :] + methods[: r % len(methods)]:
            times = []
            meth.begin()
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


def idle_durable(methods: list[Method], step: int, repeats: int) -> dict[str, tuple[float, int]]:
    """Saves with the training loop idle: (median seconds to durable, bytes) per method.

    memopt's methods save ``repeats`` times (interleaved, fio adjacent to each), the peers once.
    """
    seen: dict[str, list[tuple[float, int]]] = {}
    for meth in methods:
        if isinstance(meth, Memopt):
            meth.adj = meth.idle_adj
    for r in range(repeats):
        for meth in methods:
            if r and not isinstance(meth, Memopt):
                continue
            meth.begin()
            meth.save(step)
            meth.drain()
            seen.setdefault(meth.name, []).append((meth.durable.pop(), meth.nbytes.pop()))
            meth.blocking.pop()
            if isinstance(meth, Memopt):  # keep the training saves' phases apart
                meth.phases.pop()
                meth.idle_cpu.append(meth.cpu.pop())
            step += 1
    return {name: (statistics.median(d for d, _ in v), v[-1][1]) for name, v in seen.items()}


def checkpoint_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of model and optimizer tensors: the size of one checkpoint, give or take padding."""
    tensors = list(model.state_dict().values())
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


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
    ap.add_argument("--idle-saves", type=int, default=3, help="memopt saves with the loop idle")
    ap.add_argument("--ab-follow", action="store_true",
                    help="also run memopt with the writer following the copy (A/B)")  # fmt: skip
    ap.add_argument("--ab-nice", type=int, default=0, metavar="N",
                    help="also run memopt with CheckpointConfig(background_nice=N), interleaved")
    ap.add_argument("--ab-team", action="store_true",
                    help="add a memopt method that stages as before 2026-11-23: torch's copy_ "
                         "(an OpenMP team of every core) instead of one copier thread")
    ap.add_argument("--ab-two-pass", action="store_true",
                    help="add a memopt method with CheckpointConfig(checksum_in_copy=False): "
                         "copy, then the writer's crc32c pass (the default before 2026-11-23)")
    ap.add_argument("--no-fio", action="store_true",
                    help="run without fio (the write-throughput target is then not judged)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in /tmp)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    if args.every < 2 or args.rounds < 2 or args.idle_saves < 1:
        raise SystemExit("--every >= 2 (stall spans 2 steps), --rounds >= 2 (1 is warm-up), "
                         "--idle-saves >= 1")  # fmt: skip
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
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()}")  # fmt: skip
    print(f"# model: {args.layers} x Linear({width}, {width}) = {n_params / 1e6:.1f}M params, "
          f"AdamW (fp32 state), batch {args.batch}; {args.rounds} rounds (first = warm-up) of "
          f"{args.every} steps per method; dir {root}", flush=True)  # fmt: skip
    if shutil.which("fio") is None:
        if not args.no_fio:
            raise SystemExit(
                "ckpt_stall_bench: fio is not installed, and the write-throughput target is "
                "judged against it (apt-get install fio, or scripts/setup.sh with the bench "
                "extra as root); --no-fio runs the stall part alone"
            )
        print("# fio not installed (--no-fio): write throughput is not compared with the disk")
    train_step(model, opt, x)  # the optimizer state exists from here on
    fio = {"directory": root, "size": checkpoint_bytes(model, opt),
           "queue_depth": bytes_in_flight() // MIB}  # fmt: skip
    print(
        f"# fio: {fio['size'] / 1e9:.2f} GB, 1 MiB blocks, queue depth {fio['queue_depth']} "
        "(memopt's writer: the same bytes in flight), before and after every memopt save"
    )
    mems = [Memopt(root / "memopt", model, opt, fio, False)]
    if args.ab_follow:
        mems.append(Memopt(root / "memopt_follow", model, opt, fio, True))
    if args.ab_nice:
        mems.append(Memopt(root / "memopt_nice", model, opt, fio, False, nice=args.ab_nice))
    if args.ab_team:
        mems.append(Memopt(root / "memopt_team", model, opt, fio, False, team=True))
    if args.ab_two_pass:
        mems.append(Memopt(root / "memopt_two_pass", model, opt, fio, False, two_pass=True))
    dcps = [DCPAsync(root, model, opt), DCPAsync(root, model, opt, staged=True)]
    methods = [Method(), *mems, TorchSave(root, model, opt), *dcps]
    run_rounds(methods, model, opt, x, args.rounds, args.every)
    idle = idle_durable(methods[1:], 10**6, args.idle_saves)
    print(f"# load average after the run: {os.getloadavg()}")
    for m in mems:
        m.ckpt.close()
    for dm in dcps:
        dm.close()
    base_steps = [t for iv in methods[0].intervals[1:] for t in iv]
    base = statistics.median(base_steps)
    q = statistics.quantiles(base_steps, n=4)
    print(f"# baseline step: median {base:.3f} s (IQR {q[0]:.3f}-{q[2]:.3f}, "
          f"{len(base_steps)} steps)")  # fmt: skip
    print("| method | stall s (2 steps) | blocking s | overhead s (K steps) | durable s | GB "
          "| GB/s |\n|---|---|---|---|---|---|---|")  # fmt: skip
    results = {m.name: summarize(m, base, 1) for m in methods[1:]}
    for name, (sec, nbytes) in idle.items():
        results[name]["idle_durable_s"] = sec
        results[name]["idle_throughput_Bps"] = nbytes / sec
    for m in mems:
        copy_s, write_s = (statistics.median(p[i] for p in m.phases[1:]) for i in (0, 1))
        cpu_s = statistics.median(m.cpu[1:])
        print(f"# {m.name} while training: copy to host done at {copy_s:.2f} s, then write + "
              f"fsync + publish {write_s:.2f} s more; copier + writer threads used {cpu_s:.3f} "
              f"CPU s per save ({statistics.median(m.idle_cpu):.3f} with the loop idle; "
              "medians)")  # fmt: skip
        results[m.name]["background_cpu_s"] = cpu_s
        results[m.name].update(throughput_report(m))
    print("# saved with the training loop idle: seconds to durable (median), GB/s")
    for name, (sec, nbytes) in idle.items():
        print(f"#   {name}: {sec:.2f} s, {nbytes / sec / 1e9:.2f} GB/s")
    report(results, mems[0].name, base, args)
    from memopt.sharding import shutdown_distributed
    shutdown_distributed()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


def throughput_report(m: Memopt) -> dict[str, float]:
    """Per-save throughput against the adjacent fio runs; returns the medians."""
    out: dict[str, float] = {}
    for what, adj, skip in (("training", m.train_adj, 1), ("idle", m.idle_adj, 0)):
        print(
            f"# {m.name}, {what}, per save: copy done / write start / durable s | GB/s "
            "writer (a) / save (b) | fio before / after GB/s | (a) / max adjacent fio"
        )
        for i, row in enumerate(adj.saves):
            tag = " (warm-up, left out)" if i < skip else ""
            print(f"#   {row['copied_s']:.2f} / {row['write_start_s']:.2f} / "
                  f"{row['durable_s']:.2f} | {row['writer'] / 1e9:.2f} / {row['save'] / 1e9:.2f}"
                  f" | {row['fio_before'] / 1e9:.2f} / {row['fio_after'] / 1e9:.2f} | "
                  f"{row['writer/fio_max']:.3f}{tag}")  # fmt: skip
        for key in ("writer", "save"):
            for ref in ("fio_max", "fio_mean"):
                out[f"{what}_{key}/{ref}"] = adj.median(f"{key}/{ref}", skip)
            out[f"{what}_{key}_Bps"] = adj.median(key, skip)
    return out


def report(results: dict[str, dict], mem: str, base: float, args: argparse.Namespace) -> None:
    t = results["torch.save (sync)"]
    dcps = [(n, r) for n, r in results.items() if n.startswith("DCP")]

    def ratio(row: dict, key: str, peer: dict, target: str) -> str:
        if peer[key] <= 0:
            return f"n/a (peer {key} <= 0: within noise)"
        if row[key] <= 0:  # a stall below the baseline's median: noise, not a ratio
            return f"n/a (memopt {key} {row[key]:.3f} <= 0: within noise; {target})"
        return f"{row[key] / peer[key]:.3f} ({target})"

    for key in ("stall_s", "blocking_s"):
        for name, d in dcps:
            print(f"memopt {key} / {name}:  {ratio(results[mem], key, d, 'target <= 0.1')}")
        print(f"memopt {key} / torch.save:  {ratio(results[mem], key, t, 'target <= 0.02')}")
    for name, row in results.items():  # the A/B variants against the same peers
        if name != mem and name.startswith("memopt,"):
            peers = ", ".join(
                f"/ {pn} {ratio(row, 'stall_s', pr, 'stall')}"
                for pn, pr in [*dcps, ("torch.save", t)]
            )
            print(f"{name}: stall_s {peers}")
    for name, row in results.items():
        if "training_writer/fio_max" not in row:
            continue
        for what in ("training", "idle"):
            print(f"{name} ({what}): writer (a) {row[f'{what}_writer_Bps'] / 1e9:.2f} GB/s = "
                  f"{row[f'{what}_writer/fio_max']:.3f} x adjacent fio (max; "
                  f"{row[f'{what}_writer/fio_mean']:.3f} x mean) (target >= 0.8); "
                  f"save (b) {row[f'{what}_save_Bps'] / 1e9:.2f} GB/s = "
                  f"{row[f'{what}_save/fio_max']:.3f} x (max; "
                  f"{row[f'{what}_save/fio_mean']:.3f} x mean)")  # fmt: skip
    if args.json:
        payload = {"args": vars(args), "base_step_s": base, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
