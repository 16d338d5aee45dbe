"""Peak memory of a training step with and without optimizer-in-backward (CPU or GPU).

Each variant runs in its own process (so peak RSS is its own) on a random-init LLaMA
built from a config: torch AdamW (fused), memopt AdamW, memopt GaLore, each with the
ordinary loop and with ``memopt.optim.step_in_backward``. Reported per variant:

- grad peak: the largest number of gradient bytes alive at once during the measured
  steps, counted by post-accumulate-grad hooks (memopt's accounting);
- state: optimizer-state bytes (``memopt.optim.state_bytes``);
- training RSS: peak RSS (``ru_maxrss``) minus the RSS once the model and optimizer are
  built, i.e. what training adds (gradients, optimizer state, activations), in MiB;
- on a GPU (``--device cuda``): ``torch.cuda.max_memory_allocated`` during the measured
  steps minus what was allocated once the model and optimizer were built;
- step time.

    python benchmarks/in_backward_mem.py [--hidden 768 --layers 12 --steps 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = [
    ("torch-adamw", "torch", False),
    ("memopt-adamw", "adamw", False),
    ("memopt-adamw+in-backward", "adamw", True),
    ("memopt-galore", "galore", False),
    ("memopt-galore+in-backward", "galore", True),
]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_variant(args: argparse.Namespace, opt_kind: str, in_backward: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import memopt

    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    dev = torch.device(args.device)
    model = LlamaForCausalLM(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    if opt_kind == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    elif opt_kind == "adamw":
        opt = memopt.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        groups = memopt.optim.param_groups(model, target="attn|mlp", rank=args.hidden // 4)
        opt = memopt.optim.GaLoreAdamW(groups, lr=1e-4)
    alive = {"now": 0, "peak": 0}
    params = [p for p in model.parameters() if p.requires_grad]

    def count(_p):  # runs after each gradient is accumulated, before any in-backward step
        alive["now"] = sum(
            q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None
        )
        alive["peak"] = max(alive["peak"], alive["now"])

    for p in params:  # registered first, so it runs before in-backward frees the gradient
        p.register_post_accumulate_grad_hook(count)
    handle = memopt.optim.step_in_backward(model, opt) if in_backward else None
    rss_model = _rss_mib()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(dev)
    cuda = dev.type == "cuda"

    after_bwd = {"max": 0}

    def step():
        before = torch.cuda.memory_allocated(dev) if cuda else 0
        loss = model(x, labels=x).loss
        loss.backward()
        if cuda:
            held = torch.cuda.memory_allocated(dev) - before
            after_bwd["max"] = max(after_bwd["max"], held)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocates optimizer state (inside the backward, with in-backward)
    alive["peak"] = 0
    after_bwd["max"] = 0
    rss_before = _rss_mib()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    alloc_before = torch.cuda.memory_allocated(dev) if cuda else 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    dt = (time.perf_counter() - t0) / args.steps
    gpu_peak = (torch.cuda.max_memory_allocated(dev) - alloc_before) / 2**20 if cuda else None
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if handle is not None:
        handle.remove()
    return {
        "params": n_params,
        "grad_peak_mib": alive["peak"] / 2**20,
        "state_mib": memopt.optim.state_bytes(opt).total / 2**20,
        "rss_model_mib": rss_model,
        "rss_before_mib": rss_before,
        "rss_peak_mib": rss_peak,
        "train_rss_mib": rss_peak - rss_model,
        "step_s": dt,
        "gpu_step_peak_mib": gpu_peak,
        "gpu_alloc_before_mib": alloc_before / 2**20 if cuda else None,
        "gpu_after_backward_mib": after_bwd["max"] / 2**20 if cuda else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.variant:
        name = args.variant
        kind, inb = next((k, i) for n, k, i in VARIANTS if n == name)
        print(json.dumps(run_variant(args, kind, inb)))
        return
    rows = {}
    for name, _, _ in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "out") and v
        ]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    base = rows["torch-adamw"]
    print(
        f"\nLLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} "
        f"({base['params'] / 1e6:.1f}M params), batch {args.batch} x {args.seq}, {args.device}\n"
    )
    if args.device != "cpu":
        print("| variant | grad peak MiB | state MiB | held after backward MiB "
              "| GPU step peak MiB (above resident) | resident MiB | peak vs torch AdamW "
              "| step ms |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(
                f"| {name} | {r['grad_peak_mib']:.1f} | {r['state_mib']:.1f} | "
                f"{r['gpu_after_backward_mib']:.1f} | {r['gpu_step_peak_mib']:.1f} | "
                f"{r['gpu_alloc_before_mib']:.1f} | "
                f"{r['gpu_step_peak_mib'] / base['gpu_step_peak_mib']:.2f} | "
                f"{r['step_s'] * 1e3:.1f} |"
            )
    print("| variant | grad peak MiB | state MiB | training RSS MiB | vs torch AdamW | step s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['grad_peak_mib']:.1f} | {r['state_mib']:.1f} | "
            f"{r['train_rss_mib']:.0f} | {r['train_rss_mib'] / base['train_rss_mib']:.2f} | "
            f"{r['step_s']:.2f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
