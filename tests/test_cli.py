"""The `convrewrite` command end to end: real subprocesses on saved models, and every bad-input case."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from convrewrite.cli import EXIT_CODES, atomic_path, parse_pac, CliError
from conftest import BACKEND

SUBCLASSED_MODULE = '''
import keras

@keras.saving.register_keras_serializable(package="clitest")
class Tiny(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(2, 3)

    def call(self, x):
        return self.conv(x)


@keras.saving.register_keras_serializable(package="clitest")
class Noisy(keras.layers.Layer):
    """Adds fresh noise on every call: no rewrite of a model holding it can ever verify."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed = keras.random.SeedGenerator(7)  # JAX traces only seeded random ops

    def call(self, x):
        return x + keras.random.normal(keras.ops.shape(x), seed=self.seed)
'''

# Imported only by the subprocesses (via --custom-objects clitest_hooks:Hook), never by this process: it
# patches convrewrite / Keras / os as CLITEST_HOOK says, to stage failures and interrupts at exact points.
HOOKS_MODULE = '''
import json, os, time

HOOK = os.environ.get("CLITEST_HOOK", "")
MARKER = os.environ.get("CLITEST_MARKER", "")


class Hook:
    pass


def _mark(text=""):
    with open(MARKER + ".part", "w") as f:
        f.write(text)
    os.replace(MARKER + ".part", MARKER)


if HOOK == "block_import":  # an interrupt while the command is starting up
    _mark()
    time.sleep(600)

if HOOK == "wrong_depthwise":  # a deliberately wrong implementation: every depthwise site falls back
    import numpy as np
    from convrewrite import implementations, kernels

    class WrongDepthwise(kernels.Depthwise):
        def transfer_weights(self, old_layer, new_layer, spec):
            super().transfer_weights(old_layer, new_layer, spec)
            new_layer.set_weights([2.0 * np.asarray(w) for w in new_layer.get_weights()])

    implementations.register(WrongDepthwise())

if HOOK == "slow_export":  # an interrupt while the SavedModel temporary is being written
    import keras

    _export = keras.Model.export

    def export(self, filepath, *args, **kwargs):
        _export(self, filepath, *args, **kwargs)
        _mark(str(filepath))
        time.sleep(600)

    keras.Model.export = export

if HOOK == "wrong_artifact":  # an exported artifact that computes something else in its runtime
    from convrewrite import export as _export_module

    _load_runner = _export_module.load_runner

    def load_runner(path, fmt, **kwargs):
        run = _load_runner(path, fmt, **kwargs)
        return lambda inputs: [2.0 * o for o in run(inputs)]

    _export_module.load_runner = load_runner

if HOOK in ("record_renames", "crash_before_dir_rename"):  # the order outputs are committed in
    _replace = os.replace

    def replace(src, dst):
        with open(MARKER, "a") as f:
            f.write(json.dumps([os.path.basename(str(src)), os.path.basename(str(dst))]) + "\\n")
        if (HOOK == "crash_before_dir_rename" and os.path.basename(str(dst)) == "sm"
                and ".tmp" in os.path.basename(str(src))):
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C (or the machine died) right here
        return _replace(src, dst)

    os.replace = replace
'''


_CLI_CACHE = tempfile.mkdtemp(prefix="convrewrite-cli-cache-")
SHIPPED_XEON_PROFILE = (Path(__file__).resolve().parent.parent / "cost_models"
                        / "x86_64-cpu-2threads-tensorflow-genuineintel-6-167-1-3f3bd99c.json")


def _run(args, cwd, script=False, env_extra=None, timeout=300):
    """The CLI in a subprocess, with a cache folder of its own (a quick profile measured for a device with
    no shipped profile, or tactic timings, must not land in the user's ~/.cache) and no extra profile
    folder from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if k != "CONVREWRITE_COST_MODELS"}
    env["CONVREWRITE_CACHE"] = _CLI_CACHE
    env.update(env_extra or {})
    cmd = (["convrewrite"] if script else [sys.executable, "-m", "convrewrite"]) + args
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _pythonpath(folder):
    """PYTHONPATH with `folder` (the test's modules) first, keeping the caller's."""
    return os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH", "")]))


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_temp_files(folder):
    return not [p.name for p in folder.iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    seq = keras.Sequential([keras.Input((12, 12, 4)), keras.layers.Conv2D(8, 3, groups=4, padding="same", name="g"),
                            keras.layers.Conv2D(4, 11, padding="same", name="wide")], name="seq")
    seq.save(d / "seq.keras")
    seq.save(d / "legacy.h5")
    a, b = keras.Input((10, 10, 3), name="image"), keras.Input((10, 10, 2), name="aux")
    y = keras.layers.Conv2D(4, 3, padding="same", name="c1")(keras.layers.Concatenate()([a, b]))
    keras.Model([a, b], keras.layers.DepthwiseConv2D(5, padding="same", name="dw")(y)).save(d / "two_inputs.keras")
    keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35).save(d / "mobilenet.keras")
    other = keras.Sequential([keras.Input((12, 12, 4)), keras.layers.Conv2D(4, 3, padding="same")])
    other.save(d / "other.keras")
    x = keras.Input((6, 6, 2))
    keras.Model(x, keras.layers.Lambda(lambda t: t * 2.0)(keras.layers.Conv2D(2, 3)(x))).save(d / "lambda.keras")
    # groups=2 of 4 channels stays `direct`: Keras's grouped conv retraces a tf.function on every call.
    keras.Sequential([keras.Input((12, 12, 4)), keras.layers.Conv2D(8, 3, groups=2, padding="same", name="grp")],
                     name="grouped").save(d / "grouped.keras")
    (d / "clitest_layers.py").write_text(SUBCLASSED_MODULE)
    (d / "clitest_hooks.py").write_text(HOOKS_MODULE)
    sys.path.insert(0, str(d))
    try:
        import clitest_layers

        sub = clitest_layers.Tiny()
        sub(np.zeros((1, 5, 5, 1), "float32"))
        sub.save(d / "subclassed.keras")
        x = keras.Input((12, 12, 4))
        y = keras.layers.Conv2D(8, 3, groups=4, padding="same", name="g")(x)
        keras.Model(x, clitest_layers.Noisy(name="noisy")(y), name="noisy_model").save(d / "noisy.keras")
    finally:
        sys.path.remove(str(d))
    (d / "corrupt.json").write_text('{"format": "convrewrite-profile", "version": 1, "fingerp')
    (d / "notamodel.keras").write_text("this is not a model")
    (d / "fake.keras").write_bytes(b"PK\x03\x04" + b"junk" * 40)  # a zip's magic, then nothing a zip holds
    import zipfile

    with zipfile.ZipFile(d / "zip_not_model.keras", "w") as z:
        z.writestr("notes.txt", "a zip archive, but no Keras model in it")
    return d


def _assert_loads_and_matches(folder, original, converted, inputs_code):
    script = textwrap.dedent(f"""
        import numpy as np, keras, convrewrite
        a = keras.models.load_model({str(folder / original)!r})
        b = keras.models.load_model({str(folder / converted)!r})
        x = {inputs_code}
        ya = keras.ops.convert_to_numpy(a(x)); yb = keras.ops.convert_to_numpy(b(x))
        err = np.abs(ya - yb).max() / np.abs(ya).max()
        assert err <= 1e-5, err
        print("match", err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "match" in out.stdout


def test_convert_sequential_with_report_and_savedmodel(models):
    before = _digest(models / "seq.keras")
    r = _run(["convert", "seq.keras", "seq_fast.keras", "--cost-model", "rules", "--report", "report.json",
              "--export-savedmodel", "seq_savedmodel"], models, script=True)
    assert r.returncode == 0, r.stderr
    assert "WARNING:tensorflow" not in r.stderr, r.stderr
    assert "verified" in r.stdout and "depthwise" in r.stdout
    assert _digest(models / "seq.keras") == before
    report = json.loads((models / "report.json").read_text())
    assert report["verification"]["passed"] and report["plan"]["rows"][0]["choice"] == "depthwise"
    assert (models / "seq_savedmodel" / "saved_model.pb").exists()
    assert _no_temp_files(models)
    _assert_loads_and_matches(models, "seq.keras", "seq_fast.keras", "np.random.default_rng(1).standard_normal((3, 12, 12, 4)).astype('float32')")
    r = _run(["verify", "seq.keras", "seq_fast.keras", "--samples", "3"], models)
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stderr


def test_convert_two_inputs_with_shipped_profile_and_legacy_h5(models, tmp_path):
    """`--cost-model auto` finds a profile of this very device among the profiles it considers (here through
    CONVREWRITE_COST_MODELS, as it finds a shipped one), so nothing is measured: without one, `auto` would
    calibrate or measure a quick profile, whose time is the host's (over 5 minutes on JAX on some CPUs)."""
    from convrewrite import device
    from convrewrite.cost import CostModel
    from convrewrite.fitting import ImplFit

    fits = {"direct": ImplFit(["calls"], [1e-3], 3, 0.0, 0.0), "depthwise": ImplFit(["calls"], [5e-4], 3, 0.0, 0.0)}
    CostModel(device.fingerprint(), [], fits, name="this device").save(tmp_path / "profiles" / "here.json")
    r = _run(["convert", "two_inputs.keras", "two_fast.keras", "--cost-model", "auto"], models,
             env_extra={"CONVREWRITE_COST_MODELS": str(tmp_path / "profiles")})
    assert "measur" not in r.stderr and "calibrat" not in r.stderr, r.stderr  # this device's profile, as it is
    assert r.returncode == 0, r.stderr
    assert "WARNING:tensorflow" not in r.stderr, r.stderr
    _assert_loads_and_matches(models, "two_inputs.keras", "two_fast.keras",
                              "[np.random.default_rng(2).standard_normal((2, 10, 10, c)).astype('float32') for c in (3, 2)]")
    r = _run(["convert", "legacy.h5", "from_h5.keras", "--cost-model", "rules"], models)
    assert r.returncode == 0, r.stderr
    _assert_loads_and_matches(models, "seq.keras", "from_h5.keras", "np.random.default_rng(4).standard_normal((2, 12, 12, 4)).astype('float32')")


def test_convert_subclassed_model(models):
    r = _run(["convert", "subclassed.keras", "tiny_fast.keras", "--cost-model", "rules", "--custom-objects",
              "clitest_layers:Tiny"], models, env_extra={"PYTHONPATH": _pythonpath(models)})
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout


@pytest.mark.backend_agnostic("the CLI's part of it is; tests/test_applications.py converts these models on JAX")
def test_convert_application_and_plan_json(models):
    r = _run(["convert", "mobilenet.keras", "mobilenet_fast.keras", "--cost-model", "rules", "--allow", "direct,depthwise"], models)
    assert r.returncode == 0, r.stderr
    _assert_loads_and_matches(models, "mobilenet.keras", "mobilenet_fast.keras",
                              "np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype('float32')")
    r = _run(["plan", "mobilenet.keras", "--json", "--cost-model", "rules"], models)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    model = keras.models.load_model(models / "mobilenet.keras")
    n_convs = sum(type(l) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D) for l in model.layers)
    assert len(plan["rows"]) == n_convs and {row["choice"] for row in plan["rows"]} == {"direct"}
    shipped = next(p for p in (Path(__file__).resolve().parent.parent / "cost_models").glob("*.json"))
    r = _run(["plan", "seq.keras", "--json", "--cost-model", str(shipped), "--memory-limit", "1KB", "--rtol", "1e-3"], models)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert {row["choice"] for row in rows} == {"direct"} and all("memory_limit" in row["reason"] for row in rows)


@pytest.mark.parametrize("args,code,needle", [
    (["convert", "missing.keras", "out.keras"], "missing_file", "missing.keras"),
    (["plan", "notamodel.keras"], "not_a_model", "notamodel.keras"),
    (["convert", "seq.keras", "o.keras", "--cost-model", "corrupt.json"], "bad_profile", "corrupt.json"),
    (["verify", "seq.keras", "other.keras"], "verification_failed", "other.keras"),
    (["convert", "lambda.keras", "lambda_fast.keras"], "not_a_model", "--unsafe"),
    (["convert", "seq.keras", "seq.keras", "--force"], "usage", "input"),
    (["convert", "seq.keras", "o.keras", "--rtol", "-1", "--cost-model", "rules"], "usage", "--rtol"),
    (["convert", "seq.keras", "o.keras", "--rtol", "nan"], "usage", "--rtol"),
    (["verify", "seq.keras", "other.keras", "--rtol", "-0.5"], "usage", "--rtol"),
    (["verify", "seq.keras", "other.keras", "--samples", "0"], "usage", "--samples"),
    (["plan", "seq.keras", "--batch", "0"], "usage", "--batch"),
    (["convert", "seq.keras", "o.keras", "--no-such-flag"], "usage", "--no-such-flag"),
    (["plan", "seq.keras", "--custom-objects", "nosuchmod:X"], "usage", "nosuchmod"),
    (["convert", "seq.keras", "o.keras", "--custom-objects", "clitest_layers:NoSuchLayer"], "usage", "NoSuchLayer"),
    (["plan", "seq.keras", "--memory-limit", "lots"], "usage", "--memory-limit"),
    (["plan", "fake.keras"], "not_a_model", "'fake.keras' is not a Keras model file"),
    (["convert", "zip_not_model.keras", "o.keras"], "not_a_model", "'zip_not_model.keras' is not a Keras model file"),
])
@pytest.mark.backend_agnostic("argument handling, exit codes and file commits do not touch the backend")
def test_bad_input_gets_one_line_and_its_exit_code(models, args, code, needle):
    inputs = {p: _digest(p) for p in models.iterdir() if p.is_file()}
    r = _run(args, models, env_extra={"PYTHONPATH": _pythonpath(models)})
    assert r.returncode == EXIT_CODES[code], (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convrewrite: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    for p, digest in inputs.items():
        assert p.exists() and _digest(p) == digest, f"{p.name} changed"
    assert not (models / "o.keras").exists() and not (models / "sub_fast.keras").exists()
    assert _no_temp_files(models)


@pytest.mark.backend_agnostic("argument handling, exit codes and file commits do not touch the backend")
def test_existing_output_is_refused_and_untouched_then_unsafe_opt_in(models):
    (models / "taken.keras").write_bytes(b"precious")
    r = _run(["convert", "seq.keras", "taken.keras", "--cost-model", "rules"], models)
    assert r.returncode == EXIT_CODES["output_exists"] and "--force" in r.stderr
    assert (models / "taken.keras").read_bytes() == b"precious"
    r = _run(["convert", "lambda.keras", "lambda_fast.keras", "--unsafe", "--cost-model", "rules"], models)
    assert r.returncode == 0, r.stderr


@pytest.mark.backend_agnostic("argument handling, exit codes and file commits do not touch the backend")
def test_help_and_version(models):
    from convrewrite.cli import build_parser

    parser = build_parser()
    assert "exit codes" in parser.format_help()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for cmd in ("profile", "plan", "convert", "verify"):
        text = subparsers[cmd].format_help()
        assert "example:" in text and f"convrewrite {cmd}" in text
    r = _run(["convert", "--help"], models, script=True)
    assert r.returncode == 0 and "example:" in r.stdout
    r = _run(["--version"], models)
    assert r.returncode == 0 and r.stdout.startswith("convrewrite ")


def _start_and_interrupt(args, folder, hook, marker, watch=None, timeout=240):
    """Start the command with a hook that writes `marker` at an exact point and then waits; SIGINT it there.

    Returns (returncode, stderr, names in folder `watch` at the moment of the interrupt)."""
    env = dict(os.environ, PYTHONPATH=_pythonpath(folder), CLITEST_HOOK=hook, CLITEST_MARKER=str(marker))
    # SIGINT at its default in the child: a pytest started in the background by a shell without job control
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt (the command would sleep on)
    proc = subprocess.Popen([sys.executable, "-m", "convrewrite", *args, "--custom-objects", "clitest_hooks:Hook"],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, f"exited {proc.returncode} before reaching the hook: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "the hook was not reached in time"
            time.sleep(0.1)
        present = sorted(p.name for p in watch.iterdir()) if watch else []
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err, present


@pytest.mark.backend_agnostic("argument handling, exit codes and file commits do not touch the backend")
def test_interrupt_while_writing_leaves_no_partial_file(models, tmp_path):
    """Ctrl-C while the .keras temporary is written and verified and the SavedModel temporary is being
    exported: both temporaries go, nothing is committed, one line, exit 130."""
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    marker = tmp_path / "exporting"
    code, err, present = _start_and_interrupt(
        ["convert", "seq.keras", str(out_dir / "interrupted.keras"), "--cost-model", "rules",
         "--export-savedmodel", str(out_dir / "sm"), "--report", str(out_dir / "r.json")],
        models, "slow_export", marker, watch=out_dir)
    # interrupted with both temporaries present: the verified .keras one and the SavedModel being exported
    assert [n.startswith(".interrupted.keras.tmp") for n in present].count(True) == 1, present
    assert [n.startswith(".sm.tmp") for n in present].count(True) == 1, present
    assert code == EXIT_CODES["interrupted"], err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    assert list(out_dir.iterdir()) == []
    assert _no_temp_files(models)


@pytest.mark.backend_agnostic("argument handling, exit codes and file commits do not touch the backend")
def test_interrupt_during_startup_is_one_line(models, tmp_path):
    code, err, _ = _start_and_interrupt(["plan", "seq.keras", "--cost-model", "rules"], models, "block_import",
                                        tmp_path / "importing")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_CODES["interrupted"] and len(lines) == 1 and "interrupted" in lines[0], err


@pytest.mark.parametrize("where", ["build_parser", "parse_args"])
def test_interrupt_anywhere_in_main_is_exit_130(monkeypatch, capsys, where):
    """main() owns every step: a KeyboardInterrupt while it builds the parser (imports) or parses is one line."""
    import argparse

    from convrewrite import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "build_parser":
        monkeypatch.setattr(cli, "build_parser", interrupted)
    else:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    try:
        code = cli.main(["plan", "x.keras"])
    except KeyboardInterrupt:  # must not reach pytest, which would take it for the user's Ctrl-C
        pytest.fail("KeyboardInterrupt escaped main()")
    assert code == EXIT_CODES["interrupted"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convrewrite: error: interrupted"), err


def test_no_tensorflow_logger_lines_unless_debug(models):
    """Keras's grouped conv retraces a tf.function per call; TF's Python logger must not reach stderr."""
    r = _run(["convert", "grouped.keras", "grouped_fast.keras", "--cost-model", "rules"], models, script=True)
    assert r.returncode == 0, r.stderr
    assert "WARNING:tensorflow" not in r.stderr and not r.stderr.strip(), r.stderr
    if BACKEND == "tensorflow":  # (JAX has no retracing notes to show)
        r = _run(["--debug", "convert", "grouped.keras", "grouped_debug.keras", "--cost-model", "rules"], models)
        assert r.returncode == 0 and "retracing" in r.stderr, r.stderr


@pytest.mark.backend_agnostic("argument handling, exit codes and file commits do not touch the backend")
def test_convert_failing_verification_names_layers_and_what_was_kept(models, tmp_path):
    """A wrong depthwise implementation (every depthwise site falls back to direct) and a layer that can
    never verify: exit 7, one line naming the failing output, the fallback, the untouched input, no output."""
    before = _digest(models / "noisy.keras")
    out = tmp_path / "noisy_fast.keras"
    r = _run(["convert", "noisy.keras", str(out), "--cost-model", "rules", "--export-savedmodel", str(tmp_path / "sm"),
              "--report", str(tmp_path / "r.json"), "--custom-objects", "clitest_layers:Noisy",
              "--custom-objects", "clitest_hooks:Hook"],
             models, env_extra={"PYTHONPATH": _pythonpath(models), "CLITEST_HOOK": "wrong_depthwise"})
    assert r.returncode == EXIT_CODES["verification_failed"], (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convrewrite: error:"), r.stderr
    line = lines[0]
    assert "noisy" in line  # the failing output / layer
    assert "'g'" in line and "depthwise" in line and "direct" in line  # what fell back
    assert "'noisy.keras'" in line and "untouched" in line and str(out) in line and "nothing" in line
    assert _digest(models / "noisy.keras") == before
    assert list(tmp_path.iterdir()) == [] and _no_temp_files(models)


@pytest.mark.tensorflow_only("Keras writes ONNX through TensorFlow; the JAX run exports SavedModels in test_export")
def test_convert_exports_onnx_with_only_replacements_onnx_carries_verified_in_onnxruntime(models, tmp_path):
    """--export DIR --format onnx: the plan chooses among the replacements that export to ONNX (all but PAC:
    `implementations_for`); the 5x5 3x13 depthwise site goes to depthwise-wide, planned for the shipped Xeon
    6/167/1 profile's device, which ONNX carries; the artifact is run in onnxruntime and compared with the
    original before anything is written."""
    from convrewrite import export

    assert "pac" not in export.implementations_for("onnx") and "depthwise-wide" in export.implementations_for("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    x = keras.Input((12, 12, 4))
    y = keras.layers.DepthwiseConv2D((3, 13), padding="same", name="wide")(keras.layers.Conv2D(4, 3, name="c")(x))
    keras.Model(x, y).save(tmp_path / "wide.keras")
    profile = ["--cost-model", str(SHIPPED_XEON_PROFILE), "--target", "other"]  # the same plan on any host
    r = _run(["convert", "wide.keras", "wide_fast.keras", *profile], tmp_path)
    assert r.returncode == 0 and "depthwise-wide" in r.stdout, r.stderr  # that device's choice without a format
    r = _run(["convert", "wide.keras", "wide_onnx.keras", *profile, "--export", "onnx_out", "--format", "onnx"],
             tmp_path)
    assert r.returncode == 0, r.stderr
    assert "depthwise-wide" in r.stdout and "onnx onnx_out (verified in its runtime)" in r.stdout, r.stdout
    assert (tmp_path / "onnx_out" / "model.onnx").exists() and _no_temp_files(tmp_path)


@pytest.mark.backend_agnostic("argument handling, exit codes and file commits do not touch the backend")
def test_convert_writes_nothing_when_the_exported_artifact_differs_in_its_runtime(models, tmp_path):
    out = tmp_path / "seq_fast.keras"
    r = _run(["convert", "seq.keras", str(out), "--cost-model", "rules", "--export", str(tmp_path / "sm"),
              "--custom-objects", "clitest_hooks:Hook"], models, env_extra={"PYTHONPATH": _pythonpath(models), "CLITEST_HOOK": "wrong_artifact"})
    assert r.returncode == EXIT_CODES["verification_failed"], (r.returncode, r.stderr)
    assert "tf_saved_model artifact run in its runtime" in r.stderr and "nothing written" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == [] and _no_temp_files(models)


@pytest.mark.backend_agnostic("argument handling, exit codes and file commits do not touch the backend")
def test_convert_commits_keras_file_before_savedmodel_and_keeps_old_folder(models, tmp_path):
    """--force over an existing SavedModel folder: the .keras file is committed first, then the folder by
    rename-old-aside / rename-new-in / delete-old; a crash before the new folder's rename keeps the old one."""
    out, sm = tmp_path / "fast.keras", tmp_path / "sm"
    sm.mkdir()
    (sm / "old.txt").write_text("old SavedModel")
    out.write_bytes(b"old keras file")
    log = tmp_path / "renames.jsonl"
    env = {"PYTHONPATH": _pythonpath(models), "CLITEST_HOOK": "record_renames", "CLITEST_MARKER": str(log)}
    args = ["convert", "seq.keras", str(out), "--cost-model", "rules", "--export-savedmodel", str(sm), "--force",
            "--custom-objects", "clitest_hooks:Hook"]
    r = _run(args, models, env_extra=env)
    assert r.returncode == 0, r.stderr
    renames = [json.loads(line) for line in log.read_text().splitlines()]
    targets = [dst for _, dst in renames]
    assert targets.index("fast.keras") < targets.index("sm"), renames
    aside = [dst for src, dst in renames if src == "sm"]  # the old folder is renamed aside, not deleted first
    assert len(aside) == 1 and aside[0] != "sm", renames
    assert (sm / "saved_model.pb").exists() and not (sm / "old.txt").exists()
    assert out.read_bytes()[:2] == b"PK"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.keras", "renames.jsonl", "sm"]

    # A crash (here: Ctrl-C) just before the new folder is renamed in: the new .keras is there, the old
    # SavedModel is back in place; never neither.
    (sm / "saved_model.pb").unlink()
    (sm / "old.txt").write_text("old SavedModel")
    log.unlink()
    r = _run(args, models, env_extra=dict(env, CLITEST_HOOK="crash_before_dir_rename"))
    assert r.returncode == EXIT_CODES["interrupted"], r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fast.keras" in lines[0] and "sm" in lines[0], r.stderr
    assert (sm / "old.txt").read_text() == "old SavedModel" and out.read_bytes()[:2] == b"PK"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.keras", "renames.jsonl", "sm"]


def test_atomic_directory_commit_puts_the_old_folder_back_if_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    dest = tmp_path / "sm"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst) == str(dest) and ".tmp" in os.path.basename(str(src)):
            raise OSError("disk full")
        return real_replace(src, dst)

    with pytest.raises(OSError):
        with atomic_path(dest, directory=True) as (tmp, commit):
            tmp.mkdir()
            (tmp / "new.txt").write_text("new")
            monkeypatch.setattr(os, "replace", failing_replace)
            commit()
    monkeypatch.setattr(os, "replace", real_replace)
    assert (dest / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["sm"]
    with atomic_path(dest, directory=True) as (tmp, commit):
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        commit()
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["sm"]


def test_atomic_path_removes_the_temporary_on_any_exception(tmp_path):
    dest = tmp_path / "out.keras"
    for exc in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(exc):
            with atomic_path(dest, suffix=".keras") as (tmp, commit):
                tmp.write_bytes(b"half")
                raise exc()
        assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(dest) as (tmp, commit):
        tmp.write_bytes(b"whole")
        commit()
    assert dest.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [dest]


def test_parse_pac():
    assert parse_pac("layers=c2,c3;guidance=image;budget=1.3") == {"layers": ["c2", "c3"], "guidance": "image", "budget": 1.3}
    assert parse_pac("layers=conv.*;guidance=self") == {"layers": "conv.*", "guidance": "self"}
    assert parse_pac('{"layers": ["c2"], "guidance": "img"}') == {"layers": ["c2"], "guidance": "img"}
    for bad in ("guidance=self", "layers", "{not json"):
        with pytest.raises(CliError):
            parse_pac(bad)


def test_profile_command_writes_profile_and_plot(tmp_path, monkeypatch, capsys):
    """`convrewrite profile` in-process, on a three-spec grid instead of the quick one (a minute)."""
    import convrewrite
    from convrewrite.cli import main
    from convrewrite.cost import CostModel
    from convrewrite.spec import ConvSpec

    real = convrewrite.profile_device
    specs = [ConvSpec(kind="conv2d", in_channels=c, filters=4, kernel=(k, k), height=12, width=12, batch=1, padding="same")
             for c, k in ((2, 3), (4, 5), (3, 7), (4, 1))]
    monkeypatch.setattr(convrewrite, "profile_device",
                        lambda mode, progress, allow, training=False: real(mode=mode, progress=progress, allow=["direct", "fft"],
                                                                           specs=specs, training=training))
    out, png = tmp_path / "dev.json", tmp_path / "fit.png"
    assert main(["profile", "-o", str(out), "--plot", str(png), "--no-progress"]) == 0
    assert set(CostModel.load(out).fits) == {"direct", "fft"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    before = out.read_bytes()
    assert main(["profile", "-o", str(out)]) == EXIT_CODES["output_exists"]
    assert out.read_bytes() == before and "--force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.json", "fit.png"]
    assert main(["profile", "-o", str(tmp_path / "train.json"), "--training", "--no-progress"]) == 0
    trained = CostModel.load(tmp_path / "train.json")
    assert trained.has_training and set(trained.training_fits) == {"direct", "fft"}
    assert "training (forward+backward): 8 timings" in capsys.readouterr().out


def test_tensorflow_startup_lines_are_filtered_but_warnings_kept():
    from convrewrite._quiet_import import filter_startup_lines

    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1795457700.002023    2175 port.cc:153] oneDNN custom operations are on.\n"
            "W0000 00:00:1795457700.1    2175 cpu.cc:1] a real warning\n"
            "E0000 00:00:1795819637.008423   10882 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
            "error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
            "E0000 00:00:1795819637.1   10882 other.cc:1] a real error\n"
            "Traceback: something else\n")
    assert filter_startup_lines(text) == ("W0000 00:00:1795457700.1    2175 cpu.cc:1] a real warning\n"
                                          "E0000 00:00:1795819637.1   10882 other.cc:1] a real error\n"
                                          "Traceback: something else\n")


def test_plan_with_another_devices_profile_warns_in_one_line(tmp_path, capsys, monkeypatch):
    """`convrewrite plan --cost-model FILE` with a profile measured on other hardware, for that device:
    one warning line on stderr says the predictions are that device's, unverified here; this device's
    own profile gives none."""
    import copy

    from convrewrite import cli, device, profiles
    from convrewrite.cost import CostModel
    from convrewrite.fitting import ImplFit

    monkeypatch.setattr(profiles, "_WARNED", set())
    here = device.fingerprint()
    other = copy.deepcopy(here)
    other["hardware"]["cpu"]["model"] = "0" if here["hardware"]["cpu"]["model"] != "0" else "1"
    fits = {"direct": ImplFit(["calls"], [1e-3], 3, 0.0, 0.0), "depthwise": ImplFit(["calls"], [5e-4], 3, 0.0, 0.0)}
    theirs = CostModel(other, [], fits, name="server").save(tmp_path / "server.json")
    mine = CostModel(here, [], fits, name="mine").save(tmp_path / "mine.json")
    x = keras.Input((12, 12, 4))
    keras.Model(x, keras.layers.Conv2D(4, 3, groups=4, padding="same", name="g")(x)).save(tmp_path / "m.keras")
    assert cli.main(["plan", str(tmp_path / "m.keras"), "--cost-model", str(theirs), "--target", "other"]) == 0
    captured = capsys.readouterr()
    warning_lines = [line for line in captured.err.splitlines() if line.startswith("convrewrite: warning:")]
    assert len(warning_lines) == 1, captured.err
    assert "was measured on another device" in warning_lines[0] and "unverified" in warning_lines[0]
    assert "server.json" in warning_lines[0] and "depthwise" in captured.out
    assert cli.main(["plan", str(tmp_path / "m.keras"), "--cost-model", str(mine)]) == 0
    assert "warning" not in capsys.readouterr().err
