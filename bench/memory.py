"""Benchmark of the residual edit memory: inference overhead, insertion cost, peak memory.

    python bench/memory.py                          # built-in MDM twin if present, else a tiny random LLaDA
    python bench/memory.py --model builtin:arm --counts 1,10,100,400 --json out.json

Measures, in one process on the same model:

1. **Overhead per forward** of an attached memory (n facts, default site/layer) versus the
   detached model: median wall time of a batched forward, attached and detached runs
   interleaved (so background load hits both alike); ratio − 1 is the overhead.  Also with
   ``q`` = width/8 (the top-q sparsification costs a ``topk`` per position).  Target ≤ 5 %.
2. **Insertion time** for N = 1, 10, 100, 400 facts: keys+deltas (batched forwards and one
   backward), one batched ridge update, and N one-at-a-time Woodbury updates (per-fact
   cost should not grow with N).
3. **Peak memory** of building the memory vs training GA / NPO / RMU on the same forget
   facts, each in a fresh subprocess (highest sampled RSS minus the RSS after loading the
   model), so allocator caches of one method cannot hide another's peak.

Background CPU load (``os.getloadavg``) is printed: the numbers are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import load_bench_model  # bench/ is on sys.path when a script here runs


def _fact_pool(lm, n: int):
    """QA items to insert: the built-in world's retain + forget rows, else synthetic tiny-vocabulary facts."""
    from dlmedit.unlearn.evaluate import EvalSets, QAItem

    try:
        sets = EvalSets.from_specs("world:forget10", "world:retain", None, n_retain=0)
        pool = [*sets.forget, *sets.retain]
        lm.encode_pair(pool[0].prompt, pool[0].answer)
        if len(pool) >= n and lm.tokenizer.unk_token_id not in lm.encode_prompt(pool[0].prompt):
            return pool[:n]
    except Exception:  # fall back to synthetic facts on any model/world mismatch
        pass
    subjects = "alpha beta gamma delta one two three four five six".split()
    templates = ("{} was born in", "{} works as a", "the capital of {} is", "{} speaks")
    answers = "paris london rome berlin red blue green teacher doctor painter".split()
    items = [QAItem(t.format(s), a, s) for s in subjects for t in templates for a in answers]
    return items[:n]


def _time_forward(lm, ids, mask, repeats: int, memory=None) -> list[float]:
    times = []
    for _ in range(repeats):
        if memory is not None:
            handle = memory.attach()
        t0 = time.perf_counter()
        with torch.no_grad():
            lm.logits(ids, mask)
        times.append(time.perf_counter() - t0)
        if memory is not None:
            handle.detach()
    return times


def overhead(lm, pool, n_facts: int, repeats: int, batch: int) -> dict:
    from dlmedit.memory.residual import ResidualMemory
    from dlmedit.unlearn.experiments import memory_facts

    memory = ResidualMemory(lm, lam=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory.insert(memory_facts(pool[:n_facts]))
    states = [lm.paradigm.final_state(*lm.encode_pair(it.prompt, it.answer)) for it in pool[:batch]]
    layout = lm.paradigm.layout(lm, states).to(lm.device)
    ids, mask = layout.input_ids, layout.attention_mask
    _time_forward(lm, ids, mask, 3)
    _time_forward(lm, ids, mask, 3, memory)
    out = {"n_facts": n_facts, "batch": list(ids.shape), "layer": memory.layer, "site": memory.site,
           "width": memory.width}
    for label, q in (("full", None), ("q=width/8", max(1, memory.width // 8))):
        memory.q = q
        off, on = [], []
        for _ in range(repeats):  # interleaved so load spikes hit both
            off += _time_forward(lm, ids, mask, 1)
            on += _time_forward(lm, ids, mask, 1, memory)
        m_off, m_on = statistics.median(off), statistics.median(on)
        out[label] = {"detached_ms": m_off * 1e3, "attached_ms": m_on * 1e3, "overhead": m_on / m_off - 1}
    return out


def insertion(lm, pool, counts: list[int]) -> list[dict]:
    from dlmedit.memory.residual import ResidualMemory
    from dlmedit.unlearn.experiments import memory_facts, time_insertion

    rows = []
    for n in counts:
        memory = ResidualMemory(lm, lam=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time_insertion(memory, memory_facts(pool[:n]))
        rows.append({"n_facts": n, "targets_s": t["targets_s"], "batch_update_s": t["solve_s"],
                     "incremental_s": t["incremental_s"], "targets_ms_per_fact": t["targets_s"] / n * 1e3,
                     "incremental_ms_per_fact": t["incremental_s"] / n * 1e3,
                     "incremental_vs_batch_max_abs": t["incremental_vs_batch_max_abs"]})
    return rows


def _peak_one(model: str | None, method: str, n_forget: int, steps: int) -> dict:
    """Run one method in this (fresh) process; peak of the sampled RSS relative to the RSS after loading.

    (``ru_maxrss`` is useless here: loading the checkpoint peaks higher than any method.)
    """
    from dlmedit.unlearn.baselines import PeakMemory, TrainConfig, run_training_baseline
    from dlmedit.unlearn.experiments import MemorySettings, build_memory

    lm, _ = load_bench_model(model)
    pool = _fact_pool(lm, 2 * n_forget)
    forget, retain = pool[:n_forget], pool[n_forget : 2 * n_forget]
    lm.fingerprint()
    t0 = time.perf_counter()
    with PeakMemory(interval=0.002) as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "memory":
            build_memory(lm, forget, MemorySettings(key_stats="none"))
        else:
            run_training_baseline(lm, method, forget, retain, TrainConfig(steps=steps))
    wall = time.perf_counter() - t0
    return {"method": method, "wall_s": wall, "rss_after_load_mb": mem.start / 2**20, "peak_rss_mb": mem.peak_mb,
            "peak_increase_mb": mem.increase_mb}


def peak_memory(model: str | None, n_forget: int, steps: int, threads: int) -> list[dict]:
    """Each method in its own subprocess, so allocator caches of one cannot hide another's peak."""
    import subprocess

    rows = []
    for method in ("memory", "ga", "npo", "rmu"):
        cmd = [sys.executable, __file__, "--peak-one", method, "--forget", str(n_forget), "--steps", str(steps),
               "--threads", str(threads)]
        if model is not None:
            cmd += ["--model", model]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--counts", default="1,10,100,400")
    parser.add_argument("--overhead-facts", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--forget", type=int, default=50, help="facts for the peak-memory comparison")
    parser.add_argument("--steps", type=int, default=10, help="training steps of the baselines in the memory comparison")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--peak-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_one:
        print(json.dumps(_peak_one(args.model, args.peak_one, args.forget, args.steps)))
        return
    counts = [int(c) for c in args.counts.split(",")]
    lm, name = load_bench_model(args.model)
    pool = _fact_pool(lm, max(max(counts), 2 * args.forget, args.batch, args.overhead_facts))
    report = {"model": name, "threads": args.threads, "load_avg_start": os.getloadavg()}
    print(f"model: {name}  ({lm!r}); load average {report['load_avg_start']}")
    report["overhead"] = ov = overhead(lm, pool, args.overhead_facts, args.repeats, args.batch)
    for label in ("full", "q=width/8"):
        r = ov[label]
        print(f"overhead ({label}, {ov['n_facts']} facts, batch {ov['batch']}): detached {r['detached_ms']:.2f} ms, "
              f"attached {r['attached_ms']:.2f} ms → {100 * r['overhead']:+.1f} %")
    report["insertion"] = rows = insertion(lm, pool, counts)
    print(f"{'N':>5} {'keys+deltas s':>14} {'ms/fact':>8} {'batch upd s':>12} {'incr. ms/fact':>14} {'|ΔW| inc-batch':>15}")
    for r in rows:
        print(f"{r['n_facts']:>5} {r['targets_s']:>14.3f} {r['targets_ms_per_fact']:>8.2f} {r['batch_update_s']:>12.4f} "
              f"{r['incremental_ms_per_fact']:>14.3f} {r['incremental_vs_batch_max_abs']:>15.2e}")
    report["peak_memory"] = mem = peak_memory(args.model, args.forget, args.steps, args.threads)
    for r in mem:
        print(f"{r['method']:>8}: wall {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_increase_mb']:.1f} MB over the loaded model; fresh process)")
    report["load_avg_end"] = os.getloadavg()
    print(f"load average at end {report['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
