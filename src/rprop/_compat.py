"""Every private SciPy name rprop uses, in one place, with the versions it was
checked against; ``tests/test_compat.py`` fails loudly when SciPy moves one.

Checked against SciPy 1.17.1, the release tested here. Importing this module
imports SciPy.
"""

from __future__ import annotations

# scipy.optimize.minimize's own finite differences ("2-point", "3-point",
# "cs"), so that rprop.minimize(jac="2-point") evaluates exactly as SciPy's
# methods do. SciPy has no public name for it.
from scipy.optimize._numdiff import approx_derivative  # noqa: F401
