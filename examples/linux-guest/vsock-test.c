/*
 * vsock-test: the minimal Linux guest's AF_VSOCK tool (busybox has none). build.sh compiles it
 * with `gcc -static -Os` into the initramfs as /bin/vsock-test; init.sh's vsock test runs it.
 *
 *   vsock-test cid                  prints "cid=<the guest's CID>" (IOCTL_VM_SOCKETS_GET_LOCAL_CID)
 *   vsock-test connect PORT BYTES   connects to the host (CID 2) on PORT, sends BYTES bytes of the
 *                                   guest pattern for PORT, reads BYTES bytes back and checks they
 *                                   are the same (the host echoes), then closes
 *   vsock-test refused PORT         connects to the host on PORT, where nothing listens: the
 *                                   connection must be refused (ECONNRESET or ECONNREFUSED)
 *   vsock-test listen PORT BYTES    listens on PORT (any CID), prints "VMKIT-VSOCK listening
 *                                   port=PORT" once it does, accepts one connection, sends BYTES
 *                                   bytes of the guest pattern for PORT while it reads BYTES bytes
 *                                   that must be the host pattern for PORT, then waits for the
 *                                   host to close
 *
 * Patterns: byte i of the guest pattern for port P is the high byte of the i+1-th state of the
 * 64-bit LCG x' = x * 6364136223846793005 + 1442695040888963407 started at 0x9e3779b97f4a7c15 ^ P
 * (the Linux guest test's lcg_bytes); the host pattern uses seed P + 0x10000.
 *
 * Prints one line on stdout: the mode's facts (bytes, peer, milliseconds) and exits 0, or
 * "error: <what>: <errno text>" and exits 1. Every wait is bounded (TIMEOUT_MS).
 *
 * It is a static glibc program: like busybox it needs init.sh's GLIBC_TUNABLES (no AVX string
 * functions) on hosts whose KVM emulates guest kernel mode, and inherits it from /init.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define TIMEOUT_MS 60000
#define HOST_SEED_OFFSET 0x10000u

static void die(const char *what)
{
	printf("error: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *fmt, unsigned long a, unsigned long b)
{
	printf("error: ");
	printf(fmt, a, b);
	printf("\n");
	exit(1);
}

static long now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static unsigned char *pattern(uint64_t seed, size_t len)
{
	unsigned char *p = malloc(len ? len : 1);
	uint64_t x = 0x9e3779b97f4a7c15ull ^ seed;
	if (!p)
		die("malloc");
	for (size_t i = 0; i < len; i++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		p[i] = x >> 56;
	}
	return p;
}

static unsigned long number(const char *s)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);
	if (!*s || *end) {
		printf("error: not a number: %s\n", s);
		exit(2);
	}
	return v;
}

static int vsock(void)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket(AF_VSOCK)");
	return fd;
}

/*
 * Sends `tx` (tx_len bytes) and reads rx_len bytes into `rx` at the same time (neither side
 * can fill its buffers and stall the other), then, with `wait_eof`, reads until the peer
 * closes. Returns the bytes read; exits on an error or a timeout.
 */
static size_t exchange(int fd, const unsigned char *tx, size_t tx_len, unsigned char *rx,
		       size_t rx_len, int wait_eof)
{
	size_t sent = 0, got = 0;
	int eof = 0;
	long deadline = now_ms() + TIMEOUT_MS;
	if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
		die("fcntl(O_NONBLOCK)");
	while (sent < tx_len || (got < rx_len && !eof) || (wait_eof && !eof)) {
		struct pollfd p = { .fd = fd, .events = 0 };
		long left = deadline - now_ms();
		int n;
		if (sent < tx_len)
			p.events |= POLLOUT;
		if (!eof)
			p.events |= POLLIN;
		if (left <= 0)
			fail(got < rx_len || sent < tx_len
				     ? "timeout: sent %lu read %lu"
				     : "timeout waiting for the peer to close: sent %lu read %lu",
			     sent, got);
		n = poll(&p, 1, left);
		if (n < 0 && errno != EINTR)
			die("poll");
		if (n <= 0)
			continue;
		if (p.revents & POLLOUT) {
			ssize_t w = send(fd, tx + sent, tx_len - sent, MSG_NOSIGNAL);
			if (w < 0 && errno != EAGAIN && errno != EINTR) {
				printf("error: send after %zu of %zu bytes: %s\n", sent, tx_len,
				       strerror(errno));
				exit(1);
			}
			if (w > 0)
				sent += w;
		}
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			unsigned char sink[4096];
			unsigned char *to = got < rx_len ? rx + got : sink;
			size_t room = got < rx_len ? rx_len - got : sizeof(sink);
			ssize_t r = recv(fd, to, room, 0);
			if (r < 0 && errno != EAGAIN && errno != EINTR) {
				printf("error: recv after %zu of %zu bytes: %s\n", got, rx_len,
				       strerror(errno));
				exit(1);
			}
			if (r == 0)
				eof = 1;
			if (r > 0)
				got += r;
			if (got > rx_len)
				fail("the peer sent more than expected: %lu bytes, want %lu", got, rx_len);
		}
	}
	if (got < rx_len)
		fail("the peer closed after %lu of %lu bytes", got, rx_len);
	return got;
}

/* The index of the first byte where a and b differ, or len. */
static size_t first_difference(const unsigned char *a, const unsigned char *b, size_t len)
{
	size_t i = 0;
	while (i < len && a[i] == b[i])
		i++;
	return i;
}

static int cmd_cid(void)
{
	unsigned int cid;
	int fd = open("/dev/vsock", O_RDONLY);
	if (fd < 0)
		die("open /dev/vsock");
	if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
		die("IOCTL_VM_SOCKETS_GET_LOCAL_CID");
	printf("cid=%u\n", cid);
	return 0;
}

static int connect_host(unsigned int port)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
	int fd = vsock();
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

static int cmd_connect(unsigned int port, size_t bytes)
{
	unsigned char *tx = pattern(port, bytes), *rx = malloc(bytes ? bytes : 1);
	struct sockaddr_vm local;
	socklen_t len = sizeof(local);
	long t0 = now_ms(), t1;
	size_t bad;
	int fd = connect_host(port);
	if (fd < 0)
		die("connect to cid 2");
	if (getsockname(fd, (struct sockaddr *)&local, &len) < 0)
		die("getsockname");
	t1 = now_ms();
	exchange(fd, tx, bytes, rx, bytes, 0);
	bad = first_difference(tx, rx, bytes);
	if (bad < bytes)
		fail("the echo differs from what was sent at byte %lu of %lu", bad, bytes);
	close(fd);
	printf("connect port=%u bytes=%zu echoed=%zu local_port=%u connect_ms=%ld ms=%ld\n", port,
	       bytes, bytes, local.svm_port, t1 - t0, now_ms() - t1);
	return 0;
}

static int cmd_refused(unsigned int port)
{
	long t0 = now_ms();
	int fd = connect_host(port);
	if (fd >= 0) {
		printf("error: connected to cid 2 port %u, where nothing should listen\n", port);
		return 1;
	}
	if (errno != ECONNRESET && errno != ECONNREFUSED)
		die("connect to cid 2 (want ECONNRESET or ECONNREFUSED)");
	printf("refused port=%u errno=%s ms=%ld\n", port, errno == ECONNRESET ? "ECONNRESET" : "ECONNREFUSED",
	       now_ms() - t0);
	return 0;
}

static int cmd_listen(unsigned int port, size_t bytes)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	struct sockaddr_vm peer;
	socklen_t len = sizeof(peer);
	unsigned char *tx = pattern(port, bytes), *want = pattern(port + HOST_SEED_OFFSET, bytes);
	unsigned char *rx = malloc(bytes ? bytes : 1);
	struct pollfd p;
	long t0;
	size_t bad;
	int l = vsock(), fd;
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("bind");
	if (listen(l, 1) < 0)
		die("listen");
	/* The host connects once it sees this line on the console. */
	fprintf(stderr, "VMKIT-VSOCK listening port=%u\n", port);
	p.fd = l;
	p.events = POLLIN;
	if (poll(&p, 1, TIMEOUT_MS) <= 0) {
		printf("error: no connection on port %u within %d ms\n", port, TIMEOUT_MS);
		return 1;
	}
	fd = accept(l, (struct sockaddr *)&peer, &len);
	if (fd < 0)
		die("accept");
	close(l);
	t0 = now_ms();
	exchange(fd, tx, bytes, rx, bytes, 1);
	bad = first_difference(want, rx, bytes);
	if (bad < bytes)
		fail("the host's bytes differ from its pattern at byte %lu of %lu", bad, bytes);
	close(fd);
	printf("listen port=%u peer=%u:%u sent=%zu received=%zu ms=%ld\n", port, peer.svm_cid,
	       peer.svm_port, bytes, bytes, now_ms() - t0);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2 && !strcmp(argv[1], "cid"))
		return cmd_cid();
	if (argc == 4 && !strcmp(argv[1], "connect"))
		return cmd_connect(number(argv[2]), number(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "refused"))
		return cmd_refused(number(argv[2]));
	if (argc == 4 && !strcmp(argv[1], "listen"))
		return cmd_listen(number(argv[2]), number(argv[3]));
	printf("usage: vsock-test cid | connect PORT BYTES | refused PORT | listen PORT BYTES\n");
	return 2;
}
