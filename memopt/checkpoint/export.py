"""``export_hf``: a snapshot's model weights, consolidated, as one Hugging Face safetensors file.

Every ``model.*`` tensor is assembled from all ranks' row blocks (any world size, stage 3
included) and written with ``safetensors.torch.save_file`` under its ``state_dict`` name, so
``transformers``' ``from_pretrained`` (with the file named ``model.safetensors`` next to a
config) or ``model.load_state_dict(safetensors.torch.load_file(path))`` loads it.

Only weights are written, no ``config.json``: save the model's config into the same directory
(``model.config.save_pretrained(out_dir)``). Without it a model class's ``from_pretrained``
(transformers 5: ``LlamaForCausalLM.from_pretrained(out_dir)``) builds the class's default
config, not the trained model: 7B-sized for Llama, an out-of-memory at 24 GB was seen.
"""

from __future__ import annotations

import os

import torch

from memopt.checkpoint.loading import open_published
from memopt.checkpoint.publish import published_steps, step_dir
from memopt.checkpoint.reader import Snapshot


def export_hf(
    snapshot: str | os.PathLike[str] | int,
    out_path: str | os.PathLike[str],
    *,
    directory: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
) -> str:
    """Write ``snapshot``'s (a snapshot directory, a checkpoint directory -> its newest step,
    or a step number with ``directory=``) model weights to ``out_path``; returns the path.

    ``out_path``: a file ending in ``.safetensors`` (its directory must exist), or a
    directory (any other path, or one ending in a separator; created if missing) that gets
    ``model.safetensors``, what ``from_pretrained(directory)`` reads, together with the
    ``config.json`` that ``model.config.save_pretrained(directory)`` writes (not written here:
    without it ``from_pretrained`` does not build the trained architecture)."""
    from safetensors.torch import save_file

    dtype = _float_dtype(dtype)
    snap = _open(snapshot, directory)
    path = snap.path
    names = snap.skeletons[0].get("model", {}).get("names")
    if not names:
        raise ValueError(f"export_hf: snapshot {path} holds no model weights")
    out = {}
    for name in names:
        t = snap.full(f"model.{name}")
        out[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    target = _target(os.fspath(out_path))
    save_file(out, target, metadata={"format": "pt", "memopt_step": str(snap.step)})
    return target


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _float_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating dtype (or its name): an integer or bool cast would write garbage weights."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"export_hf: dtype {dtype!r} unknown; use one of "
                             f"{sorted(_DTYPE_NAMES)} or a floating torch.dtype")  # fmt: skip
        return _DTYPE_NAMES[dtype]
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"export_hf: dtype must be a floating torch.dtype (torch.bfloat16, "
                         f"...) or None, got {dtype!r}")  # fmt: skip
    return dtype


def _target(target: str) -> str:
    """The file to write: ``<dir>/model.safetensors`` for a directory (created when missing:
    an existing one, a path ending in a separator, or one without a ``.safetensors`` suffix),
    else the ``.safetensors`` file itself, whose directory must exist."""
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if os.path.isdir(target) or target.endswith(seps) or not target.endswith(".safetensors"):
        if os.path.exists(target) and not os.path.isdir(target):
            raise FileExistsError(
                f"export_hf: {target} is an existing file, not a directory; pass a directory "
                "(model.safetensors is written in it) or a path ending in .safetensors"
            )
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as e:
            raise OSError(f"export_hf: cannot create the output directory {target}: {e}") from e
        return os.path.join(target, "model.safetensors")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"export_hf: the directory of {target} ({parent}) does not exist; create it, or "
            "pass a directory as out_path (it is created, with model.safetensors inside)"
        )
    return target


def _open(
    snapshot: str | os.PathLike[str] | int, directory: str | os.PathLike[str] | None
) -> Snapshot:
    """The snapshot to export; a checkpoint directory gives its newest intact one (a
    damaged newest snapshot warns and falls back, as ``AsyncCheckpointer.load`` does)."""
    if isinstance(snapshot, int):
        if directory is None:
            raise ValueError("export_hf: a step number needs directory=<checkpoint directory>")
        steps = published_steps(os.fspath(directory))
        if snapshot not in steps:
            raise FileNotFoundError(
                f"export_hf: {os.fspath(directory)} holds no published snapshot of step "
                f"{snapshot} (published: {steps})"
            )
        return Snapshot(step_dir(os.fspath(directory), snapshot))
    path = os.fspath(snapshot)
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return Snapshot(path)
    if not published_steps(path):
        raise FileNotFoundError(f"export_hf: {path} is neither a snapshot nor holds one")
    return open_published(path, None, verify=True)
