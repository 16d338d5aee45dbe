"""The recipe training loop: ``python -m memopt.cli.train RECIPE.yaml [key=value ...]``.

``memopt run`` starts this module under torchrun on every rank. Per rank:

1. join the process group torchrun describes (gloo on CPU, NCCL on CUDA), a one-rank group
   too (ZeRO-3 parameter offload is FSDP2's and needs one);
2. load the recipe (``Config.from_yaml`` with the overrides), build the random-init model and
   this rank's batch stream (``memopt.config.workload``);
3. ``memopt.setup`` (activations, optimizer, sharding/offload, scheduler, checkpointer,
   resume); a resumed run says so, naming the snapshot step, before the first step;
4. per step: ``grad_accum`` micro-batches of forward/backward (all but the last inside
   ``accumulation_context``: the sharded optimizer's or DDP's ``no_sync``), clip,
   ``optimizer.step()``, ``scheduler.step()``; every ``train.log_every`` steps rank 0 prints
   one log line: loss (this step's, mean over ranks), tokens/s (all ranks, over the steps
   since the last line), the LR this step ran at, and memory per tier
   (``memopt.cli._meter``); a tqdm progress bar runs on stderr; every
   ``checkpoint.every_n_steps`` a snapshot is taken (asynchronous: the copy overlaps the next
   step) and the end of the run takes a last one.

Under torchrun each rank asks to die with it (``_runguard.die_with_parent``: torchrun puts the
ranks in sessions of their own, so nothing else stops them when it is killed), and rank 0
holds ``checkpoint.directory``'s run lock from before the resume to the end
(``_runguard.hold``): a second run into a directory in use stops at once, on every rank,
naming the holder. Run as a program (``python -m memopt.cli.train``, what torchrun starts),
the lock is kept until the process ends: on one process a run that raises leaves its last
asynchronous save to the checkpoint exit hook at interpreter exit (below), and the directory
must stay held until that save is published (or has failed). ``train()``/``main()`` called
in a process that goes on release it when they return or raise.

On 2+ ranks, training that raises (or is interrupted) with an asynchronous save in flight
finishes that save before the exception leaves ``train()`` (``exit_hook.finish``: published
when every rank wrote it, else not; at most ``exit_hook.EXIT_WAIT_S``, since publication is
collective), under the lock and while the process group is still up; then ``main()`` ends
the group (``shutdown_distributed``): the exit hook runs after ``destroy_process_group()``,
when what needs the default group (the in-memory redundancy tier) fails. One process
publishes without a group: its save is still finished by the exit hook.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from memopt._utils.dist_teardown import shutdown_distributed
from memopt.api import Setup, setup
from memopt.checkpoint.errors import CorruptSnapshotError, SnapshotMismatchError
from memopt.checkpoint.exit_hook import EXIT_WAIT_S, finish, untrack
from memopt.cli._meter import Meter
from memopt.cli._runguard import DirectoryInUseError, die_with_parent, hold
from memopt.config import Config
from memopt.config.preflight import check_paths, check_world
from memopt.config.workload import batches, build_model

#: What torchrun sets for ``init_process_group``'s ``env://`` rendezvous.
_TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")


def _init_distributed() -> None:
    """Join the process group torchrun describes: also a one-rank group (``memopt run``'s
    default), since ZeRO-3 parameter offload runs FSDP2, which needs one even on one device.
    On one rank nothing else changes: no DDP wrapper, the plain (collective-free) sharding path,
    checkpoints without a gloo group. ``WORLD_SIZE > 1`` without the rest still tries (and
    torch names what is missing)."""
    launched = all(os.environ.get(k) for k in _TORCHRUN_ENV)
    if (launched or int(os.environ.get("WORLD_SIZE", "1")) > 1) and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def accumulation_context(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                         sync: bool) -> AbstractContextManager[Any]:
    """The context for one micro-batch's forward and backward under gradient accumulation.

    ``sync=True`` (the last micro-batch of a step) gives a null context: that backward
    synchronizes the accumulated gradients. ``sync=False`` gives ``optimizer.no_sync()`` for
    memopt's sharded optimizers (stage 1: a no-op, since it reduces at ``step()``; stage 2:
    gradients stay in ``param.grad`` instead of being reduced and freed; stage 3: FSDP2's
    ``set_requires_gradient_sync(False)``), ``model.no_sync()`` for a
    ``DistributedDataParallel`` model (stage 0 on 2+ ranks), and a null context otherwise
    (one process without sharding). ``model``/``optimizer``: ``Setup.model`` and
    ``Setup.optimizer``.
    """
    if sync:
        return nullcontext()
    no_sync = getattr(optimizer, "no_sync", None)
    if callable(no_sync):
        return no_sync()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def _train_step(s: Setup, data: Any) -> float:
    """One optimizer step; returns the mean micro-batch loss of this rank."""
    cfg = s.config
    n, total = cfg.train.grad_accum, 0.0
    for micro in range(n):
        x = next(data).to(s.device)
        with accumulation_context(s.model, s.optimizer, sync=micro == n - 1):
            loss = s.model(input_ids=x, labels=x).loss
            (loss / n).backward()
        total += float(loss.detach())
    s.clip_grad_norm_()  # optimizer.max_grad_norm, at any stage (null / in_backward: no-op)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return total / n


def _mean_over_ranks(value: float, s: Setup) -> float:
    if s.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=s.device if s.device.type == "cuda"
                     else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / s.world_size


def _say(s: Setup, text: str) -> None:
    if s.rank == 0:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


@contextmanager
def _run_lock(config: Config, rank: int, until_exit: bool = False) -> Iterator[None]:
    """Rank 0 holds ``checkpoint.directory``'s lock for the block (``until_exit``: until the
    process ends); every rank raises ``DirectoryInUseError`` when it is taken (rank 0 tells
    the others: a collective)."""
    with ExitStack() as held:
        error = ""
        if rank == 0:
            try:
                held.enter_context(hold(config.checkpoint.directory, until_exit=until_exit))
            except DirectoryInUseError as e:
                error = str(e)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise DirectoryInUseError(error)
        yield


def train(config: Config, *, lock_until_exit: bool = False) -> dict[str, Any]:
    """Run the recipe ``config`` on this rank; returns a summary (rank 0's view).
    ``lock_until_exit``: rank 0 keeps the directory's run lock until the process ends (see the
    module docstring), for a process that exits after this call."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    check_world(config, dist.get_world_size() if dist.is_initialized() else 1)
    check_paths(config)  # (the launcher ran both already: here for a rank started by hand)
    with _run_lock(config, rank, lock_until_exit):
        return _train(config, rank)


@contextmanager
def _saves_finished_on_error(s: Setup) -> Iterator[None]:
    """On 2+ ranks, when the block raises, finish the checkpointer's saves still in flight
    (at most ``exit_hook.EXIT_WAIT_S``, as the exit hook) before the exception leaves: while
    the process group and the run lock are still there (see the module docstring). One
    process publishes without a group: its save stays the exit hook's, as before."""
    try:
        yield
    except BaseException as e:
        ck = s.checkpointer
        if ck is not None and ck.world > 1:
            why = f"training stopped ({type(e).__name__}) with a save in flight"
            try:
                if not finish(ck, EXIT_WAIT_S, why):
                    untrack(ck)  # (given up: the exit hook would only wait as long again)
            except Exception as err:  # noqa: BLE001 - the training error is the one to raise
                print(f"memopt run: finishing the checkpoint saves after the error failed: "
                      f"{err!r}", file=sys.stderr)
        raise


def _train(config: Config, rank: int) -> dict[str, Any]:
    model = build_model(config)
    sample = next(batches(config, rank))
    s = setup(model, config, sample_batch={"input_ids": sample, "labels": sample})
    with _saves_finished_on_error(s):
        return _run(s, config, rank)


def _run(s: Setup, config: Config, rank: int) -> dict[str, Any]:
    t, ck = config.train, config.checkpoint
    _say(s, f"memopt run: {s.world_size} rank(s)\n{s.describe()}")
    if s.resumed_from is not None:
        _say(s, f"RESUMED: {s.resume_message}")
        if s.start_step >= t.steps:
            _say(s, f"nothing to do: the snapshot is at step {s.start_step} and train.steps is "
                    f"{t.steps}; raise train.steps (e.g. train.steps={t.steps + 10}) to go on")
    meter = Meter(config)
    data = batches(config, rank, s.start_step)
    tokens = t.batch_size * t.seq_len * t.grad_accum * s.world_size
    loss, wall0, last_saved = float("nan"), time.perf_counter(), s.start_step
    shown = [s.checkpointer.latest() if s.checkpointer is not None else None]
    window_t, window_steps = 0.0, 0  # step time since the last log line (snapshots excluded)
    bar = tqdm(range(s.start_step, t.steps), initial=s.start_step, total=t.steps,
               disable=s.rank != 0, file=sys.stderr, desc="train", dynamic_ncols=True)
    for i in bar:
        lr = s.optimizer.param_groups[0]["lr"]  # the step's own (scheduler.step() moves it on)
        t0 = time.perf_counter()
        loss = _mean_over_ranks(_train_step(s, data), s)
        window_t += time.perf_counter() - t0
        window_steps += 1
        step = i + 1
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % t.log_every == 0 or step == t.steps:
            _say(s, f"step {step}/{t.steps} loss {loss:.4f} lr {lr:.2e} "
                    f"tok/s {tokens * window_steps / window_t:,.0f} | {meter.line(s)}")
            window_t, window_steps = 0.0, 0
            _say_published(s, shown)
        if ck.directory and ck.every_n_steps and step % ck.every_n_steps == 0:
            s.save(step)
            last_saved = step
            _say(s, f"snapshot: step {step} started (async) -> {ck.directory}")
    if ck.directory and last_saved != t.steps and s.start_step < t.steps:
        s.save(t.steps)
        _say(s, f"snapshot: step {t.steps} started (async) -> {ck.directory}")
    wall = time.perf_counter() - wall0
    s.close()
    _say_published(s, shown)
    summary = {"steps": t.steps, "start_step": s.start_step, "final_loss": loss, "wall_s": wall,
               "resumed_from": s.resumed_from}
    if s.start_step >= t.steps:  # (a finished run started again: no step, no loss)
        _say(s, f"done: nothing to train, the run is already at step {s.start_step} of "
                f"train.steps={t.steps}; raise train.steps to go on")
    else:
        _say(s, f"done: steps {s.start_step}->{t.steps}, final loss {loss:.4f}, "
                f"wall {wall:.1f} s")
    return summary


def _say_published(s: Setup, shown: list[int | None]) -> None:
    """Name the snapshots published (durable, loadable) since the last call: a save's own line
    says only that it started, and a crash before its publication resumes from an older one."""
    ck = s.checkpointer
    if ck is None or s.rank != 0:
        return
    new = [x for x in ck.steps() if shown[-1] is None or x > shown[-1]]
    if new:
        shown.append(new[-1])
        _say(s, f"snapshot: step(s) {new} published in {ck.directory}")


def main(argv: Sequence[str] | None = None, *, lock_until_exit: bool = False) -> int:
    """The program; ``lock_until_exit`` as for ``train`` (True when run as ``__main__``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m memopt.cli.train RECIPE.yaml [section.key=value ...]",
              file=sys.stderr)
        return 2
    die_with_parent()
    config = Config.from_yaml(args[0], overrides=args[1:])
    _init_distributed()
    ok = False
    try:
        train(config, lock_until_exit=lock_until_exit)
        ok = True
    except DirectoryInUseError as e:  # (one line, not a traceback per rank)
        first = not dist.is_initialized() or dist.get_rank() == 0
        raise SystemExit(f"memopt run: {e}" if first else 1) from None
    except (CorruptSnapshotError, SnapshotMismatchError) as e:
        # a resume the snapshot cannot serve: one line per rank (it may differ by rank), not
        # a traceback; the message names the file or the parameter and what to do
        where = f" [rank {dist.get_rank()}]" if dist.is_initialized() else ""
        raise SystemExit(f"memopt run{where}: {type(e).__name__}: {e}") from None
    finally:
        shutdown_distributed(ok=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main(lock_until_exit=True))  # (the process ends next: it drops the lock then)
