"""Load chosen modules of an engine's published wheel, with every other import stubbed.

The conformance tests run the engines' own functions and classes (SGLang, vLLM) on a
CPU-only machine without installing them: ``pip download --no-deps`` fetches the wheel
into a cache outside the repository, its Python files are unpacked there, and an import
hook serves the named modules from those files while any other module of the engine (and
the heavy native packages it pulls in) becomes a permissive stub. Nothing of the engines'
code is kept in this repository.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE = Path(os.environ.get("MMASSEMBLER_WHEEL_CACHE", Path.home() / ".cache" / "mmassembler" / "wheels"))


class WheelUnavailable(RuntimeError):
    """The wheel could not be fetched (no network, no registry)."""


def _suits(name: str) -> bool:
    """Whether a wheel (or its unpacked tree) named ``name`` runs on this interpreter:
    pure Python (``py3-none``), the stable ABI (``abi3``) or this CPython's own tag."""
    tag = f"-cp{sys.version_info.major}{sys.version_info.minor}-"
    return tag in name or "-abi3-" in name or "-none-" in name


def fetch(spec: str, native: bool = False) -> Path:
    """The wheel for ``spec`` (``name==version``), downloaded once into the cache. With
    ``native``, one built for this interpreter (its compiled modules are used)."""
    name, version = spec.split("==")
    CACHE.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = [w for w in sorted(CACHE.glob(pattern)) if not native or _suits(w.name)]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(CACHE), spec]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        found = [w for w in sorted(CACHE.glob(pattern)) if not native or _suits(w.name)]
        if proc.returncode != 0 or not found:
            raise WheelUnavailable(f"pip download {spec} failed: {proc.stderr.strip()[-400:]}")
    return found[-1]


def fetch_for_python(spec: str, version: str) -> Path:
    """The binary wheel of ``spec`` for CPython ``version`` (``"3.12"``) on x86-64 Linux,
    downloaded into the cache (for an export to a machine running that interpreter)."""
    name, ver = spec.split("==")
    tag = "cp" + version.replace(".", "")
    found = sorted(CACHE.glob(f"{name.replace('-', '_')}-{ver}-{tag}-*.whl"))
    if found:
        return found[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "--python-version", version, "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(CACHE), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = sorted(CACHE.glob(f"{name.replace('-', '_')}-{ver}-{tag}-*.whl"))
    if proc.returncode != 0 or not found:
        raise WheelUnavailable(f"pip download {spec} for Python {version} failed: {proc.stderr.strip()[-400:]}")
    return found[-1]


def source(spec: str, suffixes: tuple[str, ...] = (".py",)) -> Path:
    """The unpacked files of ``spec``'s wheel: already in the cache (as ``export`` leaves
    them on a machine without a registry), else fetched and unpacked. Only Python files
    are read unless ``suffixes`` asks for compiled modules, which must suit this interpreter."""
    native = ".so" in suffixes
    name, version = spec.split("==")
    with _locked():  # test workers share the cache: one fetches and unpacks, the others wait
        for root in sorted(CACHE.glob(f"{name.replace('-', '_')}-{version}-*")):
            if root.is_dir() and (not native or _suits(root.name)) and (root / ".unpacked").exists():
                return root
        return unpack(fetch(spec, native), suffixes)


@contextlib.contextmanager
def _locked():
    """An exclusive lock on the cache directory (across processes, where fcntl exists)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(CACHE / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export(roots: dict[Path, set[str]], dest: Path) -> None:
    """Copy just the named modules (dotted names) of each unpacked root into ``dest``,
    same layout, marked unpacked: enough for ``source`` on a machine without a registry."""
    import shutil

    for root, modules in roots.items():
        out = dest / root.name
        for mod in modules:
            rel = Path(*mod.split("."))
            for cand in (rel.with_suffix(".py"), rel / "__init__.py"):
                if (root / cand).exists():
                    (out / cand).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(root / cand, out / cand)
        if not modules:  # the whole tree (a small dependency such as msgspec)
            shutil.copytree(root, out, dirs_exist_ok=True)
        (out / ".unpacked").touch()


def unpack(wheel: Path, suffixes: tuple[str, ...] = (".py",)) -> Path:
    """The wheel's files with ``suffixes``, unpacked once beside it; returns the root."""
    root = wheel.with_suffix("")
    done = root / ".unpacked"
    if not done.exists():
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(suffixes) and ".dist-info/" not in name:
                    zf.extract(name, root)
        done.touch()
    return root


class Stub(type):
    """A stand-in for anything a stubbed module exports: a class that can be subclassed,
    called, indexed, used as a decorator or read for attributes, and does nothing."""

    def __new__(mcs, name="Stub", bases=(), ns=None):
        return super().__new__(mcs, name, bases, dict(ns or {}))

    def __init__(cls, *args, **kwargs):
        pass

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return Stub(name)

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], Stub):
            return args[0]  # used as a decorator: keep the decorated function
        return Stub(cls.__name__)

    def __getitem__(cls, item):
        return cls

    def __or__(cls, other):
        return cls

    __ror__ = __or__

    def __bool__(cls):
        return False

    def __iter__(cls):
        return iter(())

    def __mro_entries__(cls, bases):
        return (object,)


class StubModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []  # a package, so submodules resolve too
        self.__file__ = f"<stub {name}>"

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = Stub(name)
        setattr(self, name, value)
        return value


class _Loader(importlib.abc.Loader):
    def __init__(self, importer: "EngineImporter", kind: str, path: Path | None = None):
        self.importer, self.kind, self.path = importer, kind, path

    def create_module(self, spec):
        if self.kind == "stub":
            return StubModule(spec.name)
        return None

    def exec_module(self, module):
        if self.kind == "package":
            module.__path__ = [str(self.path)]
        elif self.kind == "real":
            if self.path.name == "__init__.py":
                module.__path__ = [str(self.path.parent)]
            code = compile(self.path.read_text(), str(self.path), "exec")
            exec(code, module.__dict__)


class EngineImporter(importlib.abc.MetaPathFinder):
    """Serves ``real`` modules of ``package`` from ``root``; stubs the rest of ``package``
    and every top-level name in ``stubbed``. Package ``__init__`` files are never run."""

    def __init__(self, root: Path, package: str, real: set[str], stubbed: set[str] = frozenset()):
        self.root, self.package, self.real, self.stubbed = root, package, set(real), set(stubbed)
        self.loading = True  # third-party stubs only while the engine's modules import

    def _ours(self, fullname: str) -> bool:
        top = fullname.split(".")[0]
        return top == self.package or (self.loading and top in self.stubbed)

    def find_spec(self, fullname, path=None, target=None):
        if not self._ours(fullname):
            return None
        rel = self.root.joinpath(*fullname.split("."))
        if fullname.split(".")[0] == self.package:
            if fullname in self.real:
                package = not rel.with_suffix(".py").exists()
                file = rel / "__init__.py" if package else rel.with_suffix(".py")
                spec = importlib.machinery.ModuleSpec(fullname, _Loader(self, "real", file),
                                                      origin=str(file), is_package=package)
                if package:
                    spec.submodule_search_locations = [str(rel)]
                return spec
            if rel.is_dir() and any(r.startswith(fullname + ".") for r in self.real):
                return importlib.machinery.ModuleSpec(fullname, _Loader(self, "package", rel),
                                                      is_package=True)
        return importlib.machinery.ModuleSpec(fullname, _Loader(self, "stub"), is_package=True)


def install(importer: EngineImporter) -> None:
    """Put ``importer`` first on the import path (once per package)."""
    for finder in sys.meta_path:
        if isinstance(finder, EngineImporter) and finder.package == importer.package:
            sys.meta_path.remove(finder)
            break
    sys.meta_path.insert(0, importer)


def import_with_stubs(importer: EngineImporter, modules: list[str]) -> list[types.ModuleType]:
    """Import ``modules`` through ``importer``; a third-party package the engine's real
    modules need but this machine lacks (PIL, psutil, ...) is stubbed and the import retried.
    Returns the modules; logs what was stubbed."""
    install(importer)
    for _ in range(100):
        try:
            loaded = [importlib.import_module(name) for name in modules]
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if not top or top in importer.stubbed or top == importer.package:
                raise
            logger.info("stubbing %s for %s", top, importer.package)
            importer.stubbed.add(top)
            for name in [n for n in sys.modules if n.split(".")[0] in (importer.package, top)]:
                del sys.modules[name]
            continue
        # The engine's modules keep the stubs they bound; the rest of the process gets
        # the real third-party packages (or ImportError) from here on.
        importer.loading = False
        for name in [n for n in sys.modules if isinstance(sys.modules[n], StubModule)
                     and n.split(".")[0] != importer.package]:
            del sys.modules[name]
        return loaded
    raise RuntimeError(f"could not import {modules}")
