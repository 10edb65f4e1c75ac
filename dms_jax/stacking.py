"""The one rule between the two layouts of the decoder layers' parameters (ModelConfig.scan_layers).

Flat {dotted path: array} dicts, as `nnx.to_pure_dict` flattened, `dms_jax.hf` and the trainer
use them:
  unrolled: "layers.{i}.<rest>"  one array per layer, shape [...]
  stacked:  "layers.<rest>"      one array for all layers, shape [L, ...], entry i = layer i
Paths outside "layers" (embed, final_norm, lm_head) are the same in both.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

PREFIX = "layers."
_UNROLLED = re.compile(r"layers\.(?P<i>\d+)\.(?P<rest>.+)$")


def is_stacked_path(path: str) -> bool:
    """True for a stacked layer parameter ("layers.attn.q_proj.kernel", leading axis = layer)."""
    return path.startswith(PREFIX) and not _UNROLLED.match(path)


def stack_layers(flat: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Unrolled -> stacked: "layers.{i}.rest" (i = 0 .. num_layers - 1) -> "layers.rest" [L, ...]
    (np.stack: host arrays in, host arrays out). Every layer must hold the same names with the
    same shapes (ValueError naming the first that does not)."""
    per_rest: dict[str, dict[int, Any]] = {}
    out: dict[str, Any] = {}
    for path, value in flat.items():
        m = _UNROLLED.match(path)
        if m is None:
            if is_stacked_path(path):
                raise ValueError(f"{path!r} is already stacked; stack_layers takes the unrolled "
                                 "layout (layers.<i>.<name>)")
            out[path] = value
        else:
            per_rest.setdefault(m["rest"], {})[int(m["i"])] = value
    for rest, by_layer in per_rest.items():
        if sorted(by_layer) != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(by_layer))
            extra = sorted(set(by_layer) - set(range(num_layers)))
            raise ValueError(f"layers.<i>.{rest}: layers {missing} missing, {extra} beyond "
                             f"num_layers={num_layers}; every layer needs each parameter")
        shapes = {tuple(np.shape(v)) for v in by_layer.values()}
        if len(shapes) > 1:
            raise ValueError(f"layers.<i>.{rest} has different shapes across layers {sorted(shapes)}; "
                             "stacked layers need one shape")
        out[PREFIX + rest] = np.stack([np.asarray(by_layer[i]) for i in range(num_layers)])
    return out


def unstack_layers(flat: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Stacked -> unrolled: "layers.rest" [L, ...] -> "layers.{i}.rest" = its entry i [...]
    (views, no copy, for numpy arrays). The inverse of `stack_layers`."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        if not is_stacked_path(path):
            out[path] = value
            continue
        if np.shape(value)[:1] != (num_layers,):
            raise ValueError(f"{path!r} has shape {tuple(np.shape(value))}; a stacked layer "
                             f"parameter needs the leading axis num_layers={num_layers}")
        rest = path[len(PREFIX):]
        for i in range(num_layers):
            out[f"{PREFIX}{i}.{rest}"] = value[i]
    return out
