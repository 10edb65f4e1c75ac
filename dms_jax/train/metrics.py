"""Metrics sinks: a JSONL file (always) and TensorBoard (when a writer package is installed).

A resumed run first cuts metrics.jsonl back to the step it resumed from (the steps it replays
are written again, once) and drops a line torn by a kill during a write; readers skip such
lines with a warning naming the file and the line.
"""
from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger(__name__)


def _tensorboard_writer(log_dir):
    for module in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(log_dir)
        except Exception:  # package (or its tensorboard dependency) missing
            continue
    return None


def load_records(path: str, upto_step: int | None = None) -> list[dict]:
    """The JSON records of a metrics file (those with step <= upto_step when given), skipping
    lines that do not parse (a torn write) with a warning naming the file and the line."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                log.warning("%s, line %d: skipped, not a JSON record (%s; a write cut short?)", path, number, err.msg)
                continue
            if not isinstance(record, dict):
                log.warning("%s, line %d: skipped, not a JSON object", path, number)
                continue
            step = record.get("step")
            if upto_step is None or (isinstance(step, int) and step <= upto_step):
                records.append(record)
    return records


def truncate_records(path: str, upto_step: int) -> int:
    """Rewrite `path` with only its intact records up to `upto_step` (atomically); returns the
    number of lines dropped. A fresh run (upto_step 0) over an earlier run's records moves that
    file aside to metrics-<time>.jsonl instead of discarding it."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    kept = load_records(path, upto_step)
    dropped = len(lines) - len(kept)
    if not dropped:
        return 0
    if upto_step == 0:
        aside = os.path.join(os.path.dirname(path), time.strftime("metrics-%Y%m%d-%H%M%S.jsonl"))
        os.replace(path, aside)
        log.warning("%s held %d records of an earlier run; moved them to %s", path, dropped, aside)
        return dropped
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Appends one JSON object per step to <dir>/metrics.jsonl. A run resumed at step S keeps the
    file's records up to S (the replayed steps are written again, not duplicated)."""

    def __init__(self, directory: str | None, *, tensorboard: bool = True, resume_step: int = 0):
        self.path = self._file = self._tb = None
        if not directory:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        truncate_records(self.path, resume_step)
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(directory, "tensorboard"))

    def write(self, record: dict):
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
