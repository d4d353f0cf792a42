"""Import TensorFlow without its start-up INFO lines on stderr.

TensorFlow 2.21 logs "oneDNN custom operations are on" through absl before absl's logging is set up, so
TF_CPP_MIN_LOG_LEVEL does not silence it: every `convrewrite` command would print two such lines before
its own one-line answer. While TensorFlow is imported, stderr's file descriptor points at a temporary
file; afterwards everything but absl INFO lines (and absl's note that logging is not yet initialized) is
written back, so warnings and errors still reach the user. One error line is dropped too: a CUDA build of
TensorFlow (the `tensorflow` package, which e.g. keras-hub's tensorflow-text installs beside tensorflow-cpu)
reports "failed call to cuInit" when it looks for GPUs on a machine without a CUDA driver, which is no error
for CPU use; the devices are therefore listed once while stderr is captured. (If the import kills the process outright, e.g.
TensorFlow's fatal CPU-feature check, its message is lost with it: set TF_CPP_MIN_LOG_LEVEL=0 to import
without this filter and see it.)
"""

import os
import re
import sys
import tempfile

_ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_CUDA_DRIVER = re.compile(r"^E\d{4} \d\d:\d\d:\d\d.*\] failed call to cuInit")


def filter_startup_lines(text: str) -> str:
    """`text` without absl INFO lines, absl's preamble line and a CUDA build's "failed call to cuInit" on a
    machine without a CUDA driver; every other line kept, in order."""
    kept = [line for line in text.splitlines(keepends=True)
            if not (_ABSL_INFO.match(line) or line.startswith(_ABSL_PREAMBLE) or _NO_CUDA_DRIVER.match(line))]
    return "".join(kept)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow now, filtering its start-up INFO lines, unless that would hide what was asked for.

    Also on Keras's other backends where TensorFlow is installed: Keras imports it there too (its data
    adapters and saving code do), and its start-up lines would then appear in the middle of a run. Does
    nothing when TensorFlow is already imported, when it is not installed on another backend, or when
    TF_CPP_MIN_LOG_LEVEL asks for INFO lines (unset or "0" after convrewrite's default of "2")."""
    import importlib.util

    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    if "tensorflow" in sys.modules or not level.isdigit() or int(level) < 1:
        return
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow" and importlib.util.find_spec("tensorflow") is None:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr descriptor: import as is
        _import_tensorflow()
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            _import_tensorflow()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            rest = filter_startup_lines(captured.read().decode("utf-8", errors="replace"))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


def _import_tensorflow():
    try:
        import tensorflow
    except ImportError:  # Keras reports a missing backend itself, with install advice
        return
    tensorflow.config.list_physical_devices()  # device discovery now, while its start-up lines are filtered
