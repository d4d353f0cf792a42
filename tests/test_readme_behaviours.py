"""README behaviours that had no test: the numpy reference without TensorFlow, PAC guidance named by a layer,
a registered custom layer rebuilt, an FFT rewrite of a channels_first model through optimize, and CLI options
(run in-process through `convrewrite.cli.main`, so no TensorFlow start-up per call): verify --sites/--json,
convert --pac, convert --measure reaching optimize, an existing report or SavedModel folder refused without
--force, exit 1 for an unexpected error and its traceback with --debug, profile --quick/--full."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import reference as R
from convrewrite.cli import EXIT_CODES, main
from convrewrite.layers.fft import FFTConv2D
from convrewrite.layers.pac import PacConv2D
from conftest import rel_error


def _randomize(model, rng):
    for v in model.weights:
        v.assign((rng.standard_normal(tuple(v.shape)) * (0.5 if len(v.shape) > 1 else 1.0)).astype("float32"))


def test_reference_works_without_tensorflow():
    """A process where importing tensorflow, keras, jax or torch fails still has convrewrite.reference."""
    script = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "jax", "torch"):  # keras is a dependency; its backends are not
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        import convrewrite
        from convrewrite import reference
        x = np.arange(2 * 5 * 4 * 3, dtype=float).reshape(2, 5, 4, 3) % 7 - 3
        k = (np.arange(3 * 3 * 3 * 2, dtype=float).reshape(3, 3, 3, 2) % 5) - 2
        y = reference.conv2d(x, k, padding="same")
        # one output pixel by hand: centre (2, 1), all taps inside
        want = sum(x[0, 2 + a - 1, 1 + b - 1] @ k[a, b] for a in range(3) for b in range(3))
        assert np.allclose(y[0, 2, 1], want), (y[0, 2, 1], want)
        assert "tensorflow" not in sys.modules
        try:
            convrewrite.optimize
        except ImportError as exc:
            assert "TensorFlow" in str(exc)
        else:
            raise AssertionError("optimize without a backend should raise ImportError")
        assert convrewrite.__file__.startswith(sys.argv[1]), convrewrite.__file__
        print("ok", y.shape)
    """)
    import os
    from pathlib import Path

    root = str(Path(convrewrite.__file__).resolve().parents[1])  # this checkout's package, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}
    out = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, timeout=120, env=env,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok (2, 5, 4, 2)" in out.stdout


def test_pac_guidance_named_by_a_layer(rng):
    image = keras.Input((8, 9, 3), name="image")
    feat = keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="feat")(image)
    y = keras.layers.Conv2D(4, 3, padding="same", name="c2")(image)
    model = keras.Model(image, keras.layers.Concatenate()([y, feat]))
    _randomize(model, rng)
    new = convrewrite.optimize(model, pac={"layers": ["c2"], "guidance": "feat"}, cost_model=None, check_speed=False)
    layer = new.get_layer("c2")
    assert isinstance(layer, PacConv2D) and new.convrewrite_plan.row("c2").choice == "pac"
    x = rng.standard_normal((2, 8, 9, 3)).astype("float32")
    assert rel_error(new(x), model(x)) <= 1e-5  # at conversion: the Conv2D
    layer.blend.assign(0.8)
    guidance = keras.ops.convert_to_numpy(model.get_layer("feat")(x))
    c2 = model.get_layer("c2")
    want = R.pac_conv2d(x, guidance, c2.kernel.numpy(), c2.bias.numpy(), padding="same", kernel_blend=0.8)
    got = keras.ops.convert_to_numpy(new(x))[..., :4]
    assert rel_error(got, want) <= 1e-5
    # the layer's own input as guidance gives something else: the name was followed
    other = R.pac_conv2d(x, x, c2.kernel.numpy(), c2.bias.numpy(), padding="same", kernel_blend=0.8)
    assert rel_error(got, other) > 1e-2


@keras.saving.register_keras_serializable(package="readme_test")
class ScaleShift(keras.layers.Layer):
    def __init__(self, scale, shift=0.0, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.shift = scale, shift

    def call(self, x):
        return x * self.scale + self.shift

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "shift": self.shift}


def test_registered_custom_layer_is_rebuilt(rng):
    x = keras.Input((9, 9, 4))
    y = keras.layers.Conv2D(8, 3, groups=4, padding="same", name="g")(x)
    y = ScaleShift(-1.7, 0.3, name="custom")(y)
    model = keras.Model(x, keras.layers.Conv2D(3, 3, name="c")(y))
    _randomize(model, rng)
    fast = convrewrite.optimize(model, cost_model=None, check_speed=False)
    assert isinstance(fast.get_layer("g"), keras.layers.DepthwiseConv2D)
    custom = fast.get_layer("custom")
    assert type(custom) is ScaleShift and custom is not model.get_layer("custom")
    assert (custom.scale, custom.shift) == (-1.7, 0.3)
    inputs = rng.standard_normal((2, 9, 9, 4)).astype("float32")
    want = R.conv2d(R.conv2d(inputs, *model.get_layer("g").get_weights(), padding="same", groups=4) * -1.7 + 0.3,
                    *model.get_layer("c").get_weights())
    assert rel_error(fast(inputs), want) <= 1e-5


@pytest.mark.parametrize("impl", ["fft", "fft-tiled"])
def test_fft_rewrite_of_a_channels_first_model(impl, rng):
    x = keras.Input((3, 12, 11))
    y = keras.layers.Conv2D(6, 5, padding="same", data_format="channels_first", activation="relu", name="a")(x)
    y = keras.layers.Conv2D(4, 3, strides=2, data_format="channels_first", name="b")(y)
    model = keras.Model(x, y)
    _randomize(model, rng)
    plan = convrewrite.plan(model, cost_model=None).force("a", impl).force("b", impl)
    fast = convrewrite.optimize(model, plan=plan, check_speed=False)
    assert fast.convrewrite_report.fallbacks == []
    assert all(isinstance(fast.get_layer(n), FFTConv2D) for n in "ab")
    inputs = rng.standard_normal((2, 3, 12, 11)).astype("float32")
    a, b = model.get_layer("a"), model.get_layer("b")
    h = np.maximum(R.conv2d(inputs.transpose(0, 2, 3, 1), *a.get_weights(), padding="same"), 0)
    want = R.conv2d(h, *b.get_weights(), strides=2).transpose(0, 3, 1, 2)
    assert rel_error(fast(inputs), want) <= 1e-5


# ---- CLI, in-process ------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, rng):
    """seq.keras, and seq_off.keras: the same model with its grouped conv's kernel scaled by (1 + 3e-4)."""
    x = keras.Input((10, 10, 4), name="image")
    y = keras.layers.Conv2D(8, 3, groups=4, padding="same", use_bias=False, name="g")(x)
    model = keras.Model(x, keras.layers.Conv2D(4, 3, padding="same", name="c2")(y))
    _randomize(model, rng)
    model.save(tmp_path / "seq.keras")
    g = model.get_layer("g")
    g.kernel.assign(g.kernel.numpy() * (1 + 3e-4))
    model.save(tmp_path / "seq_off.keras")
    return tmp_path


def test_cli_verify_sites_and_json(saved, capsys):
    a, b = str(saved / "seq.keras"), str(saved / "seq_off.keras")
    assert main(["verify", a, b, "--sites", "--json", "--rtol", "1e-3"]) == 0
    report = json.loads(capsys.readouterr().out)
    sites = {c["name"]: c for c in report["checks"] if c["kind"] == "site"}
    assert set(sites) == {"g", "c2"}
    assert sites["g"]["rel_error"] == pytest.approx(3e-4, rel=0.05) and sites["c2"]["rel_error"] == 0.0
    assert [c["kind"] for c in report["checks"]].count("output") == 1 and report["passed"]
    assert main(["verify", a, b, "--json", "--rtol", "1e-3"]) == 0
    assert {c["kind"] for c in json.loads(capsys.readouterr().out)["checks"]} == {"output"}
    assert main(["verify", a, b, "--sites"]) == EXIT_CODES["verification_failed"]  # the default 1e-5
    out, err = capsys.readouterr()
    assert "site:g" in out and "FAIL" in out and "differs" in err


def test_pac_layers_given_as_one_name_string(rng):
    """pac={"layers": "c2"} names one layer (it was split into the letters ['c', '2'])."""
    x = keras.Input((8, 8, 3), name="image")
    model = keras.Model(x, keras.layers.Conv2D(4, 3, padding="same", name="c2")(
        keras.layers.Conv2D(3, 3, padding="same", name="c1")(x)))
    plan = convrewrite.plan(model, cost_model=None, pac={"layers": "c2", "guidance": "image"})
    assert plan.choices() == {"c1": "direct", "c2": "pac"}


def test_cli_convert_pac(saved, capsys, rng):
    out = saved / "pac.keras"
    assert main(["convert", str(saved / "seq.keras"), str(out), "--cost-model", "rules",
                 "--pac", "layers=c2;guidance=image"]) == 0
    new = keras.models.load_model(out)
    assert isinstance(new.get_layer("c2"), PacConv2D)
    model = keras.models.load_model(saved / "seq.keras")
    x = rng.standard_normal((2, 10, 10, 4)).astype("float32")
    assert rel_error(new(x), model(x)) <= 1e-5


def test_cli_refuses_existing_report_and_savedmodel_without_force(saved, capsys):
    src, out = str(saved / "seq.keras"), saved / "out.keras"
    report, folder = saved / "report.json", saved / "sm"
    report.write_text("old report")
    folder.mkdir()
    (folder / "keep.txt").write_text("old folder")
    for extra in (["--report", str(report)], ["--export-savedmodel", str(folder)]):
        assert main(["convert", src, str(out), "--cost-model", "rules", *extra]) == EXIT_CODES["output_exists"]
        assert "--force" in capsys.readouterr().err
        assert not out.exists()
    assert report.read_text() == "old report" and (folder / "keep.txt").read_text() == "old folder"
    assert main(["convert", src, str(out), "--cost-model", "rules", "--report", str(report), "--force"]) == 0
    assert json.loads(report.read_text())["verification"]["passed"]


def test_cli_unexpected_error_is_exit_1_and_debug_gives_the_traceback(saved, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("staged failure")

    monkeypatch.setattr(convrewrite, "plan", boom)
    args = ["plan", str(saved / "seq.keras"), "--cost-model", "rules"]
    assert main(args) == EXIT_CODES["unexpected"] == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "staged failure" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="staged failure"):  # --debug: the exception itself, traceback and all
        main(["--debug"] + args)


@pytest.mark.parametrize("flags,mode", [([], "quick"), (["--quick"], "quick"), (["--full"], "full")])
def test_cli_profile_quick_and_full(flags, mode, tmp_path, monkeypatch, capsys):
    seen = []

    class Stop(Exception):
        pass

    def fake(mode, progress, allow):
        seen.append(mode)
        raise Stop

    monkeypatch.setattr(convrewrite, "profile_device", fake)
    with pytest.raises(Stop):
        main(["--debug", "profile", "-o", str(tmp_path / "p.json"), *flags])
    assert seen == [mode] and not (tmp_path / "p.json").exists()
    with pytest.raises(SystemExit) as info:  # argparse's exit: the process ends with the usage code
        main(["profile", "--quick", "--full"])
    assert info.value.code == EXIT_CODES["usage"] and "not allowed" in capsys.readouterr().err


@pytest.mark.parametrize("flags,measure", [([], False), (["--measure"], True)])
def test_cli_convert_measure_reaches_optimize(flags, measure, saved, monkeypatch):
    """--measure asks optimize to time the model's own shapes (the timing itself belongs to the cost-model
    tests; here it is replaced by a rule-based plan so that nothing is timed)."""
    seen = []
    real = convrewrite.optimize

    def spy(model, **kwargs):
        seen.append(kwargs.get("measure"))
        return real(model, **{**kwargs, "measure": False, "cost_model": None, "check_speed": False})

    monkeypatch.setattr(convrewrite, "optimize", spy)
    out = saved / "m.keras"
    assert main(["convert", str(saved / "seq.keras"), str(out), "--cost-model", "rules", *flags]) == 0
    assert seen == [measure] and out.exists()
