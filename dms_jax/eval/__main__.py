"""`python -m dms_jax.eval`: the evaluation suite (see dms_jax/eval/suite.py, docs/eval.md)."""
from dms_jax.eval.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
