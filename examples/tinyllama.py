"""A tiny byte-level LLaMA trained on the Python standard library's sources, on CPU.

Shared by ``examples/demo.py``, ``benchmarks/convergence.py`` and
``tests/optim/test_convergence.py``. Nothing is downloaded: the corpus is the ``.py``
files of the running interpreter's standard library, the tokenizer is the identity on
bytes (vocabulary 256), and the model is a randomly initialized
``transformers.LlamaForCausalLM``. Importing this module has no side effects.

    from examples.tinyllama import byte_corpus, tiny_llama, make_optimizer, train
    train_data, heldout = byte_corpus()
    model = tiny_llama("small")
    opt = make_optimizer("galore", model)
    result = train(model, opt, steps=300, data=train_data, heldout=heldout)
    result.heldout_loss, memopt.optim.state_bytes(opt).total
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

VOCAB = 256  # bytes
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}

# Model sizes. "small": ~5.3M parameters (the benchmark and the demo); "tiny": ~0.39M
# (the unit test). Head dim 64 for "small", 24 for "tiny"; untied embeddings and head.
SIZES: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=4),
    "tiny": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4),
}

OPTIMIZERS = ("adamw", "galore", "apollo", "apollo_mini", "frugal", "natural_galore")
LABELS = {
    "adamw": "AdamW", "galore": "GaLore", "apollo": "APOLLO", "apollo_mini": "APOLLO-Mini",
    "frugal": "FRUGAL", "natural_galore": "Natural GaLore",
}


# -- data ------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in sorted order (no site-packages)."""
    root = Path(os.path.dirname(os.__file__))
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def byte_corpus(
    max_bytes: int = 4_000_000, heldout_every: int = 10, max_heldout_bytes: int | None = None
) -> tuple[Tensor, Tensor]:
    """(train, heldout) byte tensors (``uint8``) from the standard library's sources.

    Files are read in sorted order; every ``heldout_every``-th file goes to the held-out
    split, so held-out text comes from files the model never trains on. Reading stops once
    both splits are full (``max_bytes`` for train, ``max_heldout_bytes`` for held-out,
    default ``max_bytes // heldout_every``). Files end with a newline byte separator.
    """
    if max_heldout_bytes is None:
        max_heldout_bytes = max(1, max_bytes // heldout_every)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    caps = {False: max_bytes, True: max_heldout_bytes}
    for i, path in enumerate(stdlib_files()):
        held = i % heldout_every == heldout_every - 1
        if sizes[held] >= caps[held]:
            if all(sizes[k] >= caps[k] for k in caps):
                break
            continue
        try:
            raw = path.read_bytes() + b"\n"
        except OSError:
            continue
        raw = raw[: caps[held] - sizes[held]]
        parts[held].append(raw)
        sizes[held] += len(raw)
    if sizes[False] == 0 or sizes[True] == 0:
        root = os.path.dirname(os.__file__)
        raise RuntimeError(f"no standard-library sources found under {root}")

    def to_tensor(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return to_tensor(parts[False]), to_tensor(parts[True])


def batches(
    data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (inputs, targets) batches of random windows; targets are inputs shifted by 1."""
    n = data.numel() - seq_len - 1
    if n <= 0:
        raise ValueError(f"data has {data.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=generator)
        win = data[starts[:, None] + offsets].long()
        yield win[:, :-1], win[:, 1:]


# -- model -----------------------------------------------------------------------------
def tiny_llama(
    size: str = "small", seed: int = 0, max_seq_len: int = 512, **overrides: Any
) -> LlamaForCausalLM:
    """A randomly initialized byte-level ``LlamaForCausalLM`` (SDPA attention, no downloads).

    ``size`` is ``"small"`` (~5.3M parameters) or ``"tiny"`` (~0.39M); ``overrides`` go
    into the ``LlamaConfig``. The global RNG is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    # SDPA runs on CPU (torch's flash-attention CPU kernel); "eager" works too, at about the
    # same speed for these sizes.
    options: dict[str, Any] = dict(
        vocab_size=VOCAB, max_position_embeddings=max_seq_len, tie_word_embeddings=False,
        attn_implementation="sdpa", **SIZES[size],
    )
    cfg = LlamaConfig(**{**options, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module, heldout: Tensor, seq_len: int = 128, n_windows: int = 64,
    batch_size: int = 16, seed: int = 1234,
) -> float:
    """Mean held-out cross-entropy (nats per byte) over a fixed set of random windows."""
    gen = torch.Generator().manual_seed(seed)
    it = batches(heldout, batch_size, seq_len, gen)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        while count < n_windows:
            x, y = next(it)
            take = min(batch_size, n_windows - count)
            total += float(lm_loss(model, x[:take], y[:take])) * take
            count += take
    finally:
        model.train(was_training)
    return total / count


# -- optimizers ------------------------------------------------------------------------
# Keys that go to the optimizer's constructor; every other keyword goes to param_groups
# (low-rank group options, and target / exclude / weight_decay / state_free).
_CTOR_KEYS = {"betas", "eps", "correct_bias", "seed", "state_dtype", "inactive_update_rule",
              "inactive_lr_scale", "scale_front", "disable_nl"}


def default_config(name: str, hidden: int) -> dict[str, Any]:
    """Each optimizer's defaults here: the paper's setting, with the learning rate tuned.

    Structure as in the papers: GaLore rank hidden/4, scale 0.25; APOLLO rank hidden/4,
    random projection, channel scaling, scale 1; APOLLO-Mini rank 1, tensor scaling,
    scale hidden/4 (the reference's width rule: its 60M and 130M scripts use a quarter of
    the model width, 128 at the paper's width 512; memopt's own default stays 128);
    FRUGAL density 0.25 with ``proj="svd"`` (GaLore's subspace, so the two are comparable;
    the paper's blockwise mode is ``proj="block"``), signSGD on the rest, and embeddings,
    norms and head state-full as in the paper's main runs; Natural GaLore as GaLore plus 4
    stored gradients. ``update_proj_gap`` is 100, not the papers' 200: a
    run of a few hundred steps should see a few refreshes.

    Learning rates are the best of the sweep in docs/benchmarks.md (small model, 300
    steps, batch 8 x 128): AdamW 5e-4 (of 2.5e-4 / 5e-4 / 1e-3 / 3e-3), GaLore and
    Natural GaLore 5e-3 (the papers use 1e-2), APOLLO and APOLLO-Mini 3e-3 (papers:
    1e-2), FRUGAL 1e-3 (as the paper).
    """
    rank = max(1, hidden // 4)
    table: dict[str, dict[str, Any]] = {
        "adamw": dict(lr=5e-4),
        "galore": dict(lr=5e-3, rank=rank, update_proj_gap=100, scale=0.25),
        "apollo": dict(lr=3e-3, rank=rank, update_proj_gap=100, scale=1.0, proj="random",
                       scale_type="channel"),
        "apollo_mini": dict(lr=3e-3, rank=1, update_proj_gap=100, scale=float(rank),
                            proj="random", scale_type="tensor"),
        "frugal": dict(lr=1e-3, density=0.25, update_proj_gap=100, proj="svd",
                       inactive_update_rule="sign_sgd"),
        "natural_galore": dict(lr=5e-3, rank=rank, update_proj_gap=100, scale=0.25,
                               natural_history=4, damping=1e-3),
    }
    if name not in table:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return dict(table[name])


def make_optimizer(
    name: str, model: nn.Module, lr: float | None = None, **kw: Any
) -> torch.optim.Optimizer:
    """An optimizer for ``model`` by name: adamw, galore, apollo, apollo_mini, frugal,
    natural_galore. ``kw`` overrides the defaults of :func:`default_config` (group options
    such as ``rank=``, ``scale=``, ``update_proj_gap=``, or constructor options such as
    ``betas=``). AdamW is ``torch.optim.AdamW``; weight decay is 0 for all unless given,
    betas (0.9, 0.999) for all.
    """
    import memopt

    cfg = {**default_config(name, hidden_size(model)), **kw}
    cfg_lr = cfg.pop("lr")
    lr = cfg_lr if lr is None else lr
    if name == "adamw":
        wd = cfg.pop("weight_decay", 0.0)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, **cfg)
    ctor = {k: cfg.pop(k) for k in list(cfg) if k in _CTOR_KEYS}
    target = cfg.pop("target", "attn|mlp")
    groups = memopt.optim.param_groups(model, target=target, **cfg)
    cls = {
        "galore": memopt.optim.GaLoreAdamW,
        "apollo": memopt.optim.ApolloAdamW,
        "apollo_mini": memopt.optim.ApolloMini,
        "frugal": memopt.optim.FrugalAdamW,
        "natural_galore": memopt.optim.NaturalGaLoreAdamW,
    }[name]
    return cls(groups, lr=lr, **ctor)


# -- training --------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns."""

    losses: list[float]  # training loss per step
    heldout_loss: float  # final held-out loss
    initial_heldout_loss: float  # held-out loss before the first step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    seconds: float = 0.0  # wall time of the training steps (evaluation excluded)


def lr_lambda(steps: int, warmup: int, min_ratio: float = 0.1) -> Any:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``steps``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, data: Tensor,
    heldout: Tensor | None = None, *, batch_size: int = 8, seq_len: int = 128, seed: int = 0,
    warmup: int | None = None, clip: float | None = 1.0, eval_every: int | None = None,
    eval_windows: int = 64, progress: bool = True, desc: str | None = None,
) -> TrainResult:
    """Train ``model`` with ``opt`` for ``steps`` steps on random windows of ``data``.

    The data order depends only on ``seed``; the learning rate warms up linearly over
    ``warmup`` steps (default 10% of ``steps``) and decays by cosine to 10%. Gradients are
    clipped to norm ``clip``. Held-out loss is measured before training, every
    ``eval_every`` steps, and at the end.
    """
    from tqdm.auto import tqdm

    warmup = max(1, steps // 10) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    it = batches(data, batch_size, seq_len, gen)

    def ev() -> float:
        if heldout is None:
            return math.nan
        return evaluate(model, heldout, seq_len=seq_len, n_windows=eval_windows)

    initial = ev()
    evals = [(0, initial)]
    losses: list[float] = []
    seconds = 0.0
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, leave=True)
    for step in bar:
        t0 = time.perf_counter()
        x, y = next(it)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            bar.close()
            raise FloatingPointError(f"training loss is {losses[-1]} at step {step}")
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evals.append((step + 1, ev()))
    bar.close()
    final = ev()
    evals.append((steps, final))
    return TrainResult(losses=losses, heldout_loss=final, initial_heldout_loss=initial,
                       evals=evals, seconds=seconds)


def hidden_size(model: nn.Module) -> int:
    """``model.config.hidden_size`` (a Hugging Face model's width)."""
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(config, "hidden_size"):
        raise TypeError("make_optimizer needs a Hugging Face model (model.config.hidden_size)")
    return int(config.hidden_size)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "LABELS", "OPTIMIZERS", "SIZES", "TrainResult", "batches", "byte_corpus", "default_config",
    "evaluate", "hidden_size", "make_optimizer", "param_count", "stdlib_files", "tiny_llama",
    "train",
]
