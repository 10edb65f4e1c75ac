"""Signs that a run is training nothing while it looks fine: gradients that vanish (a grad norm of
exactly 0, e.g. saturated decisions after an absurd learning rate) and a compression ratio that
falls far behind the schedule's. The loop shows them in the progress bar, logs each once, writes
them into the metrics and records them in the export's config.json.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

ZERO_GRAD_STEPS = 3  # consecutive steps with a gradient norm of exactly 0 before the run says so
CR_WINDOW = 10  # steps averaged for the compression-ratio check
# far behind: the evicted fraction reached is below this share of the one the schedule asks for
# (healthy tiny retrofits reach ~0.8 of it once the ramp ends; a run with vanished gradients ~0.55)
CR_BEHIND = 0.6


def evicted_fraction(cr: float) -> float:
    return 1.0 - 1.0 / max(float(cr), 1.0)


def cr_far_behind(achieved_cr: float, target_cr: float) -> bool:
    target = evicted_fraction(target_cr)
    return target > 0 and evicted_fraction(achieved_cr) < CR_BEHIND * target


class TrainingHealth:
    """Watches the per-step records; `update(record, step)` adds `zero_grad_steps` (and `warning`
    while one is active) to the record and returns the active warnings; `show(progress)` puts
    them in the progress bar's description."""

    def __init__(self, cr_steps: int, bar_label: str = ""):
        self.cr_steps = int(cr_steps)
        self.bar_label = bar_label
        self.zero_grad_steps = 0
        self.window: list[tuple[float, float]] = []  # (achieved, target) CR after the ramp
        self.warnings: list[str] = []  # every distinct warning so far, in order
        self.active: list[str] = []
        self._shown: list[str] = []

    def _note(self, active: list[str], kind: str, message: str) -> None:
        active.append(message)
        if not any(w.startswith(kind) for w in self.warnings):
            log.warning("%s", message)
            self.warnings.append(message)

    def update(self, record: dict, step: int) -> list[str]:
        active: list[str] = []
        grad_norm = record.get("grad_norm")
        self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0.0 else 0
        record["zero_grad_steps"] = self.zero_grad_steps
        if self.zero_grad_steps >= ZERO_GRAD_STEPS:
            self._note(active, "gradients vanished",
                       f"gradients vanished: the gradient norm has been exactly 0 for {self.zero_grad_steps} "
                       f"steps (since step {step - self.zero_grad_steps + 1}); nothing is learned. "
                       "A learning rate far too high saturates the decisions: lower train.learning_rate")
        if "achieved_cr" in record and step > self.cr_steps:
            self.window = (self.window + [(record["achieved_cr"], record["target_cr"])])[-CR_WINDOW:]
            if len(self.window) == CR_WINDOW:
                achieved, target = np.mean(self.window, axis=0)
                if cr_far_behind(achieved, target):
                    self._note(active, "compression far behind",
                               f"compression far behind the schedule: CR {achieved:.2f} reached against "
                               f"{target:.2f} asked (mean of the last {CR_WINDOW} steps)")
        if active:
            record["warning"] = "; ".join(active)
        self.active = active
        return active

    def show(self, progress) -> None:
        """The progress bar's description: its label, then `WARNING: <what>` while one is active."""
        kinds = [a.split(":")[0] for a in self.active]
        if kinds != self._shown:
            self._shown = kinds
            progress.set_description(self.bar_label + (f" WARNING: {'; '.join(kinds)}" if kinds else ""),
                                     refresh=False)

    def final(self, reached_cr: float | None, target_cr: float | None) -> list[str]:
        """Every warning of the run, plus one when the CR reached at the end is far behind."""
        if reached_cr is not None and target_cr is not None and cr_far_behind(reached_cr, target_cr):
            message = (f"compression far behind the schedule: the run reached CR {reached_cr:.2f} "
                       f"against {target_cr:.2f} asked at its end")
            if message not in self.warnings:
                log.warning("%s", message)
                self.warnings.append(message)
        return list(self.warnings)
