"""Which modules of a model are linear layers, norms or the output head.

One policy shared by the optimizers' group builder (``memopt.optim.param_groups``) and the
estimator (``memopt.memory.model``), which may not import each other.
"""

from __future__ import annotations

from torch import nn

HEAD_NAMES = ("lm_head", "output", "classifier", "score", "head")


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's projections: a Linear whose weight
    is stored (in, out)); matched by class name so transformers stays optional."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and hasattr(module, "nf")
    )


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    return isinstance(module, norms) or "norm" in name


def head_modules(model: nn.Module) -> set[str]:
    """Names of the linear modules that act as the output head: named like one
    (``HEAD_NAMES``), or with a weight tied to an embedding."""
    embed_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = set()
    for name, mod in model.named_modules():
        if not is_linear(mod):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in HEAD_NAMES or id(getattr(mod, "weight", None)) in embed_weights:
            heads.add(name)
    return heads
