"""keiryo's exception tree.

Every failure keiryo reports to a user is a :class:`KeiryoError`; the CLI maps
it to a one-line message and a non-zero exit code (``--debug`` shows the
traceback). Messages say what was received and what was expected.

::

    KeiryoError
    ├── ConfigError              unknown field, bad value, unknown recipe step
    ├── InputFileError           a missing, unreadable or corrupt input file
    ├── DataError                data that does not fit (shape, classes, NaN/Inf)
    ├── ModelLoadError           factory path, weights, pickle payloads
    ├── PassError                a compression pass could not be applied
    ├── UnsupportedOpError       an op an exporter or pass cannot handle
    ├── ExportError              export to a format failed
    │   └── ParityError          export does not match the torch model
    ├── RuntimeSessionError      a runtime could not load or run a model
    ├── BackendUnavailableError  an optional extra is not installed
    ├── IntegrityError           hash or signature mismatch
    │   └── TrustError           registry metadata refused (expired, rolled back, unsigned, mismatched)
    ├── ConstraintNotMetError    no candidate meets the budget
    ├── TransferError            a download failed on the way (network, server); worth retrying
    └── PackageNotFoundError     unknown package, version or alias
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "ConstraintNotMetError",
    "DataError",
    "ExportError",
    "InputFileError",
    "IntegrityError",
    "KeiryoError",
    "ModelLoadError",
    "PackageNotFoundError",
    "ParityError",
    "PassError",
    "RuntimeSessionError",
    "TransferError",
    "TrustError",
    "UnsupportedOpError",
]


class KeiryoError(Exception):
    """Root of every error keiryo raises on purpose."""

    exit_code: int = 1


class ConfigError(KeiryoError):
    """A configuration, recipe or CLI option is invalid."""

    exit_code = 2


class InputFileError(KeiryoError):
    """An input file is missing, unreadable or corrupt."""

    exit_code = 2


class DataError(KeiryoError):
    """Data does not fit the model or contains invalid values."""

    exit_code = 3


class ModelLoadError(KeiryoError):
    """A model factory or its weights could not be loaded."""

    exit_code = 3


class PassError(KeiryoError):
    """A compression pass could not be applied."""


class UnsupportedOpError(KeiryoError):
    """An operator or layer is not supported by an exporter or pass."""

    def __init__(self, message: str, *, op: str | None = None, layer: str | None = None):
        super().__init__(message)
        self.op = op
        self.layer = layer


class ExportError(KeiryoError):
    """Exporting a model to a deployment format failed."""


class ParityError(ExportError):
    """An exported model's outputs differ from the torch model beyond tolerance."""

    def __init__(self, message: str, *, max_abs_diff: float, top1_agreement: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.top1_agreement = top1_agreement


class RuntimeSessionError(KeiryoError):
    """A runtime session could not load or run a model file."""


class BackendUnavailableError(KeiryoError):
    """An optional backend is not installed; the message names the extra."""

    def __init__(self, backend: str, extra: str):
        super().__init__(f"{backend} is not installed; install it with: pip install 'keiryo[{extra}]'")
        self.backend = backend
        self.extra = extra


class IntegrityError(KeiryoError):
    """A file's hash or signature does not match."""


class TrustError(IntegrityError):
    """The registry's TUF metadata was refused: expired, rolled back, badly signed, or not matching a file."""


class TransferError(KeiryoError):
    """A download failed on the way (connection refused, reset, timed out): nothing wrong was received."""


class ConstraintNotMetError(KeiryoError):
    """No candidate meets the requested budget."""


class PackageNotFoundError(KeiryoError):
    """An unknown package, version or alias was requested."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty), cut to ``limit``."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
