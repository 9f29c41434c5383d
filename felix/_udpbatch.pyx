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
socket), and calls ``sendmmsg``
until the list is done or the kernel would block:

* a partial count (the kernel took some, then stopped) continues after them;
* EINTR retries the same call;
* EAGAIN/EWOULDBLOCK (send buffer full) stops and returns the index of the first
  datagram not sent: the caller decides whether to queue or drop the rest;
* any other error fails only the first datagram of that call (sendmmsg reports
  an error only when nothing was sent, so it belongs to that one): it is skipped
  and counted in ``failed`` with its errno in ``last_error``, as a lone
  ``sendto`` would have failed alone. An address that cannot be parsed is
  failed the same way (EINVAL) without reaching the kernel.

The GIL is held throughout: the socket is non-blocking, so no call waits.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_Check
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_Check
from libc.errno cimport EAGAIN, EINTR, EINVAL, errno
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

    Not thread-safe; one per socket (or per loop) is the intent. Counters only
    grow: ``syscalls`` (sendmmsg calls that sent something or failed),
    ``datagrams`` (handed to the kernel), ``failed`` (refused with an error
    other than EAGAIN, or unparsable address; ``last_error`` is the last errno).
    """

    cdef mmsghdr *_msgs
    cdef iovec *_iov
    cdef _SockAddr *_addrs
    cdef readonly Py_ssize_t capacity
    cdef readonly unsigned long long syscalls
    cdef readonly unsigned long long datagrams
    cdef readonly unsigned long long failed
    cdef readonly int last_error

    def __cinit__(self, Py_ssize_t capacity=DEFAULT_CAPACITY):
        if capacity < 1 or capacity > MAX_CAPACITY:
            raise ValueError(f"capacity must be 1..{MAX_CAPACITY}, not {capacity}")
        self.capacity = capacity
        self._msgs = <mmsghdr *>PyMem_Calloc(capacity, sizeof(mmsghdr))
        self._iov = <iovec *>PyMem_Calloc(capacity, sizeof(iovec))
        self._addrs = <_SockAddr *>PyMem_Calloc(capacity, sizeof(_SockAddr))
        if self._msgs == NULL or self._iov == NULL or self._addrs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._msgs)
        PyMem_Free(self._iov)
        PyMem_Free(self._addrs)

    def send(self, int fd, list datagrams not None, Py_ssize_t start=0) -> int:
        """Send ``datagrams[start:]`` on ``fd``; the index of the first one not handled.

        ``len(datagrams)`` when every datagram was sent (or failed and was
        skipped); less when the kernel's send buffer is full (EAGAIN). Raises
        TypeError if an item is not a ``(bytes, address)`` pair (nothing after it
        is sent; the index of what went is then lost, so callers pass only pairs).
        """
        cdef Py_ssize_t total = len(datagrams)
        cdef Py_ssize_t i = start if start > 0 else 0
        cdef Py_ssize_t k, count
        cdef int sent
        cdef int namelen
        cdef object item, data, addr, last_addr
        while i < total:
            # Fill up to `capacity` messages, from datagrams[i:].
            count = 0
            last_addr = None
            while count < self.capacity and i + count < total:
                item = datagrams[i + count]
                if not isinstance(item, tuple) or PyTuple_GET_SIZE(item) != 2:
                    raise TypeError("datagrams must be (bytes, address) pairs")
                data = <object>PyTuple_GET_ITEM(item, 0)
                addr = <object>PyTuple_GET_ITEM(item, 1)
                if not PyBytes_Check(data):
                    raise TypeError(f"a datagram must be bytes, not {type(data).__name__}")
                k = count
                if last_addr is not None and addr is last_addr:
                    # The same address object as the message before: copy, don't parse.
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
                    continue
                last_addr = addr
                self._iov[k].iov_base = <void *>PyBytes_AS_STRING(data)
                self._iov[k].iov_len = <size_t>PyBytes_GET_SIZE(data)
                memset(&self._msgs[k].msg_hdr, 0, sizeof(msghdr))
                if namelen:
                    self._msgs[k].msg_hdr.msg_name = &self._addrs[k]
                    self._msgs[k].msg_hdr.msg_namelen = <socklen_t>namelen
                self._msgs[k].msg_hdr.msg_iov = &self._iov[k]
                self._msgs[k].msg_hdr.msg_iovlen = 1
                count += 1
            if count == 0:
                continue
            while True:
                sent = sendmmsg(fd, self._msgs, <unsigned int>count, MSG_DONTWAIT)
                if sent >= 0 or errno != EINTR:
                    break
            self.syscalls += 1
            if sent > 0:
                self.datagrams += <unsigned long long>sent
                i += sent
            elif sent == 0:
                return i  # nothing taken and no error: treat as a full buffer
            elif errno == EAGAIN:  # (EWOULDBLOCK is the same value on Linux)
                return i
            else:
                # The error belongs to the first message of the call: skip it alone.
                self.failed += 1
                self.last_error = errno
                i += 1
        return i


_default = None


def send_batch(int fd, list datagrams not None, Py_ssize_t start=0) -> int:
    """``UdpSender().send(fd, datagrams, start)`` with one shared sender (see UdpSender.send)."""
    global _default
    if _default is None:
        _default = UdpSender()
    return (<UdpSender>_default).send(fd, datagrams, start)
