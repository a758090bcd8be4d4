"""The base of every user-facing error: its message is one line naming the file or key."""


class EfsoloError(ValueError):
    """Bad input or configuration; entry points print ``error: <message>`` and exit 1."""


class TrainingError(EfsoloError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
