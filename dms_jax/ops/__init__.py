"""Pure functions on arrays: the mask rule, gating, attention."""
