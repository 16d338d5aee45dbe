"""In-memory peer redundancy (REFT): keep each rank's latest snapshot in its peers' host memory.

``PeerRedundancy.protect(step, tensors, meta)`` is collective over a group of W ranks. Each
rank packs its snapshot into one byte blob (``pack_snapshot``: a JSON header naming every
tensor's dtype, shape and offset, then the raw bytes, 64-byte aligned; no pickle), then

1. every rank all-gathers ``(step, blob length, crc32, config fingerprint)``; a step or config
   that differs between ranks raises ValueError on every rank before any data moves;
2. ``mode="replicate"``: rank r sends its blob to ranks r+1 .. r+copies (mod W, a ring) over
   point-to-point sends; each rank holds ``copies`` peers' blobs. Tolerates any ``copies``
   lost ranks; costs ``copies`` blobs of host memory per rank.
   ``mode="erasure"`` (W = k + m): the blobs are striped as in ``memopt.checkpoint.erasure``;
   stripe by stripe, the k data contributors send their segment to each of the m parity
   holders, which encode and keep one parity block. Tolerates any m lost ranks; costs
   ``m / k`` of a blob per rank, plus the rank's own blob (a copy, or with ``own="reference"``
   the caller's tensors, repacked on demand: the caller must then leave them unchanged).

``rebuild(lost)`` is collective over the survivors and the replacements of the lost ranks (a
replacement may be a fresh ``PeerRedundancy``). The ranks all-gather what each holds, agree on
the lost set, take the table of step 1 from the first survivor, check that enough pieces
survive (ValueError on every rank otherwise), then send each lost rank its blob (replicate) or
k blocks per stripe to decode (erasure). The replacement checks the crc32 recorded at protect
time, unpacks and returns ``PeerSnapshot(step, tensors, meta)``; other ranks return None. The
replacement holds no peers' pieces afterwards: protect again to restore full protection.

Collectives run on ``group`` (default: the default group). From a background thread next to
training (as ``AsyncCheckpointer(redundancy=...)`` does), pass a dedicated gloo group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from memopt.checkpoint import erasure as ec
from memopt.checkpoint.peer_blob import (
    PeerSnapshot,
    blob_crc,
    check_blob,
    pack_snapshot,
    unpack_snapshot,
)
from memopt.checkpoint.redundancy_config import RedundancyConfig

__all__ = ["PeerRedundancy", "RedundancyConfig", "PeerSnapshot"]
_STEP, _LEN, _CRC, _FP = range(4)  # one row per rank of the table all-gathered at protect time


@dataclass
class _State:
    step: int
    table: list[list[int]]  # per rank: step, blob length, crc32, config fingerprint
    held: dict[int, torch.Tensor] = field(default_factory=dict)  # owner or stripe -> bytes
    own_blob: torch.Tensor | None = None
    own_source: Callable[[], torch.Tensor] | None = None  # own="reference": the caller's
    holds_pieces: bool = True  # False on a rebuilt replacement until the next protect


class _Survey(NamedTuple):
    has_pieces: list[bool]  # rank holds the peers' pieces of the protected step
    has_own: list[bool]  # rank can supply its own (intact) blob as data blocks
    table: list[list[int]]


def _check_step(step: int) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


class PeerRedundancy:
    """Holds peers' snapshot pieces in host memory; see the module docstring for the protocol."""

    def __init__(self, config: RedundancyConfig, group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(config, RedundancyConfig):
            raise TypeError(f"config must be a RedundancyConfig, got {type(config).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "PeerRedundancy needs an initialized torch.distributed process group "
                "(dist.init_process_group('gloo', ...)) before it is constructed"
            )
        self.config = config
        self._group = group
        problem = config.group_size_error(self.world)
        if problem:
            raise ValueError(problem)
        self._state: _State | None = None

    # -- group helpers ---------------------------------------------------------------------
    @property
    def world(self) -> int:
        return int(dist.get_world_size(self._group))

    @property
    def rank(self) -> int:
        return int(dist.get_rank(self._group))

    @property
    def step(self) -> int | None:
        """The step this rank's held pieces belong to (None before protect / on a replacement)."""
        return None if self._state is None else self._state.step

    def _global(self, rank: int) -> int:
        return rank if self._group is None else int(dist.get_global_rank(self._group, rank))

    def _all_gather(self, row: list[int]) -> list[list[int]]:
        mine = torch.tensor(row, dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(rows, mine, group=self._group)
        return [r.tolist() for r in rows]

    def _transfer(
        self, plan: Sequence[tuple[int, int, int]], send: Mapping[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """Run point-to-point transfers ``(src, dst, nbytes)``, tagged by plan index.

        ``send`` maps the plan index of each transfer from this rank to its buffer; returns
        the received buffers by plan index.
        """
        me, works = self.rank, []
        received: dict[int, torch.Tensor] = {}
        for tag, (src, dst, nbytes) in enumerate(plan):
            if src == me:
                buf = send[tag]
                assert buf.numel() == nbytes, (tag, buf.numel(), nbytes)
                works.append(dist.isend(buf, self._global(dst), group=self._group, tag=tag))
            elif dst == me:
                received[tag] = torch.empty(nbytes, dtype=torch.uint8)
                works.append(
                    dist.irecv(received[tag], self._global(src), group=self._group, tag=tag)
                )
        for work in works:
            if work is not None:
                work.wait()
        return received

    # -- protect ---------------------------------------------------------------------------
    def protect(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Collective: store peers' pieces of every rank's snapshot of ``step`` on this rank.

        Raises ValueError on every rank, leaving the previous protection in place, when the
        ranks pass different steps or configs.
        """
        _check_step(step)
        meta = dict(meta or {})
        blob = pack_snapshot(step, tensors, meta)
        if self.config.mode == "erasure" and self.config.own == "reference":
            tensors = dict(tensors)
            self._protect(step, blob, lambda: pack_snapshot(step, tensors, meta))
        else:
            self._protect(step, blob, None)

    def protect_blob(self, step: int, blob: torch.Tensor) -> None:
        """``protect`` for a snapshot already serialized into a 1-D uint8 CPU tensor.

        For a checkpointer that has the snapshot's bytes staged (e.g. a file image): nothing
        is packed, and with ``own="reference"`` the blob itself serves later rebuilds (it must
        then stay unchanged until the next protect). ``rebuild_blob`` returns the bytes.
        """
        _check_step(step)
        check_blob(blob)
        if self.config.mode == "erasure" and self.config.own == "copy":
            self._protect(step, blob.clone(), None)
        else:
            self._protect(step, blob, lambda: blob)

    def _protect(
        self, step: int, blob: torch.Tensor, own_source: Callable[[], torch.Tensor] | None
    ) -> None:
        row = [step, blob.numel(), blob_crc(blob), self.config.fingerprint()]
        table = self._all_gather(row)
        self._check_agreement(table)
        self._state = None  # the old pieces go before the new ones arrive: 1x memory
        state = _State(step=step, table=table)
        if self.config.mode == "replicate":
            self._replicate(blob, state)
        else:
            self._encode(blob, state)
            if own_source is None:
                state.own_blob = blob
            else:
                state.own_source = own_source
        self._state = state

    def _check_agreement(self, table: list[list[int]]) -> None:
        steps = [row[_STEP] for row in table]
        if len(set(steps)) > 1:
            raise ValueError(
                f"protect() called with different steps on different ranks: {steps} "
                "(rank -> step); every rank must protect the same step"
            )
        fps = [row[_FP] for row in table]
        if len(set(fps)) > 1:
            raise ValueError(
                f"ranks use different RedundancyConfigs (fingerprints {fps}); "
                f"this rank has {self.config}"
            )

    def _replicate(self, blob: torch.Tensor, state: _State) -> None:
        world, lengths = self.world, [row[_LEN] for row in state.table]
        plan = [
            (src, (src + c) % world, lengths[src])
            for src in range(world)
            for c in range(1, self.config.copies + 1)
        ]
        send = {tag: blob for tag, (src, _, _) in enumerate(plan) if src == self.rank}
        for tag, buf in self._transfer(plan, send).items():
            state.held[plan[tag][0]] = buf

    def _encode(self, blob: torch.Tensor, state: _State) -> None:
        world, m, me = self.world, self.config.m, self.rank
        seg = ec.segment_size(max(row[_LEN] for row in state.table), self.config.k)
        my_stripes = ec.contributor_stripes(me, world, m)
        for stripe in range(world):  # one round per stripe bounds the in-flight bytes
            holders = ec.parity_holders(stripe, world, m)
            contributors = ec.data_contributors(stripe, world, m)
            plan = [(src, dst, seg) for src in contributors for dst in holders]
            send = {}
            if me in contributors:
                piece = ec.segment(blob, my_stripes.index(stripe), seg)
                send = {tag: piece for tag, (src, _, _) in enumerate(plan) if src == me}
            received = self._transfer(plan, send)
            if me in holders:
                mine = sorted(received)  # plan order == contributor order
                data = [received[t] for t in mine]
                state.held[stripe] = ec.encode_parity(data, m, holders.index(me))

    # -- rebuild ---------------------------------------------------------------------------
    def rebuild(self, lost: int | Sequence[int]) -> PeerSnapshot | None:
        """Collective: rebuild the snapshot of each rank in ``lost`` on that rank.

        Every rank of the group calls it with the same ``lost`` (the survivors and the lost
        ranks' replacements). Returns the rebuilt snapshot on a lost rank, None elsewhere.
        """
        got = self.rebuild_blob(lost)
        return None if got is None else unpack_snapshot(got[1])

    def rebuild_blob(self, lost: int | Sequence[int]) -> tuple[int, torch.Tensor] | None:
        """``rebuild`` returning ``(step, blob)``: the bytes ``protect(_blob)`` was given."""
        lost_set = self._check_lost(lost)
        own = self._own_blob() if self.rank not in lost_set else None
        survey = self._survey(lost_set, own is not None)
        if self.config.mode == "replicate":
            blob = self._fetch_replica(lost_set, survey)
        else:
            blob = self._decode(lost_set, survey, own)
        if blob is None:
            return None
        row = survey.table[self.rank]
        blob = blob[: row[_LEN]]
        if blob_crc(blob) != row[_CRC]:
            raise RuntimeError(
                f"rank {self.rank}: the snapshot rebuilt from peers fails its crc32 check "
                f"(step {row[_STEP]}); a peer's held piece was corrupted"
            )
        self._state = _State(step=row[_STEP], table=survey.table, holds_pieces=False)
        if self.config.mode == "erasure" and self.config.own == "copy":
            self._state.own_blob = blob  # serves as this rank's data blocks, as after protect
        return row[_STEP], blob

    def _check_lost(self, lost: int | Sequence[int]) -> frozenset[int]:
        items = [lost] if isinstance(lost, int) else list(lost)
        bad = [r for r in items if not isinstance(r, int) or not 0 <= r < self.world]
        if bad or not items:
            raise ValueError(
                f"lost must name ranks in [0, {self.world}) of the group, got {lost!r}"
            )
        if len(set(items)) == self.world:
            raise ValueError(f"every rank of the group is lost ({sorted(items)}): nothing to read")
        return frozenset(items)

    def _survey(self, lost: frozenset[int], own_ok: bool) -> _Survey:
        """All-gather who holds what, check agreement, fetch the protect-time table."""
        world, state = self.world, self._state
        mask = [int(r in lost) for r in range(world)]
        pieces = state is not None and state.holds_pieces
        mine = [*mask, int(pieces), int(own_ok), -1 if state is None else state.step]
        rows = self._all_gather(mine)
        if any(row[:world] != mask for row in rows):
            views = {r: [i for i in range(world) if row[i]] for r, row in enumerate(rows)}
            raise ValueError(f"ranks disagree on the lost ranks (rank -> lost): {views}")
        alive = [r for r in range(world) if r not in lost]
        steps = {rows[r][world + 2] for r in alive} - {-1}
        if len(steps) > 1:
            raise ValueError(f"surviving ranks hold snapshots of different steps: {sorted(steps)}")
        has_pieces = [bool(rows[r][world]) and r not in lost for r in range(world)]
        has_own = [bool(rows[r][world + 1]) and r not in lost for r in range(world)]
        if not any(has_pieces):
            raise ValueError(
                f"no surviving rank ({alive}) holds protected pieces: call protect() first"
            )
        src = has_pieces.index(True)
        flat = torch.zeros(world * 4, dtype=torch.int64)
        if self.rank == src:
            assert state is not None
            flat = torch.tensor(state.table, dtype=torch.int64).flatten()
        dist.broadcast(flat, self._global(src), group=self._group)
        return _Survey(has_pieces, has_own, flat.view(world, 4).tolist())

    def _fetch_replica(self, lost: frozenset[int], survey: _Survey) -> torch.Tensor | None:
        world, copies = self.world, self.config.copies
        plan: list[tuple[int, int, int]] = []
        send: dict[int, torch.Tensor] = {}
        for x in sorted(lost):
            holders = [(x + c) % world for c in range(1, copies + 1)]
            src = next((h for h in holders if survey.has_pieces[h]), None)
            if src is None:
                raise ValueError(
                    f"cannot rebuild rank {x}: its copies were on ranks {holders}, all lost "
                    f"or empty (lost: {sorted(lost)}); copies={copies} survives at most "
                    f"{copies} lost ranks in a row"
                )
            if src == self.rank:
                assert self._state is not None
                send[len(plan)] = self._state.held[x]
            plan.append((src, x, survey.table[x][_LEN]))
        received = self._transfer(plan, send)
        return next(iter(received.values()), None)

    def _decode(
        self, lost: frozenset[int], survey: _Survey, own: torch.Tensor | None
    ) -> torch.Tensor | None:
        world, k, m, me = self.world, self.config.k, self.config.m, self.rank
        if len(lost) > m:
            raise ValueError(
                f"{len(lost)} ranks lost ({sorted(lost)}) but erasure coding k={k}, m={m} "
                f"rebuilds at most m = {m}"
            )
        seg = ec.segment_size(max(row[_LEN] for row in survey.table), k)
        plan: list[tuple[int, int, int]] = []
        picks: list[tuple[int, int]] = []  # (segment index of the lost rank, block number)
        for x in sorted(lost):
            for index, stripe in enumerate(ec.contributor_stripes(x, world, m)):
                chosen = ec.choose_blocks(stripe, world, m, survey.has_own, survey.has_pieces)
                for block, src in chosen:
                    picks.append((index, block))
                    plan.append((src, x, seg))
        send = {}
        for tag, (src, x, _) in enumerate(plan):
            if src == me:
                send[tag] = self._piece(own, x, *picks[tag], seg)
        received = self._transfer(plan, send)
        if me not in lost:
            return None
        my_stripes = ec.contributor_stripes(me, world, m)
        segments = []
        for index, stripe in enumerate(my_stripes):
            blocks = {picks[t][1]: b for t, b in received.items() if picks[t][0] == index}
            want = ec.data_contributors(stripe, world, m).index(me)
            segments.append(ec.decode_block(blocks, k, m, want))
        return torch.cat(segments)

    def _piece(
        self, own: torch.Tensor | None, lost: int, index: int, block: int, seg: int
    ) -> torch.Tensor:
        """What this rank sends towards block ``block`` of lost rank ``lost``'s segment."""
        world, m = self.world, self.config.m
        stripe = ec.contributor_stripes(lost, world, m)[index]
        if block >= self.config.k:  # a parity block this rank holds
            assert self._state is not None
            return self._state.held[stripe]
        assert own is not None  # a data block: this rank's own segment of that stripe
        return ec.segment(own, ec.contributor_stripes(self.rank, world, m).index(stripe), seg)

    def _own_blob(self) -> torch.Tensor | None:
        """This rank's own packed snapshot if it is still intact (erasure mode), else None."""
        state = self._state
        if state is None or self.config.mode != "erasure":
            return None
        if state.own_blob is not None:
            return state.own_blob
        if state.own_source is None:
            return None
        blob = state.own_source()
        # Changed tensors cannot serve as data blocks; the others' blocks may still suffice.
        return blob if blob_crc(blob) == state.table[self.rank][_CRC] else None

    def take_over(self, other: PeerRedundancy) -> None:
        """Hold what ``other`` (same config and ranks, e.g. an older group) held; it is emptied."""
        if other.config.fingerprint() != self.config.fingerprint() or other.world != self.world:
            raise ValueError(f"take_over: {other.config} on {other.world} ranks does not match")
        self._state, other._state = other._state, None

    # -- accounting ------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Host bytes this object holds: peers' copies or parity, plus a copied own blob."""
        state = self._state
        if state is None:
            return 0
        held = sum(t.numel() for t in state.held.values())
        return held + (0 if state.own_blob is None else state.own_blob.numel())
