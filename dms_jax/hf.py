"""Hugging Face import / export: config translation and a tensor-name mapping table.

Only safetensors are read by default; pickle checkpoints need `allow_pickle=True`.
`trust_remote_code` is never used: nothing from a model directory is executed.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import export_target, stacking
from dms_jax.config import DTYPE_NAMES, DMSConfig, ModelConfig, dtype_name, resolve_dtype
from dms_jax.export_target import TOKENIZER_FILES
from dms_jax.hf_checks import (CheckpointError, ConfigError, check_tensor_dtype, count_nonfinite,
                               read_index, read_json, validate_hf_config)
from dms_jax.model import Decoder

# model_type -> (architecture, family defaults)
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _rope(hf: dict) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters")  # transformers >= 5
    if params:
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else None
    if scaling is not None:
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling


def model_config_from_hf(hf: dict, *, dtype=None, param_dtype=None, dms: DMSConfig | None = None,
                         source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config dict; raise on unsupported families or features, and
    (ConfigError, naming `source` and the field) on malformed or out-of-range fields."""
    if not isinstance(hf, dict):
        validate_hf_config(hf, source)  # names what it holds instead
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or [SUPPORTED.get(model_type, "")]
    if model_type not in SUPPORTED or archs[0] != SUPPORTED[model_type]:
        supported = ", ".join(f"{a} (model_type {t!r})" for t, a in SUPPORTED.items())
        raise ValueError(
            f"unsupported model: model_type={model_type!r}, architectures={archs}; "
            f"dms-jax supports {supported}"
        )
    validate_hf_config(hf, source)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; only 'silu'")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = _rope(hf)
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ValueError(
            f"{model_type} with use_sliding_window=True (per-layer sliding windows) is not supported; "
            "set use_sliding_window=false in config.json"
        )
    attention_bias = bool(hf.get("attention_bias", False))
    if dms is None and hf.get("dms"):
        try:
            dms = DMSConfig.from_dict(hf["dms"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: field 'dms' is invalid: {err}") from err
    hf_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        model_type=model_type,
        architecture=SUPPORTED[model_type],
        param_dtype=dtype_name(resolve_dtype(param_dtype or (hf_dtype if hf_dtype in DTYPE_NAMES else "float32"))),
        dtype=dtype_name(resolve_dtype(dtype or "float32")),
        dms=dms,
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


def hf_config_from_model_config(cfg: ModelConfig) -> dict:
    """A config.json dict that transformers' AutoConfig reads back into the same model."""
    hf = {
        "architectures": [cfg.architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling_dict or {"rope_type": "default"})},
        "dtype": cfg.param_dtype,
    }
    if cfg.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    if cfg.dms is not None:
        hf["dms"] = cfg.dms.to_dict()
    return hf


# ----------------------------------------------------------------------------------------------
# The tensor mapping table: HF name pattern -> (param path template, transform to Flax layout).
# {i} is the layer index. "T" transposes a torch Linear weight [out, in] -> Flax kernel [in, out].

Transform = Callable[[np.ndarray], np.ndarray]
_IDENT: Transform = lambda a: a  # noqa: E731
_T: Transform = lambda a: np.ascontiguousarray(a.T)  # noqa: E731

_LAYER = r"model\.layers\.(?P<i>\d+)\."
MAPPING: list[tuple[str, str, Transform]] = [
    (r"model\.embed_tokens\.weight", "embed.embedding", _IDENT),
    (r"model\.norm\.weight", "final_norm.scale", _IDENT),
    (r"lm_head\.weight", "lm_head.kernel", _T),
    (_LAYER + r"input_layernorm\.weight", "layers.{i}.input_norm.scale", _IDENT),
    (_LAYER + r"post_attention_layernorm\.weight", "layers.{i}.post_attn_norm.scale", _IDENT),
    (_LAYER + r"self_attn\.(?P<p>[qkvo])_proj\.weight", "layers.{i}.attn.{p}_proj.kernel", _T),
    (_LAYER + r"self_attn\.(?P<p>[qkvo])_proj\.bias", "layers.{i}.attn.{p}_proj.bias", _IDENT),
    (_LAYER + r"self_attn\.(?P<p>[qk])_norm\.weight", "layers.{i}.attn.{p}_norm.scale", _IDENT),
    (_LAYER + r"self_attn\.dms_norm\.weight", "layers.{i}.attn.dms_norm.scale", _IDENT),
    (_LAYER + r"self_attn\.dms_proj\.weight", "layers.{i}.attn.dms_proj.kernel", _T),
    (_LAYER + r"mlp\.(?P<p>gate|up|down)_proj\.weight", "layers.{i}.mlp.{p}_proj.kernel", _T),
    (_LAYER + r"mlp\.(?P<p>gate|up|down)_proj\.bias", "layers.{i}.mlp.{p}_proj.bias", _IDENT),
]
_COMPILED = [(re.compile(p + r"$"), t, f) for p, t, f in MAPPING]


def hf_name_to_param(name: str) -> tuple[str, Transform] | None:
    for pattern, template, transform in _COMPILED:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict()), transform
    return None


def param_to_hf_name(path: str) -> tuple[str, Transform]:
    """Inverse of the table for export (transposes are their own inverse)."""
    for pattern, template, transform in MAPPING:
        regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")
        m = re.fullmatch(regex, path)
        if m:
            name = pattern.replace(_LAYER, "model.layers.{i}.").replace(r"(?P<p>[qkvo])", "{p}")
            name = name.replace(r"(?P<p>[qk])", "{p}").replace(r"(?P<p>gate|up|down)", "{p}")
            return name.replace("\\.", ".").format(**m.groupdict()), transform
    raise KeyError(f"parameter {path!r} has no Hugging Face name in hf.MAPPING")


# ----------------------------------------------------------------------------------------------
# Reading tensors


def _read_tensors(model_dir: str, allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors by HF name, the file each came from)."""
    from safetensors.numpy import load_file

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        paths = [os.path.join(model_dir, fn) for fn in read_index(index)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing}")
    else:
        paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if paths:
        tensors: dict[str, np.ndarray] = {}
        sources: dict[str, str] = {}
        for p in paths:
            loaded = _load_safetensors(p, load_file)
            tensors.update(loaded)
            sources.update(dict.fromkeys(loaded, p))
        return tensors, sources
    pickles = sorted(glob.glob(os.path.join(model_dir, "*.bin")) + glob.glob(os.path.join(model_dir, "*.pt")))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{model_dir} holds only pickle checkpoints ({[os.path.basename(p) for p in pickles]}); "
            "pickle can run arbitrary code when loaded. Convert them to safetensors, or pass "
            "allow_pickle=True if you trust the source."
        )
    if pickles:
        import torch

        tensors, sources = {}, {}
        for p in pickles:
            state = torch.load(p, map_location="cpu", weights_only=True)
            tensors.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()})
            sources.update(dict.fromkeys(state, p))
        return tensors, sources
    raise CheckpointError(f"no *.safetensors (or index) found in {model_dir}")


def _load_safetensors(path, load_file):
    try:
        try:
            return load_file(path)
        except (TypeError, ValueError):  # bfloat16 is not a numpy dtype: go through flax's reader
            from safetensors.flax import load_file as load_flax

            return {k: np.asarray(v) for k, v in load_flax(path).items()}
    except Exception as err:  # a damaged header or a truncated file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); "
                              "re-download or re-export the model") from err


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield ".".join(str(p) for p in prefix), tree


def _set_path(tree, path: str, value):
    keys = path.split(".")
    node = tree
    for k in keys[:-1]:
        node = node[int(k) if k.isdigit() and int(k) in node else k]
    node[keys[-1]] = value


# ----------------------------------------------------------------------------------------------
# Public API


def resolve_model_dir(path_or_hub_id: str) -> str:
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise ValueError(f"{path_or_hub_id} is a file; pass the model directory that holds config.json")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as err:  # offline, unknown repo, no hub client
        raise FileNotFoundError(
            f"{path_or_hub_id!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}: {err}). Pass a local model directory."
        ) from err


def from_pretrained(path_or_hub_id: str, *, dtype=None, param_dtype=None, dms: DMSConfig | None = None,
                    scan_layers: bool = False, allow_pickle: bool = False,
                    allow_nonfinite: bool = False) -> Decoder:
    """Load a Hugging Face checkpoint (config.json + safetensors) into a Flax `Decoder`.

    dtype: compute dtype (default float32); param_dtype: storage dtype (default: the checkpoint's).
    dms: a DMSConfig to retrofit; default: the `dms` block of config.json if present.
    scan_layers: stack the layers' parameters [L, ...] and run them under lax.scan
    (`ModelConfig.scan_layers`: compile time independent of depth); the same files load either way.
    Adapter parameters absent from the checkpoint start at their zero initialisation.
    config.json is validated before anything is built (ConfigError names the field); tensors with
    NaN / Inf values are refused (CheckpointError names them) unless `allow_nonfinite=True`,
    which loads them with a warning.
    """
    model_dir = resolve_model_dir(path_or_hub_id)
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a Hugging Face model directory "
                                "(config.json + *.safetensors)")
    hf = read_json(config_path, "config.json")
    cfg = model_config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, dms=dms, source=config_path)
    cfg = dataclasses.replace(cfg, name_or_path=os.path.abspath(model_dir), scan_layers=scan_layers)
    tensors, sources = _read_tensors(model_dir, allow_pickle)
    model = load_params(cfg, tensors, sources=sources, allow_nonfinite=allow_nonfinite)
    return model


def load_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], *, sources: dict[str, str] | None = None,
                allow_nonfinite: bool = False) -> Decoder:
    """Build a Decoder from HF-named tensors, checking every name, shape, dtype and value.

    sources: the file each tensor came from (named in errors). Non-finite values raise
    CheckpointError unless `allow_nonfinite`, which warns instead. Names and shapes are checked in
    the unrolled layout (one entry per layer, as HF names them); a `cfg.scan_layers` model gets
    them stacked by `dms_jax.stacking.stack_layers` on the host, then moved to the device once.
    """
    sources = sources or {}
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    abstract = nnx.eval_shape(lambda: Decoder(unrolled, rngs=nnx.Rngs(0)))
    expected = dict(_flatten(nnx.to_pure_dict(nnx.state(abstract))))
    loaded: dict[str, Any] = {}
    unexpected, nonfinite = [], []
    for name, array in tensors.items():
        hit = hf_name_to_param(name)
        if hit is None or (hit[0] not in expected and not (cfg.tie_word_embeddings and hit[0] == "lm_head.kernel")):
            unexpected.append(name)
            continue
        path, transform = hit
        if path == "lm_head.kernel" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        source = sources.get(name, "the checkpoint")
        check_tensor_dtype(name, array, path, source)
        value = transform(np.asarray(array))
        want = expected[path]
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(array.shape)}, but parameter {path} needs "
                f"{tuple(want.shape)} (as stored in HF layout: {_hf_shape(path, want.shape)})"
            )
        bad = count_nonfinite(value)
        if bad:
            nonfinite.append(f"{name} ({bad} of {value.size} values, in {source})")
        loaded[path] = value.astype(want.dtype, copy=False)  # numpy: on the device once, below
    if nonfinite:
        listed = "; ".join(nonfinite[:10]) + (" ..." if len(nonfinite) > 10 else "")
        if not allow_nonfinite:
            raise CheckpointError(
                f"{len(nonfinite)} tensor(s) hold NaN or Inf values: {listed}. The weights are "
                "damaged (or a training run diverged); use an intact copy, or pass "
                "allow_nonfinite=True to load them anyway")
        warnings.warn(f"loading {len(nonfinite)} tensor(s) with NaN or Inf values (allow_nonfinite=True): "
                      f"{listed}; the model's outputs will not be meaningful", RuntimeWarning, stacklevel=3)
    if unexpected:
        raise CheckpointError(
            f"unexpected tensors for {cfg.architecture}: {sorted(unexpected)[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}; check config.json matches the weights"
        )
    missing = []
    for path, want in expected.items():
        if ".attn.dms_" in path and path not in loaded:  # a fresh adapter: RMSNorm scale 1, projection 0 (docs/dms.md section 1)
            fill = np.ones if path.endswith(".scale") else np.zeros
            loaded[path] = fill(want.shape, want.dtype)
        elif path not in loaded:
            missing.append(path)
    if missing:
        names = [param_to_hf_name(p)[0] for p in missing]
        raise CheckpointError(f"missing tensors for {cfg.architecture}: {names[:10]}{' ...' if len(names) > 10 else ''}")
    if cfg.scan_layers:  # the stacked model's abstract layout (the unrolled one serves as is)
        loaded = stacking.stack_layers(loaded, cfg.num_layers)
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    for path in list(loaded):
        _set_path(pure, path, jnp.asarray(loaded.pop(path)))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _hf_shape(path, shape):
    return tuple(reversed(shape)) if path.endswith("kernel") else tuple(shape)


def save_pretrained(model: Decoder, out_dir: str, *, max_shard_bytes: int = 2 * 1024**3, tokenizer=None,
                    extra_config: dict | None = None) -> str:
    """Write an HF-layout directory (config.json, safetensors, tokenizer files).

    The directory is written under a temporary name beside `out_dir` and renamed into place,
    so a failed export never leaves a directory that looks valid. An existing `out_dir` is
    replaced only after the new one is complete, and only when it is a previous export (or
    empty): a directory holding anything else, or a file, is refused (ExportTargetError) and
    left as it is. Temporary directories of killed earlier exports to the same name are removed.
    extra_config: further top-level entries for config.json (e.g. what a training run reached).
    """
    from safetensors.numpy import save_file

    cfg: ModelConfig = model.config
    out_dir = os.path.abspath(out_dir)
    export_target.check_export_target(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    export_target.remove_stale_temporaries(out_dir)
    tmp = export_target.make_temporary(out_dir, "tmp")
    try:
        tensors = {}
        params = {path: np.asarray(jax.device_get(value))
                  for path, value in _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
        if cfg.scan_layers:  # HF names one tensor per layer: the stacked entries' slices (views)
            params = stacking.unstack_layers(params, cfg.num_layers)
        for path, arr in params.items():
            name, transform = param_to_hf_name(path)
            if arr.dtype == jnp.bfloat16:
                arr = arr.astype(np.float32)  # safetensors.numpy has no bfloat16; widen losslessly
            tensors[name] = transform(arr)
        shards = _shard(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for n, shard in enumerate(shards):
                fn = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fn), metadata={"format": "pt"})
                weight_map.update({k: fn for k in shard})
                total += sum(a.nbytes for a in shard.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        hf = hf_config_from_model_config(cfg)
        if any(a.dtype == np.float32 for a in tensors.values()):
            hf["dtype"] = "float32"
        hf.update(extra_config or {})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif cfg.name_or_path and os.path.isdir(cfg.name_or_path):
            for fn in TOKENIZER_FILES:
                src = os.path.join(cfg.name_or_path, fn)
                if os.path.exists(src):
                    shutil.copy2(src, os.path.join(tmp, fn))
        export_target.write_marker(tmp)
        _make_readable(tmp)
        if export_target.check_export_target(out_dir):  # again: it may have changed meanwhile
            old = export_target.make_temporary(out_dir, "old")
            os.rename(out_dir, os.path.join(old, "x"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _make_readable(directory):
    """mkdtemp makes a private (0700) directory: give the export the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for fn in os.listdir(directory):
        os.chmod(os.path.join(directory, fn), 0o666 & ~umask)


def _shard(tensors: dict, max_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    return shards


def load_tokenizer(path_or_dir: str):
    """The HF tokenizer of a model directory, or None when it ships none. Malformed tokenizer
    files raise ConfigError naming the file."""
    if not any(os.path.exists(os.path.join(path_or_dir, fn)) for fn in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if os.path.isfile(os.path.join(path_or_dir, fn)):
            read_json(os.path.join(path_or_dir, fn), f"tokenizer file {fn}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_dir, trust_remote_code=False)
    except Exception as err:  # transformers / tokenizers raise many types for a damaged file
        raise ConfigError(f"the tokenizer in {path_or_dir} cannot be loaded ({type(err).__name__}: {err}); "
                          "its tokenizer files are damaged or incomplete") from err
