# Declarations shared with other Cython modules (cimport felix._codec).
from libc.stdint cimport uint8_t, uint16_t, uint64_t


cdef class Frame:
    cdef readonly int version
    cdef readonly int flags
    cdef readonly bytes payload


cdef class PublishBatch:
    cdef readonly str tenant_id
    cdef readonly str namespace
    cdef readonly str stream
    cdef readonly list payloads
    cdef readonly object request_id
    cdef readonly object ack


cdef class BinaryPublishAck:
    cdef readonly object request_id
    cdef readonly bint ok
    cdef readonly object message


cdef class EventBatch:
    cdef readonly object subscription_id
    cdef readonly object base_offset
    cdef readonly list payloads


cdef class ExtMessage:
    cdef readonly int opcode
    cdef readonly object request_id
