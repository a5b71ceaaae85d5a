"""Networks and how they get here: the registry of architectures (:mod:`~marginlab.nets.models`), weights
from any checkpoint (:mod:`~marginlab.nets.weights`), model specs (:mod:`~marginlab.nets.spec`), the
user's own model code (:mod:`~marginlab.nets.usercode`), input normalisation as a first layer
(:mod:`~marginlab.nets.preprocess`) and :func:`~marginlab.nets.loading.load_model`, which puts them together.
"""
