"""The ground floor: what every other layer uses and nothing of marginlab's own.

Errors (:mod:`~marginlab.base.errors`), registries, atomic file output (:mod:`~marginlab.base.fsio`), logging,
seeding, configs and the one ``KEY=VALUE`` parser (:mod:`~marginlab.base.config`), the one device choice,
data-parallel plumbing, the checks on user inputs, flat text tables, and the table of deprecated import paths.
Modules here import only the standard library, numpy and torch, and each other.
"""
