"""Board profiles: which board this is, and the engine settings that suit it.

A profile (``boards/<name>.json``, package data ``parsicore/boards``) says how to recognise a board and
its defaults: compute threads, backend, the OpenBLAS kernel set (``OPENBLAS_CORETYPE``), Numba's cache
directory and threading-layer order. The effective settings are the profile's defaults overridden by
environment variables; ``--board NAME`` (or ``PARSICORE_BOARD``) replaces detection.

OpenBLAS reads its kernel choice and thread count once, when numpy is first imported, so the settings must
reach the environment before that. The CLI does it first thing; a library user calls :func:`configure`
before importing numpy (or anything that imports it)::

    import parsicore.boards
    parsicore.boards.configure()          # or configure("raspberry-pi-4")
    import parsicore

This module never imports numpy or numba. Detection reads plain text (``/proc/cpuinfo``,
``/proc/device-tree/model``, the environment) through :class:`MachineFacts`, which tests fill from fixture
files instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import string
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from parsicore.errors import BackendError

#: The variables a user may set to override a profile default (each wins over the profile).
ENV_BOARD = "PARSICORE_BOARD"
ENV_THREADS = "PARSICORE_THREADS"
ENV_BACKEND = "PARSICORE_BACKEND"
ENV_CACHE_DIR = "PARSICORE_CACHE_DIR"

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
THREADING_LAYERS = ("tbb", "omp", "workqueue")
BACKEND_NAMES = ("reference", "numpy", "numba")

#: Arm core part numbers (implementer 0x41 unless noted) -> name, for messages.
PART_NAMES = MappingProxyType({
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76", (0x41, 0xD0C): "Neoverse N1",
    (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD40): "Neoverse V1", (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD42): "Cortex-A78AE", (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510",
    (0x41, 0xD47): "Cortex-A710", (0x41, 0xD48): "Cortex-X2", (0x41, 0xD49): "Neoverse N2",
    (0x41, 0xD4D): "Cortex-A715", (0x41, 0xD4E): "Cortex-X3", (0x41, 0xD80): "Cortex-A520",
    (0x41, 0xD81): "Cortex-A720", (0x41, 0xD82): "Cortex-X4",
})

#: In-order "little" cores of big.LITTLE designs: parallel loops wait for them, so ``big_cores`` skips them
#: when the machine also has bigger cores. (0x51 = Qualcomm's Kryo "Silver" cores.)
LITTLE_CORE_PARTS = frozenset({
    (0x41, 0xD03), (0x41, 0xD04), (0x41, 0xD05), (0x41, 0xD46), (0x41, 0xD80), (0x51, 0x803), (0x51, 0x805),
})


# ----------------------------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class MachineFacts:
    """What detection looks at. :meth:`read` takes it from this machine; tests build it from fixtures.

    cpuinfo: text of /proc/cpuinfo; device_tree_model: /proc/device-tree/model without its trailing NUL
    ("" when absent); environ: the process environment; machine: ``platform.machine()`` ("armv7l" for a
    32-bit Python on a 64-bit ARM kernel); cpu_flags: x86 ``flags`` / Arm ``Features`` of the first CPU;
    cpu_count: CPUs this process may use (None: count the processors in cpuinfo); cpu_capacity: per-CPU
    ``cpu_capacity`` from sysfs where the kernel exposes it (big.LITTLE), else empty.
    """

    cpuinfo: str = ""
    device_tree_model: str = ""
    environ: Mapping[str, str] = field(default_factory=dict)
    machine: str = ""
    cpu_flags: frozenset[str] = frozenset()
    cpu_count: int | None = None
    cpu_capacity: tuple[int, ...] = ()

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> MachineFacts:
        """The facts of the machine this runs on (missing files read as empty)."""
        cpuinfo = _read_text("/proc/cpuinfo")
        machine = platform.machine()
        if machine.lower() in ("aarch64", "arm64") and sys.maxsize <= 2**32:
            machine = "armv7l"  # 32-bit userland (armhf) on a 64-bit kernel reports the kernel's machine
        try:
            count: int | None = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            count = os.cpu_count()
        capacity = []
        for cpu in range(os.cpu_count() or 0):
            text = _read_text(f"/sys/devices/system/cpu/cpu{cpu}/cpu_capacity").strip()
            if not text.isdigit():
                capacity = []
                break
            capacity.append(int(text))
        return cls(cpuinfo=cpuinfo, device_tree_model=_clean_model(_read_text("/proc/device-tree/model")),
                   environ=dict(os.environ if environ is None else environ), machine=machine,
                   cpu_flags=parse_cpu_flags(cpuinfo), cpu_count=count, cpu_capacity=tuple(capacity))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> MachineFacts:
        """Facts recorded as files in ``path``: cpuinfo, device-tree-model, environ (KEY=VALUE lines),
        machine, and optionally cpu_capacity (one integer per CPU, whitespace-separated)."""
        d = Path(path)
        cpuinfo = _read_text(d / "cpuinfo")
        environ = {}
        for line in _read_text(d / "environ").splitlines():
            key, sep, value = line.partition("=")
            if sep and key:
                environ[key] = value
        capacity = tuple(int(v) for v in _read_text(d / "cpu_capacity").split())
        return cls(cpuinfo=cpuinfo, device_tree_model=_clean_model(_read_text(d / "device-tree-model")),
                   environ=environ, machine=_read_text(d / "machine").strip(), cpu_flags=parse_cpu_flags(cpuinfo),
                   cpu_capacity=capacity)

    @property
    def arch(self) -> str:
        """``machine`` normalised: "aarch64", "x86_64", or as reported (e.g. "armv7l", "riscv64")."""
        m = self.machine.lower()
        if m in ("aarch64", "arm64"):
            return "aarch64"
        if m in ("x86_64", "amd64", "x64"):
            return "x86_64"
        return m

    @property
    def cpu_parts(self) -> list[tuple[int, int]]:
        """(implementer, part) of each processor listed in cpuinfo (Arm only; empty elsewhere)."""
        return parse_cpu_parts(self.cpuinfo)

    @property
    def processors(self) -> int:
        """CPUs this process may use: cpu_count, else the processors in cpuinfo, else 1."""
        if self.cpu_count:
            return self.cpu_count
        listed = sum(1 for line in self.cpuinfo.splitlines() if _key(line) == "processor")
        return max(listed, 1)


def _read_text(path: str | os.PathLike[str]) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return ""


def _clean_model(text: str) -> str:
    # The device tree stores the model NUL-terminated.
    return text.replace("\x00", " ").strip()


def _key(line: str) -> str:
    return line.partition(":")[0].strip().lower()


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first ``flags`` (x86) or ``Features`` (Arm) line of a cpuinfo text, as a set of names."""
    for line in cpuinfo.splitlines():
        if _key(line) in ("flags", "features"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def parse_cpu_parts(cpuinfo: str) -> list[tuple[int, int]]:
    """(implementer, part) per processor from ``CPU implementer`` / ``CPU part`` lines (hex)."""
    implementers, parts = [], []
    for line in cpuinfo.splitlines():
        key, value = _key(line), line.partition(":")[2].strip()
        try:
            if key == "cpu implementer":
                implementers.append(int(value, 16))
            elif key == "cpu part":
                parts.append(int(value, 16))
        except ValueError:
            continue
    if len(implementers) == 1 and len(parts) > 1:  # old kernels print one implementer for all CPUs
        implementers *= len(parts)
    return list(zip(implementers, parts))


def describe_parts(parts: Sequence[tuple[int, int]]) -> str:
    """'4x Cortex-A55 (0xd05) + 3x Cortex-A78 (0xd41)': distinct parts in first-seen order."""
    counts: dict[tuple[int, int], int] = {}
    for p in parts:
        counts[p] = counts.get(p, 0) + 1
    return " + ".join(f"{n}x {PART_NAMES.get(p, f'implementer {p[0]:#x}')} ({p[1]:#05x})" for p, n in counts.items())


# ----------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class SetupNote:
    """How to install parsicore on the board: OS, the Python it ships, commands, known pitfalls."""

    os: str
    python: str
    install: tuple[str, ...]
    pitfalls: tuple[str, ...]


@dataclass(frozen=True)
class BoardProfile:
    """One board profile (see boards/README.md for the fields' meaning)."""

    name: str
    title: str
    arch: str
    cpu: str
    device_tree_models: tuple[str, ...] = ()
    cpu_parts: frozenset[tuple[int, int]] = frozenset()
    environ_markers: tuple[tuple[str, str], ...] = ()
    machines: tuple[str, ...] = ()
    fallback_for: tuple[str, ...] = ()
    threads: str | int = "all"
    backend: str = "numba"
    openblas_coretype: str | None = None
    openblas_coretype_by_flags: tuple[tuple[frozenset[str], str], ...] = ()
    numba_cache_dir: str | None = None
    numba_threading_layer_priority: tuple[str, ...] = ("tbb", "omp", "workqueue")
    why: Mapping[str, str] = field(default_factory=dict)
    setup: SetupNote = SetupNote("", "", (), ())


def profiles_dir() -> Path:
    """The shipped boards/ directory: package data ``parsicore/boards`` once installed, else the checkout's."""
    installed = Path(str(resources.files("parsicore"))) / "boards"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "boards"


def load_profiles(directory: str | os.PathLike[str] | None = None) -> dict[str, BoardProfile]:
    """Every ``*.json`` profile in ``directory`` (default: :func:`profiles_dir`), by name, sorted."""
    d = Path(directory) if directory is not None else profiles_dir()
    out = {}
    for path in sorted(d.glob("*.json")):
        profile = parse_profile(_load_json(path), path.name)
        if profile.name in out:
            raise BackendError(f"{path}: board profile name {profile.name!r} is used twice")
        out[profile.name] = profile
    if not out:
        raise BackendError(f"{d}: no board profiles found (is the installation complete?)")
    return out


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackendError(f"{path}: unreadable board profile ({e})") from e


def _strings(value: Any, what: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BackendError(f"board profile {where}: {what} must be a list of strings")
    return tuple(value)


def _part(text: str, where: str) -> tuple[int, int]:
    impl, sep, part = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return int(impl, 16), int(part, 16)
    except ValueError:
        raise BackendError(f"board profile {where}: CPU part {text!r} is not 'implementer:part' in hex") from None


def parse_profile(raw: Any, where: str = "<memory>") -> BoardProfile:
    """A BoardProfile from its JSON object; BackendError naming ``where`` when a field is malformed."""
    if not isinstance(raw, dict):
        raise BackendError(f"board profile {where}: must be a JSON object")
    try:
        name, title, arch, cpu = (str(raw[k]) for k in ("name", "title", "arch", "cpu"))
        detect, defaults = raw.get("detect", {}), raw["defaults"]
    except KeyError as e:
        raise BackendError(f"board profile {where}: missing field {e}") from None
    if not isinstance(detect, dict) or not isinstance(defaults, dict):
        raise BackendError(f"board profile {where}: 'detect' and 'defaults' must be objects")
    env = detect.get("environ", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise BackendError(f"board profile {where}: detect.environ must map variable names to substrings")
    threads = defaults.get("threads", "all")
    if not (threads in ("all", "big_cores") or (isinstance(threads, int) and not isinstance(threads, bool)
                                                  and threads >= 1)):
        raise BackendError(f"board profile {where}: threads must be 'all', 'big_cores' or a positive integer")
    backend = defaults.get("backend", "numba")
    if backend not in BACKEND_NAMES:
        raise BackendError(f"board profile {where}: unknown backend {backend!r}")
    coretype, by_flags = defaults.get("openblas_coretype"), ()
    if isinstance(coretype, dict):
        rules = coretype.get("by_cpu_flags", [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) and isinstance(r.get("coretype"), str)
                                                  for r in rules):
            raise BackendError(f"board profile {where}: openblas_coretype.by_cpu_flags must list "
                               "{'flags': [...], 'coretype': NAME} rules")
        by_flags = tuple((frozenset(_strings(r.get("flags"), "flags", where)), r["coretype"]) for r in rules)
        coretype = None
    elif coretype is not None and not isinstance(coretype, str):
        raise BackendError(f"board profile {where}: openblas_coretype must be a name, null or by_cpu_flags rules")
    layers = _strings(defaults.get("numba_threading_layer_priority", list(THREADING_LAYERS)),
                      "numba_threading_layer_priority", where)
    if sorted(layers) != sorted(THREADING_LAYERS):
        raise BackendError(f"board profile {where}: numba_threading_layer_priority must order "
                           f"{', '.join(THREADING_LAYERS)} (each once)")
    cache_dir = defaults.get("numba_cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        raise BackendError(f"board profile {where}: numba_cache_dir must be a path or null")
    setup = raw.get("setup", {})
    why = raw.get("why", {})
    if not isinstance(setup, dict) or not isinstance(why, dict):
        raise BackendError(f"board profile {where}: 'setup' and 'why' must be objects")
    return BoardProfile(
        name=name, title=title, arch=arch, cpu=cpu,
        device_tree_models=_strings(detect.get("device_tree_model", []), "device_tree_model", where),
        cpu_parts=frozenset(_part(p, where) for p in _strings(detect.get("cpu_parts", []), "cpu_parts", where)),
        environ_markers=tuple(env.items()),
        machines=_strings(detect.get("machine", []), "machine", where),
        fallback_for=_strings(detect.get("fallback_for", []), "fallback_for", where),
        threads=threads, backend=backend, openblas_coretype=coretype, openblas_coretype_by_flags=by_flags,
        numba_cache_dir=cache_dir, numba_threading_layer_priority=layers,
        why=MappingProxyType({str(k): str(v) for k, v in why.items()}),
        setup=SetupNote(str(setup.get("os", "")), str(setup.get("python", "")),
                        _strings(setup.get("install", []), "setup.install", where),
                        _strings(setup.get("pitfalls", []), "setup.pitfalls", where)),
    )


# ----------------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    """The profile detection chose, why (one phrase), and a one-line notice when it fell back."""

    profile: BoardProfile
    reason: str
    notice: str | None = None


def detect_board(facts: MachineFacts, profiles: Mapping[str, BoardProfile]) -> Detection:
    """Match ``facts`` against ``profiles``; an unknown machine gets its architecture's generic profile.

    Order: environment markers (Termux), device-tree model (the longest matching substring wins), the set
    of CPU part numbers, the machine name; then the generic fallback with a notice. Never raises for an
    unknown machine.
    """
    arch = facts.arch
    notice_32bit = None
    if arch in ("armv7l", "armv8l", "armv6l", "arm"):
        notice_32bit = (f"32-bit ARM userland ({facts.machine}) is unsupported: no armv7l wheels of numba, "
                        "llvmlite, numpy or h5py exist; install the 64-bit OS")
        arch = "aarch64"
    candidates = [p for p in profiles.values() if p.arch == arch]

    for p in candidates:
        for var, marker in p.environ_markers:
            value = facts.environ.get(var)
            if value is not None and marker in value:
                shown = f"{var}={value}" if marker else f"{var} set"
                return Detection(p, f"environment ({shown})", notice_32bit)

    model = facts.device_tree_model.lower()
    best: tuple[int, BoardProfile] | None = None
    if model:
        for p in candidates:
            for sub in p.device_tree_models:
                if sub.lower() in model and (best is None or len(sub) > best[0]):
                    best = (len(sub), p)
    if best is not None:
        return Detection(best[1], f"device-tree model {facts.device_tree_model!r}", notice_32bit)

    parts = facts.cpu_parts
    if parts:
        distinct = set(parts)
        matches = [p for p in candidates if p.cpu_parts and distinct <= p.cpu_parts]
        if len(matches) == 1:
            why = "no device-tree model" if not model else f"device-tree model {facts.device_tree_model!r} not profiled"
            return Detection(matches[0], f"CPU {describe_parts(parts)} ({why})", notice_32bit)

    for p in candidates:
        if arch in p.machines:
            return Detection(p, f"machine {facts.machine}", notice_32bit)

    fallback = next((p for p in candidates if arch in p.fallback_for), None)
    what = []
    if facts.device_tree_model:
        what.append(f"device-tree model {facts.device_tree_model!r}")
    if parts:
        what.append(f"CPU {describe_parts(parts)}")
    seen = f" ({'; '.join(what)})" if what else ""
    if fallback is None:  # an architecture without a generic profile: the closest generic one
        generic = [p for p in profiles.values() if p.fallback_for or p.machines]
        fallback = next((p for p in generic if p.arch == ("aarch64" if arch.startswith("arm") else "x86_64")),
                        generic[0] if generic else next(iter(profiles.values())))
        notice = (f"unknown architecture {facts.machine or '?'}{seen}: using {fallback.name} defaults; "
                  f"--board NAME or {ENV_BOARD} picks a profile")
    else:
        notice = (f"unknown {arch} machine{seen}: using {fallback.name} defaults; "
                  f"--board NAME or {ENV_BOARD} picks a profile")
    if notice_32bit:
        notice = f"{notice_32bit}; {notice}"
    return Detection(fallback, "no profile matched", notice)


def detect(facts: MachineFacts | None = None,
           profiles: Mapping[str, BoardProfile] | None = None) -> tuple[BoardProfile, str | None]:
    """(profile, notice or None) for this machine (or ``facts``)."""
    d = detect_board(facts if facts is not None else MachineFacts.read(),
                     profiles if profiles is not None else load_profiles())
    return d.profile, d.notice


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One effective value and where it came from ("profile raspberry-pi-4", "env OPENBLAS_CORETYPE", ...)."""

    value: str | int | None
    source: str


@dataclass(frozen=True)
class Settings:
    """The effective settings: the profile's defaults with the user's environment variables on top.

    threads: compute threads (Numba's pool and OpenBLAS); backend: default backend; openblas_coretype:
    OpenBLAS kernel set (None: OpenBLAS detects); numba_threading_layer: a layer name, or "priority a b c"
    (Numba takes the first that loads); numba_cache_dir: Numba's JIT cache directory (None: parsicore's
    default, see kernels/jit_cache.py).
    """

    board: BoardProfile
    board_source: str
    threads: Setting
    backend: Setting
    openblas_coretype: Setting
    numba_threading_layer: Setting
    numba_cache_dir: Setting
    notice: str | None = None
    #: Variables to export (profile values only: the user's own variables are already in the environment).
    exports: Mapping[str, str] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str, str]]:
        """(name, value, source) for display."""
        def show(v: Any, none: str = "-") -> str:
            return none if v is None else str(v)

        return [
            ("board", self.board.name, self.board_source),
            ("threads", show(self.threads.value), self.threads.source),
            ("backend", show(self.backend.value), self.backend.source),
            ("OPENBLAS_CORETYPE", show(self.openblas_coretype.value, "(OpenBLAS chooses)"),
             self.openblas_coretype.source),
            ("numba threading layer", show(self.numba_threading_layer.value), self.numba_threading_layer.source),
            ("numba cache dir", show(self.numba_cache_dir.value), self.numba_cache_dir.source),
        ]


def count_threads(spec: str | int, facts: MachineFacts) -> tuple[int, str]:
    """Threads for a profile's ``threads`` spec on ``facts``, and how it was counted.

    "all": every usable CPU. "big_cores": on big.LITTLE CPUs the cores with at least half the largest
    sysfs ``cpu_capacity``, or without capacities the cores that are not in-order little cores (by part
    number); all CPUs where the cores are alike. An integer is capped at the usable CPUs.
    """
    n = facts.processors
    if isinstance(spec, int):
        return min(spec, n), f"{spec} (capped at {n} CPUs)" if spec > n else str(spec)
    if spec == "big_cores":
        caps = facts.cpu_capacity
        if caps and len(set(caps)) > 1:
            big = sum(1 for c in caps if c * 2 >= max(caps))
            return min(big, n), f"big cores: {big} of {len(caps)} by cpu_capacity"
        parts = facts.cpu_parts
        big = sum(1 for p in parts if p not in LITTLE_CORE_PARTS)
        if parts and 0 < big < len(parts):
            return min(big, n), f"big cores: {big} of {len(parts)} ({describe_parts(parts)})"
        return n, "big cores: all cores alike"
    return n, "all CPUs"


def _positive_int(text: str, var: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BackendError(f"{var}={text!r}: must be a positive integer")
    return value


def effective_settings(profile: BoardProfile, board_source: str, facts: MachineFacts,
                       numba_installed: bool, notice: str | None = None) -> Settings:
    """The settings of ``profile`` on ``facts``, each overridden by its variable in ``facts.environ``.

    numba_installed: whether the numba backend can be used (a profile's "numba" becomes "numpy" without it).
    BackendError for a malformed override (PARSICORE_THREADS not a positive integer, unknown backend).
    """
    env = facts.environ
    src = f"profile {profile.name}"
    exports: dict[str, str] = {}

    if env.get(ENV_THREADS):
        threads = Setting(_positive_int(env[ENV_THREADS], ENV_THREADS), f"env {ENV_THREADS}")
    else:
        count, how = count_threads(profile.threads, facts)
        threads = Setting(count, f"{src} ({how})")
    for var in THREAD_VARIABLES:
        exports[var] = str(threads.value)

    if env.get(ENV_BACKEND):
        if env[ENV_BACKEND] not in BACKEND_NAMES:
            raise BackendError(f"{ENV_BACKEND}={env[ENV_BACKEND]!r}: unknown backend "
                               f"(choose from {', '.join(BACKEND_NAMES)})")
        backend = Setting(env[ENV_BACKEND], f"env {ENV_BACKEND}")
    elif profile.backend == "numba" and not numba_installed:
        backend = Setting("numpy", f"{src} (numba is not installed)")
    else:
        backend = Setting(profile.backend, src)
    if backend.source == src and backend.value != ("numba" if numba_installed else "numpy"):
        # Only a profile that departs from the library default needs the variable (keeps it out of the
        # environment of child processes otherwise).
        exports[ENV_BACKEND] = str(backend.value)

    if env.get("OPENBLAS_CORETYPE"):
        coretype = Setting(env["OPENBLAS_CORETYPE"], "env OPENBLAS_CORETYPE")
    elif profile.openblas_coretype:
        coretype = Setting(profile.openblas_coretype, src)
    else:
        rule = next(((flags, name) for flags, name in profile.openblas_coretype_by_flags
                     if flags <= facts.cpu_flags), None)
        if rule is not None:
            coretype = Setting(rule[1], f"{src} (CPU flags {'+'.join(sorted(rule[0]))})")
        else:
            coretype = Setting(None, src)
    if coretype.value is not None and profile.arch != facts.arch and not coretype.source.startswith("env"):
        # --board for another architecture (e.g. trying a Pi profile on a PC): its kernel names mean nothing here.
        coretype = Setting(None, f"{src} ({coretype.value} is for {profile.arch}; this machine is {facts.arch})")
    if coretype.value is not None and not coretype.source.startswith("env"):
        exports["OPENBLAS_CORETYPE"] = str(coretype.value)

    if not numba_installed:
        layer = Setting(None, "numba is not installed")
    elif env.get("NUMBA_THREADING_LAYER"):
        layer = Setting(env["NUMBA_THREADING_LAYER"], "env NUMBA_THREADING_LAYER")
    elif env.get("NUMBA_THREADING_LAYER_PRIORITY"):
        layer = Setting(f"priority {env['NUMBA_THREADING_LAYER_PRIORITY']}", "env NUMBA_THREADING_LAYER_PRIORITY")
    else:
        layer = Setting(f"priority {' '.join(profile.numba_threading_layer_priority)}", src)
        exports["NUMBA_THREADING_LAYER_PRIORITY"] = " ".join(profile.numba_threading_layer_priority)

    if not numba_installed:
        cache = Setting(None, "numba is not installed")
    elif env.get("NUMBA_CACHE_DIR"):
        cache = Setting(env["NUMBA_CACHE_DIR"], "env NUMBA_CACHE_DIR")
    elif env.get(ENV_CACHE_DIR):
        cache = Setting(str(Path(env[ENV_CACHE_DIR]) / "numba"), f"env {ENV_CACHE_DIR}")
    elif profile.numba_cache_dir:
        root = _expand(profile.numba_cache_dir, env)
        cache = Setting(str(Path(root) / "numba"), src)
        exports[ENV_CACHE_DIR] = root
    else:
        cache = Setting(str(default_cache_dir(env)), "parsicore default")

    return Settings(profile, board_source, threads, backend, coretype, layer, cache, notice,
                    MappingProxyType(exports))


def _expand(path: str, env: Mapping[str, str]) -> str:
    """A leading ~ and $VAR / ${VAR} in a profile path, taken from ``env`` (not necessarily os.environ)."""
    if path.startswith("~"):
        path = env.get("HOME", str(Path.home())) + path[1:]
    return string.Template(path).safe_substitute(env)


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """Where parsicore's Numba cache goes by default for environment ``env``."""
    from parsicore.kernels.jit_cache import cache_dir_candidates

    return cache_dir_candidates(env)[0]


def numba_installed() -> bool:
    """True when Numba can be imported here (found, not imported)."""
    return importlib.util.find_spec("numba") is not None


def resolve(board: str | None = None, facts: MachineFacts | None = None,
            profiles: Mapping[str, BoardProfile] | None = None, numba: bool | None = None) -> Settings:
    """The effective settings: ``board`` (the ``--board`` value) or ``$PARSICORE_BOARD`` or detection.

    BackendError (one line) for an unknown board name or a malformed override variable; an unknown machine
    is not an error (generic profile, ``Settings.notice`` says so).
    """
    facts = facts if facts is not None else MachineFacts.read()
    profiles = profiles if profiles is not None else load_profiles()
    numba = numba if numba is not None else numba_installed()
    if board:
        source = "--board"
    elif facts.environ.get(ENV_BOARD):
        board, source = facts.environ[ENV_BOARD], f"env {ENV_BOARD}"
    if board:
        if board not in profiles:
            raise BackendError(f"unknown board {board!r} ({source}); choose from {', '.join(profiles)}")
        return effective_settings(profiles[board], source, facts, numba)
    found = detect_board(facts, profiles)
    return effective_settings(found.profile, f"detected: {found.reason}", facts, numba, found.notice)


def apply_to_environment(settings: Settings, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Export the settings' variables the user has not set; returns what was set.

    Must run before numpy is first imported: OpenBLAS reads OPENBLAS_CORETYPE and its thread count once,
    when it loads.
    """
    target = os.environ if environ is None else environ
    added = {}
    for var, value in settings.exports.items():
        if var not in target:
            target[var] = value
            added[var] = value
    return added


def configure(board: str | None = None) -> Settings:
    """For library users: resolve this machine's settings and export them; call before importing numpy.

    Returns the Settings (``.notice`` is a one-line message when the machine was not recognised).
    BackendError for an unknown board name.
    """
    settings = resolve(board)
    apply_to_environment(settings)
    return settings


def board_option_value(args: Sequence[str]) -> str | None:
    """The group-level ``--board NAME`` / ``--board=NAME`` in CLI args, before the subcommand (else None)."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--board":
            return args[i + 1] if i + 1 < len(args) else None
        if a.startswith("--board="):
            return a.split("=", 1)[1]
        if not a.startswith("-") or a == "--":
            return None
        i += 1
    return None
