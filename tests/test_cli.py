"""The `convrewrite` command end to end: real subprocesses on saved models, and every bad-input case."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from convrewrite.cli import EXIT_CODES, atomic_path, parse_pac, CliError

SUBCLASSED_MODULE = '''
import keras

@keras.saving.register_keras_serializable(package="clitest")
class Tiny(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(2, 3)

    def call(self, x):
        return self.conv(x)
'''


def _run(args, cwd, script=False, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    cmd = (["convrewrite"] if script else [sys.executable, "-m", "convrewrite"]) + args
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


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
    (d / "clitest_layers.py").write_text(SUBCLASSED_MODULE)
    sys.path.insert(0, str(d))
    try:
        import clitest_layers

        sub = clitest_layers.Tiny()
        sub(np.zeros((1, 5, 5, 1), "float32"))
        sub.save(d / "subclassed.keras")
    finally:
        sys.path.remove(str(d))
    (d / "corrupt.json").write_text('{"format": "convrewrite-profile", "version": 1, "fingerp')
    (d / "notamodel.keras").write_text("this is not a model")
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
    assert "verified" in r.stdout and "depthwise" in r.stdout
    assert _digest(models / "seq.keras") == before
    report = json.loads((models / "report.json").read_text())
    assert report["verification"]["passed"] and report["plan"]["rows"][0]["choice"] == "depthwise"
    assert (models / "seq_savedmodel" / "saved_model.pb").exists()
    assert _no_temp_files(models)
    _assert_loads_and_matches(models, "seq.keras", "seq_fast.keras", "np.random.default_rng(1).standard_normal((3, 12, 12, 4)).astype('float32')")
    r = _run(["verify", "seq.keras", "seq_fast.keras", "--samples", "3"], models)
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stderr


def test_convert_two_inputs_with_shipped_profile_and_legacy_h5(models):
    r = _run(["convert", "two_inputs.keras", "two_fast.keras", "--cost-model", "auto"], models)
    assert r.returncode == 0, r.stderr
    _assert_loads_and_matches(models, "two_inputs.keras", "two_fast.keras",
                              "[np.random.default_rng(2).standard_normal((2, 10, 10, c)).astype('float32') for c in (3, 2)]")
    r = _run(["convert", "legacy.h5", "from_h5.keras", "--cost-model", "rules"], models)
    assert r.returncode == 0, r.stderr
    _assert_loads_and_matches(models, "seq.keras", "from_h5.keras", "np.ones((1, 12, 12, 4), 'float32')")


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


@pytest.mark.parametrize("args,code,needle", [
    (["convert", "missing.keras", "out.keras"], "missing_file", "missing.keras"),
    (["plan", "notamodel.keras"], "not_a_model", "notamodel.keras"),
    (["convert", "seq.keras", "o.keras", "--cost-model", "corrupt.json"], "bad_profile", "corrupt.json"),
    (["verify", "seq.keras", "other.keras"], "verification_failed", "other.keras"),
    (["convert", "lambda.keras", "lambda_fast.keras"], "not_a_model", "--unsafe"),
    (["convert", "seq.keras", "seq.keras", "--force"], "usage", "input"),
    (["convert", "subclassed.keras", "sub_fast.keras", "--custom-objects", "clitest_layers:Tiny"],
     "unsupported_model", "subclassed"),
])
def test_bad_input_gets_one_line_and_its_exit_code(models, args, code, needle):
    inputs = {p: _digest(p) for p in models.iterdir() if p.is_file()}
    r = _run(args, models, env_extra={"PYTHONPATH": str(models)})
    assert r.returncode == EXIT_CODES[code], (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convrewrite: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    for p, digest in inputs.items():
        assert p.exists() and _digest(p) == digest, f"{p.name} changed"
    assert not (models / "o.keras").exists() and not (models / "sub_fast.keras").exists()
    assert _no_temp_files(models)


def test_existing_output_is_refused_and_untouched_then_unsafe_opt_in(models):
    (models / "taken.keras").write_bytes(b"precious")
    r = _run(["convert", "seq.keras", "taken.keras", "--cost-model", "rules"], models)
    assert r.returncode == EXIT_CODES["output_exists"] and "--force" in r.stderr
    assert (models / "taken.keras").read_bytes() == b"precious"
    r = _run(["convert", "lambda.keras", "lambda_fast.keras", "--unsafe", "--cost-model", "rules"], models)
    assert r.returncode == 0, r.stderr


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


def test_interrupt_leaves_no_partial_file(models):
    proc = subprocess.Popen([sys.executable, "-m", "convrewrite", "convert", "mobilenet.keras", "interrupted.keras",
                             "--cost-model", "rules"], cwd=models, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # inside loading / optimizing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == EXIT_CODES["interrupted"]:
        assert not (models / "interrupted.keras").exists() and "interrupted" in err
    else:  # it finished before the signal: then the file must be whole
        assert proc.returncode == 0 and (models / "interrupted.keras").stat().st_size > 0
    assert _no_temp_files(models)


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
                        lambda mode, progress, allow: real(mode=mode, progress=progress, allow=["direct", "fft"], specs=specs))
    out, png = tmp_path / "dev.json", tmp_path / "fit.png"
    assert main(["profile", "-o", str(out), "--plot", str(png), "--no-progress"]) == 0
    assert set(CostModel.load(out).fits) == {"direct", "fft"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    before = out.read_bytes()
    assert main(["profile", "-o", str(out)]) == EXIT_CODES["output_exists"]
    assert out.read_bytes() == before and "--force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.json", "fit.png"]


def test_tensorflow_startup_lines_are_filtered_but_warnings_kept():
    from convrewrite._quiet_import import filter_startup_lines

    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1795457700.002023    2175 port.cc:153] oneDNN custom operations are on.\n"
            "W0000 00:00:1795457700.1    2175 cpu.cc:1] a real warning\n"
            "Traceback: something else\n")
    assert filter_startup_lines(text) == ("W0000 00:00:1795457700.1    2175 cpu.cc:1] a real warning\n"
                                          "Traceback: something else\n")
