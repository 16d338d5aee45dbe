"""A training script for ``accelerate launch`` (driven by test_accelerate.py).

``accelerate launch --cpu --num_processes 2 accelerate_train.py OUT`` or plain ``python
accelerate_train.py OUT`` (one process): the same global batch either way (per-process batch =
GLOBAL_BATCH / processes), APOLLO under memopt.shard (stage from argv), 2 micro-batches per
step via ``accelerator.accumulate`` and clipping via ``accelerator.clip_grad_norm_``. The main
process saves the final parameters and the clip norms to OUT. Then the model is saved the
accelerate ways (``_save_model``): ``save_model`` to OUT.save_model, ``save_pretrained`` with
``state_dict=get_state_dict(model)`` to OUT.save_pretrained, and ``save_pretrained`` without a
state dict (refused at stage 3, whose parameters are DTensor shards) to OUT.plain.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import memopt
from memopt.integrations.accelerate import prepare
from tests.integrations._exit import leave_now
from tests.integrations._tiny import Tokens, tiny_llama

GLOBAL_BATCH, ACCUM, MAX_NORM = 4, 2, 0.5


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = p.full_tensor() if isinstance(p, DTensor) else p
    return t.detach().cpu().clone()


def _save_model(acc: Accelerator, model: torch.nn.Module, out: str) -> dict[str, object]:
    """Save through accelerate's routes (collectives: every rank calls them); what each rank saw
    of ``get_state_dict`` and the refusal of the plain ``save_pretrained``, if any."""
    from accelerate.utils import gather_object

    acc.save_model(model, out + ".save_model")
    unwrapped = acc.unwrap_model(model)
    if acc.is_main_process:
        unwrapped.config.save_pretrained(out + ".save_model")
    state = acc.get_state_dict(model)
    kinds = sorted({type(t).__name__ for t in state.values()})
    sizes = gather_object([len(state)])  # (before save_pretrained, which empties it)
    unwrapped.save_pretrained(out + ".save_pretrained", is_main_process=acc.is_main_process,
                              save_function=acc.save, state_dict=state)  # fmt: skip
    refused = None
    try:  # the transformers *_no_trainer.py examples' idiom: the model's own state dict
        unwrapped.save_pretrained(out + ".plain", is_main_process=acc.is_main_process,
                                  save_function=acc.save)  # fmt: skip
    except ValueError as e:
        refused = str(e)
    return {"state_sizes": sizes, "state_kinds": kinds, "refused": refused}


def main(out: str, stage: int) -> None:
    # cpu=True: accelerate picks MULTI_CPU (gloo) under torchrun only when told it is on CPU
    acc = Accelerator(gradient_accumulation_steps=ACCUM, cpu=not torch.cuda.is_available())
    model = tiny_llama(0)
    groups = memopt.optim.param_groups(
        model, "attn|mlp", rank=4, update_proj_gap=2, weight_decay=0.01
    )
    # APOLLO, not GaLore: its seeded projection is the same at any world size, while GaLore's
    # SVD basis of a matrix with near-equal singular values can flip on reduction-order noise
    # (1e-8 at 2 ranks -> 3e-4 in one matrix after a refresh, seen on this VM's BLAS).
    opt = memopt.optim.ApolloAdamW(groups, lr=3e-3)
    batch = GLOBAL_BATCH // acc.num_processes
    loader = DataLoader(Tokens(24), batch_size=batch, shuffle=False)
    model, opt, loader = prepare(acc, model, opt, loader, stage=stage)
    norms: list[float] = []
    for inputs in loader:
        with acc.accumulate(model):
            acc.backward(model(**inputs).loss)
            if acc.sync_gradients:
                norms.append(float(acc.clip_grad_norm_(model.parameters(), MAX_NORM)))
            opt.step()
            opt.zero_grad()
    params = {n: _full(p) for n, p in model.named_parameters()}  # collective under stage 3
    saved = _save_model(acc, model, out)
    if acc.is_main_process:
        info = {"world": acc.num_processes, "kind": str(acc.distributed_type), **saved}
        torch.save({"params": params, "norms": norms, **info}, out)
    acc.wait_for_everyone()  # nobody leaves while rank 0 saves (see memopt._utils.dist_teardown)
    acc.end_training()
    leave_now()  # results saved, ranks left together: skip finalization (see _exit)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
