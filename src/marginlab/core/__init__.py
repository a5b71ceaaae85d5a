"""The mathematics that needs no network: the one :class:`~marginlab.core.norms.Norm`, exact margins of linear
classifiers (:mod:`~marginlab.core.linear`), the hard-margin SVM, logistic regression by gradient descent,
margin statistics and paired intervals (:mod:`~marginlab.core.stats`) and batched prediction.
May import :mod:`marginlab.base` only.
"""
