"""`convrewrite profile | plan | convert | verify`: offline conversion of saved Keras models.

Safety rules the commands keep: the input file is never written; outputs go to a temporary file in the
destination folder and are renamed into place only after the written file has been re-loaded and
verified; an existing output is refused without --force; Ctrl-C or a crash leaves no partial file.
Bad input gets one line on stderr and a distinct exit code (see EXIT_CODES), never a traceback
(unless --debug).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

from . import export
from .export import FORMATS

EXIT_CODES = {
    "ok": 0,
    "unexpected": 1,
    "usage": 2,
    "missing_file": 3,
    "not_a_model": 4,
    "unsupported_model": 5,
    "bad_profile": 6,
    "verification_failed": 7,
    "output_exists": 8,
    "interrupted": 130,
}

EPILOG_CODES = """exit codes: 0 ok, 2 bad arguments, 3 missing file, 4 not a Keras model (or unreadable),
5 model cannot be walked (e.g. subclassed), 6 corrupt/unknown profile, 7 verification failed,
8 output exists (use --force), 130 interrupted, 1 unexpected error (rerun with --debug)."""


class CliError(Exception):
    """An error the CLI reports in one line with an exit code."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# ---- helpers ----------------------------------------------------------------------------------------
def _existing_file(path: str, what: str = "model") -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{what} file '{path}' does not exist.", "missing_file")
    if not p.is_file():
        raise CliError(f"'{path}' is a directory, not a {what} file; expected a .keras or .h5 file.", "not_a_model")
    return p


def _custom_objects(specs):
    """{'Name': obj} from ['module:attr', ...]: imports the module and takes the attribute.

    A bad spec is a bad argument (exit 2), whatever importing the module raises."""
    out = {}
    for spec in specs or []:
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise CliError(f"--custom-objects {spec!r} is not module:attr (e.g. mypkg.layers:MyLayer).", "usage")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except Exception as exc:  # noqa: BLE001 - ImportError, AttributeError, or whatever the module raises
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CliError(f"--custom-objects {spec!r}: {text} (the module must be importable from here: "
                           f"check the name and PYTHONPATH).", "usage") from None
        out[attr] = obj
    return out


_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _check_model_file(p: Path, path: str) -> None:
    """Refuse, in our own words, a file Keras would misreport (e.g. a broken zip as 'File not found')."""
    if p.suffix not in (".keras", ".h5", ".hdf5"):
        raise CliError(f"'{path}' is not a .keras or .h5 file; expected a model saved with model.save().", "not_a_model")
    with open(p, "rb") as f:
        magic = f.read(8)
    if p.suffix != ".keras":
        if magic != _HDF5_MAGIC:
            raise CliError(f"'{path}' is not an HDF5 file; expected a legacy Keras .h5 model.", "not_a_model")
        return
    why = None
    if not magic.startswith(b"PK"):
        why = "not a zip archive"
    else:
        try:
            with zipfile.ZipFile(p) as z:
                names = set(z.namelist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            why = "a damaged or truncated zip archive"
        else:
            if "config.json" not in names:
                why = "a zip archive without the config.json every Keras model file holds"
    if why:
        raise CliError(f"'{path}' is not a Keras model file ({why}); expected a .keras file saved with model.save().",
                       "not_a_model")


def load_model(path: str, unsafe: bool = False, custom_objects=None):
    """Load a .keras (or legacy .h5) model with Keras's safe mode unless `unsafe`; never modifies it.

    custom_objects: a dict, or ['module:attr', ...] (resolved first: a bad one is a bad argument)."""
    import keras

    if not isinstance(custom_objects, dict):
        custom_objects = _custom_objects(custom_objects)
    p = _existing_file(path)
    _check_model_file(p, path)
    try:
        model = keras.models.load_model(p, safe_mode=not unsafe, custom_objects=custom_objects, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for unreadable files
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if first.startswith("File not found"):  # Keras's words for a file it could not read as a model
            raise CliError(f"'{path}' is not a Keras model file (Keras could not read it); expected a .keras file "
                           f"saved with model.save().", "not_a_model") from None
        hint = ""
        if "safe_mode" in text or "unsafe" in text.lower():
            hint = " (rerun with --unsafe only if you trust the file)"
        elif "Unknown" in text or "custom" in text.lower():
            hint = " (custom layers: --custom-objects module:attr)"
        raise CliError(f"cannot load '{path}' as a Keras model: {first}{hint}", "not_a_model") from None
    if not isinstance(model, keras.Model):
        raise CliError(f"'{path}' holds a {type(model).__name__}, not a keras.Model.", "not_a_model")
    return model


def parse_pac(text):
    """--pac: JSON ('{"layers": ["c2"], "guidance": "image"}') or 'layers=c2,c3;guidance=image;budget=1.3'."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"--pac is not valid JSON: {exc}.", "usage") from None
        if not isinstance(value, dict):
            raise CliError("--pac JSON must be an object with 'layers' and 'guidance'.", "usage")
        return value
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise CliError(f"--pac part {part!r} is not key=value (e.g. 'layers=conv2,conv3;guidance=image').", "usage")
        key, value = key.strip(), value.strip()
        if key == "layers":
            items = [v.strip() for v in value.split(",") if v.strip()]
            out[key] = items if len(items) > 1 else value
        else:
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value
    if "layers" not in out:
        raise CliError("--pac needs layers=... (names or a regex).", "usage")
    return out


def _cost_model_arg(value):
    return None if value == "rules" else value


@contextlib.contextmanager
def atomic_path(dest: Path, suffix: str = "", directory: bool = False):
    """Yield a temporary path beside `dest`; the caller fills it; it is removed unless `commit` is called.

    Usage: with atomic_path(out) as (tmp, commit): write tmp; verify; commit()."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp"))
        shutil.rmtree(tmp)
    else:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.tmp", suffix=suffix)
        os.close(fd)
        os.unlink(name)
        tmp = Path(name)
    done = []

    def commit():
        if not directory or not (dest.exists() or dest.is_symlink()):
            os.replace(tmp, dest)  # a file: one atomic rename over the old one
            done.append(True)
            return
        # A folder cannot be renamed over a non-empty one: move the old one aside, move the new one in, and
        # only then delete the old one, so that at every moment one of them is on disk (a crash between
        # the renames leaves the old one as .NAME.old*).
        aside = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old"))
        aside.rmdir()
        os.replace(dest, aside)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(aside, dest)
            raise
        done.append(True)
        _remove(aside)

    try:
        yield tmp, commit
    finally:
        if not done and (tmp.exists() or tmp.is_symlink()):
            _remove(tmp)


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _refuse_existing(path: Path, force: bool, flag="--force"):
    if path.exists() and not force:
        raise CliError(f"output '{path}' already exists; pass {flag} to replace it.", "output_exists")


def _fallbacks_text(fallbacks) -> str:
    """'g' fell back from depthwise to direct, ... (from a report's fallbacks)."""
    return ", ".join(f"'{f['site']}' fell back from {f['from']} to {f['to']}" for f in fallbacks)


def _failed_conversion(src: Path, out: Path, failing, fallbacks, extra=None) -> CliError:
    """The one line for a convert that did not verify: what failed, what fell back, and what was kept."""
    what = [f"'{out}'"] + [f"'{e}'" for e in extra or []]
    kept = f"kept: '{src}' untouched, nothing written to {' or '.join(what)}"
    tried = f" even after {_fallbacks_text(fallbacks)}" if fallbacks else " (no site had a replacement to fall back from)"
    return CliError(f"converting '{src}' failed verification: the result differs beyond tolerance at {failing}{tried}; "
                    f"{kept} (compare with `convrewrite verify`, or pass a larger --rtol if that error is acceptable).",
                    "verification_failed")


# ---- commands ---------------------------------------------------------------------------------------
def cmd_profile(args):
    import convrewrite
    from convrewrite import plotting

    out = Path(args.output)
    _refuse_existing(out, args.force)
    if args.plot:
        _refuse_existing(Path(args.plot), args.force)
    cm = convrewrite.profile_device(mode="full" if args.full else "quick", progress=not args.no_progress,
                                    allow=args.allow, **({"training": True} if args.training else {}))
    with atomic_path(out, suffix=".json") as (tmp, commit):
        cm.save(tmp)
        commit()
    v = cm.validation
    print(f"wrote {out}: {len(cm.measurements)} timings, implementations {sorted(cm.fits)}; held-out: "
          f"{(v.get('within_10pct_of_best') or 0):.0%} of predicted choices within 10% of the best")
    if cm.training_measurements:
        t = cm.training_validation
        print(f"  training (forward+backward): {len(cm.training_measurements)} timings, implementations "
              f"{sorted(cm.training_fits)}; held-out: {(t.get('within_10pct_of_best') or 0):.0%} within 10% of the best")
    if args.plot:
        with atomic_path(Path(args.plot), suffix=".png") as (tmp, commit):
            plotting.plot(cm, tmp)
            commit()
        print(f"wrote {args.plot}")
    return 0


def cmd_plan(args):
    import convrewrite

    model = load_model(args.model, args.unsafe, args.custom_objects)
    plan = convrewrite.plan(model, cost_model=_cost_model_arg(args.cost_model), allow=args.allow,
                            pac=parse_pac(args.pac), batch=args.batch, memory_limit=args.memory_limit,
                            rtol=args.rtol, target=args.target, mode=args.mode)
    print(plan.to_json() if args.json else plan.summary())
    return 0


def _convert_paths(args):
    """(input, output, extra outputs) of `convert`, checked before anything is loaded: the output a new
    .keras file that is not the input, and no existing output replaced without --force."""
    src, out = Path(args.input), Path(args.output)
    _existing_file(args.input)
    if out.suffix != ".keras":
        raise CliError(f"output '{out}' must end in .keras (the format Keras saves whole models in).", "usage")
    if src.resolve() == out.resolve():
        raise CliError(f"output '{out}' is the input file; write to another path (the input is never modified).", "usage")
    if out.is_dir():
        raise CliError(f"output '{out}' is a folder; name a .keras file to write.", "usage")
    _refuse_existing(out, args.force)
    if args.export_savedmodel and args.export:
        raise CliError("--export-savedmodel DIR is --export DIR --format tf_saved_model: give one of them.", "usage")
    if args.export_savedmodel:
        args.export, args.format = args.export_savedmodel, "tf_saved_model"
    if args.export:
        missing = export.missing_packages(args.format)
        if missing:
            raise CliError(f"--format {args.format} needs {', '.join(missing)} installed, and it is not: install it "
                           f"(pip install -e \".[export]\" has them all), or leave --export out.", "usage")
        import keras

        if args.format == "litert" and keras.backend.backend() == "jax":
            raise CliError("--format litert is written by Keras on the TensorFlow backend only (Keras refuses it on "
                           "JAX); run with KERAS_BACKEND=tensorflow.", "usage")
    extras = [Path(e) for e in (args.export, args.report) if e]
    for extra in extras:
        _refuse_existing(extra, args.force)
    return src, out, extras


def _export_and_check(fmt, fast, model, folder: Path, inputs, rtol):
    """Export `fast` into `folder` (created here) in `fmt`, run the artifact in its runtime on `inputs`, and
    compare with `model`: None where they agree, else why not (one line)."""
    import keras
    import numpy as np

    folder.mkdir()
    artifact = export.export_model(fast, folder, fmt)
    want = [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(model(inputs))]
    return export.compare_outputs(export.load_runner(artifact, fmt, n_outputs=len(want))(inputs), want, rtol)


def cmd_convert(args):
    import convrewrite
    from convrewrite.errors import VerificationError
    from convrewrite.verify import random_inputs

    src, out, extras = _convert_paths(args)
    model = load_model(args.input, args.unsafe, args.custom_objects)
    allow = export.implementations_for(args.format, args.allow) if args.export else args.allow
    try:
        fast = convrewrite.optimize(model, cost_model=_cost_model_arg(args.cost_model), allow=allow,
                                    pac=parse_pac(args.pac), measure=args.measure, rtol=args.rtol, batch=args.batch,
                                    memory_limit=args.memory_limit, target=args.target, mode=args.mode)
    except VerificationError as exc:
        failing = [c.name for c in exc.report.checks if not c.passed]
        raise _failed_conversion(src, out, failing, exc.report.fallbacks, extras) from None
    report = fast.convrewrite_report
    inputs = random_inputs(model, batch=2, seed=7)

    # Everything is written to temporaries and verified first; then committed .keras first (the file the
    # user asked for), then the SavedModel folder, then the report. Ctrl-C before a commit removes them all.
    with contextlib.ExitStack() as stack:
        tmp, commit = stack.enter_context(atomic_path(out, suffix=".keras"))
        fast.save(tmp)
        # Verify what was written, not what is in memory: reload the file and compare with the original.
        reloaded = load_model(str(tmp), args.unsafe, args.custom_objects)
        written = convrewrite.verify(model, reloaded, inputs=inputs, rtol=args.rtol, sites=False)
        if not written.passed:
            failing = [c.name for c in written.checks if not c.passed]
            raise _failed_conversion(src, out, f"{failing} after saving and reloading", report.fallbacks, extras)
        commits = [(out, commit)]
        if args.export:
            tmp_dir, commit_dir = stack.enter_context(atomic_path(Path(args.export), directory=True))
            differs = _export_and_check(args.format, fast, model, tmp_dir, inputs,
                                        max(c.tolerance for c in written.outputs))
            if differs:
                raise _failed_conversion(src, out, f"the {args.format} artifact run in its runtime: {differs}",
                                         report.fallbacks, extras)
            commits.append((Path(args.export), commit_dir))
        if args.report:
            payload = {"input": str(src), "output": str(out), "plan": fast.convrewrite_plan.to_dict(),
                       "verification": report.to_dict(), "written_file_verification": written.to_dict()}
            tmp_report, commit_report = stack.enter_context(atomic_path(Path(args.report), suffix=".json"))
            tmp_report.write_text(json.dumps(payload, indent=1))
            commits.append((Path(args.report), commit_report))
        args.pending = [str(path) for path, _ in commits]
        for path, commit_one in commits:
            commit_one()
            args.written.append(str(path))

    _print_conversion(fast, report, out, args)
    return 0


def _print_conversion(fast, report, out, args):
    """What convert did: the plan, fallbacks, the verified error, the measured speed, what was written."""
    print(fast.convrewrite_plan.summary())
    if args.export:
        carried = ", ".join(export.implementations_for(args.format, args.allow))
        print(f"export format {args.format}: chosen among {carried} (the implementations that export to it)")
    for f in report.fallbacks:
        print(f"fell back: {f['site']} {f['from']} -> {f['to']} ({f['why']})")
    print(f"verified: max relative error {max((c.rel_error for c in report.outputs), default=0):.1e} "
          f"(tolerance {max((c.tolerance for c in report.outputs), default=0):.0e}); wrote {out}"
          + (f" and {args.format} {args.export} (verified in its runtime)" if args.export else ""))
    print(fast.convrewrite_speed.describe())
    if args.report:
        print(f"wrote report {args.report}")


def cmd_verify(args):
    import convrewrite
    from convrewrite.verify import random_inputs

    a = load_model(args.a, args.unsafe, args.custom_objects)
    b = load_model(args.b, args.unsafe, args.custom_objects)
    inputs = random_inputs(a, batch=args.samples, seed=args.seed)
    try:
        report = convrewrite.verify(a, b, inputs=inputs, rtol=args.rtol, sites=args.sites)
    except ValueError as exc:
        raise CliError(f"'{args.a}' and '{args.b}' do not take the same inputs: {str(exc).splitlines()[0]}", "verification_failed") from None
    print(report.to_json() if args.json else report.summary())
    if not report.passed:
        failing = [c.name for c in report.checks if not c.passed]
        raise CliError(f"'{args.b}' differs from '{args.a}' at {failing}.", "verification_failed")
    return 0


# ---- argument parsing -------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (`convrewrite: error: ...`, exit 2), like every other error."""

    def error(self, message):
        self.exit(EXIT_CODES["usage"], f"convrewrite: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _tolerance(text):
    from convrewrite.errors import PlanError
    from convrewrite.planner import check_rtol

    try:
        return check_rtol(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a tolerance such as 1e-5") from None
    except PlanError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory_limit(text):
    from convrewrite.errors import PlanError
    from convrewrite.planner import parse_memory_limit

    try:
        return parse_memory_limit(text)
    except PlanError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; expected 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1; expected 1 or more")
    return value


def _common_model_args(p):
    p.add_argument("--unsafe", action="store_true",
                   help="load with Keras safe_mode=False (runs code stored in the file: only for files you trust)")
    p.add_argument("--custom-objects", action="append", metavar="MODULE:ATTR",
                   help="a custom layer/function the model needs, e.g. mypkg.layers:MyLayer (repeatable)")


def _planning_args(p):
    p.add_argument("--cost-model", default="auto", metavar="FILE|auto|rules",
                   help="device profile to plan with: a JSON from `convrewrite profile` (another device's is fine: "
                        "that plans for that device), 'auto' (this device's), or 'rules' (no measurements)")
    p.add_argument("--allow", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], metavar="IMPLS",
                   help="implementations the planner may choose, e.g. direct,depthwise,fft")
    p.add_argument("--pac", metavar="SPEC",
                   help="convert layers to pixel-adaptive convs: 'layers=c2,c3;guidance=image[;budget=1.3]' or JSON")
    p.add_argument("--batch", type=_positive_int, default=8, help="batch size the plan is made for (default 8)")
    p.add_argument("--mode", choices=("inference", "training"), default="inference",
                   help="'inference' (default): first fold BatchNormalization into convs, merge parallel conv "
                        "branches and fuse activations (exact at training=False); 'training': keep the graph")
    p.add_argument("--target", choices=("auto", "here", "other"), default="auto",
                   help="the device the plan is for: 'here' (a profile of another device is calibrated here, or "
                        "this device measured), 'other' (converting offline for another device: nothing is timed "
                        "here, predictions are reported unverified), 'auto' (here, unless the profile is of "
                        "another machine class)")
    p.add_argument("--memory-limit", metavar="SIZE", type=_memory_limit,
                   help="leave out implementations whose working memory per conv exceeds SIZE, e.g. 512MB or 2GiB")


def build_parser():
    from convrewrite.version import __version__

    parser = _Parser(
        prog="convrewrite",
        description="Measure convolution implementations on a device and convert saved Keras models to the fastest "
                    "equivalent ones.",
        epilog=EPILOG_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"convrewrite {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks for unexpected errors, and TensorFlow's own log lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, help_, example):
        return sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}\n\n{EPILOG_CODES}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("profile", "measure this device and write its profile (cost model)",
            "convrewrite profile -o cost_models/my-device.json --quick --plot fit.png")
    p.add_argument("-o", "--output", default="profile.json", help="profile to write (default profile.json)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about a minute on a 2-core CPU (default)")
    mode.add_argument("--full", action="store_true", help="at most ~10 minutes; more specs, better predictions")
    p.add_argument("--training", action="store_true",
                   help="also time forward+backward per implementation (about 3x longer), so that plans with "
                        "--mode training predict a training step")
    p.add_argument("--plot", metavar="PNG", help="also draw predicted vs measured time (needs matplotlib)")
    p.add_argument("--allow", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], metavar="IMPLS",
                   help="only time these implementations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.set_defaults(func=cmd_profile)

    p = add("plan", "print which implementation each conv of a saved model would get, and why",
            "convrewrite plan model.keras --cost-model cost_models/gpu.json --json")
    p.add_argument("model")
    _planning_args(p)
    _common_model_args(p)
    p.add_argument("--rtol", type=_tolerance,
                   help="leave out implementations whose expected relative error exceeds this (default: no limit)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = add("convert", "optimize a saved model, verify it, and write it (never touching the input)",
            "convrewrite convert model.keras fast.keras --cost-model auto --report report.json")
    p.add_argument("input")
    p.add_argument("output", help="the converted model (.keras); refused if it exists, unless --force")
    _planning_args(p)
    p.add_argument("--measure", action="store_true",
                   help="time the candidates on this model's shapes; cached per device in the profile named by "
                        "--cost-model FILE, else in the user cache (~/.cache/convrewrite/tactics)")
    p.add_argument("--rtol", type=_tolerance, help="relative error tolerance >= 0 (default: 1e-5 float32, 1e-2 float16)")
    p.add_argument("--report", metavar="JSON", help="write the plan and verification report here")
    p.add_argument("--export-savedmodel", metavar="DIR", help="also export a TF SavedModel (TF Serving) here "
                                                              "(the same as --export DIR --format tf_saved_model)")
    p.add_argument("--export", metavar="DIR", help="also export the model here with Keras's model.export in --format, "
                                                   "verified in its runtime before anything is written")
    p.add_argument("--format", choices=FORMATS, default="tf_saved_model",
                   help="the --export format (default tf_saved_model); the plan then chooses only replacements that "
                        "export to it")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    _common_model_args(p)
    p.set_defaults(func=cmd_convert)

    p = add("verify", "compare two saved models' outputs on random inputs",
            "convrewrite verify model.keras fast.keras --samples 8 --rtol 1e-5")
    p.add_argument("a", help="the reference model")
    p.add_argument("b", help="the model to check against it")
    p.add_argument("--samples", type=_positive_int, default=4, help="random inputs to compare on (default 4)")
    p.add_argument("--rtol", type=_tolerance, help="relative error tolerance >= 0 (default by dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", action="store_true", help="also compare conv layers of the same name one by one")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common_model_args(p)
    p.set_defaults(func=cmd_verify)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"convrewrite: warning: {str(message).splitlines()[0]}\n")


_NOISY_LOGGERS = ("tensorflow", "absl")  # TF's Python logger (e.g. tf.function retracing notes) and absl's


def _interrupted_message(args) -> str:
    written = list(getattr(args, "written", None) or [])
    if not written:
        return "interrupted; no output was written"
    rest = [p for p in getattr(args, "pending", None) or [] if p not in written]
    return (f"interrupted after writing {', '.join(map(repr, written))}"
            + (f"; not written (any old one is kept as it was): {', '.join(map(repr, rest))}" if rest else "")
            + "; every file there is whole")


def main(argv=None) -> int:
    """The `convrewrite` command. Every step, imports and argument parsing included, is inside the error
    handling: a Ctrl-C anywhere exits 130 with one line. TensorFlow's Python log lines are silenced
    (unless --debug) for the duration; loggers, warning filters and handlers are restored on return."""
    raw = sys.argv[1:] if argv is None else list(argv)
    args = argparse.Namespace(debug="--debug" in raw, written=[], pending=[])
    saved_levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            if not args.debug:
                for name in _NOISY_LOGGERS:
                    logging.getLogger(name).setLevel(logging.ERROR)
            return _run(raw, args)
    except KeyboardInterrupt:
        message, code = _interrupted_message(args), "interrupted"
    finally:
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
    sys.stderr.write(f"convrewrite: error: {message}\n")
    return EXIT_CODES[code]


def _run(raw, args) -> int:
    from convrewrite.errors import PlanError, ProfileError, UnsupportedModelError, VerificationError

    try:
        build_parser().parse_args(raw, namespace=args)
        if getattr(args, "custom_objects", None):  # before any model is read: a bad one is a bad argument
            args.custom_objects = _custom_objects(args.custom_objects)
        return args.func(args)
    except CliError as exc:
        message, code = str(exc), exc.code
    except UnsupportedModelError as exc:
        message, code = str(exc), "unsupported_model"
    except ProfileError as exc:
        message, code = str(exc), "bad_profile"
    except VerificationError as exc:
        message, code = str(exc).splitlines()[0], "verification_failed"
    except PlanError as exc:
        message, code = str(exc), "usage"
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            raise
        message = f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for a traceback)"
        code = "unexpected"
    sys.stderr.write(f"convrewrite: error: {message}\n")
    return EXIT_CODES[code]


if __name__ == "__main__":
    sys.exit(main())
