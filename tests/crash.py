"""A simulated crash for the trainer's `on_step` hook (kill-and-resume tests)."""


class Killed(Exception):
    """Raised by `kill_at` in place of the process dying."""


def kill_at(at_step: int):
    """An `on_step(step, record)` hook that raises `Killed` once step `at_step` is done."""

    def on_step(step, record):
        if step == at_step:
            raise Killed

    return on_step
