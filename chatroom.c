/*
 * chatroom -- a Socket.IO chat room in one C file.
 *
 * Any standard Socket.IO client joins it: python-socketio, socket.io-client 2, 3 and 4 in
 * Node or a browser, over HTTP long-polling, WebSocket, or polling upgraded to WebSocket.
 * Everyone in the room sees every message, login and logout, in one and the same order.
 * The chat contract it keeps is written out in the README.
 *
 * The file reads top-down:
 *
 *   configuration      compile-time limits, flags
 *   small tools        logging, time, randomness, base64, SHA-1, UTF-8, a string map
 *   JSON               a validating scanner with a depth limit; jansson for the rest
 *   names              the nickname list and who holds which name
 *   peers              what one address may hold
 *   shared buffers     one serialized packet, referenced by every queue it is sent to
 *   sessions           one Engine.IO session per client, its bounded outbound queue
 *   Engine.IO packets  payload encodings of protocol 3 and 4
 *   Engine.IO          handshake, heartbeat, what a session does with a packet
 *   HTTP               answers we write ourselves, request heads we read ourselves
 *   HTTP connections   every connection while it waits for the network
 *   long-polling       GET and POST, run on civetweb's worker threads
 *   WebSocket          frames, and the wire thread that owns every WebSocket
 *   Socket.IO          packets, namespaces, acknowledgements, binary attachments
 *   the chat room      login, logout, msg
 *   the room across servers   with --redis: one room, one order, through Redis
 *   metrics            /metrics and /healthz
 *   HTTP routes        what civetweb hands us
 *   main               start-up, signals, shutdown
 *
 * Threads. The wire thread, one epoll loop, holds every connection while it waits for
 * the network: request heads and bodies still arriving, idle keep-alive connections,
 * long-poll GETs waiting for packets, answers being written, and every WebSocket, whose
 * frames it reads and writes without ever blocking. civetweb
 * (https://github.com/civetweb/civetweb) parses and routes: a small fixed pool of its
 * workers runs only requests that are complete, and each returns at once, parking a GET
 * with the wire thread if it must wait. So a client that stops reading or sending stalls
 * nobody: its queue grows to a bound and then it is dropped. The main thread waits for
 * signals and prints the log. With --redis, one more thread talks to Redis (see the room
 * across servers). (Built against Debian's libcivetweb, whose connections
 * cannot leave their worker, each connection holds a worker as civetweb means it to.)
 *
 * Locking. One mutex of ours, room_lock, guards every session, every outbound queue,
 * the room, the address table and what the wire thread and the workers hand each other.
 * Nothing writes to a client while holding it: sending means appending a reference to a
 * shared buffer to a queue, and waking the queue's writer. The lock order:
 *     room_lock  ->  logq.lock
 * logq.lock (the log lines' queue) is a leaf: nothing is taken under it. civetweb's
 * locks -- its per-connection lock, and the worker queue's, taken when the wire thread
 * hands a request over (conn_produce) -- are taken only inside civetweb's functions,
 * and we call none of them while holding room_lock.
 */
#define _GNU_SOURCE

#if defined(CHATROOM_CIVETWEB_C)
/* `make` compiles civetweb into this translation unit, from the source it fetched from the
 * package registry. That shows us civetweb's connection struct, so that a WebSocket can
 * leave civetweb's worker thread (see take_socket). */
#include CHATROOM_CIVETWEB_C
#define CIVETWEB_EMBEDDED 1
/* civetweb poisons these names for its own code; ours may use them. */
#undef malloc
#undef calloc
#undef realloc
#undef free
#undef snprintf
#undef vsnprintf
#undef mg_cry
#else
/* cc chatroom.c -lcivetweb: Debian's shared library, whose connection struct is opaque. */
#include <civetweb.h>
#define CIVETWEB_EMBEDDED 0
#endif

#include <jansson.h>
#include <hiredis/hiredis.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <ifaddrs.h>
#include <limits.h>
#include <malloc.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* ================================ configuration ================================ */
/*
 * Capacity is fixed at compile time: every per-client table below is a static array of
 * these sizes, so the server never allocates its way into trouble as clients arrive.
 * --max-clients chooses a room size up to MAX_CLIENTS. There are a few more session slots
 * than room places, so that a client who arrives at a full room can be told so in words
 * (a Socket.IO CONNECT_ERROR "room is full") rather than with a bare HTTP 503; sessions
 * that never join make way for newcomers (see sessions). Connections have a table of
 * their own, larger: every client holds one or two, and some connections never become
 * clients at all.
 *
 * Everything a client can make us keep or do has a budget: its outbound queue
 * (--queue-limit), what it may send a second (--inbound-rate, --flood-limit), what its
 * address may hold (--conns-per-address, --sessions-per-address, --joins-per-minute), and
 * all of it together (--max-memory). README says how each default was chosen.
 */
#define CHATROOM_VERSION "1.0.0"

#ifndef CHATROOM_MAX_CLIENTS
#define CHATROOM_MAX_CLIENTS 10000
#endif

enum {
	MAX_CLIENTS = CHATROOM_MAX_CLIENTS,
	SESSION_SLACK = 16 + CHATROOM_MAX_CLIENTS / 8,
	MAX_SESSIONS = MAX_CLIENTS + SESSION_SLACK,
	MAX_WEBSOCKETS = MAX_SESSIONS + 64, /* upgrade probes, and sockets lingering in close */
	MAX_CONNS = 2 * MAX_SESSIONS + 8192, /* HTTP connections, waiting or busy */
	MAX_PEERS = MAX_CONNS + MAX_SESSIONS, /* client addresses we count for */
	MAX_NAMESPACES = 2,                 /* the chat needs "/"; the protocol test server two */
	SID_LEN = 20,                       /* like Node's: 15 random bytes in base64url */
	JSON_MAX_DEPTH = 64,                /* deeper JSON is refused before anyone parses it */
	MAX_ATTACHMENTS = 10,               /* binary attachments per Socket.IO packet, as Node */
	UPGRADE_TIMEOUT_MS = 10000,         /* a WebSocket probe must finish its upgrade within */
	CLOSE_LINGER_MS = 1000,             /* how long a closing WebSocket waits for its peer */
	POLL_MAX_PACKETS = 16,              /* per long-poll response: python-engineio refuses more */
	QUEUE_ENTRY_COST = 32,              /* bytes a queued packet costs beyond its data */
	PACKET_IN_COST = 256,               /* bytes a received packet costs an inbound budget
	                                       beyond its data: small packets are not free */
	HEAD_MAX = 16384,                   /* the longest request head (civetweb's buffer) */
	KEEP_ALIVE_MS = 5000,               /* an idle keep-alive connection waits, as Node's */
	BODY_STALL_MS = 10000,              /* a request body must keep arriving */
	WRITE_STALL_MS = 30000,             /* an answer must keep being read */
};

/* The flags. Defaults are Node's socket.io defaults where Node has one. */
static struct options {
	const char *host; /* NULL: every interface, IPv4 and IPv6 */
	int port;
	const char *names_file; /* NULL: the list compiled into the binary */
	int ping_interval;      /* ms */
	int ping_timeout;       /* ms */
	size_t max_payload;     /* bytes: a POST body, a WebSocket message */
	int max_clients;        /* room size */
	size_t queue_limit;     /* bytes: outbound queue of one client; over it, it is dropped */
	int threads;            /* civetweb workers; 0: chosen at start (see server_start) */
	bool quiet;             /* no join/leave log */
	int flood_limit;        /* messages a second a client may send; 0: no limit */
	size_t inbound_rate;    /* bytes a second a client may send; 0: no limit */
	int conns_per_address;  /* connections one address (IPv6: one /64) may hold */
	int sessions_per_address;
	int joins_per_minute;   /* room joins one address may make a minute, in bursts */
	size_t max_memory;      /* bytes clients may make us hold; 0: a quarter of RAM */
	int header_timeout;     /* ms: a request head must arrive within this */
	int recovery_window;    /* s: a lost client may come back within this; 0: off */
	const char *metrics_host; /* NULL: /metrics on the chat's port */
	int metrics_port;
	const char *redis_host; /* --redis: NULL, one server alone */
	int redis_port, redis_db;
	const char *room;       /* --room: the prefix of the room's keys in Redis */
	int connect_timeout;    /* ms: a session must join a namespace within this */
	int history;            /* chat messages kept for newcomers; 0: none */
	const char *path;       /* where Engine.IO listens: "/socket.io/" */
	const char *cors[16];   /* origins allowed to use us from a browser page elsewhere */
	int ncors;              /* 0: no CORS headers at all, as Node's socket.io by default */
} opt = {
	.host = NULL,
	.port = 5000,
	.names_file = NULL,
	.ping_interval = 25000,
	.ping_timeout = 20000,
	.max_payload = 1000000,
	.max_clients = MAX_CLIENTS, /* the largest room the arrays hold; see README, Performance */
	.queue_limit = 0, /* 0: chosen from max_payload in parse_options */
	.threads = 0,
	.quiet = false,
	.flood_limit = 100,
	.inbound_rate = 128 * 1024,
	.conns_per_address = 512,
	.sessions_per_address = 256,
	.joins_per_minute = 240,
	.max_memory = 0,
	.header_timeout = 60000,
	.recovery_window = 15,
	.room = "chatroom",
	.connect_timeout = 45000,
	.history = 50,
	.path = "/socket.io/",
};

static void usage(FILE *f)
{
	fprintf(f,
	        "Usage: chatroom [options]\n"
	        "A Socket.IO chat room. Open http://HOST:PORT/ or connect any Socket.IO client.\n"
	        "\n"
	        "  -p, --port PORT          port to listen on (default 5000)\n"
	        "  -H, --host ADDRESS       address to listen on (default: every interface,\n"
	        "                           IPv4 and IPv6)\n"
	        "  -n, --names FILE         nickname list, one UTF-8 name a line (default:\n"
	        "                           the list built into the binary)\n"
	        "      --ping-interval MS   Engine.IO ping interval (default 25000)\n"
	        "      --ping-timeout MS    Engine.IO ping timeout (default 20000)\n"
	        "      --max-payload BYTES  largest message or POST body (default 1000000)\n"
	        "      --max-clients N      room size (default and at most %d)\n"
	        "      --queue-limit BYTES  outbound backlog after which a client that does\n"
	        "                           not read is dropped (default: 2 x max-payload or\n"
	        "                           32 x max-clients^2 if more, at most 64 MiB)\n"
	        "      --threads N          HTTP worker threads (default: 2 per CPU, at least 4)\n"
	        "      --history N          last messages a newcomer is sent (default 50; 0: none)\n"
	        "      --connect-timeout MS a client must join the room within this after it\n"
	        "                           opens its connection (default 45000)\n"
	        "      --flood-limit N      messages a second one client may send, in bursts\n"
	        "                           of up to 2N; a client over it is disconnected\n"
	        "                           (default 100; 0: no limit)\n"
	        "      --inbound-rate BYTES bytes a second one client may send, in bursts of\n"
	        "                           max-payload; past it, we stop reading from it for\n"
	        "                           a while (default 131072; 0: no limit)\n"
	        "      --conns-per-address N    connections one address (IPv6: one /64) may\n"
	        "                           hold at once (default 512)\n"
	        "      --sessions-per-address N clients one address may have at once\n"
	        "                           (default 256)\n"
	        "      --joins-per-minute N room joins one address may make a minute, in\n"
	        "                           bursts of N (default 240)\n"
	        "      --max-memory BYTES   what all clients together may make us hold; past\n"
	        "                           it, those furthest behind are dropped (default: a\n"
	        "                           quarter of RAM, at most 2 GiB; suffixes K, M, G)\n"
	        "      --header-timeout MS  a request head must arrive within this\n"
	        "                           (default 60000)\n"
	        "      --recovery-window S  a client that lost its connection and asked for\n"
	        "                           recovery keeps its name and place this long\n"
	        "                           (default 15; 0: off)\n"
	        "      --metrics-address ADDRESS:PORT  serve /metrics (Prometheus) there\n"
	        "                           instead of on --port, e.g. 127.0.0.1:9100\n"
	        "      --redis redis://HOST:PORT[/DB]  serve one room with every other server\n"
	        "                           that uses this Redis and room name\n"
	        "      --room NAME          the room's name in Redis (default chatroom)\n"
	        "      --path PATH          where Socket.IO clients connect (default /socket.io/)\n"
	        "      --cors-origin ORIGIN a web page's origin allowed to connect from another\n"
	        "                           site, like https://example.org; repeatable; * for\n"
	        "                           any. With a list, other origins are refused (403)\n"
	        "  -q, --quiet              do not log joins and leaves\n"
	        "  -h, --help               show this help and exit\n"
	        "  -V, --version            show the version and exit\n"
	        "\n"
	        "Exit status: 0 after SIGINT or SIGTERM, 1 if the server cannot start,\n"
	        "2 for a bad command line.\n",
	        MAX_CLIENTS);
}

/* Reads a whole decimal number in [lo, hi] or exits 2 saying which flag was wrong. */
static long parse_number(const char *flag, const char *arg, long lo, long hi)
{
	char *end;
	errno = 0;
	long v = strtol(arg, &end, 10);
	if (errno || end == arg || *end || v < lo || v > hi) {
		fprintf(stderr, "chatroom: %s wants a whole number from %ld to %ld, not '%s'\n",
		        flag, lo, hi, arg);
		fprintf(stderr, "Try 'chatroom --help'.\n");
		exit(2);
	}
	return v;
}

/* A size in bytes, with an optional K, M or G (powers of 1024), in [lo, hi]; or exit 2. */
static uint64_t parse_size(const char *flag, const char *arg, uint64_t lo, uint64_t hi)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(arg, &end, 10);
	int shift = 0;
	if (end != arg && *end && !end[1]) {
		const char *units = "KMG";
		const char *u = strchr(units, *end == 'k' ? 'K' : *end);
		if (u && *u) {
			shift = 10 * (int)(u - units + 1);
			end++;
		}
	}
	bool ok = !errno && end != arg && !*end && arg[0] != '-' && v <= (hi >> shift) &&
	          (v << shift) >= lo;
	if (!ok) {
		fprintf(stderr, "chatroom: %s wants a size from %llu to %llu bytes (K, M, G allowed), "
		        "not '%s'\n", flag, (unsigned long long)lo, (unsigned long long)hi, arg);
		fprintf(stderr, "Try 'chatroom --help'.\n");
		exit(2);
	}
	return (uint64_t)v << shift;
}

/* ADDRESS:PORT, or [IPv6]:PORT: where an extra listener goes; or exit 2. */
static void parse_address(const char *flag, const char *arg, const char **host, int *port)
{
	const char *colon = strrchr(arg, ':');
	size_t n = colon ? (size_t)(colon - arg) : 0;
	if (n >= 2 && arg[0] == '[' && arg[n - 1] == ']')
		arg++, n -= 2;
	unsigned char a[16];
	char h[64];
	bool ok = colon && n > 0 && n < sizeof h;
	if (ok) {
		memcpy(h, arg, n);
		h[n] = 0;
		ok = inet_pton(AF_INET, h, a) == 1 || inet_pton(AF_INET6, h, a) == 1 ||
		     strcmp(h, "localhost") == 0;
	}
	if (!ok) {
		fprintf(stderr, "chatroom: %s wants ADDRESS:PORT, like 127.0.0.1:9100, not '%s'\n", flag, arg);
		exit(2);
	}
	char *copy = strdup(h);
	if (!copy)
		abort();
	*host = copy;
	*port = (int)parse_number(flag, colon + 1, 1, 65535);
}

/* --redis redis://HOST[:PORT][/DB], HOST a name, an IPv4 address or [an IPv6 one]. */
static void parse_redis_url(const char *arg)
{
	const char *p = strncmp(arg, "redis://", 8) == 0 ? arg + 8 : NULL;
	const char *host_end = NULL, *port = NULL;
	if (p && *p == '[') {
		host_end = strchr(p, ']');
		port = host_end && host_end[1] == ':' ? host_end + 2 : NULL;
		p++;
	} else if (p) {
		host_end = p + strcspn(p, ":/");
		port = *host_end == ':' ? host_end + 1 : NULL;
	}
	const char *slash = p ? strchr(host_end ? host_end : p, '/') : NULL;
	if (!p || !host_end || host_end == p || host_end - p > 255) {
		fprintf(stderr, "chatroom: --redis wants redis://HOST:PORT[/DB], like "
		                "redis://127.0.0.1:6379, not '%s'\n", arg);
		exit(2);
	}
	char *host = strndup(p, (size_t)(host_end - p));
	if (!host)
		abort();
	opt.redis_host = host;
	opt.redis_port = 6379;
	if (port) {
		char digits[8] = "";
		size_t n = slash ? (size_t)(slash - port) : strlen(port);
		if (n < sizeof digits)
			memcpy(digits, port, n), digits[n] = 0;
		opt.redis_port = (int)parse_number("--redis (port)", digits, 1, 65535);
	}
	if (slash && slash[1])
		opt.redis_db = (int)parse_number("--redis (database)", slash + 1, 0, 100000);
}

/* "/chat" or "chat/" become "/chat/": Engine.IO paths begin and end with a slash. */
static const char *normalize_path(const char *arg)
{
	size_t n = strlen(arg);
	if (n == 0 || n > 200 || strpbrk(arg, "?# \t\"'<>\\")) {
		fprintf(stderr, "chatroom: --path wants a path like /socket.io/, not '%s'\n", arg);
		exit(2);
	}
	char *p = malloc(n + 3);
	if (!p)
		abort();
	snprintf(p, n + 3, "%s%s%s", arg[0] == '/' ? "" : "/", arg, arg[n - 1] == '/' ? "" : "/");
	return p;
}

/*
 * How far behind a client may fall before it is dropped. It must hold what the contract
 * itself sends in a burst: when a full room of legacy clients joins at once, the first
 * one is sent every later login with the whole name_list, some 35 bytes a name, so about
 * 18 * N^2 bytes; twice that, up to 64 MiB, and never less than two messages. A backlog is
 * mostly broadcasts, whose bytes all members' queues share: the limit bounds lag more than
 * memory.
 */
static size_t default_queue_limit(void)
{
	/* In 64 bits: 32 x 10000^2 does not fit in a 32-bit long (armhf). */
	uint64_t storm = 32 * (uint64_t)opt.max_clients * (uint64_t)opt.max_clients;
	uint64_t limit = 2 * (uint64_t)opt.max_payload;
	if (storm > limit)
		limit = storm < (64u << 20) ? storm : (64u << 20);
	return limit < (1u << 20) ? 1u << 20 : (size_t)limit;
}

/*
 * What all clients together may make us hold: a quarter of the machine's memory, and at
 * most 2 GiB (1 GiB where addresses are 32 bits): a Raspberry Pi with 1 GiB gives 256 MiB,
 * a room of 10000 uses a few tens of MiB in normal times. Past it, the clients furthest
 * behind are dropped first (see memory budget).
 */
static size_t default_max_memory(void)
{
	long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
	uint64_t ram = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 1ull << 30;
	uint64_t cap = SIZE_MAX > 0xFFFFFFFFu ? 2ull << 30 : 1ull << 30;
	uint64_t quarter = ram / 4;
	return (size_t)(quarter < cap ? quarter : cap);
}

static void parse_options(int argc, char **argv)
{
	enum { OPT_PING_INTERVAL = 256, OPT_PING_TIMEOUT, OPT_MAX_PAYLOAD, OPT_MAX_CLIENTS,
	       OPT_QUEUE_LIMIT, OPT_THREADS, OPT_PATH, OPT_CORS, OPT_FLOOD, OPT_CONNECT_TIMEOUT,
	       OPT_HISTORY, OPT_INBOUND_RATE, OPT_CONNS_PER_ADDRESS, OPT_SESSIONS_PER_ADDRESS,
	       OPT_JOINS_PER_MINUTE, OPT_MAX_MEMORY, OPT_HEADER_TIMEOUT, OPT_METRICS_ADDRESS,
	       OPT_RECOVERY_WINDOW, OPT_REDIS, OPT_ROOM };
	static const struct option longopts[] = {
		{"port", required_argument, NULL, 'p'},
		{"host", required_argument, NULL, 'H'},
		{"names", required_argument, NULL, 'n'},
		{"ping-interval", required_argument, NULL, OPT_PING_INTERVAL},
		{"ping-timeout", required_argument, NULL, OPT_PING_TIMEOUT},
		{"max-payload", required_argument, NULL, OPT_MAX_PAYLOAD},
		{"max-clients", required_argument, NULL, OPT_MAX_CLIENTS},
		{"queue-limit", required_argument, NULL, OPT_QUEUE_LIMIT},
		{"threads", required_argument, NULL, OPT_THREADS},
		{"path", required_argument, NULL, OPT_PATH},
		{"cors-origin", required_argument, NULL, OPT_CORS},
		{"flood-limit", required_argument, NULL, OPT_FLOOD},
		{"connect-timeout", required_argument, NULL, OPT_CONNECT_TIMEOUT},
		{"history", required_argument, NULL, OPT_HISTORY},
		{"inbound-rate", required_argument, NULL, OPT_INBOUND_RATE},
		{"conns-per-address", required_argument, NULL, OPT_CONNS_PER_ADDRESS},
		{"sessions-per-address", required_argument, NULL, OPT_SESSIONS_PER_ADDRESS},
		{"joins-per-minute", required_argument, NULL, OPT_JOINS_PER_MINUTE},
		{"max-memory", required_argument, NULL, OPT_MAX_MEMORY},
		{"header-timeout", required_argument, NULL, OPT_HEADER_TIMEOUT},
		{"metrics-address", required_argument, NULL, OPT_METRICS_ADDRESS},
		{"recovery-window", required_argument, NULL, OPT_RECOVERY_WINDOW},
		{"redis", required_argument, NULL, OPT_REDIS},
		{"room", required_argument, NULL, OPT_ROOM},
		{"quiet", no_argument, NULL, 'q'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "p:H:n:qhV", longopts, NULL)) != -1) {
		switch (c) {
		case 'p': opt.port = (int)parse_number("--port", optarg, 1, 65535); break;
		case 'H': opt.host = optarg; break;
		case 'n': opt.names_file = optarg; break;
		case OPT_PING_INTERVAL:
			opt.ping_interval = (int)parse_number("--ping-interval", optarg, 10, 3600000);
			break;
		case OPT_PING_TIMEOUT:
			opt.ping_timeout = (int)parse_number("--ping-timeout", optarg, 10, 3600000);
			break;
		case OPT_MAX_PAYLOAD:
			opt.max_payload = (size_t)parse_size("--max-payload", optarg, 64, 100000000);
			break;
		case OPT_MAX_CLIENTS:
			opt.max_clients = (int)parse_number("--max-clients", optarg, 1, MAX_CLIENTS);
			break;
		case OPT_QUEUE_LIMIT:
			opt.queue_limit = (size_t)parse_size("--queue-limit", optarg, 1024, 1u << 30);
			break;
		case OPT_THREADS:
			opt.threads = (int)parse_number("--threads", optarg, 4, 65536);
			break;
		case OPT_HISTORY:
			opt.history = (int)parse_number("--history", optarg, 0, 10000);
			break;
		case OPT_CONNECT_TIMEOUT:
			opt.connect_timeout = (int)parse_number("--connect-timeout", optarg, 10, 3600000);
			break;
		case OPT_FLOOD:
			opt.flood_limit = (int)parse_number("--flood-limit", optarg, 0, 1000000);
			break;
		case OPT_INBOUND_RATE:
			opt.inbound_rate = (size_t)parse_size("--inbound-rate", optarg, 0, 1u << 30);
			break;
		case OPT_CONNS_PER_ADDRESS:
			opt.conns_per_address = (int)parse_number("--conns-per-address", optarg, 1, MAX_CONNS);
			break;
		case OPT_SESSIONS_PER_ADDRESS:
			opt.sessions_per_address =
				(int)parse_number("--sessions-per-address", optarg, 1, MAX_SESSIONS);
			break;
		case OPT_JOINS_PER_MINUTE:
			opt.joins_per_minute = (int)parse_number("--joins-per-minute", optarg, 1, 1000000);
			break;
		case OPT_MAX_MEMORY:
			opt.max_memory = (size_t)parse_size("--max-memory", optarg, 16u << 20, SIZE_MAX);
			break;
		case OPT_HEADER_TIMEOUT:
			opt.header_timeout = (int)parse_number("--header-timeout", optarg, 100, 3600000);
			break;
		case OPT_RECOVERY_WINDOW:
			opt.recovery_window = (int)parse_number("--recovery-window", optarg, 0, 3600);
			break;
		case OPT_REDIS:
			parse_redis_url(optarg);
			break;
		case OPT_ROOM:
			if (!*optarg || strlen(optarg) > 64 ||
			    strspn(optarg, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") !=
			        strlen(optarg)) {
				fprintf(stderr, "chatroom: --room wants 1 to 64 letters, digits, '_', '.' "
				                "or '-', not '%s'\n", optarg);
				exit(2);
			}
			opt.room = optarg;
			break;
		case OPT_METRICS_ADDRESS:
			parse_address("--metrics-address", optarg, &opt.metrics_host, &opt.metrics_port);
			break;
		case OPT_PATH:
			opt.path = normalize_path(optarg);
			break;
		case OPT_CORS:
			if (opt.ncors == (int)(sizeof opt.cors / sizeof *opt.cors)) {
				fprintf(stderr, "chatroom: at most %zu --cors-origin flags\n",
				        sizeof opt.cors / sizeof *opt.cors);
				exit(2);
			}
			opt.cors[opt.ncors++] = optarg;
			break;
		case 'q': opt.quiet = true; break;
		case 'h': usage(stdout); exit(0);
		case 'V': printf("chatroom %s\n", CHATROOM_VERSION); exit(0);
		default: usage(stderr); exit(2);
		}
	}
	if (optind < argc) {
		fprintf(stderr, "chatroom: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		exit(2);
	}
	if (opt.metrics_host && opt.metrics_port == opt.port) {
		fprintf(stderr, "chatroom: --metrics-address wants a port of its own, not --port's\n");
		exit(2);
	}
	if (opt.queue_limit == 0)
		opt.queue_limit = default_queue_limit();
	if (opt.max_memory == 0)
		opt.max_memory = default_max_memory();
	if (opt.queue_limit < opt.max_payload + 4 * QUEUE_ENTRY_COST) {
		fprintf(stderr, "chatroom: --queue-limit must hold at least one message of "
		                "--max-payload bytes (%zu)\n", opt.max_payload);
		exit(2);
	}
}

/* ================================= small tools ================================= */

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p) {
		fprintf(stderr, "chatroom: out of memory\n");
		abort();
	}
	return p;
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p) {
		fprintf(stderr, "chatroom: out of memory\n");
		abort();
	}
	return p;
}

static char *xstrndup(const char *s, size_t n)
{
	char *d = xmalloc(n + 1);
	memcpy(d, s, n);
	d[n] = 0;
	return d;
}

/* Milliseconds on the monotonic clock: timers never jump with the wall clock. */
static int64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t now_ms(void) { return now_us() / 1000; }

/*
 * A token bucket: `rate` tokens a second, at most `burst` saved up. What a client may
 * send is one: it takes what it sends, and may go into debt; in debt, it waits.
 */
struct bucket {
	double tokens;
	int64_t at; /* ms when tokens were last counted; 0: never, full */
};

static void bucket_refill(struct bucket *b, double rate, double burst, int64_t now)
{
	if (b->at == 0)
		b->tokens = burst;
	else if (now > b->at)
		b->tokens += (double)(now - b->at) * rate / 1000.0;
	if (b->tokens > burst)
		b->tokens = burst;
	b->at = now;
}

/* Takes n tokens (the balance may go below 0) and returns what is left. */
static double bucket_take(struct bucket *b, double rate, double burst, double n, int64_t now)
{
	bucket_refill(b, rate, burst, now);
	b->tokens -= n;
	return b->tokens;
}

/* When the balance is back to 0 (now, if it is not below). */
static int64_t bucket_even_at(const struct bucket *b, double rate)
{
	if (b->tokens >= 0 || rate <= 0)
		return b->at;
	return b->at + (int64_t)(-b->tokens * 1000.0 / rate) + 1;
}

/* A growable byte buffer, for building payloads and messages. */
struct buf {
	char *p;
	size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t more)
{
	if (b->len + more <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 256;
	while (cap < b->len + more)
		cap *= 2;
	b->p = xrealloc(b->p, cap);
	b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
	if (n == 0)
		return;
	buf_reserve(b, n);
	memcpy(b->p + b->len, p, n);
	b->len += n;
}

static void buf_adds(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }
static void buf_addc(struct buf *b, char c) { buf_add(b, &c, 1); }

static void buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	buf_reserve(b, (size_t)n + 1);
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

static void buf_free(struct buf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

/*
 * The log. Joins and leaves happen under room_lock, and printing there could block the
 * whole room on a terminal or pipe that is not read. So lines go into a bounded buffer and
 * the main thread prints them; if nobody reads our output, lines are dropped and counted.
 * The buffer's lock is a leaf: taken last, held only to copy a line.
 */
static struct {
	pthread_mutex_t lock;
	struct buf text;
	long dropped;
	int wake_fd; /* eventfd the main thread polls */
} logq = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake_fd = -1};

enum { LOG_BUFFER_MAX = 1 << 20 };

static void log_line(const char *fmt, ...)
{
	char line[512];
	time_t t = time(NULL);
	struct tm tm;
	localtime_r(&t, &tm);
	size_t n = strftime(line, sizeof line, "%Y-%m-%d %H:%M:%S ", &tm);
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
	va_end(ap);
	n = m < 0 ? n : (n + (size_t)m < sizeof line - 1 ? n + (size_t)m : sizeof line - 2);
	line[n++] = '\n';

	pthread_mutex_lock(&logq.lock);
	if (logq.text.len + n > LOG_BUFFER_MAX)
		logq.dropped++;
	else
		buf_add(&logq.text, line, n);
	pthread_mutex_unlock(&logq.lock);
	if (logq.wake_fd >= 0) {
		uint64_t one = 1;
		ssize_t w = write(logq.wake_fd, &one, sizeof one);
		(void)w;
	}
}

/* Called by the main thread: prints what the other threads logged. */
static void log_flush(void)
{
	pthread_mutex_lock(&logq.lock);
	struct buf text = logq.text;
	long dropped = logq.dropped;
	logq.text = (struct buf){0};
	logq.dropped = 0;
	pthread_mutex_unlock(&logq.lock);
	if (text.len)
		fwrite(text.p, 1, text.len, stdout);
	if (dropped)
		printf("(%ld log lines dropped: output was not being read)\n", dropped);
	fflush(stdout);
	buf_free(&text);
}

/* Randomness: session ids come from the kernel; nickname choice from a seeded xorshift. */
static void random_bytes(void *p, size_t n)
{
	unsigned char *c = p;
	while (n) {
		ssize_t r = getrandom(c, n, 0);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "chatroom: getrandom: %s\n", strerror(errno));
			abort();
		}
		c += r;
		n -= (size_t)r;
	}
}

static uint64_t rng_state;

static uint64_t rng_next(void) /* xorshift64*, called under room_lock */
{
	uint64_t x = rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static uint32_t rng_below(uint32_t n) { return (uint32_t)((rng_next() >> 32) % n); }

/* Base64, standard alphabet with padding, as Engine.IO uses for binary over polling. */
static const char b64_alphabet[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void base64_encode(struct buf *out, const unsigned char *p, size_t n)
{
	if (n == 0)
		return; /* out->p may still be NULL, and NULL + 0 is undefined in C */
	buf_reserve(out, (n + 2) / 3 * 4);
	char *o = out->p + out->len;
	size_t i = 0;
	for (; i + 2 < n; i += 3) {
		uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
		*o++ = b64_alphabet[v >> 18];
		*o++ = b64_alphabet[(v >> 12) & 63];
		*o++ = b64_alphabet[(v >> 6) & 63];
		*o++ = b64_alphabet[v & 63];
	}
	if (i < n) {
		uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0);
		*o++ = b64_alphabet[v >> 18];
		*o++ = b64_alphabet[(v >> 12) & 63];
		*o++ = i + 1 < n ? b64_alphabet[(v >> 6) & 63] : '=';
		*o++ = '=';
	}
	out->len = (size_t)(o - out->p);
}

static int base64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z') return c - 'A';
	if (c >= 'a' && c <= 'z') return c - 'a' + 26;
	if (c >= '0' && c <= '9') return c - '0' + 52;
	if (c == '+' || c == '-') return 62;
	if (c == '/' || c == '_') return 63;
	return -1;
}

/* Decodes base64 (padding optional). Returns false on a character outside the alphabet. */
static bool base64_decode(struct buf *out, const char *s, size_t n)
{
	while (n && s[n - 1] == '=')
		n--;
	if (n % 4 == 1)
		return false;
	buf_reserve(out, n / 4 * 3 + 3);
	uint32_t acc = 0;
	int bits = 0;
	for (size_t i = 0; i < n; i++) {
		int v = base64_value((unsigned char)s[i]);
		if (v < 0)
			return false;
		acc = acc << 6 | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out->p[out->len++] = (char)(acc >> bits);
		}
	}
	return true;
}

/* SHA-1 (FIPS 180-4), needed only for the WebSocket handshake's Sec-WebSocket-Accept. */
static uint32_t rol32(uint32_t x, int n) { return x << n | x >> (32 - n); }

static void sha1_block(uint32_t h[5], const unsigned char *p)
{
	uint32_t w[80];
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (int i = 16; i < 80; i++)
		w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
	uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
	for (int i = 0; i < 80; i++) {
		uint32_t f, k;
		if (i < 20)      f = (b & c) | (~b & d), k = 0x5A827999;
		else if (i < 40) f = b ^ c ^ d,          k = 0x6ED9EBA1;
		else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
		else             f = b ^ c ^ d,          k = 0xCA62C1D6;
		uint32_t t = rol32(a, 5) + f + e + k + w[i];
		e = d, d = c, c = rol32(b, 30), b = a, a = t;
	}
	h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
}

static void sha1(const void *data, size_t n, unsigned char out[20])
{
	uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
	const unsigned char *p = data;
	size_t left = n;
	for (; left >= 64; p += 64, left -= 64)
		sha1_block(h, p);
	unsigned char last[128] = {0};
	memcpy(last, p, left);
	last[left] = 0x80;
	size_t total = left + 9 <= 64 ? 64 : 128;
	uint64_t bits = (uint64_t)n * 8;
	for (int i = 0; i < 8; i++)
		last[total - 1 - i] = (unsigned char)(bits >> (8 * i));
	sha1_block(h, last);
	if (total == 128)
		sha1_block(h, last + 64);
	for (int i = 0; i < 20; i++)
		out[i] = (unsigned char)(h[i / 4] >> (24 - 8 * (i % 4)));
}

/*
 * UTF-8. Text must be valid UTF-8 everywhere (RFC 3629: no overlongs, no surrogates, nothing
 * above U+10FFFF). utf8_next decodes one character, or returns 0 if the bytes are not one.
 */
static size_t utf8_next(const unsigned char *p, size_t n, uint32_t *cp)
{
	if (n == 0)
		return 0;
	unsigned char c = p[0];
	if (c < 0x80) {
		*cp = c;
		return 1;
	}
	size_t len;
	uint32_t v, min;
	if ((c & 0xE0) == 0xC0)      len = 2, v = c & 0x1F, min = 0x80;
	else if ((c & 0xF0) == 0xE0) len = 3, v = c & 0x0F, min = 0x800;
	else if ((c & 0xF8) == 0xF0) len = 4, v = c & 0x07, min = 0x10000;
	else return 0;
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((p[i] & 0xC0) != 0x80)
			return 0;
		v = v << 6 | (p[i] & 0x3F);
	}
	if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
		return 0;
	*cp = v;
	return len;
}

static bool utf8_valid(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	while (n) {
		if (*p < 0x80) { /* the common case, one byte at a time without decoding */
			p++, n--;
			continue;
		}
		uint32_t cp;
		size_t k = utf8_next(p, n, &cp);
		if (!k)
			return false;
		p += k, n -= k;
	}
	return true;
}

/* Length in UTF-16 code units, as JavaScript counts: Engine.IO 3 frames payloads by it. */
static size_t utf16_length(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t units = 0;
	for (size_t i = 0; i < n; i++) {
		if ((p[i] & 0xC0) != 0x80)
			units++;
		if ((p[i] & 0xF8) == 0xF0)
			units++; /* four bytes: a character outside the BMP, two units */
	}
	return units;
}

/* Byte length of the first `units` UTF-16 units of valid UTF-8 s, or SIZE_MAX if the units
 * end inside a character or s is shorter. */
static size_t utf16_prefix_bytes(const char *s, size_t n, size_t units)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;
	while (units > 0) {
		if (i >= n)
			return SIZE_MAX;
		uint32_t cp;
		size_t k = utf8_next(p + i, n - i, &cp);
		if (!k)
			return SIZE_MAX;
		size_t u = cp >= 0x10000 ? 2 : 1;
		if (u > units)
			return SIZE_MAX;
		units -= u;
		i += k;
	}
	return i;
}

/*
 * A string map: open addressing with linear probing, keys borrowed (they live in the
 * objects the map points at). Used for sid -> session and nickname -> holder. Deletion
 * shifts followers back, so there are no tombstones to clean up.
 */
struct strmap_slot {
	const char *key;
	int value;
};

struct strmap {
	struct strmap_slot *slots;
	size_t cap; /* at least twice the most keys it will hold */
};

static uint64_t hash_str(const char *s)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}

static void strmap_init(struct strmap *m, size_t max_keys)
{
	m->cap = 2 * max_keys + 1;
	m->slots = calloc(m->cap, sizeof *m->slots);
	if (!m->slots)
		abort();
}

static size_t strmap_find_slot(const struct strmap *m, const char *key)
{
	size_t i = hash_str(key) % m->cap;
	while (m->slots[i].key && strcmp(m->slots[i].key, key) != 0)
		i = (i + 1) % m->cap;
	return i;
}

static int strmap_get(const struct strmap *m, const char *key)
{
	size_t i = strmap_find_slot(m, key);
	return m->slots[i].key ? m->slots[i].value : -1;
}

/* Sets key's value; a key already there keeps the string it was added with. */
static void strmap_put(struct strmap *m, const char *key, int value)
{
	size_t i = strmap_find_slot(m, key);
	if (!m->slots[i].key)
		m->slots[i].key = key;
	m->slots[i].value = value;
}

static void strmap_del(struct strmap *m, const char *key)
{
	size_t i = strmap_find_slot(m, key);
	if (!m->slots[i].key)
		return;
	size_t j = i;
	for (;;) {
		j = (j + 1) % m->cap;
		if (!m->slots[j].key)
			break;
		size_t home = hash_str(m->slots[j].key) % m->cap;
		/* Move j back into the hole at i unless its home lies cyclically in (i, j]. */
		bool home_between = i <= j ? (home > i && home <= j) : (home > i || home <= j);
		if (!home_between) {
			m->slots[i] = m->slots[j];
			i = j;
		}
	}
	m->slots[i].key = NULL;
}

/*
 * Timers: a binary min-heap of deadlines, one per item (a session, a connection), so that
 * the wire thread sleeps exactly until the next one however many there are. An item
 * embeds its struct timer; the heap holds item indexes and finds timers through `of`.
 */
struct timer {
	int64_t at;
	int pos; /* place in the heap, -1 when not in it */
};

struct timer_heap {
	int *items;
	int count;
	struct timer *(*of)(int item);
};

static bool heap_before(struct timer_heap *h, int a, int b) { return h->of(a)->at < h->of(b)->at; }

static void heap_place(struct timer_heap *h, int pos, int item)
{
	h->items[pos] = item;
	h->of(item)->pos = pos;
}

static void heap_sift_up(struct timer_heap *h, int pos)
{
	int item = h->items[pos];
	while (pos > 0 && heap_before(h, item, h->items[(pos - 1) / 2])) {
		heap_place(h, pos, h->items[(pos - 1) / 2]);
		pos = (pos - 1) / 2;
	}
	heap_place(h, pos, item);
}

static void heap_sift_down(struct timer_heap *h, int pos)
{
	int item = h->items[pos];
	for (;;) {
		int child = 2 * pos + 1;
		if (child >= h->count)
			break;
		if (child + 1 < h->count && heap_before(h, h->items[child + 1], h->items[child]))
			child++;
		if (!heap_before(h, h->items[child], item))
			break;
		heap_place(h, pos, h->items[child]);
		pos = child;
	}
	heap_place(h, pos, item);
}

/* Sets the item's deadline. Returns true if it is now the earliest of all. */
static bool heap_set(struct timer_heap *h, int item, int64_t at)
{
	struct timer *t = h->of(item);
	t->at = at;
	if (t->pos < 0) {
		heap_place(h, h->count++, item);
		heap_sift_up(h, h->count - 1);
	} else {
		heap_sift_up(h, t->pos);
		heap_sift_down(h, t->pos);
	}
	return t->pos == 0;
}

static void heap_cancel(struct timer_heap *h, int item)
{
	int pos = h->of(item)->pos;
	if (pos < 0)
		return;
	h->of(item)->pos = -1;
	if (--h->count == pos)
		return;
	heap_place(h, pos, h->items[h->count]);
	heap_sift_up(h, pos);
	heap_sift_down(h, h->of(h->items[pos])->pos);
}

/* The item whose deadline is due first, or -1 if none is due by `now`. */
static int heap_due(const struct timer_heap *h, int64_t now)
{
	return h->count && h->of(h->items[0])->at <= now ? h->items[0] : -1;
}

/* Milliseconds until the first deadline (at most a minute), or -1 if there is none. */
static int heap_wait_ms(const struct timer_heap *h, int64_t now)
{
	if (h->count == 0)
		return -1;
	int64_t d = h->of(h->items[0])->at - now;
	return d < 0 ? 0 : d > 60000 ? 60000 : (int)d;
}

/* ===================================== JSON ===================================== */
/*
 * Socket.IO payloads are JSON, and we treat them two ways.
 *
 * json_check is our own validating scanner: one pass, no allocation, checking syntax, UTF-8
 * and depth (at most JSON_MAX_DEPTH), and reporting the shape of the value (for an array,
 * where its first elements are). A chat message is checked by it and relayed as the very
 * bytes its sender wrote -- numbers, key order and all -- with only `username` spliced in.
 *
 * jansson builds and reads what we need as a tree: handshake replies, logins with their
 * name_list, CONNECT auth objects. Text reaches jansson only after json_check accepted it,
 * so jansson's recursive parser never goes deep enough to overflow a worker's stack.
 */
struct json_span {
	const char *p;
	size_t n;
};

struct json_shape {
	char kind;                /* '{' '[' '"' 't' 'f' 'n', or '0' for a number */
	int count;                /* for an array: its number of elements */
	struct json_span item[2]; /* for an array: its first two elements, raw */
};

struct jscan {
	const unsigned char *p, *end;
	int depth;
};

static void js_space(struct jscan *j)
{
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static bool js_take(struct jscan *j, char c)
{
	if (j->p < j->end && *j->p == (unsigned char)c) {
		j->p++;
		return true;
	}
	return false;
}

static int hex_digit(unsigned char c)
{
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	if (c >= 'A' && c <= 'F') return c - 'A' + 10;
	return -1;
}

static bool js_string(struct jscan *j)
{
	if (!js_take(j, '"'))
		return false;
	while (j->p < j->end) {
		unsigned char c = *j->p;
		if (c == '"') {
			j->p++;
			return true;
		}
		if (c < 0x20)
			return false;
		if (c == '\\') {
			if (j->end - j->p < 2)
				return false;
			switch (j->p[1]) {
			case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
				j->p += 2;
				break;
			case 'u':
				if (j->end - j->p < 6)
					return false;
				for (int i = 2; i < 6; i++)
					if (hex_digit(j->p[i]) < 0)
						return false;
				j->p += 6;
				break;
			default:
				return false;
			}
			continue;
		}
		if (c < 0x80) {
			j->p++;
			continue;
		}
		uint32_t cp;
		size_t k = utf8_next(j->p, (size_t)(j->end - j->p), &cp);
		if (!k)
			return false;
		j->p += k;
	}
	return false;
}

static bool js_digits(struct jscan *j)
{
	const unsigned char *start = j->p;
	while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
		j->p++;
	return j->p > start;
}

static bool js_number(struct jscan *j)
{
	js_take(j, '-');
	if (js_take(j, '0')) {
		/* a leading zero stands alone */
	} else if (!js_digits(j)) {
		return false;
	}
	if (js_take(j, '.') && !js_digits(j))
		return false;
	if (js_take(j, 'e') || js_take(j, 'E')) {
		if (!js_take(j, '+'))
			js_take(j, '-');
		if (!js_digits(j))
			return false;
	}
	return true;
}

static bool js_word(struct jscan *j, const char *w)
{
	size_t n = strlen(w);
	if ((size_t)(j->end - j->p) < n || memcmp(j->p, w, n) != 0)
		return false;
	j->p += n;
	return true;
}

static bool js_value(struct jscan *j);

static bool js_array(struct jscan *j, struct json_shape *shape)
{
	if (++j->depth > JSON_MAX_DEPTH)
		return false;
	j->p++; /* '[' */
	js_space(j);
	int count = 0;
	if (!js_take(j, ']')) {
		do {
			js_space(j);
			const unsigned char *start = j->p;
			if (!js_value(j))
				return false;
			if (shape && count < 2)
				shape->item[count] = (struct json_span){(const char *)start,
				                                        (size_t)(j->p - start)};
			count++;
			js_space(j);
		} while (js_take(j, ','));
		if (!js_take(j, ']'))
			return false;
	}
	if (shape)
		shape->count = count;
	j->depth--;
	return true;
}

static bool js_object(struct jscan *j)
{
	if (++j->depth > JSON_MAX_DEPTH)
		return false;
	j->p++; /* '{' */
	js_space(j);
	if (!js_take(j, '}')) {
		do {
			js_space(j);
			if (!js_string(j))
				return false;
			js_space(j);
			if (!js_take(j, ':'))
				return false;
			js_space(j);
			if (!js_value(j))
				return false;
			js_space(j);
		} while (js_take(j, ','));
		if (!js_take(j, '}'))
			return false;
	}
	j->depth--;
	return true;
}

static bool js_value(struct jscan *j)
{
	if (j->p >= j->end)
		return false;
	switch (*j->p) {
	case '{': return js_object(j);
	case '[': return js_array(j, NULL);
	case '"': return js_string(j);
	case 't': return js_word(j, "true");
	case 'f': return js_word(j, "false");
	case 'n': return js_word(j, "null");
	default: return js_number(j);
	}
}

/* Is s[0..n) exactly one JSON value (white space around it allowed)? Fills *shape if given. */
static bool json_check(const char *s, size_t n, struct json_shape *shape)
{
	struct jscan j = {(const unsigned char *)s, (const unsigned char *)s + n, 0};
	struct json_shape dummy;
	if (!shape)
		shape = &dummy;
	memset(shape, 0, sizeof *shape);
	js_space(&j);
	if (j.p >= j.end)
		return false;
	unsigned char first = *j.p;
	bool ok = first == '[' ? js_array(&j, shape) : js_value(&j);
	js_space(&j);
	if (!ok || j.p != j.end)
		return false;
	shape->kind = (first == '-' || (first >= '0' && first <= '9')) ? '0' : (char)first;
	return true;
}

/* Decodes a checked JSON string literal (quotes included) into UTF-8 in out[0..cap).
 * Returns its length, or -1 if it does not fit or holds a NUL or a lone surrogate. */
static int json_string_text(struct json_span s, char *out, size_t cap)
{
	const unsigned char *p = (const unsigned char *)s.p + 1, *end = (const unsigned char *)s.p + s.n - 1;
	size_t n = 0;
	while (p < end) {
		uint32_t cp = *p;
		if (cp != '\\') {
			if (n + 1 > cap)
				return -1;
			out[n++] = (char)*p++;
			continue;
		}
		char e = (char)p[1];
		p += 2;
		switch (e) {
		case 'b': cp = '\b'; break;
		case 'f': cp = '\f'; break;
		case 'n': cp = '\n'; break;
		case 'r': cp = '\r'; break;
		case 't': cp = '\t'; break;
		case 'u':
			cp = (uint32_t)(hex_digit(p[0]) << 12 | hex_digit(p[1]) << 8 |
			                hex_digit(p[2]) << 4 | hex_digit(p[3]));
			p += 4;
			if (cp >= 0xD800 && cp <= 0xDBFF && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
				uint32_t lo = (uint32_t)(hex_digit(p[2]) << 12 | hex_digit(p[3]) << 8 |
				                         hex_digit(p[4]) << 4 | hex_digit(p[5]));
				if (lo >= 0xDC00 && lo <= 0xDFFF) {
					cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
					p += 6;
				}
			}
			if (cp == 0 || (cp >= 0xD800 && cp <= 0xDFFF))
				return -1;
			break;
		default: cp = (unsigned char)e; break; /* " \ / */
		}
		char enc[4];
		size_t k = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
		if (k == 1) enc[0] = (char)cp;
		else if (k == 2) enc[0] = (char)(0xC0 | cp >> 6), enc[1] = (char)(0x80 | (cp & 63));
		else if (k == 3) enc[0] = (char)(0xE0 | cp >> 12), enc[1] = (char)(0x80 | ((cp >> 6) & 63)),
		                 enc[2] = (char)(0x80 | (cp & 63));
		else enc[0] = (char)(0xF0 | cp >> 18), enc[1] = (char)(0x80 | ((cp >> 12) & 63)),
		     enc[2] = (char)(0x80 | ((cp >> 6) & 63)), enc[3] = (char)(0x80 | (cp & 63));
		if (n + k > cap)
			return -1;
		memcpy(out + n, enc, k);
		n += k;
	}
	return (int)n;
}

/* Appends s as a JSON string literal. */
static void json_put_string(struct buf *b, const char *s)
{
	buf_addc(b, '"');
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\') {
			buf_addc(b, '\\');
			buf_addc(b, (char)*p);
		} else if (*p < 0x20) {
			buf_printf(b, "\\u%04x", *p);
		} else {
			buf_addc(b, (char)*p);
		}
	}
	buf_addc(b, '"');
}

/*
 * Writes the checked JSON object obj with its "username" member set to name. The first
 * username member keeps its place and takes the new value; any later ones are dropped,
 * since JavaScript's JSON.parse lets the last duplicate key win; if there was none, it is
 * added at the end. Keys are compared decoded, so "user\u006eame" counts too.
 */
static void json_stamp_username(struct buf *out, struct json_span obj, const char *name)
{
	struct jscan j = {(const unsigned char *)obj.p, (const unsigned char *)obj.p + obj.n, 0};
	bool stamped = false, first = true;
	js_space(&j);
	j.p++; /* '{' */
	buf_addc(out, '{');
	js_space(&j);
	if (!js_take(&j, '}')) {
		do {
			js_space(&j);
			const unsigned char *member = j.p;
			js_string(&j);
			char key[16];
			int klen = json_string_text((struct json_span){(const char *)member,
			                                               (size_t)(j.p - member)},
			                             key, sizeof key);
			bool is_username = klen == 8 && memcmp(key, "username", 8) == 0;
			js_space(&j);
			js_take(&j, ':');
			js_space(&j);
			js_value(&j);
			if (!is_username || !stamped) {
				if (!first)
					buf_addc(out, ',');
				first = false;
				if (is_username) {
					buf_adds(out, "\"username\":");
					json_put_string(out, name);
					stamped = true;
				} else {
					buf_add(out, member, (size_t)(j.p - member));
				}
			}
			js_space(&j);
		} while (js_take(&j, ','));
	}
	if (!stamped) {
		if (!first)
			buf_addc(out, ',');
		buf_adds(out, "\"username\":");
		json_put_string(out, name);
	}
	buf_addc(out, '}');
}

/* Parses checked-or-not JSON into a jansson tree; NULL if json_check refuses it. */
static json_t *json_parse(const char *s, size_t n, size_t flags)
{
	if (!json_check(s, n, NULL))
		return NULL;
	json_error_t err;
	return json_loadb(s, n, flags | JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
}

/* Serializes a jansson tree compactly, the way socket.io and python-socketio do. */
static void json_dump_to(struct buf *b, const json_t *v)
{
	size_t n = json_dumpb(v, NULL, 0, JSON_COMPACT | JSON_ENCODE_ANY);
	buf_reserve(b, n);
	b->len += json_dumpb(v, b->p + b->len, n, JSON_COMPACT | JSON_ENCODE_ANY);
}

/* ===================================== names ===================================== */
/*
 * Every client in the room gets a nickname of its own, picked at random among the names
 * nobody holds. The list is name.txt, which the assembler copies into the binary at build
 * time (so the binary alone works anywhere); --names replaces it at start-up. When every
 * name is taken, a taken one gets a suffix: Otter#2, Otter#3, ...
 *
 * `holders` maps every nickname in use to its session; `free_names` lists the indexes of
 * list names nobody holds (with `free_pos`, each index's place in it), so a pick is O(1).
 * All of it is guarded by room_lock.
 */
__asm__(".pushsection .rodata\n"
        ".globl chatroom_names_txt\n"
        ".hidden chatroom_names_txt\n"
        "chatroom_names_txt:\n"
        ".incbin \"name.txt\"\n"
        ".byte 0\n"
        ".popsection\n");
extern const char chatroom_names_txt[] __attribute__((visibility("hidden")));

static struct {
	char **list;
	int count;
	struct strmap index; /* list name -> its index */
	int *free_names;
	int *free_pos; /* index -> place in free_names, or -1 while someone holds it */
	int nfree;
	struct strmap holders; /* nickname in use -> session index */
} names;

static void names_free(void)
{
	for (int i = 0; i < names.count; i++)
		free(names.list[i]);
	free(names.list);
	free(names.index.slots);
	free(names.free_names);
	free(names.free_pos);
	free(names.holders.slots);
	memset(&names, 0, sizeof names);
}

/* Splits text into names: one a line, surrounding white space and blank lines ignored,
 * duplicates dropped. Returns an error message, or NULL. */
static const char *names_load(const char *text, size_t len)
{
	names_free();
	if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) /* a byte-order mark */
		text += 3, len -= 3;
	if (!utf8_valid(text, len))
		return "is not valid UTF-8";
	int cap = 64;
	names.list = xmalloc((size_t)cap * sizeof *names.list);
	strmap_init(&names.index, 1 << 16);
	const char *p = text, *end = text + len;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *line_end = nl ? nl : end;
		const char *a = p, *b = line_end;
		while (a < b && strchr(" \t\r\v\f", *a))
			a++;
		while (b > a && strchr(" \t\r\v\f", b[-1]))
			b--;
		p = nl ? nl + 1 : end;
		if (a == b || memchr(a, 0, (size_t)(b - a)))
			continue;
		if (names.count >= 65535)
			return "has more than 65535 names";
		char *name = xstrndup(a, (size_t)(b - a));
		if (strmap_get(&names.index, name) >= 0) {
			free(name);
			continue;
		}
		if (names.count == cap)
			names.list = xrealloc(names.list, (size_t)(cap *= 2) * sizeof *names.list);
		names.list[names.count] = name;
		strmap_put(&names.index, name, names.count);
		names.count++;
	}
	if (names.count == 0)
		return "holds no names";
	names.free_names = xmalloc((size_t)names.count * sizeof(int));
	names.free_pos = xmalloc((size_t)names.count * sizeof(int));
	for (int i = 0; i < names.count; i++)
		names.free_names[i] = names.free_pos[i] = i;
	names.nfree = names.count;
	strmap_init(&names.holders, MAX_SESSIONS);
	return NULL;
}

/* Reads the names file, or exits 1 with one clear line. */
static void names_init(void)
{
	if (!opt.names_file) {
		const char *err = names_load(chatroom_names_txt, strlen(chatroom_names_txt));
		if (err) {
			fprintf(stderr, "chatroom: the built-in names list %s\n", err);
			exit(1);
		}
		return;
	}
	FILE *f = fopen(opt.names_file, "rb");
	if (!f) {
		fprintf(stderr, "chatroom: cannot read names file %s: %s\n", opt.names_file,
		        strerror(errno));
		exit(1);
	}
	struct buf text = {0};
	char chunk[65536];
	size_t n;
	while ((n = fread(chunk, 1, sizeof chunk, f)) > 0 && text.len < (64u << 20))
		buf_add(&text, chunk, n);
	bool failed = ferror(f);
	fclose(f);
	if (failed) {
		fprintf(stderr, "chatroom: cannot read names file %s\n", opt.names_file);
		exit(1);
	}
	const char *err = names_load(text.p ? text.p : "", text.len);
	if (err) {
		fprintf(stderr, "chatroom: names file %s %s\n", opt.names_file, err);
		exit(1);
	}
	buf_free(&text);
}

static void name_unfree(int idx)
{
	int pos = names.free_pos[idx];
	if (pos < 0)
		return;
	int last = names.free_names[--names.nfree];
	names.free_names[pos] = last;
	names.free_pos[last] = pos;
	names.free_pos[idx] = -1;
}

/* Records that session `holder` holds nickname `nick` (a string the caller keeps alive). */
static void name_claim(const char *nick, int holder)
{
	strmap_put(&names.holders, nick, holder);
	int idx = strmap_get(&names.index, nick);
	if (idx >= 0)
		name_unfree(idx);
}

static void name_release(const char *nick)
{
	strmap_del(&names.holders, nick);
	int idx = strmap_get(&names.index, nick);
	if (idx >= 0 && names.free_pos[idx] < 0) {
		names.free_pos[idx] = names.nfree;
		names.free_names[names.nfree++] = idx;
	}
}

/* Picks a nickname nobody holds; the caller claims it. Returns a malloc'd string. */
static char *name_pick(void)
{
	if (names.nfree > 0) {
		const char *name = names.list[names.free_names[rng_below((uint32_t)names.nfree)]];
		return xstrndup(name, strlen(name));
	}
	const char *base = names.list[rng_below((uint32_t)names.count)];
	char *nick = xmalloc(strlen(base) + 16);
	for (long k = 2;; k++) {
		sprintf(nick, "%s#%ld", base, k);
		if (strmap_get(&names.holders, nick) < 0)
			return nick;
	}
}

/* ===================================== peers ===================================== */
/*
 * What one address may hold: connections, sessions, and room joins a minute. An address
 * is a client's IPv4 address, or its IPv6 /64: one machine usually has a whole /64, so
 * counting /128s would give it millions of addresses. IPv4 clients that reach a
 * dual-stack socket as ::ffff:a.b.c.d count as IPv4. The defaults fit a class behind one
 * NAT address: 60 people with two tabs each, all joining within a minute.
 *
 * A peer's slot lives while a connection or session counts on it, and while its join
 * bucket refills; when the table is full, idle slots are swept. Guarded by room_lock.
 */
enum { PEER_KEY_MAX = 64 };

struct peer {
	char key[PEER_KEY_MAX]; /* "" while the slot is free */
	int conns, sessions;
	struct bucket joins;
};

static struct peer peers[MAX_PEERS];
static struct strmap peer_index; /* key -> slot; keys live in the slots */
static int peer_free[MAX_PEERS], npeer_free, peers_high;

static void peer_key(const struct sockaddr *sa, char out[PEER_KEY_MAX])
{
	char text[INET6_ADDRSTRLEN] = "?";
	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)sa;
		if (IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr)) {
			inet_ntop(AF_INET, a6->sin6_addr.s6_addr + 12, text, sizeof text);
			snprintf(out, PEER_KEY_MAX, "%s", text);
			return;
		}
		struct in6_addr prefix = {0};
		memcpy(prefix.s6_addr, a6->sin6_addr.s6_addr, 8);
		inet_ntop(AF_INET6, &prefix, text, sizeof text);
		snprintf(out, PEER_KEY_MAX, "%s/64", text);
	} else if (sa->sa_family == AF_INET) {
		inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, text, sizeof text);
		snprintf(out, PEER_KEY_MAX, "%s", text);
	} else {
		snprintf(out, PEER_KEY_MAX, "other");
	}
}

/* The same for an address civetweb gives as text. */
static void peer_key_of_text(const char *addr, char out[PEER_KEY_MAX])
{
	struct sockaddr_in6 a6 = {.sin6_family = AF_INET6};
	struct sockaddr_in a4 = {.sin_family = AF_INET};
	if (inet_pton(AF_INET, addr, &a4.sin_addr) == 1)
		peer_key((struct sockaddr *)&a4, out);
	else if (inet_pton(AF_INET6, addr, &a6.sin6_addr) == 1)
		peer_key((struct sockaddr *)&a6, out);
	else
		snprintf(out, PEER_KEY_MAX, "other");
}

static double joins_rate(void) { return opt.joins_per_minute / 60.0; }

static bool peer_idle(struct peer *p, int64_t now)
{
	if (p->conns || p->sessions)
		return false;
	bucket_refill(&p->joins, joins_rate(), opt.joins_per_minute, now);
	return p->joins.tokens >= opt.joins_per_minute;
}

static void peer_drop(int i)
{
	strmap_del(&peer_index, peers[i].key);
	peers[i].key[0] = 0;
	peer_free[npeer_free++] = i;
}

/* Frees the slots of peers nobody counts on any more. */
static void peers_sweep(void)
{
	int64_t now = now_ms();
	for (int i = 0; i < peers_high; i++)
		if (peers[i].key[0] && peer_idle(&peers[i], now))
			peer_drop(i);
}

/* The slot for this address, made if need be; -1 if the table is full of live peers. */
static int peer_get(const char *key)
{
	if (!peer_index.slots)
		strmap_init(&peer_index, MAX_PEERS);
	int i = strmap_get(&peer_index, key);
	if (i >= 0)
		return i;
	if (npeer_free == 0 && peers_high == MAX_PEERS)
		peers_sweep();
	if (npeer_free > 0)
		i = peer_free[--npeer_free];
	else if (peers_high < MAX_PEERS)
		i = peers_high++;
	else
		return -1;
	peers[i] = (struct peer){0};
	snprintf(peers[i].key, PEER_KEY_MAX, "%s", key);
	strmap_put(&peer_index, peers[i].key, i);
	return i;
}

/* A connection or session of the peer's is gone. */
static void peer_let_go(int i)
{
	if (i >= 0 && peer_idle(&peers[i], now_ms()))
		peer_drop(i);
}

/* May the peer join the room once more? Takes one join from its bucket if so. */
static bool peer_may_join(int i)
{
	if (i < 0)
		return true;
	struct bucket *b = &peers[i].joins;
	if (bucket_take(b, joins_rate(), opt.joins_per_minute, 1, now_ms()) >= 0)
		return true;
	b->tokens += 1; /* a refused join costs nothing */
	return false;
}

/* ================================ shared buffers ================================ */
/*
 * A packet is serialized once, into a blob, however many clients it goes to: each
 * recipient's queue holds a reference to it. Whoever writes or discards the last reference
 * frees it; that can be any thread, hence the atomic count.
 *
 * The memory budget. Every byte a client can make us hold is counted in mem_held: blobs
 * (each once, however many queues share it), queue rings, and what is buffered from
 * clients -- unfinished frames and messages, request heads and bodies, attachments.
 * Buffers that would grow past --max-memory are refused, and their client dropped; when
 * queued blobs pass it, the clients furthest behind are dropped first (memory_relieve).
 */
static atomic_size_t mem_held;    /* all of it */
static atomic_size_t mem_inbound; /* the part clients are still sending us */

static void mem_take(size_t n) { atomic_fetch_add_explicit(&mem_held, n, memory_order_relaxed); }
static void mem_give(size_t n) { atomic_fetch_sub_explicit(&mem_held, n, memory_order_relaxed); }

static void inbound_mem_take(size_t n)
{
	mem_take(n);
	atomic_fetch_add_explicit(&mem_inbound, n, memory_order_relaxed);
}

static void inbound_mem_give(size_t n)
{
	mem_give(n);
	atomic_fetch_sub_explicit(&mem_inbound, n, memory_order_relaxed);
}

static void memory_relieve(size_t extra);

/* May a client's input buffer grow by n bytes? What clients are still sending may take
 * half the budget, no more: the rest is for what they are sent. Past the whole budget,
 * queued data makes way (memory_relieve drops the clients furthest behind). */
static bool inbound_mem_room(size_t n)
{
	size_t in = atomic_load_explicit(&mem_inbound, memory_order_relaxed);
	if (in > opt.max_memory / 2 || n > opt.max_memory / 2 - in)
		return false;
	size_t held = atomic_load_explicit(&mem_held, memory_order_relaxed);
	if (held > opt.max_memory || n > opt.max_memory - held)
		memory_relieve(n);
	return true;
}

struct blob {
	atomic_int refs;
	size_t len;
	_Atomic(struct blob *) base64; /* its data in base64, made once when first asked for */
	char data[];
};

static size_t blob_size(size_t len) { return sizeof(struct blob) + len + 1; }

static struct blob *blob_new(size_t len)
{
	struct blob *b = xmalloc(blob_size(len));
	mem_take(blob_size(len));
	atomic_init(&b->refs, 1);
	atomic_init(&b->base64, NULL);
	b->len = len;
	b->data[len] = 0; /* handy for text; not counted in len */
	return b;
}

static struct blob *blob_of(const void *p, size_t len)
{
	struct blob *b = blob_new(len);
	memcpy(b->data, p, len);
	return b;
}

static struct blob *blob_ref(struct blob *b)
{
	atomic_fetch_add_explicit(&b->refs, 1, memory_order_relaxed);
	return b;
}

static void blob_unref(struct blob *b)
{
	if (b && atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) == 1) {
		blob_unref(atomic_load(&b->base64));
		mem_give(blob_size(b->len));
		free(b);
	}
}

/* A binary blob in base64, for long-polling clients: encoded once, however many of them
 * get it. Any thread; two that race both encode, and one copy is kept. */
static struct blob *blob_base64(struct blob *b)
{
	struct blob *e = atomic_load(&b->base64);
	if (e)
		return e;
	struct buf text = {0};
	base64_encode(&text, (const unsigned char *)b->data, b->len);
	e = blob_of(text.p ? text.p : "", text.len);
	buf_free(&text);
	struct blob *none = NULL;
	if (!atomic_compare_exchange_strong(&b->base64, &none, e)) {
		blob_unref(e);
		e = none;
	}
	return e;
}

/*
 * A gather list: bytes to send, made of pieces that point into shared blobs (it holds a
 * reference to each) and into a little text of its own -- separators, length prefixes, an
 * HTTP head. So a long-poll answer shares its message bytes with every other queue they
 * went to, and costs its recipient only the small change around them.
 */
enum { GATHER_PIECES = 3 * POLL_MAX_PACKETS + 4, GATHER_HELD = POLL_MAX_PACKETS };

struct gather {
	struct buf text;
	struct {
		const char *p; /* NULL: text.p + at */
		size_t at, len;
	} piece[GATHER_PIECES];
	int n;
	struct blob *held[GATHER_HELD];
	int nheld;
	size_t len; /* all pieces together */
};

static void gather_piece(struct gather *g, const char *p, size_t at, size_t len)
{
	if (len == 0)
		return;
	if (g->n == GATHER_PIECES)
		abort(); /* callers add at most POLL_MAX_PACKETS packets, three pieces each */
	g->piece[g->n].p = p;
	g->piece[g->n].at = at;
	g->piece[g->n].len = len;
	g->n++;
	g->len += len;
}

/* Text of its own, appended to the last piece when that one is text too. */
static void gather_text(struct gather *g, const void *p, size_t len)
{
	if (len == 0)
		return;
	size_t at = g->text.len;
	buf_add(&g->text, p, len);
	if (g->n && !g->piece[g->n - 1].p && g->piece[g->n - 1].at + g->piece[g->n - 1].len == at) {
		g->piece[g->n - 1].len += len;
		g->len += len;
	} else {
		gather_piece(g, NULL, at, len);
	}
}

static void gather_blob(struct gather *g, struct blob *b)
{
	if (g->nheld == GATHER_HELD)
		abort();
	g->held[g->nheld++] = blob_ref(b);
	gather_piece(g, b->data, 0, b->len);
}

/* Memory that outlives the gather list, such as the page. */
static void gather_static(struct gather *g, const void *p, size_t len)
{
	gather_piece(g, p, 0, len);
}

static void gather_free(struct gather *g)
{
	for (int i = 0; i < g->nheld; i++)
		blob_unref(g->held[i]);
	buf_free(&g->text);
	memset(g, 0, sizeof *g);
}

/* The pieces from byte `skip` on, as iovecs; returns how many. */
static int gather_iov(const struct gather *g, size_t skip, struct iovec *iov)
{
	int n = 0;
	for (int i = 0; i < g->n; i++) {
		size_t len = g->piece[i].len;
		const char *p = g->piece[i].p ? g->piece[i].p : g->text.p + g->piece[i].at;
		if (skip >= len) {
			skip -= len;
			continue;
		}
		iov[n++] = (struct iovec){(void *)(p + skip), len - skip};
		skip = 0;
	}
	return n;
}

/* An Engine.IO packet waiting to be sent. Text packets carry their type character
 * ("4..." for a message, "2" for a ping); binary ones are message data only. */
struct packet {
	struct blob *blob;
	bool binary;
};

/* A FIFO of packets: a ring that doubles when full. Its size is bounded by the session's
 * queue_limit, which counts QUEUE_ENTRY_COST per packet besides the bytes. */
struct outq {
	struct packet *ring;
	unsigned head, count, cap;
};

static void outq_grow(struct outq *q)
{
	if (q->count == q->cap) {
		unsigned cap = q->cap ? q->cap * 2 : 8;
		struct packet *ring = xmalloc(cap * sizeof *ring);
		mem_take((cap - q->cap) * sizeof *ring);
		for (unsigned i = 0; i < q->count; i++)
			ring[i] = q->ring[(q->head + i) % q->cap];
		free(q->ring);
		q->ring = ring, q->head = 0, q->cap = cap;
	}
}

static void outq_free_ring(struct outq *q)
{
	mem_give(q->cap * sizeof *q->ring);
	free(q->ring);
	*q = (struct outq){0};
}

static void outq_push(struct outq *q, struct packet p)
{
	outq_grow(q);
	q->ring[(q->head + q->count++) % q->cap] = p;
}

static void outq_push_front(struct outq *q, struct packet p)
{
	outq_grow(q);
	q->head = (q->head + q->cap - 1) % q->cap;
	q->ring[q->head] = p;
	q->count++;
}

/* A ring that a burst made big goes once the burst is sent: ten thousand idle clients
 * should not each keep the room their longest backlog took. */
static struct packet outq_pop(struct outq *q)
{
	struct packet p = q->ring[q->head];
	q->head = (q->head + 1) % q->cap;
	if (--q->count == 0 && q->cap > 64)
		outq_free_ring(q);
	return p;
}

static void outq_clear(struct outq *q)
{
	while (q->count)
		blob_unref(outq_pop(q).blob);
	outq_free_ring(q);
}

static size_t packet_cost(struct packet p) { return p.blob->len + QUEUE_ENTRY_COST; }

/* =================================== sessions =================================== */
/*
 * One struct session per client: its Engine.IO state, its outbound queue, its transports,
 * and what the Socket.IO layer and the chat room keep about it. Sessions live in a static
 * array; a free list hands out slots. A closed session keeps its slot until no thread
 * refers to it any more: a long-poll handler inside it (`users`), a WebSocket attached to
 * it, or a place on the wire thread's list of queues to write.
 *
 * Closing is done in one place, session_close, always under room_lock. Code that finds a
 * client must go while it is in the middle of something else -- a broadcast that finds a
 * full queue, say -- dooms it instead, and room_unlock closes the doomed before it lets go
 * of the lock. So a broadcast never recurses into the logout broadcast of a dropped client.
 *
 * A session is unsettled until the layer above takes it in (Socket.IO: it joined a
 * namespace). Unsettled sessions take no place in the room, and when the table is full
 * the oldest of them makes way for a newcomer: handshakes that never join cannot lock
 * people out.
 */
enum transport { POLLING, WEBSOCKET };
/* S_DETACHED: its transport is gone, but the layer above keeps it a while for the client
 * to come back (Socket.IO's connection state recovery): no sid, no timers but that one,
 * nothing queued; it still holds its slot, its address's count and its place. */
enum session_state { S_FREE, S_OPEN, S_DETACHED, S_CLOSED };

struct session;
struct wsconn;
struct conn;

/* What Engine.IO asks of the layer above it (Socket.IO, or the raw echo of the test server). */
struct eio_app {
	void (*on_open)(struct session *s);  /* room_lock held */
	void (*on_close)(struct session *s); /* room_lock held */
	/* room_lock NOT held: the layer may parse at leisure, then lock to act. */
	void (*on_message)(struct session *s, const char *data, size_t len, bool binary);
	/* room_lock held: the deadline the layer set with session_deadline has come. */
	void (*on_deadline)(struct session *s);
	/* room_lock held, may be NULL: the transport is lost (reason says how). True keeps the
	 * session, detached, until the layer ends it (session_end or session_discard); it
	 * sets app_at for when to look at it again. */
	bool (*on_lost)(struct session *s, const char *reason);
};

/* An Engine.IO server: a path and its settings. The chat has one; the test server two. */
struct endpoint {
	const char *path; /* "/socket.io/" */
	int ping_interval, ping_timeout;
	size_t max_payload;
	const struct eio_app *app;
};

/* A session's membership in one Socket.IO namespace. */
struct sio_socket {
	bool connected;
	bool asking; /* its CONNECT waits for the namespace's answer (admit_later) */
	char sid[SID_LEN + 1];
};

/* A binary Socket.IO packet whose attachments are still arriving. What it holds counts
 * as input still arriving (mem_inbound), and its session's share when memory is short; it
 * must be whole within a heartbeat (ping interval + timeout). */
struct sio_pending {
	int expected, received; /* expected 0: none pending */
	struct blob *header;    /* the packet, as text */
	struct blob **att;      /* `expected` of them */
	size_t bytes;           /* blob_size of header and attachments so far */
	int64_t until;
};

struct session {
	enum session_state state;
	int index;
	char sid[SID_LEN + 1];
	const struct endpoint *ep;
	int eio;                  /* Engine.IO protocol revision: 3 or 4 */
	enum transport transport; /* the one that carries packets now */
	bool b64;                 /* protocol 3 polling: binary as base64 text */
	int64_t opened_at;

	struct outq q; /* packets for the client, in order */
	size_t qbytes; /* their cost, including packets the wire thread is writing */

	int peer;                 /* its address's slot in peers[] */
	struct bucket inbound;    /* bytes it may send (see inbound budget) */
	bool settled;             /* the layer above took it in; until then it may be evicted */
	int older, newer;         /* the list of unsettled sessions, oldest first; -1 ends it */

	/* long-polling: at most one GET and one POST at a time */
	bool get_active, post_active;
	struct conn *poll;     /* the parked GET the wire thread holds for it (make's build) */
	struct conn *post_conn; /* the connection whose POST is under way (make's build) */
	int in_workers;        /* its requests in workers or waiting for one (make's build) */
	struct conn *waiting, *waiting_last;
	bool get_parked;       /* a GET waits on `wake` for packets (libcivetweb's build) */
	pthread_cond_t *wake;  /* session_wakes[index]: condition variables are not copied */
	int users; /* handler threads inside this session */

	/* WebSocket */
	struct wsconn *ws;    /* the WebSocket transport, when transport == WEBSOCKET */
	struct wsconn *probe; /* a WebSocket trying to take over from polling */
	bool probed;          /* the probe answered 3probe: long-polls are released with noop */
	bool dirty;           /* on the wire thread's list of queues to write */
	struct session *next_dirty;

	/* timers: one per session in a min-heap (see timers), due at the earlier of two */
	int64_t beat_at;  /* protocol 4: next ping, or pong deadline; 3: silence deadline */
	int64_t app_at;   /* the layer above's deadline (0: none), e.g. to join a namespace */
	struct timer timer; /* at the earlier of the two */
	bool awaiting_pong, deadline_refreshed;
	uint32_t gen;     /* counts the slot's reuses: stale epoll events are told apart */
	bool closed_by_client; /* it sent a close packet: a parked GET gets noop, not close */
	unsigned parted_serial; /* 1 + its serial among parted sessions, if remembered there */

	/* closing */
	bool doomed;
	const char *close_reason;
	struct session *next_doomed;

	/* Socket.IO */
	struct sio_socket nsp[MAX_NAMESPACES];
	struct sio_pending pending;
	int64_t connect_by;       /* when it must be in a namespace (0: looked at already) */
	bool recover;             /* asked for connection state recovery: it has a pid */
	char pid[SID_LEN + 1];

	/* the chat room */
	char *nick;
	bool delta;          /* asked for presence deltas instead of whole name lists */
	struct bucket flood; /* messages it may send (see flooding) */
	uint64_t joined_seq; /* the number of its own login (see recovery) */
	/* with --redis (see the room across servers) */
	enum { JOIN_NONE, JOIN_WAITING, JOIN_ASKED, JOIN_ANSWERED, JOIN_IN } join;
	int64_t asked_at;           /* when its CONNECT came */
	struct blob *history_ready; /* its history event, sent after its login */
	bool rejoin;                /* closed so that its client comes back: no close packet */
};

/*
 * What the server counts, for /metrics. Under room_lock, where the events happen anyway,
 * so counting costs a plain increment; sent_bytes is the wire thread's alone (one writer,
 * read by others: relaxed atomics, no locked instructions).
 */
static const char *const drop_reasons[][2] = { /* why we dropped a client -> label */
	{"outbound queue overflow", "slow_reader"}, {"server memory budget", "memory_budget"},
	{"excess flood", "flood"}, {"ping timeout", "ping_timeout"},
	{"connect timeout", "connect_timeout"}, {"parse error", "protocol_error"},
	{"invalid state", "protocol_error"}, {"invalid heartbeat direction", "protocol_error"},
	{"server full: oldest unjoined session", "evicted"},
};
enum { DROP_REASONS = sizeof drop_reasons / sizeof *drop_reasons };

static struct {
	uint64_t sessions;            /* Engine.IO sessions opened */
	uint64_t messages;            /* Socket.IO events received from clients */
	uint64_t deliveries;          /* packets queued to clients */
	uint64_t dropped[DROP_REASONS];
	_Atomic uint64_t sent_bytes;  /* bytes the wire thread wrote to sockets */
} counted;

static void count_sent(size_t n)
{
	atomic_store_explicit(&counted.sent_bytes,
	                      atomic_load_explicit(&counted.sent_bytes, memory_order_relaxed) + n,
	                      memory_order_relaxed);
}

static void count_drop(const char *reason)
{
	for (int i = 0; reason && i < DROP_REASONS; i++)
		if (strcmp(reason, drop_reasons[i][0]) == 0)
			counted.dropped[i]++;
}

static pthread_mutex_t room_lock = PTHREAD_MUTEX_INITIALIZER;
static struct session sessions[MAX_SESSIONS];
static pthread_cond_t session_wakes[MAX_SESSIONS];
static int free_slots[MAX_SESSIONS], nfree_slots; /* slots used before, free again */
static int slots_high;        /* slots from here on were never used: untouched memory */
static pthread_condattr_t monotonic; /* long-poll waits time out on the monotonic clock */
static int session_capacity;  /* how many may be open at once: room size plus slack */
static int sessions_open;
static struct strmap sids;    /* sid of an open session -> its slot */
static struct session *doomed_head;
static struct session *dirty_head; /* queues for the wire thread to write */
static int unsettled_oldest = -1, unsettled_newest = -1;
static atomic_bool stopping;   /* the server is shutting down */

static void wire_wake(void);

static void sessions_init(void)
{
	pthread_condattr_init(&monotonic);
	pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
	session_capacity = opt.max_clients + 16 + opt.max_clients / 8;
	if (session_capacity > MAX_SESSIONS)
		session_capacity = MAX_SESSIONS;
	strmap_init(&sids, MAX_SESSIONS);
}

/* A session id: 15 random bytes in base64url, 20 characters, as Node's engine.io makes. */
static void make_sid(char out[SID_LEN + 1])
{
	static const char alphabet[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	unsigned char r[15];
	random_bytes(r, sizeof r);
	for (int i = 0; i < 5; i++) {
		uint32_t v = (uint32_t)r[3 * i] << 16 | (uint32_t)r[3 * i + 1] << 8 | r[3 * i + 2];
		for (int k = 0; k < 4; k++)
			out[4 * i + k] = alphabet[(v >> (18 - 6 * k)) & 63];
	}
	out[SID_LEN] = 0;
}

static struct session *session_find(const char *sid)
{
	int i = strmap_get(&sids, sid);
	return i >= 0 ? &sessions[i] : NULL;
}

static void session_close(struct session *s, const char *reason);
static void session_end(struct session *s);

/*
 * A long-polling client that closes its session sends the close packet in a POST while
 * its GET may still be on the way, on a connection of its own: which of the two reaches
 * us first is chance (node-fetch, for one, looks the host name up for each). A GET that
 * was on its way before the POST's answer went out -- its request reached us before, or
 * it is the first request of a connection that did -- cannot have been sent after it, so
 * it gets what it would have got had it come first, a noop, not "Session ID unknown". A
 * GET sent after the answer gets 400, as from Node. `arrivals` numbers new connections,
 * requests and answers to closes as they happen, to tell the two apart. Closed sessions
 * are remembered for at most PARTED_GRACE_MS, PARTED_MAX at once (the oldest forgotten
 * first), and each answers one late GET. room_lock guards them.
 */
#define PARTED_MAX      64
#define PARTED_GRACE_MS 2000

static struct parted {
	char sid[SID_LEN + 1];
	int eio;
	bool b64;
	int64_t until;
	uint64_t answered; /* arrivals when its POST was answered; UINT64_MAX: not yet */
	unsigned serial;   /* parted_next when it was remembered: tells reuses of the slot apart */
} parted[PARTED_MAX];
static unsigned parted_next;
static uint64_t arrivals; /* connections, requests and answers to closes so far */

/* When a request reached us: its number, and that of its connection if it is the
 * connection's first request (else 0). */
struct arrival {
	uint64_t request, connection;
};

/* Remembers the session; returns its serial, which parted_answered takes. */
static unsigned parted_remember(const struct session *s)
{
	unsigned serial = parted_next++;
	struct parted *p = &parted[serial % PARTED_MAX];
	p->serial = serial;
	memcpy(p->sid, s->sid, sizeof p->sid);
	p->eio = s->eio;
	p->b64 = s->b64;
	p->until = now_ms() + PARTED_GRACE_MS;
	p->answered = UINT64_MAX;
	return serial;
}

/* The answer to the POST that closed the session goes out: what reaches us from now on
 * was sent after. */
static void parted_answered(unsigned serial)
{
	struct parted *p = &parted[serial % PARTED_MAX];
	if (p->serial == serial && p->answered == UINT64_MAX)
		p->answered = ++arrivals;
}

/* Finds (and forgets) the closed session a GET belongs to, if that GET was on its way
 * before the close was answered. */
static bool parted_take(const char *sid, struct arrival a, struct parted *out)
{
	int64_t now = now_ms();
	for (int i = 0; i < PARTED_MAX; i++) {
		struct parted *p = &parted[i];
		if (p->sid[0] && strcmp(p->sid, sid) == 0) {
			*out = *p;
			p->sid[0] = 0;
			bool before = a.request < p->answered || (a.connection && a.connection < p->answered);
			return p->until > now && before;
		}
	}
	return false;
}

static void unsettled_add(struct session *s)
{
	s->older = unsettled_newest;
	s->newer = -1;
	if (unsettled_newest >= 0)
		sessions[unsettled_newest].newer = s->index;
	else
		unsettled_oldest = s->index;
	unsettled_newest = s->index;
}

static void unsettled_remove(struct session *s)
{
	if (s->settled)
		return;
	if (s->older >= 0)
		sessions[s->older].newer = s->newer;
	else
		unsettled_oldest = s->newer;
	if (s->newer >= 0)
		sessions[s->newer].older = s->older;
	else
		unsettled_newest = s->older;
	s->older = s->newer = -1;
}

/* The layer above took the session in: it is no longer evicted to make room. */
static void session_settle(struct session *s)
{
	unsettled_remove(s);
	s->settled = true;
}

/*
 * A new open session for a client at address slot `peer` (-1: unknown), or NULL with
 * *refusal saying why: its address holds its share of sessions, or every place is taken
 * by settled sessions. room_lock held.
 */
static struct session *session_new(const struct endpoint *ep, int eio, enum transport t,
                                   int peer, const char **refusal)
{
	if (peer >= 0 && peers[peer].sessions >= opt.sessions_per_address) {
		*refusal = "too many sessions from this address";
		return NULL;
	}
	if (sessions_open >= session_capacity && unsettled_oldest >= 0)
		session_close(&sessions[unsettled_oldest], "server full: oldest unjoined session");
	*refusal = "server full";
	if (sessions_open >= session_capacity)
		return NULL;
	int index;
	if (nfree_slots > 0) {
		index = free_slots[--nfree_slots];
	} else if (slots_high < MAX_SESSIONS) {
		index = slots_high++; /* a slot's memory is first touched when first used */
		pthread_cond_init(&session_wakes[index], &monotonic);
	} else {
		return NULL;
	}
	struct session *s = &sessions[index];
	uint32_t gen = s->gen + 1;
	memset(s, 0, sizeof *s);
	s->index = index;
	s->gen = gen;
	s->timer.pos = -1;
	s->wake = &session_wakes[index];
	s->peer = peer;
	if (peer >= 0)
		peers[peer].sessions++;
	unsettled_add(s);
	s->state = S_OPEN;
	s->ep = ep;
	s->eio = eio;
	s->transport = t;
	s->opened_at = now_ms();
	do
		make_sid(s->sid);
	while (session_find(s->sid));
	strmap_put(&sids, s->sid, index);
	sessions_open++;
	counted.sessions++;
	return s;
}

/* Lets the slot go once nobody refers to the closed session. room_lock held. */
static void session_release(struct session *s)
{
	if (s->state != S_CLOSED || s->users || s->ws || s->probe || s->dirty || s->poll ||
	    s->in_workers)
		return;
	s->state = S_FREE;
	free_slots[nfree_slots++] = s->index;
}

/* Puts the session on the wire thread's list of queues to write (or to close). */
static void session_mark_dirty(struct session *s)
{
	if (!s->dirty) {
		s->dirty = true;
		s->next_dirty = dirty_head;
		dirty_head = s;
		wire_wake();
	}
}

/* Wakes whoever writes this session's queue: the wire thread, for a WebSocket or a
 * parked GET it holds; the worker of a GET waiting on the condition variable. */
static void session_kick(struct session *s)
{
	if (s->transport == WEBSOCKET || s->poll)
		session_mark_dirty(s);
	else if (s->get_parked)
		pthread_cond_signal(s->wake);
}

static void session_doom(struct session *s, const char *reason)
{
	if (s->state != S_OPEN || s->doomed)
		return;
	s->doomed = true;
	s->close_reason = reason;
	s->next_doomed = doomed_head;
	doomed_head = s;
}

/* Queues one packet for the client. A client whose backlog would pass queue_limit is not
 * keeping up, and it is dropped rather than allowed to make anyone wait. room_lock held. */
static void session_send(struct session *s, struct blob *b, bool binary)
{
	if (s->state != S_OPEN || s->doomed)
		return;
	struct packet p = {b, binary};
	if (s->qbytes + packet_cost(p) > opt.queue_limit) {
		session_doom(s, "outbound queue overflow");
		return;
	}
	outq_push(&s->q, (struct packet){blob_ref(b), binary});
	s->qbytes += packet_cost(p);
	counted.deliveries++;
	session_kick(s);
}

/* Queues a text packet ahead of everything else. room_lock held. */
static void session_send_first(struct session *s, struct blob *b)
{
	if (s->state != S_OPEN || s->doomed)
		return;
	struct packet p = {blob_ref(b), false};
	outq_push_front(&s->q, p);
	s->qbytes += packet_cost(p);
	counted.deliveries++;
	session_kick(s);
}

/*
 * Timers. Each open session has one deadline: when to ping, when the client's silence
 * ends it, or when the layer above wanted to look at it again. In a heap (see small
 * tools), so heartbeats are as punctual as Node's (a 300 ms ping interval is kept to the
 * millisecond) however many sessions there are. room_lock held.
 */
static struct timer *session_timer(int index) { return &sessions[index].timer; }
static int session_heap_items[MAX_SESSIONS];
static struct timer_heap session_timers = {session_heap_items, 0, session_timer};

static void timer_set(struct session *s, int64_t at)
{
	if (heap_set(&session_timers, s->index, at))
		wire_wake(); /* it sleeps until the earliest timer, which this now is */
}

static void timer_cancel(struct session *s) { heap_cancel(&session_timers, s->index); }

/* The session's timer is due at the earlier of its heartbeat and its layer's deadline. */
static void session_timer_update(struct session *s)
{
	int64_t at = s->beat_at;
	if (s->app_at && s->app_at < at)
		at = s->app_at;
	timer_set(s, at);
}

static void beat_set(struct session *s, int64_t at)
{
	s->beat_at = at;
	session_timer_update(s);
}

/* For the layer above: calls its on_deadline at `at`, once. room_lock held. */
static void session_deadline(struct session *s, int64_t at)
{
	s->app_at = at;
	session_timer_update(s);
}

/* The session whose timer is due first, or NULL if none is due by `now`. */
static struct session *timer_due(int64_t now)
{
	int i = heap_due(&session_timers, now);
	return i < 0 ? NULL : &sessions[i];
}

/*
 * Closes an open session: the layer above says goodbye (the chat broadcasts a logout),
 * queued packets are dropped, and whoever carries the transport is told. Long-polls that
 * wait are woken and answer with a close packet; the wire thread closes WebSockets.
 * room_lock held.
 */
static void session_close(struct session *s, const char *reason)
{
	if (s->state != S_OPEN)
		return;
	s->close_reason = reason;
	bool keep = s->ep->app->on_lost && s->ep->app->on_lost(s, reason);
	s->state = keep ? S_DETACHED : S_CLOSED;
	count_drop(reason);
	strmap_del(&sids, s->sid);
	timer_cancel(s);
	unsettled_remove(s);
	s->settled = true;
	outq_clear(&s->q);
	s->qbytes = 0;
	pthread_cond_broadcast(s->wake);
	if (s->ws || s->probe || s->poll)
		session_mark_dirty(s); /* the wire thread closes its sockets, answers its GET */
	if (keep)
		timer_set(s, s->app_at); /* when the layer looks at it again */
	else
		session_end(s);
}

/* The session is over: the layer above says goodbye (the chat logs it out), and its
 * slot goes once nobody refers to it. room_lock held. */
static void session_end(struct session *s)
{
	if (s->state == S_DETACHED)
		timer_cancel(s);
	s->state = S_CLOSED;
	sessions_open--;
	if (s->peer >= 0) {
		peers[s->peer].sessions--;
		peer_let_go(s->peer);
		s->peer = -1;
	}
	s->ep->app->on_close(s);
	session_release(s);
}

/* A detached session whose client came back in another one, which took over what the
 * layer above kept: it goes without a word. room_lock held. */
static void session_discard(struct session *s)
{
	timer_cancel(s);
	s->state = S_CLOSED;
	sessions_open--;
	if (s->peer >= 0) {
		peers[s->peer].sessions--;
		peer_let_go(s->peer);
		s->peer = -1;
	}
	session_release(s);
}

static void room_lock_acquire(void) { pthread_mutex_lock(&room_lock); }

/* Closes the sessions doomed under the lock. Done before room_lock is let go of, whether
 * by room_unlock or by waiting on a condition variable. */
static void reap_doomed(void)
{
	while (doomed_head) {
		struct session *s = doomed_head;
		doomed_head = s->next_doomed;
		s->doomed = false;
		session_close(s, s->close_reason);
	}
}

static void room_unlock(void)
{
	reap_doomed();
	pthread_mutex_unlock(&room_lock);
}

/* =============================== Engine.IO packets =============================== */
/*
 * Engine.IO carries messages in packets: a type digit -- 0 open, 1 close, 2 ping, 3 pong,
 * 4 message, 5 upgrade, 6 noop -- and data. Binary messages have no type digit of their own
 * over WebSocket (protocol 3 puts a byte 4 in front). A long-poll body carries several
 * packets, framed one of three ways:
 *
 *   protocol 4      packets joined by the record separator 0x1e; binary as "b" + base64
 *   protocol 3      "<length>:<packet>" repeated, the length in UTF-16 units as JavaScript
 *                   counts them; binary as "b4" + base64
 *   protocol 3,     when the client did not ask for b64=1 and something is binary:
 *   binary body     <0 text | 1 binary> <length, one decimal digit a byte> 0xFF <packet>
 */
/* Protocol 3's binary body: <kind> <length, a digit a byte> 0xFF, before each packet. */
static void gather_binary_length(struct gather *g, int kind, size_t len)
{
	char digits[24], head[26];
	int n = snprintf(digits, sizeof digits, "%zu", len);
	head[0] = (char)kind;
	for (int i = 0; i < n; i++)
		head[1 + i] = (char)(digits[i] - '0');
	head[1 + n] = (char)0xFF;
	gather_text(g, head, (size_t)n + 2);
}

/* Adds packets to g as a long-poll response body: the packets' own bytes are shared, not
 * copied (binary ones in base64, encoded once for everyone). Returns true if the body is
 * binary. */
static bool payload_gather(struct gather *g, int eio, bool b64, const struct packet *pk, int n)
{
	bool any_binary = false;
	for (int i = 0; i < n; i++)
		any_binary |= pk[i].binary;

	if (eio == 4) {
		for (int i = 0; i < n; i++) {
			if (i)
				gather_text(g, "\x1e", 1);
			if (pk[i].binary) {
				gather_text(g, "b", 1);
				gather_blob(g, blob_base64(pk[i].blob));
			} else {
				gather_blob(g, pk[i].blob);
			}
		}
		return false;
	}
	if (any_binary && !b64) {
		for (int i = 0; i < n; i++) {
			if (pk[i].binary) {
				gather_binary_length(g, 1, pk[i].blob->len + 1);
				gather_text(g, "\x04", 1);
			} else {
				gather_binary_length(g, 0, pk[i].blob->len);
			}
			gather_blob(g, pk[i].blob);
		}
		return true;
	}
	for (int i = 0; i < n; i++) {
		char prefix[32];
		struct blob *b = pk[i].blob;
		if (pk[i].binary) {
			b = blob_base64(b);
			snprintf(prefix, sizeof prefix, "%zu:b4", 2 + b->len);
		} else {
			snprintf(prefix, sizeof prefix, "%zu:", utf16_length(b->data, b->len));
		}
		gather_text(g, prefix, strlen(prefix));
		gather_blob(g, b);
	}
	return false;
}

/* Receives one packet; returns false to stop reading the rest of the body. */
typedef bool (*packet_fn)(struct session *s, char type, const char *data, size_t len,
                          bool binary);

/* One packet in text form: a type digit and data, or "b" and base64 (`typed`: protocol 3
 * writes "b4..." where protocol 4 writes "b..."). */
static bool text_packet(struct session *s, const char *p, size_t n, bool typed, packet_fn fn,
                        bool *ok)
{
	*ok = false;
	if (n == 0)
		return false;
	if (p[0] == 'b') {
		size_t skip = typed ? 2 : 1;
		if (n < skip || (typed && p[1] != '4'))
			return false;
		struct buf bin = {0};
		if (!base64_decode(&bin, p + skip, n - skip)) {
			buf_free(&bin);
			return false;
		}
		*ok = true;
		bool more = fn(s, '4', bin.p ? bin.p : "", bin.len, true);
		buf_free(&bin);
		return more;
	}
	if (p[0] < '0' || p[0] > '6')
		return false;
	*ok = true;
	return fn(s, p[0], p + 1, n - 1, false);
}

/*
 * Splits a long-poll request body into packets and hands them to fn in order. Returns
 * false if the body is malformed; the packets before the fault have been handed over, as
 * Node's parser does.
 */
static bool payload_decode(struct session *s, const char *body, size_t len, bool binary_body,
                           packet_fn fn)
{
	bool ok = true;
	if (binary_body) { /* protocol 3 only */
		const unsigned char *p = (const unsigned char *)body, *end = p + len;
		while (p < end) {
			int kind = *p++;
			size_t plen = 0;
			int digits = 0;
			while (p < end && *p != 0xFF) {
				if (*p > 9 || ++digits > 9)
					return false;
				plen = plen * 10 + *p++;
			}
			if (kind > 1 || digits == 0 || p == end || (size_t)(end - ++p) < plen || plen == 0)
				return false;
			const char *pkt = (const char *)p;
			p += plen;
			bool more;
			if (kind == 0) {
				if (!utf8_valid(pkt, plen))
					return false;
				more = text_packet(s, pkt, plen, true, fn, &ok);
			} else {
				unsigned char type = (unsigned char)pkt[0];
				/* only a message is binary: the data of any other packet is text */
				ok = type <= 6 && (type == 4 || utf8_valid(pkt + 1, plen - 1));
				more = ok && fn(s, (char)('0' + type), pkt + 1, plen - 1, type == 4);
			}
			if (!ok || !more)
				return ok;
		}
		return true;
	}
	if (!utf8_valid(body, len))
		return false;
	const char *p = body, *end = body + len;
	if (s->eio == 4) {
		for (;;) {
			const char *sep = memchr(p, '\x1e', (size_t)(end - p));
			const char *pkt_end = sep ? sep : end;
			if (!text_packet(s, p, (size_t)(pkt_end - p), false, fn, &ok) || !ok)
				return ok;
			if (!sep)
				return true;
			p = sep + 1; /* never past `end`: the separator lies before it */
		}
	}
	while (p < end) {
		size_t units = 0;
		int digits = 0;
		while (p < end && *p != ':') {
			if (*p < '0' || *p > '9' || ++digits > 9)
				return false;
			units = units * 10 + (size_t)(*p++ - '0');
		}
		if (digits == 0 || p == end)
			return false;
		p++;
		size_t bytes = utf16_prefix_bytes(p, (size_t)(end - p), units);
		if (bytes == SIZE_MAX)
			return false;
		const char *pkt = p;
		p += bytes;
		if (bytes == 0)
			continue;
		if (!text_packet(s, pkt, bytes, true, fn, &ok) || !ok)
			return ok;
	}
	return true;
}

/* ================================== Engine.IO ================================== */
/*
 * A session opens with a handshake: the open packet tells the client its sid, the
 * transports it may upgrade to, and the heartbeat timing. Then:
 *
 *   protocol 4   the server pings every pingInterval; the pong must come within
 *                pingTimeout (any other packet while we wait buys it one more pingTimeout,
 *                as Node allows), or the session closes with "ping timeout".
 *   protocol 3   the client pings and the server answers; pingInterval + pingTimeout of
 *                silence after the last ping closes the session.
 *
 * The wire thread fires the timers; eio_receive handles what the client sends, whichever
 * transport it came by.
 */
static struct blob *eio_open_packet(const struct session *s)
{
	json_t *upgrades = json_array();
	if (s->transport == POLLING)
		json_array_append_new(upgrades, json_string("websocket"));
	json_t *o = json_pack("{s:s, s:o, s:i, s:i, s:I}", "sid", s->sid, "upgrades", upgrades,
	                      "pingInterval", s->ep->ping_interval, "pingTimeout",
	                      s->ep->ping_timeout, "maxPayload", (json_int_t)s->ep->max_payload);
	struct buf b = {0};
	buf_addc(&b, '0');
	json_dump_to(&b, o);
	json_decref(o);
	struct blob *blob = blob_of(b.p, b.len);
	buf_free(&b);
	return blob;
}

/* Opens a session and queues its open packet. NULL, with *refusal saying why, when the
 * client's address holds its share or every place is taken. room_lock held. */
static struct session *eio_open(const struct endpoint *ep, int eio, enum transport t, bool b64,
                                int peer, const char **refusal)
{
	struct session *s = session_new(ep, eio, t, peer, refusal);
	if (!s)
		return NULL;
	s->b64 = b64;
	struct blob *open = eio_open_packet(s);
	session_send(s, open, false);
	blob_unref(open);
	int64_t now = now_ms();
	if (eio == 4)
		beat_set(s, now + ep->ping_interval);
	else
		beat_set(s, now + ep->ping_interval + ep->ping_timeout);
	ep->app->on_open(s);
	return s;
}

/* A session's timer is due: the layer's deadline, or the heartbeat's -- ping, or give up
 * on a silent client. room_lock held. */
static void eio_timer_fire(struct session *s, int64_t now)
{
	if (s->state == S_DETACHED) { /* only the layer's deadline is left */
		timer_cancel(s);
		s->app_at = 0;
		s->ep->app->on_deadline(s);
		return;
	}
	if (s->app_at && s->app_at <= now) {
		s->app_at = 0;
		s->ep->app->on_deadline(s);
	}
	if (s->beat_at > now) {
		session_timer_update(s);
		return;
	}
	if (s->eio == 4 && !s->awaiting_pong) {
		/* Over polling the ping jumps the queue: a client working through a backlog a
		 * long-poll at a time must still see it within pingTimeout. */
		struct blob *ping = blob_of("2", 1);
		if (s->transport == POLLING)
			session_send_first(s, ping);
		else
			session_send(s, ping, false);
		blob_unref(ping);
		s->awaiting_pong = true;
		s->deadline_refreshed = false;
		beat_set(s, now + s->ep->ping_timeout);
		return;
	}
	timer_cancel(s);
	session_doom(s, "ping timeout");
}

/* Heartbeat bookkeeping for one received packet. Returns false if the packet breaks the
 * protocol and the session must close. room_lock held. */
static bool eio_heard(struct session *s, char type, const char *data, size_t len)
{
	int64_t now = now_ms();
	if (s->eio == 4) {
		if (type == '2')
			return false; /* invalid heartbeat direction */
		if (type == '3') {
			s->awaiting_pong = false;
			beat_set(s, now + s->ep->ping_interval);
		} else if (s->awaiting_pong && !s->deadline_refreshed) {
			s->deadline_refreshed = true;
			beat_set(s, now + s->ep->ping_timeout);
		}
		return true;
	}
	if (type == '3')
		return false; /* invalid heartbeat direction */
	if (type == '2') {
		struct buf pong = {0};
		buf_addc(&pong, '3');
		buf_add(&pong, data, len);
		struct blob *b = blob_of(pong.p, pong.len);
		buf_free(&pong);
		session_send(s, b, false);
		blob_unref(b);
		beat_set(s, now + s->ep->ping_interval + s->ep->ping_timeout);
	}
	return true;
}

/* One packet from the client, by whatever transport. Returns false once the session is
 * closed, so that the rest of a long-poll body is ignored. room_lock NOT held. */
/*
 * The inbound budget. What a client sends costs its bytes, plus PACKET_IN_COST a packet
 * so that a stream of tiny packets is not free, against --inbound-rate a second, in
 * bursts of a whole message. A client in debt is not read until it is even again: a
 * WebSocket's socket is left unread (wire thread), a POST's body is not read (wire
 * thread, make's build); a POST whose packets alone would go a whole burst into debt
 * ends its session. So one client cannot push the room faster than a slow member
 * reads, nor take more than its share of the wire thread.
 */
static double inbound_burst(void) { return (double)opt.max_payload + 64 * 1024; }

/* Takes n from a budget; returns the balance (unlimited: always 0). */
static double inbound_take(struct bucket *b, size_t n)
{
	if (opt.inbound_rate == 0)
		return 0;
	return bucket_take(b, (double)opt.inbound_rate, inbound_burst(), (double)n, now_ms());
}

static bool eio_receive(struct session *s, char type, const char *data, size_t len, bool binary)
{
	room_lock_acquire();
	if (s->state != S_OPEN) {
		room_unlock();
		return false;
	}
	bool message = binary || type == '4';
	if (type == '1') {
		s->closed_by_client = true;
		if (s->transport == POLLING && !s->get_active) /* its GET may still be on the way */
			s->parted_serial = parted_remember(s) + 1;
		session_close(s, "transport close");
	} else if (!eio_heard(s, binary ? '4' : type, data, len)) {
		session_close(s, "invalid heartbeat direction");
	}
	bool open = s->state == S_OPEN;
	room_unlock();
	if (open && message)
		s->ep->app->on_message(s, data, len, binary);
	return open;
}

/* ===================================== HTTP ===================================== */
/*
 * What an answer says, whoever writes it. An answer says "Connection: close" whenever
 * the connection will be closed after it -- the client asked for that, or sent HTTP/1.0
 * without keep-alive, or we decided it -- and nothing when the connection stays (RFC 9112,
 * section 9.6): a client that reuses a connection we closed without saying so fails its
 * next request ("socket hang up" in Node).
 */
enum eio_error { E_TRANSPORT, E_SID, E_METHOD, E_REQUEST, E_FORBIDDEN, E_VERSION };
static const char *const eio_error_text[] = {
	"Transport unknown", "Session ID unknown", "Bad handshake method",
	"Bad request", "Forbidden", "Unsupported protocol version",
};

static const char *http_status_text(int status)
{
	switch (status) {
	case 101: return "Switching Protocols";
	case 200: return "OK";
	case 204: return "No Content";
	case 400: return "Bad Request";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
	case 411: return "Length Required";
	case 413: return "Payload Too Large";
	case 429: return "Too Many Requests";
	case 431: return "Request Header Fields Too Large";
	case 503: return "Service Unavailable";
	default: return "Error";
	}
}

/* Does a comma-separated header value hold this token (any case)? */
static bool header_has_token(const char *value, const char *token)
{
	size_t n = strlen(token);
	for (const char *p = value; *p;) {
		while (*p == ' ' || *p == '\t' || *p == ',')
			p++;
		const char *end = p;
		while (*end && *end != ',')
			end++;
		const char *last = end;
		while (last > p && (last[-1] == ' ' || last[-1] == '\t'))
			last--;
		if ((size_t)(last - p) == n && strncasecmp(p, token, n) == 0)
			return true;
		p = end;
	}
	return false;
}

/* Does the request ask for its connection to close after the answer? */
static bool request_wants_close(const char *http_version, const char *connection)
{
	if (connection && header_has_token(connection, "close"))
		return true;
	if (connection && header_has_token(connection, "keep-alive"))
		return false;
	return !http_version || strcmp(http_version, "1.1") != 0;
}

/* An answer: the head, then the body's pieces (taken from `body`, which is left empty),
 * unless only the head is wanted (HEAD). */
static void http_answer(struct gather *out, int status, const char *type, const char *headers,
                        struct gather *body, bool close, bool head_only)
{
	struct buf head = {0};
	buf_printf(&head, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
	                  "Cache-Control: no-store\r\n%s%s\r\n",
	           status, http_status_text(status), type, body->len, headers ? headers : "",
	           close ? "Connection: close\r\n" : "");
	gather_text(out, head.p, head.len);
	buf_free(&head);
	for (int i = 0; i < body->n && !head_only; i++) {
		if (body->piece[i].p)
			gather_piece(out, body->piece[i].p, 0, body->piece[i].len);
		else
			gather_text(out, body->text.p + body->piece[i].at, body->piece[i].len);
	}
	for (int i = 0; i < body->nheld; i++)
		out->held[out->nheld++] = body->held[i]; /* the references move */
	body->nheld = 0;
	gather_free(body);
}

static int wire_epfd = -1;
static struct mg_context *http_ctx;

/* epoll tags: what an event is about, which slot, and which use of that slot. */
enum { TAG_WAKE = 1, TAG_WS = 2, TAG_HTTP = 3, TAG_LISTEN = 4 };

static uint64_t epoll_tag(int kind, uint32_t gen, int index)
{
	return (uint64_t)kind << 56 | (uint64_t)(gen & 0xFFFFFF) << 32 | (uint32_t)index;
}

#if CIVETWEB_EMBEDDED
/* ================================ HTTP connections ================================ */
/*
 * Every TCP connection comes to the wire thread first. It waits there -- costing a
 * struct conn, not a thread -- while its request head arrives, while a POST body
 * arrives, while it idles between keep-alive requests, and while a long-poll GET waits
 * for packets. Only a whole request goes to a civetweb worker: the wire thread gives
 * civetweb the socket (produce_socket, civetweb's own accept queue) and, when a worker
 * takes it, the head already read, in civetweb's buffer (on_connection_open). civetweb
 * parses and routes it; our handler answers at once, or asks to park its GET, and gives
 * the socket back (conn_hand_back). The answer, made of shared blobs, is written here
 * without blocking. So the worker pool is small and fixed, and a slow or silent client
 * costs a few hundred bytes.
 *
 * Deadlines, as Node and nginx have them: a head must arrive within --header-timeout; an
 * idle keep-alive connection waits KEEP_ALIVE_MS; a body, and an answer, must keep
 * moving. Each is stretched by up to a quarter, at random (stretched): thousands of
 * connections opened in one burst would otherwise expire in one, and if their clients
 * come straight back, the handshakes of that second burst queue ahead of everyone
 * else's. When the table is full, the connection that has waited longest for a head
 * makes way for the new one.
 *
 * A conn is the wire thread's, except while a worker has it (C_WORKER). The hand-back
 * list crosses threads and is guarded by room_lock, as are peers and sessions.
 */
/* ms plus up to a quarter more, at random. Wire thread (its generator is not shared). */
static int64_t stretched(int64_t ms)
{
	static uint64_t x;
	if (!x)
		random_bytes(&x, sizeof x);
	x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift64: x never becomes 0 */
	return x ? ms + (int64_t)(x % (uint64_t)(ms / 4 + 1)) : ms;
}

enum conn_state {
	C_FREE,
	C_HEAD,    /* waiting for a request head: a new connection, or idle between requests */
	C_BODY,    /* a POST body is arriving */
	C_WORKER,  /* a civetweb worker has the request */
	C_PARKED,  /* a long-poll GET waits for its session's packets */
	C_WRITING, /* an answer is going out */
	C_LINGER,  /* closing: our FIN is out, the client's awaited */
};

/* What a connection answers with. */
struct answer {
	struct gather out;
	size_t sent;
	char *headers;       /* a long-poll GET's extra headers (CORS), or NULL */
	struct packet take[POLL_MAX_PACKETS]; /* the packets a long-poll GET answers with */
	int ntake;
	size_t take_cost;    /* their queue cost, given back to the session once written */
};

struct conn {
	enum conn_state state;
	int index;
	uint32_t gen;
	int fd;
	int peer;            /* its address's slot in peers[], -1 if none */
	union usa lsa, rsa;  /* as civetweb's struct socket wants them */
	struct timer timer;  /* the deadline of its state */
	bool in_epoll;
	int64_t request_at;  /* when the head of the current request began to arrive */

	/* the request, at the front of `in` */
	struct buf in;       /* read and not used yet: a head, a body, what follows */
	size_t head_len;     /* once the head is whole */
	size_t head_seen;    /* bytes of an unfinished head already scanned for its end */
	size_t body_len;     /* its Content-Length, once the head is whole */
	bool body_refused;   /* longer than --max-payload: not read, and the connection closes */

	/* the answer */
	struct answer *a;    /* while it answers or waits to (kept small while it idles) */
	bool close_after;
	struct session *s;   /* the session of its long-poll GET */
	uint32_t s_gen;
	int eio;
	bool b64;

	bool paused;         /* its body is not read for now: its session is in inbound debt */
	struct session *order_s; /* the session whose requests go to workers one at a time */
	uint32_t order_gen;
	struct conn *next_waiting;
	uint64_t opened;     /* its number in `arrivals` (see parted_remember) */
	uint64_t arrival;    /* its current request's */
	uint64_t requests;   /* how many it has carried, this one included */
	unsigned parted_serial; /* 1 + the serial of the session its POST closed, if any */
	struct session *post_s; /* the session whose POST it carries */
	uint32_t post_gen;
	int older, newer;    /* the list of connections waiting for a head, oldest first */
	struct conn *next_back;
	bool back_park;      /* handed back asking to park its GET */
	bool back_gone;      /* civetweb closed it (it answered a malformed request itself),
	                        or it became a WebSocket: only the slot is left to free */
};

static struct conn conns[MAX_CONNS];
static int conn_free_slots[MAX_CONNS], nconn_free, conns_high, conns_open;
static int head_oldest = -1, head_newest = -1;
static struct conn *conns_back; /* handed back by workers; room_lock */
static atomic_int *conn_by_fd;  /* fd -> conn index + 1, 0: none */
static int conn_fd_cap;
static struct timer *conn_timer(int index) { return &conns[index].timer; }
static int conn_heap_items[MAX_CONNS];
static struct timer_heap conn_timers = {conn_heap_items, 0, conn_timer};

static void conns_init(int fd_limit)
{
	conn_fd_cap = fd_limit < (1 << 22) ? fd_limit : 1 << 22;
	conn_by_fd = calloc((size_t)conn_fd_cap, sizeof *conn_by_fd);
	if (!conn_by_fd)
		abort();
}

static struct conn *conn_of_fd(int fd)
{
	if (fd < 0 || fd >= conn_fd_cap)
		return NULL;
	int i = atomic_load_explicit(&conn_by_fd[fd], memory_order_acquire);
	return i ? &conns[i - 1] : NULL;
}

static void conn_deadline(struct conn *c, int64_t at)
{
	if (at)
		heap_set(&conn_timers, c->index, at);
	else
		heap_cancel(&conn_timers, c->index);
}

static void conn_watch(struct conn *c, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.u64 = epoll_tag(TAG_HTTP, c->gen, c->index)};
	epoll_ctl(wire_epfd, c->in_epoll ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev);
	c->in_epoll = true;
}

static void conn_unwatch(struct conn *c)
{
	if (c->in_epoll)
		epoll_ctl(wire_epfd, EPOLL_CTL_DEL, c->fd, NULL);
	c->in_epoll = false;
}

static void head_list_add(struct conn *c)
{
	c->older = head_newest;
	c->newer = -1;
	if (head_newest >= 0)
		conns[head_newest].newer = c->index;
	else
		head_oldest = c->index;
	head_newest = c->index;
}

static void head_list_remove(struct conn *c)
{
	if (c->state != C_HEAD)
		return;
	if (c->older >= 0)
		conns[c->older].newer = c->newer;
	else
		head_oldest = c->newer;
	if (c->newer >= 0)
		conns[c->newer].older = c->older;
	else
		head_newest = c->older;
}

static void conn_set_state(struct conn *c, enum conn_state state)
{
	head_list_remove(c);
	c->state = state;
	if (state == C_HEAD)
		head_list_add(c);
}

/* Buffers of ours that clients fill count against the memory budget. A request head
 * (HEAD_MAX at most, and the connections an address may hold are counted) is always let
 * in, so that a budget full of half-sent bodies does not lock newcomers out; a body must
 * fit in the budget's share for input. */
static bool conn_in_reserve(struct conn *c, size_t more)
{
	size_t cap = c->in.cap;
	if (c->in.len + more <= cap)
		return true;
	if (c->state != C_HEAD && !inbound_mem_room(more))
		return false;
	buf_reserve(&c->in, more);
	inbound_mem_take(c->in.cap - cap);
	return true;
}

static void conn_in_free(struct conn *c)
{
	inbound_mem_give(c->in.cap);
	buf_free(&c->in);
}

/* Drops the request at the front of `in`, keeping what came after it. */
static void conn_in_consume(struct conn *c)
{
	size_t used = c->head_len + c->body_len;
	used = used < c->in.len ? used : c->in.len;
	memmove(c->in.p, c->in.p + used, c->in.len - used);
	c->in.len -= used;
	c->head_len = c->body_len = c->head_seen = 0;
	if (c->in.len == 0)
		conn_in_free(c); /* an idle connection keeps no buffer */
}

/* The connection's answer, made when first needed. */
static struct answer *conn_answer(struct conn *c)
{
	if (!c->a) {
		c->a = xmalloc(sizeof *c->a);
		memset(c->a, 0, sizeof *c->a);
	}
	return c->a;
}

static void conn_answer_free(struct conn *c)
{
	struct answer *a = c->a;
	if (!a)
		return;
	for (int i = 0; i < a->ntake; i++)
		blob_unref(a->take[i].blob);
	gather_free(&a->out);
	free(a->headers);
	free(a);
	c->a = NULL;
}

static void session_lost_answer(struct conn *c);

/* The connection no longer carries a POST for its session. room_lock held. */
static void post_ended(struct conn *c)
{
	struct session *s = c->post_s;
	if (s && s->gen == c->post_gen && s->post_conn == c) {
		s->post_active = false;
		s->post_conn = NULL;
	}
	c->post_s = NULL;
}

/* Closes the connection and frees its slot. A long-poll GET that goes with it ends its
 * session, as in Node: the client gave up, or its answer was lost. Wire thread. */
static void conn_close(struct conn *c)
{
	head_list_remove(c);
	heap_cancel(&conn_timers, c->index);
	if (c->fd >= 0) {
		conn_unwatch(c);
		atomic_store_explicit(&conn_by_fd[c->fd], 0, memory_order_release);
		close(c->fd);
		c->fd = -1;
	}
	conn_in_free(c);
	room_lock_acquire();
	if (c->state == C_PARKED || (c->state == C_WRITING && c->s))
		session_lost_answer(c);
	post_ended(c);
	if (c->peer >= 0) {
		peers[c->peer].conns--;
		peer_let_go(c->peer);
		c->peer = -1;
	}
	room_unlock();
	conn_answer_free(c); /* after session_lost_answer, which reads its cost */
	c->state = C_FREE;
	c->s = NULL;
	conn_free_slots[nconn_free++] = c->index;
	conns_open--;
}

/* A free slot; when there is none, the connection waiting longest for a head goes. */
static struct conn *conn_alloc(void)
{
	int index;
	if (nconn_free == 0 && conns_high == MAX_CONNS && head_oldest >= 0)
		conn_close(&conns[head_oldest]);
	if (nconn_free > 0)
		index = conn_free_slots[--nconn_free];
	else if (conns_high < MAX_CONNS)
		index = conns_high++;
	else
		return NULL;
	struct conn *c = &conns[index];
	uint32_t gen = c->gen + 1;
	memset(c, 0, sizeof *c);
	c->index = index;
	c->gen = gen;
	c->fd = -1;
	c->peer = -1;
	c->timer.pos = -1;
	c->older = c->newer = -1;
	conns_open++;
	return c;
}

/* A refusal written at once, best effort, before we close: the connection never became
 * ours, so nothing waits for the client to read it. */
static void refuse_at_once(int fd, int status)
{
	char text[160];
	int n = snprintf(text, sizeof text, "HTTP/1.1 %d %s\r\nConnection: close\r\n"
	                 "Content-Length: 0\r\n\r\n", status, http_status_text(status));
	ssize_t w = send(fd, text, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
	(void)w;
	close(fd);
}

static void conn_wait_head(struct conn *c, int64_t deadline)
{
	conn_set_state(c, C_HEAD);
	c->request_at = 0;
	c->head_seen = 0;
	conn_deadline(c, deadline);
	conn_watch(c, EPOLLIN | EPOLLRDHUP);
}

/* A new connection from the accept queue. Wire thread. */
static void conn_open(int fd, const struct sockaddr_storage *ra, socklen_t ralen)
{
	char key[PEER_KEY_MAX];
	peer_key((const struct sockaddr *)ra, key);
	room_lock_acquire();
	int peer = stopping ? -1 : peer_get(key);
	bool over = peer < 0 || peers[peer].conns >= opt.conns_per_address;
	if (!over)
		peers[peer].conns++;
	uint64_t opened = ++arrivals;
	room_unlock();
	struct conn *c = over || fd >= conn_fd_cap ? NULL : conn_alloc();
	if (!c) {
		if (!over) {
			room_lock_acquire();
			peers[peer].conns--;
			peer_let_go(peer);
			room_unlock();
		}
		refuse_at_once(fd, 503);
		return;
	}
	c->fd = fd;
	c->peer = peer;
	c->opened = opened;
	memcpy(&c->rsa, ra, ralen < sizeof c->rsa ? ralen : sizeof c->rsa);
	socklen_t llen = sizeof c->lsa;
	getsockname(fd, &c->lsa.sa, &llen);
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
	atomic_store_explicit(&conn_by_fd[fd], c->index + 1, memory_order_release);
	conn_wait_head(c, now_ms() + stretched(opt.header_timeout));
}

static void conn_start_answer(struct conn *c);

/* Answers with a status of our own, and closes: a request we will not hand on. */
static void conn_refuse(struct conn *c, int status)
{
	struct gather body = {0};
	const char *text = http_status_text(status);
	gather_text(&body, text, strlen(text));
	http_answer(&conn_answer(c)->out, status, "text/plain", NULL, &body, true, false);
	c->close_after = true;
	conn_start_answer(c);
}

/* Where a request head ends, or 0: at the first "\r\n\r\n" or "\n\n", exactly where
 * civetweb's own scan ends it. Were we to end it elsewhere (at "\n\r\n", say), civetweb
 * would wait for more of a head we think complete, holding a worker until its timeout. */
static size_t head_end(const char *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i++) {
		if (p[i] == '\n' && p[i + 1] == '\n')
			return i + 2;
		if (p[i] == '\r' && i + 3 < n && p[i + 1] == '\n' && p[i + 2] == '\r' && p[i + 3] == '\n')
			return i + 4;
	}
	return 0;
}

/* civetweb refuses a head with any control character but CR and LF; HTTP allows tabs as
 * whitespace (Node takes them), so they become spaces. False for other control bytes. */
static bool head_tidy(char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)p[i];
		if (ch == '\t')
			p[i] = ' ';
		else if ((ch < 0x20 && ch != '\r' && ch != '\n') || ch == 0x7F)
			return false;
	}
	return true;
}

/* The framing of a whole head, which is all the wire thread needs to know of it: the
 * length of its body. civetweb parses it properly once a worker has it. Returns an HTTP
 * status to refuse it with, or 0. */
static int head_framing(const char *p, size_t n, size_t *body_len)
{
	*body_len = 0;
	bool have_length = false;
	const char *end = p + n;
	const char *line = memchr(p, '\n', n); /* the request line is civetweb's to judge */
	while (line && ++line < end) {
		const char *eol = memchr(line, '\n', (size_t)(end - line));
		if (!eol)
			break;
		const char *colon = memchr(line, ':', (size_t)(eol - line));
		size_t name = colon ? (size_t)(colon - line) : 0;
		const char *v = colon ? colon + 1 : eol;
		while (v < eol && (*v == ' ' || *v == '\t'))
			v++;
		if (name == 14 && strncasecmp(line, "Content-Length", 14) == 0) {
			uint64_t len = 0;
			const char *d = v;
			for (; d < eol && *d >= '0' && *d <= '9'; d++) {
				if (len > (UINT64_MAX - 9) / 10)
					return 400;
				len = len * 10 + (uint64_t)(*d - '0');
			}
			bool digits = d > v; /* "Content-Length: \r" has none */
			while (d < eol && (*d == ' ' || *d == '\t' || *d == '\r'))
				d++;
			if (!digits || d != eol || (have_length && len != *body_len) || len > SIZE_MAX / 2)
				return 400;
			*body_len = (size_t)len;
			have_length = true;
		} else if (name == 17 && strncasecmp(line, "Transfer-Encoding", 17) == 0) {
			return 411; /* no Socket.IO client sends a chunked body */
		}
		line = eol;
	}
	return 0;
}

/* Hands the whole request to a civetweb worker. civetweb's queue holds every
 * connection there is, so this never waits. */
static void conn_produce(struct conn *c)
{
	struct socket so;
	memset(&so, 0, sizeof so);
	so.sock = c->fd;
	so.lsa = c->lsa;
	so.rsa = c->rsa;
	produce_socket(http_ctx, &so);
}

static struct session *head_session(const char *head, size_t n);

/*
 * Hands the whole request to a civetweb worker; civetweb's queue holds every connection
 * there is, so this never waits. Requests for one session go to workers one at a time,
 * in the order they came, as Node's one thread takes them: a GET and a POST sent at once
 * must not have their order decided by which worker is quicker (a POST that closes the
 * session would make the GET sent before it an error).
 */
static void conn_to_worker(struct conn *c)
{
	conn_unwatch(c);
	conn_set_state(c, C_WORKER);
	conn_deadline(c, 0);
	room_lock_acquire();
	c->arrival = ++arrivals;
	c->requests++;
	struct session *s = head_session(c->in.p, c->head_len);
	bool wait = false;
	if (s) {
		c->order_s = s;
		c->order_gen = s->gen;
		c->next_waiting = NULL;
		if (s->in_workers++ > 0) {
			if (s->waiting_last)
				s->waiting_last->next_waiting = c;
			else
				s->waiting = c;
			s->waiting_last = c;
			wait = true;
		}
	}
	room_unlock();
	if (!wait)
		conn_produce(c);
}

/* A worker is done with the connection's request: the next one of its session may go.
 * Returns that one, or NULL. room_lock held. */
static struct conn *conn_order_release(struct conn *c)
{
	struct session *s = c->order_s;
	c->order_s = NULL;
	if (!s || s->gen != c->order_gen)
		return NULL;
	s->in_workers--;
	struct conn *next = s->waiting;
	if (next) {
		s->waiting = next->next_waiting;
		if (!s->waiting)
			s->waiting_last = NULL;
	}
	session_release(s);
	return next;
}

/* The session a request's head names with ?sid=, if it is open. room_lock held. */
static struct session *head_session(const char *head, size_t n)
{
	const char *eol = memchr(head, '\n', n);
	if (!eol)
		return NULL;
	const char *p = memchr(head, '?', (size_t)(eol - head));
	while (p && p < eol) {
		p++;
		if (strncmp(p, "sid=", 4) == 0) {
			const char *v = p + 4, *e = v;
			while (e < eol && *e != '&' && *e != ' ')
				e++;
			if (e - v != SID_LEN)
				return NULL;
			char sid[SID_LEN + 1];
			memcpy(sid, v, SID_LEN);
			sid[SID_LEN] = 0;
			return session_find(sid);
		}
		p = memchr(p, '&', (size_t)(eol - p));
	}
	return NULL;
}

/* A POST for a session begins when its head is whole, as in Node: a second one before it
 * is answered is an overlap (the worker tells). Its session may be in inbound debt: then
 * the body is not read until it is even again. Returns true if it waits. */
static bool conn_post_begins(struct conn *c)
{
	room_lock_acquire();
	struct session *s = strncmp(c->in.p, "POST ", 5) == 0 ? head_session(c->in.p, c->head_len) : NULL;
	if (s && !s->post_active) {
		s->post_active = true;
		s->post_conn = c;
		c->post_s = s;
		c->post_gen = s->gen;
	}
	bool debt = s && opt.inbound_rate && s->inbound.tokens < 0;
	int64_t even = debt ? bucket_even_at(&s->inbound, (double)opt.inbound_rate) : 0;
	room_unlock();
	c->paused = debt;
	if (debt) {
		conn_watch(c, EPOLLRDHUP);
		conn_deadline(c, even);
	}
	return debt;
}

/* Still in debt after a pause? */
static bool conn_pause_for_debt(struct conn *c)
{
	room_lock_acquire();
	struct session *s = c->post_s && c->post_s->gen == c->post_gen ? c->post_s : NULL;
	bool debt = s && s->inbound.tokens < 0 &&
	            bucket_take(&s->inbound, (double)opt.inbound_rate, inbound_burst(), 0, now_ms()) < 0;
	int64_t even = debt ? bucket_even_at(&s->inbound, (double)opt.inbound_rate) : 0;
	room_unlock();
	c->paused = debt;
	if (debt) {
		conn_watch(c, EPOLLRDHUP);
		conn_deadline(c, even);
	}
	return debt;
}

/* A body must keep arriving: no longer between two pieces than this. */
static int64_t body_stall_ms(void)
{
	return opt.header_timeout < BODY_STALL_MS ? opt.header_timeout : BODY_STALL_MS;
}

/* What `in` holds now may complete a head, or a body: then on to a worker. */
static void conn_advance(struct conn *c)
{
	int64_t now = now_ms();
	if (c->state == C_HEAD) {
		if (c->in.len == 0)
			return;
		if (!c->request_at) { /* an idle connection's next request: its head has a deadline */
			c->request_at = now;
			conn_deadline(c, now + stretched(opt.header_timeout));
		}
		/* a head sent a byte at a time is scanned once, not once a byte */
		size_t have = c->in.len < HEAD_MAX ? c->in.len : HEAD_MAX;
		size_t from = c->head_seen > 3 ? c->head_seen - 3 : 0;
		size_t end = head_end(c->in.p + from, have - from);
		end = end ? from + end : 0;
		c->head_seen = have;
		if (!end) {
			if (c->in.len >= HEAD_MAX)
				conn_refuse(c, 431);
			return;
		}
		int refusal = head_tidy(c->in.p, end) ? head_framing(c->in.p, end, &c->body_len) : 400;
		if (refusal) {
			conn_refuse(c, refusal);
			return;
		}
		c->head_len = end;
		if (c->body_len > opt.max_payload) { /* the handler refuses it, unread */
			c->body_refused = true;
			c->body_len = 0;
		}
		conn_set_state(c, C_BODY);
		if (conn_post_begins(c))
			return;
	}
	if (c->state != C_BODY || c->paused)
		return;
	if (c->in.len >= c->head_len + c->body_len)
		conn_to_worker(c);
	else
		conn_deadline(c, now + stretched(body_stall_ms())); /* it moves: so does the stall deadline */
}

/* The socket is readable. Reads at most what the request may still need (a head of
 * HEAD_MAX, the rest of a body) and 64 KiB a round: one client's share. Wire thread. */
static void conn_read(struct conn *c)
{
	size_t want, request = c->head_len + c->body_len;
	if (c->state == C_HEAD)
		want = HEAD_MAX - (c->in.len < HEAD_MAX ? c->in.len : HEAD_MAX);
	else if (c->state == C_BODY)
		want = request > c->in.len ? request - c->in.len : 0;
	else
		want = 65536; /* lingering: what comes is dropped */
	want = want > 65536 ? 65536 : want;
	if (want == 0) {
		conn_advance(c);
		return;
	}
	/* into scratch space first: a connection keeps only what it was sent, so half a head
	 * costs its few bytes, not HEAD_MAX */
	static char scratch[65536]; /* the wire thread's alone */
	ssize_t n = recv(c->fd, scratch, want, MSG_DONTWAIT);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		conn_close(c);
		return;
	}
	if (c->state == C_LINGER)
		return; /* what comes after our answer is dropped */
	if (!conn_in_reserve(c, (size_t)n)) {
		conn_refuse(c, 503); /* the memory budget is spent */
		return;
	}
	memcpy(c->in.p + c->in.len, scratch, (size_t)n);
	c->in.len += (size_t)n;
	conn_advance(c);
}

/* The answer is written: keep the connection for its next request, or close it. */
static void conn_answered(struct conn *c)
{
	if (c->s) {
		room_lock_acquire();
		struct session *s = c->s;
		if (s->gen == c->s_gen && s->state == S_OPEN)
			s->qbytes -= c->a->take_cost;
		c->s = NULL;
		room_unlock();
	}
	conn_answer_free(c);
	if (c->close_after || stopping) {
		shutdown(c->fd, SHUT_WR); /* then read until the client's FIN, so it sees it all */
		conn_set_state(c, C_LINGER);
		conn_deadline(c, now_ms() + CLOSE_LINGER_MS);
		conn_watch(c, EPOLLIN | EPOLLRDHUP);
		return;
	}
	conn_in_consume(c);
	conn_wait_head(c, now_ms() + stretched(KEEP_ALIVE_MS));
	conn_advance(c); /* the next request may be here already */
}

/* Writes what the socket takes. Wire thread, no lock. */
static void conn_write(struct conn *c)
{
	struct answer *a = c->a;
	while (a->sent < a->out.len) {
		struct iovec iov[GATHER_PIECES];
		struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)gather_iov(&a->out, a->sent, iov)};
		ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			/* EPOLLOUT only: a client that shut down its side may still read its answer,
			 * and a level-triggered EPOLLRDHUP would wake us for nothing until then */
			conn_watch(c, EPOLLOUT);
			conn_deadline(c, now_ms() + WRITE_STALL_MS);
			return;
		}
		if (n < 0) {
			conn_close(c);
			return;
		}
		a->sent += (size_t)n;
		count_sent((size_t)n);
	}
	conn_answered(c);
}

static void conn_start_answer(struct conn *c)
{
	conn_set_state(c, C_WRITING);
	conn_answer(c)->sent = 0;
	conn_deadline(c, now_ms() + WRITE_STALL_MS);
	conn_write(c);
}

/* ---- long-poll GETs the wire thread holds ---- */

static int poll_take(struct session *s, struct packet *pk, size_t *cost);

/* Takes what the GET will answer with: its session's packets, or a close packet if the
 * session is gone. room_lock held. */
static void conn_poll_take(struct conn *c)
{
	struct session *s = c->s;
	struct answer *a = conn_answer(c);
	if (s && s->gen == c->s_gen && s->state != S_FREE) {
		a->ntake = poll_take(s, a->take, &a->take_cost);
		if (s->poll == c)
			s->poll = NULL;
		session_release(s);
		if (s->state != S_OPEN)
			c->s = NULL;
	} else {
		a->take[0] = (struct packet){blob_of("1", 1), false};
		a->ntake = 1;
		a->take_cost = 0;
		c->s = NULL;
	}
	conn_set_state(c, C_WRITING); /* no longer parked: a hang-up now costs nothing more */
}

/* Builds the GET's answer from what it took, and writes it. Wire thread, no lock. */
static void conn_poll_answer(struct conn *c)
{
	struct answer *a = c->a;
	struct gather body = {0};
	bool binary = payload_gather(&body, c->eio, c->b64, a->take, a->ntake);
	for (int i = 0; i < a->ntake; i++)
		blob_unref(a->take[i].blob); /* the gather holds its own references */
	a->ntake = 0;
	http_answer(&a->out, 200, binary ? "application/octet-stream" : "text/plain; charset=UTF-8",
	            a->headers, &body, c->close_after, false);
	conn_start_answer(c);
}

/* A GET handed back to be parked: it waits for packets, unless it can be answered now.
 * While a WebSocket probe is under way it waits 100 ms at most, as Node's upgrade check
 * does, and is then released (with noop, if nothing else). Wire thread. */
static void conn_park(struct conn *c)
{
	room_lock_acquire();
	struct session *s = c->s;
	bool now = s->gen != c->s_gen || s->state != S_OPEN || s->transport != POLLING || s->q.count;
	if (now) {
		conn_poll_take(c);
		room_unlock();
		conn_poll_answer(c);
		return;
	}
	s->poll = c;
	conn_set_state(c, C_PARKED);
	conn_deadline(c, s->probed ? now_ms() + 100 : 0);
	room_unlock();
	conn_watch(c, EPOLLRDHUP); /* a hang-up ends the session at once */
}

/* A parked or half-written long-poll answer is lost: the session goes. room_lock held. */
static void session_lost_answer(struct conn *c)
{
	struct session *s = c->s;
	if (!s || s->gen != c->s_gen)
		return;
	if (s->poll == c)
		s->poll = NULL;
	if (c->state == C_PARKED)
		s->get_active = false;
	session_close(s, "transport error");
	session_release(s);
	c->s = NULL;
}

/* A deadline of the connection's state has come. Wire thread. */
static void conn_timeout(struct conn *c)
{
	if (c->state == C_PARKED) { /* released for an upgrade */
		room_lock_acquire();
		conn_poll_take(c);
		room_unlock();
		conn_poll_answer(c);
	} else if (c->state == C_BODY && c->paused) { /* its session may be even again */
		c->paused = false;
		if (!conn_pause_for_debt(c)) {
			conn_watch(c, EPOLLIN | EPOLLRDHUP);
			conn_advance(c);
		}
	} else if ((c->state == C_HEAD && c->request_at) || c->state == C_BODY) {
		conn_refuse(c, 408); /* a head or body that stopped arriving, as Node answers it */
	} else {
		conn_close(c); /* an idle keep-alive connection, a stalled answer, lingered enough */
	}
}

/* Connections the workers are done with. Wire thread. */
static void conns_take_back(void)
{
	room_lock_acquire();
	struct conn *list = conns_back;
	conns_back = NULL;
	room_unlock();
	while (list) {
		struct conn *c = list;
		list = c->next_back;
		room_lock_acquire();
		struct conn *next = conn_order_release(c);
		if (c->parted_serial) { /* the answer to a close goes out now */
			parted_answered(c->parted_serial - 1);
			c->parted_serial = 0;
		}
		room_unlock();
		if (c->back_gone)
			conn_close(c); /* its socket is civetweb's or a WebSocket's now */
		else if (c->back_park)
			conn_park(c);
		else
			conn_start_answer(c);
		if (next)
			conn_produce(next); /* after this one is parked or answered */
	}
}

/* ---- the worker's side ---- */

/* civetweb's worker starts on a connection: the head we read goes into its buffer, as if
 * it had read it itself. (civetweb's init_connection callback.) */
static int on_connection_open(const struct mg_connection *mc, void **data)
{
	struct mg_connection *m = (struct mg_connection *)mc;
	struct conn *c = conn_of_fd(m->client.sock);
	*data = c;
	if (c && c->state == C_WORKER && c->head_len <= (size_t)m->buf_size) {
		memcpy(m->buf, c->in.p, c->head_len);
		m->data_len = (int)c->head_len;
	}
	return 0;
}

static struct conn *conn_of_request(struct mg_connection *mc)
{
	return mg_get_user_connection_data(mc);
}

/* Takes the socket out of civetweb, which then has nothing to close and frees the worker. */
static void civetweb_let_go(struct mg_connection *mc)
{
	mg_lock_connection(mc);
	mc->client.sock = INVALID_SOCKET;
	mc->must_close = 1;
	mg_unlock_connection(mc);
}

/* The worker is done: the connection goes back to the wire thread, with its answer in
 * c->a, or asking to park its GET. */
static void conn_hand_back(struct mg_connection *mc, struct conn *c, bool park)
{
	civetweb_let_go(mc);
	room_lock_acquire();
	post_ended(c); /* begun by its head; refused, it must not look under way any longer */
	c->back_park = park;
	c->next_back = conns_back;
	conns_back = c;
	room_unlock();
	wire_wake();
}

/* The connection is a WebSocket's now: its socket, its address count and the bytes that
 * came behind the request go to the WebSocket; only the slot goes back. */
static void conn_became_websocket(struct mg_connection *mc, struct conn *c, struct buf *early,
                                  int *peer)
{
	civetweb_let_go(mc);
	size_t used = c->head_len + c->body_len;
	if (c->in.len > used)
		buf_add(early, c->in.p + used, c->in.len - used);
	*peer = c->peer;
	c->peer = -1;
	atomic_store_explicit(&conn_by_fd[c->fd], 0, memory_order_release);
	c->fd = -1;
	room_lock_acquire();
	c->back_gone = true;
	c->next_back = conns_back;
	conns_back = c;
	room_unlock();
	wire_wake();
}

/* civetweb closes a connection. If it still has the socket, it answered by itself (a
 * malformed request): our conn has only its slot left to free. (connection_close.) */
static void on_connection_close(const struct mg_connection *mc)
{
	struct conn *c = mg_get_user_connection_data(mc);
	if (!c || mc->client.sock == INVALID_SOCKET)
		return; /* handed back already */
	atomic_store_explicit(&conn_by_fd[c->fd], 0, memory_order_release);
	c->fd = -1; /* civetweb closes it */
	room_lock_acquire();
	c->back_gone = true;
	c->next_back = conns_back;
	conns_back = c;
	room_unlock();
	wire_wake();
}

/* ---- listening ---- */

static int listeners[2], nlisteners; /* the chat's port, and the metrics' own if any */
static int64_t listen_paused_until; /* out of file descriptors: accept again then */

static void listeners_watch(uint32_t events)
{
	for (int i = 0; i < nlisteners; i++) {
		struct epoll_event ev = {.events = events, .data.u64 = epoll_tag(TAG_LISTEN, 0, i)};
		epoll_ctl(wire_epfd, EPOLL_CTL_MOD, listeners[i], &ev);
	}
}

/* Takes new connections, 64 at most a round. Wire thread. */
static void conns_accept(int listener)
{
	for (int i = 0; i < 64; i++) {
		struct sockaddr_storage ra;
		socklen_t ralen = sizeof ra;
		int fd = accept4(listener, (struct sockaddr *)&ra, &ralen, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd >= 0) {
			conn_open(fd, &ra, ralen);
			continue;
		}
		if ((errno == EMFILE || errno == ENFILE) && head_oldest >= 0) {
			/* out of descriptors: the connection waiting longest for a head makes way,
			 * as when the table is full */
			conn_close(&conns[head_oldest]);
			continue;
		}
		if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
			listeners_watch(0); /* the queue waits in the kernel until fds are free */
			listen_paused_until = now_ms() + 100;
		}
		return;
	}
}

/* Closes the listening sockets: no new connections, at shutdown. Wire thread. */
static void listeners_close(void)
{
	for (int i = 0; i < nlisteners; i++) {
		epoll_ctl(wire_epfd, EPOLL_CTL_DEL, listeners[i], NULL);
		close(listeners[i]);
	}
	nlisteners = 0;
}

/* Events for a connection. Wire thread. */
static void conn_event(uint32_t gen, int index, uint32_t events)
{
	struct conn *c = &conns[index];
	if (c->state == C_FREE || c->state == C_WORKER || (c->gen & 0xFFFFFF) != gen)
		return;
	if (c->state == C_PARKED || c->paused) {
		if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
			conn_close(c); /* the client gave up on its long-poll, or its POST */
		return;
	}
	if (c->state == C_WRITING) {
		if (events & (EPOLLHUP | EPOLLERR))
			conn_close(c);
		else if (events & EPOLLOUT)
			conn_write(c);
		return;
	}
	if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		conn_read(c);
}

/* Handles due deadlines; returns ms until the next, or -1. Wire thread. */
static int conns_deadlines(int64_t now)
{
	int i;
	while ((i = heap_due(&conn_timers, now)) >= 0) {
		heap_cancel(&conn_timers, i);
		conn_timeout(&conns[i]);
	}
	return heap_wait_ms(&conn_timers, now);
}
#endif /* CIVETWEB_EMBEDDED */

/* ================================= long-polling ================================= */
/*
 * A GET takes what its session has queued -- at most POLL_MAX_PACKETS packets, as
 * python-engineio refuses more -- or waits for it; a POST carries packets in. In make's
 * build a waiting GET is parked with the wire thread (see HTTP connections) and the
 * worker goes back to the pool at once. Built against Debian's libcivetweb, whose
 * connections cannot leave their worker, the worker waits on its session's condition
 * variable instead; the wire thread cannot see that client hang up, and the heartbeat
 * finds it. Either way only that client waits.
 */

/* What a long-poll answer carries: up to POLL_MAX_PACKETS queued packets, or a close
 * packet if the session closed (noop if the client closed it), or noop when released for
 * an upgrade. Their queue cost stays counted until the answer is written: *cost says how
 * much to give back then. room_lock held. */
static int poll_take(struct session *s, struct packet *pk, size_t *cost)
{
	int n = 0;
	*cost = 0;
	if (s->state == S_OPEN && s->transport == POLLING) {
		while (s->q.count && n < POLL_MAX_PACKETS) {
			pk[n] = outq_pop(&s->q);
			*cost += packet_cost(pk[n]);
			n++;
		}
	}
	if (n == 0) {
		/* At shutdown (or for a client we want back, s->rejoin) a noop, not a close
		 * packet: python-engineio takes a close packet for
		 * the server ending the session on purpose and never reconnects; after a noop its
		 * next request fails, and every client takes that for a lost connection. */
		bool close = s->state != S_OPEN && !s->closed_by_client && !stopping && !s->rejoin;
		pk[n++] = (struct packet){blob_of(close ? "1" : "6", 1), false};
	}
	s->get_active = false;
	return n;
}

static _Thread_local bool answer_closes; /* decided for this request: see http_close_after */

/* We decide to close the connection after this answer. */
static void http_close_after(struct mg_connection *mc)
{
	answer_closes = true;
#if CIVETWEB_EMBEDDED
	mc->must_close = 1;
#else
	mg_disable_keep_alive(mc); /* Debian's libcivetweb has it */
#endif
}

/* Will the connection be closed after our answer? */
static bool http_closing(struct mg_connection *mc)
{
	const struct mg_request_info *ri = mg_get_request_info(mc);
	if (answer_closes || stopping)
		return true;
	if (request_wants_close(ri->http_version, mg_get_header(mc, "Connection")))
		return true;
#if CIVETWEB_EMBEDDED
	struct conn *c = conn_of_request(mc);
	return !c || c->body_refused;
#else
	return false;
#endif
}

/* Sends an answer: its head, then `body` (whose pieces it takes). In make's build the
 * connection goes back to the wire thread to write it; otherwise civetweb writes it,
 * a piece at a time. Returns the status, as civetweb's handlers do. */
static int http_send(struct mg_connection *mc, int status, const char *type, const char *headers,
                     struct gather *body)
{
	bool close = http_closing(mc);
	bool head_only = strcmp(mg_get_request_info(mc)->request_method, "HEAD") == 0;
#if CIVETWEB_EMBEDDED
	struct conn *c = conn_of_request(mc);
	if (c) {
		http_answer(&conn_answer(c)->out, status, type, headers, body, close, head_only);
		c->close_after = close;
		conn_hand_back(mc, c, false);
		return status;
	}
#endif
	struct gather answer = {0};
	http_answer(&answer, status, type, headers, body, close, head_only);
	struct iovec iov[GATHER_PIECES];
	int n = gather_iov(&answer, 0, iov);
	for (int i = 0; i < n; i++)
		mg_write(mc, iov[i].iov_base, iov[i].iov_len);
	gather_free(&answer);
	if (close)
		http_close_after(mc);
	return status;
}

/* The same, for a body given as bytes. */
static int http_reply(struct mg_connection *mc, int status, const char *type,
                      const char *headers, const void *body, size_t len)
{
	struct gather g = {0};
	gather_text(&g, body, len);
	return http_send(mc, status, type, headers, &g);
}

static int eio_error_reply(struct mg_connection *c, enum eio_error code, const char *headers)
{
	char body[96];
	int n = snprintf(body, sizeof body, "{\"code\":%d,\"message\":\"%s\"}", (int)code,
	                 eio_error_text[code]);
	return http_reply(c, code == E_FORBIDDEN ? 403 : 400, "application/json", headers, body,
	                  (size_t)n);
}

/* A GET that the session's close overtook (see parted_remember): a noop. */
static int poll_answer_noop(struct mg_connection *mc, int eio, bool b64, const char *headers)
{
	struct packet noop = {blob_of("6", 1), false};
	struct gather body = {0};
	bool binary = payload_gather(&body, eio, b64, &noop, 1);
	blob_unref(noop.blob);
	return http_send(mc, 200, binary ? "application/octet-stream" : "text/plain; charset=UTF-8",
	                 headers, &body);
}

#if CIVETWEB_EMBEDDED
/* A long-poll GET: handed back to the wire thread, which answers it now if the session has
 * packets, and otherwise holds it until it does. Entered with room_lock held; returns
 * with it released. */
static int poll_get(struct mg_connection *mc, struct session *s, const char *headers)
{
	if (s->get_active) { /* a second GET at once: Node calls it an overlap and closes */
		session_close(s, "transport error");
		room_unlock();
		return eio_error_reply(mc, E_REQUEST, headers);
	}
	s->get_active = true;
	struct conn *c = conn_of_request(mc);
	c->s = s;
	c->s_gen = s->gen;
	c->eio = s->eio;
	c->b64 = s->b64;
	room_unlock();
	c->close_after = http_closing(mc);
	if (headers && headers[0])
		conn_answer(c)->headers = xstrndup(headers, strlen(headers));
	conn_hand_back(mc, c, true);
	return 200;
}
#else
/* A long-poll GET: its worker waits until the session has packets. Entered with room_lock
 * held; returns with it released. */
static int poll_get(struct mg_connection *mc, struct session *s, const char *headers)
{
	if (s->get_active) { /* a second GET at once: Node calls it an overlap and closes */
		session_close(s, "transport error");
		room_unlock();
		return eio_error_reply(mc, E_REQUEST, headers);
	}
	s->get_active = true;
	s->users++;
	/* While a WebSocket probe is under way, a GET is released with noop: at once if it
	 * was waiting when the probe came, else after 100 ms, as Node's upgrade check does. */
	bool released = false;
	for (;;) {
		reap_doomed(); /* before testing: closing a doomed session may concern us */
		if (s->state != S_OPEN || s->transport != POLLING || s->q.count || released)
			break;
		bool probing = s->probed;
		s->get_parked = true;
		if (probing) {
			struct timespec until;
			clock_gettime(CLOCK_MONOTONIC, &until);
			until.tv_nsec += 100 * 1000000L;
			if (until.tv_nsec >= 1000000000L)
				until.tv_sec++, until.tv_nsec -= 1000000000L;
			pthread_cond_timedwait(s->wake, &room_lock, &until);
		} else {
			pthread_cond_wait(s->wake, &room_lock);
		}
		s->get_parked = false;
		released = s->probed;
	}
	struct packet pk[POLL_MAX_PACKETS];
	size_t cost;
	int n = poll_take(s, pk, &cost);
	int eio = s->eio;
	bool b64 = s->b64;
	room_unlock();

	struct gather body = {0};
	bool binary = payload_gather(&body, eio, b64, pk, n);
	for (int i = 0; i < n; i++)
		blob_unref(pk[i].blob);
	int status = http_send(mc, 200, binary ? "application/octet-stream" : "text/plain; charset=UTF-8",
	                       headers, &body);

	room_lock_acquire();
	if (s->state == S_OPEN)
		s->qbytes -= cost;
	s->users--;
	session_release(s);
	room_unlock();
	return status;
}

/* Reads a request body of at most `limit` bytes. Returns false if it is larger. */
static bool read_body(struct mg_connection *c, struct buf *body, size_t limit)
{
	long long declared = mg_get_request_info(c)->content_length;
	if (declared > 0 && (unsigned long long)declared > limit)
		return false;
	char chunk[16384];
	int n;
	while ((n = mg_read(c, chunk, sizeof chunk)) > 0) {
		if ((size_t)n > limit - body->len)
			return false;
		buf_add(body, chunk, (size_t)n);
	}
	return true;
}

/* Reads and drops what is left of a refused request body, up to `cap` bytes. Closing
 * a socket with unread input makes the kernel answer with a reset, which can reach the
 * client before it reads our refusal; draining lets the answer arrive whole. */
static void drain_body(struct mg_connection *c, size_t cap)
{
	char chunk[16384];
	int n;
	while (cap > 0 && (n = mg_read(c, chunk, sizeof chunk)) > 0)
		cap -= (size_t)n < cap ? (size_t)n : cap;
}
#endif

/* One packet of a POST body: it costs the session's inbound budget, then goes up. A body
 * whose packets would take the budget a whole burst into debt ends the session: no
 * client needs that, and decoding it would keep a worker and room_lock busy. */
static bool post_packet(struct session *s, char type, const char *data, size_t len, bool binary)
{
	room_lock_acquire();
	bool flood = s->state == S_OPEN && inbound_take(&s->inbound, len + PACKET_IN_COST) < -inbound_burst();
	if (flood)
		session_close(s, "excess flood");
	room_unlock();
	return !flood && eio_receive(s, type, data, len, binary);
}

/* Takes a long-poll POST. Entered with room_lock held; returns with it released. */
static int poll_post(struct mg_connection *mc, struct session *s, bool binary_body,
                     const char *headers)
{
#if CIVETWEB_EMBEDDED
	struct conn *c = conn_of_request(mc);
	bool overlap = s->post_active && s->post_conn != c; /* begun when its head came */
#else
	bool overlap = s->post_active;
#endif
	if (overlap || (binary_body && s->eio == 4)) {
		session_close(s, "transport error"); /* a second POST at once, or binary in v4 */
		room_unlock();
		return eio_error_reply(mc, E_REQUEST, headers);
	}
	s->post_active = true;
	s->users++;
	size_t limit = s->ep->max_payload;
	room_unlock();

#if CIVETWEB_EMBEDDED /* the wire thread has read the body whole, unless it was too long */
	bool too_large = c->body_refused || c->body_len > limit;
	const char *body = c->in.p + c->head_len;
	size_t len = too_large ? 0 : c->body_len;
#else
	struct buf read = {0};
	bool too_large = !read_body(mc, &read, limit);
	const char *body = read.p ? read.p : "";
	size_t len = read.len;
#endif
	bool malformed = !too_large && !payload_decode(s, body, len, binary_body, post_packet);
#if !CIVETWEB_EMBEDDED
	buf_free(&read);
#endif

	room_lock_acquire();
	s->post_active = false;
#if CIVETWEB_EMBEDDED
	post_ended(c);
#endif
	if (malformed)
		session_close(s, "parse error"); /* before answering: the next request sees it closed */
	if (s->parted_serial) { /* this POST closed it: its answer marks the moment */
#if CIVETWEB_EMBEDDED
		c->parted_serial = s->parted_serial; /* when the wire thread starts writing it */
#else
		parted_answered(s->parted_serial - 1);
#endif
		s->parted_serial = 0;
	}
	s->users--;
	session_release(s);
	room_unlock();

	if (too_large) { /* like Node: 413, and the session lives on; the connection does not */
		http_close_after(mc);
		int status = http_reply(mc, 413, "text/plain", headers, "", 0);
#if !CIVETWEB_EMBEDDED
		drain_body(mc, 4 * limit);
#endif
		return status;
	}
	if (malformed)
		return eio_error_reply(mc, E_REQUEST, headers);
	/* A POST's connection is not kept: when we closed it at last, idle, we would race the
	 * client's next POST, which it cannot safely retry (python-engineio gives up on the
	 * session). GETs follow each other at once, so theirs is kept. */
	http_close_after(mc);
	return http_reply(mc, 200, "text/html", headers, "ok", 2);
}

/* =================================== WebSocket =================================== */
/*
 * RFC 6455, server side. civetweb parses the upgrade request; we check it, answer 101,
 * take the socket from civetweb and hand it to the wire thread. From then on the wire
 * thread alone reads and writes it, so everything in struct wsconn below the `s` pointer
 * is the wire thread's own and needs no lock.
 *
 * Reading: frames are parsed as bytes arrive; a frame's declared length is checked against
 * maxPayload before any of it is buffered (over it: close 1009), and only the bytes of an
 * unfinished frame are kept. Text must be UTF-8 (1007); client frames must be masked, and
 * RSV bits, unknown opcodes and broken fragmentation are protocol errors (1002).
 *
 * Writing: packets move from the session's queue to the socket's small `out` array, and
 * go out as frames built around the shared blobs -- header and payload in one sendmsg,
 * many frames at a time. A socket that cannot take more is left for EPOLLOUT; its
 * session's queue meanwhile grows, up to the limit at which the session is dropped.
 * Control frames (pong, close, the 3probe answer) go in `ctl`, between whole frames.
 */
enum { WS_BATCH = 64, WS_CTL_MAX = 512, WS_CLOSE_FRAME = 4 /* header and a code */ };
enum ws_state { WS_FREE, WS_PROBING, WS_OPEN, WS_CLOSING, WS_DEAD };

struct wsconn {
	enum ws_state state;
	int index;
	uint32_t gen;
	int fd;
	bool lib_worker;  /* a civetweb worker holds the connection until we are done */
	struct session *s; /* the session it carries or probes; guarded by room_lock */

	int eio;           /* protocol revision of its session */
	size_t max_payload;
	int peer;          /* its address's slot in peers[], -1 if not counted */
	int64_t deadline;  /* probing: upgrade by then; closing: give up on the peer then */
	bool timed;        /* on the wire's list of sockets with deadlines */
	struct bucket inbound; /* what it may send (see the inbound budget) */
	bool paused;       /* in inbound debt: not read until resume_at */
	int64_t resume_at;
	struct wsconn *next_timed;
	struct wsconn *next_dead; /* destroyed this round; its slot is freed at its end */

	/* reading */
	unsigned char *rbuf; /* an unfinished frame */
	size_t rlen, rcap;
	bool early;          /* rbuf holds bytes that came right behind the upgrade request */
	struct buf msg;      /* a fragmented message being assembled */
	int msg_opcode;      /* 0: none in progress */

	/* writing */
	struct packet out[WS_BATCH]; /* taken from the session queue, in order */
	int nout;
	size_t out_off; /* bytes of out[0]'s frame already written */
	size_t out_done; /* cost of packets written since the session was last told */
	unsigned char ctl[WS_CTL_MAX];
	size_t ctl_len, ctl_off;
	bool blocked;   /* the kernel buffer is full; EPOLLOUT is armed */
	bool shut;      /* closing: our close frame is out, FIN sent */
};

static struct wsconn wsconns[MAX_WEBSOCKETS];
static int ws_free[MAX_WEBSOCKETS], ws_nfree, ws_high, ws_in_use; /* guarded by room_lock */
static pthread_cond_t ws_released = PTHREAD_COND_INITIALIZER;
static struct wsconn *ws_timed; /* sockets with deadlines; guarded by room_lock */
static struct wsconn *ws_dead;  /* destroyed this round; wire thread only */

/* A free wsconn, or NULL. Slots are handed out like session slots. room_lock held. */
static struct wsconn *ws_alloc(void)
{
	int index;
	if (ws_nfree > 0)
		index = ws_free[--ws_nfree];
	else if (ws_high < MAX_WEBSOCKETS)
		index = ws_high++;
	else
		return NULL;
	struct wsconn *ws = &wsconns[index];
	uint32_t gen = ws->gen + 1;
	memset(ws, 0, sizeof *ws);
	ws->index = index;
	ws->gen = gen;
	ws->fd = -1;
	ws->peer = -1;
	ws->state = WS_PROBING; /* reserved; the caller says what it becomes */
	ws_in_use++;
	return ws;
}

static void ws_release_slot(struct wsconn *ws)
{
	ws->state = WS_FREE;
	ws_free[ws_nfree++] = ws->index;
	ws_in_use--;
}

static size_t ws_frame_header(unsigned char *h, int opcode, size_t len)
{
	h[0] = (unsigned char)(0x80 | opcode);
	if (len < 126) {
		h[1] = (unsigned char)len;
		return 2;
	}
	if (len < 65536) {
		h[1] = 126;
		h[2] = (unsigned char)(len >> 8);
		h[3] = (unsigned char)len;
		return 4;
	}
	h[1] = 127;
	for (int i = 0; i < 8; i++)
		h[2 + i] = (unsigned char)((uint64_t)len >> (56 - 8 * i));
	return 10;
}

/* Queues a control frame, or a small text frame like 3probe. Dropped if ctl is full: only
 * a client that floods pings without reading can make that happen. The last bytes are
 * kept for our close frame, so that one always fits. Wire thread. */
static void ws_control(struct wsconn *ws, int opcode, const void *payload, size_t len)
{
	size_t room = opcode == 0x8 ? WS_CTL_MAX : WS_CTL_MAX - WS_CLOSE_FRAME;
	if (ws->ctl_len + 2 + len > room)
		return;
	ws->ctl_len += ws_frame_header(ws->ctl + ws->ctl_len, opcode, len);
	memcpy(ws->ctl + ws->ctl_len, payload, len);
	ws->ctl_len += len;
}

/* Puts a socket on the list the wire thread looks at for deadlines and pauses; the wire
 * thread, maybe asleep, must recompute its wait. room_lock held. */
static void ws_timed_add(struct wsconn *ws)
{
	if (!ws->timed) {
		ws->timed = true;
		ws->next_timed = ws_timed;
		ws_timed = ws;
	}
	wire_wake();
}

static void ws_set_deadline(struct wsconn *ws, int64_t at)
{
	ws->deadline = at;
	ws_timed_add(ws);
}

/* Tells epoll what the socket waits for: input unless it is paused, room to write while
 * it is blocked. Wire thread. */
static void ws_watch(struct wsconn *ws)
{
	uint32_t events = EPOLLRDHUP | (ws->paused ? 0 : EPOLLIN) | (ws->blocked ? EPOLLOUT : 0);
	struct epoll_event ev = {.events = events, .data.u64 = epoll_tag(TAG_WS, ws->gen, ws->index)};
	epoll_ctl(wire_epfd, EPOLL_CTL_MOD, ws->fd, &ev);
}

static void ws_arm_write(struct wsconn *ws, bool on)
{
	ws->blocked = on;
	ws_watch(ws);
}

/* What one sendmsg will write: pieces of frames and of ctl, in order, and whose they are. */
enum { PLAN_MAX = 3 * WS_BATCH + 1 };
struct send_plan {
	struct iovec iov[PLAN_MAX];
	int owner[PLAN_MAX]; /* index in out[] of each piece, -1 for ctl */
	bool last[PLAN_MAX]; /* the piece ends its frame */
	int n;
	unsigned char hdr[WS_BATCH][11];
};

static void plan_piece(struct send_plan *sp, const void *p, size_t len, int owner, bool last)
{
	sp->iov[sp->n] = (struct iovec){(void *)p, len};
	sp->owner[sp->n] = owner;
	sp->last[sp->n] = last;
	sp->n++;
}

static void plan_ctl(struct send_plan *sp, const struct wsconn *ws)
{
	if (ws->ctl_len > ws->ctl_off)
		plan_piece(sp, ws->ctl + ws->ctl_off, ws->ctl_len - ws->ctl_off, -1, false);
}

/* Frame i: header (with protocol 3's type byte for binary), then the blob, less the bytes
 * already written if it is the unfinished frame 0. */
static void plan_frame(struct send_plan *sp, const struct wsconn *ws, int i)
{
	const struct packet *p = &ws->out[i];
	bool v3bin = p->binary && ws->eio == 3;
	unsigned char *h = sp->hdr[i];
	size_t hlen = ws_frame_header(h, p->binary ? 2 : 1, p->blob->len + v3bin);
	if (v3bin)
		h[hlen++] = 4;
	size_t skip = i == 0 ? ws->out_off : 0;
	if (skip < hlen)
		plan_piece(sp, h + skip, hlen - skip, i, p->blob->len == 0);
	skip = skip > hlen ? skip - hlen : 0;
	if (p->blob->len > 0)
		plan_piece(sp, p->blob->data + skip, p->blob->len - skip, i, true);
}

/* Advances past n written bytes of the plan: finished packets are released. */
static void plan_done(struct send_plan *sp, struct wsconn *ws, size_t n)
{
	int done = 0;
	for (int k = 0; k < sp->n; k++) {
		size_t take = n < sp->iov[k].iov_len ? n : sp->iov[k].iov_len;
		n -= take;
		if (sp->owner[k] < 0) {
			ws->ctl_off += take;
		} else {
			ws->out_off += take;
			if (take == sp->iov[k].iov_len && sp->last[k]) {
				ws->out_done += packet_cost(ws->out[sp->owner[k]]);
				blob_unref(ws->out[sp->owner[k]].blob);
				ws->out_off = 0;
				done++;
			}
		}
		if (take < sp->iov[k].iov_len)
			break;
	}
	if (ws->ctl_off == ws->ctl_len)
		ws->ctl_off = ws->ctl_len = 0;
	memmove(ws->out, ws->out + done, (size_t)(ws->nout - done) * sizeof *ws->out);
	ws->nout -= done;
}

/*
 * Writes what the socket takes, up to about `budget` bytes: the unfinished frame first,
 * control frames at a frame boundary, then whole frames, several in one sendmsg. Returns
 * false if the socket is dead. Wire thread, no lock.
 */
static bool ws_send_some(struct wsconn *ws, size_t budget)
{
	size_t sent = 0;
	while (!ws->blocked && (ws->nout || ws->ctl_len) && sent < budget) {
		struct send_plan sp;
		sp.n = 0;
		int i = 0;
		if (ws->out_off > 0)
			plan_frame(&sp, ws, i++);
		plan_ctl(&sp, ws);
		for (; i < ws->nout; i++)
			plan_frame(&sp, ws, i);

		struct msghdr mh = {.msg_iov = sp.iov, .msg_iovlen = (size_t)sp.n};
		ssize_t n = sendmsg(ws->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				ws_arm_write(ws, true);
				return true;
			}
			return false;
		}
		plan_done(&sp, ws, (size_t)n);
		sent += (size_t)n;
		count_sent((size_t)n);
	}
	return true;
}

static bool ws_send(struct wsconn *ws) { return ws_send_some(ws, SIZE_MAX); }

/*
 * Lets go of a socket for good. Its slot goes back to the free list only at the end of the
 * wire thread's round (wire_bury): until then, events of this round that name it find it
 * WS_DEAD, never reused by a worker meanwhile. Wire thread.
 */
static void ws_destroy(struct wsconn *ws)
{
	epoll_ctl(wire_epfd, EPOLL_CTL_DEL, ws->fd, NULL);
	for (int i = 0; i < ws->nout; i++)
		blob_unref(ws->out[i].blob);
	ws->nout = 0;
	inbound_mem_give(ws->rcap + ws->msg.cap);
	free(ws->rbuf);
	ws->rbuf = NULL;
	ws->rcap = ws->rlen = 0;
	buf_free(&ws->msg);
	if (!ws->lib_worker)
		close(ws->fd);
	/* else the civetweb worker that waits for it closes it, as civetweb always does */
	room_lock_acquire();
	if (ws->peer >= 0) {
		peers[ws->peer].conns--;
		peer_let_go(ws->peer);
		ws->peer = -1;
	}
	if (ws->timed) {
		struct wsconn **pp = &ws_timed;
		while (*pp != ws)
			pp = &(*pp)->next_timed;
		*pp = ws->next_timed;
		ws->timed = false;
	}
	room_unlock();
	ws->state = WS_DEAD;
	ws->next_dead = ws_dead;
	ws_dead = ws;
}

/* Hands the slots of the sockets destroyed this round back. Wire thread. */
static void wire_bury(void)
{
	if (!ws_dead)
		return;
	room_lock_acquire();
	for (; ws_dead; ws_dead = ws_dead->next_dead)
		ws_release_slot(ws_dead);
	pthread_cond_broadcast(&ws_released); /* Debian's library: workers wait for their slot */
	room_unlock();
}

/* Unhooks the socket from its session: a transport that goes closes its session, a probe
 * that goes leaves it on polling. room_lock held. */
static void ws_detach(struct wsconn *ws, const char *reason)
{
	struct session *s = ws->s;
	if (!s)
		return;
	ws->s = NULL;
	if (s->ws == ws) {
		s->ws = NULL;
		session_close(s, reason);
	} else if (s->probe == ws) {
		s->probe = NULL;
		s->probed = false;
	}
	session_release(s);
}

/* The peer is gone, or broke the protocol beyond answering: close at once. Wire thread. */
static void ws_lost(struct wsconn *ws, const char *reason)
{
	room_lock_acquire();
	ws_detach(ws, reason);
	room_unlock();
	ws_destroy(ws);
}

/*
 * The closing handshake: our close frame goes out after whatever frame is half written,
 * the session (if this was its transport) closes now, and the socket lingers until the
 * peer closes too or CLOSE_LINGER_MS passes. Wire thread.
 */
static void ws_close(struct wsconn *ws, int code, const char *reason)
{
	if (ws->state == WS_CLOSING)
		return;
	room_lock_acquire();
	ws_detach(ws, reason);
	ws->state = WS_CLOSING;
	ws_set_deadline(ws, now_ms() + (stopping ? CLOSE_LINGER_MS / 2 : CLOSE_LINGER_MS));
	room_unlock();
	int keep = ws->out_off > 0 ? 1 : 0; /* finish the frame the peer has begun to read */
	for (int i = keep; i < ws->nout; i++)
		blob_unref(ws->out[i].blob);
	ws->nout = keep;
	ws->ctl_len = ws->ctl_off > 0 ? ws->ctl_len : 0; /* likewise a half-written control */
	unsigned char payload[2] = {(unsigned char)(code >> 8), (unsigned char)code};
	ws_control(ws, 0x8, payload, sizeof payload);
}

/* After a close frame is written, send FIN and wait for the peer's. Wire thread. */
static void ws_closing_progress(struct wsconn *ws)
{
	if (ws->state == WS_CLOSING && !ws->shut && ws->nout == 0 && ws->ctl_len == 0) {
		shutdown(ws->fd, SHUT_WR);
		ws->shut = true;
	}
}

/* A probe's text message: the upgrade handshake of a polling session. Wire thread. */
static void ws_probe_message(struct wsconn *ws, const char *data, size_t len)
{
	if (len == 6 && memcmp(data, "2probe", 6) == 0) {
		ws_control(ws, 0x1, "3probe", 6);
		room_lock_acquire();
		struct session *s = ws->s;
		if (s && s->state == S_OPEN) {
			s->probed = true; /* a parked GET answers noop, and the client pauses polling */
			pthread_cond_signal(s->wake);
			if (s->poll)
				session_mark_dirty(s);
		}
		room_unlock();
		return;
	}
	if (len == 1 && data[0] == '5') {
		room_lock_acquire();
		struct session *s = ws->s;
		bool ok = s && s->state == S_OPEN && s->probe == ws;
		if (ok) {
			s->probe = NULL;
			s->ws = ws;
			s->transport = WEBSOCKET;
			ws->state = WS_OPEN; /* its upgrade deadline now passes harmlessly */
			pthread_cond_signal(s->wake); /* a GET still parked answers noop */
			session_kick(s); /* what polling did not take goes out here, in order */
		}
		room_unlock();
		if (!ok)
			ws_close(ws, 1000, "transport close");
		return;
	}
	ws_close(ws, 1000, "transport close"); /* anything else ends the probe, as in Node */
}

/* A whole message from the peer. Wire thread. */
static void ws_message(struct wsconn *ws, bool text, const char *data, size_t len)
{
	if (ws->state == WS_PROBING) {
		if (text)
			ws_probe_message(ws, data, len);
		else
			ws_close(ws, 1003, "transport close");
		return;
	}
	struct session *s = ws->s; /* stable: only this thread detaches it */
	if (!s)
		return;
	bool ok;
	if (text) { /* a packet, or binary as "b" and base64 ("b4" in protocol 3), as clients
	             * without binary frames send it: socket.io-client 1.x does */
		bool open = text_packet(s, data, len, ws->eio == 3, eio_receive, &ok);
		ok = ok && open;
	} else if (ws->eio == 3) {
		unsigned char type = len > 0 ? (unsigned char)data[0] : 0xFF;
		/* only a message is binary: the data of any other packet is text */
		ok = type <= 6 && (type == 4 || utf8_valid(data + 1, len - 1)) &&
		     eio_receive(s, (char)('0' + type), data + 1, len - 1, type == 4);
	} else {
		ok = eio_receive(s, '4', data, len, true);
	}
	if (!ok) {
		room_lock_acquire();
		bool open = s->state == S_OPEN;
		room_unlock();
		ws_close(ws, open ? 1002 : 1000, "parse error");
	}
}

/* Is this a close frame body the RFC allows? */
static bool ws_close_payload_ok(const unsigned char *p, size_t len)
{
	if (len == 0)
		return true;
	if (len == 1)
		return false;
	int code = p[0] << 8 | p[1];
	/* RFC 6455 and IANA's registry: 1004-1006 and 1015 are never sent in a frame */
	bool known = (code >= 1000 && code <= 1014 && code != 1004 && code != 1005 && code != 1006) ||
	             (code >= 3000 && code <= 4999);
	return known && utf8_valid((const char *)p + 2, len - 2);
}

/* A fragment joins its message, within the memory budget. Wire thread. */
static bool ws_msg_add(struct wsconn *ws, const unsigned char *p, size_t len)
{
	size_t cap = ws->msg.cap;
	if (ws->msg.len + len > cap && !inbound_mem_room(ws->msg.len + len - cap)) {
		ws_close(ws, 1013, "server memory budget");
		return false;
	}
	buf_add(&ws->msg, p, len);
	inbound_mem_take(ws->msg.cap - cap);
	return true;
}

/* One complete, unmasked frame. It costs the inbound budget a packet. Wire thread. */
static void ws_frame(struct wsconn *ws, bool fin, int op, unsigned char *p, size_t len)
{
	inbound_take(&ws->inbound, PACKET_IN_COST);
	switch (op) {
	case 0x8: /* close: answer with the same code, then linger for the peer's FIN */
		if (!ws_close_payload_ok(p, len)) {
			ws_close(ws, 1002, "transport error");
			return;
		}
		ws_close(ws, len >= 2 ? (p[0] << 8 | p[1]) : 1000, "transport close");
		return;
	case 0x9:
		ws_control(ws, 0xA, p, len);
		return;
	case 0xA:
		return;
	case 0x1:
	case 0x2:
		if (ws->msg_opcode) {
			ws_close(ws, 1002, "transport error"); /* a new message inside a fragmented one */
			return;
		}
		if (!fin) {
			ws->msg_opcode = op;
			ws_msg_add(ws, p, len);
			return;
		}
		break;
	case 0x0:
		if (!ws->msg_opcode) {
			ws_close(ws, 1002, "transport error"); /* a continuation of nothing */
			return;
		}
		if (!ws_msg_add(ws, p, len) || !fin)
			return;
		op = ws->msg_opcode;
		p = (unsigned char *)ws->msg.p;
		len = ws->msg.len;
		break;
	}
	bool text = op == 0x1;
	if (text && !utf8_valid((const char *)p, len)) {
		ws_close(ws, 1007, "transport error");
		return;
	}
	ws_message(ws, text, (const char *)p, len);
	if (ws->msg_opcode) {
		ws->msg_opcode = 0;
		ws->msg.len = 0;
		if (ws->msg.cap > 65536) {
			inbound_mem_give(ws->msg.cap);
			buf_free(&ws->msg);
		}
	}
}

/*
 * Parses frames in p[0..n). Returns how many bytes it used; the rest is an unfinished
 * frame. Stops early once the socket is closing. Wire thread.
 */
static size_t ws_parse(struct wsconn *ws, unsigned char *p, size_t n)
{
	size_t used = 0;
	while (ws->state == WS_OPEN || ws->state == WS_PROBING) {
		unsigned char *f = p + used;
		size_t avail = n - used;
		if (avail < 2)
			break;
		bool fin = f[0] & 0x80, masked = f[1] & 0x80;
		int op = f[0] & 0x0F, len7 = f[1] & 0x7F;
		bool control = op & 0x8;
		if ((f[0] & 0x70) || !masked || (op > 0x2 && op < 0x8) || op > 0xA ||
		    (control && (!fin || len7 > 125))) {
			ws_close(ws, 1002, "transport error");
			break;
		}
		size_t hlen = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + 4;
		if (avail < hlen)
			break;
		uint64_t len = (uint64_t)len7;
		if (len7 == 126)
			len = (uint64_t)f[2] << 8 | f[3];
		else if (len7 == 127)
			for (int i = 0; i < 8; i++)
				len = (i ? len << 8 : 0) | f[2 + i];
		/* The frame plus what its message already holds, compared without adding: a
		 * declared length near 2^64 must not wrap the sum below the limit. */
		uint64_t room = (uint64_t)ws->max_payload - (op == 0 ? ws->msg.len : 0);
		if (!control && len > room) {
			ws_close(ws, 1009, "transport error"); /* before buffering any of it */
			break;
		}
		if (avail - hlen < len)
			break;
		unsigned char *mask = f + hlen - 4, *payload = f + hlen;
		for (uint64_t i = 0; i < len; i++)
			payload[i] ^= mask[i & 3];
		used += hlen + (size_t)len;
		ws_frame(ws, fin, op, payload, (size_t)len);
	}
	return used;
}

static void ws_take_input(struct wsconn *ws, unsigned char *in, size_t n);
static void ws_pause_if_in_debt(struct wsconn *ws);

/* Room in rbuf for `need` bytes, within the memory budget; if there is none the client is
 * told to come back later (close 1013). Wire thread. */
static bool ws_rbuf_reserve(struct wsconn *ws, size_t need)
{
	if (need <= ws->rcap)
		return true;
	size_t cap = need < 4096 ? 4096 : need;
	if (cap < 2 * ws->rcap)
		cap = 2 * ws->rcap;
	if (!inbound_mem_room(cap - ws->rcap)) {
		ws_close(ws, 1013, "server memory budget");
		ws->rlen = 0;
		return false;
	}
	inbound_mem_take(cap - ws->rcap);
	ws->rbuf = xrealloc(ws->rbuf, cap);
	ws->rcap = cap;
	return true;
}

/* The socket is readable. Wire thread. */
static void ws_read(struct wsconn *ws)
{
	static unsigned char scratch[1 << 16]; /* the wire thread's alone */
	ssize_t n = recv(ws->fd, scratch, sizeof scratch, MSG_DONTWAIT);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
		return;
	if (n <= 0) {
		if (ws->state == WS_CLOSING)
			ws_destroy(ws);
		else
			ws_lost(ws, n == 0 ? "transport close" : "transport error");
		return;
	}
	if (ws->state == WS_CLOSING)
		return; /* after our close frame, input is only drained */
	inbound_take(&ws->inbound, (size_t)n);
	ws_take_input(ws, scratch, (size_t)n);
	ws_pause_if_in_debt(ws);
}

/* Parses what is left of an unfinished frame followed by in[0..n), and keeps what is
 * left of a frame then. `in` is scratch space the parser may unmask in place. */
static void ws_take_input(struct wsconn *ws, unsigned char *in, size_t n)
{
	unsigned char *p = in;
	size_t len = n;
	if (ws->rlen) { /* complete the unfinished frame */
		if (!ws_rbuf_reserve(ws, ws->rlen + len))
			return;
		if (len)
			memcpy(ws->rbuf + ws->rlen, in, len);
		p = ws->rbuf;
		len += ws->rlen;
	}
	size_t used = ws_parse(ws, p, len);
	size_t rest = ws->state == WS_CLOSING || ws->state == WS_DEAD ? 0 : len - used;
	if (rest > 0 && p != ws->rbuf) {
		if (!ws_rbuf_reserve(ws, rest))
			return;
		memcpy(ws->rbuf, p + used, rest);
	} else if (rest > 0) {
		memmove(ws->rbuf, p + used, rest);
	}
	ws->rlen = rest;
	if (rest == 0 && ws->rcap > 65536) { /* give back the room a big message took */
		inbound_mem_give(ws->rcap);
		free(ws->rbuf);
		ws->rbuf = NULL;
		ws->rcap = 0;
	}
}

/* In inbound debt, the socket is not read until the budget is even again. Wire thread. */
static void ws_pause_if_in_debt(struct wsconn *ws)
{
	if (ws->paused || ws->inbound.tokens >= 0 || opt.inbound_rate == 0 ||
	    (ws->state != WS_OPEN && ws->state != WS_PROBING))
		return;
	ws->paused = true;
	ws->resume_at = bucket_even_at(&ws->inbound, (double)opt.inbound_rate);
	ws_watch(ws);
	room_lock_acquire();
	ws_timed_add(ws);
	room_unlock();
}

/* ------------------------------- the wire thread ------------------------------- */
/*
 * One epoll loop owns every WebSocket. Each round it fires due heartbeat timers, handles
 * socket events, and writes the queues that were marked dirty -- by a broadcast on any
 * thread, by a timer, by a socket that can take more. Other threads wake it through an
 * eventfd, at most once per round.
 */
static struct {
	int evfd;
	atomic_bool woken;
	pthread_t thread;
} wire;

static void wire_wake(void)
{
	if (!atomic_exchange(&wire.woken, true)) {
		uint64_t one = 1;
		ssize_t w = write(wire.evfd, &one, sizeof one);
		(void)w;
	}
}

/*
 * Writes the queues marked dirty, a batch of sessions at a time. Each session gets at most
 * ROUND_BYTES a round; one with more waiting is marked dirty again for the next round.
 * So a flood of big messages (a join storm sends each legacy member a name_list per
 * login) cannot keep the thread from reading for long: new clients are let in, and a
 * small message to someone else waits for one round, not for gigabytes.
 */
/*
 * Pacing. The kernel's cost per sendmsg is most of what a fan-out costs (see README's
 * Performance section), and a client's frames share a sendmsg only if several are waiting.
 * So when the room is loaded -- when writing its frames one round at a time would keep
 * this thread busy more than 60% of the time -- a round that wrote many frames is
 * followed by a pause of five times its length (1 to 20 ms). Frames pile up meanwhile
 * and go out several to a sendmsg: a saturated room costs a sixth of the CPU, at the
 * price of some milliseconds of latency, not of a queue that grows. The load is judged
 * from frames a second (which pacing does not change) times what a frame costs when
 * written alone (learned from rounds that were not paced), so pacing does not keep itself
 * on. A room that is not that busy never waits.
 */
enum { WIRE_BUSY_FRAMES = 64, WIRE_PAUSE_MIN_US = 1000, WIRE_PAUSE_MAX_US = 20000,
       WIRE_LOAD_WINDOW_US = 100000 };
static struct {
	int64_t last_us, last_took; /* the last round: when it began, how long it took */
	long last_frames;           /* frames it took from the queues */
	double frame_cost_us;       /* a frame's cost in rounds that were not paced */
	int64_t window_start;       /* this window of WIRE_LOAD_WINDOW_US: */
	long window_frames;         /* frames written in it */
	bool loaded;                /* the last window was loaded */
} pace;

static bool wire_flush_paced(int64_t now)
{
	if (!pace.loaded || pace.last_frames < WIRE_BUSY_FRAMES)
		return false;
	int64_t pause = 5 * pace.last_took;
	pause = pause < WIRE_PAUSE_MIN_US ? WIRE_PAUSE_MIN_US
	      : pause > WIRE_PAUSE_MAX_US ? WIRE_PAUSE_MAX_US : pause;
	return now - pace.last_us < pause;
}

/* After each round: learns what a frame costs, and whether the room is loaded. */
static void wire_load_count(int64_t now)
{
	if (!pace.loaded && pace.last_frames >= WIRE_BUSY_FRAMES) {
		double cost = (double)pace.last_took / (double)pace.last_frames;
		pace.frame_cost_us = pace.frame_cost_us > 0 ? 0.9 * pace.frame_cost_us + 0.1 * cost
		                                             : cost;
	}
	pace.window_frames += pace.last_frames;
	int64_t span = now - pace.window_start;
	if (span >= WIRE_LOAD_WINDOW_US) {
		pace.loaded = (double)pace.window_frames * pace.frame_cost_us >= 0.6 * (double)span;
		pace.window_start = now;
		pace.window_frames = 0;
	}
}

/* Returns false if the round was put off by pacing. */
static bool wire_flush(void)
{
	enum { BATCH = 256, ROUND_BYTES = 64 * 1024 };
	int64_t now = now_us();
	room_lock_acquire();
	if (!dirty_head || wire_flush_paced(now)) {
		bool idle = !dirty_head; /* read under the lock: workers push onto it */
		room_unlock();
		return idle;
	}
	pace.last_us = now;
	pace.last_frames = 0;
	struct session *todo = dirty_head; /* this round's; kicks from now on are the next's */
	dirty_head = NULL;
	room_unlock();
	while (todo) {
		struct wsconn *writers[BATCH], *closers[2 * BATCH];
		uint32_t wgen[BATCH];
		int nw = 0, nc = 0, np = 0;
#if CIVETWEB_EMBEDDED
		struct conn *polls[BATCH];
#endif
		room_lock_acquire();
		while (todo && nw < BATCH && nc < BATCH && np < BATCH) {
			struct session *s = todo;
			todo = s->next_dirty;
			s->dirty = false;
#if CIVETWEB_EMBEDDED
			/* a parked GET is answered when there is something to say: packets, a
			 * close, or that the session moved to WebSocket */
			if (s->poll && (s->state != S_OPEN || s->q.count || s->transport != POLLING ||
			                s->probed)) {
				polls[np] = s->poll;
				conn_poll_take(polls[np++]);
			}
#endif
			if (s->state != S_OPEN) {
				if (s->ws)
					closers[nc++] = s->ws;
				if (s->probe)
					closers[nc++] = s->probe;
			} else if (s->ws && !s->ws->blocked) {
				struct wsconn *ws = s->ws;
				while (ws->nout < WS_BATCH && s->q.count) {
					ws->out[ws->nout++] = outq_pop(&s->q);
					pace.last_frames++;
				}
				wgen[nw] = ws->gen;
				writers[nw++] = ws;
			}
			session_release(s);
		}
		room_unlock();

#if CIVETWEB_EMBEDDED
		for (int i = 0; i < np; i++)
			conn_poll_answer(polls[i]);
#endif
		for (int i = 0; i < nc; i++)
			ws_close(closers[i], stopping ? 1001 : 1000, "server close");
		for (int i = 0; i < nc; i++)
			if (!ws_send(closers[i]))
				ws_lost(closers[i], "transport error");
			else
				ws_closing_progress(closers[i]);
		for (int i = 0; i < nw; i++)
			if (!ws_send_some(writers[i], ROUND_BYTES))
				ws_lost(writers[i], "transport error");

		room_lock_acquire();
		for (int i = 0; i < nw; i++) {
			struct wsconn *ws = writers[i];
			struct session *s = ws->s;
			if (ws->gen != wgen[i] || ws->state != WS_OPEN || !s)
				continue;
			s->qbytes -= ws->out_done;
			ws->out_done = 0;
			if ((s->q.count || ws->nout || ws->ctl_len) && !ws->blocked)
				session_kick(s); /* more was waiting than one round writes */
		}
		room_unlock();
	}
	now = now_us();
	pace.last_took = now - pace.last_us;
	wire_load_count(now);
	return true;
}

/* What dropping a session would free: its backlog, and a binary packet it is sending. */
static size_t session_holds(const struct session *s) { return s->qbytes + s->pending.bytes; }

/*
 * Past --max-memory (with `extra` more to come), the clients furthest behind go first:
 * the one with the largest backlog is dropped, then the next, until what their queues
 * hold would bring us back under. (What they share with others is freed only when those
 * have sent it too: the next round looks again.) Any thread, room_lock not held.
 */
static void memory_relieve(size_t extra)
{
	size_t held = atomic_load_explicit(&mem_held, memory_order_relaxed) + extra;
	if (held <= opt.max_memory)
		return;
	size_t excess = held - opt.max_memory;
	room_lock_acquire();
	for (int k = 0; k < 64 && excess > 0; k++) {
		struct session *worst = NULL;
		for (int i = 0; i < slots_high; i++) {
			struct session *s = &sessions[i];
			if (s->state == S_OPEN && !s->doomed && session_holds(s) > 0 &&
			    (!worst || session_holds(s) > session_holds(worst)))
				worst = s;
		}
		if (!worst)
			break;
		size_t freed = session_holds(worst);
		excess -= freed < excess ? freed : excess;
		session_doom(worst, "server memory budget");
	}
	room_unlock();
}

/* A socket can take more bytes again. */
static void wire_writable(struct wsconn *ws)
{
	ws_arm_write(ws, false);
	if (ws->state == WS_CLOSING) {
		if (!ws_send(ws))
			ws_destroy(ws);
		else
			ws_closing_progress(ws);
		return;
	}
	if (!ws_send(ws)) { /* the control frames and the unfinished frame first */
		ws_lost(ws, "transport error");
		return;
	}
	room_lock_acquire();
	if (ws->s && ws->s->state == S_OPEN && ws->s->ws == ws)
		session_kick(ws->s);
	room_unlock();
}

/* Sockets past their deadline: a probe that never upgraded, a close that lingered, an
 * inbound pause that is over. Returns ms until the next deadline, or -1. */
static int wire_deadlines(int64_t now)
{
	struct wsconn *due[64], *resume[64];
	int n = 0, nr = 0, wait = -1;
	room_lock_acquire();
	for (struct wsconn **pp = &ws_timed; *pp;) {
		struct wsconn *ws = *pp;
		bool closing = ws->state == WS_PROBING || ws->state == WS_CLOSING;
		if (ws->paused && ws->resume_at <= now && nr < 64) {
			resume[nr++] = ws;
		} else if (ws->paused && (wait < 0 || ws->resume_at - now < wait)) {
			wait = (int)(ws->resume_at - now);
		}
		if (closing && ws->deadline <= now) {
			if (n < 64)
				due[n++] = ws;
		} else if (closing && (wait < 0 || ws->deadline - now < wait)) {
			wait = (int)(ws->deadline - now);
		}
		if (!closing && !ws->paused) { /* an open socket's old probe deadline no longer matters */
			ws->timed = false;
			*pp = ws->next_timed;
		} else {
			pp = &ws->next_timed;
		}
	}
	room_unlock();
	for (int i = 0; i < nr; i++) {
		resume[i]->paused = false;
		ws_watch(resume[i]);
	}
	for (int i = 0; i < n; i++) {
		if (due[i]->state == WS_PROBING)
			ws_close(due[i], 1000, "upgrade timeout");
		else
			ws_destroy(due[i]);
	}
	return n == 64 || nr == 64 ? 0 : wait;
}

/* Events for a WebSocket. */
static void wire_ws_event(uint32_t gen, int index, uint32_t events)
{
	/* A socket destroyed earlier in this round is WS_DEAD, not yet reused. */
	struct wsconn *ws = &wsconns[index];
	if (ws->state == WS_DEAD || (ws->gen & 0xFFFFFF) != gen)
		return;
	if (ws->early) {
		ws->early = false;
		ws_take_input(ws, NULL, 0);
		ws_pause_if_in_debt(ws);
		if (ws->state == WS_DEAD)
			return;
	}
	if (events & EPOLLOUT)
		wire_writable(ws);
	if (ws->state != WS_DEAD && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
		ws_read(ws);
	/* answers to what it read: pongs, 3probe, a close frame */
	if (ws->state != WS_DEAD && ws->ctl_len) {
		if (!ws_send(ws))
			ws_lost(ws, "transport error");
		else
			ws_closing_progress(ws);
	}
}

/* Anything still going out or coming in at shutdown? A request a worker has is too: it
 * reached us before we stopped, and is answered (503 from /healthz, say) before we go. */
static bool wire_busy(void)
{
	if (ws_in_use)
		return true;
#if CIVETWEB_EMBEDDED
	for (int i = 0; i < conns_high; i++)
		if (conns[i].state == C_WRITING || conns[i].state == C_LINGER ||
		    conns[i].state == C_WORKER)
			return true;
#endif
	return false;
}

static void *wire_main(void *arg)
{
	(void)arg;
	struct epoll_event ev[256];
	int64_t stop_by = 0; /* at shutdown: give up on lingering sockets then */
	for (;;) {
		room_lock_acquire();
		int64_t now = now_ms();
		struct session *due;
		while ((due = timer_due(now)))
			eio_timer_fire(due, now);
		int wait = heap_wait_ms(&session_timers, now);
		bool stop = stopping;
		bool busy = stop && wire_busy(); /* ws_in_use is room_lock's: workers release slots */
		room_unlock();
		if (stop && !stop_by) {
			stop_by = now + CLOSE_LINGER_MS;
#if CIVETWEB_EMBEDDED
			listeners_close(); /* kept-alive connections are still served, answered 503
			                    * by /healthz and closed after, until we are done */
#endif
		}
		if (stop && (!busy || now > stop_by))
			break;
#if CIVETWEB_EMBEDDED
		if (listen_paused_until && now >= listen_paused_until) {
			listen_paused_until = 0;
			listeners_watch(EPOLLIN);
		}
		conns_take_back();
		int wait_conns = conns_deadlines(now);
		if (wait_conns >= 0 && (wait < 0 || wait_conns < wait))
			wait = wait_conns;
#endif
		int wait_ws = wire_deadlines(now);
		if (wait_ws >= 0 && (wait < 0 || wait_ws < wait))
			wait = wait_ws;
		bool paced = !wire_flush();
		wire_bury();
		if (stop && (wait < 0 || wait > 50))
			wait = 50;
		if (paced && (wait < 0 || wait > 1))
			wait = 1;

		int n = epoll_wait(wire_epfd, ev, 256, wait);
		for (int i = 0; i < n; i++) {
			uint64_t tag = ev[i].data.u64;
			int kind = (int)(tag >> 56), index = (int)(uint32_t)tag;
			uint32_t gen = (uint32_t)(tag >> 32) & 0xFFFFFF;
			if (kind == TAG_WAKE) {
				uint64_t count;
				ssize_t r = read(wire.evfd, &count, sizeof count);
				(void)r;
				atomic_store(&wire.woken, false);
			} else if (kind == TAG_WS) {
				wire_ws_event(gen, index, ev[i].events);
#if CIVETWEB_EMBEDDED
			} else if (kind == TAG_HTTP) {
				conn_event(gen, index, ev[i].events);
			} else if (kind == TAG_LISTEN && index < nlisteners) {
				conns_accept(listeners[index]);
#endif
			}
		}
		wire_flush();
		wire_bury();
		memory_relieve(0);
	}
	return NULL;
}

/* ---------------------------- the opening handshake ---------------------------- */

#if !CIVETWEB_EMBEDDED
/* In make's build the socket comes from our own connection (conn_became_websocket).
 * Debian's libcivetweb hides its connection struct: find our socket among the open file
 * descriptors by the addresses civetweb reports. The worker then holds the connection
 * until the wire thread is done with it; civetweb closes it afterwards, as usual. Bytes
 * behind the request that civetweb read already are out of our reach here. */
static int take_socket(struct mg_connection *c, bool *worker_waits, struct buf *early)
{
	(void)early;
	const struct mg_request_info *ri = mg_get_request_info(c);
	*worker_waits = true;
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return -1;
	int found = -1;
	struct dirent *e;
	while (found < 0 && (e = readdir(d))) {
		int fd = atoi(e->d_name);
		struct sockaddr_storage peer, local;
		socklen_t pl = sizeof peer, ll = sizeof local;
		if (fd <= 2 || getpeername(fd, (struct sockaddr *)&peer, &pl) != 0 ||
		    getsockname(fd, (struct sockaddr *)&local, &ll) != 0)
			continue;
		char addr[INET6_ADDRSTRLEN] = "";
		int pport = 0, lport = 0;
		if (peer.ss_family == AF_INET) {
			struct sockaddr_in *p4 = (struct sockaddr_in *)&peer;
			inet_ntop(AF_INET, &p4->sin_addr, addr, sizeof addr);
			pport = ntohs(p4->sin_port);
			lport = ntohs(((struct sockaddr_in *)&local)->sin_port);
		} else if (peer.ss_family == AF_INET6) {
			struct sockaddr_in6 *p6 = (struct sockaddr_in6 *)&peer;
			inet_ntop(AF_INET6, &p6->sin6_addr, addr, sizeof addr);
			pport = ntohs(p6->sin6_port);
			lport = ntohs(((struct sockaddr_in6 *)&local)->sin6_port);
		}
		if (pport == ri->remote_port && lport == ri->server_port &&
		    strcmp(addr, ri->remote_addr) == 0)
			found = fd;
	}
	closedir(d);
	return found;
}
#endif

/* Sec-WebSocket-Accept: base64(SHA-1(key + the RFC's GUID)). */
static void ws_accept_key(const char *key, char out[29])
{
	char joined[128];
	int n = snprintf(joined, sizeof joined, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
	unsigned char digest[20];
	sha1(joined, (size_t)n, digest);
	struct buf b = {0};
	base64_encode(&b, digest, 20);
	memcpy(out, b.p, 28);
	out[28] = 0;
	buf_free(&b);
}

/* Does this request ask for a WebSocket? */
static bool is_websocket_upgrade(struct mg_connection *c)
{
	const char *upgrade = mg_get_header(c, "Upgrade");
	const char *connection = mg_get_header(c, "Connection");
	return upgrade && connection && strcasestr(upgrade, "websocket") &&
	       strcasestr(connection, "upgrade");
}

/*
 * Completes a WebSocket upgrade for an Engine.IO request the caller has checked: with
 * `sid` it probes an existing polling session, without it opens a session of its own.
 */
static int refuse_session(struct mg_connection *mc, const char *headers, const char *refusal);
static int request_peer(struct mg_connection *mc);

/* Is this a WebSocket handshake we can answer? Writes Sec-WebSocket-Accept's value. */
static bool ws_handshake_valid(struct mg_connection *mc, char accept[29])
{
	const char *key = mg_get_header(mc, "Sec-WebSocket-Key");
	const char *version = mg_get_header(mc, "Sec-WebSocket-Version");
	if (!key || strlen(key) != 24 || !version || strcmp(version, "13") != 0 ||
	    strcmp(mg_get_request_info(mc)->request_method, "GET") != 0)
		return false;
	ws_accept_key(key, accept);
	return true;
}

static void ws_101(struct buf *out, const char *accept, const char *headers)
{
	buf_printf(out, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
	                "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n",
	           accept, headers ? headers : "");
}

/* A WebSocket for a session that has one, or is getting one: the handshake completes, and
 * a close frame follows at once, as in Node. */
static int ws_upgrade_refused(struct mg_connection *mc, const char *headers)
{
	char accept[29];
	if (!ws_handshake_valid(mc, accept))
		return eio_error_reply(mc, E_REQUEST, headers);
	struct buf head = {0};
	ws_101(&head, accept, headers);
	buf_add(&head, "\x88\x00", 2); /* a close frame without a code */
	http_close_after(mc);
#if CIVETWEB_EMBEDDED
	struct conn *c = conn_of_request(mc);
	gather_text(&conn_answer(c)->out, head.p, head.len);
	c->close_after = true;
	conn_hand_back(mc, c, false);
#else
	mg_write(mc, head.p, head.len);
#endif
	buf_free(&head);
	return 101;
}

static int ws_upgrade(struct mg_connection *mc, const struct endpoint *ep, int eio,
                      const char *sid, const char *headers)
{
	char accept[29];
	if (!ws_handshake_valid(mc, accept))
		return eio_error_reply(mc, E_REQUEST, headers);

	/* A new session is opened before the 101, so that a full room is refused in HTTP;
	 * it has no transport until the socket is ready, and meanwhile nothing is written. */
	room_lock_acquire();
	const char *refusal = "server full";
	struct wsconn *ws = stopping ? NULL : ws_alloc();
	struct session *s = ws && !sid ? eio_open(ep, eio, WEBSOCKET, false, request_peer(mc), &refusal)
	                               : NULL;
	if (!ws || (!sid && !s)) {
		if (ws)
			ws_release_slot(ws);
		room_unlock();
		return refuse_session(mc, headers, refusal);
	}
	uint32_t opened_gen = s ? s->gen : 0;
	room_unlock(); /* the slot is reserved; the wire thread does not know it yet */

	struct buf head = {0};
	ws_101(&head, accept, headers);
	bool worker_waits = false;
	int fd = -1, peer = -1;
	struct buf early = {0};
#if CIVETWEB_EMBEDDED /* the 101 goes out below, once the wire thread watches the socket */
	struct conn *c = conn_of_request(mc);
	fd = c->fd;
	conn_became_websocket(mc, c, &early, &peer);
#else
	if (mg_write(mc, head.p, head.len) == (int)head.len)
		fd = take_socket(mc, &worker_waits, &early);
#endif

	room_lock_acquire();
	if (sid) {
		s = session_find(sid);
		if (s && (s->transport != POLLING || s->probe || s->eio != eio))
			s = NULL;
	} else if (s->gen != opened_gen || s->state != S_OPEN) {
		s = NULL; /* evicted meanwhile */
	}
	if (fd < 0 || stopping || !s) {
		if (!sid && s)
			session_close(s, "transport error");
		if (peer >= 0) {
			peers[peer].conns--;
			peer_let_go(peer);
		}
		ws_release_slot(ws);
		room_unlock();
#if CIVETWEB_EMBEDDED /* as the other build does: the 101, then the socket closes */
		if (fd >= 0 && send(fd, head.p, head.len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
			(void)0; /* the client is gone: nothing to tell it */
#endif
		if (fd >= 0 && !worker_waits)
			close(fd);
		buf_free(&early);
		buf_free(&head);
		http_close_after(mc);
		return 101;
	}
	int flags = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, flags | O_NONBLOCK);
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	ws->fd = fd;
	ws->peer = peer;
	ws->lib_worker = worker_waits;
	ws->s = s;
	ws->eio = eio;
	ws->max_payload = ep->max_payload;
	if (sid) {
		s->probe = ws;
		ws->state = WS_PROBING;
		ws_set_deadline(ws, now_ms() + UPGRADE_TIMEOUT_MS);
	} else {
		s->ws = ws;
		ws->state = WS_OPEN;
		session_kick(s); /* its open packet is waiting */
	}
	/* Early bytes are parsed by the wire thread before anything it reads: asking for
	 * EPOLLOUT too, on a socket that is writable, makes sure it looks at once. */
	inbound_mem_take(early.cap);
	ws->rbuf = (unsigned char *)early.p;
	ws->rlen = early.len;
	ws->rcap = early.cap;
	ws->early = early.len > 0;
	struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (ws->early ? EPOLLOUT : 0),
	                         .data.u64 = epoll_tag(TAG_WS, ws->gen, ws->index)};
	epoll_ctl(wire_epfd, EPOLL_CTL_ADD, fd, &ev);
#if CIVETWEB_EMBEDDED
	/* Only now the 101, still under room_lock, which everything the wire thread does with
	 * the client's packets and its queue needs: what the client sends once it has read
	 * the 101 ("2probe", "5") is then read before anything it sends later on another
	 * connection, as a server with one thread would read them. A GET sent right after the upgrade finds
	 * the session upgraded (400), not still polling. The head is small and the socket's
	 * buffer empty: a short write means the client is gone, and the socket is shut so
	 * that the wire thread, which owns it now, finds it closed and cleans up as usual. */
	if (send(fd, head.p, head.len, MSG_NOSIGNAL) != (ssize_t)head.len)
		shutdown(fd, SHUT_RDWR);
#endif
	buf_free(&head);
	uint32_t gen = ws->gen;
	while (worker_waits && ws->gen == gen && ws->state != WS_FREE) {
		reap_doomed();
		pthread_cond_wait(&ws_released, &room_lock); /* Debian's library: hold the line */
	}
	room_unlock();
	return 101;
}

/* =================================== Socket.IO =================================== */
/*
 * Socket.IO packets ride in Engine.IO messages:
 *
 *   <type>[<attachments>-][<namespace>,][<ack id>][<JSON>]
 *
 * with types 0 CONNECT, 1 DISCONNECT, 2 EVENT, 3 ACK, 4 CONNECT_ERROR, 5 BINARY_EVENT and
 * 6 BINARY_ACK; "/" is the namespace when none is written. A binary packet's JSON holds
 * {"_placeholder":true,"num":N} where each binary value was, and its attachments follow
 * as binary Engine.IO messages; the packet is complete when the last one has arrived.
 *
 * Engine.IO 4 clients speak Socket.IO protocol 5. Engine.IO 3 clients (socket.io-client
 * 2) speak protocol 4: they are connected to "/" without asking, the CONNECT answer
 * carries no sid, and CONNECT_ERROR carries a bare string.
 *
 * Namespaces are served by handlers registered at start-up; a session's sockets are the
 * slots of its nsp[] array, one per registered namespace. A CONNECT to a namespace nobody
 * serves is refused with CONNECT_ERROR. Anything malformed, and anything out of order (a
 * packet for a namespace not joined, a second CONNECT), closes the session, as Node does.
 */
enum { SIO_CONNECT, SIO_DISCONNECT, SIO_EVENT, SIO_ACK, SIO_CONNECT_ERROR, SIO_BINARY_EVENT,
       SIO_BINARY_ACK };

struct sio_packet {
	int type;
	int attachments;
	struct json_span nsp;  /* "/" when none is written */
	struct json_span ack;  /* the ack id's digits as sent, any number of them; n == 0: none */
	struct json_span json; /* the payload, possibly empty */
	struct json_shape shape;
	json_t *auth; /* CONNECT: the parsed payload, or NULL */
};

/* What a namespace does. Called with room_lock held. */
struct sio_handler {
	const char *name;
	/* A client asks to join: NULL lets it in, anything else is the refusal's message. */
	const char *(*admit)(struct session *s, int slot, const json_t *auth);
	/* Then, if not NULL: true if the answer must wait (the room across servers asks Redis
	 * first); the namespace gives it later with sio_admitted or sio_refused, and
	 * on_connect is not called. */
	bool (*admit_later)(struct session *s, int slot, const json_t *auth);
	/* It is in: the CONNECT answer is queued already, so anything sent now comes after. */
	void (*on_connect)(struct session *s, int slot, const json_t *auth);
	void (*on_event)(struct session *s, int slot, const struct sio_packet *p,
	                 struct blob *const *attachments);
	void (*on_disconnect)(struct session *s, int slot, const char *reason);
	/* Connection state recovery, for namespaces that offer it (may be NULL). A client
	 * that asked for it lost its transport: the handler keeps its state a while. */
	void (*on_away)(struct session *s, int slot);
	/* It came back (in session s) with the offset it got last, or NULL: can the handler
	 * give it what it missed? */
	bool (*can_restore)(struct session *old, int slot, const json_t *offset);
	/* Then s takes old's place: the CONNECT answer is queued; what it missed comes now. */
	void (*restore)(struct session *s, struct session *old, int slot, const json_t *offset);
};

static const struct sio_handler *namespaces[MAX_NAMESPACES];
static int n_namespaces;

static struct strmap pids;

static void sio_register(const struct sio_handler *h)
{
	namespaces[n_namespaces++] = h;
	if (!pids.slots)
		strmap_init(&pids, MAX_SESSIONS);
}

static struct json_span span_of(const char *s) { return (struct json_span){s, strlen(s)}; }

static bool span_is(struct json_span a, const char *s)
{
	return a.n == strlen(s) && memcmp(a.p, s, a.n) == 0;
}

static const struct json_span NO_ACK = {"", 0};

static int sio_slot(struct json_span nsp)
{
	for (int i = 0; i < n_namespaces; i++)
		if (span_is(nsp, namespaces[i]->name))
			return i;
	return -1;
}

/* Starts an outgoing packet: "4" (an Engine.IO message), the type, the attachment count,
 * the namespace unless it is "/", the ack id. The caller appends the JSON. */
static void sio_head(struct buf *b, int type, struct json_span nsp, int attachments,
                     struct json_span ack)
{
	buf_addc(b, '4');
	buf_addc(b, (char)('0' + type));
	if (type == SIO_BINARY_EVENT || type == SIO_BINARY_ACK)
		buf_printf(b, "%d-", attachments);
	if (!span_is(nsp, "/")) {
		buf_add(b, nsp.p, nsp.n);
		buf_addc(b, ',');
	}
	buf_add(b, ack.p, ack.n);
}

static struct blob *blob_from_buf(struct buf *b)
{
	struct blob *blob = blob_of(b->p ? b->p : "", b->len);
	buf_free(b);
	return blob;
}

/* Sends a whole packet: the JSON is given as text (may be empty). room_lock held. */
static void sio_send(struct session *s, int type, struct json_span nsp, struct json_span ack,
                     const char *json, size_t json_len)
{
	struct buf b = {0};
	sio_head(&b, type, nsp, 0, ack);
	buf_add(&b, json, json_len);
	struct blob *blob = blob_from_buf(&b);
	session_send(s, blob, false);
	blob_unref(blob);
}

/* Sends a packet and its binary attachments, shared blobs all. room_lock held. */
static void sio_send_blobs(struct session *s, struct blob *head, struct blob *const *att, int n)
{
	session_send(s, head, false);
	for (int i = 0; i < n; i++)
		session_send(s, att[i], true);
}

/* Reads a decimal number of at most max_digits digits at d[*i]. */
static bool read_number(const char *d, size_t n, size_t *i, int max_digits, int64_t *out)
{
	int64_t v = 0;
	int digits = 0;
	while (*i < n && d[*i] >= '0' && d[*i] <= '9') {
		if (++digits > max_digits)
			return false;
		v = v * 10 + (d[(*i)++] - '0');
	}
	*out = v;
	return digits > 0;
}

static bool is_reserved_event(struct json_span name)
{
	static const char *const reserved[] = {"connect", "connect_error", "disconnect",
	                                       "disconnecting", "newListener", "removeListener"};
	char buf[32];
	int n = json_string_text(name, buf, sizeof buf - 1);
	if (n < 0)
		return false;
	buf[n] = 0;
	for (size_t i = 0; i < sizeof reserved / sizeof *reserved; i++)
		if (strcmp(buf, reserved[i]) == 0)
			return true;
	return false;
}

static bool is_event_name(struct json_span name)
{
	if (name.p[0] == '-' || (name.p[0] >= '0' && name.p[0] <= '9'))
		return true; /* socket.io-parser takes numbers as event names too */
	return name.p[0] == '"' && !is_reserved_event(name);
}

/*
 * Parses and checks a Socket.IO packet by the rules of socket.io-parser 4, which Node's
 * server decodes with: what it accepts, we accept; what it throws on, we refuse. So a
 * packet without data is fine (an EVENT without one means nothing, and is ignored), an
 * ack id may have any number of digits (it goes back as it came), and the namespace is
 * whatever runs from "/" to the first comma.
 */
static bool sio_parse(const char *d, size_t n, struct sio_packet *p)
{
	memset(p, 0, sizeof *p);
	p->nsp = span_of("/");
	p->ack = NO_ACK;
	if (n < 1 || d[0] < '0' || d[0] > '6')
		return false;
	p->type = d[0] - '0';
	size_t i = 1;
	if (p->type == SIO_BINARY_EVENT || p->type == SIO_BINARY_ACK) {
		int64_t v;
		if (!read_number(d, n, &i, 3, &v) || v < 1 || v > MAX_ATTACHMENTS || i >= n || d[i] != '-')
			return false;
		p->attachments = (int)v;
		i++;
	}
	if (i < n && d[i] == '/') {
		size_t start = i;
		while (i < n && d[i] != ',')
			i++;
		p->nsp = (struct json_span){d + start, i - start};
		if (i < n)
			i++; /* the comma */
	}
	size_t ack_start = i;
	while (i < n && d[i] >= '0' && d[i] <= '9')
		i++;
	p->ack = (struct json_span){d + ack_start, i - ack_start};
	p->json = (struct json_span){d + i, n - i};
	if (p->json.n == 0)
		return p->type != SIO_CONNECT_ERROR;
	if (!json_check(p->json.p, p->json.n, &p->shape))
		return false;
	char kind = p->shape.kind;
	switch (p->type) {
	case SIO_CONNECT:
		return kind == '{';
	case SIO_DISCONNECT:
		return false;
	case SIO_EVENT:
	case SIO_BINARY_EVENT:
		return kind == '[' && p->shape.count >= 1 && is_event_name(p->shape.item[0]);
	case SIO_ACK:
	case SIO_BINARY_ACK:
		return kind == '[';
	default: /* CONNECT_ERROR is the server's to send: Node closes a client that sends one */
		return false;
	}
}

/* Do the placeholders of a binary packet point at attachments that exist? A receiver's
 * parser would throw on one that does not, so such a packet must never be relayed. As in
 * socket.io-parser, a placeholder is an object whose "_placeholder" is true, and its
 * "num" a number from 0 to below the attachment count; any other object is data. Unlike
 * socket.io-parser we also want "num" whole: python-socketio indexes a list with it. */
static bool placeholders_ok(const json_t *v, int attachments)
{
	if (json_is_array(v)) {
		for (size_t i = 0; i < json_array_size(v); i++)
			if (!placeholders_ok(json_array_get(v, i), attachments))
				return false;
	} else if (json_is_object(v)) {
		if (json_is_true(json_object_get(v, "_placeholder"))) {
			const json_t *num = json_object_get(v, "num");
			double k = json_is_number(num) ? json_number_value(num) : -1;
			return k >= 0 && k < attachments && k == (double)(int)k;
		}
		const char *key;
		const json_t *val;
		json_object_foreach((json_t *)v, key, val)
			if (!placeholders_ok(val, attachments))
				return false;
	}
	return true;
}

/* The session's socket id in a namespace: a fresh one in protocol 5; in protocol 4 the
 * Engine.IO sid, as Node does for "/" (elsewhere Node writes "/nsp#sid", which no client
 * of ours is ever shown). */
static void sio_make_sid(struct session *s, int slot)
{
	if (s->eio == 4)
		make_sid(s->nsp[slot].sid);
	else
		memcpy(s->nsp[slot].sid, s->sid, SID_LEN + 1);
}

/*
 * Connection state recovery (Socket.IO 5), for clients that ask for it with "recovery":
 * true in their CONNECT auth. (Node's socket.io gives it to every client, but the event
 * offsets it adds as a last argument break python-socketio 5.7's one-argument handlers,
 * and the chat contract must not break.) Such a client gets a private id, its pid, in
 * the CONNECT answer, and every room event an offset. If its transport is lost -- not an
 * explicit disconnect -- its session is detached rather than closed, and the namespace
 * keeps its place for --recovery-window seconds. A client that comes back with its pid
 * and last offset in its CONNECT auth gets its old socket id back, then what it missed;
 * socket.io-client (4.6 and later) then says socket.recovered. room_lock held throughout.
 */
/* pids: the pid of a session that may be recovered -> its slot */
static void sio_pending_clear(struct session *s);

static bool sio_recoverable(const char *reason)
{
	return reason && (strcmp(reason, "transport close") == 0 ||
	                  strcmp(reason, "transport error") == 0 || strcmp(reason, "ping timeout") == 0);
}

/* The CONNECT answer: the socket's sid, and its pid if it may be recovered. */
static void sio_connected(struct session *s, int slot, struct json_span nsp)
{
	struct sio_socket *sk = &s->nsp[slot];
	if (s->eio == 4) {
		char json[64 + 2 * SID_LEN];
		int n = s->recover ? snprintf(json, sizeof json, "{\"sid\":\"%s\",\"pid\":\"%s\"}",
		                              sk->sid, s->pid)
		                   : snprintf(json, sizeof json, "{\"sid\":\"%s\"}", sk->sid);
		sio_send(s, SIO_CONNECT, nsp, NO_ACK, json, (size_t)n);
	} else {
		sio_send(s, SIO_CONNECT, nsp, NO_ACK, "", 0);
	}
	sk->connected = true;
	session_settle(s);
}

/* A client that may come back lost its transport: keep it, detached (see session_close). */
static bool sio_on_lost(struct session *s, const char *reason)
{
	if (!s->recover || stopping || !sio_recoverable(reason))
		return false;
	s->app_at = now_ms() + (int64_t)opt.recovery_window * 1000;
	sio_pending_clear(s); /* the rest of it went with the transport */
	for (int i = 0; i < n_namespaces; i++)
		if (s->nsp[i].connected && namespaces[i]->on_away)
			namespaces[i]->on_away(s, i);
	return true;
}

/* A CONNECT with the pid of a session that may be recovered: s takes its place, if the
 * namespace can give it what it missed. Returns false to go on with a plain CONNECT. */
static bool sio_restore(struct session *s, int slot, struct json_span nsp, const json_t *auth)
{
	const json_t *pid = json_object_get(auth, "pid");
	if (s->eio != 4 || !opt.recovery_window || !namespaces[slot]->restore || !json_is_string(pid))
		return false;
	int i = strmap_get(&pids, json_string_value(pid));
	struct session *old = i >= 0 ? &sessions[i] : NULL;
	if (!old || old == s || !old->nsp[slot].connected)
		return false;
	if (old->state == S_OPEN) /* back before we saw it go: its old transport is dead */
		session_close(old, "transport close");
	if (old->state != S_DETACHED)
		return false;
	const json_t *offset = json_object_get(auth, "offset");
	if (!namespaces[slot]->can_restore(old, slot, offset)) {
		session_end(old); /* too much missed: it leaves, and comes in anew */
		return false;
	}
	s->nsp[slot] = old->nsp[slot];
	s->recover = true;
	memcpy(s->pid, old->pid, sizeof s->pid);
	strmap_put(&pids, s->pid, s->index);
	sio_connected(s, slot, nsp);
	namespaces[slot]->restore(s, old, slot, offset);
	old->nsp[slot].connected = false;
	old->recover = false;
	sio_pending_clear(old);
	session_discard(old);
	return true;
}

static void sio_refuse(struct session *s, struct json_span nsp, const char *message)
{
	struct buf b = {0};
	if (s->eio == 4)
		buf_adds(&b, "{\"message\":");
	json_put_string(&b, message);
	if (s->eio == 4)
		buf_addc(&b, '}');
	sio_send(s, SIO_CONNECT_ERROR, nsp, NO_ACK, b.p, b.len);
	buf_free(&b);
}

static bool sio_restore(struct session *s, int slot, struct json_span nsp, const json_t *auth);
static void sio_connected(struct session *s, int slot, struct json_span nsp);

/* A CONNECT. room_lock held. */
static void sio_connect(struct session *s, struct json_span nsp, const json_t *auth)
{
	const char *query = memchr(nsp.p, '?', nsp.n);
	if (s->eio == 3 && query) /* protocol 4 puts a query after the name; 5 has none */
		nsp.n = (size_t)(query - nsp.p);
	int slot = sio_slot(nsp);
	if (slot < 0) {
		sio_refuse(s, nsp, "Invalid namespace");
		return;
	}
	struct sio_socket *sk = &s->nsp[slot];
	if (sk->connected || sk->asking) {
		session_close(s, "invalid state"); /* a second CONNECT: Node closes, so do we */
		return;
	}
	if (sio_restore(s, slot, nsp, auth))
		return;
	const char *refusal = namespaces[slot]->admit(s, slot, auth);
	if (refusal) {
		sio_refuse(s, nsp, refusal);
		return;
	}
	sio_make_sid(s, slot);
	s->recover = s->eio == 4 && opt.recovery_window && namespaces[slot]->restore &&
	             json_is_true(json_object_get(auth, "recovery"));
	if (s->recover) {
		make_sid(s->pid);
		strmap_put(&pids, s->pid, s->index);
	}
	if (namespaces[slot]->admit_later && namespaces[slot]->admit_later(s, slot, auth)) {
		sk->asking = true;
		return;
	}
	sio_connected(s, slot, nsp);
	namespaces[slot]->on_connect(s, slot, auth);
}

/* A CONNECT that waited is answered: in, or refused. room_lock held. */
static void sio_admitted(struct session *s, int slot)
{
	s->nsp[slot].asking = false;
	sio_connected(s, slot, span_of(namespaces[slot]->name));
}

static void sio_refused(struct session *s, int slot, const char *why)
{
	s->nsp[slot].asking = false;
	sio_refuse(s, span_of(namespaces[slot]->name), why);
}

static void sio_leave(struct session *s, int slot, const char *reason)
{
	if (!s->nsp[slot].connected && !s->nsp[slot].asking)
		return;
	s->nsp[slot].connected = s->nsp[slot].asking = false;
	namespaces[slot]->on_disconnect(s, slot, reason);
}

/* A packet or attachment becomes part of the pending packet. */
static struct blob *sio_pending_hold(struct sio_pending *pd, const char *data, size_t len)
{
	pd->bytes += blob_size(len);
	atomic_fetch_add_explicit(&mem_inbound, blob_size(len), memory_order_relaxed);
	return blob_of(data, len);
}

static void sio_pending_clear(struct session *s)
{
	struct sio_pending *pd = &s->pending;
	atomic_fetch_sub_explicit(&mem_inbound, pd->bytes, memory_order_relaxed);
	blob_unref(pd->header);
	for (int i = 0; i < pd->received; i++)
		blob_unref(pd->att[i]);
	free(pd->att);
	memset(pd, 0, sizeof *pd);
}

/* The next thing to look at: the connect timeout, or a pending packet's. */
static void sio_rearm(struct session *s)
{
	int64_t at = s->connect_by;
	if (s->pending.expected && (!at || s->pending.until < at))
		at = s->pending.until;
	session_deadline(s, at);
}

static bool sio_in_any(const struct session *s)
{
	for (int i = 0; i < n_namespaces; i++)
		if (s->nsp[i].connected || s->nsp[i].asking)
			return true;
	return false;
}

/* A whole packet, attachments and all. room_lock held. */
static void sio_dispatch(struct session *s, struct sio_packet *p, struct blob *const *att)
{
	if (p->type == SIO_CONNECT) {
		sio_connect(s, p->nsp, p->auth);
		return;
	}
	int slot = sio_slot(p->nsp);
	if (slot < 0 || !s->nsp[slot].connected) {
		/* The protocol: "If the server does not receive a CONNECT packet first, then it
		 * MUST close the connection immediately." */
		session_close(s, "invalid state");
		return;
	}
	if (p->type == SIO_DISCONNECT)
		sio_leave(s, slot, "client namespace disconnect");
	else if ((p->type == SIO_EVENT || p->type == SIO_BINARY_EVENT) && p->shape.count > 0) {
		counted.messages++;
		namespaces[slot]->on_event(s, slot, p, att);
	}
	/* ACKs: our namespaces never ask clients for one. An EVENT without data means
	 * nothing: Node ignores it too. */
}

static void sio_fail(struct session *s, const char *reason)
{
	room_lock_acquire();
	session_close(s, reason);
	room_unlock();
}

/* An attachment of the pending binary packet. room_lock NOT held. */
static void sio_attachment(struct session *s, const char *data, size_t len)
{
	if (!inbound_mem_room(blob_size(len))) {
		sio_fail(s, "server memory budget");
		return;
	}
	room_lock_acquire();
	struct sio_pending *pd = &s->pending;
	if (s->state != S_OPEN) {
		room_unlock();
		return;
	}
	if (!pd->expected) {
		session_close(s, "parse error"); /* binary data when no packet expects it */
		room_unlock();
		return;
	}
	/* the ones kept are under queue_limit / 2, these two under max_payload each: no overflow */
	size_t total = len + pd->header->len;
	for (int i = 0; i < pd->received; i++)
		total += pd->att[i]->len;
	if (total > opt.queue_limit / 2) {
		session_close(s, "parse error"); /* could never be delivered to anyone */
		room_unlock();
		return;
	}
	pd->att[pd->received++] = sio_pending_hold(pd, data, len);
	if (pd->received == pd->expected) {
		struct sio_packet p;
		if (sio_parse(pd->header->data, pd->header->len, &p))
			sio_dispatch(s, &p, pd->att);
		sio_pending_clear(s);
	}
	room_unlock();
}

/* Engine.IO hands us a message. Parse and check here, without the lock; act under it. */
static void sio_on_message(struct session *s, const char *data, size_t len, bool binary)
{
	if (binary) {
		sio_attachment(s, data, len);
		return;
	}
	struct sio_packet p;
	if (!sio_parse(data, len, &p)) {
		sio_fail(s, "parse error");
		return;
	}
	if (p.type == SIO_CONNECT && p.json.n > 0)
		p.auth = json_parse(p.json.p, p.json.n, 0);
	if (p.attachments > 0) {
		json_t *tree = json_parse(p.json.p, p.json.n, JSON_DECODE_INT_AS_REAL);
		bool ok = tree && placeholders_ok(tree, p.attachments);
		json_decref(tree);
		if (!ok || !inbound_mem_room(blob_size(len))) {
			sio_fail(s, ok ? "server memory budget" : "parse error");
			return;
		}
	}
	room_lock_acquire();
	if (s->state != S_OPEN) {
		/* closed meanwhile */
	} else if (s->pending.expected) {
		session_close(s, "parse error"); /* text while attachments were due */
	} else if (p.attachments > 0) {
		struct sio_pending *pd = &s->pending;
		*pd = (struct sio_pending){
			.expected = p.attachments,
			.att = xmalloc((size_t)p.attachments * sizeof(struct blob *)),
			.until = now_ms() + s->ep->ping_interval + s->ep->ping_timeout,
		};
		pd->header = sio_pending_hold(pd, data, len);
		sio_rearm(s);
	} else {
		sio_dispatch(s, &p, NULL);
	}
	room_unlock();
	json_decref(p.auth);
}

/* A client must join a namespace within --connect-timeout, as in Node: one check, at
 * that moment. Engine.IO 3 clients are in "/" from the start. */
static void sio_on_open(struct session *s)
{
	s->connect_by = s->opened_at + opt.connect_timeout;
	sio_rearm(s);
	if (s->eio == 3 && sio_slot(span_of("/")) >= 0)
		sio_connect(s, span_of("/"), NULL);
}

static void sio_on_close(struct session *s)
{
	for (int i = 0; i < n_namespaces; i++)
		sio_leave(s, i, s->close_reason);
	sio_pending_clear(s);
	if (s->recover && strmap_get(&pids, s->pid) == s->index)
		strmap_del(&pids, s->pid);
	s->recover = false;
}

/* The connect timeout: a session in no namespace goes. One that joined and left after
 * it stays, as in Node. For a detached session: the recovery window is over. */
static void sio_on_deadline(struct session *s)
{
	if (s->state == S_DETACHED) {
		session_end(s);
		return;
	}
	int64_t now = now_ms();
	if (s->pending.expected && now >= s->pending.until) {
		session_doom(s, "parse error"); /* its attachments never came */
		return;
	}
	if (s->connect_by && now >= s->connect_by) {
		s->connect_by = 0;
		if (!sio_in_any(s)) {
			session_doom(s, "connect timeout");
			return;
		}
	}
	sio_rearm(s);
}

static const struct eio_app socketio_app = {
	.on_open = sio_on_open,
	.on_close = sio_on_close,
	.on_message = sio_on_message,
	.on_deadline = sio_on_deadline,
	.on_lost = sio_on_lost,
};

/* ================================= the chat room ================================= */
/*
 * The room is the namespace "/" and one event, "msg". Its contract, kept exactly:
 *
 *   join   the client gets a free nickname, and everyone, the newcomer included, gets
 *          ["msg", {"username": NAME, "action": "login", "name_list": [[NAME, SID], ...]}]
 *          with name_list in the order people joined; the newcomer's own login is the first
 *          msg it sees after its CONNECT answer.
 *   leave  for any reason: the name is freed and the others get
 *          ["msg", {"action": "logout", "username": NAME, "name_list": [...]}].
 *   talk   ["msg", DATA] from a client goes to everyone as sent, except that an object's
 *          "username" becomes the sender's nickname; acknowledged when asked.
 *
 * Every broadcast is built once and queued to every member under room_lock, so all see
 * the room's events in one order.
 */
static struct {
	int members[MAX_CLIENTS]; /* this server's members' session slots, in the order they joined */
	int count;
	int recoverable[2];       /* members that asked for recovery: [0] full, [1] delta presence */
} room;

static struct session *member(int i) { return &sessions[room.members[i]]; }

/*
 * The roster: everyone in the room, in the order they joined, as name_list shows them.
 * On one server it is room.members' names; with --redis it holds the members of every
 * server, kept as the room's events come back from Redis. Each entry owns a copy of its
 * nickname, which names.holders points at while it is held.
 */
struct roster_entry {
	char sid[SID_LEN + 1]; /* its Socket.IO id in "/" */
	char *nick;
	int session;           /* its session here, or -1 on another server */
};

static struct {
	struct roster_entry e[MAX_CLIENTS];
	int count;
} roster;

static void name_list_joined(const struct roster_entry *e);
static void name_list_left(void);

static void roster_add(const char *sid, const char *nick, int session)
{
	if (roster.count == MAX_CLIENTS) /* only servers with a larger build make it larger */
		return;
	struct roster_entry *e = &roster.e[roster.count++];
	snprintf(e->sid, sizeof e->sid, "%s", sid);
	e->nick = xstrndup(nick, strlen(nick));
	e->session = session;
	name_claim(e->nick, session);
	name_list_joined(e);
}

/* The entry of the member with this sid, or -1. From the end: who leaves first joined
 * recently, more often than not. */
static int roster_find(const char *sid)
{
	for (int i = roster.count - 1; i >= 0; i--)
		if (strcmp(roster.e[i].sid, sid) == 0)
			return i;
	return -1;
}

static void roster_remove(int i)
{
	name_release(roster.e[i].nick);
	free(roster.e[i].nick);
	memmove(&roster.e[i], &roster.e[i + 1], (size_t)(roster.count - i - 1) * sizeof roster.e[0]);
	roster.count--;
	name_list_left();
}

/*
 * History: the last --history messages, kept for newcomers as the JSON of their DATA, as
 * it was broadcast. A newcomer gets them in one extra event right after its login,
 * ["history", [DATA, ...]]; clients that know only the contract ignore an event they do
 * not listen to. Messages with binary attachments are not kept. The history is bounded in
 * bytes too, so that it always fits in a newcomer's outbound queue.
 */
static struct {
	char **items;
	size_t *lens;
	int head, count;
	size_t bytes;
} history;

/* The history event is built once and shared by every newcomer until the next message:
 * a crowd of joiners that do not read holds one copy of it, not one each. */
static struct blob *history_event;

static void history_drop_oldest(void)
{
	free(history.items[history.head]);
	history.bytes -= history.lens[history.head];
	history.head = (history.head + 1) % opt.history;
	history.count--;
}

static void history_add(const char *json, size_t len)
{
	size_t limit = opt.queue_limit / 4;
	if (opt.history == 0 || len > limit)
		return;
	if (!history.items) {
		history.items = xmalloc((size_t)opt.history * sizeof *history.items);
		history.lens = xmalloc((size_t)opt.history * sizeof *history.lens);
	}
	while (history.count == opt.history || history.bytes + len > limit)
		history_drop_oldest();
	int at = (history.head + history.count++) % opt.history;
	history.items[at] = xstrndup(json, len);
	history.lens[at] = len;
	history.bytes += len;
	blob_unref(history_event);
	history_event = NULL;
}

static void history_send(struct session *s)
{
	if (opt.history == 0)
		return;
	if (!history_event) {
		struct buf b = {0};
		sio_head(&b, SIO_EVENT, span_of("/"), 0, NO_ACK);
		buf_adds(&b, "[\"history\",[");
		for (int i = 0; i < history.count; i++) {
			int at = (history.head + i) % opt.history;
			if (i)
				buf_addc(&b, ',');
			buf_add(&b, history.items[at], history.lens[at]);
		}
		buf_adds(&b, "]]");
		history_event = blob_from_buf(&b);
	}
	session_send(s, history_event, false);
}

/*
 * [[NAME, SID], ...] for everyone in the room, serialized once and kept: a join appends
 * its entry, a leave has it rebuilt when next needed. Every login sends the whole list to
 * someone (at least the newcomer), so without this a room of N costs O(N) JSON escaping
 * per join; with it, a copy.
 */
static struct {
	struct buf json; /* without the closing ']' */
	bool valid;
} name_list;

static void name_list_put_entry(const struct roster_entry *e)
{
	buf_adds(&name_list.json, name_list.json.len > 1 ? ",[" : "[");
	json_put_string(&name_list.json, e->nick);
	buf_addc(&name_list.json, ',');
	json_put_string(&name_list.json, e->sid);
	buf_addc(&name_list.json, ']');
}

static void name_list_joined(const struct roster_entry *e)
{
	if (name_list.valid)
		name_list_put_entry(e);
}

static void name_list_left(void) { name_list.valid = false; }

static void put_name_list(struct buf *b)
{
	if (!name_list.valid) {
		name_list.json.len = 0;
		buf_addc(&name_list.json, '[');
		for (int i = 0; i < roster.count; i++)
			name_list_put_entry(&roster.e[i]);
		name_list.valid = true;
	}
	buf_add(b, name_list.json.p, name_list.json.len);
	buf_addc(b, ']');
}

/* Queues one packet (and its attachments) to everyone in the room. */
/*
 * Recovery, the chat's part (see Socket.IO for the protocol). While some member asked for
 * it, room events are numbered, and the members that asked get each one with its number
 * as a last argument, an offset, in a copy made once per event. The last RECENT_EVENTS
 * events (at most queue_limit / 2 bytes of them) are kept, as they were sent, for members
 * who come back: they get those after their offset. A member whose transport is lost
 * stays in the room, detached; nothing is queued for it meanwhile, since the recent
 * events hold what it misses. Memory: the ring's references, and its bytes when the
 * messages they share are gone from every queue: at most queue_limit / 2.
 */
enum { RECENT_EVENTS = 4096 };

struct recent_event {
	uint64_t seq;
	struct blob *form[2]; /* as sent, with the offset: [0] full name_list or a message, [1] delta */
	struct blob **att;    /* a message's attachments */
	int natt;
};

static struct {
	struct recent_event *ring;
	int head, count;
	size_t bytes;
	uint64_t seq; /* the last event's number */
} recent;

static bool recording(void) { return room.recoverable[0] + room.recoverable[1] > 0; }

static size_t recent_event_bytes(const struct recent_event *e)
{
	size_t n = (e->form[0] ? e->form[0]->len : 0) + (e->form[1] ? e->form[1]->len : 0);
	for (int i = 0; i < e->natt; i++)
		n += e->att[i]->len;
	return n;
}

static void recent_drop_oldest(void)
{
	struct recent_event *e = &recent.ring[recent.head];
	recent.bytes -= recent_event_bytes(e);
	blob_unref(e->form[0]);
	blob_unref(e->form[1]);
	for (int i = 0; i < e->natt; i++)
		blob_unref(e->att[i]);
	free(e->att);
	recent.head = (recent.head + 1) % RECENT_EVENTS;
	recent.count--;
}

static void recent_add(struct blob *full, struct blob *delta, struct blob *const *att, int natt)
{
	if (!recent.ring)
		recent.ring = xmalloc(RECENT_EVENTS * sizeof *recent.ring);
	struct recent_event e = {.seq = recent.seq, .natt = natt};
	e.form[0] = full ? blob_ref(full) : NULL;
	e.form[1] = delta ? blob_ref(delta) : NULL;
	if (natt) {
		e.att = xmalloc((size_t)natt * sizeof *e.att);
		for (int i = 0; i < natt; i++)
			e.att[i] = blob_ref(att[i]);
	}
	size_t size = recent_event_bytes(&e);
	while (recent.count && (recent.count == RECENT_EVENTS || recent.bytes + size > opt.queue_limit / 2))
		recent_drop_oldest();
	recent.ring[(recent.head + recent.count++) % RECENT_EVENTS] = e;
	recent.bytes += size;
}

/* The event's text with its offset as a last argument: [..., "SEQ"]. */
static struct blob *with_offset(const struct blob *event, uint64_t seq)
{
	/* all but the closing ']' and the white space JSON allows after it, as a client may
	 * have sent it ("42[...] \n") */
	size_t keep = event->len - 1;
	while (keep > 0 && event->data[keep] != ']')
		keep--;
	char tail[32];
	int n = snprintf(tail, sizeof tail, ",\"%llu\"]", (unsigned long long)seq);
	struct blob *b = blob_new(keep + (size_t)n);
	memcpy(b->data, event->data, keep);
	memcpy(b->data + keep, tail, (size_t)n);
	return b;
}

/* The offset a client gives, or -1 if it is not one of ours. */
static int64_t offset_of(const json_t *offset, const struct session *old)
{
	if (!offset)
		return (int64_t)old->joined_seq - 1; /* it saw nothing since it joined */
	const char *t = json_string_value(offset);
	if (!t || !*t || strspn(t, "0123456789") != strlen(t) || strlen(t) > 18)
		return -1;
	return (int64_t)strtoull(t, NULL, 10);
}

/* Can everything after the offset be given again? */
static bool chat_can_restore(struct session *old, int slot, const json_t *offset)
{
	(void)slot;
	if (opt.redis_host && old->join != JOIN_IN)
		return false; /* its login still on the way: no place in the room to take over */
	int64_t from = offset_of(offset, old);
	uint64_t oldest = recent.count ? recent.ring[recent.head].seq : recent.seq + 1;
	return from >= 0 && (uint64_t)from <= recent.seq && (uint64_t)from + 1 >= oldest;
}

/* What the member missed, after its offset, in the form it asked for. */
static void recent_replay(struct session *s, int64_t from)
{
	for (int k = 0; k < recent.count; k++) {
		const struct recent_event *e = &recent.ring[(recent.head + k) % RECENT_EVENTS];
		if (e->seq <= (uint64_t)from)
			continue;
		struct blob *form = e->form[s->delta] ? e->form[s->delta] : e->form[!s->delta];
		sio_send_blobs(s, form, e->att, e->natt);
	}
}

/* Queues one message (and its attachments) to everyone in the room. */
static void room_broadcast(struct blob *head, struct blob *const *att, int natt)
{
	struct blob *numbered = NULL;
	if (recording()) {
		numbered = with_offset(head, ++recent.seq);
		recent_add(numbered, NULL, att, natt);
	}
	for (int i = 0; i < room.count; i++) {
		struct session *m = member(i);
		if (m->state == S_OPEN)
			sio_send_blobs(m, m->recover ? numbered : head, att, natt);
	}
	blob_unref(numbered);
}

/*
 * Presence. The contract sends the whole name_list to everybody on every login and
 * logout: O(N) bytes to N people, O(N^2) for a room filling up. A client that asks for
 * deltas (CONNECT auth {"presence":"delta"}) gets the whole list only in its own login,
 * and then logins and logouts of others with username and sid instead of the list. Each
 * form is serialized at most once per event, and only if someone wants it.
 */
static struct blob *presence_full(const char *action, const char *who)
{
	struct buf b = {0};
	sio_head(&b, SIO_EVENT, span_of("/"), 0, NO_ACK);
	buf_adds(&b, "[\"msg\",{");
	if (strcmp(action, "login") == 0) {
		buf_adds(&b, "\"username\":");
		json_put_string(&b, who);
		buf_adds(&b, ",\"action\":\"login\"");
	} else {
		buf_adds(&b, "\"action\":\"logout\",\"username\":");
		json_put_string(&b, who);
	}
	buf_adds(&b, ",\"name_list\":");
	put_name_list(&b);
	buf_adds(&b, "}]");
	return blob_from_buf(&b);
}

static struct blob *presence_delta(const char *action, const char *who, const char *sid)
{
	struct buf b = {0};
	sio_head(&b, SIO_EVENT, span_of("/"), 0, NO_ACK);
	buf_printf(&b, "[\"msg\",{\"action\":\"%s\",\"username\":", action);
	json_put_string(&b, who);
	buf_adds(&b, ",\"sid\":");
	json_put_string(&b, sid);
	buf_adds(&b, "}]");
	return blob_from_buf(&b);
}

/* One presence event's forms, each built when first wanted: [delta][numbered]. */
struct presence {
	const char *action;
	const char *nick, *sid; /* who came or went */
	uint64_t seq;
	struct blob *form[2][2];
};

static struct blob *presence_form(struct presence *p, bool delta, bool numbered)
{
	struct blob **b = &p->form[delta][numbered];
	if (!*b && numbered)
		*b = with_offset(presence_form(p, delta, false), p->seq);
	else if (!*b && delta)
		*b = presence_delta(p->action, p->nick, p->sid);
	else if (!*b)
		*b = presence_full(p->action, p->nick);
	return *b;
}

/* Tells the members here that someone came or went, each in the form it asked for (a
 * newcomer's own login comes whole, name_list and all). `who`: its session, if here. */
static void room_announce(const char *action, const char *nick, const char *sid,
                          const struct session *who)
{
	bool login = strcmp(action, "login") == 0;
	struct presence p = {.action = action, .nick = nick, .sid = sid};
	if (recording())
		p.seq = ++recent.seq;
	for (int i = 0; i < room.count; i++) {
		struct session *m = member(i);
		if (m->state == S_OPEN)
			session_send(m, presence_form(&p, m->delta && !(login && m == who), m->recover), false);
	}
	if (p.seq)
		recent_add(room.recoverable[0] ? presence_form(&p, false, true) : NULL,
		           room.recoverable[1] ? presence_form(&p, true, true) : NULL, NULL, 0);
	for (int d = 0; d < 2; d++)
		for (int n = 0; n < 2; n++)
			blob_unref(p.form[d][n]);
}

/* A place in the room, if there is one, and if the client's address has not joined too
 * often this minute (--joins-per-minute: each join makes the room send a login to
 * everyone, each leave a logout). */
static const char *chat_admit(struct session *s, int slot, const json_t *auth)
{
	(void)slot, (void)auth;
	if (roster.count >= opt.max_clients)
		return "room is full";
	if (!peer_may_join(s->peer))
		return "too many joins from your address: try again in a minute";
	return NULL;
}

static void chat_join(struct session *s, int slot, const json_t *auth)
{
	const json_t *presence = json_object_get(auth, "presence");
	s->delta = json_is_string(presence) && strcmp(json_string_value(presence), "delta") == 0;
	s->nick = name_pick();
	roster_add(s->nsp[slot].sid, s->nick, s->index);
	room.members[room.count++] = s->index;
	if (s->recover)
		room.recoverable[s->delta]++;
	if (!opt.quiet)
		log_line("join  %s (sid %s)", s->nick, s->nsp[slot].sid);
	room_announce("login", s->nick, s->nsp[slot].sid, s);
	s->joined_seq = recent.seq; /* its own login's number, if the room numbers events */
	history_send(s);
}

/* Its transport is lost, and it may come back: it keeps its name and place. */
static void chat_away(struct session *s, int slot)
{
	if (!opt.quiet)
		log_line("away  %s (sid %s): %s; back within %d s?", s->nick, s->nsp[slot].sid,
		         s->close_reason ? s->close_reason : "", opt.recovery_window);
}

/* It is back, as s: s takes its name and place, and gets what it missed. */
static void chat_restore(struct session *s, struct session *old, int slot, const json_t *offset)
{
	int64_t from = offset_of(offset, old);
	s->nick = old->nick;
	old->nick = NULL;
	s->delta = old->delta;
	s->flood = old->flood;
	s->joined_seq = old->joined_seq;
	s->join = old->join; /* with Redis: in the room, so that leaving logs it out */
	old->join = JOIN_NONE;
	int r = roster_find(s->nsp[slot].sid);
	if (r >= 0)
		roster.e[r].session = s->index;
	for (int i = 0; i < room.count; i++)
		if (room.members[i] == old->index)
			room.members[i] = s->index;
	if (!opt.quiet)
		log_line("back  %s (sid %s)", s->nick, s->nsp[slot].sid);
	recent_replay(s, from);
}

static void chat_leave_redis(struct session *s, int slot, const char *reason);
static void redis_ask_msg(struct session *s, int slot, const struct blob *msg,
                          struct blob *const *att, int natt, const char *data, size_t data_len,
                          struct json_span ack);

static void chat_leave(struct session *s, int slot, const char *reason)
{
	if (opt.redis_host) {
		chat_leave_redis(s, slot, reason);
		return;
	}
	int i = 0;
	while (i < room.count && room.members[i] != s->index)
		i++;
	if (i == room.count)
		return;
	memmove(&room.members[i], &room.members[i + 1], (size_t)(room.count - i - 1) * sizeof(int));
	room.count--;
	if (s->recover)
		room.recoverable[s->delta]--;
	int r = roster_find(s->nsp[slot].sid);
	if (r >= 0)
		roster_remove(r);
	if (!opt.quiet)
		log_line("leave %s (sid %s): %s", s->nick, s->nsp[slot].sid, reason ? reason : "");
	if (!stopping) /* at shutdown everyone leaves: nobody is left to tell */
		room_announce("logout", s->nick, s->nsp[slot].sid, NULL);
	while (!recording() && recent.count) /* nobody left who could ask for them */
		recent_drop_oldest();
	free(s->nick);
	s->nick = NULL;
}

/* Flood control, as IRC servers have it: each client has a bucket of 2N tokens, refilled
 * at N a second; a message takes one; a client that sends into an empty bucket is
 * disconnected. Nobody typing is anywhere near it; a runaway script is, and it would
 * otherwise push every slower member of the room over its queue limit. */
static bool flooding(struct session *s)
{
	if (opt.flood_limit == 0)
		return false;
	double rate = opt.flood_limit, burst = 2.0 * opt.flood_limit;
	if (bucket_take(&s->flood, rate, burst, 1, now_ms()) >= 0)
		return false;
	s->flood.tokens += 1; /* a message refused costs nothing */
	return true;
}

/* ["msg", DATA, ...] from a member: relayed to all, DATA's username stamped if DATA is an
 * object. Other events are ignored, as the original server ignored them. */
static void chat_talk(struct session *s, int slot, const struct sio_packet *p,
                      struct blob *const *att)
{
	char name[8];
	if (p->shape.item[0].p[0] != '"')
		return; /* a numeric event name */
	int n = json_string_text(p->shape.item[0], name, sizeof name);
	if (n != 3 || memcmp(name, "msg", 3) != 0)
		return;
	if (flooding(s)) {
		session_doom(s, "excess flood");
		return;
	}
	struct buf b = {0};
	sio_head(&b, p->type, span_of("/"), p->attachments, NO_ACK);
	bool has_data = p->shape.count >= 2; /* ["msg"] alone has none */
	struct json_span data = p->shape.item[1];
	size_t data_at = has_data ? b.len + (size_t)(data.p - p->json.p) : 0;
	size_t data_len = data.n;
	if (has_data && data.p[0] == '{') {
		buf_add(&b, p->json.p, (size_t)(data.p - p->json.p)); /* ["msg", */
		json_stamp_username(&b, data, s->nick);
		data_len = b.len - data_at;
		const char *after = data.p + data.n;
		buf_add(&b, after, (size_t)(p->json.p + p->json.n - after)); /* ] and any extras */
	} else {
		buf_add(&b, p->json.p, p->json.n);
	}
	struct blob *msg = blob_from_buf(&b);
	bool keep = has_data && p->attachments == 0;
	if (opt.redis_host) { /* delivered, and acknowledged, when Redis has put it in order */
		redis_ask_msg(s, slot, msg, att, p->attachments, keep ? msg->data + data_at : "",
		              keep ? data_len : 0, p->ack);
		blob_unref(msg);
		return;
	}
	room_broadcast(msg, att, p->attachments);
	if (keep)
		history_add(msg->data + data_at, data_len);
	blob_unref(msg);
	if (p->ack.n > 0)
		sio_send(s, SIO_ACK, span_of(namespaces[slot]->name), p->ack, "[]", 2);
}

static bool chat_admit_later(struct session *s, int slot, const json_t *auth);

static const struct sio_handler chat_namespace = {
	.name = "/",
	.admit = chat_admit,
	.admit_later = chat_admit_later,
	.on_connect = chat_join,
	.on_event = chat_talk,
	.on_disconnect = chat_leave,
	.on_away = chat_away,
	.can_restore = chat_can_restore,
	.restore = chat_restore,
};

/* ============================ the room across servers ============================ */
/*
 * With --redis, this server is one of several that serve one room, through Redis. Redis
 * holds the room -- who is in it, in join order, under which nickname, and the last
 * messages -- and puts its events in one order: every login, logout and message is a Lua
 * script that changes the room, numbers the event (INCR) and PUBLISHes it on the room's
 * channel, in one atomic step. Every server, this one included, delivers an event to its
 * clients only when it comes back on that channel, so all clients everywhere see one
 * sequence. (Socket.IO's Redis adapters deliver locally first and publish after: people
 * on different servers can see messages in different orders.) A message is acknowledged
 * once its script has run: then it is in the room's sequence.
 *
 * One thread of ours talks to Redis, over two connections: one runs the scripts
 * (pipelined: replies come in order), the other is subscribed to the channel. Other
 * threads queue requests under room_lock and wake it; it applies replies and events under
 * room_lock, and does its I/O without it.
 *
 * Keys, under the prefix --room (default "chatroom"):
 *   ROOM:seq             the last event's number; every number is published exactly once,
 *                        so a gap means we missed something
 *   ROOM:order           sorted set: members' sids, scored by their login's number
 *   ROOM:nick            hash: sid -> nickname        ROOM:names   nickname -> sid
 *   ROOM:history         the last messages' DATA, newest first
 *   ROOM:servers         the live servers' ids
 *   ROOM:alive:ID        lives 5 s, renewed every second by server ID
 *   ROOM:members:ID      the sids of server ID's members
 *   ROOM:events          the channel: "L seq sid nick", "O seq sid", "M seq natt lens\n..."
 * A server whose alive key expired (killed, cut off) is reaped by the first server whose
 * heartbeat notices: one script takes it out of ROOM:servers and logs its members out.
 * Scripts run one at a time, so that happens once, however many servers notice.
 *
 * When Redis cannot be reached, or answers nothing for REDIS_STALL_MS, or more than
 * REDIS_BACKLOG bytes wait for it, nobody here can be in the room: our clients are
 * disconnected, so that they come back by themselves; a CONNECT waits up to
 * REDIS_JOIN_WAIT_MS for Redis, then is refused ("room unavailable"); /healthz says 503.
 * We reconnect with backoff, as a new server with a new id: the old one is reaped like
 * any dead server. Redis bounds what it buffers for a subscriber that falls behind
 * (client-output-buffer-limit pubsub, 32 MB by default) by dropping it: that, too, is a
 * lost connection here.
 */
enum {
	REDIS_ALIVE_MS = 5000,      /* a server's alive key lives this long... */
	REDIS_BEAT_MS = 1000,       /* ...and is renewed this often */
	REDIS_STALL_MS = 5000,      /* Redis answers within this, or counts as lost */
	REDIS_STEADY_MS = 10000,    /* up this long, a loss starts the backoff over */
	REDIS_JOIN_WAIT_MS = 10000, /* a CONNECT waits this long for Redis to come back */
	REDIS_BACKOFF_MAX_MS = 5000,
	REDIS_BACKLOG = 16 << 20,   /* bytes of requests waiting for Redis, at most */
	REDIS_CANDIDATES = 6,       /* nicknames a login offers; Redis takes the first free */
};

enum redis_kind { R_LOGIN, R_LOGOUT, R_MSG, R_BEAT, R_GOODBYE };

/* A request for Redis, queued by any thread, then in flight until its reply. */
struct redis_request {
	struct redis_request *next;
	enum redis_kind kind;
	char *cmd; /* as hiredis formats it */
	size_t len;
	int session; /* whose login or message (-1: nobody's) */
	uint32_t gen;
	char sid[SID_LEN + 1];
	char *ack; /* the message's ack id, if it asked for one */
	size_t ack_len;
	int64_t at;
};

static struct {
	/* guarded by room_lock */
	bool up;                     /* connected, registered, and in step with the channel */
	bool reaped;                 /* a beat found us taken for dead: our members are gone */
	struct redis_request *queue, *queue_last;
	size_t queued_bytes;
	uint64_t seq;                /* the last event applied */
	uint64_t seq_seen;           /* a number a beat saw in Redis, not applied yet... */
	int64_t seq_seen_at;         /* ...since then: the channel must bring it in time */
	/* the Redis thread's own */
	pthread_t thread;
	int evfd;
	redisContext *cmd, *sub;
	struct redis_request *flight, *flight_last;
	size_t flight_bytes;
	char id[SID_LEN + 1];        /* this server, this connection */
	char sha[5][41];             /* the scripts, loaded */
	char prefix[80];             /* "ROOM:" */
	char keys[7][96];            /* seq order nick names history servers events */
} redis;

static struct strmap newcomers; /* see the chat's side, below */

static const char *const redis_script_text[5] = {
	/* R_LOGIN. ARGV: sid, server, prefix, room size, history bytes, nickname
	 * candidates... Returns {seq, nick, history...} (the newest items that fit in the
	 * bytes), or {"full"}, {"reaped"} (this server was taken for dead), {"dup"} (the sid
	 * is in the room: an Engine.IO 3 client joining again before its logout came back),
	 * {"taken"} (every candidate is) */
	"if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {'full'} end\n"
	"if redis.call('SISMEMBER', KEYS[6], ARGV[2]) == 0 then return {'reaped'} end\n"
	"if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return {'dup'} end\n"
	"for i = 6, #ARGV do\n"
	"  local nick = ARGV[i]\n"
	"  if redis.call('HSETNX', KEYS[4], nick, ARGV[1]) == 1 then\n"
	"    local seq = redis.call('INCR', KEYS[1])\n"
	"    redis.call('ZADD', KEYS[2], seq, ARGV[1])\n"
	"    redis.call('HSET', KEYS[3], ARGV[1], nick)\n"
	"    redis.call('SADD', ARGV[3] .. 'members:' .. ARGV[2], ARGV[1])\n"
	"    redis.call('PUBLISH', KEYS[7], 'L ' .. seq .. ' ' .. ARGV[1] .. ' ' .. nick)\n"
	"    local out = {seq, nick}\n"
	"    local left = tonumber(ARGV[5])\n"
	"    for _, m in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do\n"
	"      left = left - #m\n"
	"      if left < 0 then break end\n"
	"      out[#out + 1] = m\n"
	"    end\n"
	"    return out\n"
	"  end\n"
	"end\n"
	"return {'taken'}\n",
	/* R_LOGOUT. ARGV: sid, server, prefix. Returns the event's number, or 0 if the sid
	 * was not in the room (reaped already). */
	"local nick = redis.call('HGET', KEYS[3], ARGV[1])\n"
	"if not nick then return 0 end\n"
	"redis.call('HDEL', KEYS[3], ARGV[1])\n"
	"if redis.call('HGET', KEYS[4], nick) == ARGV[1] then redis.call('HDEL', KEYS[4], nick) end\n"
	"redis.call('ZREM', KEYS[2], ARGV[1])\n"
	"redis.call('SREM', ARGV[3] .. 'members:' .. ARGV[2], ARGV[1])\n"
	"local seq = redis.call('INCR', KEYS[1])\n"
	"redis.call('PUBLISH', KEYS[7], 'O ' .. seq .. ' ' .. ARGV[1])\n"
	"return seq\n",
	/* R_MSG. ARGV: sid, "natt lens\n" and the bytes, DATA for history ('' if not kept),
	 * history length. Returns the event's number, or 0 if the sender is not in the room. */
	"if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return 0 end\n"
	"local seq = redis.call('INCR', KEYS[1])\n"
	"if ARGV[3] ~= '' then\n"
	"  redis.call('LPUSH', KEYS[5], ARGV[3])\n"
	"  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[4]) - 1)\n"
	"end\n"
	"redis.call('PUBLISH', KEYS[7], 'M ' .. seq .. ' ' .. ARGV[2])\n"
	"return seq\n",
	/* R_BEAT, and registration. ARGV: server, prefix, alive ms, register? Renews our
	 * alive key, reaps the servers whose key expired (logging their members out), and
	 * returns whether we are registered; registering, the room as it is: {seq, sid,
	 * nick, sid, nick...}. */
	"redis.call('SET', ARGV[2] .. 'alive:' .. ARGV[1], '1', 'PX', ARGV[3])\n"
	"if ARGV[4] == '1' then redis.call('SADD', KEYS[6], ARGV[1]) end\n"
	"for _, id in ipairs(redis.call('SMEMBERS', KEYS[6])) do\n"
	"  if redis.call('EXISTS', ARGV[2] .. 'alive:' .. id) == 0 then\n"
	"    redis.call('SREM', KEYS[6], id)\n"
	"    local set = ARGV[2] .. 'members:' .. id\n"
	"    for _, sid in ipairs(redis.call('SMEMBERS', set)) do\n"
	"      local nick = redis.call('HGET', KEYS[3], sid)\n"
	"      if nick then\n"
	"        redis.call('HDEL', KEYS[3], sid)\n"
	"        if redis.call('HGET', KEYS[4], nick) == sid then redis.call('HDEL', KEYS[4], nick) end\n"
	"        redis.call('ZREM', KEYS[2], sid)\n"
	"        local seq = redis.call('INCR', KEYS[1])\n"
	"        redis.call('PUBLISH', KEYS[7], 'O ' .. seq .. ' ' .. sid)\n"
	"      end\n"
	"    end\n"
	"    redis.call('DEL', set)\n"
	"  end\n"
	"end\n"
	"if ARGV[4] ~= '1' then\n"
	"  return {redis.call('SISMEMBER', KEYS[6], ARGV[1]), redis.call('GET', KEYS[1]) or '0'}\n"
	"end\n"
	"local out = {redis.call('GET', KEYS[1]) or '0'}\n"
	"for _, sid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do\n"
	"  out[#out + 1] = sid\n"
	"  out[#out + 1] = redis.call('HGET', KEYS[3], sid) or '?'\n"
	"end\n"
	"return out\n",
	/* R_GOODBYE, at shutdown. ARGV: server, prefix. Logs our members out, unregisters. */
	"redis.call('SREM', KEYS[6], ARGV[1])\n"
	"redis.call('DEL', ARGV[2] .. 'alive:' .. ARGV[1])\n"
	"local set = ARGV[2] .. 'members:' .. ARGV[1]\n"
	"for _, sid in ipairs(redis.call('SMEMBERS', set)) do\n"
	"  local nick = redis.call('HGET', KEYS[3], sid)\n"
	"  if nick then\n"
	"    redis.call('HDEL', KEYS[3], sid)\n"
	"    if redis.call('HGET', KEYS[4], nick) == sid then redis.call('HDEL', KEYS[4], nick) end\n"
	"    redis.call('ZREM', KEYS[2], sid)\n"
	"    local seq = redis.call('INCR', KEYS[1])\n"
	"    redis.call('PUBLISH', KEYS[7], 'O ' .. seq .. ' ' .. sid)\n"
	"  end\n"
	"end\n"
	"redis.call('DEL', set)\n"
	"return 1\n",
};

static void redis_wake(void)
{
	uint64_t one = 1;
	ssize_t w = write(redis.evfd, &one, sizeof one);
	(void)w;
}

static void redis_request_free(struct redis_request *r)
{
	free(r->cmd);
	free(r->ack);
	free(r);
}

/* A request to run script `kind` with these arguments (after its keys), formatted now.
 * room_lock held (or the Redis thread's own, for beats). */
static struct redis_request *redis_request_new(enum redis_kind kind, int argc, const char **argv,
                                               const size_t *lens)
{
	enum { KEYS = 7 };
	const char *all[KEYS + 3 + 16 + REDIS_CANDIDATES];
	size_t all_lens[sizeof all / sizeof *all];
	int n = 0;
	all[n] = "EVALSHA", all_lens[n++] = 7;
	all[n] = redis.sha[kind], all_lens[n++] = strlen(redis.sha[kind]);
	all[n] = "7", all_lens[n++] = 1;
	for (int i = 0; i < KEYS; i++)
		all[n] = redis.keys[i], all_lens[n++] = strlen(redis.keys[i]);
	for (int i = 0; i < argc && n < (int)(sizeof all / sizeof *all); i++)
		all[n] = argv[i], all_lens[n++] = lens ? lens[i] : strlen(argv[i]);
	struct redis_request *r = xmalloc(sizeof *r);
	memset(r, 0, sizeof *r);
	r->kind = kind;
	r->session = -1;
	r->at = now_ms();
	int len = redisFormatCommandArgv(&r->cmd, n, all, all_lens);
	if (len < 0) {
		fprintf(stderr, "chatroom: out of memory\n");
		abort();
	}
	r->len = (size_t)len;
	return r;
}

/* Queues a request for the Redis thread; if Redis is too far behind, the request is
 * dropped and Redis counts as lost. room_lock held. */
static void redis_submit(struct redis_request *r)
{
	if (!redis.up || redis.queued_bytes + r->len > REDIS_BACKLOG) {
		if (redis.up) /* the thread sees it is behind: see redis_behind */
			redis.queued_bytes = SIZE_MAX / 2;
		redis_request_free(r);
		redis_wake();
		return;
	}
	if (redis.queue_last)
		redis.queue_last->next = r;
	else
		redis.queue = r;
	redis.queue_last = r;
	redis.queued_bytes += r->len;
	redis_wake();
}

/* The nicknames a login offers, most wanted first: free ones here, which Redis may know
 * taken elsewhere. */
static int redis_candidates(char *out[REDIS_CANDIDATES])
{
	for (int i = 0; i < REDIS_CANDIDATES; i++)
		out[i] = name_pick();
	return REDIS_CANDIDATES;
}

static void redis_ask_login(struct session *s, int slot)
{
	char size[16], bytes[24], *nicks[REDIS_CANDIDATES];
	snprintf(size, sizeof size, "%d", opt.max_clients);
	snprintf(bytes, sizeof bytes, "%zu", opt.queue_limit / 4); /* as history_add keeps */
	int n = redis_candidates(nicks);
	const char *argv[5 + REDIS_CANDIDATES] = {s->nsp[slot].sid, redis.id, redis.prefix, size, bytes};
	for (int i = 0; i < n; i++)
		argv[5 + i] = nicks[i];
	struct redis_request *r = redis_request_new(R_LOGIN, 5 + n, argv, NULL);
	for (int i = 0; i < n; i++)
		free(nicks[i]);
	r->session = s->index;
	r->gen = s->gen;
	memcpy(r->sid, s->nsp[slot].sid, sizeof r->sid);
	redis_submit(r);
}

static void redis_ask_logout(const char *sid)
{
	if (!redis.up)
		return; /* gone with Redis: reaped when it is back */
	const char *argv[3] = {sid, redis.id, redis.prefix};
	redis_submit(redis_request_new(R_LOGOUT, 3, argv, NULL));
}

/* A message for the room: the Socket.IO text, its attachments, the DATA kept in history
 * (empty: not kept), and the ack it asked for. */
static void redis_ask_msg(struct session *s, int slot, const struct blob *msg,
                          struct blob *const *att, int natt, const char *data, size_t data_len,
                          struct json_span ack)
{
	struct buf event = {0};
	buf_printf(&event, "%d %zu", natt, msg->len);
	for (int i = 0; i < natt; i++)
		buf_printf(&event, " %zu", att[i]->len);
	buf_addc(&event, '\n');
	buf_add(&event, msg->data, msg->len);
	for (int i = 0; i < natt; i++)
		buf_add(&event, att[i]->data, att[i]->len);
	char keep[16];
	snprintf(keep, sizeof keep, "%d", opt.history);
	const char *argv[4] = {s->nsp[slot].sid, event.p, opt.history ? data : "", keep};
	size_t lens[4] = {strlen(argv[0]), event.len, opt.history ? data_len : 0, strlen(keep)};
	struct redis_request *r = redis_request_new(R_MSG, 4, argv, lens);
	buf_free(&event);
	r->session = s->index;
	r->gen = s->gen;
	if (ack.n > 0) {
		r->ack = xstrndup(ack.p, ack.n);
		r->ack_len = ack.n;
	}
	redis_submit(r);
}

/* ---- what comes back: replies ---- */

/* The session a reply is for, if it is still the one that asked. room_lock held. */
static struct session *redis_asker(const struct redis_request *r)
{
	if (r->session < 0)
		return NULL;
	struct session *s = &sessions[r->session];
	return s->gen == r->gen && s->state == S_OPEN ? s : NULL;
}

/* The history event of a login's reply (items newest first), at most queue_limit / 4
 * bytes of the newest, as history_add keeps them on one server. */
static struct blob *redis_history_event(const redisReply *reply)
{
	size_t limit = opt.queue_limit / 4, bytes = 0;
	size_t n = 0;
	while (2 + n < reply->elements && reply->element[2 + n]->type == REDIS_REPLY_STRING &&
	       bytes + reply->element[2 + n]->len <= limit && (int)n < opt.history)
		bytes += reply->element[2 + n++]->len;
	struct buf b = {0};
	sio_head(&b, SIO_EVENT, span_of("/"), 0, NO_ACK);
	buf_adds(&b, "[\"history\",[");
	for (size_t i = n; i-- > 0;) {
		buf_add(&b, reply->element[2 + i]->str, reply->element[2 + i]->len);
		if (i)
			buf_addc(&b, ',');
	}
	buf_adds(&b, "]]");
	return blob_from_buf(&b);
}

static long long reply_integer(const redisReply *r)
{
	if (r->type == REDIS_REPLY_INTEGER)
		return r->integer;
	if (r->type == REDIS_REPLY_STRING)
		return strtoll(r->str, NULL, 10);
	return -2;
}

static void chat_admitted(struct session *s, int slot, const char *nick, struct blob *history);
static void chat_refused(struct session *s, int slot, const char *why);
static int chat_asking_slot(const struct session *s);

/* A login's reply. The client gets its CONNECT answer now; its login comes with the
 * room's events. If it left meanwhile, its login is undone. room_lock held. */
static void redis_login_answered(struct redis_request *r, const redisReply *reply)
{
	struct session *s = redis_asker(r);
	int slot = s ? chat_asking_slot(s) : -1;
	bool ours = slot >= 0 && strcmp(s->nsp[slot].sid, r->sid) == 0;
	const redisReply *first = reply->type == REDIS_REPLY_ARRAY && reply->elements > 0
	                        ? reply->element[0] : NULL;
	const char *no = first && first->type == REDIS_REPLY_STRING ? first->str : NULL;
	if (first && first->type == REDIS_REPLY_INTEGER && reply->elements >= 2 &&
	    reply->element[1]->type == REDIS_REPLY_STRING) {
		if (ours)
			chat_admitted(s, slot, reply->element[1]->str, opt.history ? redis_history_event(reply) : NULL);
		else
			redis_ask_logout(r->sid);
	} else if (!ours) {
		/* nothing to undo */
	} else if (no && strcmp(no, "taken") == 0) {
		redis_ask_login(s, slot); /* every name offered was taken: offer others */
	} else if (no && strcmp(no, "full") == 0) {
		chat_refused(s, slot, "room is full");
	} else {
		chat_refused(s, slot, "room unavailable");
	}
}

/*
 * The subscriber connection has no replies of its own to time out: a beat reads the
 * room's number from the command connection, and the channel must bring us that far
 * within REDIS_STALL_MS, or it is as good as lost (a half-open connection, say).
 * room_lock held.
 */
static void redis_expect_seq(long long seq)
{
	if (seq > 0 && redis.seq >= redis.seq_seen) {
		redis.seq_seen = (uint64_t)seq;
		redis.seq_seen_at = now_ms();
	}
}

static bool redis_channel_late(void)
{
	return redis.seq < redis.seq_seen && now_ms() - redis.seq_seen_at > REDIS_STALL_MS;
}

/* A reply: what it answers is the oldest request in flight. room_lock held. */
static void redis_answered(struct redis_request *r, const redisReply *reply)
{
	switch (r->kind) {
	case R_LOGIN:
		redis_login_answered(r, reply);
		break;
	case R_MSG: {
		struct session *s = redis_asker(r);
		if (s && r->ack && reply_integer(reply) > 0)
			sio_send(s, SIO_ACK, span_of("/"), (struct json_span){r->ack, r->ack_len}, "[]", 2);
		break;
	}
	case R_BEAT:
		if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2) {
			if (reply_integer(reply->element[0]) == 0)
				redis.reaped = true;
			redis_expect_seq(reply_integer(reply->element[1]));
		}
		break;
	default:
		break;
	}
}

/* ---- what comes back: the room's events ---- */

static void chat_event_login(const char *sid, const char *nick);
static void chat_event_logout(const char *sid);
static void chat_event_msg(struct blob *msg, struct blob *const *att, int natt);

/* Parses "M seq natt len lens...\n" and the bytes after; false if malformed. */
static bool redis_msg_event(const char *p, size_t n)
{
	const char *end = p + n, *nl = memchr(p, '\n', n);
	if (!nl)
		return false;
	char head[512];
	size_t hl = (size_t)(nl - p);
	if (hl >= sizeof head)
		return false;
	memcpy(head, p, hl);
	head[hl] = 0;
	char *q = head, *next;
	unsigned long long seq = strtoull(q + 2, &next, 10); /* after "M " */
	(void)seq;
	long natt = strtol(next, &q, 10);
	if (natt < 0 || natt > 10)
		return false;
	size_t lens[11];
	size_t total = 0;
	for (long i = 0; i <= natt; i++) {
		unsigned long long v = strtoull(q, &next, 10);
		if (next == q || v > (size_t)(end - nl) - 1 - total)
			return false; /* each length fits in what is left: no sum can wrap */
		lens[i] = (size_t)v;
		total += lens[i];
		q = next;
	}
	const char *data = nl + 1;
	if (total != (size_t)(end - data))
		return false;
	struct blob *msg = blob_of(data, lens[0]);
	struct blob *att[10] = {0};
	data += lens[0];
	for (long i = 0; i < natt; i++) {
		att[i] = blob_of(data, lens[i + 1]);
		data += lens[i + 1];
	}
	chat_event_msg(msg, att, (int)natt);
	blob_unref(msg);
	for (long i = 0; i < natt; i++)
		blob_unref(att[i]);
	return true;
}

enum redis_event_result { EV_DONE, EV_GAP, EV_WAIT_REPLY };

static struct session *chat_joining(const char *sid);

/*
 * One event from the channel, in the room's order. A newcomer of ours whose login reply
 * has not been read yet makes us read it first (EV_WAIT_REPLY): its CONNECT answer must
 * come before its login. room_lock held.
 */
static enum redis_event_result redis_event(const char *p, size_t n)
{
	if (n < 4 || p[1] != ' ')
		return EV_GAP;
	unsigned long long seq = strtoull(p + 2, NULL, 10);
	if (seq <= redis.seq)
		return EV_DONE; /* in the snapshot we started from */
	if (seq != redis.seq + 1)
		return EV_GAP;
	const char *sp = memchr(p + 2, ' ', n - 2);
	const char *sid = sp ? sp + 1 : NULL;
	size_t rest = sid ? n - (size_t)(sid - p) : 0;
	char who[SID_LEN + 1];
	if (p[0] == 'L' || p[0] == 'O') {
		if (!sid)
			return EV_GAP;
		const char *sid_end = p[0] == 'L' ? memchr(sid, ' ', rest) : sid + rest;
		if (!sid_end || sid_end - sid != SID_LEN)
			return EV_GAP;
		memcpy(who, sid, SID_LEN);
		who[SID_LEN] = 0;
		if (p[0] == 'L') {
			struct session *s = chat_joining(who);
			if (s && s->join == JOIN_ASKED)
				return EV_WAIT_REPLY;
			char *nick = xstrndup(sid_end + 1, (size_t)(p + n - sid_end - 1));
			chat_event_login(who, nick);
			free(nick);
		} else {
			chat_event_logout(who);
		}
	} else if (p[0] == 'M') {
		if (!redis_msg_event(p, n))
			return EV_GAP;
	} else {
		return EV_GAP;
	}
	redis.seq = seq;
	return EV_DONE;
}

/* ---- the connections ---- */

static void redis_close(void)
{
	if (redis.cmd)
		redisFree(redis.cmd);
	if (redis.sub)
		redisFree(redis.sub);
	redis.cmd = redis.sub = NULL;
}

/* Why Redis is not usable, logged once each time the reason changes (a Redis that
 * stays away does not fill the log). The Redis thread's own. */
static char redis_last_trouble[160];

static void redis_trouble(const char *what, const char *detail)
{
	char line[sizeof redis_last_trouble];
	snprintf(line, sizeof line, "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
	if (strcmp(line, redis_last_trouble) == 0)
		return;
	memcpy(redis_last_trouble, line, sizeof line);
	log_line("redis %s:%d: %s", opt.redis_host, opt.redis_port, line);
}

/* The text of a failed reply, or of no reply at all. */
static const char *redis_reply_text(const redisContext *c, const redisReply *r)
{
	if (!r)
		return c->errstr[0] ? c->errstr : "no reply";
	return r->type == REDIS_REPLY_ERROR && r->str ? r->str : "unexpected reply";
}

static redisContext *redis_connect_one(void)
{
	struct timeval tv = {2, 0};
	redisContext *c = redisConnectWithTimeout(opt.redis_host, opt.redis_port, tv);
	if (!c || c->err) {
		redis_trouble("cannot connect", c ? c->errstr : "out of memory");
		if (c)
			redisFree(c);
		return NULL;
	}
	redisSetTimeout(c, tv);
	redisEnableKeepAlive(c); /* a peer gone without a word is noticed, even when idle */
	if (opt.redis_db) {
		redisReply *r = redisCommand(c, "SELECT %d", opt.redis_db);
		bool ok = r && r->type == REDIS_REPLY_STATUS;
		if (!ok)
			redis_trouble("SELECT failed", redis_reply_text(c, r));
		if (r)
			freeReplyObject(r);
		if (!ok) {
			redisFree(c);
			return NULL;
		}
	}
	return c;
}

/* From now on the Redis thread reads and writes without waiting. */
static void redis_nonblocking(redisContext *c)
{
	fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
	c->flags &= ~REDIS_BLOCK;
}

static void chat_room_reset(const redisReply *snapshot);

/*
 * Connects, subscribes, loads the scripts, and registers as a new server, taking the
 * room as it is then; events after it come on the channel. Returns false if Redis is not
 * there (or not a Redis that runs scripts).
 */
static bool redis_connect(void)
{
	redis.sub = redis_connect_one();
	redis.cmd = redis.sub ? redis_connect_one() : NULL;
	if (!redis.cmd)
		goto fail;
	redisReply *r = redisCommand(redis.sub, "SUBSCRIBE %s", redis.keys[6]);
	bool ok = r && r->type == REDIS_REPLY_ARRAY;
	if (!ok)
		redis_trouble("SUBSCRIBE failed", redis_reply_text(redis.sub, r));
	if (r)
		freeReplyObject(r);
	/* the scripts and our new name are read by other threads under room_lock (building
	 * requests): made here, published below under it */
	char sha[5][41], id[SID_LEN + 1];
	for (int i = 0; ok && i < 5; i++) {
		r = redisCommand(redis.cmd, "SCRIPT LOAD %s", redis_script_text[i]);
		ok = r && r->type == REDIS_REPLY_STRING && r->len == 40;
		if (ok)
			memcpy(sha[i], r->str, 41);
		else
			redis_trouble("SCRIPT LOAD failed", redis_reply_text(redis.cmd, r));
		if (r)
			freeReplyObject(r);
	}
	if (!ok)
		goto fail;
	make_sid(id);
	char alive[16];
	snprintf(alive, sizeof alive, "%d", REDIS_ALIVE_MS);
	r = redisCommand(redis.cmd, "EVALSHA %s 7 %s %s %s %s %s %s %s %s %s %s 1", sha[R_BEAT],
	                 redis.keys[0], redis.keys[1], redis.keys[2], redis.keys[3], redis.keys[4],
	                 redis.keys[5], redis.keys[6], id, redis.prefix, alive);
	ok = r && r->type == REDIS_REPLY_ARRAY && r->elements % 2 == 1;
	if (!ok)
		redis_trouble("registering failed", redis_reply_text(redis.cmd, r));
	if (ok) {
		redis_nonblocking(redis.cmd);
		redis_nonblocking(redis.sub);
		room_lock_acquire();
		memcpy(redis.sha, sha, sizeof sha);
		memcpy(redis.id, id, sizeof id);
		chat_room_reset(r);
		redis.up = true;
		room_unlock();
		redis_last_trouble[0] = 0;
		log_line("redis %s:%d: in the room \"%s\" as server %s", opt.redis_host, opt.redis_port,
		         opt.room, redis.id);
	}
	if (r)
		freeReplyObject(r);
	if (ok)
		return true;
fail:
	redis_close();
	return false;
}

static void redis_flight_add(struct redis_request *r)
{
	r->next = NULL;
	if (redis.flight_last)
		redis.flight_last->next = r;
	else
		redis.flight = r;
	redis.flight_last = r;
	redis.flight_bytes += r->len;
}

static struct redis_request *redis_flight_pop(void)
{
	struct redis_request *r = redis.flight;
	if (r) {
		redis.flight = r->next;
		if (!redis.flight)
			redis.flight_last = NULL;
		redis.flight_bytes -= r->len;
	}
	return r;
}

/* Hands what was queued to hiredis, in order. False if Redis is too far behind. */
static bool redis_take_queue(void)
{
	room_lock_acquire();
	struct redis_request *r = redis.queue;
	bool behind = redis.queued_bytes > REDIS_BACKLOG;
	redis.queue = redis.queue_last = NULL;
	redis.queued_bytes = 0;
	room_unlock();
	while (r) {
		struct redis_request *next = r->next;
		if (!behind && redisAppendFormattedCommand(redis.cmd, r->cmd, r->len) == REDIS_OK) {
			redis_flight_add(r);
		} else {
			behind = true;
			redis_request_free(r);
		}
		r = next;
	}
	return !behind && redis.flight_bytes <= REDIS_BACKLOG;
}

/* Applies the replies hiredis has read. False on an error reply from a script (a
 * Redis that lost our scripts, say). */
static bool redis_read_replies(void)
{
	void *reply;
	while (redisReaderGetReply(redis.cmd->reader, &reply) == REDIS_OK && reply) {
		struct redis_request *r = redis_flight_pop();
		bool error = ((redisReply *)reply)->type == REDIS_REPLY_ERROR;
		if (error) /* NOSCRIPT, OOM, READONLY...: connecting again settles what it can */
			redis_trouble("error reply", ((redisReply *)reply)->str);
		if (r && !error) {
			room_lock_acquire();
			redis_answered(r, reply);
			room_unlock();
		}
		if (r)
			redis_request_free(r);
		freeReplyObject(reply);
		if (error || !r)
			return false;
	}
	return true;
}

/* Waits for the next replies (a newcomer's login reply, which is on its way). */
static bool redis_wait_replies(void)
{
	struct pollfd pfd = {.fd = redis.cmd->fd, .events = POLLIN};
	if (poll(&pfd, 1, REDIS_STALL_MS) <= 0)
		return false;
	return redisBufferRead(redis.cmd) == REDIS_OK && redis_read_replies();
}

/* Applies the events hiredis has read. False if the channel skipped one. */
static bool redis_read_events(void)
{
	void *reply;
	while (redisReaderGetReply(redis.sub->reader, &reply) == REDIS_OK && reply) {
		redisReply *m = reply;
		bool ok = true;
		if (m->type == REDIS_REPLY_ARRAY && m->elements == 3 &&
		    m->element[0]->type == REDIS_REPLY_STRING && strcmp(m->element[0]->str, "message") == 0 &&
		    m->element[2]->type == REDIS_REPLY_STRING) {
			for (;;) {
				room_lock_acquire();
				enum redis_event_result e = redis_event(m->element[2]->str, m->element[2]->len);
				room_unlock();
				if (e == EV_WAIT_REPLY && redis_wait_replies())
					continue;
				ok = e == EV_DONE;
				break;
			}
		}
		freeReplyObject(reply);
		if (!ok)
			return false;
	}
	return true;
}

static void redis_beat(void)
{
	char alive[16];
	snprintf(alive, sizeof alive, "%d", REDIS_ALIVE_MS);
	const char *argv[4] = {redis.id, redis.prefix, alive, "0"};
	struct redis_request *r = redis_request_new(R_BEAT, 4, argv, NULL);
	if (redisAppendFormattedCommand(redis.cmd, r->cmd, r->len) == REDIS_OK)
		redis_flight_add(r);
	else
		redis_request_free(r);
}

/* Serves the room while Redis is there; returns when it is not (or we stop). */
static void redis_serve(void)
{
	int64_t next_beat = now_ms() + REDIS_BEAT_MS;
	while (!stopping) {
		int64_t now = now_ms();
		if (now >= next_beat) {
			redis_beat();
			next_beat = now + REDIS_BEAT_MS;
		}
		if (!redis_take_queue())
			return; /* too far behind */
		if (redis.flight && now - redis.flight->at > REDIS_STALL_MS)
			return; /* no answer */
		int done = 0;
		if (redis.cmd->obuf && sdslen(redis.cmd->obuf) > 0 &&
		    redisBufferWrite(redis.cmd, &done) != REDIS_OK)
			return;
		struct pollfd pfd[3] = {
			{.fd = redis.cmd->fd, .events = POLLIN | (sdslen(redis.cmd->obuf) ? POLLOUT : 0)},
			{.fd = redis.sub->fd, .events = POLLIN},
			{.fd = redis.evfd, .events = POLLIN},
		};
		int wait = (int)(next_beat - now);
		if (poll(pfd, 3, wait < 0 ? 0 : wait) < 0 && errno != EINTR)
			return;
		if (pfd[2].revents & POLLIN) {
			uint64_t count;
			ssize_t rd = read(redis.evfd, &count, sizeof count);
			(void)rd;
		}
		if ((pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) &&
		    (redisBufferRead(redis.cmd) != REDIS_OK || !redis_read_replies()))
			return;
		if ((pfd[1].revents & (POLLIN | POLLHUP | POLLERR)) &&
		    (redisBufferRead(redis.sub) != REDIS_OK || !redis_read_events()))
			return;
		room_lock_acquire();
		bool reaped = redis.reaped, late = redis_channel_late();
		room_unlock();
		if (reaped) /* we were taken for dead: our members are out of the room */
			return;
		if (late)
			return; /* the channel brings nothing */
	}
}

static void chat_room_lost(void);
static void chat_waiting_admit(bool up);

/* Redis is gone (or we stop): our members leave with it; requests in flight are lost
 * (nobody was told they succeeded). */
static void redis_lost(void)
{
	room_lock_acquire();
	bool was_up = redis.up;
	redis.up = false;
	redis.reaped = false;
	redis.seq_seen = 0;
	while (redis.queue) {
		struct redis_request *r = redis.queue;
		redis.queue = r->next;
		redis_request_free(r);
	}
	redis.queue_last = NULL;
	redis.queued_bytes = 0;
	if (was_up)
		chat_room_lost();
	room_unlock();
	struct redis_request *r;
	while ((r = redis_flight_pop()))
		redis_request_free(r);
	redis_close();
	if (was_up && !stopping)
		log_line("redis %s:%d: lost; our clients are disconnected until it is back",
		         opt.redis_host, opt.redis_port);
}

/* At shutdown, if Redis is there: our members leave the room at once, for everyone. */
static void redis_goodbye(void)
{
	if (!redis.cmd)
		return;
	redisContext *c = redis_connect_one(); /* the pipelined one may be full of requests */
	if (!c)
		return;
	redisReply *r = redisCommand(c, "EVALSHA %s 7 %s %s %s %s %s %s %s %s %s", redis.sha[R_GOODBYE],
	                             redis.keys[0], redis.keys[1], redis.keys[2], redis.keys[3],
	                             redis.keys[4], redis.keys[5], redis.keys[6], redis.id, redis.prefix);
	if (r)
		freeReplyObject(r);
	redisFree(c);
}

static void *redis_main(void *arg)
{
	(void)arg;
	int64_t backoff = 100;
	while (!stopping) {
		if (redis_connect()) {
			int64_t since = now_ms();
			room_lock_acquire();
			chat_waiting_admit(true);
			room_unlock();
			redis_serve();
			if (stopping)
				redis_goodbye();
			redis_lost();
			if (now_ms() - since > REDIS_STEADY_MS) {
				backoff = 100;
				continue;
			}
			/* up only a moment: a Redis that fails again at once is not hammered */
		}
		/* until the next try, CONNECTs that waited too long for Redis are refused */
		for (int64_t until = now_ms() + backoff; !stopping && now_ms() < until;) {
			room_lock_acquire();
			chat_waiting_admit(false);
			room_unlock();
			int64_t left = until - now_ms();
			struct pollfd pfd = {.fd = redis.evfd, .events = POLLIN};
			poll(&pfd, 1, left > 200 ? 200 : left < 0 ? 0 : (int)left);
			if (pfd.revents & POLLIN) {
				uint64_t count;
				ssize_t rd = read(redis.evfd, &count, sizeof count);
				(void)rd;
			}
		}
		backoff = backoff * 2 > REDIS_BACKOFF_MAX_MS ? REDIS_BACKOFF_MAX_MS : backoff * 2;
	}
	return NULL;
}

static void redis_start(void)
{
	if (!opt.redis_host)
		return;
	strmap_init(&newcomers, MAX_SESSIONS);
	snprintf(redis.prefix, sizeof redis.prefix, "%s:", opt.room);
	static const char *const names[7] = {"seq", "order", "nick", "names", "history", "servers",
	                                     "events"};
	for (int i = 0; i < 7; i++)
		snprintf(redis.keys[i], sizeof redis.keys[i], "%s%s", redis.prefix, names[i]);
	redis.evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (redis.evfd < 0 || pthread_create(&redis.thread, NULL, redis_main, NULL) != 0) {
		fprintf(stderr, "chatroom: cannot start the Redis thread: %s\n", strerror(errno));
		exit(1);
	}
}

/* After stopping is set: the thread says goodbye to the room (if Redis is there) and ends. */
static void redis_stop(void)
{
	if (!opt.redis_host)
		return;
	redis_wake();
	pthread_join(redis.thread, NULL);
}

/* ---- the chat's side ---- */
/*
 * With --redis a CONNECT to the room is answered when Redis has taken the login (the
 * nickname is unique in the whole room then); the login itself, and every logout and
 * message, is delivered here when it comes back from Redis. `newcomers` maps the sids of
 * our CONNECTs that Redis is working on to their sessions. room_lock held throughout.
 */

static bool redis_is_up(void) { return redis.up; }

static void chat_ask(struct session *s, int slot)
{
	s->join = JOIN_ASKED;
	redis_ask_login(s, slot);
}

static bool chat_admit_later(struct session *s, int slot, const json_t *auth)
{
	if (!opt.redis_host)
		return false;
	const json_t *presence = json_object_get(auth, "presence");
	s->delta = json_is_string(presence) && strcmp(json_string_value(presence), "delta") == 0;
	s->join = JOIN_WAITING;
	s->asked_at = now_ms();
	strmap_put(&newcomers, s->nsp[slot].sid, s->index);
	if (redis.up)
		chat_ask(s, slot);
	return true;
}

static int chat_asking_slot(const struct session *s)
{
	int slot = sio_slot(span_of("/"));
	return slot >= 0 && s->nsp[slot].asking ? slot : -1;
}

static struct session *chat_joining(const char *sid)
{
	int i = strmap_get(&newcomers, sid);
	return i >= 0 ? &sessions[i] : NULL;
}

static void chat_admitted(struct session *s, int slot, const char *nick, struct blob *history)
{
	s->nick = xstrndup(nick, strlen(nick));
	s->history_ready = history;
	s->join = JOIN_ANSWERED;
	sio_admitted(s, slot);
}

static void chat_refused(struct session *s, int slot, const char *why)
{
	strmap_del(&newcomers, s->nsp[slot].sid);
	s->join = JOIN_NONE;
	sio_refused(s, slot, why);
}

/* CONNECTs that wait for Redis: asked for when it is back, refused when they waited too
 * long. */
static void chat_waiting_admit(bool up)
{
	int64_t now = now_ms();
	for (int i = 0; i < slots_high; i++) {
		struct session *s = &sessions[i];
		int slot = s->state == S_OPEN && s->join == JOIN_WAITING ? chat_asking_slot(s) : -1;
		if (slot < 0)
			continue;
		if (up)
			chat_ask(s, slot);
		else if (now - s->asked_at > REDIS_JOIN_WAIT_MS)
			chat_refused(s, slot, "room unavailable");
	}
}

/* Someone joined, here or on another server. */
static void chat_event_login(const char *sid, const char *nick)
{
	struct session *s = chat_joining(sid);
	if (s && (s->state != S_OPEN || s->join != JOIN_ANSWERED))
		s = NULL;
	roster_add(sid, nick, s ? s->index : -1);
	if (s) {
		strmap_del(&newcomers, sid);
		s->join = JOIN_IN;
		room.members[room.count++] = s->index;
		if (s->recover)
			room.recoverable[s->delta]++;
		if (!opt.quiet)
			log_line("join  %s (sid %s)", nick, sid);
	}
	room_announce("login", nick, sid, s);
	if (s) {
		s->joined_seq = recent.seq;
		if (s->history_ready)
			session_send(s, s->history_ready, false);
		blob_unref(s->history_ready);
		s->history_ready = NULL;
	}
}

/* A member of ours is out of the room without having asked (its server, this one, was
 * taken for dead, or Redis went away): its client is disconnected, to come back. */
static void chat_cut(struct session *s, const char *why)
{
	for (int i = 0; i < room.count; i++)
		if (room.members[i] == s->index) {
			memmove(&room.members[i], &room.members[i + 1],
			        (size_t)(room.count - i - 1) * sizeof(int));
			room.count--;
			if (s->recover)
				room.recoverable[s->delta]--;
			break;
		}
	if (!opt.quiet && s->nick && s->join == JOIN_IN)
		log_line("leave %s (sid %s): %s", s->nick, s->nsp[sio_slot(span_of("/"))].sid, why);
	s->join = JOIN_NONE;
	s->rejoin = true;
	if (s->state == S_OPEN)
		session_doom(s, why);
	else if (s->state == S_DETACHED)
		session_end(s);
}

/* Someone left, here or elsewhere. */
static void chat_event_logout(const char *sid)
{
	int r = roster_find(sid);
	if (r < 0)
		return;
	if (roster.e[r].session >= 0) /* ours, and it did not ask: reaped */
		chat_cut(&sessions[roster.e[r].session], "room unavailable");
	char *nick = xstrndup(roster.e[r].nick, strlen(roster.e[r].nick));
	roster_remove(r);
	if (!stopping)
		room_announce("logout", nick, sid, NULL);
	free(nick);
	while (!recording() && recent.count)
		recent_drop_oldest();
}

static void chat_event_msg(struct blob *msg, struct blob *const *att, int natt)
{
	room_broadcast(msg, att, natt);
}

/* One of ours leaves: Redis is told; the room hears it when Redis says so. */
static void chat_leave_redis(struct session *s, int slot, const char *reason)
{
	const char *sid = s->nsp[slot].sid;
	if (chat_joining(sid) == s)
		strmap_del(&newcomers, sid);
	for (int i = 0; i < room.count; i++) /* whatever its state: it gets nothing more */
		if (room.members[i] == s->index) {
			memmove(&room.members[i], &room.members[i + 1],
			        (size_t)(room.count - i - 1) * sizeof(int));
			room.count--;
			if (s->recover)
				room.recoverable[s->delta]--;
			break;
		}
	if (s->join == JOIN_IN) {
		int r = roster_find(sid);
		if (r >= 0)
			roster.e[r].session = -1;
		if (!opt.quiet)
			log_line("leave %s (sid %s): %s", s->nick, sid, reason ? reason : "");
		redis_ask_logout(sid);
	} else if (s->join == JOIN_ANSWERED) {
		redis_ask_logout(sid); /* Redis has its login, which is not back yet */
	}
	/* JOIN_ASKED: the login's reply finds it gone and undoes it */
	s->join = JOIN_NONE;
	blob_unref(s->history_ready);
	s->history_ready = NULL;
	free(s->nick);
	s->nick = NULL;
}

/* Registered anew: the room as Redis has it. */
static void chat_room_reset(const redisReply *snapshot)
{
	while (roster.count)
		roster_remove(roster.count - 1);
	redis.seq = strtoull(snapshot->element[0]->type == REDIS_REPLY_STRING
	                     ? snapshot->element[0]->str : "0", NULL, 10);
	for (size_t i = 1; i + 1 < snapshot->elements; i += 2) {
		const redisReply *sid = snapshot->element[i], *nick = snapshot->element[i + 1];
		if (sid->type == REDIS_REPLY_STRING && sid->len == SID_LEN &&
		    nick->type == REDIS_REPLY_STRING)
			roster_add(sid->str, nick->str, -1);
	}
}

/* Redis is gone: so is the room, for everyone here. */
static void chat_room_lost(void)
{
	while (room.count)
		chat_cut(member(room.count - 1), "room unavailable");
	while (roster.count)
		roster_remove(roster.count - 1);
	while (recent.count)
		recent_drop_oldest();
	for (int i = 0; i < slots_high; i++) {
		struct session *s = &sessions[i];
		int slot = s->state == S_OPEN ? chat_asking_slot(s) : -1;
		if (s->state == S_OPEN && s->join == JOIN_ANSWERED) {
			strmap_del(&newcomers, s->nsp[sio_slot(span_of("/"))].sid);
			chat_cut(s, "room unavailable");
		} else if (slot >= 0 && s->join == JOIN_ASKED && s->eio == 3) {
			strmap_del(&newcomers, s->nsp[slot].sid); /* its sid is its Engine.IO sid: */
			chat_cut(s, "room unavailable");          /* it must come back anew */
		} else if (slot >= 0 && s->join == JOIN_ASKED) {
			/* its request is lost: it asks again when Redis is back, under a new sid (the
			 * lost one may yet be in Redis, to be reaped with our old server id) */
			strmap_del(&newcomers, s->nsp[slot].sid);
			sio_make_sid(s, slot);
			strmap_put(&newcomers, s->nsp[slot].sid, s->index);
			s->join = JOIN_WAITING;
		}
	}
}

/* ==================================== metrics ==================================== */
/*
 * /metrics, in Prometheus' text format, and /healthz for load balancers and systemd. The
 * counters are kept where things happen (see sessions); the gauges are counted here, at
 * scrape time, so that nothing on the message path pays for them. By default both are on
 * the chat's port: they tell no more than the room shows anyone who joins; with
 * --metrics-address, /metrics moves to a port of its own (for operators who keep it
 * private) and /healthz is served on both.
 */
static time_t started_at; /* wall clock, for process_start_time_seconds */

static void metric(struct buf *b, const char *name, const char *type, const char *help)
{
	buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* What /proc says of us: resident bytes, CPU seconds, open descriptors. */
static void process_readings(double *rss, double *cpu, long *fds)
{
	*rss = *cpu = 0;
	*fds = 0;
	long page = sysconf(_SC_PAGESIZE), ticks = sysconf(_SC_CLK_TCK);
	FILE *f = fopen("/proc/self/statm", "r");
	unsigned long size, resident;
	if (f && fscanf(f, "%lu %lu", &size, &resident) == 2)
		*rss = (double)resident * (double)page;
	if (f)
		fclose(f);
	char stat[1024];
	f = fopen("/proc/self/stat", "r");
	size_t n = f ? fread(stat, 1, sizeof stat - 1, f) : 0;
	if (f)
		fclose(f);
	stat[n] = 0;
	const char *after = strrchr(stat, ')');
	unsigned long utime, stime;
	if (after && sscanf(after + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
	                    &utime, &stime) == 2)
		*cpu = (double)(utime + stime) / (double)ticks;
	DIR *d = opendir("/proc/self/fd");
	for (struct dirent *e; d && (e = readdir(d));)
		*fds += e->d_name[0] != '.';
	if (d) {
		closedir(d);
		(*fds)--; /* the one opendir itself holds */
	}
}

static void metrics_write(struct buf *b)
{
	int by_transport[2] = {0, 0}, members;
	size_t queued = 0;
	uint64_t opened, messages, deliveries, dropped[DROP_REASONS];
	room_lock_acquire();
	for (int i = 0; i < slots_high; i++) {
		if (sessions[i].state != S_OPEN)
			continue;
		by_transport[sessions[i].transport]++;
		queued += sessions[i].qbytes;
	}
	members = room.count;
	int everyone = roster.count;
	bool redis_up = redis_is_up();
	opened = counted.sessions;
	messages = counted.messages;
	deliveries = counted.deliveries;
	memcpy(dropped, counted.dropped, sizeof dropped);
	room_unlock();

	metric(b, "chatroom_clients", "gauge", "Clients connected, by the transport that carries them.");
	buf_printf(b, "chatroom_clients{transport=\"websocket\"} %d\n", by_transport[WEBSOCKET]);
	buf_printf(b, "chatroom_clients{transport=\"polling\"} %d\n", by_transport[POLLING]);
	metric(b, "chatroom_room_members", "gauge", "Clients of this server in the chat room.");
	buf_printf(b, "chatroom_room_members %d\n", members);
	if (opt.redis_host) {
		metric(b, "chatroom_room_everyone", "gauge", "Clients in the chat room, on every server.");
		buf_printf(b, "chatroom_room_everyone %d\n", everyone);
		metric(b, "chatroom_redis_up", "gauge", "1 while Redis is there and this server is in the room.");
		buf_printf(b, "chatroom_redis_up %d\n", redis_up);
	}
	metric(b, "chatroom_connections_total", "counter", "Engine.IO sessions opened.");
	buf_printf(b, "chatroom_connections_total %llu\n", (unsigned long long)opened);
	metric(b, "chatroom_messages_total", "counter", "Socket.IO events received from clients.");
	buf_printf(b, "chatroom_messages_total %llu\n", (unsigned long long)messages);
	metric(b, "chatroom_deliveries_total", "counter", "Packets queued to clients.");
	buf_printf(b, "chatroom_deliveries_total %llu\n", (unsigned long long)deliveries);
	metric(b, "chatroom_sent_bytes_total", "counter", "Bytes written to clients' sockets.");
	buf_printf(b, "chatroom_sent_bytes_total %llu\n",
	           (unsigned long long)atomic_load_explicit(&counted.sent_bytes, memory_order_relaxed));
	metric(b, "chatroom_dropped_clients_total", "counter",
	       "Clients the server disconnected, by reason.");
	for (int i = 0; i < DROP_REASONS; i++) {
		bool first = true; /* several reasons share a label: sum them once */
		for (int k = 0; k < i; k++)
			first &= strcmp(drop_reasons[k][1], drop_reasons[i][1]) != 0;
		if (!first)
			continue;
		uint64_t sum = 0;
		for (int k = i; k < DROP_REASONS; k++)
			if (strcmp(drop_reasons[k][1], drop_reasons[i][1]) == 0)
				sum += dropped[k];
		buf_printf(b, "chatroom_dropped_clients_total{reason=\"%s\"} %llu\n", drop_reasons[i][1],
		           (unsigned long long)sum);
	}
	metric(b, "chatroom_queued_bytes", "gauge", "Bytes waiting in clients' outbound queues.");
	buf_printf(b, "chatroom_queued_bytes %zu\n", queued);
	metric(b, "chatroom_memory_bytes", "gauge",
	       "Bytes clients make the server hold, counted against --max-memory.");
	buf_printf(b, "chatroom_memory_bytes %zu\n", atomic_load(&mem_held));
	metric(b, "chatroom_memory_limit_bytes", "gauge", "--max-memory.");
	buf_printf(b, "chatroom_memory_limit_bytes %zu\n", opt.max_memory);

	double rss, cpu;
	long fds;
	process_readings(&rss, &cpu, &fds);
	metric(b, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
	buf_printf(b, "process_resident_memory_bytes %.0f\n", rss);
	metric(b, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
	buf_printf(b, "process_cpu_seconds_total %.2f\n", cpu);
	metric(b, "process_open_fds", "gauge", "Number of open file descriptors.");
	buf_printf(b, "process_open_fds %ld\n", fds);
	metric(b, "process_start_time_seconds", "gauge",
	       "Start time of the process since unix epoch in seconds.");
	buf_printf(b, "process_start_time_seconds %lld\n", (long long)started_at);
}

static int serve_metrics(struct mg_connection *c)
{
	struct buf b = {0};
	metrics_write(&b);
	int status = http_reply(c, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, b.p, b.len);
	buf_free(&b);
	return status;
}

/* 200 while we serve, 503 while we stop. */
static int serve_health(struct mg_connection *c)
{
	if (stopping)
		return http_reply(c, 503, "text/plain", NULL, "stopping\n", 9);
	room_lock_acquire();
	bool room_away = opt.redis_host && !redis_is_up();
	room_unlock();
	if (room_away)
		return http_reply(c, 503, "text/plain", NULL, "room unavailable: no Redis\n", 27);
	return http_reply(c, 200, "text/plain", NULL, "ok\n", 3);
}

/* ================================== HTTP routes ================================== */
/*
 * civetweb hands every request to on_request before doing anything with it itself. Engine.IO
 * requests go to eio_http, which checks them in the order Node's engine.io does and answers
 * errors with its codes; "/" is the page; anything else is 404.
 */
static const struct endpoint *endpoints[2];
static int n_endpoints;

/* A query parameter, URL-decoded into out (always a string: "" if absent or too long).
 * Returns its length, -1 if it is absent, -2 if it does not fit. */
static int query_get(const char *query, const char *name, char *out, size_t cap)
{
	int n = query ? mg_get_var(query, strlen(query), name, out, cap) : -1;
	if (n < 0)
		out[0] = 0;
	return n < -1 ? -2 : n;
}

/*
 * CORS. By default there is none, as with Node's socket.io: pages from other sites cannot
 * read our answers. --cors-origin lists the origins that may; their requests get the
 * headers that say so, with credentials (so the Origin is echoed: browsers refuse "*"
 * with credentials). With a list that is not "*", requests from other origins are refused.
 */
static bool origin_listed(const char *origin)
{
	for (int i = 0; i < opt.ncors; i++)
		if (strcmp(opt.cors[i], "*") == 0 || strcasecmp(opt.cors[i], origin) == 0)
			return true;
	return false;
}

static bool origin_refused(struct mg_connection *c)
{
	const char *origin = mg_get_header(c, "Origin");
	return opt.ncors && origin && !origin_listed(origin);
}

static void cors_headers(struct mg_connection *c, char *out, size_t cap)
{
	const char *origin = mg_get_header(c, "Origin");
	out[0] = 0;
	if (opt.ncors && origin && strlen(origin) < 256 && origin_listed(origin))
		snprintf(out, cap, "Access-Control-Allow-Origin: %s\r\n"
		                   "Access-Control-Allow-Credentials: true\r\nVary: Origin\r\n", origin);
}

/* A browser asks whether its page may POST here. */
static int cors_preflight(struct mg_connection *c, const char *headers)
{
	char all[1024];
	const char *asked = mg_get_header(c, "Access-Control-Request-Headers");
	snprintf(all, sizeof all, "%sAccess-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
	                          "Access-Control-Max-Age: 86400\r\n%s%s%s",
	         headers, asked && strlen(asked) < 512 ? "Access-Control-Allow-Headers: " : "",
	         asked && strlen(asked) < 512 ? asked : "", asked && strlen(asked) < 512 ? "\r\n" : "");
	return http_reply(c, 204, "text/plain", all, "", 0);
}

/* No session for this client: the server is full (503), or its address holds its share
 * of sessions (429). */
static int refuse_session(struct mg_connection *c, const char *headers, const char *refusal)
{
	char body[160];
	int n = snprintf(body, sizeof body, "{\"code\":3,\"message\":\"%s\"}", refusal);
	int status = strcmp(refusal, "server full") == 0 ? 503 : 429;
	return http_reply(c, status, "application/json", headers, body, (size_t)n);
}

/* The slot of the request's address in peers[], -1 if none. room_lock held. */
static int request_peer(struct mg_connection *c)
{
#if CIVETWEB_EMBEDDED
	struct conn *conn = conn_of_request(c);
	if (conn)
		return conn->peer;
#endif
	char key[PEER_KEY_MAX];
	peer_key_of_text(mg_get_request_info(c)->remote_addr, key);
	return peer_get(key);
}

/*
 * Does the request come from where session s was opened? Only Engine.IO 3 sessions ask:
 * their Socket.IO id in "/" is their Engine.IO sid (socket.io-client 2 requires it), and
 * the chat contract shows every id to everyone in name_list. Anyone could then post, poll
 * or upgrade as someone else. Tied to its address (IPv6: its /64), a v2 session is safe
 * from everyone but its neighbours behind the same NAT. Engine.IO 4 sessions have
 * a separate, secret Socket.IO id.
 */
static bool request_from_owner(struct mg_connection *c, const struct session *s)
{
	if (s->eio != 3 || s->peer < 0)
		return true;
	char key[PEER_KEY_MAX];
	peer_key_of_text(mg_get_request_info(c)->remote_addr, key);
	return strcmp(key, peers[s->peer].key) == 0;
}

/* When the request reached us (see parted_remember): as it reached the wire thread, in
 * make's build; the other cannot tell, and takes any late GET for one on its way (a noop
 * within the grace). room_lock held. */
static struct arrival request_arrival(struct mg_connection *mc)
{
#if CIVETWEB_EMBEDDED
	struct conn *c = conn_of_request(mc);
	if (c)
		return (struct arrival){c->arrival, c->requests == 1 ? c->opened : 0};
#else
	(void)mc;
#endif
	return (struct arrival){0, 0}; /* Debian's libcivetweb cannot tell: "before" */
}

static int eio_http(struct mg_connection *c, const struct endpoint *ep)
{
	const struct mg_request_info *ri = mg_get_request_info(c);
	const char *method = ri->request_method;
	char transport[16], eio_s[8], sid[SID_LEN + 1], b64[8];
	query_get(ri->query_string, "transport", transport, sizeof transport);
	query_get(ri->query_string, "EIO", eio_s, sizeof eio_s);
	bool sid_too_long = query_get(ri->query_string, "sid", sid, sizeof sid) == -2;
	query_get(ri->query_string, "b64", b64, sizeof b64);
	char headers[512];
	cors_headers(c, headers, sizeof headers);
	if (origin_refused(c))
		return eio_error_reply(c, E_FORBIDDEN, headers);
	if (strcmp(method, "OPTIONS") == 0 && headers[0])
		return cors_preflight(c, headers);

	bool polling = strcmp(transport, "polling") == 0;
	bool websocket = strcmp(transport, "websocket") == 0;
	if (!polling && !websocket)
		return eio_error_reply(c, E_TRANSPORT, headers);
	int eio = strcmp(eio_s, "4") == 0 ? 4 : strcmp(eio_s, "3") == 0 ? 3 : 0;
	if (!eio)
		return eio_error_reply(c, E_VERSION, headers);
	bool upgrade = is_websocket_upgrade(c);
	if (sid_too_long) /* no sid of ours is that long: unknown, not a new handshake */
		return eio_error_reply(c, E_SID, headers);

	if (!sid[0]) { /* a handshake */
		if (strcmp(method, "GET") != 0)
			return eio_error_reply(c, E_METHOD, headers);
		if (websocket != upgrade)
			return eio_error_reply(c, E_REQUEST, headers);
		if (upgrade)
			return ws_upgrade(c, ep, eio, NULL, headers);
		room_lock_acquire();
		const char *refusal = "server full";
		struct session *s = stopping ? NULL
		                  : eio_open(ep, eio, POLLING, b64[0] && strcmp(b64, "0"),
		                             request_peer(c), &refusal);
		if (!s) {
			room_unlock();
			return refuse_session(c, headers, refusal);
		}
		return poll_get(c, s, headers); /* answers at once: the open packet is queued */
	}

	room_lock_acquire();
	struct session *s = session_find(sid);
	struct parted late;
	if (!s && polling && strcmp(method, "GET") == 0 && parted_take(sid, request_arrival(c), &late)) {
		room_unlock();
		return poll_answer_noop(c, late.eio, late.b64, headers);
	}
	if (!s || !request_from_owner(c, s)) {
		room_unlock();
		return eio_error_reply(c, E_SID, headers);
	}
	bool same_transport = (s->transport == POLLING) == polling;
	if ((!upgrade && !same_transport) || s->eio != eio) {
		room_unlock();
		return eio_error_reply(c, E_REQUEST, headers);
	}
	if (upgrade) {
		bool ok = websocket && s->transport == POLLING && !s->probe;
		room_unlock();
		if (ok)
			return ws_upgrade(c, ep, eio, sid, headers);
		/* upgraded already, or another probe under way: as Node, the handshake completes
		 * and the socket is closed at once */
		return websocket ? ws_upgrade_refused(c, headers) : eio_error_reply(c, E_REQUEST, headers);
	}
	if (strcmp(method, "GET") == 0)
		return poll_get(c, s, headers);
	if (strcmp(method, "POST") == 0) {
		const char *type = mg_get_header(c, "Content-Type");
		return poll_post(c, s, type && strcmp(type, "application/octet-stream") == 0, headers);
	}
	room_unlock();
	return eio_error_reply(c, E_REQUEST, headers);
}

/*
 * The chat page, web/index.html, which the assembler copies into the binary like the
 * names. Its script is its own small Socket.IO client; the server writes its --path into
 * it once, at start-up. The page needs nothing from elsewhere, and its Content-Security-
 * Policy says so: a message that smuggled in markup could not load or send anything.
 */
__asm__(".pushsection .rodata\n"
        ".globl chatroom_page_html\n"
        ".hidden chatroom_page_html\n"
        "chatroom_page_html:\n"
        ".incbin \"web/index.html\"\n"
        ".byte 0\n"
        ".popsection\n");
extern const char chatroom_page_html[] __attribute__((visibility("hidden")));

static struct buf page;

static void page_build(void)
{
	const char *mark = strstr(chatroom_page_html, "{{PATH}}");
	if (!mark) {
		buf_adds(&page, chatroom_page_html);
		return;
	}
	buf_add(&page, chatroom_page_html, (size_t)(mark - chatroom_page_html));
	buf_adds(&page, opt.path);
	buf_adds(&page, mark + strlen("{{PATH}}"));
}

static int serve_page(struct mg_connection *c)
{
	static const char headers[] =
		"Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; "
		"style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; "
		"form-action 'none'; frame-ancestors 'none'\r\n"
		"X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n";
	struct gather body = {0}; /* for HEAD, http_send sends only the head a GET would have */
	gather_static(&body, page.p, page.len);
	return http_send(c, 200, "text/html; charset=utf-8", headers, &body);
}

static int on_request(struct mg_connection *c)
{
	const struct mg_request_info *ri = mg_get_request_info(c);
	answer_closes = false;
	const char *uri = ri->local_uri ? ri->local_uri : "";
	bool get = strcmp(ri->request_method, "GET") == 0 || strcmp(ri->request_method, "HEAD") == 0;
	bool metrics_port = opt.metrics_host && ri->server_port == opt.metrics_port;
	if (get && strcmp(uri, "/healthz") == 0)
		return serve_health(c);
	if (get && strcmp(uri, "/metrics") == 0 && (metrics_port || !opt.metrics_host))
		return serve_metrics(c);
	if (metrics_port) /* that port serves nothing else */
		return http_reply(c, 404, "text/plain", NULL, "Not Found\n", 10);
	for (int i = 0; i < n_endpoints; i++) {
		const char *path = endpoints[i]->path;
		size_t n = strlen(path);
		if (strncmp(uri, path, n) == 0 || (strncmp(uri, path, n - 1) == 0 && uri[n - 1] == 0))
			return eio_http(c, endpoints[i]);
	}
	bool head = strcmp(ri->request_method, "HEAD") == 0;
	if ((strcmp(uri, "/") == 0 || strcmp(uri, "/index.html") == 0) &&
	    (head || strcmp(ri->request_method, "GET") == 0))
		return serve_page(c);
	return http_reply(c, 404, "text/plain", NULL, "Not Found\n", 10);
}

#if !CIVETWEB_EMBEDDED
/*
 * A worker's stack, given back below the current frame once its connection is over.
 * Built against Debian's libcivetweb there are as many workers as places in the room; a WebSocket handshake or a long-poll
 * runs some 20 KiB deep, and those pages would otherwise stay resident in every worker
 * that ever served one, idle or not: 200 MB for a room of 10000. What a worker touches
 * next time comes back as fresh zero pages. The 4 KiB left below us are for the calls
 * made from here on.
 */
static void worker_stack_give_back(void)
{
	static _Thread_local uintptr_t low; /* the lowest usable address of this stack */
	if (!low) {
		pthread_attr_t attr;
		void *addr;
		size_t size;
		if (pthread_getattr_np(pthread_self(), &attr) != 0)
			return;
		int r = pthread_attr_getstack(&attr, &addr, &size);
		pthread_attr_destroy(&attr);
		if (r != 0)
			return;
		low = (uintptr_t)addr;
	}
	uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
	char here;
	uintptr_t top = ((uintptr_t)&here - 4096) & ~(page - 1);
	uintptr_t bottom = (low + page - 1) & ~(page - 1);
	if (top > bottom)
		madvise((void *)bottom, top - bottom, MADV_DONTNEED);
}

static void on_worker_done(const struct mg_connection *c)
{
	(void)c;
	worker_stack_give_back();
}
#endif

static int on_log_message(const struct mg_connection *c, const char *message)
{
	(void)c, (void)message;
	return 1; /* civetweb's own complaints about single connections are not ours to print */
}

/* ===================================== main ===================================== */
/*
 * Start-up: read the flags and the names, start the wire thread, start civetweb, print
 * where we can be reached. Then the main thread waits for SIGINT or SIGTERM, printing the
 * log as it comes. Signals are blocked in every thread and read from a signalfd here:
 * civetweb 1.15 drops a worker's connection when a signal lands on that worker.
 *
 * Shutdown: every session is closed (long-polls get a close packet, WebSockets a close
 * frame 1001), the wire thread lets the sockets linger briefly, then civetweb stops.
 */
static struct mg_context *http_ctx;

/* "5000" or "+5000" (IPv4 and IPv6) or "127.0.0.1:5000" or "[::1]:5000". */
/* One civetweb port spec: "5000" or "+5000" (IPv4 and IPv6), "127.0.0.1:5000",
 * "[::1]:5000". NULL host: every interface. */
static bool civetweb_port(char *out, size_t cap, const char *host, int port, bool *ipv6_everywhere)
{
	*ipv6_everywhere = false;
	if (!host) {
		int probe = socket(AF_INET6, SOCK_STREAM, 0);
		bool v6 = probe >= 0 && mg_check_feature(8);
		if (probe >= 0)
			close(probe);
		*ipv6_everywhere = v6;
		snprintf(out, cap, "%s%d", v6 ? "+" : "", port);
		return true;
	}
	if (strcmp(host, "localhost") == 0)
		host = "127.0.0.1";
	unsigned char addr[16];
	if (inet_pton(AF_INET, host, addr) == 1) {
		snprintf(out, cap, "%s:%d", host, port);
		return true;
	}
	if (inet_pton(AF_INET6, host, addr) == 1 && mg_check_feature(8)) {
		snprintf(out, cap, "[%s]:%d", host, port);
		return true;
	}
	return false;
}

/* civetweb's listening_ports, built against Debian's libcivetweb: the chat's port, and
 * the metrics' if they have their own. */
static bool listening_ports(char *out, size_t cap, bool *ipv6_everywhere)
{
	if (!civetweb_port(out, cap, opt.host, opt.port, ipv6_everywhere))
		return false;
	if (opt.metrics_host) {
		size_t n = strlen(out);
		bool ignored;
		out[n] = ',';
		return civetweb_port(out + n + 1, cap - n - 1, opt.metrics_host, opt.metrics_port, &ignored);
	}
	return true;
}

/* Why a port cannot be listened on, in words. */
static const char *port_error_text(int e)
{
	if (e == EADDRINUSE)
		return "it is in use (is another chatroom running? try --port)";
	if (e == EACCES)
		return "permission denied (ports below 1024 need root; try --port 5000)";
	if (e == EADDRNOTAVAIL)
		return "no interface has that address (see --host)";
	return strerror(e);
}

/* civetweb says only "Failed to setup server ports": find out why by trying ourselves. */
static const char *port_problem(void)
{
	struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)opt.port)};
	struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
	bool v6 = opt.host && inet_pton(AF_INET6, opt.host, &a6.sin6_addr) == 1;
	if (opt.host && !v6 && inet_pton(AF_INET, strcmp(opt.host, "localhost") == 0 ? "127.0.0.1"
	                                               : opt.host, &a4.sin_addr) != 1)
		return NULL;
	int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return NULL;
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	int r = v6 ? bind(fd, (struct sockaddr *)&a6, sizeof a6) : bind(fd, (struct sockaddr *)&a4, sizeof a4);
	int e = errno;
	close(fd);
	return r == 0 ? NULL : port_error_text(e);
}

#if CIVETWEB_EMBEDDED
/*
 * Our own listening sockets, which the wire thread accepts on: every interface -- one
 * IPv6 socket that takes IPv4 too, or IPv4 alone where there is no IPv6 -- or --host.
 * Exits 2 for a --host that is not an address, 1 with the reason if we cannot listen.
 */
static void listener_open(const char *host, int port, bool *ipv6_everywhere)
{
	struct sockaddr_storage ss;
	memset(&ss, 0, sizeof ss);
	struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
	if (host && strcmp(host, "localhost") == 0)
		host = "127.0.0.1";
	int fd = -1;
	*ipv6_everywhere = false;
	if (!host) {
		fd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		*ipv6_everywhere = fd >= 0;
		ss.ss_family = fd >= 0 ? AF_INET6 : AF_INET;
		if (fd >= 0)
			a6->sin6_addr = in6addr_any;
		else
			a4->sin_addr.s_addr = htonl(INADDR_ANY);
	} else if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
		ss.ss_family = AF_INET;
	} else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
		ss.ss_family = AF_INET6;
	} else {
		fprintf(stderr, "chatroom: wants an IP address to listen on, not '%s'\n", host);
		exit(2);
	}
	if (fd < 0)
		fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (ss.ss_family == AF_INET6)
		a6->sin6_port = htons((uint16_t)port);
	else
		a4->sin_port = htons((uint16_t)port);
	int one = 1, v6only = host ? 1 : 0;
	if (fd >= 0) {
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (ss.ss_family == AF_INET6)
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only);
	}
	socklen_t len = ss.ss_family == AF_INET6 ? sizeof *a6 : sizeof *a4;
	if (fd < 0 || bind(fd, (struct sockaddr *)&ss, len) != 0) {
		fprintf(stderr, "chatroom: cannot listen on port %d: %s\n", port, port_error_text(errno));
		exit(1);
	}
	listeners[nlisteners] = fd;
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = epoll_tag(TAG_LISTEN, 0, nlisteners)};
	epoll_ctl(wire_epfd, EPOLL_CTL_ADD, fd, &ev);
	nlisteners++;
}

/* The port or ports: the chat's, and the metrics' if they have their own. */
static void listeners_open(bool *ipv6_everywhere)
{
	listener_open(opt.host, opt.port, ipv6_everywhere);
	if (opt.metrics_host) {
		bool ignored;
		listener_open(opt.metrics_host, opt.metrics_port, &ignored);
	}
}

/* Connections are taken once everything has started: until then the port refuses them. */
static void listeners_start(void)
{
	for (int i = 0; i < nlisteners; i++) {
		if (listen(listeners[i], 4096) != 0) {
			fprintf(stderr, "chatroom: cannot listen on port %d: %s\n", opt.port,
			        port_error_text(errno));
			exit(1);
		}
	}
}

/* civetweb insists on a listening socket of its own, which we give a loopback port
 * nobody knows; then we put a descriptor that never becomes readable in its place, so
 * that its accept loop idles. Every connection is ours to accept. */
static void civetweb_listener_silence(void)
{
	for (unsigned i = 0; i < http_ctx->num_listening_sockets; i++) {
		int quiet = eventfd(0, EFD_CLOEXEC);
		if (quiet >= 0) {
			dup2(quiet, http_ctx->listening_sockets[i].sock);
			close(quiet);
		}
	}
}
#endif

/* "64 MiB", "30.5 MiB", "128 KiB", "900 B": a size as a person reads it. */
static const char *size_text(size_t n, char out[32])
{
	static const char *const units[] = {"B", "KiB", "MiB", "GiB"};
	double v = (double)n;
	int u = 0;
	while (v >= 1024 && u < 3)
		v /= 1024, u++;
	if (v == (double)(long)v)
		snprintf(out, 32, "%ld %s", (long)v, units[u]);
	else
		snprintf(out, 32, "%.1f %s", v, units[u]);
	return out;
}

/* The budgets in force: an operator sees what the defaults came to on this machine. */
static void print_budgets(int fds, int workers)
{
	int conns = fds - 64 < MAX_CONNS ? fds - 64 : MAX_CONNS;
	printf("Up to %d connections at once (file descriptors allowed: %d), %d HTTP workers.\n",
	       conns < 0 ? 0 : conns, fds, workers);
	char queue[32], rate[32], memory[32];
	printf("Limits: a client may fall %s behind and send %s/s; an address may hold %d "
	       "connections and %d clients and join %d times a minute; all clients together "
	       "may hold %s.\n",
	       size_text(opt.queue_limit, queue),
	       opt.inbound_rate ? size_text(opt.inbound_rate, rate) : "any number of bytes",
	       opt.conns_per_address, opt.sessions_per_address, opt.joins_per_minute,
	       size_text(opt.max_memory, memory));
}

static void print_addresses(bool ipv6)
{
#if !CIVETWEB_EMBEDDED
	if (!mg_check_feature(8))
		printf("(this civetweb was built without IPv6: listening on IPv4 only)\n");
#endif
	if (opt.host) {
		bool v6 = strchr(opt.host, ':') != NULL;
		printf("Open http://%s%s%s:%d/\n", v6 ? "[" : "", opt.host, v6 ? "]" : "", opt.port);
		return;
	}
	printf("Open one of these in a browser on your network:\n");
	int shown = 0;
	struct ifaddrs *ifs = NULL;
	if (getifaddrs(&ifs) == 0) {
		for (struct ifaddrs *i = ifs; i; i = i->ifa_next) {
			if (!i->ifa_addr || (i->ifa_flags & IFF_LOOPBACK))
				continue;
			char a[INET6_ADDRSTRLEN];
			if (i->ifa_addr->sa_family == AF_INET) {
				inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, a, sizeof a);
				printf("  http://%s:%d/\n", a, opt.port);
				shown++;
			} else if (i->ifa_addr->sa_family == AF_INET6 && ipv6) {
				struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)i->ifa_addr;
				inet_ntop(AF_INET6, &s6->sin6_addr, a, sizeof a);
				if (IN6_IS_ADDR_LINKLOCAL(&s6->sin6_addr))
					printf("  http://[%s%%25%s]:%d/\n", a, i->ifa_name, opt.port);
				else
					printf("  http://[%s]:%d/\n", a, opt.port);
				shown++;
			}
		}
		freeifaddrs(ifs);
	}
	if (!shown)
		printf("  http://localhost:%d/ (this machine has no other address)\n", opt.port);
	printf("Press Ctrl+C to stop.\n");
}

/* Every client is a socket: a room of 10000 needs more descriptors than the usual soft
 * limit of 1024. Raise it as far as the hard limit allows, and say so if that is short. */
static int raise_fd_limit(int needed)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		return 1024;
	if (rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	int limit = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > INT_MAX ? INT_MAX : (int)rl.rlim_cur;
	if (limit < needed)
		fprintf(stderr, "chatroom: warning: only %d file descriptors allowed, %d clients "
		        "need about %d (raise it with ulimit -n)\n", limit, opt.max_clients, needed);
	return limit;
}

/*
 * malloc, tuned for a server whose big allocations are short-lived messages: a newcomer's
 * own login holds the whole name_list (350 KB in a room of 10000). glibc would keep such
 * blocks in its arenas once freed, raising its threshold for mmap as it goes, so a join
 * storm would leave hundreds of megabytes resident. A fixed threshold sends big blocks
 * back to the system when they are freed; a few arenas are plenty for threads that mostly
 * sleep.
 */
static void malloc_tune(void)
{
	mallopt(M_MMAP_THRESHOLD, 64 * 1024);
	mallopt(M_ARENA_MAX, 4);
}

/*
 * civetweb's workers. In make's build they run only whole requests and never wait on the
 * network, so a few per core keep both cores busy while one waits for room_lock: two per
 * CPU, at least 4, at most 16 (measured: README, Performance). Built against Debian's
 * libcivetweb every connection holds a worker, so there is one per place.
 */
static int worker_count(void)
{
	if (opt.threads)
		return opt.threads;
#if CIVETWEB_EMBEDDED
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	int n = cpus > 0 ? 2 * (int)cpus : 4;
	return n < 4 ? 4 : n > 16 ? 16 : n;
#else
	return session_capacity + 32;
#endif
}

/* Starts the wire thread and civetweb. Exits 1 with one clear line if it cannot. */
static void server_start(void)
{
	malloc_tune();
	int fds = raise_fd_limit(opt.max_clients + opt.max_clients / 8 + 64);
	uint64_t seed;
	random_bytes(&seed, sizeof seed);
	rng_state = seed | 1;
	sessions_init();
	page_build();
	redis_start(); /* (CONNECTs to the room wait until it is in) */

	wire_epfd = epoll_create1(EPOLL_CLOEXEC);
	wire.evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = epoll_tag(TAG_WAKE, 0, 0)};
	if (wire_epfd < 0 || wire.evfd < 0 || epoll_ctl(wire_epfd, EPOLL_CTL_ADD, wire.evfd, &ev)) {
		fprintf(stderr, "chatroom: cannot set up epoll: %s\n", strerror(errno));
		exit(1);
	}

	char ports[128], threads[16], queue[16];
	bool ipv6;
#if CIVETWEB_EMBEDDED
	conns_init(fds);
	listeners_open(&ipv6);
	snprintf(ports, sizeof ports, "127.0.0.1:0");
	snprintf(queue, sizeof queue, "%d", MAX_CONNS); /* produce_socket never waits */
#else
	if (!listening_ports(ports, sizeof ports, &ipv6)) {
		fprintf(stderr, "chatroom: --host wants an IP address, not '%s'\n", opt.host);
		exit(2);
	}
	snprintf(queue, sizeof queue, "%d", session_capacity < 4096 ? 4096 : session_capacity + 32);
#endif
	int nthreads = worker_count();
	snprintf(threads, sizeof threads, "%d", nthreads);
	const char *options[] = {
		"listening_ports", ports,
		"num_threads", threads,
		"listen_backlog", queue,
		"connection_queue", queue,
		"max_request_size", "16384", /* HEAD_MAX */
		"enable_keep_alive", "yes",
		"tcp_nodelay", "1",
		"request_timeout_ms", "10000",
		"keep_alive_timeout_ms", "5000", /* as Node's http server */
		"access_control_allow_methods", "", /* OPTIONS come to us */
		NULL,
	};
	struct mg_callbacks callbacks = {0};
	callbacks.begin_request = on_request;
	callbacks.log_message = on_log_message;
#if CIVETWEB_EMBEDDED
	callbacks.init_connection = on_connection_open;
	callbacks.connection_close = on_connection_close;
#else
	callbacks.connection_close = on_worker_done;
#endif
	struct mg_init_data init = {.callbacks = &callbacks, .configuration_options = options};
	char error[256] = "";
	unsigned code = 0;
	struct mg_error_data err = {.code = &code, .text = error, .text_buffer_size = sizeof error};
	mg_init_library(0);
	http_ctx = mg_start2(&init, &err);
	if (!http_ctx) {
		const char *why = port_problem();
		if (why)
			fprintf(stderr, "chatroom: cannot listen on port %d: %s\n", opt.port, why);
		else
			fprintf(stderr, "chatroom: cannot start the HTTP server: %s\n",
			        error[0] ? error : "unknown error");
		exit(1);
	}
#if CIVETWEB_EMBEDDED
	civetweb_listener_silence();
#endif
	pthread_create(&wire.thread, NULL, wire_main, NULL);
#if CIVETWEB_EMBEDDED
	listeners_start(); /* now connections flow: everything they need has started */
#endif
	printf("chatroom %s: a Socket.IO chat room, %d places, path %s\n", CHATROOM_VERSION,
	       opt.max_clients, opt.path);
	print_budgets(fds, nthreads);
	print_addresses(ipv6);
	fflush(stdout);
}

/* Closes every session and stops everything, within about a second. */
static void server_stop(void)
{
	room_lock_acquire();
	stopping = true;
	for (int i = 0; i < slots_high; i++)
		if (sessions[i].state == S_OPEN)
			session_doom(&sessions[i], "server shutting down");
	room_unlock();
	redis_stop(); /* our members leave the room everywhere at once */
	wire_wake();
	pthread_join(wire.thread, NULL);
	mg_stop(http_ctx);
}

/* Blocks the signals we handle in this thread and every thread it starts. */
static int signals_block(void)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	logq.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); /* before any thread logs */
	return signalfd(-1, &set, SFD_CLOEXEC);
}

/*
 * Memory freed after a burst (a join storm's queues, its name_lists) sits in malloc's
 * arenas, in pieces too scattered for free() to hand back. This thread has nothing else to
 * do: every ten seconds, if more than 16 MiB lie free, it gives them back.
 */
static void memory_give_back(void)
{
	struct mallinfo2 mi = mallinfo2();
	if (mi.fordblks > (16u << 20))
		malloc_trim(0);
}

/* Prints the log until SIGINT or SIGTERM arrives. */
static void wait_for_signal(int sigfd)
{
	int64_t next_give_back = now_ms() + 10000;
	for (;;) {
		struct pollfd fds[2] = {{sigfd, POLLIN, 0}, {logq.wake_fd, POLLIN, 0}};
		int64_t wait = next_give_back - now_ms();
		int ready = poll(fds, 2, wait > 0 ? (int)wait : 0);
		if (ready < 0 && errno != EINTR)
			break;
		if (now_ms() >= next_give_back) {
			memory_give_back();
			next_give_back = now_ms() + 10000;
		}
		if (ready <= 0)
			continue;
		if (fds[1].revents) {
			uint64_t count;
			ssize_t r = read(logq.wake_fd, &count, sizeof count);
			(void)r;
		}
		log_flush();
		if (fds[0].revents) {
			struct signalfd_siginfo si;
			ssize_t r = read(sigfd, &si, sizeof si);
			(void)r;
			printf("Stopping (%s).\n", si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
			break;
		}
	}
}

#ifndef CHATROOM_NO_MAIN
int main(int argc, char **argv)
{
	started_at = time(NULL);
	parse_options(argc, argv);
	names_init();
	int sigfd = signals_block();

	static struct endpoint chat;
	chat = (struct endpoint){
		.path = opt.path,
		.ping_interval = opt.ping_interval,
		.ping_timeout = opt.ping_timeout,
		.max_payload = opt.max_payload,
		.app = &socketio_app,
	};
	endpoints[n_endpoints++] = &chat;
	sio_register(&chat_namespace);

	server_start();
	wait_for_signal(sigfd);
	server_stop();
	log_flush();
	return 0;
}
#endif
