# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Many UDP datagrams, one system call: sendmmsg(2) on a non-blocking socket (Linux).

Why: a gateway fanning a record out to 64 subscribers builds 64 (or more)
datagrams in one loop tick, all leaving through the one UDP socket its
connections share. Sent one ``sendto`` at a time, each costs a system call and a
trip through the event loop's transport; handed to the kernel together, the
entry and exit cost is paid once per ``capacity`` datagrams.

How it works: :class:`UdpSender` keeps preallocated ``mmsghdr``/``iovec``/address
arrays for ``capacity`` messages, so a send allocates nothing. ``send(fd,
datagrams, start)`` fills them from a list of ``(bytes, address)`` pairs, the
addresses as asyncio gives them (``(host, port)`` for IPv4, ``(host, port,
flowinfo, scope_id)`` for IPv6, numeric hosts only; None on a connected
socket), and calls ``sendmmsg`` until the list is done or the kernel would block:

* a partial count (the kernel took some, then stopped) continues after them;
* EINTR retries the same call;
* EAGAIN/EWOULDBLOCK (send buffer full) stops and returns the index of the first
  datagram not sent: the caller decides whether to queue or drop the rest;
* any other error fails only the first datagram of that call (sendmmsg reports
  an error only when nothing was sent, so it belongs to that one): it is skipped
  and counted in ``failed`` with its errno in ``last_error``, as a lone
  ``sendto`` would have failed alone. An address that cannot be parsed is
  failed the same way (EINVAL) without reaching the kernel.

UDP GSO (``gso=True``): consecutive datagrams to one address (one connection's
burst) become one message whose ``UDP_SEGMENT`` control message tells the kernel
to split it into datagrams of the first one's size (each segment that size, the
last one possibly shorter; at most 64 segments and 65000 bytes): one trip
through the UDP/IP stack instead of one per datagram; the receiver gets the same
datagrams. A kernel that refuses a GSO message (EIO where the device cannot
checksum it, for one) turns GSO off in that sender, and the same datagrams go
again one per message. ``send`` still counts datagrams, not messages.

The GIL is held throughout: the socket is non-blocking, so no call waits.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_Check
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_Check
from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, EOPNOTSUPP, errno
from libc.stdint cimport uint16_t
from libc.string cimport memset
from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int sendmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen)
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    size_t CMSG_LEN(size_t)
    size_t CMSG_SPACE(size_t)
    unsigned char *CMSG_DATA(cmsghdr *)


cdef extern from "<netinet/in.h>" nogil:
    ctypedef unsigned short in_port_t
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        sa_family_t sin_family
        in_port_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        in_port_t sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short htons(unsigned short)
    unsigned int htonl(unsigned int)


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)


# One slot holds either kind of address.
cdef union _SockAddr:
    sockaddr_in v4
    sockaddr_in6 v6


# UDP GSO (linux/udp.h; netinet/udp.h of older C libraries lacks UDP_SEGMENT).
cdef enum:
    _SOL_UDP = 17
    _UDP_SEGMENT = 103
    # Segments per GSO message: the kernel's UDP_MAX_SEGMENTS was 64 before 6.9.
    _GSO_MAX_SEGMENTS = 64
    # Payload bytes per GSO message: one UDP length field (65535) minus headers.
    _GSO_MAX_BYTES = 65000
    # iovec slots per call: one per datagram, so a call holds at most this many.
    _IOV_SLOTS = 1024

# Room for one cmsghdr with a u16 (CMSG_SPACE(2) is 24 on 64-bit Linux).
cdef Py_ssize_t _CTRL_SPACE = 32

#: Messages per sendmmsg call by default (the kernel takes up to UIO_MAXIOV, 1024).
DEFAULT_CAPACITY = 64
#: The most a sender may be made for (UIO_MAXIOV).
MAX_CAPACITY = 1024


cdef int _fill_address(object addr, _SockAddr *out):
    """Write ``addr`` into ``out``; its length, 0 for None, -1 if it is not a numeric address."""
    cdef Py_ssize_t n, size
    cdef unsigned short port
    cdef const char *host
    if addr is None:
        return 0  # a connected socket: no destination of its own
    if not isinstance(addr, tuple):
        return -1
    n = PyTuple_GET_SIZE(addr)
    if n != 2 and n != 4:
        return -1
    host_obj = <object>PyTuple_GET_ITEM(addr, 0)
    port_obj = <object>PyTuple_GET_ITEM(addr, 1)
    if not PyUnicode_Check(host_obj) or not isinstance(port_obj, int):
        return -1
    if not 0 <= port_obj <= 65535:
        return -1
    port = <unsigned short>port_obj
    # ASCII strings keep their UTF-8 form: no copy, no allocation.
    host = PyUnicode_AsUTF8AndSize(host_obj, &size)
    memset(out, 0, sizeof(_SockAddr))
    if n == 2:
        out.v4.sin_family = AF_INET
        out.v4.sin_port = htons(port)
        if inet_pton(AF_INET, host, &out.v4.sin_addr) != 1:
            return -1
        return sizeof(sockaddr_in)
    flowinfo_obj = <object>PyTuple_GET_ITEM(addr, 2)
    scope_obj = <object>PyTuple_GET_ITEM(addr, 3)
    if not isinstance(flowinfo_obj, int) or not isinstance(scope_obj, int):
        return -1
    out.v6.sin6_family = AF_INET6
    out.v6.sin6_port = htons(port)
    # Masked as Python ints first: out-of-range values wrap as the kernel's u32 would.
    out.v6.sin6_flowinfo = htonl(<unsigned int>(flowinfo_obj & 0xFFFFFFFF))
    out.v6.sin6_scope_id = <unsigned int>(scope_obj & 0xFFFFFFFF)
    if inet_pton(AF_INET6, host, &out.v6.sin6_addr) != 1:
        return -1
    return sizeof(sockaddr_in6)


cdef class UdpSender:
    """Sends lists of ``(bytes, address)`` datagrams with sendmmsg (see the module doc).

    ``gso``: merge runs of datagrams to one address into one message with a
    ``UDP_SEGMENT`` control message (see the module doc); only pass True for a UDP
    socket whose kernel has it (:func:`gso_supported`).

    Not thread-safe; one per socket (or per loop) is the intent. Counters only
    grow: ``syscalls`` (sendmmsg calls that sent something or failed),
    ``datagrams`` (handed to the kernel), ``gso_datagrams`` (of those, sent as
    segments of a GSO message), ``failed`` (refused with an error other than
    EAGAIN, or unparsable address; ``last_error`` is the last errno).
    """

    cdef mmsghdr *_msgs
    cdef iovec *_iov
    cdef _SockAddr *_addrs
    cdef Py_ssize_t *_counts      # datagrams per message
    cdef Py_ssize_t *_seg_size    # GSO: the first segment's size
    cdef Py_ssize_t *_bytes       # GSO: the message's total payload
    cdef char *_ctrl              # GSO: one control buffer per message
    cdef readonly Py_ssize_t capacity
    cdef readonly bint gso
    cdef readonly unsigned long long syscalls
    cdef readonly unsigned long long datagrams
    cdef readonly unsigned long long gso_datagrams
    cdef readonly unsigned long long failed
    cdef readonly int last_error

    def __cinit__(self, Py_ssize_t capacity=DEFAULT_CAPACITY, bint gso=False):
        if capacity < 1 or capacity > MAX_CAPACITY:
            raise ValueError(f"capacity must be 1..{MAX_CAPACITY}, not {capacity}")
        self.capacity = capacity
        self.gso = gso
        self._msgs = <mmsghdr *>PyMem_Calloc(capacity, sizeof(mmsghdr))
        self._iov = <iovec *>PyMem_Calloc(_IOV_SLOTS, sizeof(iovec))
        self._addrs = <_SockAddr *>PyMem_Calloc(capacity, sizeof(_SockAddr))
        self._counts = <Py_ssize_t *>PyMem_Calloc(capacity, sizeof(Py_ssize_t))
        self._seg_size = <Py_ssize_t *>PyMem_Calloc(capacity, sizeof(Py_ssize_t))
        self._bytes = <Py_ssize_t *>PyMem_Calloc(capacity, sizeof(Py_ssize_t))
        self._ctrl = <char *>PyMem_Calloc(capacity, _CTRL_SPACE)
        if (
            self._msgs == NULL or self._iov == NULL or self._addrs == NULL
            or self._counts == NULL or self._seg_size == NULL or self._bytes == NULL
            or self._ctrl == NULL
        ):
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._msgs)
        PyMem_Free(self._iov)
        PyMem_Free(self._addrs)
        PyMem_Free(self._counts)
        PyMem_Free(self._seg_size)
        PyMem_Free(self._bytes)
        PyMem_Free(self._ctrl)

    def send(self, int fd, list datagrams not None, Py_ssize_t start=0) -> int:
        """Send ``datagrams[start:]`` on ``fd``; the index of the first one not handled.

        ``len(datagrams)`` when every datagram was sent (or failed and was
        skipped); less when the kernel's send buffer is full (EAGAIN). Raises
        TypeError if an item is not a ``(bytes, address)`` pair (nothing after it
        is sent; the index of what went is then lost, so callers pass only pairs).
        """
        cdef Py_ssize_t total = len(datagrams)
        cdef Py_ssize_t i = start if start > 0 else 0
        cdef Py_ssize_t j, k, m, count, iov_used, size, done
        cdef int sent, err
        cdef int namelen
        cdef bint same
        cdef cmsghdr *cmsg
        cdef object item, data, addr, last_addr
        while i < total:
            # Fill up to `capacity` messages from datagrams[i:]; with GSO, a datagram
            # to the previous message's address joins it as one more segment while
            # the kernel's rules allow: every segment the size of the first, but the
            # last may be shorter (and then closes the message).
            count = 0
            iov_used = 0
            j = i
            last_addr = None
            while j < total and iov_used < _IOV_SLOTS:
                item = datagrams[j]
                if not isinstance(item, tuple) or PyTuple_GET_SIZE(item) != 2:
                    raise TypeError("datagrams must be (bytes, address) pairs")
                data = <object>PyTuple_GET_ITEM(item, 0)
                addr = <object>PyTuple_GET_ITEM(item, 1)
                if not PyBytes_Check(data):
                    raise TypeError(f"a datagram must be bytes, not {type(data).__name__}")
                size = PyBytes_GET_SIZE(data)
                same = count > 0 and last_addr is not None and (
                    addr is last_addr or addr == last_addr
                )
                if self.gso and same:
                    m = count - 1
                    if (
                        0 < size <= self._seg_size[m]
                        and self._bytes[m] % self._seg_size[m] == 0  # no short segment yet
                        and self._counts[m] < _GSO_MAX_SEGMENTS
                        and self._bytes[m] + size <= _GSO_MAX_BYTES
                    ):
                        self._iov[iov_used].iov_base = <void *>PyBytes_AS_STRING(data)
                        self._iov[iov_used].iov_len = <size_t>size
                        iov_used += 1
                        self._msgs[m].msg_hdr.msg_iovlen += 1
                        self._counts[m] += 1
                        self._bytes[m] += size
                        j += 1
                        continue
                if count == self.capacity:
                    break
                k = count
                if same:
                    # The previous message's address: copy, don't parse.
                    self._addrs[k] = self._addrs[k - 1]
                    namelen = self._msgs[k - 1].msg_hdr.msg_namelen
                else:
                    namelen = _fill_address(addr, &self._addrs[k])
                if namelen < 0:
                    if count:
                        break  # send what is filled; this one fails first in the next round
                    self.failed += 1
                    self.last_error = EINVAL
                    i += 1
                    j = i
                    continue
                last_addr = addr
                self._iov[iov_used].iov_base = <void *>PyBytes_AS_STRING(data)
                self._iov[iov_used].iov_len = <size_t>size
                memset(&self._msgs[k].msg_hdr, 0, sizeof(msghdr))
                if namelen:
                    self._msgs[k].msg_hdr.msg_name = &self._addrs[k]
                    self._msgs[k].msg_hdr.msg_namelen = <socklen_t>namelen
                self._msgs[k].msg_hdr.msg_iov = &self._iov[iov_used]
                self._msgs[k].msg_hdr.msg_iovlen = 1
                iov_used += 1
                self._counts[k] = 1
                self._seg_size[k] = size
                self._bytes[k] = size
                count += 1
                j += 1
            if count == 0:
                continue
            if self.gso:
                for m in range(count):
                    if self._counts[m] > 1:
                        cmsg = <cmsghdr *>(self._ctrl + m * _CTRL_SPACE)
                        memset(cmsg, 0, _CTRL_SPACE)
                        cmsg.cmsg_level = _SOL_UDP
                        cmsg.cmsg_type = _UDP_SEGMENT
                        cmsg.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                        (<uint16_t *>CMSG_DATA(cmsg))[0] = <uint16_t>self._seg_size[m]
                        self._msgs[m].msg_hdr.msg_control = cmsg
                        self._msgs[m].msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
            while True:
                sent = sendmmsg(fd, self._msgs, <unsigned int>count, MSG_DONTWAIT)
                if sent >= 0 or errno != EINTR:
                    break
            err = errno
            self.syscalls += 1
            if sent > 0:
                done = 0
                for m in range(sent):
                    done += self._counts[m]
                    if self._counts[m] > 1:
                        self.gso_datagrams += <unsigned long long>self._counts[m]
                self.datagrams += <unsigned long long>done
                i += done
            elif sent == 0:
                return i  # nothing taken and no error: treat as a full buffer
            elif err == EAGAIN:  # (EWOULDBLOCK is the same value on Linux)
                return i
            elif self._counts[0] > 1 and (err == EIO or err == EINVAL or err == EOPNOTSUPP):
                # The kernel refused GSO itself (e.g. EIO: no checksum offload on the
                # route's device): stop merging and send the same datagrams again one
                # per message. Nothing is skipped.
                self.gso = False
                self.last_error = err
            elif self._counts[0] > 1:
                # The destination's error (unreachable, refused): each datagram of the
                # run would fail alone too, so the run is skipped and counted, and GSO
                # stays on for the other peers of this socket.
                self.failed += self._counts[0]
                self.last_error = err
                i += self._counts[0]
            else:
                # The error belongs to the first message of the call: skip it alone.
                self.failed += 1
                self.last_error = err
                i += 1
        return i


def gso_supported(int fd) -> bool:
    """Whether the kernel knows UDP_SEGMENT on this UDP socket (probes with getsockopt)."""
    cdef int value = 0
    cdef socklen_t length = sizeof(int)
    return getsockopt(fd, _SOL_UDP, _UDP_SEGMENT, &value, &length) == 0


_default = None


def send_batch(int fd, list datagrams not None, Py_ssize_t start=0) -> int:
    """``UdpSender().send(fd, datagrams, start)`` with one shared sender (see UdpSender.send)."""
    global _default
    if _default is None:
        _default = UdpSender()
    return (<UdpSender>_default).send(fd, datagrams, start)
