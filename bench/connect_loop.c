// SPDX-License-Identifier: Apache-2.0
/*
 * connect_loop: the benchmark's workload. It joins a cgroup (and optionally a network namespace),
 * opens its own loopback listener, and then either times a loop of connects or probes whether
 * one destination is allowed.
 *
 *   connect_loop [--cgroup DIR] [--netns PATH] [--cpu N] loop COUNT WARMUP
 *       COUNT timed cycles of socket() + connect() + accept() + close() to 127.0.0.1 after
 *       WARMUP untimed ones. Prints one JSON line:
 *         {"count":..., "ns_per_cycle":..., "ns_connect_call":..., "elapsed_ns":...}
 *   connect_loop [...] probe ADDR TIMEOUT_MS
 *       One non-blocking connect to ADDR:<listener port>. Prints allowed | eperm | timeout |
 *       refused | error:<errno>.
 *   connect_loop [...] watch ADDR allowed|eperm TIMEOUT_MS INTERVAL_US
 *       Prints "ready <CLOCK_MONOTONIC ns>", then probes ADDR every INTERVAL_US until the probe
 *       answers the wanted state, and prints "seen <CLOCK_MONOTONIC ns> <probes>" (or "timeout").
 *       The caller triggers the change after "ready" and compares clocks (Python's
 *       time.monotonic_ns() reads the same CLOCK_MONOTONIC).
 *   connect_loop [...] flood ADDR COUNT [RATE [tcp|udp [new|reuse]]]
 *       COUNT connects to ADDR:<listener port>, as fast as it can or, with RATE > 0, paced to
 *       RATE connects per second; each is one kernel decision (the event benchmark's
 *       generator). new (the default): socket() + connect() + close() each time. A denied
 *       connect fails with EPERM at once; an allowed TCP one is accepted and both ends closed
 *       (so the listener's backlog never fills); udp connects a UDP socket (no packet is sent:
 *       the connect4 hook decides, and an allowed connect costs no handshake). reuse: one
 *       socket, connect() again and again: a denied connect leaves the socket unconnected and a
 *       UDP socket may be connected anew, so the loop pays for the connect alone (TCP reuse
 *       works for denied connects only). Prints one JSON line:
 *       (start_ns/end_ns: CLOCK_MONOTONIC, comparable with time.monotonic_ns()).
 *
 * Why it is shaped like this:
 * - The process moves itself into the cgroup before it creates any socket: cgroup programs and
 *   nftables' `socket cgroupv2` judge a socket by the cgroup of the process that created it.
 * - The listener lives in the same process and cgroup, so each variant pays for every packet of
 *   the exchange (SYN, SYN-ACK, ACK, RST) under the same rules.
 * - The client closes with SO_LINGER {1, 0}: an RST instead of a FIN handshake, so no socket
 *   is left in TIME_WAIT and 20k connects per sample never exhaust ephemeral ports.
 * - Every loop is bounded by COUNT or TIMEOUT_MS.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LISTEN_BACKLOG 4096

static void die(const char *what)
{
	fprintf(stderr, "connect_loop: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: connect_loop [--cgroup DIR] [--netns PATH] [--cpu N] loop COUNT WARMUP\n"
		"       connect_loop [...] probe ADDR TIMEOUT_MS\n"
		"       connect_loop [...] watch ADDR allowed|eperm TIMEOUT_MS INTERVAL_US\n"
		"       connect_loop [...] flood ADDR COUNT [RATE [tcp|udp [new|reuse]]]\n");
	exit(64);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static long number(const char *s, long min, long max)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *s == '\0' || *end != '\0' || v < min || v > max) {
		fprintf(stderr, "connect_loop: bad number %s (want %ld..%ld)\n", s, min, max);
		exit(64);
	}
	return v;
}

static void join_cgroup(const char *dir)
{
	char path[4096];
	int fd;

	if (snprintf(path, sizeof(path), "%s/cgroup.procs", dir) >= (int)sizeof(path)) {
		fprintf(stderr, "connect_loop: cgroup path too long\n");
		exit(64);
	}
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die(path);
	/* "0" moves the writing process itself (cgroup v2) */
	if (write(fd, "0", 1) != 1)
		die(path);
	close(fd);
}

static void join_netns(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		die(path);
	if (setns(fd, CLONE_NEWNET) != 0)
		die("setns");
	close(fd);
}

static void pin_cpu(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		die("sched_setaffinity");
}

/* A listener on INADDR_ANY, ephemeral port: every 127.0.0.0/8 address reaches it. */
static int open_listener(struct sockaddr_in *bound)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY) };
	socklen_t len = sizeof(*bound);
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		die("socket(listener)");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0)
		die("bind");
	if (listen(fd, LISTEN_BACKLOG) != 0)
		die("listen");
	if (getsockname(fd, (struct sockaddr *)bound, &len) != 0)
		die("getsockname");
	return fd;
}

static void close_reset(int fd)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };

	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
}

static int cmd_loop(int listener, const struct sockaddr_in *dst, long count, long warmup)
{
	uint64_t t0 = 0, in_connect = 0;

	for (long i = 0; i < warmup + count; i++) {
		uint64_t c0, c1;
		int fd, peer;

		if (i == warmup)
			t0 = now_ns();
		fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			die("socket");
		c0 = now_ns();
		if (connect(fd, (const struct sockaddr *)dst, sizeof(*dst)) != 0)
			die("connect");
		c1 = now_ns();
		if (i >= warmup)
			in_connect += c1 - c0;
		peer = accept(listener, NULL, NULL);
		if (peer < 0)
			die("accept");
		close_reset(fd);
		close(peer);
	}
	uint64_t elapsed = now_ns() - t0;

	printf("{\"count\": %ld, \"ns_per_cycle\": %.1f, \"ns_connect_call\": %.1f, "
	       "\"elapsed_ns\": %llu}\n", count, (double)elapsed / count,
	       (double)in_connect / count, (unsigned long long)elapsed);
	return 0;
}

enum probe_result { PROBE_ALLOWED, PROBE_EPERM, PROBE_TIMEOUT, PROBE_REFUSED, PROBE_ERROR };

static const char *const probe_names[] = { "allowed", "eperm", "timeout", "refused", "error" };

/* One non-blocking connect; a SYN dropped by nftables shows up as a timeout. */
static enum probe_result probe(int listener, const struct sockaddr_in *dst, int timeout_ms,
			       int *err_out)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	enum probe_result r;
	int err = 0;

	if (fd < 0)
		die("socket(probe)");
	if (connect(fd, (const struct sockaddr *)dst, sizeof(*dst)) != 0)
		err = errno;
	if (err == EINPROGRESS) {
		struct pollfd p = { .fd = fd, .events = POLLOUT };
		socklen_t len = sizeof(err);
		int n = poll(&p, 1, timeout_ms);

		if (n < 0)
			die("poll");
		if (n == 0)
			err = ETIMEDOUT;
		else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
			die("getsockopt(SO_ERROR)");
	}
	switch (err) {
	case 0:
		r = PROBE_ALLOWED;
		break;
	case EPERM:
		r = PROBE_EPERM;
		break;
	case ETIMEDOUT:
		r = PROBE_TIMEOUT;
		break;
	case ECONNREFUSED:
		r = PROBE_REFUSED;
		break;
	default:
		r = PROBE_ERROR;
	}
	*err_out = err;
	close_reset(fd);
	/* drain what the probe queued on the listener (non-blocking: may be nothing) */
	for (int i = 0; i < 16; i++) {
		int peer = accept4(listener, NULL, NULL, SOCK_CLOEXEC);

		if (peer < 0)
			break;
		close(peer);
	}
	return r;
}

static int cmd_probe(int listener, const struct sockaddr_in *dst, int timeout_ms)
{
	int err;
	enum probe_result r = probe(listener, dst, timeout_ms, &err);

	if (r == PROBE_ERROR)
		printf("error:%d\n", err);
	else
		printf("%s\n", probe_names[r]);
	return 0;
}

static int cmd_watch(int listener, const struct sockaddr_in *dst, enum probe_result want,
		     int timeout_ms, long interval_us)
{
	struct timespec pause = { .tv_sec = interval_us / 1000000,
				  .tv_nsec = (interval_us % 1000000) * 1000 };
	uint64_t deadline;
	long probes = 0;
	int err;

	printf("ready %llu\n", (unsigned long long)now_ns());
	fflush(stdout);
	deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
	while (now_ns() < deadline) {
		/* 50 ms per probe: long enough for a loopback handshake, short enough to poll */
		enum probe_result r = probe(listener, dst, 50, &err);
		uint64_t t = now_ns();

		probes++;
		if (r == want) {
			printf("seen %llu %ld\n", (unsigned long long)t, probes);
			return 0;
		}
		nanosleep(&pause, NULL);
	}
	printf("timeout %ld\n", probes);
	return 1;
}

/*
 * Pacing granularity of flood RATE: the schedule is checked every FLOOD_PACE_EVERY connects and
 * the loop sleeps until the next one is due (absolute deadlines, so a late wake-up is caught up
 * rather than accumulated). 64 connects is ~0.6 ms at 100k/s: smooth at the ring buffer's scale
 * (the agent drains every 10 ms) without a clock read per connect.
 */
#define FLOOD_PACE_EVERY 64

static void sleep_until(uint64_t t_ns)
{
	struct timespec ts = { .tv_sec = t_ns / 1000000000ull, .tv_nsec = t_ns % 1000000000ull };

	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static int cmd_flood(int listener, const struct sockaddr_in *dst, long count, long rate,
		     int type, int reuse)
{
	long eperm = 0, allowed = 0, other = 0;
	int last_errno = 0, fd = -1;
	uint64_t t0 = now_ns(), t1;

	for (long i = 0; i < count; i++) {
		if (rate > 0 && i % FLOOD_PACE_EVERY == 0) {
			uint64_t due = t0 + (uint64_t)((double)i * 1e9 / (double)rate);

			if (now_ns() < due)
				sleep_until(due);
		}
		if (fd < 0) {
			fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
			if (fd < 0)
				die("socket");
		}
		if (connect(fd, (const struct sockaddr *)dst, sizeof(*dst)) == 0) {
			allowed++;
			if (type == SOCK_STREAM) {
				int peer = accept(listener, NULL, NULL);

				if (peer < 0)
					die("accept");
				close_reset(fd);
				close(peer);
				fd = -1;   /* a connected TCP socket cannot connect again */
				continue;
			}
		} else if (errno == EPERM) {
			eperm++;
		} else {
			other++;
			last_errno = errno;
		}
		if (!reuse) {
			close(fd);
			fd = -1;
		}
	}
	if (fd >= 0)
		close(fd);
	t1 = now_ns();
	printf("{\"count\": %ld, \"eperm\": %ld, \"allowed\": %ld, \"other\": %ld, "
	       "\"last_errno\": %d, \"elapsed_ns\": %llu, \"start_ns\": %llu, \"end_ns\": %llu}\n",
	       count, eperm, allowed, other, last_errno, (unsigned long long)(t1 - t0),
	       (unsigned long long)t0, (unsigned long long)t1);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cgroup = NULL, *netns = NULL;
	struct sockaddr_in dst;
	int cpu = -1, listener, i = 1;

	for (; i + 1 < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
		if (strcmp(argv[i], "--cgroup") == 0)
			cgroup = argv[i + 1];
		else if (strcmp(argv[i], "--netns") == 0)
			netns = argv[i + 1];
		else if (strcmp(argv[i], "--cpu") == 0)
			cpu = (int)number(argv[i + 1], 0, CPU_SETSIZE - 1);
		else
			usage();
	}
	if (i >= argc)
		usage();
	/* network namespace and cgroup first: every socket below is created inside both */
	if (netns)
		join_netns(netns);
	if (cgroup)
		join_cgroup(cgroup);
	if (cpu >= 0)
		pin_cpu(cpu);

	listener = open_listener(&dst);
	if (fcntl(listener, F_SETFL, O_NONBLOCK) != 0)
		die("fcntl");

	if (strcmp(argv[i], "loop") == 0 && argc - i == 3) {
		/* the timed loop accepts blocking: exactly one connection is pending each time */
		if (fcntl(listener, F_SETFL, 0) != 0)
			die("fcntl");
		dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		return cmd_loop(listener, &dst, number(argv[i + 1], 1, 100000000),
				number(argv[i + 2], 0, 100000000));
	}
	if (strcmp(argv[i], "probe") == 0 && argc - i == 3) {
		if (inet_pton(AF_INET, argv[i + 1], &dst.sin_addr) != 1)
			usage();
		return cmd_probe(listener, &dst, (int)number(argv[i + 2], 1, 600000));
	}
	if (strcmp(argv[i], "watch") == 0 && argc - i == 5) {
		enum probe_result want;

		if (inet_pton(AF_INET, argv[i + 1], &dst.sin_addr) != 1)
			usage();
		if (strcmp(argv[i + 2], "allowed") == 0)
			want = PROBE_ALLOWED;
		else if (strcmp(argv[i + 2], "eperm") == 0)
			want = PROBE_EPERM;
		else
			usage();
		return cmd_watch(listener, &dst, want, (int)number(argv[i + 3], 1, 600000),
				 number(argv[i + 4], 0, 1000000));
	}
	if (strcmp(argv[i], "flood") == 0 && argc - i >= 3 && argc - i <= 6) {
		int type = SOCK_STREAM, reuse = 0;

		if (argc - i >= 5 && strcmp(argv[i + 4], "udp") == 0)
			type = SOCK_DGRAM;
		else if (argc - i >= 5 && strcmp(argv[i + 4], "tcp") != 0)
			usage();
		if (argc - i == 6 && strcmp(argv[i + 5], "reuse") == 0)
			reuse = 1;
		else if (argc - i == 6 && strcmp(argv[i + 5], "new") != 0)
			usage();
		/* an allowed TCP connect is accepted at once, blocking: exactly one is pending */
		if (fcntl(listener, F_SETFL, 0) != 0)
			die("fcntl");
		if (inet_pton(AF_INET, argv[i + 1], &dst.sin_addr) != 1)
			usage();
		return cmd_flood(listener, &dst, number(argv[i + 2], 1, 100000000),
				 argc - i >= 4 ? number(argv[i + 3], 0, 100000000) : 0, type, reuse);
	}
	usage();
	return 64;
}
