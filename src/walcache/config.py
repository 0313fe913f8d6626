"""Configuration of ``walcache serve``: one definition of every option.

Each option has the same name in three places, and the first place that sets
it wins::

    --max-value-bytes 2M            command-line flag           (highest)
    WALCACHE_MAX_VALUE_BYTES=2M     environment variable
    max_value_bytes = "2M"          key in the TOML config file
    1M                              default                     (lowest)

The config file is ``--config PATH`` or ``WALCACHE_CONFIG``; there is none by
default. Unknown keys in it are errors (a typo must not silently keep a
default). An empty environment variable counts as unset, so a systemd drop-in
can clear a value with ``Environment=WALCACHE_X=``.

Every value goes through one coercion per option (:data:`SERVE_OPTIONS`), so a
flag, a variable, a TOML value and a value passed to :class:`ServeConfig` in
code are checked alike. A bad value raises :class:`walcache.ConfigError` that
names the option, the value and where it came from::

    max_memory='12Q' from WALCACHE_MAX_MEMORY: expected a size like 512M or 2G

Sizes take K, M, G, T suffixes (powers of 1024, an optional ``B``/``iB``
after them); modes are octal strings everywhere (``"0660"``, quoted in TOML). Relative paths in the file are relative to the file's
directory; relative paths in flags and variables to the working directory.

SIGHUP: the daemon calls :func:`load_serve_config` again with the same
arguments (only the file can have changed), applies the fields in
:attr:`ServeConfig.RELOADABLE` and logs :func:`diff`; other changes need a
restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import grp
import importlib
import logging
import math
import os
import pwd
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .paths import default_data_dir, default_socket_path
from .shm.layout import MAX_KEY_BYTES, MAX_VALUE_BYTES

__all__ = [
    "ServeConfig",
    "OptionSpec",
    "SERVE_OPTIONS",
    "ENV_PREFIX",
    "CONFIG_ENV",
    "FRAME_OVERHEAD_BYTES",
    "add_serve_arguments",
    "load_serve_config",
    "diff",
    "parse_size",
    "format_size",
    "format_value",
    "group_id",
]

log = logging.getLogger("walcache.config")

ENV_PREFIX = "WALCACHE_"
CONFIG_ENV = "WALCACHE_CONFIG"

# Room for the msgpack framing of a put_many holding one key and one value of
# the largest allowed sizes (array/map headers, request id, op name, vflag,
# ttl): far more than it needs, so a valid request never hits max_frame_bytes
# just because both limits were raised together.
FRAME_OVERHEAD_BYTES = 4096

_DEFAULT = "default"
_IN_CODE = "ServeConfig()"


# ---------------------------------------------------------------- coercions
# Each takes (option name, raw value, source) and returns the typed value or
# raises ConfigError. Raw values are str (flags, env), TOML types, or already
# typed values from code; bool is refused wherever a number is expected
# because TOML `true` is an int subclass in Python.


def _fail(name: str, raw: object, source: str, expected: str) -> ConfigError:
    return ConfigError(f"{name}={raw!r} from {source}: {expected}")


_SIZE_RE = re.compile(r"^\s*(\d[\d_]*)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """``"512M"`` -> 536870912. Raises ValueError on anything else."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(text)
    digits = m.group(1)
    if digits.endswith("_") or "__" in digits:
        raise ValueError(text)
    return int(digits.replace("_", "")) << _SIZE_SHIFT.get((m.group(2) or "").lower(), 0)


def format_size(n: int) -> str:
    """The shortest exact form: 1048576 -> ``"1M"``, 1000 -> ``"1000"``."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def _size(minimum: int, maximum: int | None = None) -> Callable[[str, object, str], object]:
    def coerce(name: str, raw: object, source: str) -> int:
        expected = f"expected a size like 512M or 2G (bytes, at least {format_size(minimum)}" + (
            f", at most {format_size(maximum)})" if maximum is not None else ")"
        )
        if isinstance(raw, bool):
            raise _fail(name, raw, source, expected)
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = parse_size(raw)
            except ValueError:
                raise _fail(name, raw, source, expected) from None
        else:
            raise _fail(name, raw, source, expected)
        if value < minimum or (maximum is not None and value > maximum):
            raise _fail(name, raw, source, expected)
        return value

    return coerce


def _integer(minimum: int, maximum: int, unit: str = "") -> Callable[[str, object, str], object]:
    def coerce(name: str, raw: object, source: str) -> int:
        expected = f"expected an integer{unit} from {minimum} to {maximum}"
        if isinstance(raw, bool):
            raise _fail(name, raw, source, expected)
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                raise _fail(name, raw, source, expected) from None
        else:
            raise _fail(name, raw, source, expected)
        if not minimum <= value <= maximum:
            raise _fail(name, raw, source, expected)
        return value

    return coerce


def _ratio(name: str, raw: object, source: str) -> float:
    expected = "expected a number greater than 0 and at most 1 (a fraction, e.g. 0.5)"
    if isinstance(raw, bool):
        raise _fail(name, raw, source, expected)
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise _fail(name, raw, source, expected) from None
    else:
        raise _fail(name, raw, source, expected)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise _fail(name, raw, source, expected)
    return value


def _path(name: str, raw: object, source: str) -> Path:
    if isinstance(raw, (str, os.PathLike)) and os.fspath(raw):
        text = os.fspath(raw)
        if isinstance(text, str) and "\0" not in text:
            return Path(text).expanduser()
    raise _fail(name, raw, source, "expected a path")


# sun_path holds 108 bytes with the terminating NUL (unix(7)).
MAX_SOCKET_PATH_BYTES = 107


def _socket_path(name: str, raw: object, source: str) -> Path:
    path = _path(name, raw, source)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise _fail(name, raw, source, f"a Unix socket path of at most {MAX_SOCKET_PATH_BYTES} bytes")
    return path


def _optional_size(minimum: int) -> Callable[[str, object, str], object]:
    size = _size(minimum)

    def coerce(name: str, raw: object, source: str) -> object:
        return None if raw is None else size(name, raw, source)

    return coerce


def _optional_path(name: str, raw: object, source: str) -> Path | None:
    return None if raw is None else _path(name, raw, source)


_FSYNC_POLICIES = ("always", "interval", "never")


def _fsync(name: str, raw: object, source: str) -> str:
    if isinstance(raw, str) and raw.strip().lower() in _FSYNC_POLICIES:
        return raw.strip().lower()
    raise _fail(name, raw, source, "expected one of always, interval, never")


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(name: str, raw: object, source: str) -> str:
    if isinstance(raw, str):
        level = raw.strip().upper()
        if level == "WARN":
            level = "WARNING"
        if level in _LOG_LEVELS:
            return level
    raise _fail(name, raw, source, "expected one of " + ", ".join(_LOG_LEVELS))


_OCTAL_RE = re.compile(r"^\s*(?:0o)?([0-7]{1,4})\s*$", re.IGNORECASE)


def _mode(name: str, raw: object, source: str) -> int:
    # Outside code a mode must be a string: a TOML integer cannot say whether
    # `660` meant octal (it is 0o1224) and `0o660` (432) looks just like a
    # decimal 432; guessing wrong locks every client out or lets everyone in.
    expected = 'expected an octal mode like "0660" (in TOML, a quoted string)'
    if isinstance(raw, str):
        m = _OCTAL_RE.match(raw)
        if not m:
            raise _fail(name, raw, source, expected)
        value = int(m.group(1), 8)
    elif isinstance(raw, int) and not isinstance(raw, bool) and source == _IN_CODE:
        value = raw
    else:
        raise _fail(name, raw, source, expected)
    if not 0 <= value <= 0o777:
        raise _fail(name, raw, source, "expected only permission bits (at most 0777)")
    if value & 0o600 != 0o600:
        raise _fail(name, raw, source, "the owner needs read and write on its socket: expected 06xx")
    return value


def group_id(name: str) -> int:
    """The gid for a group option: a group name, else a numeric gid. Raises KeyError."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise


def _group(name: str, raw: object, source: str) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return str(raw)
    if isinstance(raw, str) and raw.strip():
        text = raw.strip()
        try:
            group_id(text)
        except KeyError:
            raise _fail(name, raw, source, "no such group (expected a group name or a gid)") from None
        return text
    raise _fail(name, raw, source, "expected a group name or a numeric gid")


def _uids(name: str, raw: object, source: str) -> list[int] | None:
    expected = "expected user names or uids, comma-separated (a list in TOML)"
    if raw is None:
        return None
    items: list[object]
    if isinstance(raw, str):
        items = [p for p in re.split(r"[,\s]+", raw.strip()) if p]
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        raise _fail(name, raw, source, expected)
    if not items:
        raise _fail(name, raw, source, "an empty allowlist would refuse every client; omit it to allow anyone who can open the socket")
    uids: list[int] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            uid = item
        elif isinstance(item, str) and item.isdigit():
            uid = int(item)
        elif isinstance(item, str) and item:
            try:
                uid = pwd.getpwnam(item).pw_uid
            except KeyError:
                raise _fail(name, raw, source, f"no such user {item!r}") from None
        else:
            raise _fail(name, raw, source, expected)
        if uid not in uids:
            uids.append(uid)
    return uids


# ------------------------------------------------------------ option table


@dataclass(frozen=True)
class OptionSpec:
    """One serve option: its coercion and help. Flag and env names derive from ``name``."""

    name: str
    coerce: Callable[[str, object, str], Any]
    help: str
    metavar: str
    default_help: str | None = None  # shown instead of the formatted default
    flag_name: str | None = None  # only --config differs from the option name

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return CONFIG_ENV if self.name == "config_file" else ENV_PREFIX + self.name.upper()


@dataclass(frozen=True)
class ServeConfig:
    """Every option of ``walcache serve``; build it with :func:`load_serve_config`.

    Constructing it directly (tests, embedding) runs the same checks. It is
    frozen: a reload builds a new one and the daemon swaps the reference.
    ``sources`` says where each value came from (``"default"``, a flag, a
    variable or the config file's path).
    """

    data_dir: Path = field(default_factory=default_data_dir)
    socket: Path = field(default_factory=default_socket_path)
    fsync: str = "always"
    fsync_interval_ms: int = 100
    busy_poll_us: int = 100
    max_key_bytes: int = 4096
    max_value_bytes: int = 1 << 20
    max_frame_bytes: int = 64 << 20
    max_connections: int = 1024
    max_pending_bytes: int = 64 << 20
    max_memory: int = 1 << 30
    shm_reserve: int | None = None  # None: twice max_memory
    initial_capacity: int = 1024
    socket_mode: int = 0o600
    socket_group: str | None = None
    shm_group: str | None = None
    allow_uids: list[int] | None = None
    segment_bytes: int = 64 << 20
    compact_dead_ratio: float = 0.5
    compact_min_bytes: int = 64 << 20
    log_level: str = "INFO"
    config_file: Path | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    RELOADABLE: ClassVar[frozenset[str]] = frozenset(
        {
            "log_level",
            "busy_poll_us",
            "max_key_bytes",
            "max_value_bytes",
            "max_frame_bytes",
            "max_connections",
            "max_pending_bytes",
            "max_memory",
            "shm_reserve",
            "compact_dead_ratio",
            "compact_min_bytes",
            "allow_uids",
        }
    )

    def __post_init__(self) -> None:
        for spec in SERVE_OPTIONS:
            source = self.sources.get(spec.name, _IN_CODE)
            value = spec.coerce(spec.name, getattr(self, spec.name), source)
            object.__setattr__(self, spec.name, value)
        _check_relations(self)

    def source_of(self, name: str) -> str:
        """Where ``name`` came from: a flag, a variable, the file's path, "default" or "ServeConfig()"."""
        source = self.sources.get(name)
        if source is not None:
            return source
        return _DEFAULT if getattr(self, name) == _field_default(name) else _IN_CODE

    def describe(self) -> list[str]:
        """One ``name=value (source)`` line per option, for the start-up log."""
        return [
            f"{spec.name}={format_value(spec.name, getattr(self, spec.name))} ({self.source_of(spec.name)})"
            for spec in SERVE_OPTIONS
        ]


def _field_default(name: str) -> Any:
    f = ServeConfig.__dataclass_fields__[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


_SIZE_OPTIONS = frozenset(
    {
        "max_key_bytes",
        "max_value_bytes",
        "max_frame_bytes",
        "max_pending_bytes",
        "max_memory",
        "shm_reserve",
        "segment_bytes",
        "compact_min_bytes",
    }
)

_RELOAD = " Reloadable on SIGHUP."

SERVE_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "config_file", _optional_path,
        "TOML file whose keys are the option names below in snake_case (unknown keys are errors); "
        "it is read again on SIGHUP.", "PATH",
        default_help="none", flag_name="--config",
    ),
    OptionSpec(
        "data_dir", _path, "Directory of the write-ahead log and the lock file; one daemon per directory.", "DIR",
        default_help="$STATE_DIRECTORY under systemd, else $XDG_STATE_HOME/walcache, else ~/.local/state/walcache",
    ),
    OptionSpec(
        "socket", _socket_path, "Unix socket the daemon listens on.", "PATH",
        default_help="$RUNTIME_DIRECTORY/walcache.sock under systemd, else $XDG_RUNTIME_DIR/walcache/walcache.sock, "
        "else /tmp/walcache-$UID/walcache.sock",
    ),
    OptionSpec(
        "fsync", _fsync,
        "When a write is acknowledged: always = after fdatasync (survives power loss; group commit), "
        "interval = after write(), synced every --fsync-interval-ms (survives a daemon crash), "
        "never = the OS decides.",
        "{always,interval,never}",
    ),
    OptionSpec("fsync_interval_ms", _integer(1, 3_600_000, " (ms)"), "Sync period for --fsync interval.", "MS"),
    OptionSpec(
        "busy_poll_us", _integer(0, 10_000, " (us)"),
        "After a round that read a request, while no fdatasync is in flight, poll the sockets this long "
        "before sleeping: a client's next request is then read without a wake-up (costly in VMs). Helps "
        "one writing connection most. Stops by itself while polls find nothing; 0 turns it off." + _RELOAD,
        "US",
    ),
    # At most what the shared table's layout can hold: a larger limit would let a key or a
    # value be logged that the table then refuses, halfway through a put_many.
    OptionSpec("max_key_bytes", _size(1, MAX_KEY_BYTES), "Largest encoded key." + _RELOAD, "SIZE"),
    OptionSpec("max_value_bytes", _size(1, MAX_VALUE_BYTES), "Largest encoded value." + _RELOAD, "SIZE"),
    OptionSpec(
        "max_frame_bytes", _size(1),
        "Largest request frame; must hold a put_many of one largest key and value." + _RELOAD, "SIZE",
    ),
    OptionSpec("max_connections", _integer(1, 1_000_000), "Most client connections at once." + _RELOAD, "N"),
    OptionSpec(
        "max_pending_bytes", _size(1),
        "Per connection: unread replies plus unparsed input before the daemon stops reading it; "
        "at least --max-frame-bytes." + _RELOAD,
        "SIZE",
    ),
    OptionSpec(
        "max_memory", _size(1),
        "Bytes of shared table (entries and their index slots); past it a put fails with "
        "CacheFull and nothing is logged. Shared memory in use can pass it by the index's "
        "empty slots and by retired indexes (at most a quarter of the data area, until a "
        "rebuild)." + _RELOAD, "SIZE",
    ),
    OptionSpec(
        "shm_reserve", _optional_size(0),
        "Address space each shared-table segment reserves for its data to grow, and its "
        "index to move, in place, without a rebuild that stops every write (sparse: no "
        "memory until used). Reader processes map it too: under an address-space limit "
        "(ulimit -v) lower it; 0 turns growth in place off. Applies to the next segment." + _RELOAD,
        "SIZE", default_help="twice --max-memory",
    ),
    OptionSpec("initial_capacity", _integer(1, 1 << 40), "Expected number of keys (pre-sizes the index).", "N"),
    OptionSpec(
        "socket_mode", _mode, "Permission bits of the socket; clients need write permission (0660 with a group).",
        "OCTAL",
    ),
    OptionSpec("socket_group", _group, "Group of the socket.", "GROUP", default_help="the daemon's group"),
    OptionSpec(
        "shm_group", _group,
        "Group that may read the shared table: its segments become 0640.", "GROUP",
        default_help="none, segments are 0600 (owner only)",
    ),
    OptionSpec(
        "allow_uids", _uids,
        "Only these users (names or uids, comma-separated) may connect, checked with SO_PEERCRED."
        + _RELOAD,
        "UIDS",
        default_help="none, anyone who can open the socket",
    ),
    OptionSpec("segment_bytes", _size(4096), "Size at which the log rotates to a new segment file.", "SIZE"),
    OptionSpec(
        "compact_dead_ratio", _ratio, "Compact once this fraction of the log is dead records." + _RELOAD, "RATIO"
    ),
    OptionSpec(
        "compact_min_bytes", _size(0), "Do not compact a log smaller than this." + _RELOAD, "SIZE"
    ),
    OptionSpec("log_level", _log_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL." + _RELOAD, "LEVEL"),
)

_SPECS: dict[str, OptionSpec] = {spec.name: spec for spec in SERVE_OPTIONS}
_FILE_KEYS = frozenset(_SPECS) - {"config_file"}


def format_value(name: str, value: object) -> str:
    """How an option's value reads in help and logs (sizes with suffixes, modes in octal)."""
    if value is None:
        return "none"
    if name in _SIZE_OPTIONS and isinstance(value, int):
        return format_size(value)
    if name == "socket_mode" and isinstance(value, int):
        return f"{value:04o}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _check_relations(cfg: ServeConfig) -> None:
    def said(name: str) -> str:
        return f"{name}={format_value(name, getattr(cfg, name))} ({cfg.source_of(name)})"

    need = cfg.max_key_bytes + cfg.max_value_bytes + FRAME_OVERHEAD_BYTES
    if cfg.max_frame_bytes < need:
        raise ConfigError(
            f"{said('max_frame_bytes')} cannot carry one {said('max_key_bytes')} plus one "
            f"{said('max_value_bytes')} plus {FRAME_OVERHEAD_BYTES} bytes of framing: "
            f"raise max_frame_bytes to at least {need} or lower the others"
        )
    if cfg.max_pending_bytes < cfg.max_frame_bytes:
        raise ConfigError(
            f"{said('max_pending_bytes')} is smaller than {said('max_frame_bytes')}: a largest "
            f"frame could never be read; raise max_pending_bytes or lower max_frame_bytes"
        )
    if cfg.max_memory < cfg.max_key_bytes + cfg.max_value_bytes:
        raise ConfigError(
            f"{said('max_memory')} cannot hold one entry of {said('max_key_bytes')} and "
            f"{said('max_value_bytes')}: raise max_memory or lower the others"
        )


def diff(old: ServeConfig, new: ServeConfig) -> dict[str, tuple[Any, Any]]:
    """Options whose value differs: ``{name: (old, new)}``, in option order.

    The daemon applies the names in :attr:`ServeConfig.RELOADABLE` and warns
    that the others need a restart.
    """
    changed: dict[str, tuple[Any, Any]] = {}
    for spec in SERVE_OPTIONS:
        a, b = getattr(old, spec.name), getattr(new, spec.name)
        if a != b:
            changed[spec.name] = (a, b)
    return changed


# ------------------------------------------------------------------ argparse


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag per option to ``parser``; every flag defaults to None ("not given")."""
    group = parser.add_argument_group(
        "serve options",
        "Each option is also read from a WALCACHE_* environment variable and a key of the "
        "TOML file given by --config; precedence: flag > environment > file > default. "
        "Sizes take K, M, G, T suffixes (powers of 1024).",
    )
    for spec in SERVE_OPTIONS:
        if spec.default_help is not None:
            default = spec.default_help
        else:
            default = format_value(spec.name, _field_default(spec.name))
        where = f"env {spec.env}"
        if spec.name != "config_file":
            where += f", TOML {spec.name}"
        text = f"{spec.help} [{where}; default: {default}]"
        group.add_argument(
            spec.flag,
            dest=spec.name,
            metavar=spec.metavar,
            default=None,
            help=text.replace("%", "%%"),
        )


# ------------------------------------------------------------------- loading


def _toml_loads(data: bytes, path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib

        module: Any = tomllib
    else:
        try:
            module = importlib.import_module("tomli")
        except ImportError:
            raise ConfigError(
                f"config file {path}: reading TOML on Python < 3.11 needs the tomli package "
                "(pip install tomli), or pass the options as flags or WALCACHE_* variables"
            ) from None
    try:
        doc: dict[str, Any] = module.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 ({exc})") from None
    except module.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    return doc


def _read_file(path: Path, source: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config_file={str(path)!r} from {source}: no such file (an empty file means all defaults)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config_file={str(path)!r} from {source}: cannot read it: {exc.strerror}") from None
    doc = _toml_loads(data, path)
    unknown = sorted(set(doc) - _FILE_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), _FILE_KEYS, n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigError(
            f"config file {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"known keys: {', '.join(sorted(_FILE_KEYS))}"
        )
    return doc


def load_serve_config(
    args: argparse.Namespace | None,
    environ: Mapping[str, str],
    *,
    file: Path | None = None,
) -> ServeConfig:
    """Merge flags (``args`` from :func:`add_serve_arguments`), ``environ`` and the TOML file.

    The file is ``args.config_file`` (``--config``), else ``WALCACHE_CONFIG``,
    else ``file``. Default data dir and socket come from :mod:`walcache.paths`
    (which reads the process environment, e.g. systemd's STATE_DIRECTORY).
    Raises ConfigError naming the option and its source.
    """

    def flag_value(name: str) -> Any:
        return None if args is None else getattr(args, name, None)

    def env_value(spec: OptionSpec) -> str | None:
        value = environ.get(spec.env)
        return value if value else None

    config_spec = _SPECS["config_file"]
    config_path: Path | None = None
    config_source = _DEFAULT
    for raw, source in (
        (flag_value("config_file"), config_spec.flag),
        (env_value(config_spec), config_spec.env),
        (file, "load_serve_config(file=...)"),
    ):
        if raw is not None:
            config_path = _path("config_file", raw, source)
            config_source = source
            break

    from_file: dict[str, Any] = {}
    if config_path is not None:
        from_file = _read_file(config_path, config_source)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in SERVE_OPTIONS:
        if spec.name == "config_file":
            continue
        flag, env = flag_value(spec.name), env_value(spec)
        if flag is not None:
            values[spec.name], sources[spec.name] = flag, spec.flag
        elif env is not None:
            values[spec.name], sources[spec.name] = env, spec.env
        elif spec.name in from_file:
            raw = from_file[spec.name]
            if spec.coerce is _path and isinstance(raw, str) and raw and config_path is not None:
                # The file's directory, not the daemon's working directory,
                # anchors a relative path: systemd starts us in /.
                raw = str(config_path.parent / Path(raw).expanduser())
            values[spec.name], sources[spec.name] = raw, str(config_path)
        if spec.name in from_file and sources.get(spec.name) != str(config_path):
            log.info(
                "%s in %s is overridden by %s (flag > environment > file)",
                spec.name,
                config_path,
                sources[spec.name],
            )
    if config_path is not None:
        values["config_file"] = config_path
        sources["config_file"] = config_source
    return ServeConfig(**values, sources=sources)

