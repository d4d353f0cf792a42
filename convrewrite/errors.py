"""User-facing exceptions: each carries one sentence naming what was found and what to do."""


class ConvRewriteError(Exception):
    """Base class of every error convrewrite raises on purpose."""


class UnsupportedModelError(ConvRewriteError):
    """The model (or one of its layers) cannot be walked or rebuilt faithfully."""


class ProfileError(ConvRewriteError):
    """A device profile / cost model file is missing, corrupt, or of an unknown version."""


class VerificationError(ConvRewriteError):
    """A rewritten model does not match the original within tolerance.

    report: the VerificationReport that failed (its checks and fallbacks), where one exists."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


class PlanError(ConvRewriteError):
    """A plan names an unknown site or implementation, or one that does not apply."""


class WeightFileError(ConvRewriteError):
    """A weight file (or a source model) does not fit the model its weights are loaded into."""


class UnsupportedBackendError(ConvRewriteError, ImportError):
    """Keras runs a backend convrewrite has no operations for (it runs on TensorFlow and JAX)."""
