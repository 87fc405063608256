"""``rprop demo``: f(x) = x² step by step, then the linear fit, on the front of
``--backend``. The computations are :mod:`rprop.demos`, the code the scripts in
``examples/`` run; this module checks the options and prints."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import rprop
from rprop.cli._checks import (
    BACKENDS,
    at_least,
    checking_arguments,
    require_backend,
    variant_name,
)
from rprop.cli._output import say
from rprop.demos import least_squares
from rprop.demos.numpy import square_walk

SQUARE_LR, SQUARE_STEPS = 0.1, 20
REPORT_EVERY = 50  # epochs between two loss lines


def add_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="f(x) = x² step by step, then a linear fit (a few seconds)",
        description="Minimise f(x) = x² from x = 5 step by step, showing the step size "
                    "adapt, then fit y = 2x + 3 + 0.1·noise with one linear layer and "
                    "full-batch Rprop, printing the loss every 50 epochs and the learned "
                    "w and b.",
    )
    demo.add_argument("--variant", default="irprop-",
                      help=f"Rprop variant: {', '.join(rprop.VARIANTS)} (default: irprop-, "
                           "torch.optim.Rprop's)")
    demo.add_argument("--backend", choices=BACKENDS, default="torch",
                      help="front used for the linear fit: torch (rprop.Rprop), numpy "
                           "(rprop.numpy.Rprop) or jax (rprop.optax.rprop); default: torch")
    demo.add_argument("--lr", type=float, default=0.01,
                      help="initial step size of the linear fit (default: 0.01)")
    demo.add_argument("--epochs", type=int, default=200, help="epochs of the linear fit "
                      "(default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data (default: 0)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    variant = variant_name(args.variant)
    with checking_arguments():
        rprop.Hyper(lr=args.lr)  # a bad --lr is a one-line error before anything runs
    at_least("--epochs", args.epochs, 1)
    at_least("--seed", args.seed, 0)
    require_backend(args.backend)
    _show_square_walk(variant)
    say("Fitting y = 2x + 3 + 0.1·noise (100 points, x ~ N(0, 1)) with one linear layer, "
        "MSE,")
    say(f"full batch: Rprop ({variant}, lr={args.lr:g}), {args.epochs} epochs, "
        f"{args.backend} backend.")
    say()

    def report(epoch: int, loss: float) -> None:
        if epoch % REPORT_EVERY == 0:
            say(f"epoch {epoch:4d}  loss {loss:.6f}")

    front = importlib.import_module(f"rprop.demos.{args.backend}")
    w, b = front.fit_linear(variant, args.lr, args.epochs, args.seed, report)
    w_ls, b_ls = least_squares(args.seed)
    say(f"(least squares on this noisy sample: w = {w_ls:.4f}, b = {b_ls:.4f})")
    say(f"w = {w:.2f}, b = {b:.2f}")
    return 0


def _show_square_walk(variant: str) -> None:
    """One row per step of :func:`rprop.demos.numpy.square_walk`, with a note where
    the step size halves."""
    say(f"Minimising f(x) = x² from x = 5 with Rprop ({variant}, initial step size "
        f"{SQUARE_LR:g}).")
    say("Each step moves x by the step size against the sign of f'(x), whatever its size;")
    say("the step size grows ×1.2 while f'(x) keeps its sign and halves when it flips.")
    say()
    say(" step         x     f'(x)  step size       move")
    step_size, move = SQUARE_LR, 0.0
    for row in square_walk(variant, SQUARE_LR, SQUARE_STEPS):
        last_step_size, last_move = step_size, move
        step_size, move = row.step_size, row.x_new - row.x
        note = ""
        if step_size < last_step_size:
            note = "  sign flip: step size halved"
            if move == 0.0:
                note += ", no move"
            elif move == -last_move:
                note += ", last move undone"
        say(f"{row.step:5d} {row.x:9.4f} {row.grad:9.4f} {step_size:10.4f} {move:+10.4f}{note}")
    say(f"after {SQUARE_STEPS} steps: x = {row.x_new:.4f}")
    say()
