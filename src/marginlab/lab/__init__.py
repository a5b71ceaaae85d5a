"""Run directories and running experiments into them.

Every file and folder name of a run directory (:mod:`~marginlab.lab.names`), every reader of those files
(:mod:`~marginlab.lab.readers`), the :class:`~marginlab.lab.runs.RunDir` handle that writes them, the
margins table of ``marginlab margins``, provenance, the runner that decides run / resume / skip
(:mod:`~marginlab.lab.runner`, which knows experiments only through its table) and the worker processes
that sweeps and comparisons share. May import robustness, estimators, bounds, nets, core, data and base.
"""
