"""train.py's command line around ml_collections' config flags: `--help` lists every config field
with its default (exit 0), and a misspelt `--config.<field>` is one line naming the field and the
close matches instead of a traceback.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any

HELP_FLAGS = ("-h", "--help", "--helpshort", "-?")


def config_file_from_argv(argv: list[str], default: str) -> str:
    """The --config FILE (or --config=FILE) of argv, else `default`."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def load_config_file(path: str):
    """get_config() of a config file (configs/*.py); None when it cannot be loaded here (the
    config flag itself then reports the problem)."""
    local = path.split(":", 1)[0] if not os.path.isfile(path) else path
    if not os.path.isfile(local):
        return None
    try:
        spec = importlib.util.spec_from_file_location("dms_train_cli_config", local)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception:
        return None


def _is_section(node: Any) -> bool:
    return hasattr(node, "keys") and hasattr(node, "__getitem__")


def config_fields(config, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, default) of every leaf field, in the config's order."""
    fields = []
    for key in config.keys():
        value = config[key]
        name = f"{prefix}{key}"
        if _is_section(value) and len(list(value.keys())):
            fields.extend(config_fields(value, name + "."))
        else:
            fields.append((name, value.to_dict() if hasattr(value, "to_dict") else value))
    return fields


def unknown_field(config, argv: list[str]) -> str | None:
    """The problem with the first --config.<field>=... of argv that names no field of `config`."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in dotted.split("."):
            if not _is_section(node):
                return (f"unknown config field {dotted}: {'.'.join(walked)} is a value, not a section "
                        f"(set it with --config.{'.'.join(walked)}=VALUE)")
            keys = list(node.keys())
            if part not in keys:
                where = ".".join(walked)
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
                hint = (f"; did you mean {' or '.join(('.'.join(walked + [c])) for c in close)}?" if close
                        else f"; {where or 'the config'} has {', '.join(map(str, keys))}")
                return f"unknown config field {dotted}{hint} (train.py --help lists every field)"
            node, walked = node[part], walked + [part]
    return None


def help_text(doc: str, config_path: str, config) -> str:
    lines = [doc.strip(), ""]
    if config is None:
        lines.append(f"(the config file {config_path} could not be loaded to list its fields)")
    else:
        lines.append(f"Config fields of {config_path} with their defaults "
                     "(override any with --config.<field>=value):")
        lines.extend(f"  --config.{name}={value!r}" for name, value in config_fields(config))
    lines += ["", "Other flags: --config FILE (a configs/*.py file), --verbosity=0 (tracebacks on errors, "
              "orbax's INFO log), --helpfull (every absl flag)."]
    return "\n".join(lines)
