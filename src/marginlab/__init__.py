"""marginlab: margins of classifiers and what they mean for adversarial robustness.

Implements Wu & Yu, "Understanding Adversarial Robustness: The Trade-off between Minimum and
Average Margin": exact and bounded margins, margin tracking during training, the average-margin
regularizer, and robustness evaluation with standard attacks.
"""

from marginlab.base import deprecated
from marginlab.base.errors import ConfigError, DataError, MarginlabError, RunDirError

__version__ = "0.2.0"
deprecated.install()  # old module paths (0.1) keep importing, with a DeprecationWarning

__all__ = ["ConfigError", "DataError", "MarginlabError", "RunDirError", "__version__"]
