package h1

import (
	"syscall"
	"unsafe"
)

// Recv and send are the raw system calls behind Raw. On a socket, recvfrom(2) and sendto(2) go
// straight to the socket layer, where read(2) and write(2) first pass through the VFS (the file
// position check, the iterator setup); MSG_NOSIGNAL makes a write to a reset peer fail with
// EPIPE without raising SIGPIPE for the runtime to swallow. p is not empty.
func Recv(fd uintptr, p []byte) (uintptr, syscall.Errno) {
	n, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), 0, 0, 0)
	return n, e
}

func send(fd uintptr, p []byte) (uintptr, syscall.Errno) {
	n, _, e := syscall.RawSyscall6(syscall.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), syscall.MSG_NOSIGNAL, 0, 0)
	return n, e
}
