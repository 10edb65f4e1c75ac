"""Checks on what a model directory holds, before any of it is trusted: its JSON files, the
fields of config.json, the shard paths of a sharded index, each tensor's dtype and values.

Every error names the file (and the field or tensor) and says what would fix it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

# Upper bounds on config.json's sizes. They sit far above every released decoder (Llama 3.1 405B:
# 126 layers, hidden 16384, 128 heads; the largest vocabularies are ~262k) and far below what a
# corrupted or hostile value would ask for, which otherwise builds a model layer by layer for
# hours (num_hidden_layers = 10**9) before anything fails.
LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 131072,
    "intermediate_size": 1048576,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "vocab_size": 2 ** 22,
    "max_position_embeddings": 2 ** 24,
    "sliding_window": 2 ** 24,
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")


class CheckpointError(ValueError):
    """A checkpoint does not match the model: missing, unexpected, mis-shaped, mis-typed or
    non-finite tensors, unreadable or misplaced shard files."""


class ConfigError(ValueError):
    """config.json (or another JSON file of a model directory) is malformed or out of range."""


def read_json(path: str, what: str = "JSON file") -> Any:
    """The parsed JSON of `path`; a malformed file raises ConfigError naming it and the position."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); the "
            f"{what} is damaged or truncated: restore it from the model's source"
        ) from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err}); the {what} is damaged") from err


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_hf_config(hf: Any, source: str = "config.json") -> None:
    """Types, ranges and divisibility of the config.json fields dms-jax reads.

    Raises ConfigError naming `source`, the field, its value and the allowed range."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: holds a JSON {type(hf).__name__}, not an object of config fields "
                          "(is it a model's config.json?)")

    def bad(field, message):
        return ConfigError(f"{source}: field {field!r} = {hf.get(field)!r} {message}; fix config.json")

    for field in REQUIRED + OPTIONAL_INTS:
        if field not in hf or hf[field] is None:
            if field in REQUIRED:
                raise ConfigError(f"{source}: the required field {field!r} is missing; fix config.json")
            continue
        value, limit = hf[field], LIMITS[field]
        if not _is_int(value):
            raise bad(field, f"must be an integer (got a JSON {type(value).__name__})")
        if not 1 <= value <= limit:
            raise bad(field, f"must be in [1, {limit}]")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise bad("num_attention_heads", f"is not a multiple of num_key_value_heads = {kv_heads}")
    if not hf.get("head_dim") and hf["hidden_size"] % heads:
        raise bad("hidden_size", f"is not divisible by num_attention_heads = {heads} (and no head_dim is given)")
    for field in BOOLS:
        if hf.get(field) is not None and not isinstance(hf[field], bool):
            raise bad(field, "must be true or false")
    for field in POSITIVE_NUMBERS:
        value = hf.get(field)
        if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
            raise bad(field, "must be a finite number > 0")
    for field in ("rope_scaling", "rope_parameters", "dms"):
        if hf.get(field) is not None and not isinstance(hf[field], dict):
            raise bad(field, "must be a JSON object (or null)")
    for field in ("hidden_act", "model_type"):
        if hf.get(field) is not None and not isinstance(hf[field], str):
            raise bad(field, "must be a string")
    archs = hf.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise bad("architectures", "must be a list of strings")


def read_index(index_path: str) -> list[str]:
    """The shard file names of a model.safetensors.index.json, each checked to stay inside the
    model directory (no absolute paths, no `..`): a model directory never reads files elsewhere."""
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index_path}: needs a 'weight_map' object of tensor name -> shard file name")
    model_dir = os.path.dirname(os.path.abspath(index_path))
    files = sorted(set(weight_map.values()))
    for name in files:
        resolved = os.path.normpath(os.path.join(model_dir, name))
        if os.path.isabs(name) or not resolved.startswith(model_dir + os.sep):
            raise ConfigError(
                f"{index_path}: shard {name!r} lies outside the model directory {model_dir}; shard "
                "paths must be file names inside it (no absolute paths, no '..')"
            )
    return files


def check_tensor_dtype(name: str, array, param_path: str, source: str) -> None:
    """Every parameter is floating point: an integer / bool tensor is a corrupt or relabelled file."""
    import jax.numpy as jnp

    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise CheckpointError(
            f"tensor {name!r} in {source} has dtype {np.dtype(array.dtype).name}, but parameter "
            f"{param_path} takes floating-point values (float32 / bfloat16 / float16); the file is "
            "corrupt or its header mislabels the tensor: re-download or re-export the model"
        )


def count_nonfinite(array) -> int:
    """NaN / Inf entries of a floating array (one pass)."""
    array = np.asarray(array)
    finite = np.isfinite(array)
    return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))
