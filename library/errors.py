"""Errors raised by the library. Each names the problem; none leaves a library half-written."""


class AdaptermixError(Exception):
    """Base class of every error adaptermix raises on purpose."""


class AdapterFormatError(AdaptermixError, ValueError):
    """A checkpoint is missing, malformed or inconsistent (config, tensor names, shapes)."""


class UnsafeCheckpointError(AdapterFormatError):
    """A pickle checkpoint (.bin / .pt) was offered without `allow_pickle=True`."""


class UnsupportedAdapterError(AdapterFormatError):
    """A PEFT method other than plain LoRA (DoRA, LoHa, IA3, ...), named in the message."""


class AdapterValidationError(AdaptermixError, ValueError):
    """An adapter does not fit the library: unknown module, wrong shape, NaN/Inf, bad name."""


class BaseModelMismatchError(AdapterValidationError):
    """An adapter (or a generator, a router) was made for another base model."""


class DuplicateAdapterError(AdaptermixError, ValueError):
    """The name is taken (pass replace=True), or identical content is already stored."""


class AdapterNotFoundError(AdaptermixError, KeyError):
    """No adapter of that name in the library."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class LibraryError(AdaptermixError):
    """The library folder is missing, of another format version, or busy."""


class LibraryBusyError(LibraryError):
    """Another process held the library's write lock for longer than the timeout."""


class FolderNotOwnedError(LibraryError):
    """adaptermix was asked to replace a folder it did not create and mark as its own; nothing was deleted."""


class UnsafeLibraryError(LibraryError):
    """A library holds a path that escapes its folder, or a symbolic link: it is refused, not followed."""


class CorruptAdapterError(LibraryError):
    """An adapter file does not match the size and checksum the catalog recorded for it."""


class CorruptCatalogError(LibraryError):
    """catalog.sqlite is not a readable SQLite database (truncated, overwritten, or not a catalog)."""


class RouterOutputError(AdaptermixError, ValueError):
    """A router returned weights that are NaN / infinite, or adapter ids outside [-1, N)."""


class AdapterTextMissingError(AdaptermixError, ValueError):
    """A router that reads the adapters' descriptions / example prompts met adapters with neither (named)."""


class CalibrationMismatchError(AdaptermixError, ValueError):
    """Saved routing statistics were computed for another router configuration (score, calibration text)."""
