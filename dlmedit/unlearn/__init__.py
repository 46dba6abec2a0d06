"""Unlearning: training-time baselines, forget/retain evaluation and the experiments comparing
them with the residual edit memory (:mod:`dlmedit.memory`).

- :mod:`dlmedit.unlearn.baselines` — GradAscent, GradDiff, NPO, RMU, activation steering;
- :mod:`dlmedit.unlearn.evaluate` — ForgetLP / RetainLP / utility / truth ratio / forget quality;
- :mod:`dlmedit.unlearn.experiments` — method runs, α sweep, sequential, scaling, ablation.
"""
