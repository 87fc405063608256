"""The PyTorch front: :class:`Rprop` and full-batch helpers."""

from rprop.torch._optimizer import LrChangeWarning, Rprop

__all__ = ["LrChangeWarning", "Rprop"]
