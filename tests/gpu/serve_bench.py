"""Time to serve with vLLM's compile caches (issue 20): time to first token, without enforce_eager, for
  cold          plain vLLM, an empty cache root (storage weights, compiles everything)
  warm          plain vLLM on the root a cold run just filled (the floor: nothing is compiled, weights from storage)
  tgt_weights   a target with its sidecar: weights from a live source, an empty root, no cache exchange
  tgt_caches    a target with its sidecar: weights and the source's compile cache, installed before vLLM compiles
alternated round after round in one call, on one GPU (or the CPU with --cpu). One source replica (sidecar on,
cache published once it serves) stays up for the whole run. Every start is a fresh engine process; every root is
fresh except warm's. Writes $OUT/gpu_serve.json: every start (first token, ready, the sidecar's phase=serve split,
vLLM's own compile / graph-capture / init figures, hit or miss by the sidecar and by vLLM's log), and medians.

    python3 tests/gpu/serve_bench.py [--deadline 540] [--rounds 3] [--hidden 1024 --layers 8] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.gpu.vllm_gpu_check import VLLM_ENV  # noqa: E402

KINDS = ("cold", "warm", "tgt_weights", "tgt_caches")
# vLLM's own account of a start (0.26 GPU; the CPU build prints a subset). Each is (name, pattern with one number).
VLLM_FIGURES = [
    ("model_load_s", r"Model loading took .*? ([\d.]+) s(?:ec|econds)?\b"),
    ("dynamo_s", r"Dynamo bytecode transform time: ([\d.]+) s"),
    ("compile_total_s", r"torch\.compile takes ([\d.]+) s in total"),
    ("graph_load_s", r"Directly load the compiled graph.*?took ([\d.]+) s"),
    ("graph_capture_s", r"Graph capturing finished in ([\d.]+) sec"),
    ("profile_s", r"Memory profiling takes ([\d.]+) seconds"),
    ("init_engine_s", r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
]
SERVE = re.compile(r"phase=serve ([\d.]+)s: .*\((.*)\)")


def _vllm_figures(lines: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pat in VLLM_FIGURES:
        vals = [float(m.group(1)) for ln in lines if (m := re.search(pat, ln))]
        if vals:
            out[name] = round(sum(vals), 3)
    return out


STAMP = re.compile(r"(?:INFO|WARNING|DEBUG) (\d\d-\d\d \d\d:\d\d:\d\d) ")
# Marks in vLLM's log between which a phase of its start lies (1 s resolution: vLLM logs whole seconds).
MARKS = [("plugins", r"load formats mx-sidecar"), ("args", r"non-default args"),
         ("architecture", r"Resolved architecture"), ("engine_core", r"Initializing a V1 LLM engine"),
         ("loading", r"Loading model from scratch|Starting to load model"),
         ("loaded", r"Model loading took"), ("init_done", r"init engine \(profile")]


def _vllm_timeline(lines: list[str], started: float) -> dict[str, float]:
    """Seconds from the process start to each mark (the model-class inspection lies between args and
    architecture: vLLM runs it in a subprocess unless modelinfos/ has it)."""
    year = time.localtime(started).tm_year
    out: dict[str, float] = {}
    for name, pat in MARKS:
        for ln in lines:
            if re.search(pat, ln) and (m := STAMP.search(ln)):
                t = time.mktime(time.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S"))
                out[name] = round(t - started, 1)
                break
    return out


def _vllm_said(lines: list[str]) -> str:
    text = "\n".join(lines)
    loaded = "Directly load the compiled graph" in text or "Directly load AOT compilation" in text
    compiled = "Compiling a graph" in text or "Compiling model again due to a load failure" in text
    return "compiled" if compiled else ("loaded" if loaded else "none")


def _tree(root: Path) -> dict[str, float]:
    """MB per top-level entry of a cache root (what vLLM wrote where; .mx-exchange left out)."""
    out: dict[str, float] = {}
    if not root.is_dir():
        return out
    for top in sorted(root.iterdir()):
        if top.name == ".mx-exchange":
            continue
        files = [p for p in top.rglob("*") if p.is_file()] if top.is_dir() else [top]
        out[top.name] = round(sum(p.stat().st_size for p in files) / 1e6, 2)
    return out


class Bench:
    def __init__(self, a: argparse.Namespace, work: Path, ckpt: Path, redis_url: str, key: Path) -> None:
        self.a, self.work, self.ckpt, self.redis_url, self.key = a, work, ckpt, redis_url, key
        self.n = 0
        self.eargs = ["--compile", "--first-token", "--no-digests"]
        if not a.cpu:
            self.eargs += ["--gpu-memory-utilization", a.gpu_memory_utilization]

    def _root(self, name: str) -> Path:
        root = self.work / name / "cache"
        root.mkdir(parents=True)
        return root

    def copy_root(self, src: Path) -> Path:
        """A warm local cache without a cold run of its own: what the source compiled, minus the sidecar's files."""
        import shutil

        self.n += 1
        dst = self.work / f"warm-copy-{self.n}" / "cache"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".mx-exchange", "mx-cache-key"))
        return dst

    def start(self, name: str, root: Path, sidecar: bool, cache: bool, load_format: str) -> Any:
        from tests.vllm.replica import VllmReplica

        ready = self.work / name / "ready"
        ready.parent.mkdir(parents=True, exist_ok=True)
        # Inductor's and Triton's own caches inside the root: vLLM redirects them there for its compiled graphs, and
        # a default under ~ or /tmp would make every "cold" start after the first one warm.
        env = {"VLLM_CACHE_ROOT": str(root), "TRITON_CACHE_DIR": str(root / "triton"),
               "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "MX_AUTH_KEY_FILE": str(self.key),
               "MX_ENGINE_READY_URL": f"file://{ready}", "MX_COMPILE_CACHE_SETTLE": "3",
               "MX_HEARTBEAT_INTERVAL": "1", "MX_SOURCE_TTL": "5"}
        if cache:
            env["MX_COMPILE_CACHE_DIR"] = str(root)
        return VllmReplica(name, self.ckpt, self.work, self.redis_url, extra_env=env, sidecar=sidecar,
                           load_format=load_format, engine_args=[*self.eargs, "--ready-file", str(ready)])

    def run_one(self, kind: str, root: Path | None = None) -> tuple[dict[str, Any], Path]:
        self.n += 1
        name = f"{kind}-{self.n}"
        root = root or self._root(name)
        sidecar = kind.startswith("tgt")
        started = time.time()
        rep = self.start(name, root, sidecar=sidecar, cache=kind == "tgt_caches",
                         load_format="mx-sidecar" if sidecar else "auto")
        row: dict[str, Any] = {"kind": kind, "name": name}
        try:
            res = rep.result(self.a.timeout)
            row.update(first_token_s=res.get("first_token_s"), ready_s=res["ready_s"], tokens=res["tokens"])
            if rep.sidecar is not None:
                sm = SERVE.search(rep.sidecar.wait_for(r"phase=serve .*", 60).group(0))
                if sm:
                    row["sidecar_serve_s"] = float(sm.group(1))
                    row["sidecar_phases"] = {k: float(v.rstrip("s")) for k, v in
                                             (part.strip().split(" ", 1) for part in sm.group(2).split(","))}
            if kind == "tgt_caches" and rep.sidecar is not None:
                verdict = rep.sidecar.wait_for(r"phase=compile_cache [\d.]+s: (\w+).*", 60)
                row["cache_verdict"] = verdict.group(0).split("phase=", 1)[1][:300]
                row["sidecar_said"] = (rep.sidecar.wait_for(r"compile cache: (hit|miss)", 30).group(1)
                                       if verdict.group(1) == "installed" else verdict.group(1))
            if rep.sidecar is not None:
                row["sidecar_phases_log"] = [ln.split("phase=", 1)[1][:160] for ln in rep.sidecar.lines
                                             if "phase=" in ln][-14:]
            row["vllm"] = _vllm_figures(rep.engine.lines)
            row["vllm_said"] = _vllm_said(rep.engine.lines)
            row["timeline"] = _vllm_timeline(rep.engine.lines, started)
            row["root_mb"] = _tree(root)
        except Exception as e:
            row["error"] = repr(e)[-800:]
            row["engine_tail"] = rep.engine.lines[-40:]
            if rep.sidecar is not None:
                row["sidecar_tail"] = rep.sidecar.lines[-30:]
        finally:
            rep.stop()
        print("START", json.dumps({k: v for k, v in row.items() if k not in ("tokens", "engine_tail")}), flush=True)
        return row, root


def _medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        ok = [r for r in rows if r["kind"] == kind and r.get("first_token_s") is not None]
        if not ok:
            continue
        med: dict[str, Any] = {"n": len(ok),
                               "first_token_s": round(statistics.median(r["first_token_s"] for r in ok), 2),
                               "ready_s": round(statistics.median(r["ready_s"] for r in ok), 2)}
        for field, name, digits in (("vllm", "vllm_{}", 2), ("sidecar_phases", "phase_{}_s", 2),
                                    ("timeline", "at_{}_s", 1)):
            for k in {k for r in ok for k in r.get(field, {})}:
                vals = [r[field][k] for r in ok if k in r.get(field, {})]
                med[name.format(k)] = round(statistics.median(vals), digits)
        out[kind] = med
    floor = out.get("warm", {}).get("first_token_s")
    if floor:
        for med in out.values():
            med["x_warm"] = round(med["first_token_s"] / floor, 2)
    return out


def merge(paths: list[str], out: str) -> None:
    """Several calls' gpu_serve.json (one machine each, named in "calls") -> one file with medians over all rows."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = [{**r, "call": i} for i, run in enumerate(runs) for r in run["rows"]]
    merged = {**{k: v for k, v in runs[0].items() if k not in ("rows", "medians", "source", "wall_s")},
              "calls": [{k: run.get(k) for k in ("device", "date", "wall_s", "source")} for run in runs],
              "rows": rows, "medians": _medians(rows)}
    Path(out).write_text(json.dumps(merged, indent=1) + "\n")
    print(json.dumps(merged["medians"], indent=1))


def table(path: str) -> str:
    """The medians of a gpu_serve.json as the markdown table of docs/BENCHMARKS.md."""
    run = json.loads(Path(path).read_text())
    lines = ["| start | n | first token (s) | x warm | cache ahead | weights | cache install | "
             "engine (release to ready) | vLLM init engine | vLLM model load |", "|---" * 10 + "|"]
    for kind, m in run["medians"].items():
        def cell(k: str, m: dict[str, Any] = m) -> str:
            return f"{m[k]:.2f}" if k in m else "-"
        lines.append(f"| {kind} | {m['n']} | {m['first_token_s']:.2f} | {m.get('x_warm', 0):.2f}x | "
                     f"{cell('phase_cache_ahead_s')} | {cell('phase_weights_s')} | {cell('phase_cache_install_s')} | "
                     f"{cell('phase_engine_s')} | "
                     f"{cell('vllm_init_engine_s')} | {cell('vllm_model_load_s')} |")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["table"]:  # serve_bench.py table FILE.json
        print(table(sys.argv[2]))
        return 0
    if sys.argv[1:2] == ["merge"]:  # serve_bench.py merge OUT.json IN.json [IN.json ...]
        merge(sys.argv[3:], sys.argv[2])
        return 0
    from sidecar.lab.embedded_redis import EmbeddedRedis
    from tests.vllm.tiny_llama import make_tiny_llama

    p = argparse.ArgumentParser()
    p.add_argument("--deadline", type=float, default=540, help="no new round starts after this many seconds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kinds", default=",".join(KINDS), help="the starts of a round, in order (warm without cold: "
                   "on a copy of the source's root)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--gpu-memory-utilization", default="0.3")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--cpu", action="store_true", help="vLLM's CPU build (a check of this script, not a figure)")
    a = p.parse_args()
    t0 = time.monotonic()
    os.environ.update({k: v for k, v in VLLM_ENV.items() if k not in os.environ})
    out_dir = Path(os.environ.get("OUT", ".gpu-out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mx-serve-"))
    key = work / "deployment.key"
    key.write_bytes(secrets.token_bytes(32))
    os.chmod(key, 0o600)
    ckpt = make_tiny_llama(work / "model", "bfloat16", hidden=a.hidden, layers=a.layers, intermediate=a.hidden * 2,
                           heads=max(1, a.hidden // 128), kv_heads=max(1, a.hidden // 256), vocab=32000)
    import vllm

    rep: dict[str, Any] = {"what": "time to first token with and without compile caches (issue 20)",
                           "date": time.strftime("%Y-%m-%d"), "vllm": vllm.__version__,
                           "model": {"hidden": a.hidden, "layers": a.layers, "dtype": "bfloat16", "vocab": 32000},
                           "enforce_eager": False, "rows": []}
    try:
        import torch

        rep["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # the figures are still worth having
        rep["device"] = f"unknown ({e})"
    rows: list[dict[str, Any]] = rep["rows"]
    with EmbeddedRedis() as redis:
        bench = Bench(a, work, ckpt, redis.url, key)
        src_root = bench._root("source")
        src = bench.start("source", src_root, sidecar=True, cache=True, load_format="mx-sidecar")
        try:
            s = src.result(a.timeout)
            assert src.sidecar is not None
            src.sidecar.wait_for(r"serving as a source", 120)
            src.sidecar.wait_for(r"phase=compile_cache_publish", 180)
            rep["source"] = {"first_token_s": s.get("first_token_s"), "ready_s": s["ready_s"],
                             "root_mb": _tree(src_root), "vllm": _vllm_figures(src.engine.lines),
                             "publish": [ln for ln in src.sidecar.lines if "compile_cache_publish" in ln][-1:]}
            print("SOURCE", json.dumps(rep["source"]), flush=True)
            tokens = s["tokens"]
            kinds = [k for k in a.kinds.split(",") if k]
            for rnd in range(a.rounds):
                if rnd and time.monotonic() - t0 > a.deadline:
                    break
                made = []
                warm_root = None
                if "cold" in kinds:
                    cold, warm_root = bench.run_one("cold")
                    made.append(cold)
                for kind in [k for k in kinds if k != "cold"]:
                    if kind == "warm" and warm_root is None:  # no cold run this round: a copy of the source's root
                        warm_root = bench.copy_root(src_root)
                    row, _ = bench.run_one(kind, warm_root if kind == "warm" else None)
                    made.append(row)
                    (out_dir / "gpu_serve.json").write_text(json.dumps({**rep, "partial": rows + made}, indent=1))
                for r in made:
                    r["round"] = rnd
                    r["tokens_equal_source"] = r.get("tokens") == tokens
                    r.pop("tokens", None)
                rows.extend(made)
                (out_dir / "gpu_serve.json").write_text(json.dumps({**rep, "medians": _medians(rows)}, indent=1))
        except Exception as e:
            rep["error"] = repr(e)[-1500:]
            rep["source_tail"] = src.engine.lines[-40:] + (src.sidecar.lines[-30:] if src.sidecar else [])
        finally:
            src.stop()
    rep["medians"] = _medians(rows)
    rep["wall_s"] = round(time.monotonic() - t0, 1)
    (out_dir / "gpu_serve.json").write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep["medians"], indent=1))
    ok = (not rep.get("error") and all(r.get("tokens_equal_source") for r in rows) and bool(rows)
          and all(r.get("sidecar_said") == "hit" for r in rows if r["kind"] == "tgt_caches"))
    print("SERVE BENCH", "OK" if ok else "FAILED", f"({len(rows)} starts, {rep['wall_s']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
