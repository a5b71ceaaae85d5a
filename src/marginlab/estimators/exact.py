"""``exact-linear``: the closed-form margin of a multiclass linear model, over R^d or over the box.

Domain ``rd`` (the default, as before domains existed): ``m = min_{k!=y} ((w_y - w_k)·x + b_y - b_k) /
||w_y - w_k||_q`` (``marginlab.core.linear``). Domain ``box``: the exact distance within [0,1]^d, by the
closed forms of :mod:`marginlab.core.linear_box` (a sort per point and class; ``+inf`` where no image of
the box changes the prediction). In both domains: exact for every correctly classified point; for a
misclassified one the signed value of the same formula (exact for two classes; with more classes its
magnitude is a lower bound of the distance to the region of ``y``, which is a polytope).
"""

from dataclasses import dataclass

import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.core.linear import linear_margins
from marginlab.core.linear_box import linear_margins_box
from marginlab.estimators.base import Estimator, MarginKind, register
from marginlab.nets.models import MarginNet  # local import: models does not depend on estimators

# Modules that keep a model linear: they only reshape (Dropout is the identity in eval mode).
_RESHAPES = (nn.Flatten, nn.Identity, nn.Dropout)


def _reshape_only(module: nn.Module) -> bool:
    if isinstance(module, nn.Sequential):
        return all(_reshape_only(m) for m in module)
    return isinstance(module, _RESHAPES)


def linear_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(W [K,D], b [K])`` when ``model`` is ``flatten -> Linear``, else ``None``.

    Recognised: a MarginNet whose ``phi`` only reshapes, or an ``nn.Sequential`` of reshapes ending
    in one ``nn.Linear``.
    """
    if isinstance(model, MarginNet):
        phi, head = model.phi, model.head
    elif isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], nn.Linear):
        phi, head = model[:-1], model[-1]
    else:
        return None
    if not _reshape_only(phi):
        return None
    bias = head.bias if head.bias is not None else torch.zeros(head.out_features, device=head.weight.device)
    return head.weight.detach(), bias.detach()


@register("exact-linear")
@dataclass(kw_only=True)
class ExactLinear(Estimator):
    """Closed-form margins of a linear model (``ConfigError`` for any other model); ``domain``: ``"rd"``
    (default) or ``"box"``."""

    kind = MarginKind.EXACT
    needs = frozenset({"linear"})
    domain: str = "rd"

    def _prepare(self, model: nn.Module, x1: torch.Tensor, p: float) -> None:
        if linear_parameters(model) is None:
            raise ConfigError(
                "exact-linear needs a linear model (flatten then one nn.Linear); "
                "use first-order, lipschitz or an attack for deep models"
            )

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        params = linear_parameters(model)
        assert params is not None  # checked in _prepare
        # in float64 whatever the model's dtype: "exact" must not carry float32 rounding (a float32
        # distance can sit ~1e-6 relative above the true one, above a sound certified bound)
        weight, bias, flat = params[0].double(), params[1].double(), x.flatten(1).double()
        if self.domain == "box":
            return linear_margins_box(weight, bias, flat, y, p=p, signed=True)
        return linear_margins(weight, bias, flat, y, p=p, signed=True)
