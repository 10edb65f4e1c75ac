"""Where an export may go: a new path, an empty directory, or a previous export, never a directory
holding anything else (an export replaces its directory whole).

An export writes a marker file listing its own files; a directory is a previous export when every
entry in it is one of those (or, for exports without a marker, one of the files a Hugging Face
model directory holds: config.json, safetensors, index, tokenizer and generation files).
Temporary directories beside the target (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`) left by a killed
export are removed by the next export to the same NAME once their process is gone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

MARKER = ".dms_jax_export.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
_MODEL_FILES = re.compile(r"(config\.json|model\.safetensors|model\.safetensors\.index\.json|"
                          r"model-\d+-of-\d+\.safetensors)$")


class ExportTargetError(ValueError):
    """The export target exists and is not something an export may replace."""


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _own_files(out_dir: str) -> set[str] | None:
    """The files the export in `out_dir` wrote, from its marker (None without one)."""
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            files = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(files) | {MARKER} if isinstance(files, list) else None


def check_export_target(out_dir: str) -> bool:
    """Raise ExportTargetError unless `out_dir` may receive an export; True when it exists (a
    previous export or an empty directory, replaced once the new export is complete)."""
    out_dir = os.path.abspath(out_dir)
    if not os.path.lexists(out_dir):
        return False
    if not os.path.isdir(out_dir):
        raise ExportTargetError(
            f"export directory {out_dir} exists and is a file, not a directory; pick another "
            "export path (nothing was written)")
    entries = os.listdir(out_dir)
    own = _own_files(out_dir)
    if own is not None:
        foreign = [e for e in entries if e not in own]
    else:
        foreign = [e for e in entries if not (_MODEL_FILES.match(e) or e in TOKENIZER_FILES)
                   or os.path.isdir(os.path.join(out_dir, e))]
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ExportTargetError(
            f"export directory {out_dir} exists and holds files that are not a dms-jax export "
            f"({shown}); an export replaces its directory whole, so it refuses to write there: "
            "pick a new or empty directory, or move those files away")
    if _inside(os.path.abspath(os.getcwd()), out_dir):
        raise ExportTargetError(
            f"export directory {out_dir} is (or holds) the current working directory; an export "
            "replaces its directory whole: pick a new directory such as ./export")
    return True


def write_marker(directory: str) -> None:
    """Record the export's own files (call last, once every file is written)."""
    files = sorted(os.listdir(directory)) + [MARKER]
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump({"format": "dms-jax export", "files": files}, f, indent=1)


def make_temporary(out_dir: str, kind: str) -> str:
    """A fresh `.NAME.{kind}-PID-*` directory beside `out_dir` (kind: "tmp" or "old")."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` directories beside `out_dir` whose export process is
    gone (a killed export's leftovers); only this naming pattern, only for this NAME."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    pattern = re.compile(r"\." + re.escape(name) + r"\.(tmp|old)-(?:(\d+)-)?[a-z0-9_]+$")
    removed = []
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        path = os.path.join(parent, entry)
        if not m or not os.path.isdir(path) or os.path.islink(path):
            continue
        pid = int(m.group(2)) if m.group(2) else None  # exports before the pid was in the name: stale
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
