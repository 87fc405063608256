"""Adapters for training loops that call ``optimizer.step()`` without a
closure: BoTorch, the Hugging Face ``Trainer``, Lightning under AMP.

Recipes and their caveats: docs/integrations.md. Nothing here imports BoTorch,
Lightning or transformers; ``import rprop`` does not import this package.
"""

from rprop.integrations._botorch import botorch_optimizer_kwargs
from rprop.integrations._recorded_loss import RecordedLossRprop

__all__ = ["RecordedLossRprop", "botorch_optimizer_kwargs"]
