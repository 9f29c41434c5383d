# Declarations of felix._ring, so other Cython modules can `cimport` the ring and call its
# C-level producer API (reserve / advance / publish) without a Python call per record.
# The layout and the memory-ordering argument are in the docstring of felix/_ring.pyx.

cimport cython
from libc.stdint cimport uint32_t, uint64_t


@cython.final
cdef class Ring:
    cdef readonly str name
    cdef int _doorbell_fd          # eventfd the producer rings; -1: no doorbell (busy-poll)
    cdef bint _owner               # this object created the segment (the context manager unlinks)
    cdef int _fd                   # the memfd behind the mapping, owned (closed on close); -1: named
    cdef bint _memfd_creator       # made by create_memfd: close() frees the memfd's pages
    cdef object _mmap              # mmap.mmap of the whole segment; keeps the mapping alive
    cdef object _view              # read-only memoryview of _mmap; record views are its slices
    cdef Py_buffer _buf            # our own export of _mmap, giving the raw pointer below
    cdef bint _has_buf
    cdef char* _data               # start of the data area (NULL once closed)
    cdef uint64_t _capacity        # data area size, a power of two
    cdef uint64_t _mask            # _capacity - 1
    cdef uint64_t _max_record      # largest payload a record may have

    # Shared words (see the layout in _ring.pyx); only touched through C atomics.
    cdef uint64_t* _head_p
    cdef uint64_t* _tail_p
    cdef uint32_t* _sleeping_p
    cdef uint64_t* _records_written_p
    cdef uint64_t* _full_events_p
    cdef uint64_t* _doorbells_rung_p
    cdef uint64_t* _records_read_p
    cdef uint64_t* _sleeps_p

    # Producer-private state.
    cdef uint64_t _head            # next write position (may run ahead of the published head)
    cdef uint64_t _published_head  # last head stored to shared memory
    cdef uint64_t _cached_tail     # last tail loaded; refreshed only when space seems short
    cdef uint64_t _unpublished     # records written since the last publish

    # Consumer-private state.
    cdef uint64_t _read_pos        # next read position (runs ahead of tail until commit)
    cdef uint64_t _tail            # last tail stored to shared memory
    cdef uint64_t _cached_head     # last head loaded; refreshed only when the cursor reaches it
    cdef uint64_t _uncommitted     # records read since the last commit

    # C-level producer API. c_reserve returns where to write a payload of `size` bytes, or
    # NULL without an exception when the ring is full; c_advance then finalises the record
    # (size must not exceed the reserved size); c_publish makes everything written visible to
    # the consumer and rings the doorbell if it sleeps.
    cdef char* c_reserve(self, size_t size) except? NULL
    cdef void c_advance(self, size_t size) noexcept
    cdef int c_publish(self) except -1

    cdef int _map(self, object mm) except -1
    cdef int _validate_header(self, Py_ssize_t size) except -1
    cdef int _setup(self, uint64_t capacity) except -1
    cdef int _init_header(self, uint64_t capacity) except -1
    cdef int _check_open(self) except -1
    cdef int _refresh_tail(self) except -1
    cdef int _refresh_head(self) except -1
    cdef int _peek(self, uint64_t* offset, uint32_t* size, uint64_t* need) except -1
    cdef int _commit(self) except -1
    cdef list _read_batch(self, Py_ssize_t max_records, Py_ssize_t max_bytes)
    cdef bint _prepare_sleep(self, long long spin_ns) except -1
    cdef int _ring_doorbell(self) except -1
    cdef int _write_one(self, object record) except -1
