"""What a ``process_group=`` argument may be, shared by ``memopt.shard`` and the checkpointer.

A ``ProcessGroup`` (what ``new_group()`` returns, including its non-member marker, which each
caller refuses in its own words), a 1-D ``DeviceMesh`` (taken as its one group), or None (the
default group). A mesh of more dimensions names no group by itself: the ``TypeError`` says
how to pick one; anything else is a ``TypeError`` too.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["as_process_group"]


def as_process_group(obj: Any, who: str, what: str = "process_group") -> Any:
    """``obj`` as a ProcessGroup (None stays None); ``who``/``what`` name the caller and its
    argument in the errors."""
    if obj is None:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(obj, DeviceMesh):
        if obj.ndim == 1:
            return obj.get_group()
        names = obj.mesh_dim_names
        if names:
            d = repr(names[0])
            pick = f"mesh[{d}].get_group() (the same as mesh.get_group({d}))"
        else:
            pick = "mesh.get_group(mesh_dim=0)"
        raise TypeError(
            f"{who}: {what} is a {obj.ndim}-D DeviceMesh (dims "
            f"{list(names) if names else 'unnamed'}, shape {tuple(obj.shape)}); pass the "
            f"process group of one of its dimensions, e.g. {pick}, or a 1-D mesh"
        )
    if isinstance(obj, dist.ProcessGroup) or obj == dist.GroupMember.NON_GROUP_MEMBER:
        return obj
    raise TypeError(
        f"{who}: {what} must be a torch.distributed ProcessGroup (dist.new_group(...), "
        f"mesh.get_group(...)), a 1-D DeviceMesh or None (the default group), got "
        f"{type(obj).__name__}"
    )
