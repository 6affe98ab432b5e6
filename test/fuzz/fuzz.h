/*
 * What every fuzz target shares: chatroom.c itself (its own functions are what is
 * fuzzed, not copies), a REQUIRE macro for the properties, a server state set up once
 * (no threads, no sockets: the wire thread's eventfd is -1, so wake-ups go nowhere), and
 * a session whose Engine.IO layer records the messages it is handed, for round-trip
 * properties. Build and run: make fuzz (clang, -fsanitize=fuzzer,address,undefined).
 */
#define CHATROOM_NO_MAIN
#ifdef FUZZ_CHATROOM_C /* another copy, say with a fix to try: -DFUZZ_CHATROOM_C='"/path"' */
#include FUZZ_CHATROOM_C
#else
#include "../../chatroom.c"
#endif

#define REQUIRE(cond)                                                                  \
	do {                                                                               \
		if (!(cond)) {                                                                 \
			fprintf(stderr, "%s:%d: property broken: %s\n", __FILE__, __LINE__, #cond); \
			abort();                                                                   \
		}                                                                              \
	} while (0)

/* The server's state, as main would set it up, minus threads and sockets: no budgets in
 * the way (memory, inbound rate, flooding), the built-in names, the chat room's "/". */
static void fuzz_init(void)
{
	static bool ready;
	if (ready)
		return;
	ready = true;
	opt.max_memory = (size_t)1 << 40;
	opt.inbound_rate = 0;
	opt.flood_limit = 0;
	opt.quiet = true;
	opt.queue_limit = 64u << 20;
	wire.evfd = -1;
	rng_state = 0x9E3779B97F4A7C15ULL; /* the same nicknames every run */
	sessions_init();
	if (names_load(chatroom_names_txt, strlen(chatroom_names_txt)))
		abort();
	sio_register(&chat_namespace);
}

/* Ends every session the last input left, and what the wire thread would have cleared:
 * its list of queues to write and of sockets with deadlines. Sessions then free their
 * slots, so that a long run never fills the table. */
static void fuzz_reset(void)
{
	room_lock_acquire();
	for (int i = 0; i < slots_high; i++) {
		if (sessions[i].state == S_OPEN)
			session_close(&sessions[i], "fuzz");
		if (sessions[i].state == S_DETACHED)
			session_end(&sessions[i]);
	}
	reap_doomed();
	while (dirty_head) {
		struct session *s = dirty_head;
		dirty_head = s->next_dirty;
		s->dirty = false;
		session_release(s);
	}
	ws_timed = NULL;
	room_unlock();
}

/* Messages handed up by Engine.IO, one after the other: kind byte ('T' text, 'B'
 * binary), length (uint32_t), then the bytes, in `got`. */
static struct buf got;

static void record_nothing(struct session *s) { (void)s; }

static void record_message(struct session *s, const char *data, size_t len, bool binary)
{
	(void)s;
	buf_addc(&got, binary ? 'B' : 'T');
	uint32_t n = (uint32_t)len;
	buf_add(&got, &n, sizeof n);
	buf_add(&got, data, len);
}

static const struct eio_app recording_app = {
	.on_open = record_nothing,
	.on_close = record_nothing,
	.on_message = record_message,
};

static struct endpoint recording_endpoint = {
	.path = "/fuzz/", .ping_interval = 1000000, .ping_timeout = 1000000,
	.max_payload = 1 << 20, .app = &recording_app,
};

/* A fresh open session of protocol `eio` on `t`, recording what it receives; the last
 * input's sessions are gone. */
static struct session *recording_session(int eio, enum transport t)
{
	fuzz_init();
	fuzz_reset();
	const char *refusal;
	room_lock_acquire();
	struct session *s = session_new(&recording_endpoint, eio, t, -1, &refusal);
	room_unlock();
	if (!s)
		abort();
	got.len = 0;
	return s;
}

/* The bytes of a gather list, one piece after the other. */
static void gather_flatten(const struct gather *g, struct buf *out)
{
	struct iovec iov[GATHER_PIECES];
	int n = gather_iov(g, 0, iov);
	for (int i = 0; i < n; i++)
		buf_add(out, iov[i].iov_base, iov[i].iov_len);
}

/* A tiny deterministic generator, for choices a target derives from its input. */
static uint32_t fuzz_rand(uint32_t *state)
{
	uint32_t x = *state ? *state : 0x12345678u;
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	return *state = x;
}

/* Do two buffers hold the same bytes? (memcmp must not see a NULL, even for 0 bytes.) */
static bool same_bytes(const char *a, size_t an, const char *b, size_t bn)
{
	return an == bn && (an == 0 || memcmp(a, b, an) == 0);
}
