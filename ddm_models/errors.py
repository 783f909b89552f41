"""The one base of every error `ddm_models` raises on purpose: a caller (the command line, a node)
catches `ModelError` and shows its message; anything else from this package is a bug."""


class ModelError(Exception):
    """A model, data set, checkpoint or configuration cannot be used; the message says which and why."""
