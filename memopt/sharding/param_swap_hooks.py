"""Model ``state_dict`` / ``load_state_dict`` with stage-3 shards on NVMe (``ParamSwapper``).

A state dict holds the shards themselves (``DTensor`` row shards, views of FSDP2's sharded
storage), which the swapper frees between uses. Hooks on each unit's own module (the module
``fully_shard`` was applied to, whose ``state_dict`` recursion covers exactly that unit's
parameters) keep that correct one unit at a time:

- ``state_dict``: the pre-hook loads the unit; the post-hook replaces the unit's entries
  by clones (so they outlive the eviction) and evicts it again. Peak: the state dict itself
  plus one unit. Inside ``ParamSwapper.resident()`` (``FSDPOptimizer.resident_params()``)
  the entries are the live shards instead, as without offload: code that writes into a
  ``state_dict()``'s tensors (``memopt.checkpoint``'s restore) must run there, and the
  shards are written back on leaving it.
- ``load_state_dict``: the pre-hook loads the unit; FSDP2 copies the values into the shards
  in place; the post-hook writes them to the tier and evicts. ``assign=True`` (which replaces
  the parameter objects) is refused with a clear error.

Between uses an evicted shard's storage holds no bytes, and code that writes through
``DTensor.to_local()`` outside ``resident()`` (torch DCP's ``set_model_state_dict(...,
broadcast_from_rank0=True)`` does) wrote through a freed pointer: a segfault. ``set_guards``
puts an ``EvictedShard`` on each evicted sharded parameter as its ``to_local``,
``full_tensor`` and ``redistribute`` (instance attributes, removed when the unit is loaded),
which raise an error naming the parameter and ``resident_params()``; pickling such a
parameter raises it too. (Before, ``full_tensor()``, which reads the storage in its
all-gather, still segfaulted every rank.) Other tensor operations on an evicted parameter
(arithmetic, ``.data``) are not guarded: read parameters inside ``resident_params()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from memopt.sharding.param_swap import ParamSwapper

__all__ = ["EvictedShard", "install_state_dict_hooks", "set_guards"]


#: the ``DTensor`` methods that reach the local storage, guarded on an evicted shard
#: (``full_tensor`` and ``redistribute`` read it in a collective: a segfault on every rank)
GUARDED = ("to_local", "full_tensor", "redistribute")


class EvictedShard:
    """A ``GUARDED`` method of a sharded parameter whose bytes are on NVMe: raises (see
    above)."""

    def __init__(self, name: str, method: str = "to_local") -> None:
        self.name = name
        self.method = method

    def error(self) -> RuntimeError:
        return RuntimeError(
            f"memopt.shard(offload_params='nvme'): parameter {self.name!r} was accessed "
            f"({self.method}(), or pickled) while its shard is on NVMe: between uses its storage "
            "holds no bytes, so reading or writing it would touch freed memory. Do it inside "
            "`with opt.resident_params():` (every shard loaded, written back on leaving), e.g. "
            "around torch.distributed.checkpoint's set_model_state_dict(..., "
            "broadcast_from_rank0=True); model.state_dict() and load_state_dict() need no wrap"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error()

    def __reduce__(self) -> Any:
        raise self.error()


def set_guards(group: Any, names: dict[int, str], on: bool) -> None:
    """Put (``on``) or take away the ``EvictedShard`` of each sharded parameter of ``group``."""
    for fp in group.fsdp_params:
        d = fp.sharded_param.__dict__
        for method in GUARDED:
            if on:
                d[method] = EvictedShard(names.get(id(fp.sharded_param), "?"), method)
            else:
                d.pop(method, None)


def _unit_module(group: Any) -> nn.Module:
    modules = group.modules if hasattr(group, "modules") else (group.module,)
    return modules[0]


def install_state_dict_hooks(swapper: ParamSwapper, model: nn.Module) -> list[Any]:
    """Register the four hooks per unit; return their handles."""
    handles = []
    for u in swapper.units:
        module = _unit_module(u.group)
        index = u.index

        def pre_save(_m: nn.Module, _prefix: str, _keep: bool, index: int = index) -> None:
            swapper.load(index)
            swapper.units[index].pins += 1

        def post_save(_m: nn.Module, sd: dict[str, Any], _prefix: str, _meta: Any,
                      index: int = index) -> None:  # fmt: skip
            unit = swapper.units[index]
            unit.pins -= 1
            if unit.pins:  # inside ``resident()``: the entries alias the live shards
                return
            ptrs = {p.tensor.untyped_storage().data_ptr() for p in unit.pieces}
            for key, value in sd.items():
                local = getattr(value, "_local_tensor", value)
                if getattr(local, "untyped_storage", None) is None:
                    continue
                if local.untyped_storage().data_ptr() in ptrs:
                    sd[key] = value.detach().clone()
            swapper._evict(unit)

        def pre_load(_m: nn.Module, _sd: Any, _prefix: str, meta: Any, *_: Any,
                     index: int = index) -> None:  # fmt: skip
            if meta.get("assign_to_params_buffers"):
                raise NotImplementedError(
                    "memopt.shard(offload_params='nvme'): load_state_dict(assign=True) would "
                    "replace the parameter shards the NVMe swapper manages; load without "
                    "assign=True (values are copied into the shards)"
                )
            swapper.load(index)
            swapper.units[index].pins += 1

        def post_load(_m: nn.Module, _keys: Any, index: int = index) -> None:
            swapper.units[index].pins -= 1
            swapper.write_back(index, evict=False)
            swapper._evict(swapper.units[index])

        handles += [
            module.register_state_dict_pre_hook(pre_save),
            module.register_state_dict_post_hook(post_save),
            module.register_load_state_dict_pre_hook(pre_load),
            module.register_load_state_dict_post_hook(post_load),
        ]
    return handles
