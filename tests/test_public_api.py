"""The public surface is pinned: changing it is a deliberate act."""

from __future__ import annotations

import inspect

import walcache
from walcache import errors


def test_all_is_exactly_the_public_api() -> None:
    assert sorted(walcache.__all__) == sorted([
        "__version__", "Client", "connect", "WalcacheError", "ConfigError", "InvalidKey",
        "InvalidValue", "KeyTooLarge", "ValueTooLarge", "CacheFull", "ProtocolError",
        "DaemonUnavailable", "WalcacheTimeout", "ReadContention", "TableUnavailable",
        "ServerError", "StorageError", "DataDirLocked", "LogCorrupt", "LogFailed",
        "LogFull",
    ])
    for name in walcache.__all__:
        assert getattr(walcache, name) is not None


def test_every_error_derives_from_walcache_error() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if inspect.isclass(obj):
            assert issubclass(obj, walcache.WalcacheError), name


def test_every_wire_code_round_trips_to_its_class() -> None:
    for code, cls in errors.WIRE_CODES.items():
        exc = errors.error_from_wire(code, "msg")
        assert type(exc) is cls and errors.wire_code(exc) == code


def test_client_method_names_match_the_architecture() -> None:
    for name in ("put", "get", "delete", "get_many", "put_many", "delete_many", "stats",
                 "compact", "close", "__enter__", "__exit__", "__getitem__", "__setitem__",
                 "__delitem__", "__contains__", "__len__", "__iter__"):
        assert callable(getattr(walcache.Client, name)), name
    params = inspect.signature(walcache.Client.put).parameters
    assert list(params) == ["self", "key", "value", "ttl"] and params["ttl"].default is None
    assert list(inspect.signature(walcache.Client.get).parameters) == ["self", "key", "default"]
    assert "socket_path" in inspect.signature(walcache.Client).parameters
    assert py_typed_is_shipped()


def py_typed_is_shipped() -> bool:
    import importlib.resources

    return importlib.resources.files("walcache").joinpath("py.typed").is_file()
