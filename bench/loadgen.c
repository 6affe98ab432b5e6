/*
 * loadgen -- many Socket.IO clients in one epoll loop, for chatroom's benchmark.
 *
 * It opens N Socket.IO 5 clients over WebSocket (Engine.IO 4) to a chat server that keeps
 * chatroom's contract, and measures one scenario:
 *
 *   join     all N connect at once: the time until every one has its own login
 *   fanout   S of them send R messages a second in all; every client times every message
 *            it gets from the timestamp in it (same machine, same monotonic clock)
 *   hold     N stay connected for T seconds, answering the server's pings
 *
 * --transport polling makes every client an HTTP long-polling one (Engine.IO 4): one
 * keep-alive connection for its GETs, another for its POSTs, one POST in flight at a time
 * (as engine.io requires) carrying whatever was queued meanwhile.
 *
 * --stall K makes K clients stop reading once they have joined (a client gone deaf), to
 * see what that does to everyone else. With --server-pid it reads the server's CPU time
 * and resident memory from /proc; it reports its own CPU time too, so that one can see it
 * was not the bottleneck. --pad adds bytes to every message, so that a stalled client's
 * queue fills in seconds rather than hours. Clients come from many loopback addresses,
 * --per-address of them from each of 127.1.x.y, as clients from many hosts would (a
 * server counts what each address may hold). --port2 sends every other client to a second
 * server (--server-pid may then be given for each, and for Redis: their CPU and memory
 * are added up). The result is one line of JSON.
 *
 * libc only: cc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

/* ---- options ---- */
static struct {
	const char *host;
	int port;
	const char *path;
	int clients, senders, stall;
	double rate, seconds, warmup;
	const char *scenario;
	bool delta;
	int server_pid[4]; /* --server-pid, up to 4 times: their CPU and memory add up */
	int nserver_pids;
	int port2;         /* --port2: every other client connects there (a second server) */
	int ramp; /* connections being set up at once */
	int pad;  /* extra bytes in each message */
	int per_address; /* clients from one source address */
	bool polling;    /* --transport polling */
} opt = {"127.0.0.1", 5000, "/socket.io/", 100, 10, 0, 100, 10, 2, "fanout", false, {0}, 0, 0,
         500, 0, 50, false};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* ---- one client ---- */
/* HANDSHAKING: a polling client waits for its sid */
enum state { CONNECTING, UPGRADING, HANDSHAKING, OPENING, JOINING, WAITING_LOGIN, READY, DEAD };

/* One TCP connection: a WebSocket, or one of a polling client's two. */
struct link {
	int fd;
	char *in;          /* bytes received, not yet parsed */
	size_t inlen, incap;
	char *out;         /* bytes to send that the socket did not take yet */
	size_t outlen, outcap;
};

struct client {
	struct link main;  /* the WebSocket, or a polling client's GETs */
	struct link post;  /* a polling client's POSTs */
	enum state state;
	bool stalled;
	char sid[64];      /* polling */
	bool posting;      /* a POST is in flight */
	char *queued;      /* packets for the next POST, separated by \x1e */
	size_t queuedlen, queuedcap;
	int64_t started, joined;
	char nick[128];
	long pings;
};

#define POST_SIDE 1 /* epoll data: client index * 2, + 1 for a POST connection */

static struct client *clients;
static int epfd;
static int joined_count, dead_count, connecting_count, next_to_start;
static int64_t storm_start, storm_end;

/* latencies of messages received during the measurement, in microseconds */
static uint32_t *lat;
static size_t nlat, caplat;
static int64_t measure_from, measure_to;
static long sent_measured, received_measured, received_total;
static long received_in_window; /* any message that arrived during the measurement */
static long pings_total;
static int64_t stalled_dropped_at; /* when the others heard the stalled client leave */
static long server_rss_max;

static void record(uint32_t us)
{
	if (nlat == caplat) {
		caplat = caplat ? caplat * 2 : 1 << 20;
		lat = realloc(lat, caplat * sizeof *lat);
		if (!lat)
			die("realloc");
	}
	lat[nlat++] = us;
}

static uint64_t tag(struct client *c, struct link *l)
{
	return (uint64_t)(c - clients) * 2 + (l == &c->post ? POST_SIDE : 0);
}

static void arm(struct client *c, struct link *l, bool want_write)
{
	bool deaf = c->stalled && c->state == READY; /* a stalled client reads until it joins */
	struct epoll_event ev = {.events = (deaf ? 0 : EPOLLIN) | (want_write ? EPOLLOUT : 0),
	                         .data.u64 = tag(c, l)};
	epoll_ctl(epfd, EPOLL_CTL_MOD, l->fd, &ev);
}

static void kill_client(struct client *c)
{
	if (c->state == DEAD)
		return;
	if (c->state == CONNECTING || c->state == UPGRADING || c->state == HANDSHAKING ||
	    c->state == OPENING ||
	    c->state == JOINING || c->state == WAITING_LOGIN)
		connecting_count--;
	c->state = DEAD;
	dead_count++;
	struct link *links[] = {&c->main, &c->post};
	for (int i = 0; i < 2; i++)
		if (links[i]->fd > 0) {
			epoll_ctl(epfd, EPOLL_CTL_DEL, links[i]->fd, NULL);
			close(links[i]->fd);
		}
}

static void append(char **buf, size_t *len, size_t *cap, const void *p, size_t n)
{
	if (*len + n > *cap) {
		*cap = (*len + n) * 2;
		*buf = realloc(*buf, *cap);
		if (!*buf)
			die("realloc");
	}
	memcpy(*buf + *len, p, n);
	*len += n;
}

static void flush_out(struct client *c, struct link *l)
{
	while (l->outlen) {
		ssize_t n = send(l->fd, l->out, l->outlen, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				arm(c, l, true);
				return;
			}
			kill_client(c);
			return;
		}
		memmove(l->out, l->out + n, l->outlen - (size_t)n);
		l->outlen -= (size_t)n;
	}
	arm(c, l, false);
}

static void send_on(struct client *c, struct link *l, const void *p, size_t n)
{
	if (c->state == DEAD)
		return;
	bool idle = l->outlen == 0;
	append(&l->out, &l->outlen, &l->outcap, p, n);
	if (idle)
		flush_out(c, l);
}

static void send_raw(struct client *c, const void *p, size_t n) { send_on(c, &c->main, p, n); }

static void send_post(struct client *c);

/* One Engine.IO packet: a masked text frame, as a client must send (the mask is zero: the
 * bytes go as they are), or, polling, a record of the next POST. */
static void send_text(struct client *c, const char *text, size_t n)
{
	if (opt.polling) {
		if (c->queuedlen)
			append(&c->queued, &c->queuedlen, &c->queuedcap, "\x1e", 1);
		append(&c->queued, &c->queuedlen, &c->queuedcap, text, n);
		if (!c->posting)
			send_post(c);
		return;
	}
	unsigned char h[14];
	size_t hl;
	h[0] = 0x81;
	if (n < 126) {
		h[1] = (unsigned char)(0x80 | n);
		hl = 2;
	} else if (n < 65536) {
		h[1] = 0x80 | 126;
		h[2] = (unsigned char)(n >> 8);
		h[3] = (unsigned char)n;
		hl = 4;
	} else {
		h[1] = 0x80 | 127;
		for (int i = 0; i < 8; i++)
			h[2 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
		hl = 10;
	}
	memset(h + hl, 0, 4);
	hl += 4;
	char frame[256];
	if (hl + n <= sizeof frame) { /* one write for small frames */
		memcpy(frame, h, hl);
		memcpy(frame + hl, text, n);
		send_raw(c, frame, hl + n);
	} else {
		send_raw(c, h, hl);
		send_raw(c, text, n);
	}
}

/* Opens one of c's connections, from 127.1.x.y: one address for every per_address clients. */
static bool open_link(struct client *c, struct link *l)
{
	l->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (l->fd < 0)
		die("socket");
	int one = 1;
	setsockopt(l->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (c->stalled) {
		int small = 4096;
		setsockopt(l->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
	}
	uint32_t source = (uint32_t)(c - clients) / (uint32_t)opt.per_address + 1;
	struct sockaddr_in from = {.sin_family = AF_INET,
	                           .sin_addr.s_addr = htonl(0x7F010000u | (source & 0xFFFF))};
	if (strncmp(opt.host, "127.", 4) == 0 && bind(l->fd, (struct sockaddr *)&from, sizeof from) < 0)
		die("bind to a loopback source address");
	int port = opt.port2 && (c - clients) % 2 ? opt.port2 : opt.port;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	inet_pton(AF_INET, opt.host, &a.sin_addr);
	struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = tag(c, l)};
	epoll_ctl(epfd, EPOLL_CTL_ADD, l->fd, &ev);
	return connect(l->fd, (struct sockaddr *)&a, sizeof a) == 0 || errno == EINPROGRESS;
}

static void start_client(struct client *c)
{
	c->state = CONNECTING;
	c->started = now_ns();
	connecting_count++;
	if (!open_link(c, &c->main))
		kill_client(c);
}

static void start_more(void)
{
	while (next_to_start < opt.clients && connecting_count < opt.ramp)
		start_client(&clients[next_to_start++]);
}

static void send_upgrade(struct client *c)
{
	char req[512];
	int n = snprintf(req, sizeof req,
	                 "GET %s?EIO=4&transport=websocket HTTP/1.1\r\nHost: %s:%d\r\n"
	                 "Upgrade: websocket\r\nConnection: Upgrade\r\n"
	                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
	                 "Sec-WebSocket-Version: 13\r\n\r\n",
	                 opt.path, opt.host, opt.port);
	c->state = UPGRADING;
	arm(c, &c->main, false);
	send_raw(c, req, (size_t)n);
}


/* Finds "key":"value" in JSON text (no escapes needed for nicknames we compare). */
static bool json_string_field(const char *p, size_t n, const char *key, char *out, size_t cap)
{
	char pat[64];
	int k = snprintf(pat, sizeof pat, "\"%s\":\"", key);
	const char *hit = memmem(p, n, pat, (size_t)k);
	if (!hit)
		return false;
	hit += k;
	const char *end = memchr(hit, '"', (size_t)(p + n - hit));
	if (!end || (size_t)(end - hit) >= cap)
		return false;
	memcpy(out, hit, (size_t)(end - hit));
	out[end - hit] = 0;
	return true;
}

static void joined(struct client *c)
{
	c->state = READY;
	c->joined = now_ns();
	connecting_count--;
	if (++joined_count == opt.clients)
		storm_end = c->joined;
	if (c->stalled && !opt.polling) /* from now on it reads nothing */
		arm(c, &c->main, c->main.outlen > 0);
}

/* One text message from the server. */
static void on_text(struct client *c, const char *p, size_t n)
{
	if (n == 1 && p[0] == '2') { /* ping */
		send_text(c, "3", 1);
		c->pings++;
		pings_total++;
		return;
	}
	switch (c->state) {
	case OPENING:
		if (p[0] == '0') {
			c->state = JOINING;
			if (opt.delta)
				send_text(c, "40{\"presence\":\"delta\"}", 22);
			else
				send_text(c, "40", 2);
		}
		return;
	case JOINING:
		if (n >= 2 && p[0] == '4' && p[1] == '0')
			c->state = WAITING_LOGIN;
		else if (n >= 2 && p[0] == '4' && p[1] == '4')
			kill_client(c); /* refused */
		return;
	case WAITING_LOGIN: /* the contract: our own login is the first msg */
		if (n > 8 && memcmp(p, "42[\"msg\"", 8) == 0) {
			json_string_field(p, n, "username", c->nick, sizeof c->nick);
			joined(c);
		}
		return;
	default:
		break;
	}
	if (n < 8 || memcmp(p, "42[\"msg\"", 8) != 0)
		return;
	received_total++;
	/* our messages carry "t" near the start; presence messages can be long: do not scan them */
	const char *t = memmem(p, n < 96 ? n : 96, "\"t\":", 4);
	if (t) {
		int64_t now = now_ns();
		if (now >= measure_from && now < measure_to)
			received_in_window++;
		int64_t sent = strtoll(t + 4, NULL, 10);
		if (sent >= measure_from && sent < measure_to) {
			received_measured++;
			int64_t us = (now - sent) / 1000;
			record(us < 0 ? 0 : us > UINT32_MAX ? UINT32_MAX : (uint32_t)us);
		}
	} else if (opt.stall && !stalled_dropped_at && memmem(p, n, "\"logout\"", 8)) {
		char who[128];
		for (int i = 0; i < opt.stall; i++)
			if (json_string_field(p, n, "username", who, sizeof who) &&
			    strcmp(who, clients[i].nick) == 0)
				stalled_dropped_at = now_ns();
	}
}

/* Handles the whole frames in p[0..n); returns how many bytes they took. */
static size_t on_frames(struct client *c, const char *p, size_t n)
{
	size_t used = 0;
	while (c->state != DEAD) {
		const unsigned char *f = (const unsigned char *)p + used;
		size_t avail = n - used;
		if (avail < 2)
			break;
		int op = f[0] & 0x0F, len7 = f[1] & 0x7F;
		size_t hl = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0);
		if (avail < hl)
			break;
		uint64_t len = (uint64_t)len7;
		if (len7 == 126)
			len = (uint64_t)f[2] << 8 | f[3];
		else if (len7 == 127)
			for (int i = 0; i < 8; i++)
				len = (i ? len << 8 : 0) | f[2 + i];
		if (avail - hl < len)
			break;
		const char *payload = (const char *)f + hl;
		if (op == 0x1)
			on_text(c, payload, (size_t)len);
		else if (op == 0x8)
			kill_client(c);
		else if (op == 0x9) {
			unsigned char pong[6] = {0x8A, 0x80, 0, 0, 0, 0};
			send_raw(c, pong, sizeof pong); /* an empty pong will do */
		}
		used += hl + (size_t)len;
	}
	return used;
}

/* The server's answer to the upgrade request; the frames after it stay in c->main.in. */
static void on_upgrade_answer(struct client *c)
{
	struct link *l = &c->main;
	char *end = memmem(l->in, l->inlen, "\r\n\r\n", 4);
	if (!end)
		return;
	if (l->inlen < 12 || memcmp(l->in, "HTTP/1.1 101", 12) != 0) {
		kill_client(c);
		return;
	}
	size_t head = (size_t)(end + 4 - l->in);
	memmove(l->in, l->in + head, l->inlen - head);
	l->inlen -= head;
	c->state = OPENING;
}

/* Reads what the socket has. Frames are parsed straight from the read buffer; only an
 * unfinished one is kept, so the common case copies nothing. */
static void on_readable(struct client *c)
{
	static char buf[1 << 16];
	struct link *l = &c->main;
	for (;;) {
		ssize_t n = recv(l->fd, buf, sizeof buf, MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
			kill_client(c);
			return;
		}
		if (n < 0)
			return;
		if (l->inlen == 0 && c->state != UPGRADING) {
			size_t used = on_frames(c, buf, (size_t)n);
			if (c->state != DEAD && used < (size_t)n)
				append(&l->in, &l->inlen, &l->incap, buf + used, (size_t)n - used);
		} else {
			append(&l->in, &l->inlen, &l->incap, buf, (size_t)n);
			if (c->state == UPGRADING)
				on_upgrade_answer(c);
			if (c->state != UPGRADING && c->state != DEAD) {
				size_t used = on_frames(c, l->in, l->inlen);
				memmove(l->in, l->in + used, l->inlen - used);
				l->inlen -= used;
			}
		}
		if (c->state == DEAD || (c->stalled && c->state == READY))
			return;
		if (n < (ssize_t)sizeof buf)
			return;
	}
}

/* ---- long-polling ---- */
static void send_poll(struct client *c)
{
	char req[512];
	int n = c->sid[0]
	    ? snprintf(req, sizeof req, "GET %s?EIO=4&transport=polling&sid=%s HTTP/1.1\r\n"
	               "Host: %s:%d\r\n\r\n", opt.path, c->sid, opt.host, opt.port)
	    : snprintf(req, sizeof req, "GET %s?EIO=4&transport=polling HTTP/1.1\r\n"
	               "Host: %s:%d\r\n\r\n", opt.path, opt.host, opt.port);
	send_raw(c, req, (size_t)n);
}

static void drop_link(struct link *l)
{
	epoll_ctl(epfd, EPOLL_CTL_DEL, l->fd, NULL);
	close(l->fd);
	l->fd = -1;
	l->inlen = l->outlen = 0;
}

/* Sends what was queued as one POST; the next waits for this one's answer. A server may
 * close a POST's connection after answering (chatroom does): then the next opens another. */
static void send_post(struct client *c)
{
	if (c->state == DEAD || !c->queuedlen)
		return;
	if (c->post.fd <= 0 && !open_link(c, &c->post)) {
		kill_client(c);
		return;
	}
	char head[512];
	int n = snprintf(head, sizeof head,
	                 "POST %s?EIO=4&transport=polling&sid=%s HTTP/1.1\r\nHost: %s:%d\r\n"
	                 "Content-Type: text/plain;charset=UTF-8\r\nContent-Length: %zu\r\n\r\n",
	                 opt.path, c->sid, opt.host, opt.port, c->queuedlen);
	send_on(c, &c->post, head, (size_t)n);
	send_on(c, &c->post, c->queued, c->queuedlen);
	c->queuedlen = 0;
	c->posting = true;
}

/* The length of the first whole HTTP response in l->in, or 0; *body and *bodylen locate
 * its body, *closes says whether the server closes the connection after it. A status
 * other than 200 ends the client. */
static size_t http_response(struct client *c, struct link *l, const char **body, size_t *bodylen,
                            bool *closes)
{
	char *end = memmem(l->in, l->inlen, "\r\n\r\n", 4);
	if (!end)
		return 0;
	if (l->inlen < 12 || memcmp(l->in, "HTTP/1.1 200", 12) != 0) {
		kill_client(c);
		return 0;
	}
	size_t head = (size_t)(end + 4 - l->in), length = 0;
	for (char *h = l->in; h && h < end; h = memchr(h, '\n', (size_t)(end + 2 - h))) {
		h += *h == '\n';
		if (strncasecmp(h, "content-length:", 15) == 0)
			length = strtoul(h + 15, NULL, 10);
		if (strncasecmp(h, "connection: close", 17) == 0)
			*closes = true;
	}
	if (l->inlen - head < length)
		return 0;
	*body = l->in + head;
	*bodylen = length;
	return head + length;
}

/* The answer to a GET: its packets, then the next GET (a stalled client stops asking). */
static void on_poll_answer(struct client *c, const char *body, size_t n)
{
	if (c->state == HANDSHAKING) { /* 0{"sid":"...",...} */
		if (n < 1 || body[0] != '0' || !json_string_field(body, n, "sid", c->sid, sizeof c->sid)) {
			kill_client(c);
			return;
		}
		c->state = OPENING;
		on_text(c, body, n);
	} else {
		for (const char *p = body, *end = body + n; p < end && c->state != DEAD;) {
			const char *sep = memchr(p, '\x1e', (size_t)(end - p));
			const char *stop = sep ? sep : end;
			on_text(c, p, (size_t)(stop - p));
			p = stop + 1;
		}
	}
	if (c->state != DEAD && !(c->stalled && c->state == READY))
		send_poll(c);
}

static void on_poll_readable(struct client *c, struct link *l)
{
	char buf[1 << 16];
	for (;;) {
		ssize_t n = recv(l->fd, buf, sizeof buf, MSG_DONTWAIT);
		if (n == 0 && l == &c->post && !c->posting) { /* an idle keep-alive, closed */
			drop_link(l);
			return;
		}
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
			kill_client(c);
			return;
		}
		if (n < 0)
			return;
		append(&l->in, &l->inlen, &l->incap, buf, (size_t)n);
		const char *body;
		size_t bodylen, used;
		bool closes = false;
		while (c->state != DEAD && (used = http_response(c, l, &body, &bodylen, &closes)) > 0) {
			if (l == &c->post) { /* "ok": the next POST may go */
				memmove(l->in, l->in + used, l->inlen - used);
				l->inlen -= used;
				if (closes)
					drop_link(l);
				c->posting = false;
				send_post(c);
				if (closes)
					return;
				continue;
			}
			on_poll_answer(c, body, bodylen);
			if (c->state == DEAD)
				return;
			memmove(l->in, l->in + used, l->inlen - used);
			l->inlen -= used;
		}
		if (c->state == DEAD || (c->stalled && c->state == READY))
			return;
	}
}

static void on_event(uint64_t tag, uint32_t events)
{
	struct client *c = &clients[tag / 2];
	struct link *l = tag % 2 == POST_SIDE ? &c->post : &c->main;
	if (c->state == DEAD)
		return;
	if (c->state == CONNECTING) {
		int err = 0;
		socklen_t len = sizeof err;
		getsockopt(l->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err) {
			kill_client(c);
			return;
		}
		if (opt.polling) {
			c->state = HANDSHAKING;
			arm(c, l, false);
			send_poll(c);
		} else {
			send_upgrade(c);
		}
		return;
	}
	if (events & EPOLLOUT)
		flush_out(c, l);
	if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && c->state != DEAD) {
		if (opt.polling)
			on_poll_readable(c, l);
		else
			on_readable(c);
	}
}

/* ---- the server, seen from /proc ---- */
static double proc_cpu_seconds(int pid)
{
	char path[64], buf[1024];
	snprintf(path, sizeof path, "/proc/%d/stat", pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	size_t n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = 0;
	char *p = strrchr(buf, ')');
	unsigned long utime = 0, stime = 0;
	/* after ") S ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt" */
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
		return -1;
	return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

static long proc_rss_kib(int pid)
{
	char path[64], line[256];
	snprintf(path, sizeof path, "/proc/%d/status", pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	long kib = -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "VmRSS: %ld", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

/* The servers' (and Redis's) CPU seconds and resident memory, added up. */
static double servers_cpu_seconds(void)
{
	double sum = 0;
	for (int i = 0; i < opt.nserver_pids; i++)
		sum += proc_cpu_seconds(opt.server_pid[i]);
	return sum;
}

static long servers_rss_kib(void)
{
	long sum = 0;
	for (int i = 0; i < opt.nserver_pids; i++)
		sum += proc_rss_kib(opt.server_pid[i]);
	return sum;
}

static double self_cpu_seconds(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
	       ru.ru_stime.tv_usec / 1e6;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static double pct(double p)
{
	if (!nlat)
		return -1;
	size_t i = (size_t)(p * (double)(nlat - 1));
	return lat[i] / 1000.0;
}

/* ---- the loop ---- */
static void run_until(int64_t deadline, bool (*done)(void), void (*tick)(int64_t))
{
	struct epoll_event ev[512];
	while (now_ns() < deadline && !(done && done())) {
		int n = epoll_wait(epfd, ev, 512, 1);
		for (int i = 0; i < n; i++)
			on_event(ev[i].data.u64, ev[i].events);
		start_more();
		if (tick)
			tick(now_ns());
	}
}

static bool all_settled(void) { return joined_count + dead_count >= opt.clients; }

/* fan-out: the first S ready, non-stalled clients send, round-robin, at R a second in all */
static int64_t send_start;
static long sent_total;
static int next_sender;

static void send_tick(int64_t now)
{
	long due = (long)((double)(now - send_start) / 1e9 * opt.rate) - sent_total;
	for (; due > 0; due--) {
		struct client *c = NULL;
		for (int tries = 0; tries < opt.clients && !c; tries++) {
			struct client *k = &clients[opt.stall + next_sender];
			next_sender = (next_sender + 1) % opt.senders;
			if (k->state == READY)
				c = k;
		}
		if (!c)
			return;
		static char *msg, *padding;
		if (!msg) {
			msg = malloc((size_t)opt.pad + 160);
			padding = malloc((size_t)opt.pad + 1);
			if (!msg || !padding)
				die("malloc");
			memset(padding, 'x', (size_t)opt.pad);
			padding[opt.pad] = 0;
		}
		int64_t t = now_ns();
		int n = snprintf(msg, (size_t)opt.pad + 160,
		                 "42[\"msg\",{\"action\":\"send msg\",\"t\":%lld,\"msg\":\"bench%s\"}]",
		                 (long long)t, padding);
		send_text(c, msg, (size_t)n);
		sent_total++;
		if (t >= measure_from && t < measure_to)
			sent_measured++;
	}
}

static int64_t last_rss_sample;
static void sample_tick(int64_t now)
{
	if (opt.nserver_pids && now - last_rss_sample > 500000000) {
		long rss = servers_rss_kib();
		if (rss > server_rss_max)
			server_rss_max = rss;
		last_rss_sample = now;
	}
}

static void fanout_tick(int64_t now)
{
	send_tick(now);
	sample_tick(now);
}

static void usage(void)
{
	fprintf(stderr,
	        "usage: loadgen [--host H] [--port P] [--path /socket.io/] --clients N\n"
	        "               [--scenario join|fanout|hold] [--senders S] [--rate R]\n"
	        "               [--seconds T] [--warmup W] [--delta] [--stall K]\n"
	        "               [--server-pid PID] [--ramp N] [--pad BYTES]\n"
	        "               [--per-address N] [--transport websocket|polling]\n"
	        "               [--port2 P] (every other client connects to P)\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"path", 1, 0, 'P'}, {"clients", 1, 0, 'n'},
		{"scenario", 1, 0, 's'}, {"senders", 1, 0, 'S'}, {"rate", 1, 0, 'r'},
		{"seconds", 1, 0, 't'}, {"warmup", 1, 0, 'w'}, {"delta", 0, 0, 'd'},
		{"stall", 1, 0, 'k'}, {"server-pid", 1, 0, 'x'}, {"ramp", 1, 0, 'R'}, {"pad", 1, 0, 'z'},
		{"per-address", 1, 0, 'a'}, {"transport", 1, 0, 'T'}, {"port2", 1, 0, 'q'}, {0, 0, 0, 0}};
	int ch;
	while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (ch) {
		case 'h': opt.host = optarg; break;
		case 'p': opt.port = atoi(optarg); break;
		case 'P': opt.path = optarg; break;
		case 'n': opt.clients = atoi(optarg); break;
		case 's': opt.scenario = optarg; break;
		case 'S': opt.senders = atoi(optarg); break;
		case 'r': opt.rate = atof(optarg); break;
		case 't': opt.seconds = atof(optarg); break;
		case 'w': opt.warmup = atof(optarg); break;
		case 'd': opt.delta = true; break;
		case 'k': opt.stall = atoi(optarg); break;
		case 'x':
			if (opt.nserver_pids < 4)
				opt.server_pid[opt.nserver_pids++] = atoi(optarg);
			break;
		case 'q': opt.port2 = atoi(optarg); break;
		case 'R': opt.ramp = atoi(optarg); break;
		case 'z': opt.pad = atoi(optarg); break;
		case 'a': opt.per_address = atoi(optarg); break;
		case 'T':
			if (strcmp(optarg, "polling") != 0 && strcmp(optarg, "websocket") != 0)
				usage();
			opt.polling = strcmp(optarg, "polling") == 0;
			break;
		default: usage();
		}
	}
	if (opt.clients < 1 || opt.senders < 1 || opt.senders + opt.stall > opt.clients || opt.pad < 0 ||
	    opt.per_address < 1)
		usage();
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);
	if ((long)rl.rlim_cur < (opt.polling ? 2 : 1) * opt.clients + 64) {
		fprintf(stderr, "loadgen: %d clients need more file descriptors than %ld\n", opt.clients,
		        (long)rl.rlim_cur);
		return 1;
	}

	clients = calloc((size_t)opt.clients, sizeof *clients);
	epfd = epoll_create1(0);
	for (int i = 0; i < opt.stall; i++)
		clients[i].stalled = true;

	double server_cpu0 = servers_cpu_seconds();
	long server_rss0 = servers_rss_kib();
	double self_cpu0 = self_cpu_seconds();

	/* everyone joins */
	bool storm = strcmp(opt.scenario, "join") == 0;
	if (storm)
		opt.ramp = opt.clients;
	storm_start = now_ns();
	measure_from = measure_to = INT64_MAX;
	start_more();
	run_until(storm_start + (int64_t)120e9, all_settled, sample_tick);
	double storm_seconds = (double)((storm_end ? storm_end : now_ns()) - storm_start) / 1e9;
	double server_cpu_joined = servers_cpu_seconds();
	double self_cpu_joined = self_cpu_seconds();
	long server_rss_joined = servers_rss_kib();

	double cpu_measured = 0, self_measured = 0;
	long dead_before = dead_count;
	if (strcmp(opt.scenario, "fanout") == 0) {
		send_start = now_ns();
		measure_from = send_start + (int64_t)(opt.warmup * 1e9);
		measure_to = measure_from + (int64_t)(opt.seconds * 1e9);
		run_until(measure_from, NULL, fanout_tick);
		double c0 = servers_cpu_seconds(), s0 = self_cpu_seconds();
		run_until(measure_to, NULL, fanout_tick);
		cpu_measured = (servers_cpu_seconds()) - c0;
		self_measured = self_cpu_seconds() - s0;
		run_until(measure_to + (int64_t)1e9, NULL, sample_tick); /* the last ones arrive */
	} else if (strcmp(opt.scenario, "hold") == 0) {
		double c0 = servers_cpu_seconds(), s0 = self_cpu_seconds();
		run_until(now_ns() + (int64_t)(opt.seconds * 1e9), NULL, sample_tick);
		cpu_measured = (servers_cpu_seconds()) - c0;
		self_measured = self_cpu_seconds() - s0;
	}

	qsort(lat, nlat, sizeof *lat, cmp_u32);
	long expected = sent_measured * (opt.clients - opt.stall);
	long alive = opt.clients - dead_count;
	printf("{\"scenario\":\"%s\",\"transport\":\"%s\",\"clients\":%d,\"delta\":%s,\"senders\":%d,\"rate\":%g,"
	       "\"stalled\":%d,\"joined\":%d,\"failed\":%d,\"join_seconds\":%.3f,"
	       "\"sent\":%ld,\"expected\":%ld,\"received\":%ld,\"received_in_window\":%ld,"
	       "\"dropped_during_run\":%ld,"
	       "\"alive_at_end\":%ld,\"pings_answered\":%ld,"
	       "\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,"
	       "\"server_cpu_s\":%.2f,\"server_cpu_join_s\":%.2f,\"server_rss_kib_start\":%ld,"
	       "\"server_rss_kib_joined\":%ld,\"server_rss_kib_end\":%ld,\"server_rss_kib_max\":%ld,"
	       "\"loadgen_cpu_s\":%.2f,\"loadgen_cpu_join_s\":%.2f,\"measured_seconds\":%g,"
	       "\"stalled_dropped_after_s\":%.3f}\n",
	       opt.scenario, opt.polling ? "polling" : "websocket", opt.clients, opt.delta ? "true" : "false", opt.senders, opt.rate,
	       opt.stall, joined_count, opt.clients - joined_count, storm_seconds, sent_measured,
	       expected, received_measured, received_in_window, dead_count - dead_before, alive, pings_total, pct(0.5),
	       pct(0.9), pct(0.99), nlat ? lat[nlat - 1] / 1000.0 : -1, cpu_measured,
	       server_cpu_joined - server_cpu0, server_rss0, server_rss_joined,
	       servers_rss_kib(), server_rss_max, self_measured,
	       self_cpu_joined - self_cpu0, opt.seconds,
	       stalled_dropped_at ? (double)(stalled_dropped_at - send_start) / 1e9 : -1.0);
	return 0;
}
