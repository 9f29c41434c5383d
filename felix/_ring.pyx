# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Single-producer single-consumer ring of variable-length records in POSIX shared memory.

How it works
------------
One process creates a segment (``Ring.create``), another attaches to it by name
(``Ring.attach``). One of them only writes, the other only reads.

A ring can also live in an anonymous memfd (``Ring.create_memfd``), passed to the
other process as a file descriptor (SCM_RIGHTS) and mapped there with
``Ring.attach_fd``: no name to guess, nothing left behind when both close it. Its
size is sealed (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), so a peer that holds
the fd cannot shrink the file under our mapping (which would make our next access
of the lost pages a SIGBUS). Such a peer may be hostile (a same-host client): it can
write any byte of the mapping at any time. Both sides therefore keep private copies
of everything they read from the header (capacity, mask, max record, taken once at
create/attach) and check every shared word they load (head, tail, record lengths)
against them, as below.

Segment layout (native byte order; offsets in bytes)::

      0  header       magic u64 "FLXRING1", version u32, header_size u32,
                      capacity u64, max_record u64 (written once by the creator)
    128  producer     head u64, records_written u64, full_events u64, doorbells_rung u64
    256  consumer     tail u64, records_read u64, sleeps u64
    384  sleeping     sleeping u32 (set by the consumer, cleared by either side)
   4096  data area    ``capacity`` bytes, a power of two

Each block sits alone on its own 64-byte cache line, and the line after it is left
empty: the adjacent-line prefetcher moves lines in 128-byte pairs, so a neighbour
would still be false sharing. ``head`` and ``tail`` are byte positions that only
grow (64 bits never wrap in practice); a position's place in the data area is
``pos & (capacity - 1)``; ``head - tail`` is the number of bytes in use.

A record is a u32 payload length followed by the payload, padded to 8 bytes, and is
always contiguous, so a reader gets one view per record. When a record does not
fit before the end of the data area, the producer writes the length 0xFFFFFFFF
(a wrap marker) and the record goes to the start; the consumer skips the marker.
A record needs ``align8(4 + n)`` bytes plus at most that much again wasted on a
wrap, so payloads are limited to ``capacity / 2 - 4`` bytes: such a record always
fits in an empty ring, whatever the position.

Memory ordering
---------------
* Producer: writes the record bytes with plain stores, then stores ``head`` with
  release. Consumer: loads ``head`` with acquire, then reads the records below it.
  The release/acquire pair makes the record bytes visible before the new head.
* Consumer: reads the records (possibly long after, through memoryviews), then
  stores ``tail`` with release in ``commit()``. Producer: loads ``tail`` with
  acquire before reusing that space, so the consumer's reads happen before the
  producer's overwrites.
* Doorbell (a store-then-load handshake on both sides, the "store buffering"
  pattern, which acquire/release alone does not order):
  consumer ``sleeping = 1; fence(seq_cst); load head`` and sleeps only if head did
  not move; producer ``store head; fence(seq_cst); load sleeping`` and rings when
  it is set. The two fences are totally ordered: if the producer's comes first,
  the consumer's load sees the new head and does not sleep; otherwise the
  producer's load sees ``sleeping == 1`` and rings. No wake-up is lost. The
  producer clears the flag with an atomic exchange and rings only if it was the
  one to clear it, so one sleep costs at most one ``write(2)``; a consumer that
  finds data after setting the flag clears it the same way (a spurious ring, if
  the producer won that race, is harmless: the consumer drains and re-checks).
* The consumer never trusts the shared words: ``head`` must stay within
  ``tail + capacity``, every record length and wrap marker must stay inside the
  data area and below ``head``. A violation raises RingError instead of reading
  out of bounds. The producer checks ``tail`` the same way.

A producer killed at any point leaves at worst unpublished bytes beyond ``head``
(the aligned 8-byte head store cannot tear): the consumer never sees a partial
record, and a new producer that attaches continues from the published head.

Memory safety: the segment is an ``mmap.mmap``; record views are slices of a
memoryview of it, so the mapping cannot be unmapped while any view exists
(``close()`` leaves it to the last view to unmap it).
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy
from posix.unistd cimport read as c_read, write as c_write

import fcntl
import mmap
import os
import secrets
import stat

from felix.errors import RingError

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>

    /* All shared words are accessed through these, never with plain loads/stores,
       so the compiler can neither tear, fuse nor re-load them. */
    static inline uint64_t flx_load_acquire(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline uint64_t flx_load_relaxed(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void flx_store_release(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void flx_store_relaxed(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    /* Counters have a single writer, so a relaxed load + store is enough (no RMW). */
    static inline void flx_count(uint64_t *p, uint64_t n) {
        __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
    }
    static inline uint32_t flx_load_u32(const uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void flx_store_u32(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    static inline uint32_t flx_exchange_u32(uint32_t *p, uint32_t v) {
        return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
    }
    static inline void flx_fence_seq_cst(void) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    static inline void flx_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    static inline uint64_t flx_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    }
    /* Busy-wait up to spin_ns for *p to differ from old: 1 if it did, 0 on timeout.
       The clock is read every 16 polls (a poll with its pause is tens of ns). */
    static int flx_spin_while_equal(const uint64_t *p, uint64_t old, uint64_t spin_ns) {
        uint64_t deadline = flx_now_ns() + spin_ns;
        for (;;) {
            for (int i = 0; i < 16; i++) {
                if (__atomic_load_n(p, __ATOMIC_ACQUIRE) != old) return 1;
                flx_cpu_relax();
            }
            if (flx_now_ns() >= deadline) return 0;
        }
    }
    """
    uint64_t flx_load_acquire(const uint64_t* p) nogil
    uint64_t flx_load_relaxed(const uint64_t* p) nogil
    void flx_store_release(uint64_t* p, uint64_t v) nogil
    void flx_store_relaxed(uint64_t* p, uint64_t v) nogil
    void flx_count(uint64_t* p, uint64_t n) nogil
    uint32_t flx_load_u32(const uint32_t* p) nogil
    void flx_store_u32(uint32_t* p, uint32_t v) nogil
    uint32_t flx_exchange_u32(uint32_t* p, uint32_t v) nogil
    void flx_fence_seq_cst() nogil
    int flx_spin_while_equal(const uint64_t* p, uint64_t old, uint64_t spin_ns) nogil


cdef enum:
    _HEADER_SIZE = 4096
    _OFF_MAGIC = 0
    _OFF_VERSION = 8
    _OFF_HEADER_SIZE = 12
    _OFF_CAPACITY = 16
    _OFF_MAX_RECORD = 24
    _OFF_HEAD = 128
    _OFF_RECORDS_WRITTEN = 136
    _OFF_FULL_EVENTS = 144
    _OFF_DOORBELLS_RUNG = 152
    _OFF_TAIL = 256
    _OFF_RECORDS_READ = 264
    _OFF_SLEEPS = 272
    _OFF_SLEEPING = 384
    _LEN_SIZE = 4

cdef uint64_t _MAGIC = 0x31474E4952584C46  # b"FLXRING1" read as a little-endian u64
cdef uint32_t _VERSION = 1
cdef uint32_t _WRAP = 0xFFFFFFFF
cdef uint64_t _MIN_CAPACITY = 64
cdef uint64_t _MAX_CAPACITY = (<uint64_t>1) << 32

#: Bytes before the data area (header page).
HEADER_SIZE = _HEADER_SIZE
#: Version of the segment layout; attach refuses any other.
LAYOUT_VERSION = _VERSION
#: Smallest and largest data-area size (both powers of two).
MIN_CAPACITY = _MIN_CAPACITY
MAX_CAPACITY = _MAX_CAPACITY
#: Data-area size used when create() is not told one (1 MiB).
DEFAULT_CAPACITY = 1 << 20
#: Default read_batch() limits.
DEFAULT_MAX_RECORDS = 1024
DEFAULT_MAX_BYTES = 1 << 62

cdef int _MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
# A memfd ring is made for a same-host client on request: its pages are allocated as
# they are used, not up front, so a client that connects and leaves in a loop costs
# the node little (an 8 MiB ring populated up front cost ~5 ms of the gateway's loop).
cdef int _MEMFD_MAP_FLAGS = mmap.MAP_SHARED


cdef inline uint64_t _align8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


def record_footprint(Py_ssize_t size):
    """Bytes a record with a payload of ``size`` bytes takes in the data area (no wrap)."""
    if size < 0:
        raise ValueError("size must be >= 0")
    return _align8(_LEN_SIZE + <uint64_t>size)


def _check_capacity(long long capacity):
    if capacity < <long long>_MIN_CAPACITY or capacity > <long long>_MAX_CAPACITY:
        raise ValueError(
            f"capacity must be between {_MIN_CAPACITY} and {_MAX_CAPACITY}, got {capacity}"
        )
    if capacity & (capacity - 1):
        raise ValueError(f"capacity must be a power of two, got {capacity}")


def _new_name():
    return f"/felix-ring-{os.getpid()}-{secrets.token_hex(6)}"


@cython.final
cdef Ring _mapped(str name, object mm, Py_ssize_t size):
    """A Ring over an attached mapping ``mm`` of ``size`` bytes, its header validated
    (closed again if not valid); the caller sets the descriptors."""
    cdef Ring ring = Ring.__new__(Ring)
    ring.name = name
    ring._owner = False
    ring._map(mm)
    try:
        ring._validate_header(size)
    except BaseException:
        ring.close()
        raise
    return ring


cdef class Ring:
    """One SPSC ring in a POSIX shared-memory segment. See the module docstring.

    Create with :meth:`create` or :meth:`attach`. One process calls only the producer
    methods (``write``, ``write_batch``, ``publish``), one only the consumer methods
    (``read_batch``, ``commit``, ``next_batch``, ``read``, ``prepare_sleep``,
    ``drain_doorbell``); the counters and sizes can be read from anywhere.
    A Ring object is not thread-safe. A forked child inherits the object: let it
    ``close()`` (not leave a ``with`` block, which unlinks) or attach its own.
    """

    def __cinit__(self):
        self._doorbell_fd = -1
        self._fd = -1
        self._data = NULL
        self._has_buf = False
        self.name = ""

    def __init__(self, *args, **kwargs):
        raise TypeError("use Ring.create() or Ring.attach()")

    def __dealloc__(self):
        if self._has_buf:
            PyBuffer_Release(&self._buf)
            self._has_buf = False
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, name=None, *, long long capacity=DEFAULT_CAPACITY, int doorbell_fd=-1):
        """Create a new segment (O_CREAT|O_EXCL, mode 0600) and map it.

        ``name`` defaults to a fresh unique ``/felix-ring-<pid>-<random>``.
        ``capacity`` is the data-area size, a power of two in
        [MIN_CAPACITY, MAX_CAPACITY]. ``doorbell_fd`` is the eventfd this side rings
        when it produces into a sleeping consumer (-1: none).
        Raises ValueError for a bad capacity, RingError if the name exists or the
        segment cannot be created. Leaving a ``with`` block unlinks the name.
        """
        _check_capacity(capacity)
        if doorbell_fd < -1:
            raise ValueError("doorbell_fd must be a file descriptor or -1")
        if name is None:
            name = _new_name()
        elif not isinstance(name, str):
            raise TypeError("name must be a str")
        cdef Py_ssize_t size = _HEADER_SIZE + capacity
        import posix_ipc  # named rings only (the server extra); memfd rings need none
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            raise RingError(f"shared-memory segment {name!r} already exists") from None
        except (posix_ipc.Error, OSError) as exc:
            raise RingError(f"cannot create shared-memory segment {name!r}: {exc}") from exc
        try:
            try:
                mm = mmap.mmap(shm.fd, size, flags=_MAP_FLAGS)
            finally:
                shm.close_fd()
        except BaseException:
            posix_ipc.unlink_shared_memory(name)
            raise
        cdef Ring ring = Ring.__new__(Ring)
        ring.name = name
        ring._owner = True
        ring._map(mm)
        ring._init_header(<uint64_t>capacity)
        ring.doorbell_fd = doorbell_fd
        return ring

    @classmethod
    def attach(cls, name, *, int doorbell_fd=-1):
        """Map an existing segment by name after validating its header.

        Raises RingError if there is no such segment, or if its magic, version,
        header size, capacity or size do not describe a felix ring.
        """
        if not isinstance(name, str):
            raise TypeError("name must be a str")
        if doorbell_fd < -1:
            raise ValueError("doorbell_fd must be a file descriptor or -1")
        import posix_ipc
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise RingError(f"no shared-memory ring named {name!r}") from None
        except (posix_ipc.Error, OSError) as exc:
            raise RingError(f"cannot open shared-memory segment {name!r}: {exc}") from exc
        try:
            size = shm.size
            if size < _HEADER_SIZE + _MIN_CAPACITY:
                raise RingError(f"segment {name!r} is too small for a ring ({size} bytes)")
            mm = mmap.mmap(shm.fd, size, flags=_MAP_FLAGS)
        finally:
            shm.close_fd()
        cdef Ring ring = _mapped(name, mm, size)
        ring.doorbell_fd = doorbell_fd
        return ring

    @classmethod
    def create_memfd(cls, *, long long capacity=DEFAULT_CAPACITY, int doorbell_fd=-1):
        """Create a ring in a new anonymous memfd (close-on-exec), sealed against resizing.

        The ring owns the memfd (``fd``) and closes it in close(); hand it to another
        process with SCM_RIGHTS (it gets its own descriptor) and map it there with
        :meth:`attach_fd`. Raises ValueError for a bad capacity, RingError if the
        memfd cannot be made.
        """
        _check_capacity(capacity)
        if doorbell_fd < -1:
            raise ValueError("doorbell_fd must be a file descriptor or -1")
        cdef Py_ssize_t size = _HEADER_SIZE + capacity
        try:
            fd = os.memfd_create("felix-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise RingError(f"cannot create a memfd ring: {exc}") from exc
        cdef Ring ring
        try:
            os.ftruncate(fd, size)
            # Sealed before anyone else can hold the fd: the size is final from now on.
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            mm = mmap.mmap(fd, size, flags=_MEMFD_MAP_FLAGS)
        except OSError as exc:
            os.close(fd)
            raise RingError(f"cannot set up a memfd ring of {size} bytes: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        ring = Ring.__new__(Ring)
        ring.name = f"memfd:{fd}"
        ring._owner = False
        ring._fd = fd
        ring._memfd_creator = True
        ring._map(mm)
        ring._init_header(<uint64_t>capacity)
        ring.doorbell_fd = doorbell_fd
        return ring

    @classmethod
    def attach_fd(cls, int fd, *, int doorbell_fd=-1):
        """Map the memfd ring ``fd`` (made by :meth:`create_memfd` in another process).

        Checks that it is a regular file sealed against shrinking, of a ring's size,
        with a valid header. On success the ring owns ``fd`` (closed in close()); on
        failure (RingError) the caller still does.
        """
        if fd < 0:
            raise ValueError("fd must be a file descriptor")
        if doorbell_fd < -1:
            raise ValueError("doorbell_fd must be a file descriptor or -1")
        name = f"memfd:{fd}"
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            raise RingError(f"ring {name!r}: not a sealed memfd: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise RingError(f"ring {name!r} is not a regular file")
        if not seals & fcntl.F_SEAL_SHRINK:
            # Unsealed, its owner could shrink it under our mapping (SIGBUS on access).
            raise RingError(f"ring {name!r} is not sealed against shrinking")
        size = st.st_size
        if size < _HEADER_SIZE + _MIN_CAPACITY or size > _HEADER_SIZE + _MAX_CAPACITY:
            raise RingError(f"ring {name!r} has no ring's size ({size} bytes)")
        try:
            mm = mmap.mmap(fd, size, flags=_MAP_FLAGS)
        except OSError as exc:
            raise RingError(f"cannot map ring {name!r}: {exc}") from exc
        cdef Ring ring = _mapped(name, mm, size)
        ring._fd = fd
        ring.doorbell_fd = doorbell_fd
        return ring

    cdef int _init_header(self, uint64_t capacity) except -1:
        cdef char* base = <char*>self._buf.buf
        (<uint32_t*>(base + _OFF_VERSION))[0] = _VERSION
        (<uint32_t*>(base + _OFF_HEADER_SIZE))[0] = _HEADER_SIZE
        (<uint64_t*>(base + _OFF_CAPACITY))[0] = capacity
        (<uint64_t*>(base + _OFF_MAX_RECORD))[0] = capacity // 2 - _LEN_SIZE
        # Magic last, with release: whoever sees it (acquire) sees a complete header.
        flx_store_release(<uint64_t*>(base + _OFF_MAGIC), _MAGIC)
        self._setup(capacity)
        return 0

    cdef int _map(self, object mm) except -1:
        self._mmap = mm
        PyObject_GetBuffer(mm, &self._buf, PyBUF_WRITABLE)
        self._has_buf = True
        self._view = memoryview(mm).toreadonly()
        return 0

    cdef int _validate_header(self, Py_ssize_t size) except -1:
        cdef char* base = <char*>self._buf.buf
        cdef uint64_t magic = flx_load_acquire(<uint64_t*>(base + _OFF_MAGIC))
        if magic == 0:
            raise RingError(f"segment {self.name!r} is not a felix ring, or not initialised yet")
        if magic != _MAGIC:
            raise RingError(f"segment {self.name!r} is not a felix ring (bad magic {magic:#x})")
        cdef uint32_t version = (<uint32_t*>(base + _OFF_VERSION))[0]
        if version != _VERSION:
            raise RingError(
                f"ring {self.name!r} has layout version {version}, expected {_VERSION}"
            )
        cdef uint32_t header_size = (<uint32_t*>(base + _OFF_HEADER_SIZE))[0]
        cdef uint64_t capacity = (<uint64_t*>(base + _OFF_CAPACITY))[0]
        cdef uint64_t max_record = (<uint64_t*>(base + _OFF_MAX_RECORD))[0]
        if header_size != _HEADER_SIZE:
            raise RingError(f"ring {self.name!r} has header size {header_size}")
        if (
            capacity < _MIN_CAPACITY
            or capacity > _MAX_CAPACITY
            or capacity & (capacity - 1)
            or <uint64_t>size != _HEADER_SIZE + capacity
            or max_record != capacity // 2 - _LEN_SIZE
        ):
            raise RingError(
                f"ring {self.name!r} has inconsistent sizes: capacity {capacity}, "
                f"max_record {max_record}, segment {size} bytes"
            )
        self._setup(capacity)
        return 0

    cdef int _setup(self, uint64_t capacity) except -1:
        cdef char* base = <char*>self._buf.buf
        self._capacity = capacity
        self._mask = capacity - 1
        self._max_record = capacity // 2 - _LEN_SIZE
        self._head_p = <uint64_t*>(base + _OFF_HEAD)
        self._records_written_p = <uint64_t*>(base + _OFF_RECORDS_WRITTEN)
        self._full_events_p = <uint64_t*>(base + _OFF_FULL_EVENTS)
        self._doorbells_rung_p = <uint64_t*>(base + _OFF_DOORBELLS_RUNG)
        self._tail_p = <uint64_t*>(base + _OFF_TAIL)
        self._records_read_p = <uint64_t*>(base + _OFF_RECORDS_READ)
        self._sleeps_p = <uint64_t*>(base + _OFF_SLEEPS)
        self._sleeping_p = <uint32_t*>(base + _OFF_SLEEPING)
        # Both sides start from the published positions, so a producer that replaces a
        # dead one continues at the last published head. The other side may be running:
        # a tail read before head and unchanged after it was the tail when head was read
        # (tail only grows), so the pair is a consistent snapshot.
        cdef uint64_t tail = 0, head = 0
        cdef int attempt
        for attempt in range(10000):
            tail = flx_load_acquire(self._tail_p)
            head = flx_load_acquire(self._head_p)
            if flx_load_acquire(self._tail_p) == tail:
                break
        else:
            raise RingError(f"ring {self.name!r}: no consistent head/tail snapshot")
        if (head | tail) & 7 or head - tail > capacity:
            raise RingError(
                f"corrupted ring {self.name!r}: head {head}, tail {tail}, capacity {capacity}"
            )
        self._head = head
        self._published_head = head
        self._cached_tail = tail
        self._unpublished = 0
        self._tail = tail
        self._read_pos = tail
        self._cached_head = head
        self._uncommitted = 0
        self._data = base + _HEADER_SIZE
        return 0

    def close(self):
        """Unmap this side (idempotent). The segment and its name stay (see unlink()).

        Record views still alive keep the mapping: it is unmapped when the last one
        is released. Every other method raises RingError afterwards.
        """
        if self._data == NULL and not self._has_buf and self._fd < 0:
            return
        if self._memfd_creator and self._mmap is not None:
            # The peer may keep its descriptor of the memfd (and so the pages) alive
            # after the connection ended: free them now, whoever still holds the fd
            # (a hole punch: allowed by the seals, which only forbid resizing). Views
            # still alive read zeros from here on, never freed memory.
            self._memfd_creator = False
            try:
                self._mmap.madvise(mmap.MADV_REMOVE)
            except (OSError, ValueError, AttributeError):
                pass  # a kernel without it: the pages go with the last descriptor
        self._data = NULL
        if self._has_buf:
            PyBuffer_Release(&self._buf)
            self._has_buf = False
        view, self._view = self._view, None
        mm, self._mmap = self._mmap, None
        if view is not None:
            view.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # record views are alive; the last of them unmaps the segment
        if self._fd >= 0:
            # The mapping (if views keep it) stays valid without the descriptor.
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass

    def unlink(self):
        """Remove the segment's name (idempotent); mappings stay valid until closed.

        A memfd ring has no name: nothing to do.
        """
        if self._fd >= 0 or self.name.startswith("memfd:"):
            self._owner = False
            return
        import posix_ipc
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass
        self._owner = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        if self._owner:
            self.unlink()
        return None

    def __repr__(self):
        if self._data == NULL:
            return f"<Ring {self.name!r} closed>"
        return f"<Ring {self.name!r} capacity={self._capacity} used={self.used_bytes}>"

    def __reduce__(self):
        raise TypeError("a Ring cannot be pickled; pass its name (or memfd) and attach")

    cdef int _check_open(self) except -1:
        if self._data == NULL:
            raise RingError(f"ring {self.name!r} is closed")
        return 0

    # ------------------------------------------------------------------ properties

    @property
    def closed(self):
        """True once close() was called."""
        return self._data == NULL

    @property
    def fd(self):
        """The memfd behind a memfd ring (owned: closed by close()), -1 for a named ring."""
        return self._fd

    @property
    def doorbell_fd(self):
        """The eventfd rung for a sleeping consumer, or -1. Not owned: never closed here."""
        return self._doorbell_fd

    @doorbell_fd.setter
    def doorbell_fd(self, int fd):
        if fd < -1:
            raise ValueError("doorbell_fd must be a file descriptor or -1")
        self._doorbell_fd = fd

    @property
    def capacity(self):
        """Size of the data area in bytes."""
        self._check_open()
        return self._capacity

    @property
    def max_record_size(self):
        """Largest payload one record may have (capacity // 2 - 4)."""
        self._check_open()
        return self._max_record

    @property
    def used_bytes(self):
        """Published bytes (records, padding, wrap waste) not yet committed by the consumer."""
        self._check_open()
        cdef uint64_t tail = flx_load_acquire(self._tail_p)
        cdef uint64_t head = flx_load_acquire(self._head_p)
        if head <= tail:  # the two loads are not one snapshot
            return 0
        return min(head - tail, self._capacity)

    @property
    def free_bytes(self):
        """capacity - used_bytes. A record may need more than its footprint near a wrap."""
        return self._capacity - self.used_bytes

    @property
    def records_written(self):
        """Records published by the producer(s) since the segment was created."""
        self._check_open()
        return flx_load_relaxed(self._records_written_p)

    @property
    def records_read(self):
        """Records committed by the consumer since the segment was created."""
        self._check_open()
        return flx_load_relaxed(self._records_read_p)

    @property
    def full_events(self):
        """write()/write_batch() calls that stopped because the ring was full."""
        self._check_open()
        return flx_load_relaxed(self._full_events_p)

    @property
    def doorbells_rung(self):
        """Times the producer rang the doorbell (once per consumer sleep at most)."""
        self._check_open()
        return flx_load_relaxed(self._doorbells_rung_p)

    @property
    def sleeps(self):
        """Times prepare_sleep() told the consumer to wait for the doorbell."""
        self._check_open()
        return flx_load_relaxed(self._sleeps_p)

    # ------------------------------------------------------------------ producer

    cdef char* c_reserve(self, size_t size) except? NULL:
        if size > self._max_record:
            raise ValueError(
                f"record of {size} bytes exceeds the ring's max_record_size {self._max_record}"
            )
        cdef uint64_t need = _align8(_LEN_SIZE + size)
        cdef uint64_t head = self._head
        cdef uint64_t idx = head & self._mask
        cdef uint64_t to_end = self._capacity - idx
        # Positions are multiples of 8, so to_end >= 8 always has room for a wrap marker.
        cdef uint64_t total = need if need <= to_end else to_end + need
        if total > self._capacity - (head - self._cached_tail):
            # Only now look at the consumer's cache line (acquire: its reads of that
            # space are done before we overwrite it).
            self._refresh_tail()
            if total > self._capacity - (head - self._cached_tail):
                return NULL
        if need > to_end:
            (<uint32_t*>(self._data + idx))[0] = _WRAP
            self._head = head + to_end
            idx = 0
        return self._data + idx + _LEN_SIZE

    cdef void c_advance(self, size_t size) noexcept:
        (<uint32_t*>(self._data + (self._head & self._mask)))[0] = <uint32_t>size
        self._head += _align8(_LEN_SIZE + size)
        self._unpublished += 1

    cdef int c_publish(self) except -1:
        if self._head == self._published_head:
            return 0
        # Release: every record byte written above is visible before the new head.
        flx_store_release(self._head_p, self._head)
        self._published_head = self._head
        flx_count(self._records_written_p, self._unpublished)
        self._unpublished = 0
        if self._doorbell_fd >= 0:
            # Store head, full fence, load sleeping: pairs with prepare_sleep (see the
            # module docstring); without the fence the load could pass the store.
            flx_fence_seq_cst()
            if flx_load_u32(self._sleeping_p) and flx_exchange_u32(self._sleeping_p, 0):
                self._ring_doorbell()
        return 0

    cdef int _ring_doorbell(self) except -1:
        cdef uint64_t one = 1
        cdef Py_ssize_t n
        while True:
            n = c_write(self._doorbell_fd, &one, 8)
            if n == 8:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:  # counter saturated: the consumer is signalled anyway
                break
            raise OSError(errno, f"ringing doorbell fd {self._doorbell_fd}: {os.strerror(errno)}")
        flx_count(self._doorbells_rung_p, 1)
        return 0

    cdef int _refresh_tail(self) except -1:
        cdef uint64_t tail = flx_load_acquire(self._tail_p)
        if tail & 7 or tail < self._cached_tail or tail > self._published_head:
            raise RingError(
                f"corrupted ring {self.name!r}: tail {tail} outside "
                f"[{self._cached_tail}, {self._published_head}]"
            )
        self._cached_tail = tail
        return 0

    cdef int _write_one(self, object record) except -1:
        """Copy one record in (unpublished): 1 if written, 0 if the ring is full."""
        cdef Py_buffer buf
        cdef const char* src
        cdef Py_ssize_t n
        cdef char* dst
        if PyBytes_CheckExact(record):
            src = PyBytes_AS_STRING(record)
            n = PyBytes_GET_SIZE(record)
            dst = self.c_reserve(<size_t>n)
            if dst == NULL:
                return 0
            memcpy(dst, src, <size_t>n)
            self.c_advance(<size_t>n)
            return 1
        PyObject_GetBuffer(record, &buf, PyBUF_SIMPLE)
        try:
            dst = self.c_reserve(<size_t>buf.len)
            if dst == NULL:
                return 0
            memcpy(dst, buf.buf, <size_t>buf.len)
            self.c_advance(<size_t>buf.len)
            return 1
        finally:
            PyBuffer_Release(&buf)

    def write(self, record, *, bint publish=True):
        """Append one record (any contiguous bytes-like object).

        Returns False, writing nothing, when the ring is full. With publish=False the
        record stays invisible to the consumer until publish() (or a later publishing
        write). Raises ValueError if the record is larger than max_record_size.
        """
        self._check_open()
        if not self._write_one(record):
            flx_count(self._full_events_p, 1)
            return False
        if publish:
            self.c_publish()
        return True

    def write_batch(self, records, *, bint publish=True):
        """Append records in order until one does not fit; return how many were written.

        One head store (and at most one doorbell) for the whole batch. If any record is
        larger than max_record_size, raises ValueError and nothing from this batch is
        written (records from earlier unpublished writes stay pending).
        """
        self._check_open()
        cdef uint64_t start_head = self._head
        cdef uint64_t start_unpublished = self._unpublished
        cdef Py_ssize_t count = 0
        try:
            for record in records:
                if not self._write_one(record):
                    flx_count(self._full_events_p, 1)
                    break
                count += 1
        except BaseException:
            # Nothing of this batch was published: forget it.
            self._head = start_head
            self._unpublished = start_unpublished
            raise
        if publish:
            self.c_publish()
        return count

    def publish(self):
        """Make all records written so far visible, ringing the doorbell if the consumer sleeps."""
        self._check_open()
        self.c_publish()

    # ------------------------------------------------------------------ consumer

    cdef int _refresh_head(self) except -1:
        cdef uint64_t head = flx_load_acquire(self._head_p)
        # tail <= read_pos <= cached_head <= head <= tail + capacity, all multiples of 8.
        if head & 7 or head < self._cached_head or head - self._tail > self._capacity:
            raise RingError(
                f"corrupted ring {self.name!r}: head {head} outside "
                f"[{self._cached_head}, {self._tail + self._capacity}]"
            )
        self._cached_head = head
        return 0

    cdef int _peek(self, uint64_t* offset, uint32_t* size, uint64_t* need) except -1:
        """Find the record at the read cursor, skipping a wrap marker: 1 if any, 0 if empty.

        Sets its payload offset in the data area, its size and its footprint. Every
        value read from the data area is checked against the ring bounds first.
        """
        cdef uint64_t pos, idx, footprint
        cdef uint32_t n
        while True:
            pos = self._read_pos
            if pos == self._cached_head:
                self._refresh_head()
                if pos == self._cached_head:
                    return 0
            idx = pos & self._mask
            n = flx_load_u32(<uint32_t*>(self._data + idx))
            if n == _WRAP:
                if pos + (self._capacity - idx) > self._cached_head:
                    raise RingError(
                        f"corrupted ring {self.name!r}: wrap marker at {pos} passes head "
                        f"{self._cached_head}"
                    )
                self._read_pos = pos + (self._capacity - idx)
                continue
            footprint = _align8(_LEN_SIZE + <uint64_t>n)
            if n > self._max_record or idx + footprint > self._capacity or (
                pos + footprint > self._cached_head
            ):
                raise RingError(
                    f"corrupted ring {self.name!r}: record length {n} at {pos} does not fit "
                    f"(head {self._cached_head}, capacity {self._capacity})"
                )
            offset[0] = idx + _LEN_SIZE
            size[0] = n
            need[0] = footprint
            return 1

    def read_batch(self, Py_ssize_t max_records=DEFAULT_MAX_RECORDS,
                   Py_ssize_t max_bytes=DEFAULT_MAX_BYTES):
        """Return up to max_records read-only views of the next records, oldest first.

        Stops before the record that would take the total payload past max_bytes (the
        first record is always returned). Views point into shared memory and are
        valid until commit(): after it the producer may overwrite them. Returns an
        empty list when there is nothing new. Raises RingError if the ring is corrupt.
        """
        self._check_open()
        return self._read_batch(max_records, max_bytes)

    def next_batch(self, Py_ssize_t max_records=DEFAULT_MAX_RECORDS,
                   Py_ssize_t max_bytes=DEFAULT_MAX_BYTES, long long spin_ns=0):
        """One consumer step: commit(), then read_batch(); if that finds nothing,
        prepare_sleep(spin_ns), and read again if data raced in.

        Returns an empty list only when the consumer has announced that it sleeps:
        it may now wait for the doorbell. Same result as those calls one by one, in
        one call (a wake-up of an event-loop consumer is drain_doorbell() and
        next_batch() until it returns []).
        """
        self._check_open()
        self._commit()
        cdef list out = self._read_batch(max_records, max_bytes)
        while not out and not self._prepare_sleep(spin_ns):
            out = self._read_batch(max_records, max_bytes)
        return out

    cdef list _read_batch(self, Py_ssize_t max_records, Py_ssize_t max_bytes):
        if max_records < 1 or max_bytes < 0:
            raise ValueError("max_records must be >= 1 and max_bytes >= 0")
        cdef list out = []
        cdef uint64_t offset, need
        cdef uint32_t size
        cdef Py_ssize_t count = 0
        cdef Py_ssize_t nbytes = 0
        cdef Py_ssize_t start
        view = self._view
        while count < max_records and self._peek(&offset, &size, &need):
            if count and nbytes + <Py_ssize_t>size > max_bytes:
                break
            start = <Py_ssize_t>(_HEADER_SIZE + offset)
            out.append(view[start:start + <Py_ssize_t>size])
            self._read_pos += need
            nbytes += size
            count += 1
        self._uncommitted += count
        return out

    def read(self):
        """Copy out the next record and commit (with everything read before), or None."""
        self._check_open()
        cdef uint64_t offset, need
        cdef uint32_t size
        if not self._peek(&offset, &size, &need):
            return None
        data = PyBytes_FromStringAndSize(self._data + offset, size)
        self._read_pos += need
        self._uncommitted += 1
        self._commit()
        return data

    cdef int _commit(self) except -1:
        if self._read_pos == self._tail:
            return 0
        # Release: our reads of the records happen before the producer reuses the space.
        flx_store_release(self._tail_p, self._read_pos)
        self._tail = self._read_pos
        flx_count(self._records_read_p, self._uncommitted)
        self._uncommitted = 0
        return 0

    def commit(self):
        """Give the space of every record read so far back to the producer.

        Views returned by read_batch() must not be used afterwards.
        """
        self._check_open()
        self._commit()

    def prepare_sleep(self, long long spin_ns=0):
        """Announce that the consumer is about to wait for the doorbell.

        Returns True if the consumer may now wait (the producer will ring for the next
        record), False if data is available (read it instead; the announcement is
        withdrawn). With spin_ns > 0, first busy-polls for up to that many
        nanoseconds (releasing the GIL), returning False as soon as data arrives.
        """
        self._check_open()
        return self._prepare_sleep(spin_ns)

    cdef bint _prepare_sleep(self, long long spin_ns) except -1:
        if self._read_pos != self._cached_head:
            return False
        cdef uint64_t pos = self._read_pos
        cdef int arrived
        if spin_ns > 0:
            with nogil:
                arrived = flx_spin_while_equal(self._head_p, pos, <uint64_t>spin_ns)
            if arrived:
                return False
        # Store sleeping, full fence, load head: pairs with c_publish (module docstring).
        flx_store_u32(self._sleeping_p, 1)
        flx_fence_seq_cst()
        if flx_load_relaxed(self._head_p) != pos:
            flx_exchange_u32(self._sleeping_p, 0)
            return False
        flx_count(self._sleeps_p, 1)
        return True

    def drain_doorbell(self):
        """Reset the doorbell eventfd; return its counter (0 if it was not rung)."""
        if self._doorbell_fd < 0:
            raise RingError(f"ring {self.name!r} has no doorbell")
        cdef uint64_t value = 0
        cdef Py_ssize_t n
        while True:
            n = c_read(self._doorbell_fd, &value, 8)
            if n == 8:
                return value
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return 0
            raise OSError(errno, f"draining doorbell fd {self._doorbell_fd}: {os.strerror(errno)}")
