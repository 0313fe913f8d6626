"""The ``walcache`` command line (also ``python -m walcache``).

Exit status: 0 success; 1 key not found (get, delete), or for serve, the daemon
stopped because its log failed (the next start recovers); 2 usage or
configuration error; 3 no daemon at the socket (nothing listens, or it refused
the connection); 4 any other walcache error (a daemon that did not answer within
--timeout, a corrupt log found by check-log).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .codec import Key
from .errors import ConfigError, DaemonUnavailable, LogCorrupt, WalcacheError

EXIT_OK, EXIT_MISSING, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_ERROR = 0, 1, 2, 3, 4


def _key(args: argparse.Namespace) -> Key:
    raw: str = args.key
    if args.key_type == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"--key-type int: {raw!r} is not an integer") from None
    if args.key_type == "bytes":
        try:
            return bytes.fromhex(raw)
        except ValueError:
            raise ConfigError(f"--key-type bytes takes hex digits, not {raw!r}") from None
    return raw


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        help="the daemon's socket (default: $WALCACHE_SOCKET, else "
        "$RUNTIME_DIRECTORY/walcache.sock under systemd, else "
        "$XDG_RUNTIME_DIR/walcache/walcache.sock, else /tmp/walcache-$UID/walcache.sock)",
    )
    p.add_argument(
        "--data-dir",
        help="the daemon's data dir; lets reads work while the daemon is down",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")


def _add_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", help="the key (a str unless --key-type says otherwise)")
    p.add_argument(
        "--key-type",
        choices=("str", "int", "bytes"),
        default="str",
        help="how to read KEY: str (default), int, or bytes given as hex",
    )


def build_parser() -> argparse.ArgumentParser:
    from .config import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="walcache",
        description="A durable shared-memory cache: lock-free reads, a write-ahead log, group commit.",
    )
    parser.add_argument("--version", action="version", version=f"walcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve",
        help="run the daemon in the foreground",
        description="Run the daemon in the foreground: lock the data dir, recover the log, "
        "publish the shared table, listen on the socket. Logs go to stderr. "
        "Every option can also come from WALCACHE_<NAME> or the TOML file "
        "(precedence: flag > environment > file > default).",
    )
    add_serve_arguments(p)

    p = sub.add_parser("get", help="print the value of a key (exit 1 if missing)")
    _add_key(p)
    p.add_argument("--json", action="store_true", help="print the value as JSON")
    _add_client_options(p)

    p = sub.add_parser("put", help="store a value (durable when this returns)")
    _add_key(p)
    p.add_argument("value", help="the value (a str; '-' reads stdin as bytes)")
    p.add_argument("--json", action="store_true", help="parse VALUE (or stdin, with '-') as JSON")
    p.add_argument("--ttl", type=float, help="expire after this many seconds")
    _add_client_options(p)

    p = sub.add_parser("delete", help="delete a key (exit 1 if it did not exist)")
    _add_key(p)
    _add_client_options(p)

    p = sub.add_parser("keys", help="list keys, one per line")
    p.add_argument("--prefix", help="only str keys starting with PREFIX")
    _add_client_options(p)

    p = sub.add_parser("stats", help="print the daemon's figures as JSON")
    _add_client_options(p)

    p = sub.add_parser(
        "status",
        help="daemon health: pid, uptime, memory, CPU, log, keys, clients, fsync latency",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (for machines)")
    _add_client_options(p)

    p = sub.add_parser("compact", help="compact the log now")
    _add_client_options(p)

    p = sub.add_parser(
        "check-log",
        help="verify the log of a data dir (changes nothing unless --repair)",
        description="Read every record of the log in DIR and report what is found, "
        "changing nothing. --repair (only while no daemon runs: it takes the data-dir "
        "lock) rebuilds a damaged segment header when the segment's records check under "
        "the one the rest of the log implies, else truncates at the first corruption and "
        "lists the sequence numbers it dropped; what it removes is kept as *.corrupt-<ns> files.",
    )
    p.add_argument("dir", nargs="?", help="the data dir (default: the default data dir)")
    p.add_argument(
        "--repair", action="store_true", help="rebuild a damaged header, else truncate at the first corruption"
    )

    p = sub.add_parser(
        "drop-shm",
        help="remove the shared table a stopped daemon left in /dev/shm",
        description="A stopped daemon's table stays in /dev/shm, so that readers keep the "
        "last state. drop-shm removes it (the control and data segments of DIR's table) "
        "when no daemon runs for DIR: it takes the data-dir lock. Processes that still map "
        "the table keep their mapping until they close it. The log is not touched: the "
        "next daemon builds the table from it again.",
    )
    p.add_argument("dir", nargs="?", help="the data dir (default: the default data dir)")
    return parser


def _client(args: argparse.Namespace) -> Any:
    from .client import Client

    return Client(args.socket, timeout=args.timeout, data_dir=args.data_dir)


def _print_value(value: Any, as_json: bool) -> None:
    if as_json or not isinstance(value, (str, bytes)):
        print(json.dumps(value, default=lambda o: o.hex() if isinstance(o, bytes) else repr(o)))
    elif isinstance(value, bytes):
        sys.stdout.buffer.write(value)
        if sys.stdout.isatty():
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    else:
        print(value)


def _status(stats: dict[str, Any]) -> dict[str, Any]:
    """The operator's view: the daemon's figures plus its process's RSS and CPU."""
    import psutil

    status: dict[str, Any] = {
        "pid": stats["pid"],
        "uptime_s": stats["uptime_s"],
        "rss_bytes": None,
        "cpu_percent": None,
        "cpu_seconds": None,
    }
    try:
        proc = psutil.Process(stats["pid"])
        with proc.oneshot():
            status["rss_bytes"] = proc.memory_info().rss
            times = proc.cpu_times()
            status["cpu_seconds"] = round(times.user + times.system, 3)
        status["cpu_percent"] = proc.cpu_percent(interval=0.1)
    except (psutil.Error, OSError):
        pass  # another pid namespace or host: report what the daemon said
    for name in (
        "keys", "connections", "fsync", "shm_bytes", "live_bytes", "log_bytes", "max_memory",
        "fsync_p50_us", "fsync_p99_us", "commit_p50_us", "commit_p99_us", "avg_batch",
        "last_seqno", "reader", "last_compaction", "table_rebuilds", "last_table_rebuild",
        "table_index_moves", "last_table_index_move",
    ):
        status[name] = stats.get(name)
    return status


def _human(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name.endswith("_bytes") and isinstance(value, int):
        size, unit = float(value), "B"
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if size < 1024 or unit == "TiB":
                break
            size /= 1024
        return f"{size:.1f} {unit}" if unit != "B" else f"{value} B"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _run(args: argparse.Namespace, seams: dict[str, Any]) -> int:
    cmd = args.command
    if cmd == "serve":
        from .config import load_serve_config
        from .daemon.server import run

        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        cfg = load_serve_config(args, os.environ)
        logging.getLogger().setLevel(cfg.log_level.upper())
        log = logging.getLogger("walcache.daemon")
        for line in cfg.describe():
            log.debug("option %s", line)
        return run(cfg, args=args, **seams)
    if cmd == "check-log":
        from .daemon.recovery import check_log
        from .paths import default_data_dir

        ddir = Path(args.dir) if args.dir else default_data_dir()
        if not ddir.is_dir():
            raise ConfigError(f"{ddir} is not a directory")
        report = check_log(ddir, repair=args.repair)  # --repair takes the data-dir lock
        print(report.format())
        return EXIT_OK if report.ok or args.repair else EXIT_ERROR
    if cmd == "drop-shm":
        from .daemon.lock import DataDirLock
        from .paths import default_data_dir, shm_namespace
        from .shm.writer import drop_namespace

        ddir = Path(args.dir) if args.dir else default_data_dir()
        if not ddir.is_dir():
            raise ConfigError(f"{ddir} is not a directory")
        with DataDirLock(ddir):  # DataDirLocked (exit 4) while a daemon runs for it
            removed = drop_namespace(shm_namespace(ddir))
        for name, size in removed:
            print(f"removed {name} ({size} bytes)")
        if not removed:
            print(f"no shared table of {ddir} in /dev/shm")
        return EXIT_OK
    value: Any
    with _client(args) as c:
        if cmd == "get":
            missing = object()
            value = c.get(_key(args), missing)
            if value is missing:
                print(f"not found: {args.key}", file=sys.stderr)
                return EXIT_MISSING
            _print_value(value, args.json)
        elif cmd == "put":
            raw: str | bytes = sys.stdin.buffer.read() if args.value == "-" else args.value
            if args.json:
                try:
                    value = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    what = "stdin" if args.value == "-" else "VALUE"
                    raise ConfigError(f"{what} is not JSON: {exc}") from None
            else:
                value = raw
            c.put(_key(args), value, ttl=args.ttl)
        elif cmd == "delete":
            if not c.delete(_key(args)):
                print(f"not found: {args.key}", file=sys.stderr)
                return EXIT_MISSING
        elif cmd == "keys":
            keys = c.keys_with_prefix(args.prefix) if args.prefix is not None else iter(c)
            for key in keys:
                print(key if isinstance(key, str) else repr(key))
        elif cmd == "stats":
            print(json.dumps(c.stats(), indent=2, sort_keys=True))
        elif cmd == "status":
            status = _status(c.stats())
            if args.json:
                print(json.dumps(status, sort_keys=True))
            else:
                for name, value in status.items():
                    print(f"{name:>18}: {_human(name, value)}")
        elif cmd == "compact":
            print(json.dumps(c.compact(), indent=2, sort_keys=True))
    return EXIT_OK


def main(argv: Sequence[str] | None = None, **seams: Any) -> int:
    """The ``walcache`` command. ``seams`` (``fileops=``, ``shmops=``) reach ``serve``'s daemon:
    tests pass faulty ones to inject I/O errors into a daemon started exactly as the CLI does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, seams)
    except ConfigError as exc:
        print(f"walcache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnavailable as exc:
        print(f"walcache: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except LogCorrupt as exc:
        print(f"walcache: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except WalcacheError as exc:
        print(f"walcache: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        # e.g. a data dir under a regular file, a read-only or a full file system
        logging.getLogger("walcache").debug("the error's traceback", exc_info=True)
        print(f"walcache: {exc}" if exc.filename is not None else f"walcache: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
