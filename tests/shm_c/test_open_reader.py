"""Which reader a client gets: compiled, pure Python, or the daemon; and the optional build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from walcache.codec import encode_key, encode_value
from walcache.shm import ShmTable
from walcache.shm.creader import CReader, PyReader, extension, extension_error, open_reader

from .helpers import requires_c

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def table(namespace: str) -> Iterator[ShmTable]:
    t = ShmTable.create(namespace)
    vflag, vb = encode_value({"v": 1})
    t.put(encode_key("k"), vflag, vb, 1, 0)
    t.publish()
    yield t
    t.close(unlink=True)


@pytest.mark.skipif(os.environ.get("WALCACHE_REQUIRE_C") != "1", reason="WALCACHE_REQUIRE_C=1 is not set")
def test_the_compiled_reader_is_built_where_it_is_required() -> None:
    """CI sets WALCACHE_REQUIRE_C=1: there a missing or stale build must fail the run, not
    quietly skip every compiled-reader test."""
    assert extension is not None, f"the compiled reader is not usable: {extension_error}"


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


@pytest.mark.skipif(_compiler() is None, reason="no C compiler here: the pure-Python reader is expected")
def test_the_extension_is_built_where_a_compiler_exists() -> None:
    # Where `pip install` had a compiler, a missing extension is a broken build, not a fallback.
    assert extension is not None, f"walcache.shm._creader: {extension_error}"


@requires_c
def test_open_reader_prefers_the_compiled_reader(table: ShmTable, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WALCACHE_PURE_PYTHON", raising=False)
    with open_reader(table.namespace) as r:
        assert isinstance(r, CReader) and r.kind == "c" and r.lock_free_ok
        assert r.lookup("k") == {"v": 1}
    monkeypatch.setenv("WALCACHE_PURE_PYTHON", "0")
    with open_reader(table.namespace) as r:
        assert r.kind == "c"


def test_walcache_pure_python_selects_the_reference_reader(table: ShmTable, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALCACHE_PURE_PYTHON", "1")
    with open_reader(table.namespace) as r:
        assert isinstance(r, PyReader)
        assert r.kind == ("python" if r.lock_free_ok else "daemon")
        if r.lock_free_ok:
            assert r.lookup("k") == {"v": 1}


@requires_c
def test_off_x86_64_even_the_compiled_reader_is_not_used(table: ShmTable, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer is Python: its stores are ordered only under x86-64's rules, so a
    lock-free reader of any kind is unsafe elsewhere; the client reads through the daemon."""
    import walcache.shm.layout as layout_mod
    import walcache.shm.reader as reader_mod

    monkeypatch.delenv("WALCACHE_PURE_PYTHON", raising=False)
    monkeypatch.setattr(layout_mod, "LOCK_FREE_OK", False)  # what an aarch64 host computes
    monkeypatch.setattr(reader_mod, "LOCK_FREE_OK", False)
    with open_reader(table.namespace) as r:
        assert not isinstance(r, CReader) and r.kind == "daemon" and not r.lock_free_ok


def test_the_pure_python_reader_says_daemon_where_lock_free_reads_are_refused(table: ShmTable) -> None:
    with PyReader(table.namespace) as r:
        r.lock_free_ok = False  # what layout.LOCK_FREE_OK gives off x86-64
        assert r.kind == "daemon"


def _run(code: str, src: Path, namespace: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(src), NS=namespace)
    env.pop("WALCACHE_PURE_PYTHON", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


_PROBE = """
    import os
    import walcache.shm.creader as c
    r = c.open_reader(os.environ["NS"])
    print(c.__file__)
    print(r.kind, r.lookup("k"))
    print(c.extension_error)
"""


def _copy_tree(tmp: Path) -> Path:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tmp / name)
    shutil.copytree(ROOT / "src", tmp / "src", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return tmp / "src"


def test_an_install_without_a_compiler_succeeds_and_reads_in_python(table: ShmTable, tmp_path: Path) -> None:
    src = _copy_tree(tmp_path)
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path, env=dict(os.environ, CC="/bin/false"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert 'building extension "walcache.shm._creader" failed' in build.stdout + build.stderr
    assert not list(src.rglob("_creader*.so"))
    out = _run(_PROBE, src, table.namespace).splitlines()
    assert out[0].startswith(str(src))  # the copy without the extension was imported
    assert out[1] == "python {'v': 1}"
    assert out[2].startswith("not built")


@pytest.mark.skipif(_compiler() is None, reason="needs a C compiler")
def test_an_extension_built_for_another_layout_version_is_refused(table: ShmTable, tmp_path: Path) -> None:
    src = _copy_tree(tmp_path)
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path, env=dict(os.environ, CFLAGS="-DWALCACHE_TEST_LAYOUT_VERSION=99"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert list(src.rglob("_creader*.so"))
    out = _run(_PROBE, src, table.namespace).splitlines()
    assert out[0].startswith(str(src))
    assert out[1] == "python {'v': 1}"
    assert "layout version 99" in out[2]


@requires_c
@pytest.mark.parametrize("pure", ["", "1"], ids=["compiled", "pure-python"])
def test_client_stats_and_walcache_stats_say_which_reader_runs(ws: Any, pure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real daemon; the client reads its table through whichever reader open_reader chose.
    monkeypatch.setenv("WALCACHE_PURE_PYTHON", pure)
    expected = "python" if pure else "c"
    d = ws.daemon().start()
    with d.client() as c:
        c.put("k", [1, "two"])
        c.put(b"b", b"raw")
        assert c.get("k") == [1, "two"] and c[b"b"] == b"raw" and c.get("absent") is None
        for _ in range(3):
            assert c[b"b"] == b"raw"  # the third one may come from the result cache
        s = c.stats()
        assert s["reader"] == expected
        if expected == "c":
            counters = s["reader_counters"]
            assert set(counters) == {"retries", "remaps", "contended", "cache_hits"}
            assert counters["cache_hits"] >= 1 and counters["contended"] == 0
        else:
            assert "reader_counters" not in s
    out = subprocess.run(
        [sys.executable, "-m", "walcache", "stats", "--socket", str(d.socket_path)],
        env=dict(os.environ, WALCACHE_PURE_PYTHON=pure), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["reader"] == expected
