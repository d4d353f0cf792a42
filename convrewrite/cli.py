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
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

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
    """{'Name': obj} from ['module:attr', ...]: imports the module and takes the attribute."""
    out = {}
    for spec in specs or []:
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise CliError(f"--custom-objects {spec!r} is not module:attr (e.g. mypkg.layers:MyLayer).", "usage")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise CliError(f"--custom-objects {spec!r}: {exc}.", "usage") from None
        out[attr] = obj
    return out


def load_model(path: str, unsafe: bool = False, custom_objects=None):
    """Load a .keras (or legacy .h5) model with Keras's safe mode unless `unsafe`; never modifies it."""
    import keras

    p = _existing_file(path)
    if p.suffix not in (".keras", ".h5", ".hdf5"):
        raise CliError(f"'{path}' is not a .keras or .h5 file; expected a model saved with model.save().", "not_a_model")
    with open(p, "rb") as f:
        magic = f.read(8)
    if p.suffix == ".keras" and not magic.startswith(b"PK"):
        raise CliError(f"'{path}' is not a .keras archive (not a zip file); expected a model saved with model.save().", "not_a_model")
    if p.suffix != ".keras" and magic != b"\x89HDF\r\n\x1a\n":
        raise CliError(f"'{path}' is not an HDF5 file; expected a legacy Keras .h5 model.", "not_a_model")
    try:
        model = keras.models.load_model(p, safe_mode=not unsafe, custom_objects=_custom_objects(custom_objects),
                                        compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for unreadable files
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
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
        if directory and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        done.append(True)

    try:
        yield tmp, commit
    finally:
        if not done and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _refuse_existing(path: Path, force: bool, flag="--force"):
    if path.exists() and not force:
        raise CliError(f"output '{path}' already exists; pass {flag} to replace it.", "output_exists")


def _write_text_atomic(path: Path, text: str, force: bool):
    _refuse_existing(path, force)
    with atomic_path(path) as (tmp, commit):
        tmp.write_text(text)
        commit()


# ---- commands ---------------------------------------------------------------------------------------
def cmd_profile(args):
    import convrewrite
    from convrewrite import cost

    out = Path(args.output)
    _refuse_existing(out, args.force)
    if args.plot:
        _refuse_existing(Path(args.plot), args.force)
    cm = convrewrite.profile_device(mode="full" if args.full else "quick", progress=not args.no_progress,
                                    allow=args.allow)
    with atomic_path(out, suffix=".json") as (tmp, commit):
        cm.save(tmp)
        commit()
    v = cm.validation
    print(f"wrote {out}: {len(cm.measurements)} timings, implementations {sorted(cm.fits)}; held-out: "
          f"{(v.get('within_10pct_of_best') or 0):.0%} of predicted choices within 10% of the best")
    if args.plot:
        with atomic_path(Path(args.plot), suffix=".png") as (tmp, commit):
            cost.plot(cm, tmp)
            commit()
        print(f"wrote {args.plot}")
    return 0


def cmd_plan(args):
    import convrewrite

    model = load_model(args.model, args.unsafe, args.custom_objects)
    plan = convrewrite.plan(model, cost_model=_cost_model_arg(args.cost_model), allow=args.allow,
                            pac=parse_pac(args.pac), batch=args.batch)
    print(plan.to_json() if args.json else plan.summary())
    return 0


def cmd_convert(args):
    import convrewrite
    from convrewrite.verify import random_inputs

    src, out = Path(args.input), Path(args.output)
    _existing_file(args.input)
    if out.suffix != ".keras":
        raise CliError(f"output '{out}' must end in .keras (the format Keras saves whole models in).", "usage")
    if src.resolve() == out.resolve():
        raise CliError(f"output '{out}' is the input file; write to another path (the input is never modified).", "usage")
    _refuse_existing(out, args.force)
    for extra in (args.report, args.export_savedmodel):
        if extra:
            _refuse_existing(Path(extra), args.force)

    model = load_model(args.input, args.unsafe, args.custom_objects)
    fast = convrewrite.optimize(model, cost_model=_cost_model_arg(args.cost_model), allow=args.allow,
                                pac=parse_pac(args.pac), measure=args.measure, rtol=args.rtol, batch=args.batch)
    report = fast.convrewrite_report
    inputs = random_inputs(model, batch=2, seed=7)

    with atomic_path(out, suffix=".keras") as (tmp, commit):
        fast.save(tmp)
        # Verify what was written, not what is in memory: reload the file and compare with the original.
        reloaded = load_model(str(tmp), args.unsafe, args.custom_objects)
        written = convrewrite.verify(model, reloaded, inputs=inputs, rtol=args.rtol, sites=False)
        if not written.passed:
            raise CliError(f"the written model differs from '{src}' after reloading "
                           f"({[c.name for c in written.checks if not c.passed]}); nothing was written.", "verification_failed")
        if args.export_savedmodel:
            with atomic_path(Path(args.export_savedmodel), directory=True) as (tmp_dir, commit_dir):
                fast.export(str(tmp_dir), format="tf_saved_model", verbose=False)
                commit_dir()
        commit()

    print(fast.convrewrite_plan.summary())
    for f in report.fallbacks:
        print(f"fell back: {f['site']} {f['from']} -> {f['to']} ({f['why']})")
    print(f"verified: max relative error {max((c.rel_error for c in report.outputs), default=0):.1e} "
          f"(tolerance {max((c.tolerance for c in report.outputs), default=0):.0e}); wrote {out}"
          + (f" and SavedModel {args.export_savedmodel}" if args.export_savedmodel else ""))
    if args.report:
        payload = {"input": str(src), "output": str(out), "plan": fast.convrewrite_plan.to_dict(),
                   "verification": report.to_dict(), "written_file_verification": written.to_dict()}
        _write_text_atomic(Path(args.report), json.dumps(payload, indent=1), args.force)
        print(f"wrote report {args.report}")
    return 0


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
    p.add_argument("--batch", type=int, default=8, help="batch size the plan is made for (default 8)")


def build_parser():
    from convrewrite import __version__

    parser = argparse.ArgumentParser(
        prog="convrewrite",
        description="Measure convolution implementations on a device and convert saved Keras models to the fastest "
                    "equivalent ones.",
        epilog=EPILOG_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"convrewrite {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
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
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = add("convert", "optimize a saved model, verify it, and write it (never touching the input)",
            "convrewrite convert model.keras fast.keras --cost-model auto --report report.json")
    p.add_argument("input")
    p.add_argument("output", help="the converted model (.keras); refused if it exists, unless --force")
    _planning_args(p)
    p.add_argument("--measure", action="store_true", help="time the candidates on this model's shapes (cached in the profile)")
    p.add_argument("--rtol", type=float, help="relative error tolerance (default: 1e-5 float32, 1e-2 float16)")
    p.add_argument("--report", metavar="JSON", help="write the plan and verification report here")
    p.add_argument("--export-savedmodel", metavar="DIR", help="also export a TF SavedModel (TF Serving) here")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    _common_model_args(p)
    p.set_defaults(func=cmd_convert)

    p = add("verify", "compare two saved models' outputs on random inputs",
            "convrewrite verify model.keras fast.keras --samples 8 --rtol 1e-5")
    p.add_argument("a", help="the reference model")
    p.add_argument("b", help="the model to check against it")
    p.add_argument("--samples", type=int, default=4, help="random inputs to compare on (default 4)")
    p.add_argument("--rtol", type=float, help="relative error tolerance (default by dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", action="store_true", help="also compare conv layers of the same name one by one")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common_model_args(p)
    p.set_defaults(func=cmd_verify)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"convrewrite: warning: {str(message).splitlines()[0]}\n")


def main(argv=None) -> int:
    from convrewrite.errors import PlanError, ProfileError, UnsupportedModelError, VerificationError

    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    code = "ok"
    try:
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
    except KeyboardInterrupt:
        message, code = "interrupted; no output was written", "interrupted"
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            raise
        message = f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for a traceback)"
        code = "unexpected"
    sys.stderr.write(f"convrewrite: error: {message}\n")
    return EXIT_CODES[code]


if __name__ == "__main__":
    sys.exit(main())
