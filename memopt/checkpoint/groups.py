"""The checkpointer's own gloo groups: checked, made by the ranks that use them, released.

The checkpointer (and its redundancy tier) runs its collectives from background threads, so
each gets a gloo group of its own, over the ranks of the ``process_group`` it was given.

**Why not ``dist.new_group`` alone.** ``new_group`` must be entered by every rank of the job,
in the same order, even by ranks outside the new group: it names the group after a counter
of groups made so far in the process (``_world.group_count``) and rendezvouses under that
name in the job's store. A checkpointer over a subgroup is constructed on that subgroup's
ranks only; their counters move and the others' do not. Two subgroups ({0, 1} and {2, 3} of
4) making checkpointers at once then give both groups the same name (their ranks connect
across the subgroups: crashes, or files published into the other subgroup's snapshot), and
one subgroup alone leaves the job's next ``new_group`` under two names, which never meet (a
hang). ``new_group(..., use_local_synchronization=True)`` does not fix it: its name is a hash
of the ranks and of the number of groups the process holds *now*
(``_hash_ranks_to_str``, torch 2.13). The members must then hold equally many groups, which
nothing guarantees; a group destroyed and made again over the same ranks gets the same name
and its rendezvous reads the old group's addresses, left in the store; and a second group
over the same ranks while the first is alive (the tier's, next to the checkpointer's) may
clash with the name of a live group. Pooling one such group per rank set and never
destroying it (an earlier attempt) still needs equal counts and makes concurrent users share
one group, whose collectives from different threads then pair up in different orders on
different ranks.

**What is done instead.** A group over every rank of the job is made by ``new_group``
(every rank constructs the checkpointer, so every rank enters it). A group over a strict
subset is made by its members alone under a name of its own: group rank 0 of the parent
group draws a random name (uuid4) and broadcasts it over the parent (a collective over the
members, who are in the constructor together anyway); each member then builds the gloo group
under ``memopt-ckpt-<uuid>`` with torch's helper behind ``new_group``
(``_new_process_group_helper``) and registers its rank mapping as ``new_group`` does. The
name is never reused, so such a group is destroyed at ``close()`` like any other, the store
never serves it an older group's keys, and no counter of any other rank moves. The group
keeps the parent's rank order: group rank r of both is the same process.

``release(group)`` destroys a group unless it is gone already (``destroy_process_group()``
of the default group destroys every group; ``close()`` after it then has nothing to do).
"""

from __future__ import annotations

import uuid
from typing import Any

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from memopt._utils.process_group import as_process_group

__all__ = ["check_group", "make_group", "own_group", "release"]


def check_group(group: Any, what: str) -> Any:
    """``group`` (None: the default group) if this rank can use it as ``what``, else a
    ``TypeError`` (not a ProcessGroup: a DeviceMesh, say) or ``ValueError`` (this rank is not
    a member, or the group was destroyed)."""
    group = as_process_group(group, "AsyncCheckpointer", what)
    if group is None:
        return None
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group() gives a non-member
        raise ValueError(_not_member(what, None))
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"AsyncCheckpointer: {what} was given but torch.distributed is not initialized "
            "(or its process group was destroyed); call init_process_group first, then make "
            "the group"
        )
    if group not in c10d._world.pg_group_ranks:
        raise ValueError(
            f"AsyncCheckpointer: {what} is not a live process group (destroyed, or made before "
            "the process group was re-initialized); pass a group made since"
        )
    if dist.get_rank(group) < 0:
        raise ValueError(_not_member(what, dist.get_process_group_ranks(group)))
    return group


def _not_member(what: str, ranks: list[int] | None) -> str:
    members = "" if ranks is None else f" (global ranks {ranks})"
    return (
        f"AsyncCheckpointer: this process (global rank {dist.get_rank()}) is not a member of "
        f"{what}{members}; construct the checkpointer only on the group's ranks, each with "
        "its own group"
    )


def own_group(process_group: Any) -> tuple[int, int, Any]:
    """(rank, world size, the checkpointer's own gloo group or None) over ``process_group``
    (None: the default group; checked first: ``check_group``)."""
    group = check_group(process_group, "process_group")
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world == 1:
        return rank, world, None
    ranks = dist.get_process_group_ranks(dist.group.WORLD if group is None else group)
    return rank, world, make_group(ranks, group)


def make_group(ranks: list[int], parent: Any) -> Any:
    """A new gloo group over the global ``ranks`` (in that order), made by its members alone;
    a collective over ``parent``, a group over the same ranks (None: the default group)."""
    if len(ranks) == dist.get_world_size():  # every rank of the job is here: new_group's way
        return dist.new_group(ranks=ranks, backend="gloo", sort_ranks=False)
    box: list[Any] = [f"memopt-ckpt-{uuid.uuid4().hex}"]
    dist.broadcast_object_list(box, group=parent, group_src=0)
    default = c10d._get_default_group()
    _, store = c10d._world.pg_map[default]
    backend = dist.Backend("gloo")
    me = dist.get_rank()
    group, _ = c10d._new_process_group_helper(
        len(ranks), ranks.index(me), ranks, backend, store, c10d.GroupName(box[0]),
        timeout=c10d._get_default_timeout(backend), group_desc="memopt checkpoint",
    )  # fmt: skip
    c10d._world.pg_group_ranks[group] = {g: r for r, g in enumerate(ranks)}
    return group


def release(group: Any) -> None:
    """Destroy ``group`` unless it is gone already (with the default group, say)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return
    if c10d._world.pg_map.get(group) is None:
        return
    dist.destroy_process_group(group)
