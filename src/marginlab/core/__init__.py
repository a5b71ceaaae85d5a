"""The mathematics that needs no network: the one :class:`~marginlab.core.norms.Norm`, exact margins of linear
classifiers in R^d (:mod:`~marginlab.core.linear`) and in the box [0,1]^d
(:mod:`~marginlab.core.linear_box`), the hard-margin SVM, logistic regression by gradient descent,
margin statistics and paired intervals (:mod:`~marginlab.core.stats`) and batched prediction.
May import :mod:`marginlab.base` only.
"""
