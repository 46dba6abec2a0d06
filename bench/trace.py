"""Benchmark: batched causal tracing vs the per-cell reference, and capital-fact traces on SmolLM2.

Usage::

    python bench/trace.py                     # one fact on SmolLM2 and on the MDM twin (or a tiny MDM)
    python bench/trace.py --capitals 20       # also trace 20 countryinfo capital facts on SmolLM2
    python bench/trace.py --models mdm --threads 2

For each model the same plan (same states, noise draw, readout) is traced by
`dlmedit.trace.reference.reference_run_plan` (one forward per cell, ROME's loop) and
by `dlmedit.trace.core.run_plan` in the same process; the table reports wall time,
speed-up, forward-equivalents (layer-rows processed / layer-rows of one forward of
states × samples rows; the unembedding is not counted) and the largest difference between the two results.
Wall time suffers from other processes on a shared machine; process CPU time (with one
torch thread) is the steadier measure, so both are shown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlmedit import load_model  # noqa: E402
from dlmedit.trace.core import run_plan  # noqa: E402
from dlmedit.trace.plan import build_plan  # noqa: E402
from dlmedit.trace.reference import reference_run_plan  # noqa: E402


def _mdm_model():
    """The MDM twin if it has been trained, else the tiny random LLaDA used by the tests."""
    if (ROOT / "dlmedit" / "builtin" / "mdm" / "config.json").exists():
        from dlmedit.data.loaders import load_dataset

        rec = load_dataset("world", limit=1)[0].request
        return "builtin:mdm", load_model("builtin:mdm"), (rec.prompt, rec.subject, rec.target_true)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_checkpoint

    path = write_checkpoint("llada", Path(tempfile.mkdtemp()) / "llada")
    return "tiny llada (MDM twin not trained yet)", load_model(str(path)), (
        "the capital of france is", "france", "paris")


def bench_one(name: str, lm, fact: tuple[str, str, str], samples: int, window: int) -> dict:
    prompt, subject, target = fact
    plan = build_plan(lm, prompt, subject, target, samples=samples, window=window)
    K, S, L = len(plan.states), plan.samples, lm.n_layers
    t0, c0 = time.perf_counter(), time.process_time()
    fast = run_plan(lm, plan)
    t_fast, c_fast = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    ref = reference_run_plan(lm, plan)
    t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0
    diff = max(float(np.abs(fast.scores - ref.scores).max()), float(np.abs(fast.clean - ref.clean).max()),
               float(np.abs(fast.corrupted - ref.corrupted).max()))
    return {
        "model": name, "fact": f"{prompt!r} → {target!r}", "T": plan.n_columns, "L": L, "cells": fast.stats.cells,
        "noop": fast.stats.noop_cells + fast.stats.duplicate_cells, "t_ref": t_ref, "t_fast": t_fast,
        "ratio": t_ref / t_fast, "c_ref": c_ref, "c_fast": c_fast, "cpu_ratio": c_ref / c_fast,
        "fe_ref": ref.stats.forward_equivalents(L, K * S), "fe_fast": fast.stats.forward_equivalents(L, K * S),
        "fwd_ref": ref.stats.forwards, "fwd_fast": fast.stats.forwards, "diff": diff,
    }


def capitals(lm, n: int, samples: int, window: int, seed: int = 0) -> None:
    """Trace n capital facts (seeded sample of countryinfo countries) and print where the MLP effect peaks."""
    from dlmedit.data.capitals import capital_pairs, capital_records
    from dlmedit.trace import TraceConfig, average_traces, trace_facts

    records = capital_records(capital_pairs(seed), n, seed, n_neighbours=0)
    facts = [(r.request.prompt, r.request.subject, r.request.target_true) for r in records]
    t0 = time.perf_counter()
    with tqdm(total=len(facts), desc="capital facts") as bar:
        traces, failures = trace_facts(lm, facts, TraceConfig(samples=samples, window=window, seed=seed),
                                       progress=bar.update)
    console = Console(width=160)
    console.print(f"traced {len(traces)} capital facts in {time.perf_counter() - t0:.0f} s "
                  f"({sum(t.correct for t in traces)} predicted correctly; {len(failures)} failed)")
    for label, subset in (("all", traces), ("correct only", [t for t in traces if t.correct])):
        if not subset:
            continue
        avg = average_traces(subset)
        table = Table(title=f"SmolLM2 capitals, {label} (n={len(subset)}): mean indirect effect peak")
        for col in ("site", "layer", "token category", "mean IE"):
            table.add_column(col)
        for site, peak in avg["peak"].items():
            table.add_row(site, str(peak["layer"]), str(peak["category"]), f"{peak['effect']:.4f}")
        console.print(table)
        mlp = avg["effect"]["mlp_out"]
        last = mlp[3]  # last subject token
        console.print(f"  MLP at the last subject token: peak layer {int(np.nanargmax(last))} "
                      f"(IE {np.nanmax(last):.4f}); per-layer: {np.round(last, 4).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,mdm", help="comma list of smollm2, mdm")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep low while twins train)")
    parser.add_argument("--capitals", type=int, default=0, help="also trace N countryinfo capital facts on SmolLM2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    smol = None
    for which in args.models.split(","):
        if which == "smollm2":
            smol = load_model("smollm2")
            rows.append(bench_one("smollm2", smol, ("The capital of France is", "France", "Paris"),
                                  args.samples, args.window))
        elif which == "mdm":
            name, lm, fact = _mdm_model()
            rows.append(bench_one(name, lm, fact, args.samples, args.window))
        else:
            raise SystemExit(f"unknown model {which!r}; use smollm2, mdm")
    table = Table(title=f"causal tracing: per-cell reference vs batched ({args.samples} samples, "
                  f"window {args.window}, {args.threads} thread(s))")
    for col in ("model", "fact", "tokens×layers", "cells (skipped)", "reference s (cpu)", "batched s (cpu)",
                "speed-up wall", "speed-up cpu", "fwd-eq ref", "fwd-eq batched", "forwards ref/batched", "max |diff|"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["fact"], f"{r['T']}×{r['L']}", f"{r['cells']} ({r['noop']})",
                      f"{r['t_ref']:.1f} ({r['c_ref']:.1f})", f"{r['t_fast']:.2f} ({r['c_fast']:.2f})",
                      f"{r['ratio']:.1f}×", f"{r['cpu_ratio']:.1f}×", f"{r['fe_ref']:.0f}", f"{r['fe_fast']:.1f}",
                      f"{r['fwd_ref']}/{r['fwd_fast']}", f"{r['diff']:.1e}")
    Console(width=220).print(table)
    if args.capitals:
        capitals(smol or load_model("smollm2"), args.capitals, args.samples, args.window)


if __name__ == "__main__":
    main()
