# Types of the compiled reader (_creader.c); see walcache.shm.creader.
from collections.abc import Iterable

LAYOUT_VERSION: int
HEADER_SIZE: int
SLOT_SIZE: int
REC_HEADER_SIZE: int
MIN_CAPACITY: int
MAX_KEY_BYTES: int
MAX_SEGMENT_BYTES: int
RETRY_MIN_TRIES: int
RETRY_MIN_NS: int
TOMBSTONE: int
MOVED: int
FP_MASK: int
DATA_MAGIC: bytes
H_VERSION: int
H_GENERATION: int
H_SEGMENT_BYTES: int
H_CAPACITY: int
H_INDEX_OFF: int
H_DATA_OFF: int
H_STALE: int
R_SEQ: int
R_LENS: int
R_EXPIRY_VFLAG: int
R_SEQNO: int

def xxh64(data: bytes | bytearray | memoryview, seed: int = 0, /) -> int: ...
def encode_key(key: object, /) -> bytes: ...

class Reader:
    _no_seqlock: int
    retries: int
    remaps: int
    contended: int
    @property
    def _attached(self) -> bool: ...
    @property
    def _capacity(self) -> int | None: ...
    @property
    def _segment_bytes(self) -> int | None: ...
    @property
    def _generation(self) -> int | None: ...
    @property
    def _stale(self) -> int | None: ...
    @property
    def _slot0(self) -> int | None: ...
    @property
    def _epoch(self) -> int | None: ...
    def lookup(self, key: object, default: object = None, /) -> object: ...
    def get(self, key: bytes, /) -> tuple[int, bytes] | None: ...
    def contains(self, key: bytes, /) -> bool: ...
    def get_many(self, keys: Iterable[object], /) -> dict[object, object]: ...
    def _get_entry(self, key: bytes, /) -> tuple[int, bytes, int, int] | None: ...
    def _attach(self, buffer: object, /) -> None: ...
    def _map(self, name: str, /) -> None: ...
    def _detach(self) -> None: ...
    def _scan(self, start: int, count: int, /) -> tuple[list[tuple[bytes, int, bytes, int, int]], int, int]: ...

# The table builder (ShmTable.build's compiled path; the pure-Python reference is in writer.py).
def build_measure(
    entries: dict[bytes, tuple[int, bytes, int, int]] | list[tuple[bytes, int, bytes, int, int]], now_ms: int, /
) -> tuple[int, int, int]: ...
def build_fill(
    buf: object,
    entries: dict[bytes, tuple[int, bytes, int, int]] | list[tuple[bytes, int, bytes, int, int]],
    capacity: int,
    data_off: int,
    data_words: int,
    now_ms: int,
    /,
) -> tuple[int, int, int]: ...
def mark_moved(slots: memoryview, /) -> None: ...
def copy_live(
    old: object,
    new: object,
    old_slot0: int,
    old_capacity: int,
    old_lo: int,
    new_capacity: int,
    new_top: int,
    now_ms: int,
    /,
) -> tuple[int, int, int]: ...
def fill_index(buf: object, old_slot0: int, old_capacity: int, new_slot0: int, new_capacity: int, lo: int, /) -> int: ...
