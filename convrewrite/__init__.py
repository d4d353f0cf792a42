"""convrewrite: measure, choose and prove equivalent the fastest implementation of each convolution.

    fast = convrewrite.optimize(model)      # new model, verified equivalent; `model` is untouched
    print(convrewrite.plan(model).summary())
"""

import os as _os

# TensorFlow's C++ INFO/WARNING start-up lines otherwise clutter every CLI call; set it yourself to override.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import reference  # noqa: I001  pure numpy: usable without TensorFlow
from .errors import (ConvRewriteError, PlanError, ProfileError, UnsupportedBackendError, UnsupportedModelError,
                     VerificationError, WeightFileError)
from .spec import ConvSpec

try:
    from ._quiet_import import import_tensorflow_quietly as _import_tensorflow_quietly

    _import_tensorflow_quietly()
    # implementations first: the layer modules it imports register themselves against it.
    from . import implementations
    from . import layers
    from .api import build, optimize, plan, verify
    from . import device, profiles
    from .cost import CostModel
    from .device import fingerprint
    from .planner import Plan, PlanRow
    from .profile import profile_device
    from .verify import VerificationReport
    from .weights import RewrittenModel, transfer_weights
except UnsupportedBackendError as _exc:  # e.g. KERAS_BACKEND=torch: only the numpy reference (and ConvSpec) work
    _BACKEND_ERROR = f"is not available: {_exc} Only convrewrite.reference and convrewrite.ConvSpec work without it."
except ModuleNotFoundError as _exc:  # no backend: only the numpy reference (and ConvSpec) work
    if (_exc.name or "").split(".")[0] not in ("tensorflow", "jax", "torch"):
        raise
    _BACKEND_ERROR = (f"needs Keras with a working backend, but importing it failed ({_exc}); install "
                      f"TensorFlow with pip install 'convrewrite[cpu]' (or '[gpu]'), or JAX with "
                      f"pip install 'convrewrite[jax]' and KERAS_BACKEND=jax. Only convrewrite.reference "
                      f"and convrewrite.ConvSpec work without it.")
else:
    _BACKEND_ERROR = None

if _BACKEND_ERROR is not None:
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"convrewrite.{name} {_BACKEND_ERROR}")

from .version import __version__  # noqa: E402

__all__ = [
    "optimize", "plan", "verify", "build", "profile_device", "CostModel", "fingerprint", "device", "profiles",
    "transfer_weights", "RewrittenModel",
    "layers", "reference", "implementations",
    "Plan", "PlanRow", "ConvSpec", "VerificationReport",
    "ConvRewriteError", "PlanError", "ProfileError", "UnsupportedModelError", "VerificationError",
    "WeightFileError",
]
