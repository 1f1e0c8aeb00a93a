"""rpp.spt: Self-Prompt Tuning (SPT) on timm ViTs: prototype-initialised visual prompts, a training CLI and a report.

``init_prompts`` builds prompts from the downstream data's tokens (see :mod:`rpp.spt.prototypes`); the prompts
themselves are added to the model by :func:`rpp_kernels.integrations.timm.add_prompts`; ``python -m rpp.spt`` trains
prompts + a linear head as SPT's code does (see :mod:`rpp.spt.train`; recipes ``--recipe spt-...``), and
``python -m rpp.spt.report RUNS...`` prints FGVC and VTAB-1k group means beside SPT's published ones.
"""

from rpp.spt.prototypes import LAYER0_SOURCES, MODES, PrototypeBuilder, init_prompts, kmeans, pool_windows

__all__ = ["LAYER0_SOURCES", "MODES", "PrototypeBuilder", "init_prompts", "kmeans", "pool_windows"]
