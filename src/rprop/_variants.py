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

Two more variants add a whole-step phase to Rprop- (``undo="never"``, no
forgetting): the globally convergent Rprop (GRprop) of Anastasiadis, Magoulas
& Vrahatis 2005, as R's ``neuralnet`` implements it (``algorithm="sag"`` and
``"slr"``). After the step sizes adapt, one of them, chosen over *all*
parameters (the smallest |gradient| for ``"sag"``, the smallest step size
for ``"slr"``), is replaced by a value computed from all the others
(:func:`rprop._core.grprop_adjust`); ``adjust`` declares it.

================  ==========  ======  =========================================
``"grprop-sag"``  never       no      neuralnet ``algorithm="sag"``
``"grprop-slr"``  never       no      neuralnet ``algorithm="slr"``
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
Adjust = Literal["sag", "slr"]
# GRprop's whole-step phase: which coordinate's step size is recomputed.
ADJUST_MODES: tuple[Adjust, ...] = ("sag", "slr")

# Per-array state every variant keeps (torch.optim.Rprop's names): the
# gradient remembered for the sign test, and the step sizes.
BASE_STATE = ("prev", "step_size")
# The update to take back, kept by the backtracking variants.
UNDO_STATE = "prev_update"
# E(t-1), the loss before this step (one number), kept by the variants that
# need the loss.
LOSS_STATE = "prev_loss"
# The features of the elementwise rule (what a bucket-at-a-time path can
# implement), then every feature the core implements, the whole-step phases
# included; a variant's features are a subset.
ELEMENTWISE_FEATURES = frozenset({f"undo={mode}" for mode in UNDO_MODES} | {"forget"})
FEATURES = ELEMENTWISE_FEATURES | {f"adjust={mode}" for mode in ADJUST_MODES}


@dataclass(frozen=True)
class Variant:
    """One Rprop variant: its name and what it does on a sign flip.

    ``undo`` is ``"never"``, ``"always"`` or ``"if_worse"``; ``forget``
    whether the stored gradient is zeroed where the sign flipped; ``adjust``
    (``None``, ``"sag"`` or ``"slr"``) GRprop's whole-step phase, which
    builds on Rprop- only (``undo="never"``, ``forget=False``), as neuralnet's.
    """

    name: str
    undo: Undo
    forget: bool
    adjust: Adjust | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise TypeError(f"Variant name must be a non-empty string, got {self.name!r}")
        if self.undo not in UNDO_MODES:
            raise ValueError(f"Variant undo must be one of {UNDO_MODES}, got {self.undo!r}")
        if not isinstance(self.forget, bool):
            raise TypeError(f"Variant forget must be a bool, got {self.forget!r}")
        if self.adjust is not None:
            if self.adjust not in ADJUST_MODES:
                raise ValueError(
                    f"Variant adjust must be None or one of {ADJUST_MODES}, got {self.adjust!r}")
            # The adjustment recomputes a step size from this step's gradients
            # and moves every coordinate by it: a forgotten gradient or an
            # undone update has no step of this step to adjust.
            if self.undo != "never" or self.forget:
                raise ValueError(
                    f"Variant adjust={self.adjust!r} (GRprop) builds on Rprop-: it needs "
                    f"undo='never' and forget=False, got undo={self.undo!r}, "
                    f"forget={self.forget!r}")

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
        rule's flags and the whole-step phase. A fast path runs a variant only
        if it declares all of them; anything else falls back to the reference
        path."""
        return frozenset({f"undo={self.undo}"} | ({"forget"} if self.forget else set())
                         | ({f"adjust={self.adjust}"} if self.adjust else set()))


CLASSIC: tuple[Variant, ...] = (
    Variant("rprop+", undo="always", forget=True),
    Variant("rprop-", undo="never", forget=False),
    Variant("irprop+", undo="if_worse", forget=True),
    Variant("irprop-", undo="never", forget=True),
)

# GRprop, as R's neuralnet has it (algorithm="sag" / "slr").
GRPROP: tuple[Variant, ...] = (
    Variant("grprop-sag", undo="never", forget=False, adjust="sag"),
    Variant("grprop-slr", undo="never", forget=False, adjust="slr"),
)

# Every variant a name can be looked up for: the classic four, GRprop, then
# those registered. Keys are lower-case names.
VARIANTS: dict[str, Variant] = {v.name: v for v in CLASSIC + GRPROP}
# The names rprop itself defines, as error messages list them.
BUILTIN_NAMES = sorted(VARIANTS)


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
            f"variant must be a string, one of {BUILTIN_NAMES}, or a "
            f"rprop.Variant; got {type(name).__name__}"
        )
    try:
        return VARIANTS[_key(name)]
    except KeyError:
        registered = sorted(set(VARIANTS) - set(BUILTIN_NAMES))
        also = f", a registered name {registered}" if registered else ""
        raise ValueError(
            f"variant must be one of {BUILTIN_NAMES} (case-insensitive){also}, or a "
            f"rprop.Variant; got {name!r}"
        ) from None
