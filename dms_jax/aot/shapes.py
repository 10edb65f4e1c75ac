"""Model shapes without weights: a `ModelConfig` from a config.json, a recipe, or the shipped
shapes of the recipes' hub models, and the abstract (ShapeDtypeStruct) model built from it.

    cfg = model_config_for_recipe(config)          # configs/<recipe>.py's model section
    cfg = model_config_from_file("dir/or/config.json", dtype="bfloat16")
    graphdef, params, paths = abstract_model(cfg)  # flat {path: ShapeDtypeStruct}, no memory
"""
from __future__ import annotations

import os

from dms_jax.assets import ASSETS_DIR
from dms_jax.config import ModelConfig
from dms_jax.hf import model_config_from_hf
from dms_jax.hf_checks import read_json

# config.json of the hub models the recipes name (shapes only), so no download is needed
SHAPES_DIR = os.path.join(ASSETS_DIR, "model_shapes")


def shipped_shapes() -> dict[str, str]:
    """{hub id: path of its shipped config.json}."""
    return {name[:-len(".json")].replace("--", "/", 1): os.path.join(SHAPES_DIR, name)
            for name in sorted(os.listdir(SHAPES_DIR)) if name.endswith(".json")}


def config_json_path(path_or_hub_id: str) -> str:
    """config.json of a model directory, a config.json file itself, or a shipped hub model's."""
    if os.path.isdir(path_or_hub_id):
        found = os.path.join(path_or_hub_id, "config.json")
        if not os.path.isfile(found):
            raise FileNotFoundError(f"{path_or_hub_id} holds no config.json")
        return found
    if os.path.isfile(path_or_hub_id):
        return path_or_hub_id
    known = shipped_shapes()
    if path_or_hub_id in known:
        return known[path_or_hub_id]
    raise FileNotFoundError(
        f"{path_or_hub_id!r} is neither a model directory, a config.json, nor a hub model whose "
        f"shapes ship with dms-jax ({', '.join(known)}); pass --model-config path/to/config.json "
        "(no weights are read)")


def model_config_from_file(path_or_hub_id: str, *, dtype=None, param_dtype=None, dms=None) -> ModelConfig:
    path = config_json_path(path_or_hub_id)
    return model_config_from_hf(read_json(path, "config.json"), dtype=dtype, param_dtype=param_dtype or None,
                                dms=dms, source=path)


def model_config_for_recipe(config) -> ModelConfig:
    """The model a training config (configs/*.py) builds, from shapes only: model.path's
    config.json (a directory, or a shipped hub model's), else model.init."""
    from dms_jax.train.loop import _opt, dms_config, random_model_config

    m = config.model
    path = _opt(m, "path")
    if path:
        return model_config_from_file(path, dtype=_opt(m, "dtype"), param_dtype=_opt(m, "param_dtype"),
                                      dms=dms_config(m)).replace(
            scan_layers=bool(_opt(m, "scan_layers", False)))
    return random_model_config(m)


def abstract_model(cfg: ModelConfig):
    """(graphdef, {path: ShapeDtypeStruct}, {path: key path}) of a Decoder, nothing allocated."""
    from flax import nnx

    from dms_jax.model import Decoder
    from dms_jax.train import optim

    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return optim.split_model(model)
