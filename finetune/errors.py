"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class FinetuneError(Exception):
    """A mistake the user can act on (bad recipe, bad data, missing file)."""

    exit_code = 2


class ConfigError(FinetuneError):
    """A recipe key or value that is unknown, mistyped or impossible."""


class DataError(FinetuneError):
    """Data that cannot be used: missing file or column, empty split, bad rows."""


class ModelError(FinetuneError):
    """A checkpoint that cannot be found or loaded."""


class RunFolderError(FinetuneError):
    """A run folder that would be overwritten or is not a finished run."""


class HubError(FinetuneError):
    """A push to or a pull from the Hugging Face Hub that failed (token, network, repo)."""
