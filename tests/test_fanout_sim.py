"""The fleet burst model (sidecar/lab/fanout_sim.py): its strategies behave as the code they stand for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sidecar.lab import fanout_sim as sim
from sidecar.lab.fanout_sim import CAROUSEL, CPU, STAR, Params, simulate, tree

P = Params()
ONE_SAME_NODE = P.rank_bytes / P.same_node_read_Bps


def test_star_takes_about_n_times_one_target_while_the_queue_fits_the_stall_timeout() -> None:
    out = simulate(P, STAR, 4)  # all four on the source's node
    assert out.all_ready_s == pytest.approx(4 * ONE_SAME_NODE, rel=0.01)
    assert out.storage_reads == 1


def test_star_falls_back_to_storage_once_the_queue_exceeds_the_stall_timeout() -> None:
    out = simulate(P, STAR, 256)
    stored = [t for t in out.targets if t.from_storage]
    assert stored and out.storage_reads == 1 + len(stored)
    assert all(t.ready_at == pytest.approx(P.stall_timeout_s + P.rank_bytes / P.storage_Bps) for t in stored)
    assert all(t.received == 0 for t in stored)


def test_tree_with_two_readers_is_faster_than_star_and_reads_storage_only_for_the_root() -> None:
    star, tr = simulate(P, STAR, 64), simulate(P, tree(2), 64)
    assert tr.all_ready_s < star.all_ready_s / 2
    assert tr.storage_reads == 1


def test_finished_targets_serve_the_ones_still_waiting_in_the_tree() -> None:
    out = simulate(P, tree(1), 3)
    assert out.storage_reads == 1
    assert out.max_source_sent < 3 * P.rank_bytes  # the root did not serve all three: a finished target did


@pytest.mark.parametrize("strategy", [STAR, CAROUSEL, tree(1), tree(2), tree(8)],
                         ids=lambda s: f"{s.name}-{s.max_readers}")
def test_every_strategy_moves_rank_bytes_to_every_target_that_received(strategy: sim.Strategy) -> None:
    out = simulate(P, strategy, 64)
    received = [t for t in out.targets if not t.from_storage]
    assert all(t.ready_at is not None for t in out.targets)
    assert all(t.received == pytest.approx(P.rank_bytes) for t in received)
    assert out.nvlink_bytes + out.network_bytes == pytest.approx(len(received) * P.rank_bytes)


def test_one_pass_shares_the_sources_nvlink_egress_among_its_readers() -> None:
    out = simulate(P, CAROUSEL, 4)
    assert out.all_ready_s == pytest.approx(P.rank_bytes / (P.source_egress_Bps / 4), rel=0.01)
    assert out.max_source_sent == pytest.approx(4 * P.rank_bytes)


def test_cpu_profile_carousel_stays_near_one_target_while_star_grows_with_the_targets() -> None:
    rows = {(r["strategy"], r["targets"]): r for r in sim.cpu_check((1, 4))}

    def num(strategy: str, n: int, key: str) -> float:
        return float(str(rows[(strategy, n)][key]))

    assert num("carousel", 4, "x_one_target") < 1.5
    assert num("star", 4, "x_one_target") > 3
    assert num("star", 1, "all_ready_s") == pytest.approx(CPU.rank_bytes / CPU.same_node_read_Bps, rel=0.05)


def test_main_prints_the_table_and_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    monkeypatch.setattr(sys, "argv", ["fanout_sim", "--sizes", "1,4", "--tree-k", "2", "--json", str(out)])
    assert sim.main() == 0
    assert "| tree | 2 | 4 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {r["strategy"] for r in data["rows"]} == {"star", "carousel", "tree"} and data["cpu_rows"]
