"""walcache.config: one definition per serve option, flag > env > file > default."""

from __future__ import annotations

import argparse
import dataclasses
import grp
import logging
import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import walcache
from walcache.config import (
    FRAME_OVERHEAD_BYTES,
    SERVE_OPTIONS,
    ServeConfig,
    add_serve_arguments,
    diff,
    format_size,
    load_serve_config,
    parse_size,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="walcache serve")
    add_serve_arguments(p)
    return p


def flags(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------ defaults


def test_defaults_without_any_source_match_the_dataclass() -> None:
    cfg = load_serve_config(None, {})
    assert cfg == ServeConfig()
    assert cfg.fsync == "always"
    assert cfg.max_value_bytes == 1 << 20
    assert cfg.max_memory == 1 << 30
    assert cfg.socket_mode == 0o600
    assert cfg.allow_uids is None
    assert cfg.config_file is None
    assert all(cfg.source_of(spec.name) == "default" for spec in SERVE_OPTIONS)


def test_every_flag_defaults_to_none_so_not_given_is_distinguishable() -> None:
    ns = flags()
    for spec in SERVE_OPTIONS:
        assert getattr(ns, spec.name) is None, spec.name


def test_flag_env_and_toml_names_are_derived_from_one_name() -> None:
    by_name = {spec.name: spec for spec in SERVE_OPTIONS}
    assert by_name["max_value_bytes"].flag == "--max-value-bytes"
    assert by_name["max_value_bytes"].env == "WALCACHE_MAX_VALUE_BYTES"
    assert by_name["config_file"].flag == "--config"
    assert by_name["config_file"].env == "WALCACHE_CONFIG"
    dataclass_fields = {f.name for f in dataclasses.fields(ServeConfig)} - {"sources"}
    assert set(by_name) == dataclass_fields


def test_help_documents_env_toml_key_and_default_of_every_option() -> None:
    text = " ".join(parser().format_help().split())  # undo argparse's wrapping
    for spec in SERVE_OPTIONS:
        assert spec.flag in text
        assert f"env {spec.env}" in text
        if spec.name != "config_file":
            assert f"TOML {spec.name};" in text
    assert "default: 1M]" in text  # max_value_bytes
    assert "default: 0600]" in text  # socket_mode
    assert "flag > environment > file > default" in text


# ---------------------------------------------------------------- precedence

# (option, file value, env value, flag value, expected typed values in that order, default)
PRECEDENCE_CASES = [
    ("max_memory", '"512M"', "2G", "3G", (512 << 20, 2 << 30, 3 << 30), 1 << 30),
    ("fsync", '"never"', "interval", "always", ("never", "interval", "always"), "always"),
    ("log_level", '"debug"', "warning", "ERROR", ("DEBUG", "WARNING", "ERROR"), "INFO"),
    ("socket_mode", '"0640"', "0660", "0600", (0o640, 0o660, 0o600), 0o600),
    ("max_connections", "10", "20", "30", (10, 20, 30), 1024),
    ("compact_dead_ratio", "0.25", "0.75", "1", (0.25, 0.75, 1.0), 0.5),
]


@pytest.mark.parametrize("name,in_file,in_env,in_flag,expected,default", PRECEDENCE_CASES)
def test_flag_beats_env_beats_file_beats_default(
    tmp_path: Path, name: str, in_file: str, in_env: str, in_flag: str, expected: tuple[Any, ...], default: Any
) -> None:
    spec = next(s for s in SERVE_OPTIONS if s.name == name)
    toml = write_toml(tmp_path / "w.toml", f"{name} = {in_file}\n")
    env = {spec.env: in_env, "WALCACHE_CONFIG": str(toml)}
    from_file, from_env, from_flag = expected

    cfg = load_serve_config(flags(spec.flag, in_flag), env)
    assert getattr(cfg, name) == from_flag
    assert cfg.source_of(name) == spec.flag

    cfg = load_serve_config(flags(), env)
    assert getattr(cfg, name) == from_env
    assert cfg.source_of(name) == spec.env

    cfg = load_serve_config(flags(), {"WALCACHE_CONFIG": str(toml)})
    assert getattr(cfg, name) == from_file
    assert cfg.source_of(name) == str(toml)

    cfg = load_serve_config(flags(), {})
    assert getattr(cfg, name) == default
    assert cfg.source_of(name) == "default"


def test_options_from_different_sources_combine(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", 'max_memory = "256M"\nfsync = "interval"\nmax_connections = 7\n')
    cfg = load_serve_config(
        flags("--config", str(toml), "--max-connections", "9"),
        {"WALCACHE_FSYNC": "never", "WALCACHE_UNRELATED": "x", "WALCACHE_INSTANCE": "y"},
    )
    assert (cfg.max_memory, cfg.fsync, cfg.max_connections) == (256 << 20, "never", 9)
    assert cfg.config_file == toml
    assert cfg.source_of("config_file") == "--config"


def test_config_file_flag_beats_env_beats_file_argument(tmp_path: Path) -> None:
    a = write_toml(tmp_path / "a.toml", "max_connections = 1\n")
    b = write_toml(tmp_path / "b.toml", "max_connections = 2\n")
    c = write_toml(tmp_path / "c.toml", "max_connections = 3\n")
    env = {"WALCACHE_CONFIG": str(b)}
    assert load_serve_config(flags("--config", str(a)), env, file=c).max_connections == 1
    assert load_serve_config(flags(), env, file=c).max_connections == 2
    assert load_serve_config(None, {}, file=c).max_connections == 3


def test_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", 'log_level = "debug"\n')
    cfg = load_serve_config(None, {"WALCACHE_CONFIG": str(toml), "WALCACHE_LOG_LEVEL": ""})
    assert cfg.log_level == "DEBUG"


def test_file_value_shadowed_by_env_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    toml = write_toml(tmp_path / "w.toml", 'socket_mode = "0600"\n')
    with caplog.at_level(logging.INFO, logger="walcache.config"):
        load_serve_config(None, {"WALCACHE_CONFIG": str(toml), "WALCACHE_SOCKET_MODE": "0660"})
    assert any(
        "socket_mode" in r.getMessage() and "WALCACHE_SOCKET_MODE" in r.getMessage() for r in caplog.records
    )


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    toml = write_toml(tmp_path / "etc" / "w.toml", 'data_dir = "data"\nsocket = "/run/x.sock"\n')
    cfg = load_serve_config(None, {"WALCACHE_CONFIG": str(toml)})
    assert cfg.data_dir == tmp_path / "etc" / "data"
    assert cfg.socket == Path("/run/x.sock")
    # a flag is relative to the working directory, as on any command line
    assert load_serve_config(flags("--data-dir", "d2"), {}).data_dir == Path("d2")


def test_describe_names_value_and_source(tmp_path: Path) -> None:
    cfg = load_serve_config(flags("--max-memory", "2G"), {"WALCACHE_SOCKET_MODE": "0660"})
    lines = cfg.describe()
    assert "max_memory=2G (--max-memory)" in lines
    assert "socket_mode=0660 (WALCACHE_SOCKET_MODE)" in lines
    assert "fsync=always (default)" in lines
    assert len(lines) == len(SERVE_OPTIONS)


# ------------------------------------------------------------- value parsing


@pytest.mark.parametrize(
    "text,value",
    [
        ("0", 0),
        ("4096", 4096),
        ("1_048_576", 1 << 20),
        ("512K", 512 << 10),
        ("512k", 512 << 10),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("64MiB", 64 << 20),
        ("10KB", 10 << 10),
        ("100B", 100),
        (" 3 G ", 3 << 30),
    ],
)
def test_parse_size_accepts(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "12Q", "1.5G", "-1", "1__0", "1_", "0x10", "2GG", "G2", "1 0"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("text,mode", [("0660", 0o660), ("660", 0o660), ("0o640", 0o640), ("600", 0o600), ("0700", 0o700)])
def test_socket_mode_is_octal(text: str, mode: int) -> None:
    assert load_serve_config(flags("--socket-mode", text), {}).socket_mode == mode


@pytest.mark.parametrize("text", ["0999", "rw-rw----", "01660", "0460", "0060", ""])
def test_socket_mode_refuses_non_octal_special_bits_and_owner_without_rw(text: str) -> None:
    with pytest.raises(walcache.ConfigError, match=r"socket_mode=.* from --socket-mode"):
        load_serve_config(flags("--socket-mode", text), {})


def test_socket_mode_as_toml_integer_is_refused_as_ambiguous(tmp_path: Path) -> None:
    # 660 would be 0o1224 and the TOML literal 0o660 arrives as 432: neither can be trusted.
    for literal in ("660", "0o660"):
        toml = write_toml(tmp_path / "w.toml", f"socket_mode = {literal}\n")
        with pytest.raises(walcache.ConfigError, match=r"socket_mode=\d+ from .*w\.toml: expected an octal mode"):
            load_serve_config(None, {"WALCACHE_CONFIG": str(toml)})


def test_sizes_from_toml_may_be_integers_or_strings(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", 'max_memory = 536_870_912\nsegment_bytes = "8M"\n')
    cfg = load_serve_config(None, {"WALCACHE_CONFIG": str(toml)})
    assert (cfg.max_memory, cfg.segment_bytes) == (512 << 20, 8 << 20)


def test_allow_uids_takes_names_and_numbers_and_removes_duplicates(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    cfg = load_serve_config(flags("--allow-uids", f"{me}, 12345,{os.getuid()}"), {})
    assert cfg.allow_uids == [os.getuid(), 12345]
    toml = write_toml(tmp_path / "w.toml", f'allow_uids = [12345, "{me}"]\n')
    assert load_serve_config(None, {"WALCACHE_CONFIG": str(toml)}).allow_uids == [12345, os.getuid()]


def test_groups_take_an_existing_name_or_a_gid() -> None:
    name = grp.getgrgid(os.getgid()).gr_name
    cfg = load_serve_config(flags("--shm-group", name, "--socket-group", "54321"), {})
    assert (cfg.shm_group, cfg.socket_group) == (name, "54321")


# ------------------------------------------------------------ invalid values


@pytest.mark.parametrize(
    "argv,env,message",
    [
        ((), {"WALCACHE_MAX_MEMORY": "12Q"}, "max_memory='12Q' from WALCACHE_MAX_MEMORY: expected a size like 512M or 2G"),
        (("--max-memory", "lots"), {}, "max_memory='lots' from --max-memory: expected a size like 512M or 2G"),
        (("--fsync", "sometimes"), {}, "fsync='sometimes' from --fsync: expected one of always, interval, never"),
        ((), {"WALCACHE_FSYNC_INTERVAL_MS": "0"}, "fsync_interval_ms='0' from WALCACHE_FSYNC_INTERVAL_MS: expected an integer"),
        ((), {"WALCACHE_MAX_CONNECTIONS": "1e3"}, "max_connections='1e3' from WALCACHE_MAX_CONNECTIONS: expected an integer"),
        ((), {"WALCACHE_LOG_LEVEL": "LOUD"}, "log_level='LOUD' from WALCACHE_LOG_LEVEL: expected one of DEBUG"),
        ((), {"WALCACHE_COMPACT_DEAD_RATIO": "1.5"}, "compact_dead_ratio='1.5' from WALCACHE_COMPACT_DEAD_RATIO: expected a number"),
        ((), {"WALCACHE_COMPACT_DEAD_RATIO": "nan"}, "compact_dead_ratio='nan' from WALCACHE_COMPACT_DEAD_RATIO"),
        (("--segment-bytes", "1K"), {}, "segment_bytes='1K' from --segment-bytes: expected a size"),
        (("--shm-group", "no-such-group-wc"), {}, "shm_group='no-such-group-wc' from --shm-group: no such group"),
        (("--allow-uids", "no-such-user-wc"), {}, "allow_uids='no-such-user-wc' from --allow-uids: no such user"),
        ((), {"WALCACHE_ALLOW_UIDS": " , "}, "allow_uids=' , ' from WALCACHE_ALLOW_UIDS: an empty allowlist"),
    ],
)
def test_invalid_value_names_option_value_and_source(argv: tuple[str, ...], env: dict[str, str], message: str) -> None:
    with pytest.raises(walcache.ConfigError) as info:
        load_serve_config(flags(*argv), env)
    assert str(info.value).startswith(message)


def test_invalid_value_in_file_names_the_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", "max_memory = true\n")
    with pytest.raises(walcache.ConfigError) as info:
        load_serve_config(None, {"WALCACHE_CONFIG": str(toml)})
    assert str(info.value).startswith(f"max_memory=True from {toml}: expected a size")


def test_config_error_is_a_value_error_and_a_walcache_error() -> None:
    with pytest.raises(ValueError):
        load_serve_config(flags("--fsync", "x"), {})
    with pytest.raises(walcache.WalcacheError):
        load_serve_config(flags("--fsync", "x"), {})


def test_unknown_toml_keys_are_rejected_with_a_suggestion(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", 'max-memory = "1G"\nfsync = "always"\nbanana = 1\n')
    with pytest.raises(walcache.ConfigError) as info:
        load_serve_config(None, {"WALCACHE_CONFIG": str(toml)})
    text = str(info.value)
    assert str(toml) in text
    assert "'banana'" in text
    assert "'max-memory' (did you mean 'max_memory'?)" in text


@pytest.mark.parametrize("body", ['config_file = "x.toml"\n', "[serve]\nfsync = 'always'\n"])
def test_file_cannot_name_another_file_or_use_sections(tmp_path: Path, body: str) -> None:
    toml = write_toml(tmp_path / "w.toml", body)
    with pytest.raises(walcache.ConfigError, match="unknown key"):
        load_serve_config(None, {"WALCACHE_CONFIG": str(toml)})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", "max_memory = \n")
    with pytest.raises(walcache.ConfigError, match=f"config file {toml}: invalid TOML"):
        load_serve_config(flags("--config", str(toml)), {})


def test_missing_config_file_names_its_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(walcache.ConfigError, match=r"config_file='.*nope\.toml' from --config: no such file"):
        load_serve_config(flags("--config", str(missing)), {})
    with pytest.raises(walcache.ConfigError, match=r"from WALCACHE_CONFIG: no such file"):
        load_serve_config(None, {"WALCACHE_CONFIG": str(missing)})


def test_empty_config_file_means_all_defaults(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", "")
    cfg = load_serve_config(None, {"WALCACHE_CONFIG": str(toml)})
    assert dataclasses.replace(cfg, config_file=None, sources={}) == ServeConfig()


# ----------------------------------------------------------------- relations


def test_frame_must_carry_a_put_of_largest_key_and_value(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", 'max_value_bytes = "64M"\n')
    with pytest.raises(walcache.ConfigError) as info:
        load_serve_config(flags("--max-key-bytes", "1K"), {"WALCACHE_CONFIG": str(toml)})
    text = str(info.value)
    assert "max_frame_bytes=64M (default)" in text
    assert "max_key_bytes=1K (--max-key-bytes)" in text
    assert f"max_value_bytes=64M ({toml})" in text
    # exactly at the boundary it is accepted, one byte less is not
    need = 1024 + (64 << 20) + FRAME_OVERHEAD_BYTES
    argv = ("--max-key-bytes", "1K", "--max-frame-bytes", str(need), "--max-pending-bytes", "1G")
    assert load_serve_config(flags(*argv), {"WALCACHE_CONFIG": str(toml)}).max_frame_bytes == need
    argv = ("--max-key-bytes", "1K", "--max-frame-bytes", str(need - 1), "--max-pending-bytes", "1G")
    with pytest.raises(walcache.ConfigError, match="max_frame_bytes"):
        load_serve_config(flags(*argv), {"WALCACHE_CONFIG": str(toml)})


def test_pending_bytes_must_hold_a_largest_frame() -> None:
    with pytest.raises(walcache.ConfigError, match=r"max_pending_bytes=32M \(WALCACHE_MAX_PENDING_BYTES\)"):
        load_serve_config(None, {"WALCACHE_MAX_PENDING_BYTES": "32M"})


def test_key_and_value_limits_stop_at_what_the_shared_table_holds() -> None:
    from walcache.shm.layout import MAX_KEY_BYTES, MAX_VALUE_BYTES

    assert ServeConfig(max_key_bytes=MAX_KEY_BYTES).max_key_bytes == MAX_KEY_BYTES
    with pytest.raises(walcache.ConfigError, match="max_key_bytes.*at most 65535"):
        ServeConfig(max_key_bytes=MAX_KEY_BYTES + 1)
    with pytest.raises(walcache.ConfigError, match="max_value_bytes.*at most"):
        ServeConfig(max_value_bytes=MAX_VALUE_BYTES + 1, max_frame_bytes=8 << 30, max_pending_bytes=8 << 30)


def test_memory_limit_must_hold_one_largest_entry() -> None:
    with pytest.raises(walcache.ConfigError, match=r"max_memory=512K \(--max-memory\) cannot hold"):
        load_serve_config(flags("--max-memory", "512K"), {})


# ------------------------------------------------------- direct construction


def test_direct_construction_runs_the_same_checks() -> None:
    assert ServeConfig(max_memory="2G", socket_mode="0660").max_memory == 2 << 30  # type: ignore[arg-type]
    with pytest.raises(walcache.ConfigError, match=r"fsync='sometimes' from ServeConfig\(\)"):
        ServeConfig(fsync="sometimes")
    with pytest.raises(walcache.ConfigError, match=r"max_frame_bytes=1K \(ServeConfig\(\)\)"):
        ServeConfig(max_frame_bytes=1024)


def test_config_is_frozen() -> None:
    cfg = ServeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_memory = 1  # type: ignore[misc]


# ---------------------------------------------------------------- reloading


def test_reloadable_names_are_options() -> None:
    names = {spec.name for spec in SERVE_OPTIONS}
    assert ServeConfig.RELOADABLE <= names
    assert {"log_level", "max_memory", "max_value_bytes", "compact_dead_ratio", "allow_uids"} <= ServeConfig.RELOADABLE
    assert not {"data_dir", "socket", "fsync", "socket_mode", "shm_group"} & ServeConfig.RELOADABLE


def test_reload_rereads_the_file_and_diff_names_what_changed(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "w.toml", 'max_memory = "1G"\nlog_level = "info"\n')
    args = flags("--config", str(toml), "--max-connections", "5")
    old = load_serve_config(args, {})
    write_toml(toml, 'max_memory = "2G"\nlog_level = "debug"\nmax_connections = 99\nfsync = "never"\n')
    new = load_serve_config(args, {})
    changes = diff(old, new)
    assert changes == {
        "fsync": ("always", "never"),
        "max_memory": (1 << 30, 2 << 30),
        "log_level": ("INFO", "DEBUG"),
    }  # max_connections stays: the flag still beats the file
    assert set(changes) - ServeConfig.RELOADABLE == {"fsync"}
    assert diff(new, new) == {}


def test_a_socket_path_past_sun_path_is_refused_with_its_source() -> None:
    ok = "/tmp/" + "s" * (107 - len("/tmp/"))
    assert load_serve_config(flags("--socket", ok), {}).socket == Path(ok)
    with pytest.raises(walcache.ConfigError, match="at most 107 bytes"):
        load_serve_config(flags("--socket", ok + "x"), {})
    with pytest.raises(walcache.ConfigError, match="WALCACHE_SOCKET"):
        load_serve_config(flags(), {"WALCACHE_SOCKET": "/tmp/" + "é" * 60})  # 120 bytes of UTF-8
