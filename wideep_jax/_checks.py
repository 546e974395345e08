"""Small input-check predicates shared by modules that must not import each other."""
from __future__ import annotations

import numbers

import jax.numpy as jnp


def is_int(value: object) -> bool:
    """A Python or NumPy integer; not a bool (``True`` would pass as 1) and not a float,
    even an integral one."""
    # np.integer is registered as numbers.Integral; np.bool_ is not.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_float_dtype(value: object) -> bool:
    """A floating dtype, or anything ``np.dtype`` reads as one (``jnp.bfloat16``, "float32")."""
    try:  # jnp's issubdtype: NumPy's does not count bfloat16 as floating
        return jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        return False


def is_mask_dtype(dtype: object) -> bool:
    """bool, or an integer dtype (nonzero: kept); a float mask would be cut to bool silently
    (0.2 -> kept)."""
    return jnp.dtype(dtype) == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)
