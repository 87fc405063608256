"""The Rprop variants, as declarations, and the registry that names them.

The four classic variants differ only in what happens to an element whose
gradient changed sign (``g_prev * g < 0``). After the step size has shrunk
there, a variant may

* ``undo``: take back the previous update of that element
  (``"never"``, ``"always"``, or ``"if_worse"``: only when the loss went up);
* ``forget``: set the stored gradient to 0, so the element does not move now
  and the next step sees no sign change (``g_prev * g == 0``).

================  ==========  ======  =========================================
variant           undo        forget  source
================  ==========  ======  =========================================
``"rprop+"``      always      yes     Riedmiller & Braun 1993 (weight-backtracking)
``"rprop-"``      never       no      Igel & Hüsken 2000 (Rprop without backtracking)
``"irprop-"``     never       yes     Igel & Hüsken 2000; torch.optim.Rprop
``"irprop+"``     if_worse    yes     Igel & Hüsken 2000/2003
================  ==========  ======  =========================================

A :class:`Variant` is the one declaration every front, checkpoint check and
fast path reads: the per-array state it needs (:attr:`Variant.state_keys`),
whether it needs the loss, and the features a fast path must implement to
run it (:attr:`Variant.features`). A variant built by a user works on every
front; :func:`register_variant` (called by the optimizers for a variant they
are given) lets its name be looked up again, e.g. when a state_dict that
names it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Undo = Literal["never", "always", "if_worse"]
UNDO_MODES: tuple[Undo, ...] = ("never", "always", "if_worse")

# Per-array state every variant keeps (torch.optim.Rprop's names): the
# gradient remembered for the sign test, and the step sizes.
BASE_STATE = ("prev", "step_size")
# The update to take back, kept by the backtracking variants.
UNDO_STATE = "prev_update"
# Every feature the core implements; a variant's features are a subset.
FEATURES = frozenset({f"undo={mode}" for mode in UNDO_MODES} | {"forget"})


@dataclass(frozen=True)
class Variant:
    """One Rprop variant: its name and what it does on a sign flip.

    ``undo`` is ``"never"``, ``"always"`` or ``"if_worse"``; ``forget``
    whether the stored gradient is zeroed where the sign flipped.
    """

    name: str
    undo: Undo
    forget: bool

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise TypeError(f"Variant name must be a non-empty string, got {self.name!r}")
        if self.undo not in UNDO_MODES:
            raise ValueError(f"Variant undo must be one of {UNDO_MODES}, got {self.undo!r}")
        if not isinstance(self.forget, bool):
            raise TypeError(f"Variant forget must be a bool, got {self.forget!r}")

    @property
    def backtracks(self) -> bool:
        """Whether the variant keeps the previous update (to undo it)."""
        return self.undo != "never"

    @property
    def needs_loss(self) -> bool:
        """Whether each step needs the loss at the current weights."""
        return self.undo == "if_worse"

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The per-array state, each shaped and typed like its parameter."""
        return BASE_STATE + ((UNDO_STATE,) if self.backtracks else ())

    @property
    def features(self) -> frozenset[str]:
        """What a path must implement to run this variant: the elementwise
        rule's flags. A fast path runs a variant only if it declares all of
        them; anything else falls back to the reference path."""
        return frozenset({f"undo={self.undo}"} | ({"forget"} if self.forget else set()))


CLASSIC: tuple[Variant, ...] = (
    Variant("rprop+", undo="always", forget=True),
    Variant("rprop-", undo="never", forget=False),
    Variant("irprop+", undo="if_worse", forget=True),
    Variant("irprop-", undo="never", forget=True),
)

# Every variant a name can be looked up for: the classic four, then those
# registered. Keys are lower-case names.
VARIANTS: dict[str, Variant] = {v.name: v for v in CLASSIC}


def _key(name: str) -> str:
    return name.strip().lower()


def register_variant(variant: Variant) -> Variant:
    """Make ``variant`` known by its name (case-insensitive); return it.

    Registering the same declaration twice is a no-op; a different variant
    under a name already taken is a ValueError.
    """
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a rprop.Variant, got {type(variant).__name__}")
    unknown = variant.features - FEATURES
    if unknown:
        raise ValueError(
            f"variant {variant.name!r} declares features the core does not implement: "
            f"{sorted(unknown)}"
        )
    known = VARIANTS.setdefault(_key(variant.name), variant)
    if known != variant:
        raise ValueError(
            f"a different variant is already registered as {variant.name!r}: {known}"
        )
    return variant


def get_variant(name: str | Variant) -> Variant:
    """Look a variant up by name (case-insensitive). A Variant is passed
    through and registered, so that a state_dict naming it loads again."""
    if isinstance(name, Variant):
        return register_variant(name)
    if not isinstance(name, str):
        raise TypeError(
            f"variant must be a string, one of {sorted(VARIANTS)}, or a rprop.Variant; "
            f"got {type(name).__name__}"
        )
    try:
        return VARIANTS[_key(name)]
    except KeyError:
        raise ValueError(
            f"variant must be one of {sorted(VARIANTS)} (case-insensitive), or a "
            f"rprop.Variant; got {name!r}"
        ) from None
