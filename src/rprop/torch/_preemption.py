"""Stopping ``fit`` at the end of an epoch on SIGINT (Ctrl-C) or SIGTERM (the
signal schedulers, cloud machines and torchrun send before they kill), so the
finished epoch is saved first."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DeferredInterrupt"]

# What each signal's handler must be for us to take it over: Python's own.
_DEFAULTS: dict[int, Any] = {signal.SIGINT: signal.default_int_handler,
                             signal.SIGTERM: signal.SIG_DFL}


class DeferredInterrupt:
    """Defers SIGINT and SIGTERM to the end of the epoch.

    When ``enabled`` (in the main thread, for each signal whose handler is
    Python's default or an enclosing ``fit``'s), the first SIGINT or SIGTERM
    only records the signal: the epoch loop finishes the epoch, saves the
    checkpoint and calls :meth:`reraise`. The handlers then step aside, so a
    second signal acts at once (KeyboardInterrupt, or the default SIGTERM
    death). A handler someone else installs is left in place.

    Under ``torch.distributed`` the ranks see a signal at different moments
    (a launcher signals them one by one, and a rank blocked in a collective
    only runs Python handlers once it returns). :meth:`agreed` therefore
    takes the maximum of every rank's signal number (one all-reduce of one
    integer per epoch), at the same point of the same epoch on every rank,
    so all ranks stop after the same epoch and save it together. A rank
    whose handler is not installed contributes 0 and follows the others.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.received = 0  # the signal number, 0 for none
        self.stop_with = 0  # what the ranks agreed on
        self.pid = os.getpid()
        self.previous: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for signum, default in _DEFAULTS.items():
                current = signal.getsignal(signum)
                if current is default or isinstance(getattr(current, "__self__", None),
                                                     DeferredInterrupt):
                    self.previous[signum] = current
                    signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.received:
            self.received = signum
        for s, default in _DEFAULTS.items():
            if s in self.previous and signal.getsignal(s) == self._handler:
                signal.signal(s, default)
        if os.getpid() == self.pid:  # not again from each forked DataLoader worker
            name = signal.Signals(signum).name
            print(f"\nrprop.torch.fit: {name} received; finishing this step and saving the "
                  f"checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, group: Any, device: torch.device) -> bool:
        """Whether to stop after this epoch: this process got a signal, or
        (under ``torch.distributed``, a collective) any rank did."""
        if not self.enabled:
            return False
        if group is None:
            self.stop_with = self.received
        else:
            t = torch.tensor([self.received], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            self.stop_with = int(t.item())
        return self.stop_with != 0

    def end_run(self, save: Callable[[], object] | None, group: Any,
                device: torch.device) -> None:
        """After a run's last step: ``save`` the final checkpoint (None
        without one), then stop as a signal received during that step asks
        (:meth:`agreed`, reached by every rank at this same point): the step
        is saved, and it is still a stop."""
        if save is not None:
            save()
        if self.agreed(group, device):
            self.reraise()

    def reraise(self) -> None:
        """Stop as the agreed signal would have, now that the epoch is saved:
        KeyboardInterrupt for SIGINT; for SIGTERM, SystemExit with the status
        a shell reports for a process it killed (128 + 15), so ``finally``
        blocks run and launchers see the process as terminated."""
        if self.stop_with == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + self.stop_with)

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            current = signal.getsignal(signum)
            if current == self._handler or current is _DEFAULTS[signum]:
                signal.signal(signum, previous)
        self.previous = {}
