"""``memopt run RECIPE.yaml [key=value ...]``: launch a recipe under torchrun.

The launcher first loads the recipe with the overrides (a typo fails here, before any process
starts), then runs ``python -m torch.distributed.run`` with ``--nproc-per-node`` and either
``--standalone`` (one node: torchrun picks a free port) or the rendezvous arguments given
(``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``, passed through as they
are; a port or address on one node is kept too), and
``-m memopt.cli.train RECIPE.yaml key=value ...`` as the program of every rank.
A recipe named without a path (``galore``) is looked up as ``recipes/galore.yaml`` under the
current directory. ``--dry-run`` prints the command instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

from memopt.config import Config
from memopt.config.workload import llama_config


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


def main(argv: Sequence[str]) -> int:
    args = parser().parse_intermixed_args(list(argv))
    if args.nproc < 1:
        raise SystemExit("memopt run: --nproc-per-node must be >= 1")
    recipe = resolve_recipe(args.recipe)
    try:
        config = Config.from_yaml(recipe, overrides=args.overrides)
        llama_config(config)  # the model overrides too (a typo one level down)
    except ValueError as e:
        raise SystemExit(f"memopt run: {recipe}: {e}") from None
    cmd = torchrun_command(args, recipe)
    print("memopt run: " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)
