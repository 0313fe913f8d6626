/*
 * walcache.shm._creader: the compiled reader of the shared table.
 *
 * It follows, step by step, the layout and the reader protocol (R1..R7) written once in
 * walcache/shm/layout.py; nothing here defines the format. The constants below mirror
 * layout.py and walcache.shm.creader refuses this module when LAYOUT_VERSION differs
 * (a test pins every constant against layout.py).
 *
 * Memory ordering (Boehm, "Can seqlocks get along with programming language memory
 * models?"; the kernel's read_seqcount_begin / read_seqcount_retry):
 *   - the record's seq is read with an acquire load (R3), so no read of the record can
 *     be hoisted above it, on any architecture;
 *   - every other shared word is read once, with a relaxed atomic load, into a local,
 *     and only the local is used (a garbage length cannot change between its bounds
 *     check and its use);
 *   - key and value bytes are compared and copied with memcmp/memcpy inside the read
 *     section: they may race with the writer, but nothing derived from them is trusted
 *     before the seq is re-read;
 *   - an acquire fence precedes the re-read of the seq (R5), so every read of the
 *     section is ordered before it.
 * On x86-64 all of this compiles to plain moves; on aarch64 the same source emits the
 * barriers a load side needs. The store side is the daemon's Python writer, which cannot
 * order its stores off x86-64: there walcache.shm.creader.open_reader does not use this
 * reader (see layout.py, "Hardware assumptions").
 *
 * Which segment to read is decided in Python (the subclass in creader.py composes the
 * pure-Python ShmReader: control segment, remapping, writer liveness). This module maps
 * the segment it is told to (_map(name): its own read-only mapping, so the ShmReader can
 * unmap its own whenever it likes) and calls back into Python when a get meets MOVED or
 * keeps racing the writer past the retry bounds (_remap, _contended), then goes on with
 * whatever mapping is installed when the hook returns. A new mapping is validated
 * completely before it replaces the old one, so another thread never sees the reader
 * between two segments. _attach(buffer) follows any buffer instead (tests, ASan fuzz).
 *
 * The GIL is held for every access to the mapping. Python code that can run in between
 * (a hook, codec.encode_key for unusual key types, msgpack) is only ever called while
 * no pointer into the mapping is live, and the geometry is reloaded after it: another
 * thread may have installed a new mapping meanwhile (and unmapped the old one).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if ATOMIC_LLONG_LOCK_FREE != 2
/* A lock-based 64-bit atomic is process-private and may write to the read-only map. */
#error "walcache._creader needs lock-free 64-bit atomic loads"
#endif

/* ---- layout constants (walcache/shm/layout.py; any change there bumps the version) ---- */

#ifdef WALCACHE_TEST_LAYOUT_VERSION
/* Only the tests define this: a build for another layout must be refused at import. */
#define LAYOUT_VERSION WALCACHE_TEST_LAYOUT_VERSION
#else
#define LAYOUT_VERSION 3
#endif
#define HEADER_SIZE 256
#define SLOT_SIZE 8
#define REC_HEADER_SIZE 32
#define REC_HEADER_WORDS 4
#define MIN_CAPACITY 8
#define MAX_KEY_BYTES 65535
#define MAX_SEGMENT_BYTES ((UINT64_C(1) << 35) - 64)
#define SLOT_EMPTY UINT64_C(0)
#define SLOT_TOMBSTONE (UINT64_C(1) << 32)
#define SLOT_MOVED UINT64_MAX
#define FP_MASK UINT64_C(0xFFFFFFFF00000000)
#define LOC_MASK UINT64_C(0xFFFFFFFF)
#define RETRY_MIN_TRIES 64
#define RETRY_MIN_NS 1000000

/* header word indices */
#define H_VERSION 1
#define H_GENERATION 2
#define H_SEGMENT_BYTES 4
#define H_CAPACITY 5
#define H_INDEX_OFF 6
#define H_DATA_OFF 7
#define H_STALE 10
#define H_INDEX 12 /* the current index: log2(capacity) << 32 | slot0 */
/* record word offsets */
#define R_SEQ 0
#define R_LENS 1
#define R_EXPIRY_VFLAG 2
#define R_SEQNO 3

static const char DATA_MAGIC[8] = {'W', 'A', 'L', 'C', 'T', 'B', 'L', '\0'};

typedef _Atomic uint64_t aword;

static inline uint64_t
load_relaxed(const aword *p)
{
    return atomic_load_explicit((aword *)p, memory_order_relaxed);
}

static inline uint64_t
load_acquire(const aword *p)
{
    return atomic_load_explicit((aword *)p, memory_order_acquire);
}

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#if defined(__GNUC__)
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
#define PREFETCH_W(p) __builtin_prefetch((const void *)(p), 1, 3)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define PREFETCH(p) ((void)0)
#define PREFETCH_W(p) ((void)0)
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#endif

static uint64_t
clock_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The writer's clock for expiry: layout.now_ms() is int(time.time() * 1000). */
static uint64_t
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- XXH64 (Yann Collet's specification, xxhash doc/xxhash_spec.md), written here ---- */

#define P64_1 UINT64_C(0x9E3779B185EBCA87)
#define P64_2 UINT64_C(0xC2B2AE3D27D4EB4F)
#define P64_3 UINT64_C(0x165667B19E3779F9)
#define P64_4 UINT64_C(0x85EBCA77C2B2AE63)
#define P64_5 UINT64_C(0x27D4EB2F165667C5)

static inline uint64_t
rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

/* The specification reads little-endian words whatever the host order. */
static inline uint64_t
read64le(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t
read32le(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t
xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * P64_2;
    acc = rotl64(acc, 31);
    return acc * P64_1;
}

static inline uint64_t
xxh_merge(uint64_t acc, uint64_t val)
{
    acc ^= xxh_round(0, val);
    return acc * P64_1 + P64_4;
}

static uint64_t
xxh64(const uint8_t *p, size_t len, uint64_t seed)
{
    const uint8_t *end = p + len;
    uint64_t h;

    if (len >= 32) {
        const uint8_t *limit = end - 32;
        uint64_t v1 = seed + P64_1 + P64_2;
        uint64_t v2 = seed + P64_2;
        uint64_t v3 = seed;
        uint64_t v4 = seed - P64_1;
        do {
            v1 = xxh_round(v1, read64le(p));
            v2 = xxh_round(v2, read64le(p + 8));
            v3 = xxh_round(v3, read64le(p + 16));
            v4 = xxh_round(v4, read64le(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    }
    else {
        h = seed + P64_5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        h ^= xxh_round(0, read64le(p));
        h = rotl64(h, 27) * P64_1 + P64_4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)read32le(p) * P64_1;
        h = rotl64(h, 23) * P64_2 + P64_3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P64_5;
        h = rotl64(h, 11) * P64_1;
        p++;
    }
    h ^= h >> 33;
    h *= P64_2;
    h ^= h >> 29;
    h *= P64_3;
    h ^= h >> 32;
    return h;
}

/* ---- module state ---- */

static PyObject *ReadContention;   /* walcache.errors.ReadContention */
static PyObject *TableUnavailable; /* walcache.errors.TableUnavailable */
static PyObject *encode_key_fn;    /* walcache.codec.encode_key (unusual key types) */
static PyObject *unpackb_fn;       /* msgpack.unpackb */
static PyObject *unpack_kwnames;   /* ("raw", "strict_map_key") */
static PyObject *str_remap;        /* "_remap" */
static PyObject *str_contended;    /* "_contended" */

/* ---- the reader object ---- */

#define ATTACHED_NONE 0
#define ATTACHED_MAP 1    /* our own mapping of a shared-memory segment (_map) */
#define ATTACHED_BUFFER 2 /* a buffer exported by a Python object (_attach) */

typedef struct {
    PyObject_HEAD
    int attached;
    Py_buffer view;        /* ATTACHED_BUFFER */
    void *map_addr;        /* ATTACHED_MAP */
    size_t map_len;
    const uint8_t *base;
    const aword *Q;        /* the segment as words */
    uint64_t seg_bytes;    /* header segment_bytes (<= view.len) */
    uint64_t mask;         /* capacity - 1 */
    uint64_t slot0;        /* word index of slot 0 */
    uint64_t lo, span;     /* candidate record words: lo <= w < lo + span, so Q[w..w+3] exist */
    uint64_t generation;
    int no_seqlock;        /* test only: skip R5/R6, to prove the torture test catches tears */
    int use_cache;         /* the result cache below (on by default; tests and bench switch it) */
    struct cache_entry *cache; /* CACHE_SETS * CACHE_WAYS entries, allocated on first store */
    uint64_t *door;        /* DOOR_BITS bits: keys that missed once since the last reset */
    unsigned door_marks;   /* bits set since the last reset */
    unsigned window_evictions, window_hits; /* since the last judgement */
    unsigned bypass;       /* gets left that skip the cache: it was not paying */
    uint64_t epoch;        /* +1 at every install/detach: a result decoded under an older
                            * mapping must not be stored for the new one */
    unsigned long long retries;   /* failed validations */
    unsigned long long remaps;    /* _remap calls */
    unsigned long long contended; /* _contended calls */
    unsigned long long cache_hits; /* lookups answered from the result cache */
} Reader;

/* A user key's encoded form (tag byte, payload) without copying it, where the key object
 * holds the payload: exact bytes, and exact str in compact ASCII form (its UTF-8 is its
 * data). Otherwise the key is encoded into a keybuf and the view points there. */
typedef struct {
    uint8_t tag;
    const uint8_t *p;
    Py_ssize_t n; /* payload bytes: the encoded key is n + 1 */
} keyview;

static inline int
key_view(PyObject *key, keyview *v)
{
    PyTypeObject *t = Py_TYPE(key);
    if (t == &PyBytes_Type) {
        v->tag = 'b';
        v->p = (const uint8_t *)PyBytes_AS_STRING(key);
        v->n = PyBytes_GET_SIZE(key);
        return 1;
    }
    if (t == &PyUnicode_Type && PyUnicode_IS_COMPACT_ASCII(key)) {
        v->tag = 's';
        v->p = (const uint8_t *)PyUnicode_DATA(key);
        v->n = PyUnicode_GET_LENGTH(key);
        return 1;
    }
    return 0;
}

/* ---- the result cache ----
 *
 * A hot key's get costs more in finding and building its result (the key hash, the
 * probe, a new bytes or str object, or a msgpack call) than in the memory it reads. So
 * each reader keeps, per hot key, where its record is and the object decoded from it:
 * an entry (encoded key, w, s, value) says "this key's live record is at word w, whose
 * seq was s when value was decoded from it". While the record still reads seq s, the
 * entry is right, because the writer changes a chunk's seq whenever its meaning changes
 * (layout.py): rewriting it in place (W1/W3), and freeing it when the key moves to
 * another chunk or is deleted (W5: s + 2, after the slot no longer points to it); and a
 * seq never repeats within a segment. A stale segment (growth, compaction, a new daemon)
 * is never written again, so the header's stale flag is checked too: then the full
 * protocol runs, meets MOVED and remaps, and a remap empties the cache.
 *
 * A hit reads the header's stale flag (one line shared by all gets), the record's seq
 * (one line), the entry (one line) and the value's refcount: no hash of the key beyond
 * Python's own (cached in str and bytes objects), no probe, no copy. A record stored
 * with an expiry also has that read, between two reads of the seq (the seqlock, as in
 * R3..R5); an expired entry is left to the full protocol.
 *
 * An entry is only stored from a read that proved the record live: after R5, the slot
 * that led to it still held the same word (read after the seq, so a chunk freed and
 * bumped before our R3 is never taken for the key's current record). Only immutable
 * results are kept (bytes, str, int, float, bool, None): a list or dict would be shared
 * between callers. The cache belongs to one mapping: emptied at every install and detach
 * (an epoch guards a decode during which another thread remapped). Its size bounds what
 * it pins: CACHE_SETS * CACHE_WAYS values of at most CACHE_MAX_VALUE bytes, about
 * 4.3 MiB per reader, and 256 KiB of entries. */
#define CACHE_SETS 2048 /* a power of two */
#define CACHE_SET_BITS 11
#define CACHE_WAYS 2    /* way 0 is the most recently used */
_Static_assert(CACHE_WAYS == 2, "cache_validate and cache_store handle exactly two ways");
#define CACHE_MAX_VALUE 1024
#define CACHE_MAX_KEY 38 /* encoded key bytes an entry holds: the entry is one 64-byte line */
/* Admission: a key enters the cache on its second miss within a window, so that a stream
 * of keys read once (a scan, a uniform spread over far more keys than the cache holds)
 * neither evicts the hot ones nor pays for entries never used again. The window is one
 * bit per key hash (8 KiB, stays in the CPU cache), all cleared after DOOR_RESET marks.
 * The same bit gates the lookup: a key whose bit is clear is not looked for in the cache,
 * so a get of a cold key does not pay two more cache misses for the entry lines (a hot
 * key loses one hit after each reset, which marks it again). */
/* Every CACHE_JUDGE_EVICTIONS evictions the cache is judged: when it answered fewer gets
 * than it evicted entries since the last judgement, the reads have no hot set it can hold
 * (keys spread evenly over far more than it holds), and each get pays for entry lines and
 * stores that buy nothing; then the next CACHE_BYPASS gets skip it altogether and cost
 * what they cost without it (its entries stay, and it is judged again after). */
#define CACHE_JUDGE_EVICTIONS 256
#define CACHE_BYPASS 262144
#define DOOR_SHIFT 16
#define DOOR_BITS (1 << DOOR_SHIFT)
#define DOOR_RESET (DOOR_BITS / 2)

struct cache_entry {
    uint64_t w;      /* record word; 0 = empty (no record starts at word 0) */
    uint64_t seq;    /* its even seq when the value was decoded */
    PyObject *value; /* owned */
    uint8_t klen;    /* encoded key length */
    uint8_t expires; /* the record had an expiry when the value was decoded */
    uint8_t key[CACHE_MAX_KEY];
};

/* a[0..n) == b[0..n) for the short keys an entry holds (1 <= n <= CACHE_MAX_KEY), inline:
 * a libc memcmp call costs more than the compare. Overlapping 8-byte loads cover n >= 8. */
static inline int
short_key_eq(const uint8_t *a, const uint8_t *b, size_t n)
{
    uint64_t x, y;
    if (n >= 8) {
        size_t i = 0;
        for (; i + 8 < n; i += 8) {
            memcpy(&x, a + i, 8);
            memcpy(&y, b + i, 8);
            if (x != y)
                return 0;
        }
        memcpy(&x, a + n - 8, 8);
        memcpy(&y, b + n - 8, 8);
        return x == y;
    }
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

_Static_assert(sizeof(struct cache_entry) == 64, "an entry is one cache line");

static inline int
door_bit(Py_hash_t ph, uint64_t *mask)
{
    uint64_t bit = ((uint64_t)ph * UINT64_C(0xC2B2AE3D27D4EB4F)) >> (64 - DOOR_SHIFT);
    *mask = UINT64_C(1) << (bit & 63);
    return (int)(bit >> 6);
}

/* Whether the entry lines are worth reading for this key (see DOOR_BITS). */
static inline int
cache_may_hold(Reader *r, Py_hash_t ph)
{
    uint64_t mask;
    return r->cache != NULL && ph != -1 && (r->door[door_bit(ph, &mask)] & mask) != 0;
}

static inline struct cache_entry *
cache_set(Reader *r, Py_hash_t ph)
{
    return &r->cache[(((uint64_t)ph * UINT64_C(0x9E3779B97F4A7C15)) >> (64 - CACHE_SET_BITS)) * CACHE_WAYS];
}

/* Python's hash of a key whose type the cache serves (cached in str and bytes objects),
 * or -1: no cache for this key. */
static inline Py_hash_t
cache_hash(Reader *r, PyObject *key, Py_ssize_t klen)
{
    if (!r->use_cache || r->no_seqlock || klen > CACHE_MAX_KEY)
        return -1;
    if (r->bypass != 0) {
        r->bypass--;
        return -1;
    }
    PyTypeObject *t = Py_TYPE(key);
    if (t != &PyUnicode_Type && t != &PyBytes_Type && t != &PyLong_Type)
        return -1;
    Py_hash_t ph = PyObject_Hash(key); /* never fails for these types */
    if (ph == -1)
        PyErr_Clear();
    return ph;
}

/* The entry for the key v, or NULL. Valid until Python code runs (a remap, in any
 * thread, frees the entries). */
static inline struct cache_entry *
cache_match(Reader *r, Py_hash_t ph, const keyview *v)
{
    if (!cache_may_hold(r, ph) || UNLIKELY(!r->attached))
        return NULL;
    struct cache_entry *e = cache_set(r, ph);
    Py_ssize_t klen = v->n + 1;
    if (e[0].klen == klen && e[0].key[0] == v->tag && short_key_eq(e[0].key + 1, v->p, (size_t)v->n))
        return &e[0];
    if (e[1].klen == klen && e[1].key[0] == v->tag && short_key_eq(e[1].key + 1, v->p, (size_t)v->n))
        return &e[1];
    return NULL;
}

/* A new reference to the cached value of entry e (from cache_match), or NULL: the entry
 * is no longer its key's live record, or the key expired (the caller runs the full
 * protocol, which decides). promote: move a hit in way 1 to way 0, which moves the other
 * entry of the set: only when no other pointer into the set is held. */
static inline PyObject *
cache_validate(Reader *r, struct cache_entry *e, int promote)
{
    const aword *Q = r->Q;
    const uint64_t w = e->w; /* bounds-checked by the read that stored it, in this mapping */
    if (load_acquire(&Q[H_STALE]) != 0)
        return NULL;
    uint64_t s1 = load_acquire(&Q[w + R_SEQ]);
    if (s1 != e->seq)
        return NULL;
    /* The expiry belongs to the record's version: while the seq still reads e->seq, the
     * record has the expiry it had when the entry was stored, and one without is done. */
    if (e->expires) {
        uint64_t xv = load_relaxed(&Q[w + R_EXPIRY_VFLAG]);
        atomic_thread_fence(memory_order_acquire);
        if (load_relaxed(&Q[w + R_SEQ]) != s1)
            return NULL;
        uint64_t expiry = xv >> 8;
        if (expiry != 0 && expiry <= now_ms())
            return NULL;
    }
    size_t way = (size_t)(e - r->cache) % CACHE_WAYS;
    if (promote && way != 0) { /* keep the most recently used in way 0 */
        struct cache_entry t = e[-1];
        e[-1] = e[0];
        e[0] = t;
        e -= 1;
    }
    r->cache_hits++;
    r->window_hits++;
    return Py_NewRef(e->value);
}

static int
cacheable(PyObject *v, uint64_t vlen)
{
    if (vlen > CACHE_MAX_VALUE)
        return 0;
    PyTypeObject *t = Py_TYPE(v);
    return t == &PyBytes_Type || t == &PyUnicode_Type || t == &PyLong_Type || t == &PyFloat_Type ||
           t == &PyBool_Type || v == Py_None;
}

/* Remember v as the value of kb, read from record w at seq under r->epoch == epoch.
 * Dropping an evicted entry frees only immutable built-ins: no Python code runs here.
 * The epoch test is what keeps (w, seq) of one mapping out of another's cache. Today a
 * remap also frees the admission bits, so such a store would only mark its key (no test
 * can reach the entry write without it); the epoch test does not rely on that. */
static void
cache_store(Reader *r, uint64_t epoch, Py_hash_t ph, const uint8_t *kb, Py_ssize_t klen, uint64_t w,
            uint64_t seq, uint64_t expiry, PyObject *v, uint64_t vlen)
{
    if (ph == -1 || epoch != r->epoch || !r->attached || !cacheable(v, vlen))
        return;
    if (r->cache == NULL) {
        size_t n = CACHE_SETS * CACHE_WAYS * sizeof(struct cache_entry);
        r->cache = aligned_alloc(64, n);
        r->door = calloc(DOOR_BITS / 64, sizeof(uint64_t));
        if (r->cache == NULL || r->door == NULL) { /* an optimisation: no memory, no cache */
            free(r->cache);
            free(r->door);
            r->cache = NULL;
            r->door = NULL;
            return;
        }
        memset(r->cache, 0, n);
        r->door_marks = 0;
    }
    uint64_t mask;
    int word = door_bit(ph, &mask);
    if (!(r->door[word] & mask)) {
        r->door[word] |= mask;
        if (++r->door_marks >= DOOR_RESET) {
            memset(r->door, 0, DOOR_BITS / 8);
            r->door_marks = 0;
        }
        return;
    }
    struct cache_entry *e = cache_set(r, ph);
    int same0 = e[0].klen == klen && short_key_eq(e[0].key, kb, (size_t)klen);
    int same1 = !same0 && e[1].klen == klen && short_key_eq(e[1].key, kb, (size_t)klen);
    PyObject *old = same0 ? e[0].value : e[1].value;
    if (!same0 && !same1 && old != NULL) { /* another key's entry goes */
        if (++r->window_evictions >= CACHE_JUDGE_EVICTIONS) {
            if (r->window_hits < r->window_evictions)
                r->bypass = CACHE_BYPASS;
            r->window_evictions = r->window_hits = 0;
        }
    }
    if (!same0) /* way 0 takes the new entry; the old way 0 becomes way 1, way 1 goes */
        e[1] = e[0];
    e[0].w = w;
    e[0].seq = seq;
    e[0].value = Py_NewRef(v);
    e[0].klen = (uint8_t)klen;
    e[0].expires = expiry != 0;
    memcpy(e[0].key, kb, (size_t)klen);
    Py_XDECREF(old);
}

static void
cache_clear(Reader *r)
{
    r->epoch++;
    if (r->cache == NULL)
        return;
    struct cache_entry *c = r->cache;
    r->cache = NULL;
    free(r->door);
    r->door = NULL;
    for (size_t i = 0; i < CACHE_SETS * CACHE_WAYS; i++)
        Py_XDECREF(c[i].value);
    free(c);
}

static void
reader_detach(Reader *r)
{
    int was = r->attached;
    cache_clear(r);
    r->attached = ATTACHED_NONE;
    r->base = NULL;
    r->Q = NULL;
    if (was == ATTACHED_BUFFER)
        PyBuffer_Release(&r->view);
    else if (was == ATTACHED_MAP)
        munmap(r->map_addr, r->map_len);
}

static PyObject *
reader_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Reader *r = (Reader *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->attached = 0;
    r->use_cache = 1;
    return (PyObject *)r;
}

static void
reader_dealloc(Reader *r)
{
    PyObject_GC_UnTrack(r);
    reader_detach(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int
reader_traverse(Reader *r, visitproc visit, void *arg)
{
    if (r->attached == ATTACHED_BUFFER)
        Py_VISIT(r->view.obj);
    return 0;
}

static int
reader_clear(Reader *r)
{
    reader_detach(r);
    return 0;
}

static PyObject *
table_error(const char *what, unsigned long long a, unsigned long long b)
{
    PyErr_Format(TableUnavailable,
                 "the shared table's header is not one this reader can follow "
                 "(%s: %llu, %llu); restart the daemon or upgrade walcache",
                 what, a, b);
    return NULL;
}

typedef struct {
    uint64_t seg_bytes, mask, slot0, lo, span, generation;
} geometry;

/* Check the header of a segment of len bytes at base; 0 and g filled, or -1 and
 * TableUnavailable set. Header words 0..127 do not change after publication (except
 * stale/closed), so they are read once, here. */
static int
check_geometry(const uint8_t *base, uint64_t len, geometry *g)
{
    if (len < HEADER_SIZE || ((uintptr_t)base & 7) != 0) {
        table_error("mapping size, alignment", len, (uintptr_t)base & 7);
        return -1;
    }
    const aword *Q = (const aword *)base;
    uint64_t w0 = load_relaxed(&Q[0]);
    uint64_t version = load_relaxed(&Q[H_VERSION]);
    uint64_t seg_bytes = load_relaxed(&Q[H_SEGMENT_BYTES]);
    uint64_t capacity = load_relaxed(&Q[H_CAPACITY]);
    uint64_t index_off = load_relaxed(&Q[H_INDEX_OFF]);
    uint64_t data_off = load_relaxed(&Q[H_DATA_OFF]);
    /* One load: an index move (layout.py "Index moves") rewrites this word alone. */
    uint64_t index = load_acquire(&Q[H_INDEX]);
    if (memcmp(&w0, DATA_MAGIC, 8) != 0 || version != LAYOUT_VERSION) {
        table_error("magic or layout version", w0, version);
        return -1;
    }
    if (seg_bytes > len || seg_bytes > MAX_SEGMENT_BYTES || (seg_bytes & 7) != 0) {
        table_error("segment bytes, mapping size", seg_bytes, len);
        return -1;
    }
    if (capacity < MIN_CAPACITY || (capacity & (capacity - 1)) != 0 || capacity > seg_bytes / SLOT_SIZE) {
        table_error("capacity, segment bytes", capacity, seg_bytes);
        return -1;
    }
    if (index_off != HEADER_SIZE || data_off < index_off + capacity * SLOT_SIZE || (data_off & 7) != 0 ||
        data_off / 8 + REC_HEADER_WORDS > seg_bytes / 8) {
        table_error("index offset, data offset", index_off, data_off);
        return -1;
    }
    /* The current index: as layout.index_geometry checks it. */
    uint64_t log2 = index >> 32, slot0 = index & LOC_MASK;
    if (log2 < 3 || log2 > 32 || slot0 < HEADER_SIZE / 8 || slot0 + (UINT64_C(1) << log2) > seg_bytes / 8) {
        table_error("index word, segment bytes", index, seg_bytes);
        return -1;
    }
    g->seg_bytes = seg_bytes;
    g->mask = (UINT64_C(1) << log2) - 1;
    g->slot0 = slot0;
    g->lo = data_off / 8;
    /* w + 4 <= segment_bytes / 8, i.e. the whole record header is inside the segment */
    g->span = seg_bytes / 8 - REC_HEADER_WORDS + 1 - g->lo;
    g->generation = load_relaxed(&Q[H_GENERATION]);
    return 0;
}

static void
install(Reader *r, const uint8_t *base, const geometry *g)
{
    cache_clear(r);
    r->base = base;
    r->Q = (const aword *)base;
    r->seg_bytes = g->seg_bytes;
    r->mask = g->mask;
    r->slot0 = g->slot0;
    r->lo = g->lo;
    r->span = g->span;
    r->generation = g->generation;
}

/* _attach(buffer): follow the data segment held in any buffer (tests: a bytes copy). */
static PyObject *
reader_attach(Reader *r, PyObject *buf)
{
    Py_buffer view;
    geometry g;
    if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (check_geometry((const uint8_t *)view.buf, (uint64_t)view.len, &g) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    reader_detach(r);
    r->view = view;
    install(r, (const uint8_t *)view.buf, &g);
    r->attached = ATTACHED_BUFFER;
    Py_RETURN_NONE;
}

/* _map(name): map the named shared-memory segment read-only and follow it. The old
 * mapping stays installed until the new one is validated. Raises FileNotFoundError when
 * the name is gone (unlinked since it was read: a newer table is current), or
 * TableUnavailable when the segment is not one this reader can follow. */
static PyObject *
reader_map(Reader *r, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    int fd = shm_open(name, O_RDONLY, 0);
    if (fd < 0)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
    struct stat st;
    if (fstat(fd, &st) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
        close(fd);
        return NULL;
    }
    uint64_t len = (uint64_t)st.st_size;
    if (len < HEADER_SIZE || len > MAX_SEGMENT_BYTES) {
        close(fd);
        return table_error("segment size, limit", len, MAX_SEGMENT_BYTES);
    }
    void *addr = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (addr == MAP_FAILED) {
        /* Most likely ENOMEM under an address-space limit (ulimit -v): the segment
         * reserves address space for twice --max-memory of data. TableUnavailable lets
         * the client read through the daemon instead. */
        PyErr_Format(TableUnavailable,
                     "cannot map the shared table %S (%llu bytes of address space): %s; under an "
                     "address-space limit (ulimit -v) raise it or give the daemon a smaller "
                     "--shm-reserve (0: none)",
                     arg, (unsigned long long)len, strerror(err));
        return NULL;
    }
    geometry g;
    if (check_geometry((const uint8_t *)addr, len, &g) < 0) {
        munmap(addr, (size_t)len);
        return NULL;
    }
    reader_detach(r);
    r->map_addr = addr;
    r->map_len = (size_t)len;
    install(r, (const uint8_t *)addr, &g);
    r->attached = ATTACHED_MAP;
    Py_RETURN_NONE;
}

static PyObject *
reader_detach_meth(Reader *r, PyObject *unused)
{
    reader_detach(r);
    Py_RETURN_NONE;
}

/* ---- encoded keys ---- */

#define KEY_STACK 256

typedef struct {
    uint8_t stack[KEY_STACK];
    uint8_t *p;       /* the encoded key: tag byte + payload */
    Py_ssize_t n;
    uint8_t *heap;    /* PyMem buffer when the key does not fit the stack */
} keybuf;

static void
keybuf_free(keybuf *k)
{
    if (k->heap != NULL) {
        PyMem_Free(k->heap);
        k->heap = NULL;
    }
}

static int
keybuf_set(keybuf *k, uint8_t tag, const char *payload, Py_ssize_t n)
{
    k->heap = NULL;
    if (n + 1 <= KEY_STACK) {
        k->p = k->stack;
    }
    else {
        k->heap = PyMem_Malloc((size_t)n + 1);
        if (k->heap == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        k->p = k->heap;
    }
    k->p[0] = tag;
    if (n >= 8 && n <= 32) {
        /* A short key inline (a libc call costs more than the copy): 8-byte words, the
         * last one overlapping, all inside both buffers. */
        uint64_t x;
        for (Py_ssize_t i = 0; i + 8 < n; i += 8) {
            memcpy(&x, payload + i, 8);
            memcpy(k->p + 1 + i, &x, 8);
        }
        memcpy(&x, payload + n - 8, 8);
        memcpy(k->p + 1 + n - 8, &x, 8);
    }
    else {
        memcpy(k->p + 1, payload, (size_t)n);
    }
    k->n = n + 1;
    return 0;
}

/* The view of an encoded key held in k. */
static inline void
keyview_of(const keybuf *k, keyview *v)
{
    v->tag = k->p[0];
    v->p = k->p + 1;
    v->n = k->n - 1;
}

/* The stored form of a user key, exactly walcache.codec.encode_key: the exact types
 * inline, anything else (subclasses, bytearray, bool, which is refused) via the codec. */
static int
encode_user_key(PyObject *key, keybuf *k)
{
    if (PyUnicode_CheckExact(key)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(key, &n);
        if (s != NULL)
            return keybuf_set(k, 's', s, n);
        /* Not UTF-8 encodable (a lone surrogate): the codec raises InvalidKey. */
        PyErr_Clear();
        goto via_codec;
    }
    if (PyBytes_CheckExact(key))
        return keybuf_set(k, 'b', PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
    if (PyLong_CheckExact(key)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (!overflow) {
            char digits[24];
            char *e = digits + sizeof(digits);
            char *d = e;
            unsigned long long u = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;
            do {
                *--d = (char)('0' + u % 10);
                u /= 10;
            } while (u);
            if (v < 0)
                *--d = '-';
            return keybuf_set(k, 'i', d, e - d);
        }
        PyObject *s = PyObject_Str(key);
        if (s == NULL) {
            /* Past sys.get_int_max_str_digits(): the codec raises InvalidKey. */
            PyErr_Clear();
            goto via_codec;
        }
        Py_ssize_t n;
        const char *u8 = PyUnicode_AsUTF8AndSize(s, &n);
        int rc = u8 == NULL ? -1 : keybuf_set(k, 'i', u8, n);
        Py_DECREF(s);
        return rc;
    }
via_codec:;
    PyObject *b = PyObject_CallOneArg(encode_key_fn, key);
    if (b == NULL)
        return -1;
    if (!PyBytes_Check(b) || PyBytes_GET_SIZE(b) < 1) {
        Py_DECREF(b);
        PyErr_SetString(PyExc_TypeError, "walcache.codec.encode_key did not return a tagged key");
        return -1;
    }
    int rc = keybuf_set(k, PyBytes_AS_STRING(b)[0], PyBytes_AS_STRING(b) + 1, PyBytes_GET_SIZE(b) - 1);
    Py_DECREF(b);
    return rc;
}

/* ---- the read protocol ---- */

#define WANT_NOTHING 0 /* contains(): validate only */
#define WANT_BYTES 1   /* get(): (vflag, bytes) */
#define WANT_VALUE 2   /* lookup(): the decoded value */

#define VALUE_STACK 512

typedef struct {
    int want;
    uint8_t vflag;
    uint64_t vlen;
    uint64_t seqno;
    uint64_t expiry_ms;
    PyObject *bytes;          /* owned: the value copied straight into a bytes object */
    uint64_t w, seq;          /* on FOUND: the record and its validated seq */
    int live;                 /* on FOUND: the slot still named w after the read (cacheable) */
    uint8_t *buf;             /* str values: copied here, decoded after validation */
    uint8_t *heap;
    size_t heap_cap;
    uint8_t stack[VALUE_STACK];
} copy_out;

static void
copy_init(copy_out *o, int want)
{
    o->want = want;
    o->bytes = NULL;
    o->buf = NULL;
    o->heap = NULL;
    o->heap_cap = 0;
}

static void
copy_free(copy_out *o)
{
    Py_CLEAR(o->bytes);
    if (o->heap != NULL) {
        PyMem_Free(o->heap);
        o->heap = NULL;
    }
}

/* Copy vlen value bytes from the mapping (inside the read section). Allocation sizes come
 * from unvalidated lengths, but only after the bounds check against the segment. */
static int
copy_value(copy_out *o, const uint8_t *src, uint64_t vlen, uint8_t vflag)
{
    if (o->want == WANT_VALUE && vflag == 2) {
        Py_CLEAR(o->bytes);
        if (vlen <= VALUE_STACK) {
            o->buf = o->stack;
        }
        else {
            if (o->heap_cap < vlen) {
                PyMem_Free(o->heap);
                o->heap = PyMem_Malloc((size_t)vlen);
                o->heap_cap = o->heap == NULL ? 0 : (size_t)vlen;
                if (o->heap == NULL) {
                    PyErr_NoMemory();
                    return -1;
                }
            }
            o->buf = o->heap;
        }
        memcpy(o->buf, src, (size_t)vlen);
        return 0;
    }
    /* A retry usually copies the same size again: keep the bytes object when unshared. */
    if (o->bytes == NULL || (uint64_t)PyBytes_GET_SIZE(o->bytes) != vlen || Py_REFCNT(o->bytes) != 1) {
        Py_CLEAR(o->bytes);
        o->bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)vlen);
        if (o->bytes == NULL)
            return -1;
    }
    memcpy(PyBytes_AS_STRING(o->bytes), src, (size_t)vlen);
    return 0;
}

typedef struct {
    unsigned tries;
    uint64_t t0;
} backoff_t;

/* Called when a read section failed validation. Returns 0: retry now; 1: the bounds
 * (RETRY_MIN_TRIES tries AND RETRY_MIN_NS) are both passed; ask Python what to do. */
static int
backoff(Reader *r, backoff_t *b)
{
    r->retries++;
    if (b->tries++ == 0)
        b->t0 = clock_ns(CLOCK_MONOTONIC);
    if (b->tries >= RETRY_MIN_TRIES && clock_ns(CLOCK_MONOTONIC) - b->t0 >= RETRY_MIN_NS)
        return 1;
    /* A short spin covers a writer inside a 3-store section; after that the writer
     * was probably descheduled mid-write (measured: over 1 ms): give up the core. */
    if (b->tries < 16)
        cpu_relax();
    else
        sched_yield();
    return 0;
}

/* Ask the Python side to remap (hook "_remap()") or to judge a read that hit the retry
 * bounds ("_contended(encoded_key)": remaps and returns true when the control segment
 * names a newer table, else raises TableUnavailable for a dead writer or ReadContention).
 * 0: start again on the (possibly new) mapping; -1: error set. */
static int
call_hook(Reader *r, PyObject *name, const uint8_t *kb, Py_ssize_t klen)
{
    PyObject *res;
    if (name == str_contended) {
        PyObject *key = PyBytes_FromStringAndSize((const char *)kb, klen);
        if (key == NULL)
            return -1;
        res = PyObject_CallMethodOneArg((PyObject *)r, name, key);
        Py_DECREF(key);
    }
    else {
        res = PyObject_CallMethodNoArgs((PyObject *)r, name);
    }
    if (res == NULL)
        return -1;
    int truth = PyObject_IsTrue(res);
    Py_DECREF(res);
    if (truth < 0)
        return -1;
    if (name == str_contended && !truth) {
        PyErr_SetString(ReadContention, "a shared-memory read kept racing the writer; ask the daemon");
        return -1;
    }
    if (!r->attached) {
        PyErr_SetString(TableUnavailable, "the reader was closed");
        return -1;
    }
    return 0;
}

#define FOUND 1
#define MISSING 0
#define ERROR (-1)

static int
unknown_vflag(Reader *r, uint64_t xv)
{
    PyErr_Format(TableUnavailable, "the shared table holds an unknown value encoding %u: it is corrupt; "
                 "restart the daemon to rebuild it", (unsigned)(xv & 0xFF));
    return ERROR;
}

/* Remaps per get before giving up: each one follows a newer generation, so more than a
 * handful means the control segment keeps naming segments that are already stale. */
#define MAX_REMAPS 16

/* R1..R7 for the encoded key kb (hash h). On FOUND, o holds the validated copy. */
static int
find(Reader *r, const uint8_t *kb, Py_ssize_t klen, uint64_t h, copy_out *o)
{
    backoff_t bo = {0, 0};
    int remaps = 0;
    if (UNLIKELY(!r->attached)) {
        PyErr_SetString(TableUnavailable, "the reader was closed");
        return ERROR;
    }
restart:;
    const aword *Q = r->Q;
    const uint8_t *base = r->base;
    const uint64_t mask = r->mask, slot0 = r->slot0, lo = r->lo, span = r->span;
    const uint64_t seg_bytes = r->seg_bytes;
    const uint64_t f = h & FP_MASK;
    uint64_t i = h & mask; /* R1 */
    uint64_t probes = 0;
    const int check = !r->no_seqlock;

    while (probes <= mask) {
        const aword *slot = &Q[slot0 + i];
        uint64_t x = load_relaxed(slot); /* R2 */
        uint64_t w = x - f;
        if (LIKELY(w - lo < span)) {
            const aword *rec = &Q[w];
            /* The value's lines are fetched while the header's miss is pending, not
             * after it (the copy below would otherwise wait for them one by one). A
             * prefetch never faults, and lines past the segment are harmless hints. */
            PREFETCH(rec + 8);
            PREFETCH(rec + 16);
            uint64_t s1 = load_acquire(&rec[R_SEQ]); /* R3 */
            if (UNLIKELY((s1 & 1) && check))
                goto retry;
            uint64_t m = load_relaxed(&rec[R_LENS]); /* R4 */
            uint64_t xv = load_relaxed(&rec[R_EXPIRY_VFLAG]);
            uint64_t seqno = load_relaxed(&rec[R_SEQNO]);
            uint64_t rk = m >> 32, rv = m & LOC_MASK;
            uint64_t kpos = 8 * w + REC_HEADER_SIZE;
            int in_bounds = kpos + rk + rv <= seg_bytes; /* no overflow: each term < 2**36 */
#ifdef WALCACHE_TEST_DROP_BOUNDS_CHECK
            /* Only scripts/asan_fuzz.sh defines this, to prove its run catches an overrun. */
            in_bounds = 1;
#endif
            int match = in_bounds && rk == (uint64_t)klen && memcmp(base + kpos, kb, (size_t)klen) == 0;
            if (match && o->want != WANT_NOTHING) {
                if (copy_value(o, base + kpos + rk, rv, (uint8_t)(xv & 0xFF)) < 0)
                    return ERROR;
            }
            atomic_thread_fence(memory_order_acquire);
            uint64_t s2 = load_relaxed(&rec[R_SEQ]); /* R5 */
            if (UNLIKELY(s2 != s1 && check))
                goto retry;
            if (UNLIKELY(!in_bounds)) {
                if (!check)
                    goto retry; /* the test-only mode skips the seq, never the bounds */
                /* A stable record that overruns its segment: no race explains it. */
                PyErr_Format(TableUnavailable,
                             "the shared table is corrupt: record at byte %llu claims %llu key and "
                             "%llu value bytes past the segment end; restart the daemon",
                             (unsigned long long)(8 * w), (unsigned long long)rk, (unsigned long long)rv);
                return ERROR;
            }
            if (!match) {
                /* R6: a stale pointer into a chunk reused for another key would make
                 * us skip past the real entry: the slot must still hold x. */
                if (UNLIKELY(load_relaxed(slot) != x && check))
                    goto retry;
                i = (i + 1) & mask;
                probes++;
                continue;
            }
            /* R7: decide on the validated copy only (in the reference reader's order). */
            uint64_t expiry = xv >> 8;
            if (UNLIKELY((xv & 0xFF) > 2))
                return unknown_vflag(r, xv);
            if (expiry != 0 && expiry <= now_ms())
                return MISSING;
            o->vflag = (uint8_t)(xv & 0xFF);
            o->vlen = rv;
            o->w = w;
            o->seq = s1;
            /* After the fence and R5, so after R3: a chunk that was freed (and bumped)
             * before we read its seq no longer has this slot naming it. */
            o->live = check && load_relaxed(slot) == x;
            o->seqno = seqno;
            o->expiry_ms = expiry;
            return FOUND;
        }
        if (x == SLOT_EMPTY)
            return MISSING;
        if (UNLIKELY(x == SLOT_MOVED)) {
            if (++remaps > MAX_REMAPS) {
                PyErr_SetString(TableUnavailable,
                                "the shared table keeps moving: every segment the control segment "
                                "names is already stale; check the daemon");
                return ERROR;
            }
            r->remaps++;
            if (call_hook(r, str_remap, kb, klen) < 0)
                return ERROR;
            bo.tries = 0;
            goto restart;
        }
        i = (i + 1) & mask;
        probes++;
        continue;
    retry:
        if (backoff(r, &bo)) {
            r->contended++;
            if (call_hook(r, str_contended, kb, klen) < 0)
                return ERROR;
            bo.tries = 0;
            if (++remaps > MAX_REMAPS) {
                PyErr_SetString(TableUnavailable, "the shared table keeps being replaced; try again");
                return ERROR;
            }
            goto restart;
        }
        /* retry from R2 at the same slot */
    }
    /* Every slot probed: a full index holds no EMPTY slot (the writer never lets that
     * happen; a garbage segment may): the key is not there. */
    return MISSING;
}

static PyObject *
decode_value(copy_out *o)
{
    PyObject *v;
    if (o->vflag == 1) {
        v = o->bytes;
        o->bytes = NULL;
        return v;
    }
    if (o->vflag == 2) {
        v = PyUnicode_DecodeUTF8((const char *)o->buf, (Py_ssize_t)o->vlen, NULL);
    }
    else {
        PyObject *args[4] = {NULL, o->bytes, Py_False, Py_False};
        v = PyObject_Vectorcall(unpackb_fn, args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, unpack_kwnames);
    }
    if (v == NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
        /* A validated copy that does not decode: only a corrupt table writes that. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(TableUnavailable,
                     "the shared table holds an undecodable value (%s): it is corrupt; "
                     "restart the daemon to rebuild it", ((PyTypeObject *)type)->tp_name);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    return v;
}

static int
check_encoded(PyObject *kb, const uint8_t **p, Py_ssize_t *n)
{
    if (!PyBytes_Check(kb)) {
        PyErr_Format(PyExc_TypeError, "encoded key must be bytes, not %.100s", Py_TYPE(kb)->tp_name);
        return -1;
    }
    *p = (const uint8_t *)PyBytes_AS_STRING(kb);
    *n = PyBytes_GET_SIZE(kb);
    return 0;
}

/* lookup(key, default=None): user key in, decoded value (or default) out. The client's
 * get is this bound method: one C call for the common case. */
static PyObject *
reader_lookup(Reader *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (UNLIKELY(nargs < 1 || nargs > 2)) {
        PyErr_Format(PyExc_TypeError, "lookup expected 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *dflt = nargs == 2 ? args[1] : Py_None;
    keyview v;
    keybuf k;
    int enc = !key_view(args[0], &v); /* k holds the encoded key (a buffer to free) */
    if (enc) {
        if (encode_user_key(args[0], &k) < 0)
            return NULL;
        keyview_of(&k, &v);
    }
    Py_hash_t ph = cache_hash(r, args[0], v.n + 1);
    struct cache_entry *e = cache_match(r, ph, &v);
    PyObject *res = e == NULL ? NULL : cache_validate(r, e, 1);
    if (res != NULL) {
        if (enc)
            keybuf_free(&k);
        return res;
    }
    if (!enc && keybuf_set(&k, v.tag, (const char *)v.p, v.n) < 0)
        return NULL;
    copy_out o;
    copy_init(&o, WANT_VALUE);
    int rc = find(r, k.p, k.n, xxh64(k.p, (size_t)k.n, 0), &o);
    if (rc == FOUND) {
        uint64_t epoch = r->epoch; /* msgpack may run Python code, and with it a remap */
        res = decode_value(&o);
        if (res != NULL && o.live)
            cache_store(r, epoch, ph, k.p, k.n, o.w, o.seq, o.expiry_ms, res, o.vlen);
    }
    else if (rc == MISSING)
        res = Py_NewRef(dflt);
    else
        res = NULL;
    keybuf_free(&k);
    copy_free(&o);
    return res;
}

/* find() for an already encoded key (bytes): the methods below that take one. */
static int
find_encoded(Reader *r, PyObject *kb, int want, copy_out *o)
{
    const uint8_t *p;
    Py_ssize_t n;
    copy_init(o, want);
    if (check_encoded(kb, &p, &n) < 0)
        return ERROR;
    return find(r, p, n, xxh64(p, (size_t)n, 0), o);
}

/* get(encoded_key) -> (vflag, bytes) | None */
static PyObject *
reader_get(Reader *r, PyObject *kb)
{
    copy_out o;
    int rc = find_encoded(r, kb, WANT_BYTES, &o);
    PyObject *res = NULL;
    if (rc == FOUND) {
        PyObject *vflag = PyLong_FromLong(o.vflag);
        if (vflag != NULL) {
            res = PyTuple_Pack(2, vflag, o.bytes);
            Py_DECREF(vflag);
        }
    }
    else if (rc == MISSING)
        res = Py_NewRef(Py_None);
    copy_free(&o);
    return res;
}

/* _get_entry(encoded_key) -> (vflag, bytes, seqno, expiry_ms) | None (tests, tools) */
static PyObject *
reader_get_entry(Reader *r, PyObject *kb)
{
    copy_out o;
    int rc = find_encoded(r, kb, WANT_BYTES, &o);
    PyObject *res = NULL;
    if (rc == FOUND)
        res = Py_BuildValue("(iOKK)", (int)o.vflag, o.bytes, (unsigned long long)o.seqno,
                            (unsigned long long)o.expiry_ms);
    else if (rc == MISSING)
        res = Py_NewRef(Py_None);
    copy_free(&o);
    return res;
}

static PyObject *
reader_contains(Reader *r, PyObject *kb)
{
    copy_out o;
    int rc = find_encoded(r, kb, WANT_NOTHING, &o);
    copy_free(&o);
    if (rc == ERROR)
        return NULL;
    return PyBool_FromLong(rc == FOUND);
}

/* get_many(keys) -> {key: value} for the keys found. Keys are taken in groups: hash
 * them all and prefetch their slots, then prefetch the records those slots name, then
 * run the full protocol per key, so the cache misses of a group overlap instead of
 * being paid one after the other. The prefetch pass trusts nothing: it only warms the
 * cache; every key still goes through R2..R7. */
#define BATCH 32 /* 16-64 measured alike; enough to overlap the misses of a group */
#define GET_MANY_ROOMY 1024 /* results of up to this many keys get twice the room (below) */

static PyObject *
reader_get_many(Reader *r, PyObject *keys)
{
    /* A list or tuple is read in place (copying it would cost as much as a cached get);
     * anything else is copied into a tuple first. Python code run meanwhile (msgpack, a
     * hook, another thread) may shrink a list: each group takes strong references to its
     * keys first and the size is read again for every group. */
    PyObject *seq = PyList_CheckExact(keys) || PyTuple_CheckExact(keys) ? Py_NewRef(keys) : PySequence_Tuple(keys);
    if (seq == NULL)
        return NULL;
    /* Sized for every key up front: growing a dict key by key costs more than the reads.
     * A result of up to GET_MANY_ROOMY keys gets room for twice its keys: its index is then
     * 17-33 % full instead of 33-67 % (100 keys: 20 % instead of 39 %), and fewer inserts
     * probe past a collision (a hot get_many of 100 keys took 4 % less time, measured A/B;
     * for 100 keys the dict holds about 5 KiB more). A larger result is sized for its
     * keys only: the room would be memory the caller keeps.
     * Tracked by the GC up front too: an untracked dict asks, at every insert, whether the
     * key or the value could make it need tracking (two calls into the interpreter per key,
     * about 2.5 ns of a hot key's 28, measured); the collector untracks it again when it
     * only holds atomic values, as it does for any dict. */
    Py_ssize_t nkeys = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = _PyDict_NewPresized(nkeys <= GET_MANY_ROOMY ? 2 * nkeys : nkeys);
    if (out != NULL && !PyObject_GC_IsTracked(out))
        PyObject_GC_Track(out);
    PyObject *it[BATCH]; /* the group's keys, owned */
    keybuf k[BATCH]; /* the encoded key, for keys that have no view or that the cache missed */
    keyview kv[BATCH];
    int enc[BATCH]; /* k[j] holds the key (and owns a buffer to free) */
    uint64_t hs[BATCH];
    Py_hash_t ph[BATCH];
    struct cache_entry *ce[BATCH];
    PyObject *hit[BATCH]; /* owned: the cache's answers, until they go into the dict */
    int todo[BATCH]; /* the keys of the group the result cache did not answer */
    int nk = 0, nit = 0;
    int foreign = 0; /* the result holds a key whose type is not exact str, bytes or int */
    if (out == NULL)
        goto fail;
    for (Py_ssize_t start = 0; start < PySequence_Fast_GET_SIZE(seq); start += BATCH) {
        Py_ssize_t total = PySequence_Fast_GET_SIZE(seq);
        PyObject **items = PySequence_Fast_ITEMS(seq);
        int group = (int)(total - start < BATCH ? total - start : BATCH);
        nk = nit = 0;
        int nt = 0;
        /* The result cache first, in passes that overlap the misses of the group: its
         * entries, then the records and values they name, then the checks. Nothing in
         * between runs Python code (codec.encode_key for unusual key types runs before
         * any entry is taken; inserting str, bytes or int keys runs none), so the entry
         * pointers stay valid until the checks are done. */
        /* The next group's key objects (their hash and bytes are read first thing). */
        for (Py_ssize_t j = start + BATCH; j < total && j < start + 2 * BATCH; j++)
            PREFETCH(items[j]);
        for (int j = 0; j < group; j++) {
            /* Taken before anything can run Python code that might shrink the list. */
            it[j] = Py_NewRef(items[start + j]);
            nit = j + 1;
        }
        for (int j = 0; j < nit; j++) {
            enc[j] = 0;
            nk = j + 1;
            if (!key_view(it[j], &kv[j])) {
                if (encode_user_key(it[j], &k[j]) < 0) {
                    nk = j; /* k[j] holds nothing to free */
                    goto fail;
                }
                enc[j] = 1;
                keyview_of(&k[j], &kv[j]);
            }
            ph[j] = cache_hash(r, it[j], kv[j].n + 1);
            if (cache_may_hold(r, ph[j])) {
                PREFETCH(cache_set(r, ph[j]));     /* way 0 */
                PREFETCH(cache_set(r, ph[j]) + 1); /* way 1, the next line */
            }
        }
        for (int j = 0; j < nk; j++) {
            ce[j] = cache_match(r, ph[j], &kv[j]);
            if (ce[j] != NULL) {
                PREFETCH(&r->Q[ce[j]->w]);
                PREFETCH(ce[j]->value);
            }
        }
        /* Inserting a cached answer may compare its key with an equal one already in the
         * dict. Among exact str, bytes and int keys that runs no Python code; once the
         * dict holds a key of another type (`foreign`), its __eq__ may run anything (a
         * remap frees the entries): then the answers are taken first and inserted only
         * after every entry of the group was checked. ph is the key's own hash (the
         * cache serves exact str, bytes and int keys only). */
        int bad = 0;
        for (int j = 0; j < nk; j++) {
            /* No promotion: another key of the group may hold the other way's entry. */
            hit[j] = ce[j] == NULL ? NULL : cache_validate(r, ce[j], 0);
            if (hit[j] == NULL) {
                if (!enc[j]) {
                    if (keybuf_set(&k[j], kv[j].tag, (const char *)kv[j].p, kv[j].n) < 0) {
                        bad = 1; /* no memory: fails the call below */
                        continue;
                    }
                    enc[j] = 1;
                }
                hs[j] = xxh64(k[j].p, (size_t)k[j].n, 0);
                todo[nt++] = j;
            }
            else if (!foreign && !bad) {
                bad = _PyDict_SetItem_KnownHash(out, it[j], hit[j], ph[j]) < 0;
                Py_CLEAR(hit[j]);
            }
        }
        for (int j = 0; j < nk; j++) {
            if (hit[j] != NULL && !bad)
                bad = _PyDict_SetItem_KnownHash(out, it[j], hit[j], ph[j]) < 0;
            Py_CLEAR(hit[j]);
        }
        if (bad)
            goto fail;
        if (!r->attached) {
            PyErr_SetString(TableUnavailable, "the reader was closed");
            goto fail;
        }
        const aword *Q = r->Q;
        const uint64_t mask = r->mask, slot0 = r->slot0, lo = r->lo, span = r->span;
        for (int t = 0; t < nt; t++)
            PREFETCH(&Q[slot0 + (hs[todo[t]] & mask)]);
        for (int t = 0; t < nt; t++) {
            int j = todo[t];
            uint64_t w = load_relaxed(&Q[slot0 + (hs[j] & mask)]) - (hs[j] & FP_MASK);
            if (w - lo < span) {
                PREFETCH(&Q[w]);
                PREFETCH(&Q[w] + 8);
                PREFETCH(&Q[w] + 16);
            }
        }
        for (int t = 0; t < nt; t++) {
            int j = todo[t];
            copy_out o;
            copy_init(&o, WANT_VALUE);
            int rc = find(r, k[j].p, k[j].n, hs[j], &o);
            if (rc == FOUND) {
                uint64_t epoch = r->epoch; /* msgpack may run Python code, and a remap */
                PyObject *v = decode_value(&o);
                if (v != NULL && o.live)
                    cache_store(r, epoch, ph[j], k[j].p, k[j].n, o.w, o.seq, o.expiry_ms, v, o.vlen);
                PyTypeObject *kt = Py_TYPE(it[j]);
                foreign |= kt != &PyUnicode_Type && kt != &PyBytes_Type && kt != &PyLong_Type;
                int failed = v == NULL || PyDict_SetItem(out, it[j], v) < 0;
                Py_XDECREF(v);
                if (failed)
                    rc = ERROR;
            }
            copy_free(&o);
            if (rc == ERROR)
                goto fail;
        }
        for (int j = 0; j < nk; j++)
            if (enc[j])
                keybuf_free(&k[j]);
        nk = 0;
        for (int j = 0; j < nit; j++)
            Py_DECREF(it[j]);
        nit = 0;
    }
    Py_DECREF(seq);
    return out;
fail:
    for (int j = 0; j < nk; j++)
        if (enc[j])
            keybuf_free(&k[j]);
    for (int j = 0; j < nit; j++)
        Py_DECREF(it[j]);
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

/* _scan(start, count) -> (entries, next_slot, status): the entries (key, vflag, value,
 * seqno, expiry_ms) of the live slots from start on, each copied under its seqlock and
 * the slot re-checked (a freed chunk may be reused). Expired entries are included: the
 * caller filters with its clock. status 0: done up to next_slot; else slot next_slot
 * stopped the scan: 1 the table moved (MOVED slot or stale header): remap and rescan;
 * 2 it hit the retry bounds: ask _contended; 3 it points outside the data area; 4 its
 * record, validated, overruns the segment (3 and 4: a corrupt table). The entries
 * before the stop are returned either way, as a lazy scan would have yielded them. */
#define SCAN_DONE 0
#define SCAN_MOVED 1
#define SCAN_CONTENDED 2
#define SCAN_BAD_SLOT 3
#define SCAN_BAD_RECORD 4

static PyObject *
reader_scan(Reader *r, PyObject *args)
{
    unsigned long long start, count;
    if (!PyArg_ParseTuple(args, "KK", &start, &count))
        return NULL;
    if (!r->attached) {
        PyErr_SetString(TableUnavailable, "the reader was closed");
        return NULL;
    }
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    const aword *Q = r->Q;
    const uint8_t *base = r->base;
    const uint64_t capacity = r->mask + 1, slot0 = r->slot0, lo = r->lo, span = r->span;
    const uint64_t seg_bytes = r->seg_bytes;
    uint64_t end = start + count > capacity || start + count < start ? capacity : start + count;
    uint64_t i = start;
    int status = SCAN_DONE;
    for (; i < end && status == SCAN_DONE; i++) {
        backoff_t bo = {0, 0};
        for (;;) {
            /* Building an entry allocates a tuple, which may run the garbage collector
             * and with it Python code; another thread may then install a new mapping
             * and unmap this one: never touch it once it is no longer installed. */
            if (r->base != base) {
                status = SCAN_MOVED;
                break;
            }
            const aword *slot = &Q[slot0 + i];
            uint64_t x = load_relaxed(slot);
            if (x == SLOT_EMPTY || x == SLOT_TOMBSTONE)
                break;
            if (x == SLOT_MOVED || load_relaxed(&Q[H_STALE]) != 0) {
                status = SCAN_MOVED;
                break;
            }
            uint64_t w = x & LOC_MASK;
            if (w - lo >= span) {
                status = SCAN_BAD_SLOT;
                break;
            }
            const aword *rec = &Q[w];
            uint64_t s1 = load_acquire(&rec[R_SEQ]);
            uint64_t m = load_relaxed(&rec[R_LENS]);
            uint64_t xv = load_relaxed(&rec[R_EXPIRY_VFLAG]);
            uint64_t seqno = load_relaxed(&rec[R_SEQNO]);
            uint64_t rk = m >> 32, rv = m & LOC_MASK;
            uint64_t kpos = 8 * w + REC_HEADER_SIZE;
            int in_bounds = kpos + rk + rv <= seg_bytes;
            PyObject *key = NULL, *val = NULL;
            if (in_bounds && !(s1 & 1)) {
                key = PyBytes_FromStringAndSize((const char *)base + kpos, (Py_ssize_t)rk);
                val = PyBytes_FromStringAndSize((const char *)base + kpos + rk, (Py_ssize_t)rv);
                if (key == NULL || val == NULL) {
                    Py_XDECREF(key);
                    Py_XDECREF(val);
                    Py_DECREF(list);
                    return NULL;
                }
            }
            atomic_thread_fence(memory_order_acquire);
            uint64_t s2 = load_relaxed(&rec[R_SEQ]);
            uint64_t x2 = load_relaxed(slot);
            if ((s1 & 1) || s2 != s1 || x2 != x) {
                Py_XDECREF(key);
                Py_XDECREF(val);
                if (backoff(r, &bo)) {
                    status = SCAN_CONTENDED;
                    break;
                }
                continue;
            }
            if (!in_bounds) {
                status = SCAN_BAD_RECORD;
                break;
            }
            PyObject *t = Py_BuildValue("(NiNKK)", key, (int)(xv & 0xFF), val, (unsigned long long)seqno,
                                        (unsigned long long)(xv >> 8));
            if (t == NULL || PyList_Append(list, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(t);
            break;
        }
    }
    if (status != SCAN_DONE)
        i--; /* the slot that stopped the scan */
    return Py_BuildValue("(NKi)", list, (unsigned long long)i, status);
}

static PyObject *
reader_xxh64(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "xxh64(data, seed=0)");
        return NULL;
    }
    unsigned long long seed = 0;
    if (nargs == 2) {
        seed = PyLong_AsUnsignedLongLongMask(args[1]);
        if (seed == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint64_t h = xxh64((const uint8_t *)view.buf, (size_t)view.len, seed);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *
module_encode_key(PyObject *mod, PyObject *key)
{
    keybuf k;
    if (encode_user_key(key, &k) < 0)
        return NULL;
    PyObject *res = PyBytes_FromStringAndSize((const char *)k.p, k.n);
    keybuf_free(&k);
    return res;
}

static PyMethodDef reader_methods[] = {
    {"lookup", (PyCFunction)(void (*)(void))reader_lookup, METH_FASTCALL,
     "lookup(key, default=None): the decoded value of a user key, or default"},
    {"get", (PyCFunction)reader_get, METH_O, "get(encoded_key) -> (vflag, bytes) | None"},
    {"contains", (PyCFunction)reader_contains, METH_O, "contains(encoded_key) -> bool"},
    {"get_many", (PyCFunction)reader_get_many, METH_O,
     "get_many(keys) -> {key: value} for the keys found (misses overlapped)"},
    {"_get_entry", (PyCFunction)reader_get_entry, METH_O,
     "_get_entry(encoded_key) -> (vflag, bytes, seqno, expiry_ms) | None"},
    {"_attach", (PyCFunction)reader_attach, METH_O, "_attach(buffer): follow the data segment in buffer"},
    {"_map", (PyCFunction)reader_map, METH_O, "_map(name): map the named segment read-only and follow it"},
    {"_detach", (PyCFunction)reader_detach_meth, METH_NOARGS, "_detach(): release the buffer"},
    {"_scan", (PyCFunction)reader_scan, METH_VARARGS,
     "_scan(start, count) -> ([entries], next_slot, status 0 done / 1 moved / 2 contended)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *
reader_get_attached(Reader *r, void *closure)
{
    return PyBool_FromLong(r->attached != ATTACHED_NONE);
}

static PyObject *
reader_get_u64(Reader *r, void *closure)
{
    if (!r->attached)
        Py_RETURN_NONE;
    switch ((intptr_t)closure) {
    case 0:
        return PyLong_FromUnsignedLongLong(r->mask + 1);
    case 1:
        return PyLong_FromUnsignedLongLong(r->seg_bytes);
    case 2:
        return PyLong_FromUnsignedLongLong(r->generation);
    case 4:
        return PyLong_FromUnsignedLongLong(r->slot0);
    case 5:
        return PyLong_FromUnsignedLongLong(r->epoch);
    default:
        return PyLong_FromUnsignedLongLong(load_relaxed(&r->Q[H_STALE]));
    }
}

static PyGetSetDef reader_getset[] = {
    {"_attached", (getter)reader_get_attached, NULL, "whether a segment is attached", NULL},
    {"_capacity", (getter)reader_get_u64, NULL, "slots of the attached segment", (void *)0},
    {"_segment_bytes", (getter)reader_get_u64, NULL, "bytes of the attached segment", (void *)1},
    {"_generation", (getter)reader_get_u64, NULL, "generation of the attached segment", (void *)2},
    {"_stale", (getter)reader_get_u64, NULL, "the attached segment's stale flag, now", (void *)3},
    {"_slot0", (getter)reader_get_u64, NULL, "word index of slot 0 of the index this reader follows", (void *)4},
    {"_epoch", (getter)reader_get_u64, NULL, "+1 at every attach and detach (None while detached)", (void *)5},
    {NULL},
};

static PyMemberDef reader_members[] = {
    {"_no_seqlock", T_INT, offsetof(Reader, no_seqlock), 0,
     "TEST ONLY: skip the seqlock validation (R5, R6) to prove torn reads are caught"},
    {"retries", T_ULONGLONG, offsetof(Reader, retries), READONLY, "failed seqlock validations"},
    {"remaps", T_ULONGLONG, offsetof(Reader, remaps), READONLY, "remaps asked of the Python side"},
    {"contended", T_ULONGLONG, offsetof(Reader, contended), READONLY, "reads that hit the retry bounds"},
    {"cache_hits", T_ULONGLONG, offsetof(Reader, cache_hits), READONLY,
     "lookups answered from the result cache (no copy, no decode)"},
    {"_cache_bypass", T_UINT, offsetof(Reader, bypass), READONLY,
     "gets left that skip the result cache (it was judged not to pay)"},
    {"_use_cache", T_INT, offsetof(Reader, use_cache), 0,
     "whether lookup and get_many keep immutable results per record version (default 1)"},
    {NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "walcache.shm._creader.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled seqlock reader over one attached data segment; "
              "subclassed by walcache.shm.creader.CReader, which supplies _remap and _contended.",
    .tp_new = reader_new,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_traverse = (traverseproc)reader_traverse,
    .tp_clear = (inquiry)reader_clear,
    .tp_methods = reader_methods,
    .tp_members = reader_members,
    .tp_getset = reader_getset,
};

/* ---- the table builder: ShmTable.build's compiled path (walcache/shm/writer.py) ---- */

/*
 * A daemon restart publishes a table holding the whole recovered state at once. The
 * pure-Python builder in writer.py (_pack, _place) is the reference; this does the same,
 * byte for byte (a hypothesis test compares whole segments): walk the entries in the
 * order given, validate every one (the same checks and exception classes as
 * ShmTable.put), leave out those whose expiry has passed, write the records back to back
 * from data_off (seq 0, zero padding), and place each slot by linear probing from
 * H & (capacity - 1), in entry order, over an index that starts all EMPTY.
 *
 * The segment is not published yet (nobody maps it), so plain stores are enough: no
 * seqlock, no atomics. Entries are a dict key -> (vflag, value, seqno, expiry_ms), what
 * DictTable holds after replay, or a list of (key, vflag, value, seqno, expiry_ms).
 * Python code never runs inside a call (no __index__, no __eq__: only exact container
 * walks and PyLong reads), so the entries cannot change during one; between
 * build_measure and build_fill they could, and build_fill then refuses to write past
 * the size measured instead of past the committed pages.
 */

static PyObject *KeyTooLarge;   /* walcache.errors.KeyTooLarge */
static PyObject *ValueTooLarge; /* walcache.errors.ValueTooLarge */

#define BUILD_MAX_VALUE_BYTES UINT64_C(0xFFFFFFFF)
#define BUILD_MAX_EXPIRY (UINT64_C(1) << 56)

typedef struct {
    PyObject *src; /* a dict or a list, borrowed from the caller */
    Py_ssize_t pos;
    int is_dict;
} entry_iter;

typedef struct {
    PyObject *key;
    const uint8_t *kp, *vp;
    uint64_t klen, vlen, vflag, seqno, expiry;
} build_entry;

static int
entry_iter_init(entry_iter *it, PyObject *src)
{
    it->src = src;
    it->pos = 0;
    if (PyDict_Check(src))
        it->is_dict = 1;
    else if (PyList_Check(src))
        it->is_dict = 0;
    else {
        PyErr_Format(PyExc_TypeError, "entries must be a dict or a list, not %.100s", Py_TYPE(src)->tp_name);
        return -1;
    }
    return 0;
}

/* A non-negative int below 2**64 in *out: 0; out of that range: 1; not an int: -1 (set). */
static int
read_u64(PyObject *o, uint64_t *out)
{
    *out = UINT64_MAX;
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "an int is required, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear(); /* negative or >= 2**64 */
        return 1;
    }
    *out = (uint64_t)v;
    return 0;
}

static PyObject *
key_head(PyObject *key)
{
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(key), Py_MIN(PyBytes_GET_SIZE(key), 40));
}

/* The next entry, validated: 1; no more: 0; a bad entry: -1 with the exception set. */
static int
entry_next(entry_iter *it, build_entry *e)
{
    PyObject *key, *vflag, *value, *seqno, *expiry;
    if (it->is_dict) {
        PyObject *rest;
        if (!PyDict_Next(it->src, &it->pos, &key, &rest))
            return 0;
        if (!PyTuple_Check(rest) || PyTuple_GET_SIZE(rest) != 4) {
            PyErr_SetString(PyExc_TypeError, "a dict entry must be key -> (vflag, value, seqno, expiry_ms)");
            return -1;
        }
        vflag = PyTuple_GET_ITEM(rest, 0);
        value = PyTuple_GET_ITEM(rest, 1);
        seqno = PyTuple_GET_ITEM(rest, 2);
        expiry = PyTuple_GET_ITEM(rest, 3);
    }
    else {
        if (it->pos >= PyList_GET_SIZE(it->src))
            return 0;
        PyObject *t = PyList_GET_ITEM(it->src, it->pos);
        it->pos++;
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5) {
            PyErr_SetString(PyExc_TypeError, "a list entry must be (key, vflag, value, seqno, expiry_ms)");
            return -1;
        }
        key = PyTuple_GET_ITEM(t, 0);
        vflag = PyTuple_GET_ITEM(t, 1);
        value = PyTuple_GET_ITEM(t, 2);
        seqno = PyTuple_GET_ITEM(t, 3);
        expiry = PyTuple_GET_ITEM(t, 4);
    }
    if (!PyBytes_Check(key) || !PyBytes_Check(value)) {
        PyErr_Format(PyExc_TypeError, "keys and values must be bytes, not %.100s and %.100s",
                     Py_TYPE(key)->tp_name, Py_TYPE(value)->tp_name);
        return -1;
    }
    e->key = key;
    e->kp = (const uint8_t *)PyBytes_AS_STRING(key);
    e->vp = (const uint8_t *)PyBytes_AS_STRING(value);
    e->klen = (uint64_t)PyBytes_GET_SIZE(key);
    e->vlen = (uint64_t)PyBytes_GET_SIZE(value);
    if (e->klen == 0 || e->klen > MAX_KEY_BYTES) {
        PyErr_Format(KeyTooLarge, "encoded key of %llu bytes: the shared table takes 1..%d",
                     (unsigned long long)e->klen, MAX_KEY_BYTES);
        return -1;
    }
    if (e->vlen > BUILD_MAX_VALUE_BYTES) {
        PyErr_Format(ValueTooLarge, "value of %llu bytes: the shared table takes at most %llu",
                     (unsigned long long)e->vlen, (unsigned long long)BUILD_MAX_VALUE_BYTES);
        return -1;
    }
    int r1 = read_u64(vflag, &e->vflag);
    if (r1 < 0)
        return -1;
    int r2 = read_u64(expiry, &e->expiry);
    if (r2 < 0)
        return -1;
    int r3 = read_u64(seqno, &e->seqno);
    if (r3 < 0)
        return -1;
    if (r1 || r2 || r3 || e->vflag > 255 || e->expiry >= BUILD_MAX_EXPIRY) {
        PyObject *head = key_head(key);
        if (head != NULL) {
            PyErr_Format(PyExc_ValueError, "bad vflag %R, expiry %R or seqno %R for key %R", vflag, expiry,
                         seqno, head);
            Py_DECREF(head);
        }
        return -1;
    }
    return 1;
}

static inline uint64_t
build_chunk_words(uint64_t klen, uint64_t vlen)
{
    return (REC_HEADER_SIZE + klen + vlen + 7) >> 3;
}

static PyObject *
build_measure(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "build_measure(entries, now_ms)");
        return NULL;
    }
    entry_iter it;
    if (entry_iter_init(&it, args[0]) < 0)
        return NULL;
    unsigned long long now = PyLong_AsUnsignedLongLong(args[1]);
    if (now == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    uint64_t live = 0, words = 0, max_seqno = 0;
    build_entry e;
    int r;
    while ((r = entry_next(&it, &e)) > 0) {
        if (e.expiry && e.expiry <= now)
            continue;
        live++;
        words += build_chunk_words(e.klen, e.vlen);
        if (e.seqno > max_seqno)
            max_seqno = e.seqno;
    }
    if (r < 0)
        return NULL;
    return Py_BuildValue("(KKK)", (unsigned long long)live, (unsigned long long)words,
                         (unsigned long long)max_seqno);
}

/* Entries whose slots are looked up together: their index lines are prefetched for
 * writing while the records of the batch are copied, which hides most of the cache
 * misses of a random walk over an index much larger than the caches. */
#define BUILD_BATCH 16

typedef struct {
    PyObject *key;
    uint64_t h, w;
} build_pending;

static int
build_place(uint64_t *Q, uint64_t *S, uint64_t mask, build_pending *p, int n)
{
    for (int j = 0; j < n; j++) {
        uint64_t h = p[j].h, i = h & mask, x;
        while ((x = S[i]) != SLOT_EMPTY) {
            if (((x ^ h) & FP_MASK) == 0) {
                uint64_t ow = x & LOC_MASK, w = p[j].w;
                uint64_t klen = Q[w + R_LENS] >> 32;
                if (Q[ow + R_LENS] >> 32 == klen &&
                    memcmp((uint8_t *)(Q + ow + REC_HEADER_WORDS), (uint8_t *)(Q + w + REC_HEADER_WORDS), klen) == 0) {
                    PyObject *head = key_head(p[j].key);
                    if (head != NULL) {
                        PyErr_Format(PyExc_ValueError, "key %R is given twice", head);
                        Py_DECREF(head);
                    }
                    return -1;
                }
            }
            i = (i + 1) & mask;
        }
        S[i] = (h & FP_MASK) | p[j].w;
    }
    return 0;
}

static PyObject *
build_fill(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "build_fill(buf, entries, capacity, data_off, data_words, now_ms)");
        return NULL;
    }
    unsigned long long capacity = PyLong_AsUnsignedLongLong(args[2]);
    if (capacity == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long data_off = PyLong_AsUnsignedLongLong(args[3]);
    if (data_off == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long data_words = PyLong_AsUnsignedLongLong(args[4]);
    if (data_words == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long now = PyLong_AsUnsignedLongLong(args[5]);
    if (now == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    entry_iter it;
    if (entry_iter_init(&it, args[1]) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    uint64_t len = (uint64_t)view.len;
    /* The geometry the reader checks (check_geometry), so a caller's mistake is an
     * error here rather than a table every reader refuses or a write out of bounds. */
    if (capacity < MIN_CAPACITY || (capacity & (capacity - 1)) || capacity > (MAX_SEGMENT_BYTES >> 3) ||
        data_off % 8 || data_off < HEADER_SIZE + capacity * SLOT_SIZE || data_words > (MAX_SEGMENT_BYTES >> 3) ||
        data_off + data_words * 8 > len || data_off + data_words * 8 > MAX_SEGMENT_BYTES ||
        ((uintptr_t)view.buf & 7)) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError,
                     "bad geometry: capacity %llu, data_off %llu, data_words %llu for a buffer of %llu bytes",
                     capacity, data_off, data_words, (unsigned long long)len);
        return NULL;
    }
    uint64_t *Q = (uint64_t *)view.buf;
    uint64_t *S = Q + HEADER_SIZE / 8;
    const uint64_t mask = capacity - 1, lo = data_off / 8, end = lo + data_words;
    memset(S, 0, capacity * SLOT_SIZE);
    uint64_t top = lo, live = 0, max_seqno = 0;
    build_pending pend[BUILD_BATCH];
    int npend = 0, r;
    build_entry e;
    while ((r = entry_next(&it, &e)) > 0) {
        if (e.expiry && e.expiry <= now)
            continue;
        uint64_t nw = build_chunk_words(e.klen, e.vlen);
        /* Keep an EMPTY slot (probes end) and stay inside what build_measure counted. */
        if (nw > end - top || live + 1 >= capacity) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_RuntimeError,
                            "the entries changed after build_measure: more of them than the table was sized for");
            return NULL;
        }
        uint64_t h = xxh64(e.kp, (size_t)e.klen, 0);
        PREFETCH_W(S + (h & mask));
        Q[top + R_SEQ] = 0;
        Q[top + R_LENS] = e.klen << 32 | e.vlen;
        Q[top + R_EXPIRY_VFLAG] = e.expiry << 8 | e.vflag;
        Q[top + R_SEQNO] = e.seqno;
        uint8_t *rec = (uint8_t *)(Q + top + REC_HEADER_WORDS);
        /* Zero the last word first, then copy over it: the padding ends up zero. */
        Q[top + nw - 1] = 0;
        memcpy(rec, e.kp, (size_t)e.klen);
        memcpy(rec + e.klen, e.vp, (size_t)e.vlen);
        pend[npend].key = e.key;
        pend[npend].h = h;
        pend[npend].w = top;
        if (++npend == BUILD_BATCH) {
            if (build_place(Q, S, mask, pend, npend) < 0) {
                PyBuffer_Release(&view);
                return NULL;
            }
            npend = 0;
        }
        top += nw;
        live++;
        if (e.seqno > max_seqno)
            max_seqno = e.seqno;
    }
    if (r < 0 || build_place(Q, S, mask, pend, npend) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(KKK)", (unsigned long long)live, (unsigned long long)(top - lo),
                         (unsigned long long)max_seqno);
}

/* The writer-side calls below take buffers first, then unsigned integers: check the
 * count (TypeError with ``usage``) and convert args[first..nargs) into u. 0 or -1. */
static int
u64_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_ssize_t first, unsigned long long *u,
         const char *usage)
{
    if (nargs != want) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    for (Py_ssize_t j = first; j < want; j++) {
        u[j - first] = PyLong_AsUnsignedLongLong(args[j]);
        if (u[j - first] == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* Linear probing into an index that has an EMPTY slot and no copy of this key. */
static inline void
place_slot(uint64_t *S, uint64_t mask, uint64_t h, uint64_t x)
{
    uint64_t j = h & mask;
    while (S[j] != SLOT_EMPTY)
        j = (j + 1) & mask;
    S[j] = x;
}

/* Growing or compacting the table (writer.py ShmTable._copy_live): copy every live,
 * unexpired record of the current segment into a new, unpublished one. The pure-Python
 * _copy_live is the reference; this does the same, byte for byte: walk the old index
 * (old_capacity slots at word old_slot0: it may have moved) in slot order, skip EMPTY
 * and TOMBSTONE slots and records whose expiry has passed, copy each chunk whole (header, key, value, padding) to the new bump pointer with its seq
 * word set to 0, and place its slot by linear probing from XXH64(key) & (new capacity - 1)
 * with the fingerprint of the old slot. The old segment is only written by the caller's
 * thread (the daemon's loop, which is in this call) and nobody maps the new one yet, so
 * plain loads and stores are enough; the GIL is released meanwhile (the buffers stay
 * exported, so neither mapping can be closed). A rebuild of 150,000 keys of 4 KiB took
 * 0.67-0.71 s with the Python loop and 0.50 s with this (bench/bench_rebuild.py), every write
 * waiting behind it; the rest is committing the new segment and unmapping the old. */
static PyObject *
copy_live(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long u[6];
    if (u64_args(args, nargs, 8, 2, u,
                 "copy_live(old, new, old_slot0, old_capacity, old_lo, new_capacity, new_top, now_ms)") < 0)
        return NULL;
    const uint64_t oslot0 = u[0], ocap = u[1], olo = u[2], ncap = u[3], now = u[5];
    uint64_t top = u[4];
    Py_buffer ov, nv;
    if (PyObject_GetBuffer(args[0], &ov, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &nv, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&ov);
        return NULL;
    }
    const uint64_t olen = (uint64_t)ov.len / 8, nlen = (uint64_t)nv.len / 8;
    if (ocap < MIN_CAPACITY || (ocap & (ocap - 1)) || ncap < MIN_CAPACITY || (ncap & (ncap - 1)) ||
        oslot0 < HEADER_SIZE / 8 || ocap > olen || oslot0 > olen - ocap || olo < HEADER_SIZE / 8 ||
        HEADER_SIZE / 8 + ncap > top || top > nlen || ((uintptr_t)ov.buf & 7) || ((uintptr_t)nv.buf & 7)) {
        PyBuffer_Release(&ov);
        PyBuffer_Release(&nv);
        PyErr_Format(PyExc_ValueError,
                     "bad geometry: old index %llu slots at word %llu, capacities -> %llu, new top %llu, "
                     "buffers of %llu and %llu bytes",
                     u[1], u[0], u[3], u[4], (unsigned long long)ov.len, (unsigned long long)nv.len);
        return NULL;
    }
    const uint64_t *OQ = (const uint64_t *)ov.buf, *OS = OQ + oslot0;
    uint64_t *NQ = (uint64_t *)nv.buf, *NS = NQ + HEADER_SIZE / 8;
    const uint64_t nmask = ncap - 1;
    uint64_t live = 0, live_words = 0;
    const char *bad = NULL;
    Py_BEGIN_ALLOW_THREADS
    for (uint64_t i = 0; i < ocap; i++) {
        uint64_t x = OS[i];
        if (x == SLOT_EMPTY || x == SLOT_TOMBSTONE)
            continue;
        uint64_t w = x & LOC_MASK;
        if (w < olo || w + REC_HEADER_WORDS > olen) {
            bad = "a slot points outside the old segment's data area";
            break;
        }
        uint64_t lens = OQ[w + R_LENS], xv = OQ[w + R_EXPIRY_VFLAG];
        if ((xv >> 8) && (xv >> 8) <= now)
            continue;
        uint64_t klen = lens >> 32;
        uint64_t nw = (REC_HEADER_SIZE + klen + (lens & LOC_MASK) + 7) >> 3;
        if (nw > olen - w) {
            bad = "a record runs past the end of the old segment";
            break;
        }
        if (nw > nlen - top || live + 1 >= ncap) {
            bad = "the new segment is too small for the live records";
            break;
        }
        memcpy(NQ + top, OQ + w, (size_t)nw * 8);
        NQ[top + R_SEQ] = 0;
        place_slot(NS, nmask, xxh64((const uint8_t *)(OQ + w + REC_HEADER_WORDS), (size_t)klen, 0),
                   (x & FP_MASK) | top);
        top += nw;
        live++;
        live_words += nw;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ov);
    PyBuffer_Release(&nv);
    if (bad != NULL) {
        PyErr_SetString(PyExc_RuntimeError, bad);
        return NULL;
    }
    return Py_BuildValue("(KKK)", (unsigned long long)live, (unsigned long long)live_words, (unsigned long long)top);
}

/* Moving the index (writer.py _fill_index, step M1 of layout.py "Index moves"): a slot
 * in the new index (new_capacity words at new_slot0, zeroed here, read by nobody yet)
 * for every live slot of the old one, placed by linear probing from XXH64(key) &
 * (new_capacity - 1), in old slot order. The pure-Python _fill_index is the reference;
 * this is slot for slot the same. The caller's thread is the segment's only writer and
 * is in this call, so plain loads and stores suffice; the GIL is released meanwhile.
 * Returns the number of slots placed. */
static PyObject *
fill_index(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long u[5];
    if (u64_args(args, nargs, 6, 1, u, "fill_index(buf, old_slot0, old_capacity, new_slot0, new_capacity, lo)") < 0)
        return NULL;
    const uint64_t oslot0 = u[0], ocap = u[1], nslot0 = u[2], ncap = u[3], lo = u[4];
    Py_buffer v;
    if (PyObject_GetBuffer(args[0], &v, PyBUF_WRITABLE) < 0)
        return NULL;
    const uint64_t len = (uint64_t)v.len / 8;
    if (ocap < MIN_CAPACITY || (ocap & (ocap - 1)) || ncap < MIN_CAPACITY || (ncap & (ncap - 1)) ||
        oslot0 < HEADER_SIZE / 8 || ocap > len || oslot0 > len - ocap || nslot0 < HEADER_SIZE / 8 ||
        ncap > len || nslot0 > len - ncap || (nslot0 < oslot0 + ocap && oslot0 < nslot0 + ncap) ||
        lo < HEADER_SIZE / 8 || ((uintptr_t)v.buf & 7)) {
        PyBuffer_Release(&v);
        PyErr_Format(PyExc_ValueError,
                     "bad geometry: index of %llu slots at word %llu -> %llu slots at word %llu, "
                     "data from word %llu, buffer of %llu bytes",
                     u[1], u[0], u[3], u[2], u[4], (unsigned long long)v.len);
        return NULL;
    }
    uint64_t *Q = (uint64_t *)v.buf;
    const uint64_t *OS = Q + oslot0;
    uint64_t *NS = Q + nslot0;
    const uint64_t nmask = ncap - 1;
    uint64_t placed = 0;
    const char *bad = NULL;
    Py_BEGIN_ALLOW_THREADS
    memset(NS, 0, (size_t)ncap * SLOT_SIZE);
    for (uint64_t i = 0; i < ocap; i++) {
        uint64_t x = OS[i];
        if (x == SLOT_EMPTY || x == SLOT_TOMBSTONE)
            continue;
        uint64_t w = x & LOC_MASK;
        if (w < lo || w + REC_HEADER_WORDS > len) {
            bad = "a slot points outside the segment's data area";
            break;
        }
        uint64_t klen = Q[w + R_LENS] >> 32;
        if (klen > (len - w - REC_HEADER_WORDS) * 8) {
            bad = "a record's key runs past the end of the segment";
            break;
        }
        if (placed + 1 >= ncap) {
            bad = "the new index is too small for the live slots";
            break;
        }
        place_slot(NS, nmask, xxh64((const uint8_t *)(Q + w + REC_HEADER_WORDS), (size_t)klen, 0), x);
        placed++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    if (bad != NULL) {
        PyErr_SetString(PyExc_RuntimeError, bad);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(placed);
}

/* Retiring an index (writer.py _store_moved): MOVED into every slot of ``buf`` (an index
 * that is no longer current: its segment is stale, or the index moved), one aligned
 * 8-byte atomic store each, never a bulk memset (vector stores are not promised atomic
 * per 8 bytes, and a reader may be loading any slot). The release fence orders the
 * writer's earlier stores (the header's stale flag or index word, and a moved index's
 * slots) before the first MOVED on any architecture; the GIL is released meanwhile
 * (a 4M-slot index takes a few ms here, ~0.3 s in pure Python). */
static PyObject *
mark_moved(PyObject *mod, PyObject *buf)
{
    Py_buffer view;
    if (PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (view.len % SLOT_SIZE || ((uintptr_t)view.buf & 7)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "mark_moved needs an 8-byte-aligned buffer of whole slots");
        return NULL;
    }
    aword *S = (aword *)view.buf;
    size_t n = (size_t)view.len / SLOT_SIZE;
    Py_BEGIN_ALLOW_THREADS
    atomic_thread_fence(memory_order_release);
    for (size_t i = 0; i < n; i++)
        atomic_store_explicit(&S[i], SLOT_MOVED, memory_order_relaxed);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"xxh64", (PyCFunction)(void (*)(void))reader_xxh64, METH_FASTCALL,
     "xxh64(data, seed=0) -> int: XXH64 as the reader computes it"},
    {"encode_key", (PyCFunction)module_encode_key, METH_O,
     "encode_key(key) -> bytes: the reader's key encoding (must equal walcache.codec.encode_key)"},
    {"build_measure", (PyCFunction)(void (*)(void))build_measure, METH_FASTCALL,
     "build_measure(entries, now_ms) -> (live, data_words, max_seqno): validate and size a table build"},
    {"build_fill", (PyCFunction)(void (*)(void))build_fill, METH_FASTCALL,
     "build_fill(buf, entries, capacity, data_off, data_words, now_ms) -> (live, data_words, max_seqno): "
     "write the records and the index of an unpublished segment (ShmTable.build)"},
    {"copy_live", (PyCFunction)(void (*)(void))copy_live, METH_FASTCALL,
     "copy_live(old, new, old_slot0, old_capacity, old_lo, new_capacity, new_top, now_ms) -> (live, live_words, top): "
     "copy the live records of a segment into a new, unpublished one (ShmTable._copy_live)"},
    {"mark_moved", (PyCFunction)mark_moved, METH_O,
     "mark_moved(slots): MOVED into every 8-byte slot of a retired index, one atomic store each"},
    {"fill_index", (PyCFunction)(void (*)(void))fill_index, METH_FASTCALL,
     "fill_index(buf, old_slot0, old_capacity, new_slot0, new_capacity, lo) -> placed: "
     "the slots of a moved index (ShmTable._move_index, step M1)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef creader_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "walcache.shm._creader",
    .m_doc = "The compiled reader of walcache's shared table (see walcache.shm.layout).",
    .m_size = -1,
    .m_methods = module_methods,
};

static PyObject *
import_attr(const char *module, const char *name)
{
    PyObject *m = PyImport_ImportModule(module);
    if (m == NULL)
        return NULL;
    PyObject *a = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    return a;
}

PyMODINIT_FUNC
PyInit__creader(void)
{
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    if ((ReadContention = import_attr("walcache.errors", "ReadContention")) == NULL ||
        (TableUnavailable = import_attr("walcache.errors", "TableUnavailable")) == NULL ||
        (KeyTooLarge = import_attr("walcache.errors", "KeyTooLarge")) == NULL ||
        (ValueTooLarge = import_attr("walcache.errors", "ValueTooLarge")) == NULL ||
        (encode_key_fn = import_attr("walcache.codec", "encode_key")) == NULL ||
        (unpackb_fn = import_attr("msgpack", "unpackb")) == NULL ||
        (unpack_kwnames = Py_BuildValue("(ss)", "raw", "strict_map_key")) == NULL ||
        (str_remap = PyUnicode_InternFromString("_remap")) == NULL ||
        (str_contended = PyUnicode_InternFromString("_contended")) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&creader_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0 ||
        PyModule_AddIntConstant(m, "LAYOUT_VERSION", LAYOUT_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_SIZE", SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "REC_HEADER_SIZE", REC_HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "MIN_CAPACITY", MIN_CAPACITY) < 0 ||
        PyModule_AddIntConstant(m, "MAX_KEY_BYTES", MAX_KEY_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "RETRY_MIN_TRIES", RETRY_MIN_TRIES) < 0 ||
        PyModule_AddIntConstant(m, "RETRY_MIN_NS", RETRY_MIN_NS) < 0 ||
        PyModule_AddObject(m, "MAX_SEGMENT_BYTES", PyLong_FromUnsignedLongLong(MAX_SEGMENT_BYTES)) < 0 ||
        PyModule_AddObject(m, "TOMBSTONE", PyLong_FromUnsignedLongLong(SLOT_TOMBSTONE)) < 0 ||
        PyModule_AddObject(m, "MOVED", PyLong_FromUnsignedLongLong(SLOT_MOVED)) < 0 ||
        PyModule_AddObject(m, "FP_MASK", PyLong_FromUnsignedLongLong(FP_MASK)) < 0 ||
        PyModule_AddObject(m, "DATA_MAGIC", PyBytes_FromStringAndSize(DATA_MAGIC, 8)) < 0 ||
        PyModule_AddIntConstant(m, "H_VERSION", H_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "H_GENERATION", H_GENERATION) < 0 ||
        PyModule_AddIntConstant(m, "H_SEGMENT_BYTES", H_SEGMENT_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "H_CAPACITY", H_CAPACITY) < 0 ||
        PyModule_AddIntConstant(m, "H_INDEX_OFF", H_INDEX_OFF) < 0 ||
        PyModule_AddIntConstant(m, "H_DATA_OFF", H_DATA_OFF) < 0 ||
        PyModule_AddIntConstant(m, "H_STALE", H_STALE) < 0 ||
        PyModule_AddIntConstant(m, "H_INDEX", H_INDEX) < 0 ||
        PyModule_AddIntConstant(m, "R_SEQ", R_SEQ) < 0 ||
        PyModule_AddIntConstant(m, "R_LENS", R_LENS) < 0 ||
        PyModule_AddIntConstant(m, "R_EXPIRY_VFLAG", R_EXPIRY_VFLAG) < 0 ||
        PyModule_AddIntConstant(m, "R_SEQNO", R_SEQNO) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
