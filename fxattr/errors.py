"""The one exception type fxattr raises for bad arguments, inputs and graphs."""


class FxattrError(ValueError):
    """A bad argument, input or model, reported by the fxattr function that saw it.

    Subclasses ``ValueError`` so ``except ValueError`` keeps working; every message starts with
    the name of the fxattr function (``fxattr.integrated_gradients: ...``) and names the argument
    or graph node at fault.
    """


def fail(where: str, message: str) -> FxattrError:
    """Builds the error for ``raise``: ``fail("integrated_gradients", "steps must be >= 1")``."""
    return FxattrError(f"fxattr.{where}: {message}")
