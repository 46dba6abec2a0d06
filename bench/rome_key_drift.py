"""Diagnostic: does a ROME edit keep firing while an MDM denoises a multi-token answer?

A rank-one update ΔW = (v* − W k*) uᵀ / (uᵀk*) adds (uᵀk / uᵀk*) · (v* − W k*) at any
position whose MLP key is k.  It was fitted at k* (the keyed position in the all-masked
target state).  This script edits each of ``--n`` world facts whose new target has ≥ 4
tokens, walks the edited model's own denoising trajectory (one token revealed per step),
reads the key at the same position in each state and prints the mean firing ratio
uᵀk_t / uᵀk* per reveal step, plus how many new targets greedy denoising produces.

    python bench/rome_key_drift.py                      # builtin:mdm, 12 facts
    python bench/rome_key_drift.py --model builtin:dream --target-states partial
    python bench/rome_key_drift.py --target-states trajectory --key-states partial   # the key correction
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:mdm")
    parser.add_argument("--n", type=int, default=12, help="facts (new target ≥ 4 tokens)")
    parser.add_argument("--target-states", default="final", help="final | partial | trajectory (value fitting)")
    parser.add_argument("--key-states", default="final", help="final | partial | trajectory (states k* is averaged over)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dlmedit import load_model
    from dlmedit.data.loaders import load_dataset
    from dlmedit.edit.editor import get_editor
    from dlmedit.edit.keys import KeyedState, read_at_subject
    from dlmedit.evaluate.measure import target_length

    lm = load_model(args.model)
    records = [r for r in load_dataset("world") if target_length(lm, r) >= 4][: args.n]
    editor = get_editor("rome", lm, seed=args.seed, target_states=args.target_states, key_states=args.key_states)
    ratios: dict[int, list[float]] = {}
    exact = 0
    for record in records:
        req = record.request
        delta = editor.compute([req])
        solve = editor.last_solves[0]
        u, k_star, layer = solve["u"].float(), solve["k_star"].float(), solve["layer"]
        context = editor.contexts([req])[0][0]
        p_ids, t_ids = lm.encode_pair(req.prompt, req.target_new)
        with delta.apply(lm.module):
            states = lm.paradigm.target_states(lm, p_ids, t_ids, "trajectory")
            rows = [KeyedState(state, context.subject_index) for state in states]
            keys = read_at_subject(lm, rows, [(layer, "mlp_key")], 64)[(layer, "mlp_key")]
            window = getattr(lm.paradigm, "answer_window", None) or len(t_ids) + 1
            exact += lm.generate([req.prompt], window).texts[0].strip() == req.target_new.strip()
        for step, key in enumerate(keys):
            ratios.setdefault(step, []).append(float(u @ key.float() / (u @ k_star)))
    print(f"{args.model}, ROME: value fitted on {args.target_states!r} states, key averaged over {args.key_states!r} "
          f"states, {len(records)} new targets of ≥ 4 tokens")
    print(f"greedy denoising produced the new target: {exact} / {len(records)}")
    print("revealed tokens | mean uᵀk/uᵀk* | min | n")
    for step in sorted(ratios):
        v = np.array(ratios[step])
        print(f"{step:>15} | {v.mean():>13.3f} | {v.min():>6.3f} | {len(v)}")


if __name__ == "__main__":
    main()
