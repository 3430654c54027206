"""Building a policy snapshot from its sources.

    sources (config order, then the self-test names)
      -> bytes (the file; a feed's or zone's copy in the state directory)
      -> ParsedSource (policy/formats)        a broken line: a Problem (path:line), skipped
      -> columns into the IndexBuilder        a source that fails: its last good copy
      -> Policy (index + small parts)

``build_policy`` does it in this process (``moat check``, tests). ``build_in_child``
forks a process that does the work and writes the index into one file (in a tmpfs when
there is one); the server maps that file. Why a child: parsing a million lines makes a
few hundred MB of short-lived Python objects. In a child they never touch the server's
heap (its resident memory stays at the size of the finished index, which the kernel
shares between worker processes), and the server's event loop keeps answering while the
child works, since they share no interpreter lock. The first build at start-up, before
anything answers, may use a second core as well: the child forks a helper that checks
half of a long list (``formats._common.run_end``); later builds leave that core to the
server.

A source "fails" when it cannot be read, or when its content looks like something else
(more than half of its non-comment lines rejected, e.g. an HTML error page instead of a
list). A failed source keeps serving its last good copy (``<state>/last-good/<name>``);
one that never loaded is reported, and the others still protect.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import pickle
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import formats
from .engine import SPARSE_STEP, Policy, PolicyParts, SourceInfo
from .formats import _common as formats_common
from .index import MAX_FAMILIES, MAX_SOURCES, IndexBuilder, NameIndex
from .rules import Action, ParsedSource, PatternRule, Scope
from .settings import PolicySettings, SourceSettings

SELFTEST_CATEGORIES = ("malware", "phishing", "c2")
SELFTEST_DOMAIN = "moat.test"
MAX_REPORTED_PROBLEMS = 20


@dataclass(slots=True)
class SourceReport:
    name: str
    category: str
    location: str
    status: str = "loaded"  # loaded | last-good | failed | empty
    rules: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, "path:line: message"
    problem_count: int = 0
    unsupported: dict[str, int] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    fail_closed: bool = False


@dataclass(slots=True)
class BuildReport:
    version: int
    sources: list[SourceReport] = field(default_factory=list)
    seconds: float = 0.0
    rules: int = 0

    @property
    def ok(self) -> bool:
        return all(s.status in ("loaded", "empty") for s in self.sources)

    @property
    def failed(self) -> list[SourceReport]:
        return [s for s in self.sources if s.status in ("failed", "last-good")]

    @property
    def unavailable_closed(self) -> list[str]:
        """Sources that never loaded and are configured to fail closed."""
        return [s.name for s in self.sources if s.status == "failed" and s.fail_closed]


class SourceError(Exception):
    pass


def state_paths(state_dir: str, name: str) -> dict[str, Path]:
    base = Path(state_dir)
    return {"last_good": base / "last-good" / name, "feed": base / "feeds" / name,
            "zone": base / "zones" / f"{name}.zone"}


def selftest_sources() -> list[SourceSettings]:
    return [SourceSettings(name=f"selftest-{c}", category=c, family="moat-selftest",
                           names=(f"{c}.{SELFTEST_DOMAIN}",), action="sinkhole")
            for c in SELFTEST_CATEGORIES]


def all_sources(settings: PolicySettings, extra_rpz: tuple[str, ...] = ()) -> list[SourceSettings]:
    """Configured order: ``--rpz`` files first, then the config's sources, then self-test."""
    out: list[SourceSettings] = []
    taken = {s.name for s in settings.sources}
    for path in extra_rpz:
        base = Path(path).name.removesuffix(".rpz").removesuffix(".zone") or "rpz"
        name, i = base, 2
        while name in taken:
            name, i = f"{base}-{i}", i + 1
        taken.add(name)
        out.append(SourceSettings(name=name, path=path, format="rpz"))
    out.extend(settings.sources)
    if settings.selftest:
        out.extend(selftest_sources())
    return out


# --- reading one source -------------------------------------------------------------


def _read_source(src: SourceSettings, state_dir: str) -> tuple[bytes, str]:
    """(content, path of the file it came from) or raise SourceError."""
    if src.path:
        path = src.path
    elif src.url:
        path = str(state_paths(state_dir, src.name)["feed"]) if state_dir else ""
    elif src.zone:
        path = str(state_paths(state_dir, src.name)["zone"]) if state_dir else ""
    else:
        return b"", ""
    if not path:
        raise SourceError("no state directory to keep a downloaded copy in")
    try:
        with open(path, "rb") as fh:
            data = fh.read(src.max_bytes + 1)
    except OSError as exc:
        if src.url or src.zone:
            raise SourceError("not downloaded yet") from None
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > src.max_bytes:
        raise SourceError(f"{path} is larger than max_bytes ({src.max_bytes})")
    return data, path


def _parse(src: SourceSettings, data: bytes, path: str) -> ParsedSource:
    fmt = src.format
    if fmt == "auto":
        fmt = "rpz" if src.zone else formats.detect_format(path or src.name, data[:4096])
    origin = src.zone.rstrip(".") if src.zone else None
    parsed = formats.parse(data, fmt, path, origin=origin)
    data_lines = len(parsed) + len(parsed.problems) + len(parsed.ip_rules) + \
        len(parsed.patterns) + len(parsed.conditional)
    if data and len(parsed.problems) > 10 and len(parsed.problems) * 2 > data_lines:
        raise SourceError(
            f"{len(parsed.problems)} of {data_lines} lines rejected: this does not look like "
            f"a {fmt} file (first: {parsed.problems[0]})")
    return parsed


def _inline(src: SourceSettings) -> tuple[ParsedSource, tuple[str, ...]]:
    """Names and keywords written in the config itself."""
    parsed = ParsedSource(path="config", format="config")
    texts: list[str] = []
    for name in src.names:
        norm = formats.normalise_name(name)
        texts.append(name)
        if norm is None:
            parsed.problem(len(texts), f"not a valid name: {name!r}")
            continue
        parsed.add(norm, Scope.SUBTREE, len(texts))
    for word in src.keywords:
        texts.append(f"keyword {word}")
        parsed.patterns.append(PatternRule("keyword", word.lower(), Action.DEFAULT, len(texts),
                                           tuple(d.lower().strip(".")
                                                 for d in src.keywords_unless_under)))
    return parsed, tuple(texts)


def _sparse_lines(data: bytes) -> tuple[int, ...]:
    """Byte offset of line 1, 65, 129, ...: enough to read any line back quickly."""
    if not data:
        return (0,)
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate(([0], nl + 1))
    return tuple(starts[::SPARSE_STEP].tolist())


def _same_content(path: Path, data: bytes) -> bool:
    """Whether the file holds ``data``, read a megabyte at a time (not a second copy of a
    31 MB list in memory)."""
    view = memoryview(data)
    buf = bytearray(1 << 20)
    with open(path, "rb") as fh:
        offset = 0
        while (n := fh.readinto(buf)) > 0:
            if buf[:n] != view[offset:offset + n]:
                return False
            offset += n
    return offset == len(data)


def _save_last_good(state_dir: str, name: str, data: bytes) -> str:
    target = state_paths(state_dir, name)["last_good"]
    try:
        if target.exists() and target.stat().st_size == len(data) and \
                _same_content(target, data):  # unchanged: no write (an SD card wears)
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return str(target)
    except OSError:
        return ""


# --- the whole policy ---------------------------------------------------------------


def _action(word: str, fallback: Action = Action.SINKHOLE) -> Action | None:
    if word == "given":
        return None
    return Action.from_label(word) if word else fallback


def build_parts(settings: PolicySettings, version: int, state_dir: str = "",
                extra_rpz: tuple[str, ...] = ()
                ) -> tuple[IndexBuilder, PolicyParts, BuildReport]:
    t_all = time.perf_counter()
    report = BuildReport(version)
    builder = IndexBuilder()
    parts = PolicyParts()
    families: dict[str, int] = {"": 0}
    sources = all_sources(settings, extra_rpz)[:MAX_SOURCES]
    infos: list[SourceInfo] = []
    default_action = _action(settings.default_action) or Action.SINKHOLE
    for position, src in enumerate(sources):
        t0 = time.perf_counter()
        rep = SourceReport(src.name, src.category, src.location, fail_closed=src.fail == "closed")
        inline_rules: tuple[str, ...] = ()
        snapshot, data = "", b""
        parsed: ParsedSource | None = None
        try:
            if src.path or src.url or src.zone:
                data, snapshot = _read_source(src, state_dir)
                parsed = _parse(src, data, snapshot)
                if state_dir:
                    _save_last_good(state_dir, src.name, data)
            else:
                parsed, inline_rules = _inline(src)
        except (SourceError, ValueError, UnicodeError) as exc:
            rep.error = str(exc)
            rep.status = "failed"
            last = state_paths(state_dir, src.name)["last_good"] if state_dir else None
            if last is not None and last.exists():
                try:
                    data = last.read_bytes()
                    snapshot = str(last)
                    parsed = _parse(src, data, snapshot)
                    rep.status = "last-good"
                except (OSError, SourceError, ValueError, UnicodeError) as exc2:
                    rep.error += f"; last good copy unusable: {exc2}"
                    parsed = None
        if parsed is None:
            parsed = ParsedSource(path=snapshot)
        st = os.stat(snapshot) if snapshot and os.path.exists(snapshot) else None
        cat = settings.categories.get(src.category)
        info = SourceInfo(
            position=position, name=src.name, category=src.category, family=src.family,
            location=src.location, snapshot=snapshot,
            snapshot_id=(st.st_size, st.st_mtime_ns) if st else (0, 0),
            sparse_lines=_sparse_lines(data) if snapshot else (0,),
            override=_action(src.action) if src.action != "log-only" else None,
            default_action=default_action,
            ttl=src.ttl or settings.ttl,
            sinkhole_v4=src.sinkhole_ipv4 or (cat.sinkhole_ipv4 if cat else ()) or
            settings.sinkhole_ipv4,
            sinkhole_v6=src.sinkhole_ipv6 or (cat.sinkhole_ipv6 if cat else ()) or
            settings.sinkhole_ipv6,
            log_only=src.action == "log-only", inline_rules=inline_rules)
        infos.append(info)
        # Families: numbered across the policy (12 bits in the index).
        fam_col = None
        if parsed.families:
            fam_col = np.zeros(len(parsed), dtype=np.uint16)
            for i, fam in parsed.families.items():
                num = families.get(fam)
                if num is None:
                    num = len(families) if len(families) < MAX_FAMILIES else 0
                    if num:
                        families[fam] = num
                fam_col[i] = num
        lines = np.frombuffer(parsed.lines.tobytes(), dtype=np.uint32) if len(parsed) \
            else np.zeros(0, dtype=np.uint32)
        builder.add(position, parsed.names, parsed.scopes, parsed.actions, lines, fam_col)
        for i, records in parsed.local_data.items():
            parts.local_data[(position, parsed.lines[i])] = records
        parts.ip_rules.extend((position, r) for r in parsed.ip_rules)
        parts.patterns.extend((position, r) for r in parsed.patterns)
        parts.conditional.extend((position, r) for r in parsed.conditional)
        rep.rules = len(parsed) + len(parsed.ip_rules) + len(parsed.patterns) + \
            len(parsed.conditional)
        if rep.status == "loaded" and rep.rules == 0:
            rep.status = "empty"
        rep.problem_count = len(parsed.problems)
        rep.problems = [str(p) for p in parsed.problems[:MAX_REPORTED_PROBLEMS]]
        rep.unsupported = dict(parsed.unsupported)
        rep.seconds = time.perf_counter() - t0
        report.sources.append(rep)
    parts.sources = tuple(infos)
    parts.closed = tuple(report.unavailable_closed)
    parts.families = tuple(sorted(families, key=families.__getitem__))
    report.rules = sum(s.rules for s in report.sources)
    report.seconds = time.perf_counter() - t_all
    return builder, parts, report


def build_policy(settings: PolicySettings, version: int = 1, state_dir: str = "",
                 extra_rpz: tuple[str, ...] = ()) -> tuple[Policy, BuildReport]:
    """Build a policy in this process."""
    builder, parts, report = build_parts(settings, version, state_dir, extra_rpz)
    labels = builder.label_range()
    keys, meta, directory, k = builder.finish()
    policy = Policy(version, NameIndex.from_arrays(keys, meta, directory, k, labels), parts)
    report.seconds = max(report.seconds, 0.0)
    return policy, report


# --- building in a child process, into a mapped file --------------------------------

_MAGIC = b"MOATIDX1"
_HDR = struct.Struct("<8sQ")


def _align(n: int) -> int:
    return (n + 7) & ~7


def write_index_file(path: str, builder: IndexBuilder, parts: PolicyParts,
                     report: BuildReport) -> None:
    labels = builder.label_range()
    keys, meta, directory, k = builder.finish()
    blob = pickle.dumps((parts, report), protocol=pickle.HIGHEST_PROTOCOL)
    # written from the arrays' own memory (no bytes copies of 20 MB)
    sections = [("keys", keys.data.cast("B")), ("meta", meta.data.cast("B")),
                ("dir", directory.data.cast("B")), ("parts", memoryview(blob))]
    layout: dict[str, list[int]] = {}
    offset = 0
    for name, raw in sections:
        layout[name] = [offset, len(raw)]
        offset = _align(offset + len(raw))
    header = json.dumps({"k": k, "layout": layout, "version": report.version,
                         "labels": labels}).encode()
    base = _align(_HDR.size + len(header))
    with open(path, "wb") as fh:
        fh.write(_HDR.pack(_MAGIC, len(header)) + header)
        for name, raw in sections:
            fh.seek(base + layout[name][0])
            fh.write(raw)


def open_index_file(path: str, unlink: bool = True) -> tuple[Policy, BuildReport]:
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if unlink:
        try:
            os.unlink(path)  # the mapping keeps the pages; nothing to clean up later
        except OSError:
            pass
    magic, hlen = _HDR.unpack_from(mm)
    if magic != _MAGIC:
        raise ValueError(f"{path}: not a moat policy index")
    header = json.loads(bytes(mm[_HDR.size:_HDR.size + hlen]))
    base = _align(_HDR.size + hlen)
    view = memoryview(mm)

    def section(name: str) -> memoryview:
        off, length = header["layout"][name]
        return view[base + off:base + off + length]

    parts, report = pickle.loads(section("parts"))
    index = NameIndex(section("keys").cast("q"), section("meta").cast("Q"),
                      section("dir").cast("I"), header["k"], tuple(header["labels"]), (mm,))
    policy = Policy(report.version, index, parts)
    policy.index_file = path
    return policy, report


def index_dir(state_dir: str = "") -> str:
    """Where index files go: a tmpfs if we have one (RAM, not the SD card)."""
    for candidate in (os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0], "/dev/shm",
                      tempfile.gettempdir()):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    return state_dir or "."


def _remove_orphans(directory: str) -> None:
    """Index files left by a moat that was killed (its pid is gone): remove them."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) < 4 or not name.startswith("moat-policy-") or not name.endswith(".idx"):
            continue
        try:
            pid = int(parts[2])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
        except PermissionError:
            continue


def build_in_child(settings: PolicySettings, version: int, state_dir: str = "",
                   extra_rpz: tuple[str, ...] = (), unlink: bool = True,
                   starting: bool = False) -> tuple[Policy, BuildReport]:
    """Fork, build in the child, map the result here. Blocking: call it from a thread.

    ``starting``: nothing is answering queries yet (the first policy at start-up), so the
    child may use a second core too (``formats._common.SECOND_PROCESS``). Falls back to
    building in-process where fork is unavailable.
    """
    return PendingBuild(settings, version, state_dir, extra_rpz, unlink, starting).result()


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class PendingBuild:
    """A policy build running in a forked child: made, it forks at once; ``result()``
    waits for the child and maps the index. The server starts its first build this way
    before it imports the rest of itself, so the two overlap (on two cores or more)."""

    def __init__(self, settings: PolicySettings, version: int, state_dir: str = "",
                 extra_rpz: tuple[str, ...] = (), unlink: bool = True,
                 starting: bool = False) -> None:
        self._args = (settings, version, state_dir, extra_rpz)
        self._unlink = unlink
        self._starting = starting
        self._directory = index_dir(state_dir)
        self._pid = 0
        if hasattr(os, "fork"):
            self._start(self._directory)

    def result(self) -> tuple[Policy, BuildReport]:
        settings, version, state_dir, extra_rpz = self._args
        if not self._pid:
            return build_policy(settings, version, state_dir, extra_rpz)
        try:
            return self._finish()
        except RuntimeError as exc:
            # A small tmpfs (a Pi's /run, Docker's 64 MB /dev/shm) may not hold a big
            # index: the state directory is on disk and has room.
            if "No space left" not in str(exc) or not state_dir or \
                    self._directory == state_dir:
                raise
            os.makedirs(state_dir, exist_ok=True)
            self._directory = state_dir
            self._start(state_dir)
            return self._finish()

    def _start(self, directory: str) -> None:
        settings, version, state_dir, extra_rpz = self._args
        _remove_orphans(directory)
        fd, path = tempfile.mkstemp(prefix=f"moat-policy-{os.getpid()}-{version}-",
                                    suffix=".idx", dir=directory)
        os.close(fd)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: build, write, report errors through the pipe, exit
            # No cyclic GC in a child that lives a second: its collections would walk the
            # server's inherited objects too (and write to their pages); exit frees all.
            gc.disable()
            if self._starting and _usable_cpus() > 1:
                formats_common.SECOND_PROCESS = True
            status = 1
            try:
                os.close(read_end)
                builder, parts, report = build_parts(settings, version, state_dir, extra_rpz)
                write_index_file(path, builder, parts, report)
                status = 0
            except BaseException as exc:  # noqa: BLE001 - everything goes to the parent
                try:
                    os.write(write_end, f"{type(exc).__name__}: {exc}".encode()[:4000])
                except OSError:
                    pass
            finally:
                os._exit(status)
        os.close(write_end)
        self._pid, self._read_end, self._path = pid, read_end, path
        if self._starting:  # while the child builds: later builds' children inherit them
            formats.import_parsers()

    def _finish(self) -> tuple[Policy, BuildReport]:
        chunks = []
        while True:
            chunk = os.read(self._read_end, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(self._read_end)
        _, wstatus = os.waitpid(self._pid, 0)
        code = os.waitstatus_to_exitcode(wstatus)
        if code != 0:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            raise RuntimeError("policy build failed: " +
                               (b"".join(chunks).decode(errors="replace") or
                                f"exit status {code}"))
        return open_index_file(self._path, unlink=self._unlink)


__all__ = ["BuildReport", "SourceReport", "build_policy", "build_in_child", "all_sources",
           "PendingBuild",
           "open_index_file", "write_index_file", "selftest_sources", "SELFTEST_DOMAIN"]
