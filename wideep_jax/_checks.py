"""Small input-check predicates shared by modules that must not import each other."""
from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """A Python or NumPy integer; not a bool (``True`` would pass as 1) and not a float,
    even an integral one."""
    # np.integer is registered as numbers.Integral; np.bool_ is not.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
