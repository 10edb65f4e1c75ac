"""Metrics sinks: a JSONL file (always) and TensorBoard (when a writer package is installed)."""
from __future__ import annotations

import json
import os


def _tensorboard_writer(log_dir):
    for module in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(log_dir)
        except Exception:  # package (or its tensorboard dependency) missing
            continue
    return None


class MetricsWriter:
    """Appends one JSON object per step to <dir>/metrics.jsonl (resumed runs keep appending)."""

    def __init__(self, directory: str | None, *, tensorboard: bool = True):
        self.path = self._file = self._tb = None
        if not directory:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
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


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
