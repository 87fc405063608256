"""The PyTorch front: :class:`Rprop` and full-batch helpers."""

from rprop.torch._fit import EpochInfo, FitHistory, fit
from rprop.torch._full_batch import full_batch_backward
from rprop.torch._minimize import minimize
from rprop.torch._optimizer import LrChangeWarning, LrSeedWarning, Rprop

__all__ = ["EpochInfo", "FitHistory", "LrChangeWarning", "LrSeedWarning", "Rprop", "fit",
           "full_batch_backward", "minimize"]
