"""``memopt run RECIPE.yaml [key=value ...]``: launch a recipe under torchrun.

The launcher first loads the recipe with the overrides (a typo fails here, before any process
starts), then runs ``python -m torch.distributed.run`` with ``--nproc-per-node`` and either
``--standalone`` (one node: torchrun picks a free port) or the rendezvous arguments given
(``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``, passed through as they
are; a port or address on one node is kept too), and
``-m memopt.cli.train RECIPE.yaml key=value ...`` as the program of every rank.
Before that it runs the checks that need only the world size and the filesystem
(``memopt.config.preflight``, which the ranks run too): redundancy or optimizer-in-backward on
the wrong number of ranks, a checkpoint or NVMe directory it cannot create, each a one-line
error instead of a traceback per rank. A DeepSpeed JSON given as the recipe gets a hint to
convert it (``Config.from_deepspeed(...).to_yaml(...)``).
A recipe named without a path (``galore``) is looked up as ``recipes/galore.yaml`` under the
current directory. ``--dry-run`` prints the command instead.

On POSIX the launcher then *becomes* torchrun (``os.execve``: same pid, same exit status),
so a signal to ``memopt run`` (SIGTERM from ``kill`` or a job scheduler, SIGHUP, SIGINT) is
torchrun's, which stops the ranks before it exits; before, the launcher waited in
``subprocess.call`` and died alone, leaving torchrun and the ranks training. The ranks also
die with torchrun (``_runguard.die_with_parent``), and a checkpoint directory held by a live
run is refused here, before anything starts (``_runguard.probe``; rank 0 holds the lock for
the whole run).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

import yaml

from memopt.cli._runguard import PARENT_ENV, DirectoryInUseError, probe
from memopt.config import Config
from memopt.config.preflight import check_paths, check_world
from memopt.config.workload import llama_config

#: Top-level keys of a DeepSpeed config that are no memopt section (a hint, not a parser).
_DEEPSPEED_KEYS = {"zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size",
                   "gradient_accumulation_steps", "gradient_clipping", "bf16", "fp16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (or a name under ./recipes/)")
    # default=[]: without a default, argparse (before 3.13) marks a "*" positional required and
    # "memopt run" with no arguments said "recipe, overrides" were required
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides")
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc", type=int, default=1,
                   help="processes (ranks) on this node")
    p.add_argument("--nnodes", default="1", help="nodes (torchrun syntax, e.g. 2 or 1:4)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None)
    p.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None)
    p.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command only")


def resolve_recipe(name: str) -> str:
    if os.path.isfile(name):
        return name
    candidate = os.path.join("recipes", name if name.endswith(".yaml") else f"{name}.yaml")
    if os.path.isfile(candidate):
        return candidate
    raise SystemExit(f"memopt run: no recipe {name!r} (nor {candidate}); pass a YAML path")


def torchrun_command(args: argparse.Namespace, recipe: str) -> list[str]:
    """The full torchrun command line for ``args``.

    One node with no rendezvous argument runs ``--standalone``; a ``--master-port`` (or
    ``--master-addr``) on one node is kept (a fixed port, e.g. two jobs side by side), with
    ``--node-rank 0``.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    multi = args.nnodes != "1"
    if not multi and args.node_rank not in (None, 0):
        raise SystemExit(f"memopt run: --node-rank {args.node_rank} needs --nnodes > 1")
    if multi or args.master_addr is not None or args.master_port is not None:
        cmd += ["--nnodes", args.nnodes]
        node_rank = args.node_rank if multi else 0
        if node_rank is not None:
            cmd += ["--node-rank", str(node_rank)]
        if args.master_addr is not None:
            cmd += ["--master-addr", args.master_addr]
        if args.master_port is not None:
            cmd += ["--master-port", str(args.master_port)]
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", "memopt.cli.train", recipe, *args.overrides]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memopt run", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def world_size(args: argparse.Namespace) -> int | None:
    """Ranks of the launch: ``--nproc-per-node`` times ``--nnodes`` (None for an elastic
    range such as ``1:4``, whose size only the rendezvous settles)."""
    nnodes = args.nnodes.strip()
    return args.nproc * int(nnodes) if nnodes.isdigit() else None


def _deepspeed_hint(recipe: str) -> str:
    """A hint when ``recipe`` looks like a DeepSpeed JSON config rather than a memopt one."""
    try:
        with open(recipe) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        data = None
    keys = set(data) if isinstance(data, dict) else set()
    if not (recipe.endswith(".json") or keys & _DEEPSPEED_KEYS):
        return ""
    return ("; this looks like a DeepSpeed config: convert it to a memopt recipe first, e.g. "
            "python -c \"from memopt import Config; "
            f"Config.from_deepspeed({recipe!r}).to_yaml('recipe.yaml')\" "
            "and review its model, data and train sections (DeepSpeed has none)")


def load_checked(args: argparse.Namespace, recipe: str) -> Config:
    """The recipe with its overrides, checked as far as the launcher can before any rank
    starts: the values, the model overrides, the world size (``memopt.config.preflight``) and,
    unless ``--dry-run``, the directories the run writes. ``SystemExit`` with one line else."""
    try:
        config = Config.from_yaml(recipe, overrides=args.overrides)
    except (ValueError, OSError) as e:  # (from_yaml names the file in its YAML errors)
        where = "" if str(e).startswith(f"{recipe}:") else f"{recipe}: "
        raise SystemExit(f"memopt run: {where}{e}{_deepspeed_hint(recipe)}") from None
    try:
        llama_config(config)  # the model overrides too (a typo one level down)
        world = world_size(args)
        if world is not None:
            check_world(config, world)
        if not args.dry_run:  # (it creates them: the ranks would, a moment later)
            check_paths(config)
            if args.nnodes.strip() == "1":  # (other nodes' launchers see node 0's lock)
                probe(config.checkpoint.directory)
    except (ValueError, DirectoryInUseError) as e:
        raise SystemExit(f"memopt run: {recipe}: {e}") from None
    return config


def main(argv: Sequence[str]) -> int:
    args = parser().parse_intermixed_args(list(argv))
    if args.nproc < 1:
        raise SystemExit("memopt run: --nproc-per-node must be >= 1")
    recipe = resolve_recipe(args.recipe)
    load_checked(args, recipe)
    cmd = torchrun_command(args, recipe)
    print("memopt run: " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return _exec(cmd)


def _exec(cmd: list[str]) -> int:
    """Replace this process with ``cmd`` (POSIX; returns only elsewhere, with its status)."""
    if os.name != "posix":
        return subprocess.call(cmd)
    env = {**os.environ, PARENT_ENV: str(os.getpid())}  # (torchrun's pid, after the exec)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
    raise AssertionError("unreachable: execve returned")  # pragma: no cover
