"""A fleet scale-out burst as a fluid event simulation, driven by the repo's real schedule and choice code.

One source replica holds the weights (it read storage once); N targets start at t=0. Each source rank runs the real
`CarouselSchedule` (which chunk sits in which slot, when a slot may be refilled, who joins or is told "busy"); each
target picks its source with the real `rank_sources` (same node, then topology, then fewest readers in flight, then
a per-target hash) and backs off like `sidecar.target.attempts` when every source is busy. Reported per strategy and
N: time until every target is ready, storage reads (the source's own included), bytes over NVLink (same node) and
over the network (cross node), and the most bytes any one source sent.

Strategies: `star` (before the carousel: one reader per pass, a target only knows the root source and queues behind
it, a target still queued after MX_STALL_TIMEOUT loads from storage), `carousel` (64 readers in one pass) and `tree`
(K readers per pass; busy targets back off, re-read the live list and take targets that finished). `carousel` uses
the same target behaviour as `tree`: with N <= 64 everyone joins the root's pass at t=0, so no tree forms; with
N > 64 the rest do what the real targets do (wait, re-read, take finished targets).

Measured vs assumed (GPU defaults, `Params`):
  measured: same-node READ of a staged slot 303 GB/s (2x H200, sidecar-owned buffer), D2D stage copy ~2 TB/s (H200).
  defaults of the code: 256 MiB slots, 4 slots (MX_STAGING_SLOT_BYTES/SLOTS), MX_STALL_TIMEOUT 30 s,
    MX_POLL_INTERVAL 0.25 s doubling to 2 s (attempts.MAX_BUSY_PAUSE_S), MX_TRANSFER_TIMEOUT 900 s.
  assumed: 450 GB/s NVLink egress per source GPU (H200 spec, one direction), 50 GB/s NIC per GPU (400 Gb/s) both ways,
    2 GB/s object-storage read per replica, 8 GPUs a node, 17.5 GB per rank (70B bf16 at TP8).

The model, and what it leaves out:
  - One rank per replica: a replica's ranks are symmetric and move in parallel, so its time is one rank's time.
  - Fluid and event-driven (exact between events, no time step): at every change a source's NVLink budget is shared
    equally among its same-node READs in flight, its NIC budget among its cross-node READs, each READ also capped by
    its reader's ingress (303 GB/s same node, the NIC across nodes). A reader READs its announced chunks one after
    another (the real target may post up to `slots` at once, which shares the same ingress, so the throughput is the
    same); a READ's latency, Hello/Welcome round trips, verification and a new source's publication take no time.
  - Fills are serial per source (one copy stream), chunk_bytes / stage_copy_Bps each, overlapped with the READs.
  - No failures, no stragglers dropped (MX_STRAGGLER_TIMEOUT never bites: a slot is held for milliseconds), no
    topology below the node (MX_TOPOLOGY empty), the NIC and NVLink fabric beyond a GPU never congest.
  - Ties between targets that act at the same instant (who reaches the root first) follow a seeded permutation.
  - Every target starts at t=0 and the back-off has no jitter (as in attempts), so busy targets wake in lockstep
    (0.25, 0.75, 1.75, 3.75, 5.75, ... s) and the tree's times land just after those instants.

`cpu_check()` replays the CPU benchmark of sidecar/lab/fanout.py (toy SMALL model, 64 KiB slots, each READ delayed
30 ms) so the model's "all ready / one target" ratios sit beside the measured ones.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sidecar.choice import rank_sources
from sidecar.source.carousel import CarouselSchedule, Fill
from sidecar.target.attempts import MAX_BUSY_PAUSE_S

MiB = 1 << 20
GB = 1e9


@dataclass(frozen=True)
class Params:
    rank_bytes: float = 17.5e9  # 70B bf16 (140 GB) at TP8
    chunk_bytes: int = 256 * MiB  # MX_STAGING_SLOT_BYTES default
    slots: int = 4  # MX_STAGING_SLOTS default
    stage_copy_Bps: float = 2e12  # D2D copy into a slot, measured ~2 TB/s on H200
    same_node_read_Bps: float = 303e9  # one reader READing a slot over NVLink, measured on 2x H200 (staged)
    source_egress_Bps: float = 450e9  # NVLink per source GPU, H200 spec per direction (assumed)
    cross_node_Bps: float = 50e9  # NIC per GPU, 400 Gb/s (assumed): a reader's ingress and a source's egress
    gpus_per_node: int = 8  # one replica = one GPU-rank; the source on node 0, targets fill the nodes in order
    storage_Bps: float = 2e9  # object-storage read per replica (assumed)
    stall_timeout_s: float = 30.0  # MX_STALL_TIMEOUT default: star's queued targets give up to storage after it
    poll_s: float = 0.25  # MX_POLL_INTERVAL default: the first back-off when every source is busy
    transfer_timeout_s: float = 900.0  # MX_TRANSFER_TIMEOUT default: a busy target's wait bound

    @property
    def nchunks(self) -> int:
        return math.ceil(self.rank_bytes / self.chunk_bytes)

    def chunk_size(self, chunk: int) -> float:
        return min(float(self.chunk_bytes), self.rank_bytes - chunk * self.chunk_bytes)


@dataclass(frozen=True)
class Strategy:
    name: str
    max_readers: int  # MX_FANOUT_READERS: readers one pass feeds
    refresh: bool  # busy targets back off and re-read the live source list (False: the star's queue on the root)


STAR = Strategy("star", 1, False)
CAROUSEL = Strategy("carousel", 64, True)


def tree(k: int = 2) -> Strategy:
    return Strategy("tree", k, True)


@dataclass(frozen=True)
class Cand:
    """What a target sees of a live source (the fields `rank_sources` ranks by)."""

    replica: str
    same_node: bool
    topology: str
    readers: int


@dataclass
class Read:
    reader: int
    chunk: int
    remaining: float
    cross: bool
    rate: float = 0.0
    since: float = 0.0  # when `remaining` was last brought up to date
    version: int = 0  # a rate change reschedules the READ's end; older end events are stale


@dataclass
class Source:
    node: int
    sched: CarouselSchedule
    filling: Fill | None = None
    reads: dict[int, Read] = field(default_factory=dict)  # reader -> its READ in flight
    sent: float = 0.0


@dataclass
class Target:
    node: int
    salt: str
    source: int | None = None
    announced: deque[int] = field(default_factory=deque)  # chunks announced to it, not READ yet
    pause: float = 0.0
    received: float = 0.0
    ready_at: float | None = None
    from_storage: bool = False


@dataclass
class Outcome:
    strategy: Strategy
    targets: list[Target]
    storage_reads: int
    nvlink_bytes: float
    network_bytes: float
    max_source_sent: float

    @property
    def all_ready_s(self) -> float:
        return max((math.inf if t.ready_at is None else t.ready_at for t in self.targets), default=0.0)

    def row(self) -> dict[str, object]:
        return {"strategy": self.strategy.name, "k": self.strategy.max_readers, "targets": len(self.targets),
                "all_ready_s": round(self.all_ready_s, 4), "storage_reads": self.storage_reads,
                "nvlink_gb": round(self.nvlink_bytes / GB, 3), "network_gb": round(self.network_bytes / GB, 3),
                "max_source_sent_gb": round(self.max_source_sent / GB, 3)}


class Fleet:
    """One burst: replica 0 is the root source, replicas 1..n the targets; events in a heap, rates piecewise fixed."""

    def __init__(self, p: Params, strategy: Strategy, n: int, seed: int) -> None:
        self.p, self.st = p, strategy
        self.now = 0.0
        self._events: list[tuple[float, int, str, int, int]] = []
        self._seq = 0
        self.sources: dict[int, Source] = {0: self._source(0)}
        self.targets: dict[int, Target] = {i: Target(i // p.gpus_per_node, f"{seed}/replica-{i}")
                                           for i in range(1, n + 1)}
        self.order = list(self.targets)
        random.Random(seed).shuffle(self.order)  # who reaches the root first at t=0
        self.queue: deque[int] = deque()  # star: targets waiting for the root's pass, in arrival order
        self.storage_reads = 1  # the root's own load
        self.nvlink = self.network = 0.0

    def _source(self, replica: int) -> Source:
        node = replica // self.p.gpus_per_node
        return Source(node, CarouselSchedule(self.p.nchunks, self.p.slots, self.st.max_readers))

    def _at(self, t: float, kind: str, a: int, b: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, a, b))

    # ------------------------------------------------------------------ run
    def run(self) -> Outcome:
        for tid in self.order:
            self.targets[tid].pause = self.p.poll_s
            if self.st.refresh:
                self._attempt(tid)
            elif not self._join(tid, 0):
                self.queue.append(tid)
                self._at(self.p.stall_timeout_s, "stall", tid)
        while self._events:
            self.now, _, kind, a, b = heapq.heappop(self._events)
            if kind == "read":
                self._read_end(a, b)
            elif kind == "fill":
                self._fill_end(a)
            elif kind == "wake":
                self._attempt(a)
            elif kind == "stall" and a in self.queue:
                self.queue.remove(a)
                self._from_storage(a)
            elif kind == "stored":
                self.targets[a].ready_at = self.now
        return Outcome(self.st, list(self.targets.values()), self.storage_reads, self.nvlink, self.network,
                       max(s.sent for s in self.sources.values()))

    # ------------------------------------------------------------------ targets
    def _attempt(self, tid: int) -> None:
        """attempts.receive_from_any: the best candidate first, the next on "busy"; all busy: back off."""
        t = self.targets[tid]
        cands = [Cand(f"replica-{sid}", s.node == t.node, "", len(s.sched.readers)) for sid, s in self.sources.items()]
        for c in rank_sources(cands, "", t.salt):
            if self._join(tid, int(c.replica.removeprefix("replica-"))):
                return
        if self.now + t.pause > self.p.transfer_timeout_s:
            self._from_storage(tid)
            return
        self._at(self.now + t.pause, "wake", tid)
        t.pause = min(t.pause * 2, MAX_BUSY_PAUSE_S)

    def _from_storage(self, tid: int) -> None:
        self.storage_reads += 1
        self.targets[tid].from_storage = True
        self._at(self.now + self.p.rank_bytes / self.p.storage_Bps, "stored", tid)

    def _join(self, tid: int, sid: int) -> bool:
        s = self.sources[sid]
        if not s.sched.join(tid):
            return False
        self.targets[tid].source = sid
        if s.sched.finished(tid):  # a rank of no bytes: nothing to read
            self._finished(tid, sid)
        self._next_fill(sid)
        return True

    def _finished(self, tid: int, sid: int) -> None:
        t = self.targets[tid]
        t.ready_at, t.source = self.now, None
        if self.st.refresh:  # a finished target is a source at once; the star's queue never sees it
            self.sources[tid] = self._source(tid)
        while self.queue:  # star: the pass is free, the next in the queue takes it
            if self._join(self.queue.popleft(), sid):
                break

    # ------------------------------------------------------------------ the source's pass
    def _next_fill(self, sid: int) -> None:
        s = self.sources[sid]
        if s.filling is None and (fill := s.sched.next_fill()) is not None:
            s.filling = fill
            self._at(self.now + self.p.chunk_size(fill.chunk) / self.p.stage_copy_Bps, "fill", sid)

    def _fill_end(self, sid: int) -> None:
        s = self.sources[sid]
        assert s.filling is not None
        fill, s.filling = s.filling, None
        for tid in s.sched.filled(fill):
            assert isinstance(tid, int)
            self.targets[tid].announced.append(fill.chunk)
            if tid not in s.reads:  # idle since its last READ: it READs this one now
                self._start_read(tid, sid)
        self._reprice(sid)
        self._next_fill(sid)

    def _start_read(self, tid: int, sid: int) -> None:
        t, s = self.targets[tid], self.sources[sid]
        if t.announced:
            chunk = t.announced.popleft()
            s.reads[tid] = Read(tid, chunk, self.p.chunk_size(chunk), s.node != t.node, since=self.now)

    def _read_end(self, tid: int, version: int) -> None:
        t = self.targets[tid]
        sid = t.source
        r = None if sid is None else self.sources[sid].reads.get(tid)
        if sid is None or r is None or r.version != version:
            return  # rescheduled by a rate change since
        s = self.sources[sid]
        del s.reads[tid]
        nbytes = self.p.chunk_size(r.chunk)
        s.sent += nbytes
        t.received += nbytes
        if r.cross:
            self.network += nbytes
        else:
            self.nvlink += nbytes
        if s.sched.done(tid, r.chunk):
            self._finished(tid, sid)
        else:
            self._start_read(tid, sid)
        self._reprice(sid)
        self._next_fill(sid)

    def _reprice(self, sid: int) -> None:
        """Share the source's budgets equally among its READs in flight, and reschedule each READ's end."""
        s = self.sources[sid]
        cross = sum(r.cross for r in s.reads.values())
        near = len(s.reads) - cross
        for r in s.reads.values():
            r.remaining -= r.rate * (self.now - r.since)
            r.since = self.now
            if r.cross:
                rate = min(self.p.cross_node_Bps / cross, self.p.cross_node_Bps)
            else:
                rate = min(self.p.source_egress_Bps / near, self.p.same_node_read_Bps)
            if rate != r.rate:  # unchanged: its scheduled end still holds
                r.rate, r.version = rate, r.version + 1
                self._at(self.now + max(r.remaining, 0.0) / rate, "read", r.reader, r.version)


def simulate(p: Params, strategy: Strategy, n: int, seed: int = 1) -> Outcome:
    return Fleet(p, strategy, n, seed).run()


# ---------------------------------------------------------------------- tables
def default_strategies(ks: tuple[int, ...] = (1, 2, 4, 8)) -> list[Strategy]:
    """K=8 is MX_FANOUT_READERS' default."""
    return [STAR, CAROUSEL, *(tree(k) for k in ks)]


def sweep(p: Params, strategies: list[Strategy], sizes: tuple[int, ...], seed: int = 1) -> list[dict[str, object]]:
    rows = []
    for st in strategies:
        one = simulate(p, st, 1, seed).all_ready_s
        for n in sizes:
            out = simulate(p, st, n, seed)
            rows.append(out.row() | {"x_one_target": round(out.all_ready_s / one, 3)})
    return rows


def table(rows: list[dict[str, object]]) -> str:
    out = ["| strategy | K | targets | all ready (s) | x one target | storage reads | NVLink GB | network GB | "
           "max one source GB |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['strategy']} | {r['k']} | {r['targets']} | {r['all_ready_s']:.2f} | {r['x_one_target']:.2f} | "
            f"{r['storage_reads']} | {r['nvlink_gb']:.1f} | {r['network_gb']:.1f} | {r['max_source_sent_gb']:.1f} |"
            for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------- the CPU benchmark, modelled
# sidecar/lab/fanout.py: toy SMALL at TP2 = 1,053,952 bf16 params per rank; 64 KiB slots, 4 slots; each READ waits
# 30 ms (failpoint before_read=sleep:0.03) so a reader moves ~64 KiB per 30 ms; one machine (one node), its memory
# bandwidth far above what the readers take; MX_POLL_INTERVAL 0.1, MX_STALL_TIMEOUT 20; carousel is
# MX_FANOUT_READERS=8 there.
CPU = Params(rank_bytes=2 * 1_053_952, chunk_bytes=64 * 1024, slots=4, stage_copy_Bps=1e9,
             same_node_read_Bps=64 * 1024 / 0.03, source_egress_Bps=1e15, cross_node_Bps=1e15, gpus_per_node=1 << 20,
             storage_Bps=100e6, stall_timeout_s=20.0, poll_s=0.1)
CPU_STRATEGIES = [STAR, Strategy("carousel", 8, True), tree(2)]


def measured_cpu(path: Path) -> dict[tuple[str, int], float]:
    """The staged rows of a fan-out benchmark's JSON (sidecar/lab/fanout.py, same variants): (variant, N) -> s."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {(r["variant"], int(r["targets"])): float(r["all_ready_s"]) for r in rows if r["mode"] == "staged"}


def cpu_check(sizes: tuple[int, ...] = (1, 2, 4, 8), seed: int = 1,
              measured: dict[tuple[str, int], float] | None = None) -> list[dict[str, object]]:
    rows = sweep(CPU, CPU_STRATEGIES, sizes, seed)
    measured = measured or {}
    for r in rows:
        key = (str(r["strategy"]), int(str(r["targets"])))
        ms, one = measured.get(key), measured.get((key[0], 1))
        r["measured_s"] = ms
        r["measured_x"] = round(ms / one, 2) if ms and one else None
    return rows


def cpu_table(rows: list[dict[str, object]]) -> str:
    out = ["| strategy | K | targets | model all ready (s) | model x one | measured (s) | measured x one |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, mx = r["measured_s"], r["measured_x"]
        out.append(f"| {r['strategy']} | {r['k']} | {r['targets']} | {r['all_ready_s']:.2f} | "
                   f"{r['x_one_target']:.2f} | {'-' if ms is None else f'{ms:.2f}'} | {'-' if mx is None else mx} |")
    out.append("\nBoth ratios are to N=1 of the same strategy; measured: the staged rows of --measured.")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4,16,64,256")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tree-k", default="1,2,4,8", help="the tree's readers per pass, one variant each")
    ap.add_argument("--cpu", action="store_true", help="only the CPU benchmark's profile")
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--measured", default="docs/benchmarks/fanout.json",
                    help="the CPU fan-out benchmark's JSON to set beside the CPU profile (skipped if absent)")
    args = ap.parse_args()
    t0 = time.monotonic()
    out: dict[str, object] = {"seed": args.seed}
    if not args.cpu:
        p = Params()
        ks = tuple(int(k) for k in args.tree_k.split(","))
        rows = sweep(p, default_strategies(ks), tuple(int(n) for n in args.sizes.split(",")), args.seed)
        print(table(rows), "\n")
        out |= {"params": asdict(p), "rows": rows}
    cpu = cpu_check(seed=args.seed, measured=measured_cpu(Path(args.measured)))
    print("CPU benchmark profile (sidecar/lab/fanout.py, staged):\n" + cpu_table(cpu))
    out |= {"cpu_params": asdict(CPU), "cpu_rows": cpu}
    print(f"\n(simulated in {time.monotonic() - t0:.1f}s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
