"""The four Rprop variants, as data.

They differ only in what happens to an element whose gradient changed sign
(``g_prev * g < 0``). After the step size has shrunk there, a variant may

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Undo = Literal["never", "always", "if_worse"]


@dataclass(frozen=True)
class Variant:
    name: str
    undo: Undo
    forget: bool

    @property
    def backtracks(self) -> bool:
        """Whether the variant keeps the previous update (to undo it)."""
        return self.undo != "never"

    @property
    def needs_loss(self) -> bool:
        """Whether each step needs the loss at the current weights."""
        return self.undo == "if_worse"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("rprop+", undo="always", forget=True),
        Variant("rprop-", undo="never", forget=False),
        Variant("irprop+", undo="if_worse", forget=True),
        Variant("irprop-", undo="never", forget=True),
    )
}


def get_variant(name: str | Variant) -> Variant:
    """Look a variant up by name (case-insensitive); pass a Variant through."""
    if isinstance(name, Variant):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"variant must be a string, one of {sorted(VARIANTS)}; got {type(name).__name__}"
        )
    try:
        return VARIANTS[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"variant must be one of {sorted(VARIANTS)} (case-insensitive); got {name!r}"
        ) from None
