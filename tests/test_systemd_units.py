"""The systemd units: systemd-analyze verify and security, and what the units must (not) contain.

systemd-analyze runs offline here (PID 1 need not be systemd). Its verify
exits 0 on unknown directives and only warns, so stderr must be empty too.
It also insists that ExecStart= names an existing executable: the copies it
checks point ExecStart at the installed ``walcache`` script (or this Python).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from walcache_testing import unlink_segments

import walcache
from walcache.config import SERVE_OPTIONS, add_serve_arguments
from walcache.paths import shm_namespace

UNITS = Path(__file__).resolve().parent.parent / "systemd"
TEMPLATE = UNITS / "walcache@.service"
SERVICE = UNITS / "walcache.service"
SYSUSERS = UNITS / "walcache.sysusers"
INSTALLED_BINARY = "/usr/local/bin/walcache"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")
SYSUSERS_BIN = shutil.which("systemd-sysusers")

Unit = dict[str, dict[str, list[str]]]


@pytest.mark.skipif(os.environ.get("WALCACHE_REQUIRE_SYSTEMD") != "1", reason="WALCACHE_REQUIRE_SYSTEMD=1 is not set")
def test_the_tools_these_tests_need_are_here_when_ci_requires_them() -> None:
    """CI sets WALCACHE_REQUIRE_SYSTEMD=1 (its base image has them): there a missing tool must
    fail the run, not skip the unit checks below."""
    missing = [t for t in ("systemd-analyze", "systemd-sysusers", "strace") if shutil.which(t) is None]
    assert not missing, f"not installed: {missing}"


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every assignment in order (systemd keys may repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], defaultdict(list))
            continue
        assert section is not None, f"assignment outside a section: {raw!r}"
        assert not line.endswith("\\"), "continuation lines are not used in our units"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        section[key.strip()].append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"{section}.{key}: expected one value, got {values}"
    return values[0]


def analyze_env() -> dict[str, str]:
    return {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}


def checkable_copy(source: Path, dest_dir: Path, name: str) -> Path:
    """``source`` as ``name`` in ``dest_dir``, ExecStart pointed at an executable that exists."""
    text = source.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    exe = shutil.which("walcache") or sys.executable
    dest = dest_dir / name
    dest.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={exe} "))
    return dest


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=analyze_env(),
        cwd=path.parent,
    )


def exposure(path: Path) -> float:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=analyze_env(),
        cwd=path.parent,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert m, f"no overall exposure in output (rc {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return float(m.group(1))


# ------------------------------------------------------------- systemd-analyze


@needs_analyze
@pytest.mark.parametrize("source,name", [(TEMPLATE, "walcache@test.service"), (SERVICE, "walcache.service")])
def test_systemd_analyze_verify_is_clean(tmp_path: Path, source: Path, name: str) -> None:
    done = verify(checkable_copy(source, tmp_path, name))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@needs_analyze
@pytest.mark.parametrize(
    "old,new",
    [
        ("Type=notify", "Type=notifyy"),  # a bad value: systemd 252 ignores it with a warning
        ("WatchdogSec=30s", "WatchdogSecs=30s"),  # an unknown key: also only a warning
    ],
)
def test_verify_check_catches_broken_units(tmp_path: Path, old: str, new: str) -> None:
    # The check above must be able to fail: the same copy with one typo does.
    unit = checkable_copy(TEMPLATE, tmp_path, "walcache@test.service")
    text = unit.read_text()
    assert old in text
    unit.write_text(text.replace(old, new))
    done = verify(unit)
    assert done.stderr != ""


@needs_analyze
def test_template_exposure_is_at_most_two(tmp_path: Path) -> None:
    score = exposure(checkable_copy(TEMPLATE, tmp_path, "walcache@test.service"))
    assert score <= MAX_EXPOSURE


@needs_analyze
def test_offline_security_threshold_gate_passes(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = checkable_copy(TEMPLATE, tmp_path, "walcache@test.service")
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        env=analyze_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:]


@needs_analyze
def test_exposure_parse_tells_an_unhardened_unit_apart(tmp_path: Path) -> None:
    bare = tmp_path / "walcache-bare.service"
    bare.write_text(f"[Service]\nType=notify\nExecStart={sys.executable} -V\n")
    assert exposure(bare) > MAX_EXPOSURE


# ------------------------------------------------------------ unit contents


@pytest.fixture(scope="module")
def template() -> Unit:
    return parse_unit(TEMPLATE.read_text())


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE.read_text())


def test_template_runs_a_notify_daemon_with_watchdog_reload_and_restart(template: Unit) -> None:
    s = "Service"
    assert one(template, s, "Type") == "notify"
    assert one(template, s, "Restart") == "on-failure"
    assert one(template, s, "WatchdogSec") == "30s"
    assert one(template, s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(template, s, "RestartPreventExitStatus") == "2"  # the CLI's exit status for ConfigError
    assert one(template, s, "User") == "walcache"
    assert one(template, s, "Group") == "walcache"
    assert one(template, s, "RuntimeDirectory") == "walcache/%i"
    assert one(template, s, "StateDirectory") == "walcache/%i"
    assert one(template, s, "RuntimeDirectoryMode") == "0750"
    assert one(template, s, "StateDirectoryMode") == "0750"


def test_no_directive_removes_or_hides_the_shared_memory(template: Unit, service: Unit) -> None:
    for unit in (template, service):
        svc = unit["Service"]
        # DynamicUser implies RemoveIPC, which unlinks the user's /dev/shm segments at stop.
        assert svc.get("DynamicUser", ["no"]) == ["no"]
        assert svc.get("RemoveIPC", ["no"]) == ["no"]
        for key in ("InaccessiblePaths", "TemporaryFileSystem", "TemporaryFilesystem", "ReadOnlyPaths", "BindPaths"):
            assert not any("/dev/shm" in v for v in svc.get(key, [])), key
        # psutil needs /proc/stat for process start times
        assert "ProcSubset" not in svc and "ProtectProc" not in svc


def test_umask_lets_the_group_read_but_never_write(template: Unit) -> None:
    umask = int(one(template, "Service", "UMask"), 8)
    assert umask & 0o040 == 0  # group read survives
    assert umask & 0o020  # group write is masked
    assert umask & 0o007 == 0o007  # others get nothing


def test_chown_is_allowed_back_after_the_privileged_filter(template: Unit) -> None:
    # The daemon chowns the socket and the table to its group; ~@privileged includes @chown.
    filters = template["Service"]["SystemCallFilter"]
    assert filters.index("~@privileged") < filters.index("@chown")


def test_exec_start_arguments_are_serve_options(template: Unit) -> None:
    argv = shlex.split(one(template, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_BINARY
    assert argv[1] == "serve"
    p = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(p)
    ns = p.parse_args(argv[2:])
    assert ns.config_file == "/etc/walcache/%i.toml"


def test_environment_sets_known_options_to_valid_values(template: Unit) -> None:
    specs = {spec.env: spec for spec in SERVE_OPTIONS}
    assignments = [a for line in template["Service"]["Environment"] for a in shlex.split(line)]
    assert assignments, "the unit should set socket_mode and shm_group"
    seen = {}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        assert key in specs, f"{key} is not a serve option"
        seen[specs[key].name] = value
    assert seen.pop("shm_group") == "walcache"  # the sysusers group; may not exist on this machine
    for name, value in seen.items():
        spec = next(s for s in SERVE_OPTIONS if s.name == name)
        spec.coerce(name, value, "the unit")  # raises ConfigError if invalid
    assert seen["socket_mode"] == "0660"


def test_walcache_service_is_the_template_for_instance_default(template: Unit, service: Unit) -> None:
    def rendered(unit: Unit) -> dict[tuple[str, str], list[str]]:
        return {
            (section, key): [v.replace("%i", "default") for v in values]
            for section, keys in unit.items()
            for key, values in keys.items()
            if key not in ("Description", "Conflicts")
        }

    assert rendered(service) == rendered(template)
    assert one(service, "Unit", "Conflicts") == "walcache@default.service"


@pytest.mark.skipif(SYSUSERS_BIN is None, reason="systemd-sysusers is not installed on this machine")
def test_sysusers_creates_a_static_walcache_user_and_group(tmp_path: Path) -> None:
    assert SYSUSERS_BIN is not None
    (tmp_path / "etc").mkdir()
    conf_dir = tmp_path / "usr" / "lib" / "sysusers.d"
    conf_dir.mkdir(parents=True)
    shutil.copy(SYSUSERS, conf_dir / "walcache.conf")
    done = subprocess.run(
        [SYSUSERS_BIN, f"--root={tmp_path}"], capture_output=True, text=True, timeout=60, env=analyze_env()
    )
    assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    user = users["walcache"]
    assert user[5] == "/var/lib/walcache"
    assert user[6].endswith("nologin")
    assert user[3] == groups["walcache"][2]  # primary group is walcache
    assert 0 < int(user[2]) < 1000  # a system uid


# What the daemon does, as syscalls: WAL I/O and its durability, the shared
# table, the socket server, SO_PEERCRED, chown to its group, signals, threads.
DAEMON_SYSCALLS = """
    openat read write pread64 pwrite64 lseek fsync fdatasync flock fcntl ftruncate fallocate
    rename renameat2 unlinkat mkdirat newfstatat statx getdents64 fchmod fchmodat fchown fchownat
    mmap munmap mremap madvise msync memfd_create
    socket bind listen accept4 connect getsockopt setsockopt sendto recvfrom sendmsg recvmsg shutdown
    epoll_create1 epoll_ctl epoll_wait poll pipe2 rt_sigaction rt_sigprocmask kill getpid getuid getgid
    clock_gettime clock_nanosleep futex clone clone3 set_robust_list getrandom prlimit64 umask
""".split()


def expand_syscall_set(name: str, cache: dict[str, set[str]]) -> set[str]:
    assert ANALYZE is not None
    if not name.startswith("@"):
        return {name}
    if name not in cache:
        out = subprocess.run(
            [ANALYZE, "syscall-filter", "--no-pager", name],
            capture_output=True, text=True, timeout=60, env=analyze_env(),
        ).stdout
        members: set[str] = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                members |= expand_syscall_set(item, cache)
        assert members, f"systemd-analyze knows no set {name}"
        cache[name] = members
    return cache[name]


def allowed_syscalls(unit: Unit) -> set[str]:
    """The syscalls the unit's SystemCallFilter= lines allow."""
    # Later SystemCallFilter= lines add to (or with ~ remove from) the allowlist the first one starts.
    cache: dict[str, set[str]] = {}
    allowed: set[str] = set()
    lines = unit["Service"]["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first filter line must be an allowlist"
    for line in lines:
        deny = line.startswith("~")
        names = set().union(*(expand_syscall_set(n, cache) for n in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


@needs_analyze
def test_seccomp_filter_allows_every_syscall_the_daemon_makes(template: Unit) -> None:
    allowed = allowed_syscalls(template)
    assert sorted(set(DAEMON_SYSCALLS) - allowed) == []
    assert "chroot" not in allowed and "setuid" not in allowed  # still no privileged calls


@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed on this machine")
def test_seccomp_filter_allows_what_a_real_daemon_session_calls(template: Unit, tmp_path: Path) -> None:
    """The list above is what we think the daemon calls; strace says what it does call.

    A session under ``strace -f``: start-up and recovery, every operation, a compaction
    (the compactor process too: the filter applies to it as well), SIGTERM.
    """
    probe = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True, timeout=60)
    if probe.returncode != 0:  # e.g. a container that forbids ptrace
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()[:200]}")
    data, sock, trace = tmp_path / "d", tmp_path / "walcache.sock", tmp_path / "strace.txt"
    cmd = ["strace", "-f", "-c", "-o", str(trace), sys.executable, "-m", "walcache", "serve",
           "--data-dir", str(data), "--socket", str(sock)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    namespace = shm_namespace(data)
    try:
        c = _connect_when_up(sock, data, proc)
        with c:
            c.put("k", "v", ttl=60)
            c.put_many({"a": 1, "b": b"2"})
            assert c.get("k") == "v" and c.get_many(["a", "b"]) == {"a": 1, "b": b"2"}
            c.delete("a")
            c.delete_many(["b"])
            assert c.compact()["status"] == "done"
            pid = c.stats()["pid"]
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unlink_segments(namespace)
    # strace -c: a table whose last column is the syscall's name, closed by a "total" row.
    called = {line.split()[-1] for line in trace.read_text().splitlines()
              if re.match(r"\s*[0-9.]+\s+[0-9.]+\s+\d+", line) and line.split()[-1] != "total"}  # fmt: skip
    assert {"fdatasync", "accept4", "epoll_wait", "mmap"} <= called, sorted(called)  # it did trace the daemon
    assert sorted(called - allowed_syscalls(template)) == []


def _connect_when_up(sock: Path, data: Path, proc: subprocess.Popen[bytes]) -> walcache.Client:
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            return walcache.Client(sock, data_dir=data)
        except (walcache.DaemonUnavailable, walcache.TableUnavailable):  # not up yet
            time.sleep(0.1)
    raise AssertionError("the daemon under strace did not answer within 60 s")
