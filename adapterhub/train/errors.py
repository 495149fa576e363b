"""The error every training problem raises: bad data, a strategy that does not fit, a diverged loss."""


class TrainingError(ValueError):
    """What went wrong, with the example, step or module, and what would fix it."""
