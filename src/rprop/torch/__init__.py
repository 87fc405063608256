"""The PyTorch front: :class:`Rprop` and full-batch helpers."""

# Each step path registers itself with _path_registry when its module is
# imported; importing them all here completes the registry before any step,
# whichever rprop.torch module a program imports first.
from rprop.torch import _fused, _paths  # noqa: F401
from rprop.torch._adaptive import AdaptiveHistory, StepInfo
from rprop.torch._fit import EpochInfo, FitHistory, fit
from rprop.torch._full_batch import full_batch_backward
from rprop.torch._minimize import minimize
from rprop.torch._optimizer import LrChangeWarning, LrSeedWarning, Rprop

__all__ = ["AdaptiveHistory", "EpochInfo", "FitHistory", "LrChangeWarning", "LrSeedWarning",
           "Rprop", "StepInfo", "fit", "full_batch_backward", "minimize"]
