"""marginlab: margins of classifiers and what they mean for adversarial robustness.

Implements Wu & Yu, "Understanding Adversarial Robustness: The Trade-off between Minimum and
Average Margin": exact and bounded margins, margin tracking during training, the average-margin
regularizer, and robustness evaluation with standard attacks.
"""

from marginlab.errors import ConfigError, DataError, MarginlabError, RunDirError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "MarginlabError", "RunDirError", "__version__"]
