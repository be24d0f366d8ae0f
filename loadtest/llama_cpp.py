"""A reproducible, cached llama.cpp build for comparisons: `python -m loadtest.llama_cpp build|path|quantize`.

llama.cpp is the CPU engine users pick, so depthserve's numbers mean most beside it, on the same GGUF
files and the same cores. Nothing here touches the project's venv, and CI never compiles llama.cpp:

* ``build``: downloads the ``llama-cpp-python`` sdist (version pinned in ``VERSION``, the newest that
  built here) with pip, installs it (with its small dependencies) into a dedicated venv under the cache,
  and builds ``llama-server`` and ``llama-quantize`` with cmake from the llama.cpp sources vendored in
  that sdist (``vendor/llama.cpp``: the same ggml as the Python package), Release, ``-DGGML_NATIVE=ON``,
  ``-DLLAMA_CURL=OFF``, only those two targets, ``-j2``. Here (2 cores shared with other builds) the
  package took 7 minutes and the two binaries about 12.
* ``path``: prints the cached paths (python, llama-server, llama-quantize) as JSON; fails when not built.
* ``quantize``: BF16, Q8_0 and Q4_0 GGUFs of SmolLM2-135M-Instruct, made by llama-quantize
  ``--allow-requantize`` from the built-in Q4_1 file (the only GGUF shipped with a package): every file
  therefore carries the Q4_1 file's values (dequantized, then requantized), so they differ only in the
  storage format, which is what a speed comparison wants; it says nothing about the quality of Q8_0 or
  BF16 made from the original weights.

The pin lives here (``VERSION``), not in pyproject.toml: the project pins its tested set in
.ci/constraints.txt, which .ci/lock resolves from the runtime and ``dev`` dependencies only, and an extra
outside that lock would be an untested pin that invites compiling llama.cpp into the project's venv, which
this script exists to avoid.

The cache lives under ``$DEPTHSERVE_LLAMA_CPP_CACHE``, else ``~/.cache/depthserve/llama_cpp``, in a folder
keyed by the version, the machine and a digest of the CPU's feature flags (GGML_NATIVE builds for this CPU,
so a copied cache on another CPU must not be reused). Each step leaves a marker file once done, so a
second call is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp gives llama-server and llama-quantize
PACKAGE = "llama-cpp-python"
TARGETS = ("llama-server", "llama-quantize")
QUANT_TYPES = ("BF16", "Q8_0", "Q4_0")  # made from the shipped Q4_1 file
BUILTIN_MODEL = "smollm2-135m-instruct"


def cache_root(env: dict[str, str] | None = None) -> Path:
    """$DEPTHSERVE_LLAMA_CPP_CACHE, else ~/.cache/depthserve/llama_cpp."""
    env = os.environ if env is None else env
    root = env.get("DEPTHSERVE_LLAMA_CPP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "depthserve" / "llama_cpp"


def cpu_flags(cpuinfo: str | None = None) -> str:
    """The CPU's feature flags, sorted (empty where /proc/cpuinfo is missing): what GGML_NATIVE builds for."""
    from kernels.cpu_ext import cpu_flags as flags  # the native ops' build key reads the same ones

    return " ".join(sorted(flags(cpuinfo)))


def cache_key(version: str = VERSION, machine: str | None = None, flags: str | None = None) -> str:
    """`<version>-<machine>-<8 hex of the CPU flags>`: a native build is only valid on the CPU it was made for."""
    machine = platform.machine() if machine is None else machine
    flags = cpu_flags() if flags is None else flags
    return f"{version}-{machine}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


class Layout:
    """Where each cached thing lives, for one key."""

    def __init__(self, root: Path | None = None, key: str | None = None) -> None:
        self.dir = (cache_root() if root is None else root) / (cache_key() if key is None else key)
        self.sdist_dir = self.dir / "sdist"
        self.src = self.dir / "src"
        self.venv = self.dir / "venv"
        self.build = self.dir / "build"
        self.bin = self.dir / "bin"
        self.models = self.dir / "models"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def binary(self, name: str) -> Path:
        return self.bin / name

    def marker(self, step: str) -> Path:
        return self.dir / f".{step}.done"

    def done(self, step: str) -> bool:
        return self.marker(step).exists()

    def paths(self) -> dict[str, str]:
        return {"dir": str(self.dir), "python": str(self.python),
                **{name: str(self.binary(name)) for name in TARGETS}, "models": str(self.models)}


def _run(cmd: Sequence[str | Path], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def fetch_sdist(lay: Layout, version: str = VERSION) -> Path:
    """The sdist, downloaded once by pip (no build, no dependencies), and unpacked to src/."""
    sdists = sorted(lay.sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        lay.sdist_dir.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "-d", lay.sdist_dir, f"{PACKAGE}=={version}"])
        sdists = sorted(lay.sdist_dir.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download left no sdist in {lay.sdist_dir}")
    if not (lay.src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        tmp = lay.dir / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="data")
        (top,) = list(tmp.iterdir())
        shutil.rmtree(lay.src, ignore_errors=True)
        top.rename(lay.src)
        shutil.rmtree(tmp)
    return sdists[0]


def _build_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
    env["CMAKE_ARGS"] = "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF"
    return env


def build_python(lay: Layout, sdist: Path, jobs: int = 2) -> None:
    """llama_cpp (the Python package) into its own venv: the project's venv stays as it is."""
    if lay.done("python"):
        return
    if not lay.python.exists():
        _run([sys.executable, "-m", "venv", lay.venv])
    _run([lay.python, "-m", "pip", "install", "--no-cache-dir", "--no-binary", PACKAGE, sdist],
         env=_build_env(jobs))
    _run([lay.python, "-c", "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"])
    lay.marker("python").touch()


def ensure_cmake() -> str:
    """A cmake on PATH, else pip's cmake (installed into the running interpreter's environment only if missing)."""
    found = shutil.which("cmake")
    if found:
        return found
    _run([sys.executable, "-m", "pip", "install", "cmake"])
    return shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")


def build_binaries(lay: Layout, jobs: int = 2) -> None:
    """llama-server and llama-quantize from vendor/llama.cpp, Release, native, no curl."""
    if lay.done("binaries"):
        return
    cmake = ensure_cmake()
    src = lay.src / "vendor" / "llama.cpp"
    _run([cmake, "-S", src, "-B", lay.build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
          "-DLLAMA_USE_PREBUILT_UI=OFF"])  # no web UI download: there is no network here, and no need
    _run([cmake, "--build", lay.build, "--config", "Release", "-j", str(jobs), "--target", *TARGETS])
    lay.bin.mkdir(parents=True, exist_ok=True)
    for name in TARGETS:
        hits = sorted(lay.build.rglob(name))
        exe = next((h for h in hits if h.is_file() and os.access(h, os.X_OK)), None)
        if exe is None:
            raise RuntimeError(f"{name} was not built under {lay.build}")
        shutil.copy2(exe, lay.binary(name))
    lay.marker("binaries").touch()


def build(lay: Layout | None = None, jobs: int = 2, what: str = "all") -> Layout:
    """Everything `build` promises, each step skipped when its marker is there."""
    lay = Layout() if lay is None else lay
    lay.dir.mkdir(parents=True, exist_ok=True)
    with _locked(lay.dir / ".lock"):  # two builds at once would share (and break) one cmake build folder
        return _build_locked(lay, jobs, what)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_locked(lay: Layout, jobs: int, what: str) -> Layout:
    if (what in ("all", "python") and not lay.done("python")) or (what in ("all", "bin") and not lay.done("binaries")):
        sdist = fetch_sdist(lay)
        if what in ("all", "python"):
            build_python(lay, sdist, jobs)
        if what in ("all", "bin"):
            build_binaries(lay, jobs)
    return lay


def require(lay: Layout | None = None, what: Sequence[str] = ("python", "binaries")) -> Layout:
    """The built cache, or a SystemExit saying how to build it."""
    lay = Layout() if lay is None else lay
    missing = [w for w in what if not lay.done(w)]
    if missing:
        raise SystemExit(f"llama.cpp {', '.join(missing)} not built in {lay.dir}: run "
                         "`python -m loadtest.llama_cpp build` first (about 20 minutes on 2 cores)")
    return lay


def quant_name(source: Path, qtype: str) -> str:
    """`<stem without its quant suffix>-<qtype>.gguf`, e.g. smollm2-135m-instruct-q4_1.gguf -> ...-Q8_0.gguf."""
    stem = source.stem
    for suffix in ("-q4_1", "-Q4_1", ".q4_1", ".Q4_1", "_q4_1"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem}-{qtype}.gguf"


def builtin_gguf() -> Path:
    """The shipped SmolLM2-135M-Instruct Q4_1 GGUF."""
    from models.loader import resolve_model

    path = Path(resolve_model(BUILTIN_MODEL))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not ggufs:
            raise SystemExit(f"no .gguf in {path}")
        path = ggufs[0]
    return path


def quantize(lay: Layout | None = None, source: Path | None = None,
             types: Sequence[str] = QUANT_TYPES) -> dict[str, Path]:
    """The built-in model in each of `types` (cached), plus the source itself as Q4_1."""
    lay = require(lay, ("binaries",))
    source = builtin_gguf() if source is None else source
    lay.models.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {"Q4_1": source}
    for qtype in types:
        dest = lay.models / quant_name(source, qtype)
        if not dest.exists():
            tmp = dest.with_suffix(".part")
            _run([lay.binary("llama-quantize"), "--allow-requantize", source, tmp, qtype, "2"],
                 stdout=subprocess.DEVNULL)
            tmp.rename(dest)
        out[qtype] = dest
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.llama_cpp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the sdist, build llama_cpp and llama-server/llama-quantize")
    b.add_argument("--jobs", "-j", type=int, default=2)
    b.add_argument("--only", choices=("all", "python", "bin"), default="all")
    sub.add_parser("path", help="print the cached paths as JSON")
    q = sub.add_parser("quantize", help="BF16, Q8_0, Q4_0 GGUFs of the built-in model (from its Q4_1 file)")
    q.add_argument("--types", nargs="+", default=list(QUANT_TYPES))
    q.add_argument("--source", type=Path, help="a GGUF to requantize (default: the built-in Q4_1 file)")
    args = p.parse_args(argv)
    lay = Layout()
    if args.cmd == "build":
        build(lay, args.jobs, args.only)
        print(json.dumps(lay.paths(), indent=1))
    elif args.cmd == "path":
        require(lay)
        print(json.dumps(lay.paths(), indent=1))
    else:
        for qtype, path in quantize(lay, args.source, args.types).items():
            print(f"{qtype:<5} {path.stat().st_size / 2**20:8.1f} MiB  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
