"""Benchmark: records/s of batched vs one-by-one evaluation measurement (``dlmedit.evaluate.measure``).

Why: ``measure_records`` collects every prompt of many records into a few batched
``lm.score`` / forward / ``lm.generate`` calls.  This script measures what that buys
over measuring records one at a time, in one run, on the same records and model.

    python bench/eval.py                       # built-in MDM twin if present, else a tiny random LLaDA
    python bench/eval.py --model builtin:arm --limit 64 --no-generation

Prints a table (mode, records, seconds, records/s, speed-up) and checks that both
modes produce the same metrics.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _common import load_bench_model  # bench/ is on sys.path when a script here runs


def _same(a: dict, b: dict, tol: float = 1e-3) -> bool:
    for key, x in a.items():
        y = b.get(key)
        if (x is None) != (y is None) or (x is not None and not math.isclose(x, y, rel_tol=tol, abs_tol=tol)):
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from dlmedit.data.loaders import load_dataset
    from dlmedit.evaluate.measure import MeasureSettings, measure_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="alias or checkpoint (default builtin:mdm, else tiny llada)")
    parser.add_argument("--dataset", default="world")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--no-generation", action="store_true", help="scores and readouts only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm, label = load_bench_model(args.model)
    records = load_dataset(args.dataset, limit=args.limit)
    settings = MeasureSettings(generation=not args.no_generation)
    measure_records(lm, records[:2], settings)  # warm-up (allocations, lazy imports)

    t0 = time.perf_counter()
    batched = measure_records(lm, records, settings)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [measure_records(lm, [r], settings)[0] for r in records]
    t_single = time.perf_counter() - t0

    agree = all(_same(a.metrics, b.metrics) for a, b in zip(batched, single, strict=True))
    n = len(records)
    table = Table(title=f"measure_records on {label} ({lm.paradigm.name}), {args.dataset} ×{n}, "
                        f"generation={'on' if settings.generation else 'off'}, {args.threads} threads")
    for col in ("mode", "records", "seconds", "records/s", "speed-up"):
        table.add_column(col, justify="right")
    table.add_row("one by one", str(n), f"{t_single:.2f}", f"{n / t_single:.2f}", "1.00×")
    table.add_row("batched", str(n), f"{t_batched:.2f}", f"{n / t_batched:.2f}", f"{t_single / t_batched:.2f}×")
    console = Console()
    console.print(table)
    console.print(f"metrics identical in both modes (tolerance 1e-3): {agree}")


if __name__ == "__main__":
    main()
