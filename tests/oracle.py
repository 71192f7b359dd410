"""The float64 oracle every test judges a backend by: `dispatch.reference.reference_attention`.

It lives in the package (dispatch/reference.py) so that `python -m dispatch
selftest` has the same judge in an install without this folder; see that
module for why it is naive and independent of every backend. Tests import it
from here.
"""

from dispatch.reference import reference_attention

__all__ = ["reference_attention"]
