"""The tests' reference forward, compiled: run eagerly, a model's forward compiles every one of
its ops once per new shape (~10 s per new sequence length on the project's CPU); compiled, it
is one program per length."""
from flax import nnx


@nnx.jit(static_argnames=("mode", "attention_impl"))
def reference_forward(model, ids, segment_ids=None, *, mode="eval", attention_impl=None):
    """model.forward(ids, mode=, attention_impl=, segment_ids=) -> (logits [B, T, V],
    decisions [L, B, T, Hkv] or None)."""
    out = model.forward(ids, mode=mode, attention_impl=attention_impl, segment_ids=segment_ids)
    return out.logits, out.decisions
