"""Exceptions raised by the model library. Every one names what was wrong, so callers can show it."""


class ModelInputError(ValueError):
    """Input that the library refuses: wrong shape, NaN, unknown class, empty pool, zero budget..."""


class UnknownClassError(ModelInputError, KeyError):
    """A class name that the label hierarchy does not contain."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown class"


class HierarchyError(ModelInputError):
    """A label hierarchy that cannot be used (a fine class without a parent, duplicates, too few classes)."""
