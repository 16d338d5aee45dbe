"""Reading a published snapshot: check every file, then serve tensors by global rows.

``Snapshot(path)`` reads ``manifest.json``, checks that every rank's two files are there,
reads each one once (the checksum is computed over the bytes read, no second pass) and
indexes the row blocks of every tensor name over all ranks. ``rows(name, start, end)``
assembles rows ``[start, end)`` of the global tensor from the blocks that overlap them, so a
snapshot saved at world size N serves any layout at world size M.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import Tensor

from memopt.checkpoint.errors import CorruptSnapshotError, SnapshotMismatchError
from memopt.checkpoint.fileformat import checksum_fn, read_file
from memopt.checkpoint.publish import MANIFEST, rank_files


class Snapshot:
    """One published snapshot, verified and in host memory."""

    def __init__(self, path: str, verify: bool = True) -> None:
        self.path = path
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint snapshot {path} does not exist (or is not a "
                                    "directory)")  # fmt: skip
        if not os.path.exists(os.path.join(path, MANIFEST)) and any(
            name.startswith("step_") for name in os.listdir(path)
        ):
            raise FileNotFoundError(
                f"{path} is a checkpoint directory, not one snapshot: pass one of its step_* "
                "directories, or use AsyncCheckpointer(directory).load(step)"
            )
        self.manifest = self._json(os.path.join(path, MANIFEST), None)
        self.world, self.step, checksum, files = self._fields(self.manifest)
        algo = checksum if verify else None
        self.skeletons: list[dict[str, Any]] = []
        self.tensors: list[dict[str, Tensor]] = []
        for r in range(self.world):
            data_name, json_name = rank_files(r)
            for name in (data_name, json_name):
                if not os.path.isfile(os.path.join(path, name)):
                    raise CorruptSnapshotError(
                        f"snapshot {path} is missing rank {r}'s file {name} (saved by "
                        f"{self.world} ranks); restore the file or load an older step"
                    )
            if verify and not all(isinstance(files.get(n), int) for n in (data_name, json_name)):
                raise CorruptSnapshotError(
                    f"checkpoint file {os.path.join(path, MANIFEST)} lists no checksum of rank "
                    f"{r}'s files {data_name}, {json_name}: not a manifest a commit wrote"
                )
            expect = files.get(json_name) if verify else None
            self.skeletons.append(self._json(os.path.join(path, json_name), (algo, expect)))
            self.tensors.append(
                read_file(os.path.join(path, data_name), algo, files.get(data_name))
            )
        self._index()

    def _fields(self, m: Any) -> tuple[int, int, str, dict[str, int]]:
        """world size, step, checksum algorithm and file checksums of a manifest, or
        ``CorruptSnapshotError`` (valid JSON, but not what a commit writes: hand-edited?)."""
        try:
            world, step, files = int(m["world_size"]), int(m["step"]), m["files"]
            checksum = m["checksum"]
            if world < 1 or not isinstance(files, dict) or not isinstance(checksum, str):
                raise TypeError("wrong value types")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptSnapshotError(
                f"checkpoint file {os.path.join(self.path, MANIFEST)} is not a valid manifest "
                f"({type(e).__name__}: {e}; it needs world_size, step, checksum and files)"
            ) from e
        return world, step, checksum, files

    @staticmethod
    def _json(path: str, check: tuple[str | None, int | None] | None) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise CorruptSnapshotError(f"checkpoint file {path} cannot be read: {e}") from e
        if check is not None and check[0] is not None and check[1] is not None:
            got = checksum_fn(check[0])(raw, 0)
            if got != check[1]:
                raise CorruptSnapshotError(
                    f"checkpoint file {path} fails its {check[0]} checksum (stored "
                    f"{check[1]:#010x}, computed {got:#010x})"
                )
        try:
            out: dict[str, Any] = json.loads(raw)
        except ValueError as e:
            raise CorruptSnapshotError(f"checkpoint file {path} is not valid JSON: {e}") from e
        return out

    def _index(self) -> None:
        self.blocks: dict[str, list[tuple[int, int, Tensor]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for r, skel in enumerate(self.skeletons):
            if not isinstance(skel, dict) or not isinstance(skel.get("tensors"), dict):
                raise CorruptSnapshotError(
                    f"snapshot {self.path}: rank {r}'s JSON file has no tensor table"
                )
            for name, info in skel["tensors"].items():
                t = self.tensors[r].get(name)
                if t is None:
                    raise CorruptSnapshotError(
                        f"snapshot {self.path}: rank {r}'s file lacks tensor {name!r}"
                    )
                self.shapes[name] = tuple(info["global_shape"])
                self.blocks.setdefault(name, []).append((int(info["row_offset"]), r, t))

    def has(self, name: str) -> bool:
        return name in self.blocks

    def rank_tensor(self, rank: int, name: str) -> Tensor:
        return self.tensors[rank][name]

    def full(self, name: str) -> Tensor:
        shape = self.shapes[name]
        return self.rows(name, 0, shape[0] if shape else 1)

    def rows(self, name: str, start: int, end: int) -> Tensor:
        """Rows ``[start, end)`` of the global tensor ``name``."""
        shape = self.shapes[name]
        blocks = self.blocks[name]
        if not shape:
            return blocks[0][2].clone()
        out = blocks[0][2].new_empty((end - start, *shape[1:]))
        covered = 0
        for off, _r, t in blocks:
            lo, hi = max(start, off), min(end, off + int(t.shape[0]))
            if hi > lo:
                out[lo - start : hi - start].copy_(t[lo - off : hi - off])
                covered += hi - lo
        if covered < end - start:
            raise SnapshotMismatchError(
                f"snapshot {self.path}: rows [{start}, {end}) of {name!r} are not all stored "
                f"(blocks at {[b[0] for b in blocks]})"
            )
        return out
