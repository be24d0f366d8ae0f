"""Build, cache and load the native CPU ops of kernels/csrc/*.cpp (torch.ops.depthserve.*).

    ext = load()        # once per process: the cached library, built first if needed; None if unusable
    python -m kernels.cpu_ext [--force]     # build now (Dockerfile, CI) and print what and where

Every kernels/csrc/*.cpp is compiled (each registers its ops with TORCH_LIBRARY_FRAGMENT(depthserve, m)) and
linked into one shared library, loaded with torch.ops.load_library. The build runs the C++ compiler directly
($CXX, else c++ / g++), one process per source, with torch's include and library paths: the only tool it
needs is a compiler (torch.utils.cpp_extension.load would also need ninja).

Cache: $DEPTHSERVE_KERNEL_CACHE, else ~/.cache/depthserve/kernels, one folder per build key, a hash of the
sources, the torch version, the compiler flags and (for -march=native, the default) the CPU's ISA flags from
/proc/cpuinfo, so a library built for one CPU never runs on another. Two processes that build at once take
turns on a file lock (fcntl); the second finds the first one's library. The library file appears atomically
(rename), so a reader never sees half of one.

A source that fails to compile is left out (the others still load; its error is in the folder's build.log), and
with it decode_layer.cpp, which calls the others' kernels (COMPOSED_SOURCES);
a missing compiler, a failed build or a failed load means ONE warning on the "depthserve.kernels" logger and
load() returns None: the reference ops run, a start-up never fails over a kernel.

Environment:
    DEPTHSERVE_KERNEL_CACHE      the cache folder
    DEPTHSERVE_NO_NATIVE_BUILD=1 never compile: use a cached library or nothing
    DEPTHSERVE_KERNEL_MARCH      the -march of a build (default native). A portable level (x86-64-v3, ...)
                                 leaves the CPU flags out of the key: one prebuilt library serves every CPU
                                 that has the level's ISA (checked at load), e.g. an image built elsewhere.
    CXX                          the compiler
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["BuildError", "Extension", "UnsupportedCPU", "build", "cache_root", "cpu_flags", "load",
           "release_openmp_pool", "reset"]

logger = logging.getLogger("depthserve.kernels")

SRC_DIR = Path(__file__).resolve().parent / "csrc"
LIB_NAME = "depthserve_cpu"
ENV_CACHE = "DEPTHSERVE_KERNEL_CACHE"
ENV_NO_BUILD = "DEPTHSERVE_NO_NATIVE_BUILD"
ENV_MARCH = "DEPTHSERVE_KERNEL_MARCH"
CFLAGS = ["-O3", "-std=c++20", "-fPIC", "-fopenmp", "-fno-math-errno", "-DNDEBUG", "-Wall", "-Wno-unused-function"]
# Sources that call other sources' functions (kernels/csrc/fused.h): left out whenever any other source fails to
# compile, since their undefined symbols would make the whole library fail to load.
COMPOSED_SOURCES = frozenset({"decode_layer.cpp"})
# /proc/cpuinfo flags a portable -march level needs (a library built for it would crash on SIGILL without them)
MARCH_FLAGS = {
    "x86-64": set(),
    "x86-64-v2": {"ssse3", "sse4_1", "sse4_2", "popcnt", "cx16"},
    "x86-64-v3": {"ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma",
                  "movbe", "xsave"},
    "x86-64-v4": {"ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma",
                  "movbe", "xsave", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


class BuildError(RuntimeError):
    """The native library could not be built or loaded (the message says why)."""


class UnsupportedCPU(BuildError):
    """The library was built for an ISA this CPU lacks (a portable -march level)."""


@dataclass(frozen=True)
class Extension:
    """A loaded build: its library, the torch.ops.depthserve ops it registered, the sources it left out."""

    path: Path
    ops: tuple[str, ...]
    sources: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    built: bool = False  # compiled by this process (False: found in the cache)
    seconds: float = 0.0  # build time when built


def cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "depthserve" / "kernels")


def _march() -> str:
    return os.environ.get(ENV_MARCH) or "native"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's ISA flags (x86 'flags' / arm 'Features' of `cpuinfo`, default /proc/cpuinfo); empty where there
    is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _sources() -> list[Path]:
    return sorted(SRC_DIR.glob("*.cpp"))


def _flags() -> list[str]:
    return [*CFLAGS, f"-march={_march()}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _key() -> str:
    """The build key: what the library's code depends on."""
    files = sorted([*SRC_DIR.glob("*.cpp"), *SRC_DIR.glob("*.h")])
    march = _march()
    parts = {
        "sources": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
        "torch": [torch.__version__, torch.version.git_version],
        "flags": _flags(),
        "machine": platform.machine(),
        # -march=native code runs only on this kind of CPU; a named level runs wherever its ISA is there
        "isa": sorted(cpu_flags()) if march == "native" else march,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _build_dir() -> Path:
    return cache_root() / f"{LIB_NAME}-{_key()}"


def _check_cpu() -> None:
    """UnsupportedCPU if the library's -march level needs ISA flags this CPU lacks (x86-64 levels only)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    missing = sorted(MARCH_FLAGS.get(_march(), set()) - cpu_flags())
    if missing:
        raise UnsupportedCPU(f"this CPU lacks {', '.join(missing)}, which a build for -march={_march()} needs")


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (found := shutil.which(name)):
            return found
    raise BuildError("no C++ compiler found (set CXX, or install g++)")


def _compile(folder: Path) -> tuple[Path, list[str], list[str]]:
    """Compile every source (in parallel) and link those that compiled into `folder`/tmp-*.so.
    Returns (the library, the sources in it, the sources left out); BuildError if none compiled."""
    from torch.utils import cpp_extension  # build time only: it imports setuptools

    cxx = _compiler()
    sources = _sources()
    if not sources:
        raise BuildError(f"no C++ sources in {SRC_DIR}")
    includes = [arg for inc in cpp_extension.include_paths("cpu") for arg in ("-isystem", inc)]
    work = Path(tempfile.mkdtemp(prefix="tmp-", dir=folder))
    log: list[str] = []
    try:
        procs = []
        for src in sources:
            obj = work / f"{src.stem}.o"
            cmd = [cxx, *_flags(), *includes, f"-I{SRC_DIR}", "-c", str(src), "-o", str(obj)]
            procs.append((src, obj, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          text=True)))
        objs, built, skipped = [], [], []
        for src, obj, cmd, proc in procs:
            out, _ = proc.communicate()
            log.append(f"$ {' '.join(cmd)}\n{out}")
            if proc.returncode == 0:
                objs.append(str(obj))
                built.append(src.name)
            else:
                skipped.append(src.name)
        if skipped:  # a source that calls into the others (fused.h) would leave the library unloadable
            for name in [n for n in built if n in COMPOSED_SOURCES]:
                objs.remove(str(work / f"{Path(name).stem}.o"))
                built.remove(name)
                skipped.append(name)
                log.append(f"{name}: left out because {', '.join(skipped[:-1])} did not compile")
        if not objs:
            raise BuildError(f"no source compiled: {_first_error(log)}")
        lib_dirs = cpp_extension.library_paths("cpu")
        so = work / f"{LIB_NAME}.so"
        cmd = [cxx, "-shared", "-fopenmp", *objs, "-o", str(so), *[f"-L{d}" for d in lib_dirs],
               *[f"-Wl,-rpath,{d}" for d in lib_dirs], "-lc10", "-ltorch_cpu"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.append(f"$ {' '.join(cmd)}\n{proc.stdout}")
        if proc.returncode != 0:
            raise BuildError(f"linking failed: {_first_error(log)}")
        return so, built, skipped
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):
            raise BuildError(f"{type(e).__name__}: {e}") from e
        raise
    finally:
        (folder / "build.log").write_text("\n".join(log))


def _first_error(log: list[str]) -> str:
    for chunk in log:
        for line in chunk.splitlines():
            if "error" in line.lower() and not line.startswith("$"):
                return line.strip()
    return "see build.log"


@contextlib.contextmanager
def _locked(folder: Path):
    import fcntl

    with open(folder / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure_built(force: bool = False) -> tuple[Path, dict, bool, float]:
    """The library of this build key (compiled under the lock unless already cached), its manifest,
    whether this call compiled it and how long that took."""
    folder = _build_dir()
    lib, manifest_file = folder / f"{LIB_NAME}.so", folder / "manifest.json"
    if lib.exists() and not force:  # the fast path: no lock (a read-only prebuilt cache works)
        return lib, json.loads(manifest_file.read_text()), False, 0.0
    if os.environ.get(ENV_NO_BUILD, "") not in ("", "0"):
        raise BuildError(f"no cached build in {folder} and {ENV_NO_BUILD} is set")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the kernel cache {folder}: {e}") from e
    with _locked(folder):
        if lib.exists() and not force:  # another process built it while this one waited
            return lib, json.loads(manifest_file.read_text()), False, 0.0
        t0 = time.perf_counter()
        tmp, built, skipped = _compile(folder)
        manifest = {"sources": built, "skipped": skipped, "flags": _flags(), "torch": torch.__version__,
                    "compiler": _compiler()}
        manifest_file.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, lib)  # atomic: readers see no library or a whole one
        shutil.rmtree(tmp.parent, ignore_errors=True)
        return lib, manifest, True, time.perf_counter() - t0


def _registered_ops() -> tuple[str, ...]:
    ns = torch.ops.depthserve
    return tuple(name for name in ("rms_norm", "add_rms_norm", "attnres_site", "attnres_phase1", "attnres_mix",
                                   "decode_attention", "small_m_linear", "rotary", "silu_mul", "store_kv", "decode_layer",
                                   "decode_layers", "quant_linear", "dequantize")
                 if hasattr(ns, name))


def build(force: bool = False) -> Extension:
    """Build (unless cached, or always with `force`) and load the library; BuildError on failure."""
    lib, manifest, built, seconds = _ensure_built(force)
    _check_cpu()
    try:
        torch.ops.load_library(str(lib))
    except Exception as e:  # noqa: BLE001 - any failure to load means: no native ops
        raise BuildError(f"loading {lib} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return Extension(lib, _registered_ops(), tuple(manifest.get("sources", ())), tuple(manifest.get("skipped", ())),
                     built, seconds)


_lock = threading.Lock()
_state: dict[str, Extension | None] = {}


def load() -> Extension | None:
    """The native library for this process, built on first use; None (after ONE warning) if unusable."""
    with _lock:
        if "ext" not in _state:
            ext = None
            try:
                ext = build()
                if ext.skipped:
                    logger.warning("native CPU ops: %s failed to compile and %s left out (see %s)",
                                   ", ".join(ext.skipped), "is" if len(ext.skipped) == 1 else "are",
                                   ext.path.parent / "build.log")
                elif ext.built:
                    logger.info("native CPU ops built in %.1f s: %s", ext.seconds, ext.path)
            except Exception as e:  # noqa: BLE001 - a kernel never fails a start-up
                logger.warning("native CPU ops unavailable, using the reference ops (%s)", e)
            _state["ext"] = ext
        return _state["ext"]


def reset() -> None:
    """Forget this process's load() result (tests). A library already loaded stays loaded."""
    with _lock:
        _state.clear()


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP thread pool (kernels/csrc/threads.cpp says why): a thread that hands the
    stepping to another one calls this, so that libgomp manages one team, not two. False where the native
    library is not loaded (nothing released)."""
    if load() is None or not hasattr(torch.ops.depthserve, "release_openmp_pool"):
        return False
    return torch.ops.depthserve.release_openmp_pool() == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.cpu_ext", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    args = parser.parse_args(argv)
    try:
        lib, manifest, built, seconds = _ensure_built(force=args.force)
    except BuildError as e:
        print(f"native CPU ops: build failed: {e}", file=sys.stderr)
        return 1
    print(f"native CPU ops ({f'built in {seconds:.1f} s' if built else 'cached'}): {lib}")
    print(f"  sources: {', '.join(manifest['sources'])}")
    print(f"  flags: {' '.join(manifest['flags'])}")
    failed = bool(manifest["skipped"])
    if failed:
        print(f"  left out (failed to compile): {', '.join(manifest['skipped'])}; see {lib.parent / 'build.log'}",
              file=sys.stderr)
    try:
        ext = build()
    except UnsupportedCPU as e:  # e.g. an image's portable build on a builder without that ISA
        print(f"  not loaded here: {e}")
        return int(failed)
    except BuildError as e:
        print(f"  {e}", file=sys.stderr)
        return 1
    print(f"  ops: {', '.join(f'torch.ops.depthserve.{op}' for op in ext.ops)}")
    from kernels import ops  # the check a start-up makes: every native op against its reference

    for op, problem in ops.probe_native_ops().items():
        print(f"  probe: {op}: {problem}", file=sys.stderr)
        failed = True
    return int(failed)


if __name__ == "__main__":
    from kernels.cpu_ext import main as _main  # one module instance (kernels.ops imports it by that name)

    sys.exit(_main())
