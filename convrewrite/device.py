"""What this device is, and whether a profile's fingerprint describes it.

A convolution's time depends on the hardware that runs it, not on the name it sells under: cloud VMs
report CPUs as "AMD EPYC" or "Intel(R) Xeon(R) Processor" whatever their generation, and the same name
covers CPUs with and without AVX-512, where oneDNN's direct kernels differ 2-8x in speed. So a
fingerprint records what selects the kernels and bounds their speed:

- CPU: vendor, family / model / stepping, the instruction-set extensions oneDNN and XLA dispatch on
  (`ISA_FLAGS`), cache sizes, and the CPUs this process may use (its affinity mask);
- GPU (TensorFlow backend): name, compute capability, count, and the CUDA / cuDNN versions TF was built with;
- libraries: the backend and its version, Keras, and the environment settings that switch kernels
  (`KERNEL_SETTINGS`, e.g. TF_ENABLE_ONEDNN_OPTS).

Two fingerprints describe the same device only if all of that agrees (`same_device`). A profile written
before hardware was recorded has no "hardware" entry: it is "hardware unknown", never the same device,
and goes through calibration (`convrewrite.calibration`) before `auto` trusts it.

The machine class (`CLASS_KEYS`: backend, device kind, architecture, threads) is the coarser question
"could this profile's numbers describe this device at all": a profile of another class is another
device's by construction (converting offline for it), never calibrated or measured here.

Simulated devices (`SIMULATE_ENV`): the environment variable CONVREWRITE_SIMULATE_DEVICE names a device
description (one of `SIMULATED_DEVICES`, or a JSON file of fingerprint fields) that `fingerprint()` reports
instead of this machine's hardware. Nothing runs differently: only what convrewrite *believes* of the device
changes (which profile matches, what calibration compares, which precisions are native), so the test suite can
be run as on another CPU or a GPU (`CONVREWRITE_SIMULATE_DEVICE=amd-zen4 python -m pytest tests`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",  # x86 (/proc/cpuinfo "flags")
             "asimd", "sve", "sve2", "asimddp", "bf16", "i8mm", "sme")   # aarch64 (/proc/cpuinfo "Features")
"""Instruction-set extensions that change which convolution / GEMM kernels oneDNN, Eigen and XLA run."""

KERNEL_SETTINGS = ("TF_ENABLE_ONEDNN_OPTS", "TF_XLA_FLAGS", "XLA_FLAGS", "TF_NUM_INTRAOP_THREADS",
                   "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS", "XLA_PYTHON_CLIENT_PREALLOCATE")
"""Environment variables that switch kernels or thread pools; recorded as set (None where unset)."""

JAX_SETTINGS = ("JAX_DEFAULT_MATMUL_PRECISION",)
"""Settings recorded on the JAX backend only (so TensorFlow fingerprints keep their ids): the matmul precision
switches JAX's GPU float32 matmuls and convolutions between TF32 and full float32. A setting a profile does
not record counts as unset there."""

CLASS_KEYS = ("backend", "device_kind", "arch", "threads")
"""Keys that must agree for a profile's numbers to describe this device's class at all."""

IDENTITY_KEYS = ("backend", "device_kind", "arch", "threads", "device_name", "hardware", "keras", "tensorflow",
                 "jax", "settings", "compute_capability", "gpu_count")
"""Everything `same_device` compares: two fingerprints differing in any of these are different devices."""


SIMULATE_ENV = "CONVREWRITE_SIMULATE_DEVICE"
"""Environment variable naming a simulated device description (see the module docstring)."""

SIMULATED_DEVICES = {
    "amd-zen4": {  # AVX-512 with BF16, no AMX: the bf16 variants run, no shipped profile is this hardware
        "device_name": "AMD EPYC 9R14 96-Core Processor",
        "hardware": {"cpu": {"vendor": "AuthenticAMD", "family": "25", "model": "17", "stepping": "1",
                             "isa": ["avx", "avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f",
                                     "avx512vl", "f16c", "fma", "sse4_2"],
                             "cache_kib": {"L1d": 32, "L1i": 32, "L2": 1024, "L3": 32768}}},
    },
    "avx2-no-bf16": {  # an older CPU: AVX2 only, no AVX-512, no native bfloat16
        "device_name": "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz",
        "hardware": {"cpu": {"vendor": "GenuineIntel", "family": "6", "model": "158", "stepping": "10",
                             "isa": ["avx", "avx2", "f16c", "fma", "sse4_2"],
                             "cache_kib": {"L1d": 32, "L1i": 32, "L2": 256, "L3": 12288}}},
    },
    "one-thread": {"threads": 1},  # a process pinned to one CPU (another machine class than every profile)
    "gpu": {  # a GPU fingerprint (Keras's JAX or TensorFlow backend on an NVIDIA H100)
        "device_kind": "gpu", "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0],
        "gpu_count": 1, "hardware": {"gpu": {"cuda_version": "12.5", "cudnn_version": "9"}},
    },
}
"""Device descriptions `SIMULATE_ENV` may name: fingerprint fields put over this device's (nested dicts merged)."""


def simulated_device() -> Optional[Tuple[str, dict]]:
    """(name, fingerprint fields) of the simulated device `SIMULATE_ENV` names, or None where it is unset.

    Raises ValueError naming the variable where it names neither a known description nor a readable JSON
    file of an object."""
    value = os.environ.get(SIMULATE_ENV, "").strip()
    if not value:
        return None
    if value in SIMULATED_DEVICES:
        return value, SIMULATED_DEVICES[value]
    try:
        fields = json.loads(Path(value).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"Received {SIMULATE_ENV}={value!r}; expected one of {sorted(SIMULATED_DEVICES)} or a JSON "
                         f"file of fingerprint fields ({type(exc).__name__}: {exc}).") from None
    if not isinstance(fields, dict):
        raise ValueError(f"Received {SIMULATE_ENV}={value!r}, a JSON {type(fields).__name__}; expected an object of "
                         f"fingerprint fields such as {{\"threads\": 1}}.")
    return Path(value).stem, fields


def _merged(base: dict, fields: dict) -> dict:
    """`base` with `fields` put over it, nested dicts merged key by key."""
    out = dict(base)
    for key, value in fields.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> Dict[str, str]:
    """The first processor's block of /proc/cpuinfo as {key: value}; {} where there is none (macOS, Windows)."""
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


@functools.lru_cache(maxsize=1)
def _cache_sizes() -> Dict[str, int]:
    """{"L1d": KiB, "L1i": KiB, "L2": KiB, "L3": KiB} of CPU 0, from sysfs; {} where unavailable."""
    out: Dict[str, int] = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        factor = {"K": 1, "M": 1024, "G": 1024 * 1024}.get(size[-1:], None)
        if factor is None or not size[:-1].isdigit():
            continue
        out[f"L{level}{suffix}"] = int(size[:-1]) * factor
    return out


def cpu_hardware() -> dict:
    """The CPU's identity: {"vendor", "family", "model", "stepping", "isa": [flags], "cache_kib": {...}}.

    Values are None where the OS does not say (then two such CPUs still differ from any CPU that does)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {
        "vendor": info.get("vendor_id") or info.get("CPU implementer") or platform.processor() or None,
        "family": info.get("cpu family") or info.get("CPU architecture"),
        "model": info.get("model") or info.get("CPU part"),
        "stepping": info.get("stepping") or info.get("CPU variant"),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "cache_kib": _cache_sizes(),
    }


def cpu_name() -> str:
    """The marketing name ("model name"), which alone does not identify the hardware."""
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine()


def usable_threads() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (taskset, cpusets, container
    CPU pinning), else all of the machine's. os.cpu_count() counts the machine's CPUs, which overstates a
    pinned process; TensorFlow sizes its CPU thread pools by the affinity mask too."""
    try:
        return len(os.sched_getaffinity(0)) or (os.cpu_count() or 1)
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def fingerprint() -> dict:
    """This device as a JSON-able dict: backend, device kind and name, architecture, threads, hardware
    identity (`cpu_hardware()`, plus the GPU's where one is used), library versions and kernel settings; under
    `SIMULATE_ENV`, the simulated description's fields instead, and "simulated": its name."""
    import keras

    fp = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "arch": platform.machine(),
        "device_kind": "cpu",
        "device_name": cpu_name(),
        "threads": usable_threads(),
        "hardware": {"cpu": cpu_hardware()},
        "settings": {k: os.environ.get(k) for k in KERNEL_SETTINGS},
    }
    library, fp[library], gpu = _backend_details()
    if library == "jax":
        fp["settings"].update({k: os.environ.get(k) for k in JAX_SETTINGS})
    if gpu:
        fp["device_kind"], fp["device_name"] = "gpu", gpu.pop("name")
        fp["compute_capability"], fp["gpu_count"] = gpu.pop("compute_capability"), gpu.pop("count")
        fp["hardware"]["gpu"] = gpu  # driver-side identity: CUDA / cuDNN versions
    simulated = simulated_device()
    if simulated:  # the simulated description, and its name (so its caches are never this machine's)
        fp = _merged(fp, simulated[1])
        fp["simulated"] = simulated[0]
    return fp


@functools.lru_cache(maxsize=1)
def _backend_details_cached():
    from .layers import backend

    return backend.device_details()


def _backend_details():
    """(backend library, its version, GPU details or None), asked once per process (listing devices is
    slow); a copy."""
    library, version, gpu = _backend_details_cached()
    return library, version, (dict(gpu) if gpu else None)


def hardware_known(fp: dict) -> bool:
    """Whether a fingerprint records the hardware (profiles from before it did: "hardware unknown")."""
    return isinstance(fp.get("hardware"), dict) and bool(fp["hardware"])


def same_class(profile_fp: dict, here: dict) -> bool:
    """Whether a profile could describe this device at all: backend, device kind, architecture and thread
    count agree (and the GPU name on GPUs). Hardware and library versions may still differ."""
    keys = CLASS_KEYS + (("device_name",) if here.get("device_kind") != "cpu" else ())
    return all(profile_fp.get(k) == here.get(k) for k in keys)


def same_device(profile_fp: dict, here: dict) -> bool:
    """Whether a profile was measured on this very device: every identity key agrees and the hardware is
    known. Where it is not, the profile's numbers must be calibrated here before they are trusted."""
    return hardware_known(profile_fp) and not differences(profile_fp, here)


def differences(profile_fp: dict, here: dict) -> List[str]:
    """Human-readable differences, class keys first: "threads: profile 4, this device 2"."""
    out = []
    for key in IDENTITY_KEYS:
        a, b = profile_fp.get(key), here.get(key)
        if key == "hardware" and not hardware_known(profile_fp):
            out.append("hardware: unknown in the profile (written before hardware was recorded)")
        elif key == "hardware" and a != b:
            out.extend(_hardware_differences(a, b))
        elif key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out.extend(f"setting {k}: profile {a.get(k)!r}, this device {b.get(k)!r}"
                       for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        elif a != b:
            out.append(f"{key}: profile {a!r}, this device {b!r}")
    return out


def _hardware_differences(a: dict, b: dict) -> List[str]:
    out = []
    for part in sorted(set(a) | set(b)):
        pa, pb = a.get(part) or {}, b.get(part) or {}
        for key in sorted(set(pa) | set(pb)):
            if pa.get(key) != pb.get(key):
                if key == "isa":
                    only_a = sorted(set(pa.get(key) or ()) - set(pb.get(key) or ()))
                    only_b = sorted(set(pb.get(key) or ()) - set(pa.get(key) or ()))
                    out.append(f"{part} isa: profile only {only_a}, this device only {only_b}")
                else:
                    out.append(f"{part} {key}: profile {pa.get(key)!r}, this device {pb.get(key)!r}")
    return out


def describe(fp: dict) -> str:
    """One line naming a device by its full fingerprint, for results and messages:
    "'Intel(R) Xeon(R) Processor' GenuineIntel family 6 model 167 stepping 1, avx2 avx512f ... amx_tile,
    L2 2048 KiB, L3 491520 KiB; 2 threads; tensorflow 2.21.0, keras 3.15.1"."""
    name = f"{fp.get('device_name')!r}"
    cpu = (fp.get("hardware") or {}).get("cpu")
    if cpu:
        caches = ", ".join(f"{k} {v} KiB" for k, v in sorted((cpu.get("cache_kib") or {}).items()) if k in ("L2", "L3"))
        name += (f" {cpu.get('vendor')} family {cpu.get('family')} model {cpu.get('model')} stepping "
                 f"{cpu.get('stepping')}, {' '.join(cpu.get('isa') or []) or 'no listed ISA extensions'}"
                 + (f", {caches}" if caches else ""))
    elif not hardware_known(fp):
        name += " (hardware unknown)"
    if fp.get("compute_capability"):
        name += f", compute capability {'.'.join(map(str, fp['compute_capability']))}"
    libs = ", ".join(f"{k} {fp[k]}" for k in ("tensorflow", "jax", "keras") if fp.get(k))
    simulated = f" (simulated: {fp['simulated']})" if fp.get("simulated") else ""
    return f"{name}; {fp.get('threads')} threads" + (f"; {libs}" if libs else "") + simulated


def fingerprint_id(fp: dict) -> str:
    """A short stable id of a whole fingerprint (16 hex digits of the SHA-256 of its sorted JSON): the key
    of tactic caches, calibrations and measured profiles, so each is reused only on the device that made it."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def slug(fp: dict) -> str:
    """A file-name fragment for a fingerprint: "x86_64-cpu-2threads-tensorflow-genuineintel-6-167-1-<id8>"."""
    cpu = (fp.get("hardware") or {}).get("cpu") or {}
    parts = [fp.get("arch"), fp.get("device_kind"), f"{fp.get('threads')}threads", fp.get("backend"),
             cpu.get("vendor"), cpu.get("family"), cpu.get("model"), cpu.get("stepping")]
    text = "-".join(str(p) for p in parts if p is not None).lower()
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text) + f"-{fingerprint_id(fp)[:8]}"

