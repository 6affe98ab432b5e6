/*
 * Socket.IO over Engine.IO, with the chat room registered: sio_parse and sio_on_message
 * (namespaces, ack ids, binary placeholders, attachments, CONNECT auth, recovery), reached
 * the way a transport reaches them, through eio_receive. Long-polling clients: an
 * observer that joined the room normally (protocol 4), and the fuzzed client, whose
 * protocol (3 or 4, with b64 or not) the first input byte picks (bits 0 and 1). With bit
 * 2, a third member is away: it joined asking for recovery and lost its transport, and
 * "PID" in what the fuzzed client sends stands for its pid, so that the client can come
 * back as it ({"pid":"PID","offset":"0"}). The rest of the input is what the fuzzed
 * client sends, packets separated by 0x1e: "b" and raw bytes for a binary message (an
 * attachment), anything else an Engine.IO text packet ("4" and a Socket.IO packet for a
 * message).
 *
 * Properties, after every packet:
 *   - everything queued for either client, taken as its long-polls take it, is valid
 *     Engine.IO and Socket.IO: a long-poll answer built from it (payload_gather) decodes
 *     (payload_decode) to the same packets; text is UTF-8 with a known type; a message is a
 *     packet sio_parse takes (CONNECT_ERROR: "4", a namespace, a JSON object in protocol
 *     5 or string in 4); a binary event is followed by exactly its attachments, and its
 *     placeholders point at them;
 *   - a malformed packet (one sio_parse refuses, or an attachment nobody expects) closes
 *     the fuzzed client and queues nothing for anyone but its logout;
 *   - a "msg" event from the fuzzed client while in the room reaches the observer once,
 *     as sent but for DATA's "username", which is the sender's nickname; an ack id is
 *     acknowledged with "43<id>[]";
 *   - a client that comes back as the away member (recovery) takes its nickname without
 *     anyone being told, is answered CONNECT with the away member's pid, then given what
 *     it missed: events numbered (their last argument, an offset) in increasing order.
 */
#include "fuzz.h"

static struct endpoint chat = {
	.path = "/socket.io/", .ping_interval = 25000, .ping_timeout = 20000,
	.max_payload = 1000000, .app = &socketio_app,
};

/* ---- what a client is sent ---- */

struct taken {
	struct packet pk[1024];
	int n;
	int attachments_due; /* binary packets the last event announced, still to come */
};

/* Is this Socket.IO packet, sent to a client of protocol eio, valid? Returns how many
 * attachments follow it. */
static int check_sio(int eio, const char *d, size_t n)
{
	REQUIRE(n >= 1);
	if (d[0] == '0' + SIO_CONNECT_ERROR) { /* the server's to send, so sio_parse refuses it */
		size_t i = 1;
		if (i < n && d[i] == '/') {
			while (i < n && d[i] != ',')
				i++;
			REQUIRE(i < n);
			i++;
		}
		struct json_shape shape;
		REQUIRE(json_check(d + i, n - i, &shape));
		REQUIRE(shape.kind == (eio == 4 ? '{' : '"'));
		return 0;
	}
	struct sio_packet p;
	REQUIRE(sio_parse(d, n, &p));
	REQUIRE(p.type != SIO_DISCONNECT || p.json.n == 0);
	if (p.attachments == 0)
		return 0;
	json_t *tree = json_parse(p.json.p, p.json.n, JSON_DECODE_INT_AS_REAL);
	REQUIRE(tree && placeholders_ok(tree, p.attachments));
	json_decref(tree);
	return p.attachments;
}

static void check_packet(struct taken *t, int eio, struct packet p)
{
	if (p.binary) {
		REQUIRE(t->attachments_due > 0);
		t->attachments_due--;
		return;
	}
	REQUIRE(t->attachments_due == 0);
	const char *d = p.blob->data;
	size_t n = p.blob->len;
	REQUIRE(n >= 1 && d[0] >= '0' && d[0] <= '6');
	REQUIRE(utf8_valid(d, n));
	if (d[0] == '0') {
		json_t *open = json_loadb(d + 1, n - 1, 0, NULL);
		REQUIRE(json_is_object(open) && json_is_string(json_object_get(open, "sid")));
		json_decref(open);
	} else if (d[0] == '4') {
		t->attachments_due = check_sio(eio, d + 1, n - 1);
	}
}

/* For the Engine.IO round trip: what payload_decode hands over. */
static struct packet decoded[POLL_MAX_PACKETS + 1];
static int ndecoded;

static bool collect(struct session *s, char type, const char *data, size_t len, bool binary)
{
	(void)s;
	REQUIRE(ndecoded < POLL_MAX_PACKETS);
	struct blob *b = blob_new(len + !binary);
	if (!binary)
		b->data[0] = type;
	if (len)
		memcpy(b->data + !binary, data, len);
	decoded[ndecoded++] = (struct packet){b, binary};
	return true;
}

/* Takes what is queued for s, as its long-polls would (poll_take), checks it, and keeps
 * it in t. Each answer is built as a GET answers, and decoded again. */
static void take(struct session *s, struct taken *t)
{
	t->n = 0;
	room_lock_acquire();
	while (s->state == S_OPEN && s->q.count) {
		struct packet pk[POLL_MAX_PACKETS];
		size_t cost;
		int n = poll_take(s, pk, &cost);
		s->qbytes -= cost;
		struct gather g = {0};
		bool binary_body = payload_gather(&g, s->eio, s->b64, pk, n);
		struct buf body = {0};
		gather_flatten(&g, &body);
		gather_free(&g);
		struct session as = {.eio = s->eio};
		ndecoded = 0;
		REQUIRE(payload_decode(&as, body.p ? body.p : "", body.len, binary_body, collect));
		REQUIRE(ndecoded == n);
		for (int i = 0; i < n; i++) {
			REQUIRE(decoded[i].binary == pk[i].binary);
			REQUIRE(same_bytes(decoded[i].blob->data, decoded[i].blob->len, pk[i].blob->data,
			                   pk[i].blob->len));
			blob_unref(decoded[i].blob);
			check_packet(t, s->eio, pk[i]);
			if (t->n < (int)(sizeof t->pk / sizeof *t->pk))
				t->pk[t->n++] = pk[i];
			else
				blob_unref(pk[i].blob);
		}
		buf_free(&body);
	}
	room_unlock();
}

static void let_go(struct taken *t)
{
	for (int i = 0; i < t->n; i++)
		blob_unref(t->pk[i].blob);
	t->n = 0;
}

static bool is_logout(struct packet p)
{
	static const char logout[] = "42[\"msg\",{\"action\":\"logout\",";
	return !p.binary && p.blob->len > strlen(logout) && memcmp(p.blob->data, logout, strlen(logout)) == 0;
}

/* ---- one packet from the fuzzed client ---- */

struct scene {
	struct session *observer, *client;
	struct taken to_observer, to_client;
	struct session *away; /* detached, recoverable; NULL if the input has none */
	char away_pid[SID_LEN + 1];
	const char *away_nick;
	struct buf attachments; /* of the binary packet under way: uint32_t length, bytes */
	int nattachments;
};

/* A "msg" event from a member that is relayed: what the observer must get. */
static void require_relayed(struct scene *sc, const struct sio_packet *p)
{
	struct taken *o = &sc->to_observer;
	REQUIRE(o->n == 1 + p->attachments);
	const struct blob *got_event = o->pk[0].blob;
	REQUIRE(!o->pk[0].binary && got_event->len >= 2 && memcmp(got_event->data, "4", 1) == 0);
	size_t skip = 2; /* "4" and the type */
	if (p->attachments)
		skip += (size_t)snprintf(NULL, 0, "%d-", p->attachments);
	json_t *sent = json_loadb(p->json.p, p->json.n, JSON_DECODE_INT_AS_REAL | JSON_ALLOW_NUL, NULL);
	json_t *relayed = json_loadb(got_event->data + skip, got_event->len - skip,
	                             JSON_DECODE_INT_AS_REAL | JSON_ALLOW_NUL, NULL);
	if (sent) { /* (jansson takes less than JavaScript: lone surrogates, huge numbers) */
		REQUIRE(relayed);
		json_t *data = json_array_get(sent, 1);
		if (json_is_object(data))
			json_object_set_new(data, "username", json_string(sc->client->nick));
		REQUIRE(json_equal(sent, relayed));
	}
	json_decref(sent);
	json_decref(relayed);
	const char *at = sc->attachments.p;
	for (int i = 0; i < p->attachments; i++) {
		uint32_t len;
		memcpy(&len, at, sizeof len);
		REQUIRE(o->pk[1 + i].binary);
		REQUIRE(same_bytes(o->pk[1 + i].blob->data, o->pk[1 + i].blob->len, at + 4, len));
		at += 4 + len;
	}
	if (p->ack.n > 0) { /* the last packet the client got is its ack */
		struct taken *c = &sc->to_client;
		REQUIRE(c->n >= 1);
		const struct blob *ack = c->pk[c->n - 1].blob;
		REQUIRE(ack->len == 2 + p->ack.n + 2 && memcmp(ack->data, "43", 2) == 0 &&
		        memcmp(ack->data + 2, p->ack.p, p->ack.n) == 0 &&
		        memcmp(ack->data + 2 + p->ack.n, "[]", 2) == 0);
	}
}

/* The client came back as the away member: what it and the observer were given. */
static void require_restored(struct scene *sc)
{
	REQUIRE(sc->client->nick == sc->away_nick); /* its name and place */
	REQUIRE(sc->to_observer.n == 0);             /* a member back is no login */
	struct taken *c = &sc->to_client;
	REQUIRE(c->n >= 1 && !c->pk[0].binary);
	const struct blob *connect = c->pk[0].blob;
	REQUIRE(connect->len >= 2 && memcmp(connect->data, "40", 2) == 0);
	json_t *answer = json_loadb(connect->data + 2, connect->len - 2, 0, NULL);
	REQUIRE(json_is_object(answer));
	const char *pid = json_string_value(json_object_get(answer, "pid"));
	REQUIRE(pid && strcmp(pid, sc->away_pid) == 0);
	json_decref(answer);
	unsigned long long last = 0;
	for (int i = 1; i < c->n; i++) { /* what it missed: events with their offsets */
		struct sio_packet p;
		if (c->pk[i].binary) /* an event's attachments */
			continue;
		REQUIRE(c->pk[i].blob->data[0] == '4');
		REQUIRE(sio_parse(c->pk[i].blob->data + 1, c->pk[i].blob->len - 1, &p));
		REQUIRE(p.type == SIO_EVENT || p.type == SIO_BINARY_EVENT);
		json_t *event = json_loadb(p.json.p, p.json.n, JSON_DECODE_INT_AS_REAL | JSON_ALLOW_NUL, NULL);
		if (event) { /* (jansson takes less than JavaScript) */
			const char *offset = json_string_value(json_array_get(event, json_array_size(event) - 1));
			REQUIRE(offset && *offset && strspn(offset, "0123456789") == strlen(offset));
			unsigned long long seq = strtoull(offset, NULL, 10);
			REQUIRE(seq > last);
			last = seq;
			json_decref(event);
		}
	}
}

static bool is_msg_event(const struct sio_packet *p)
{
	char name[8];
	return (p->type == SIO_EVENT || p->type == SIO_BINARY_EVENT) && span_is(p->nsp, "/") &&
	       p->shape.count >= 1 && p->shape.item[0].p[0] == '"' &&
	       json_string_text(p->shape.item[0], name, sizeof name) == 3 && memcmp(name, "msg", 3) == 0;
}

static void send_packet(struct scene *sc, const char *d, size_t n)
{
	struct session *c = sc->client;
	bool open = c->state == S_OPEN, joined = open && c->nsp[0].connected;
	bool binary = n > 0 && d[0] == 'b';
	bool message = binary || (n > 0 && d[0] == '4');
	static struct sio_packet p, pending; /* pending: the binary packet under way */
	bool parsed = !binary && message && sio_parse(d + 1, n - 1, &p);
	bool expected = c->pending.expected > 0;
	bool recovered = c->recover && strcmp(c->pid, sc->away_pid) == 0;
	if (!binary && !utf8_valid(d, n))
		return; /* no transport hands that up */

	if (binary) {
		uint32_t len = (uint32_t)(n - 1);
		buf_add(&sc->attachments, &len, sizeof len);
		buf_add(&sc->attachments, d + 1, n - 1);
		sc->nattachments++;
		eio_receive(c, '4', d + 1, n - 1, true);
	} else {
		bool ok;
		text_packet(c, d, n, c->eio == 3, eio_receive, &ok);
		if (parsed && p.attachments > 0) {
			sc->attachments.len = 0;
			sc->nattachments = 0;
			pending = p;
		}
	}
	take(sc->observer, &sc->to_observer);
	take(c, &sc->to_client);

	if (open && message && ((!binary && !parsed) || (binary && !expected))) {
		REQUIRE(c->state != S_OPEN); /* malformed: it goes, and nothing is relayed */
		REQUIRE(sc->to_observer.n == 0 ||
		        (joined && sc->to_observer.n == 1 && is_logout(sc->to_observer.pk[0])));
	}
	bool still = c->state == S_OPEN;
	if (joined && still && parsed && !expected && p.attachments == 0 && is_msg_event(&p))
		require_relayed(sc, &p);
	if (joined && still && binary && expected && c->pending.expected == 0 &&
	    is_msg_event(&pending) && sc->nattachments == pending.attachments) {
		/* pending's spans point into a packet the fuzzer owns until this input ends */
		require_relayed(sc, &pending);
	}
	if (sc->away && still && !recovered && c->recover && strcmp(c->pid, sc->away_pid) == 0)
		require_restored(sc);
	let_go(&sc->to_observer);
	let_go(&sc->to_client);
}

/* Between inputs: the room empty, no history, no numbered events, the same nicknames. */
static void room_reset(void)
{
	fuzz_reset();
	REQUIRE(room.count == 0);
	while (history.count)
		history_drop_oldest();
	blob_unref(history_event);
	history_event = NULL;
	while (recent.count)
		recent_drop_oldest();
	recent.seq = 0; /* offsets the same for the same input */
	rng_state = 0x9E3779B97F4A7C15ULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	fuzz_init();
	room_reset();
	struct scene sc = {0};
	const char *refusal;
	room_lock_acquire();
	sc.observer = eio_open(&chat, 4, POLLING, false, -1, &refusal);
	room_unlock();
	REQUIRE(sc.observer);
	eio_receive(sc.observer, '4', "0", 1, false); /* CONNECT "/" */
	take(sc.observer, &sc.to_observer);
	REQUIRE(sc.observer->nsp[0].connected);
	let_go(&sc.to_observer);

	if (data[0] & 4) { /* the away member: in the room, recoverable, transport lost */
		room_lock_acquire();
		sc.away = eio_open(&chat, 4, POLLING, false, -1, &refusal);
		room_unlock();
		REQUIRE(sc.away);
		static const char connect[] = "0{\"recovery\":true}";
		eio_receive(sc.away, '4', connect, strlen(connect), false);
		take(sc.away, &sc.to_client);
		let_go(&sc.to_client);
		room_lock_acquire();
		REQUIRE(sc.away->nsp[0].connected && sc.away->recover);
		memcpy(sc.away_pid, sc.away->pid, sizeof sc.away_pid);
		sc.away_nick = sc.away->nick;
		session_close(sc.away, "transport close");
		REQUIRE(sc.away->state == S_DETACHED);
		room_unlock();
		take(sc.observer, &sc.to_observer);
		let_go(&sc.to_observer);
	}

	int eio = data[0] & 1 ? 3 : 4;
	room_lock_acquire();
	sc.client = eio_open(&chat, eio, POLLING, data[0] & 2, -1, &refusal);
	room_unlock();
	REQUIRE(sc.client);
	take(sc.observer, &sc.to_observer); /* protocol 3 joins at once: a login */
	take(sc.client, &sc.to_client);
	let_go(&sc.to_observer);
	let_go(&sc.to_client);

	/* The rest, packet by packet, "PID" written out. The copy stays alive until we
	 * return, so the spans a pending packet keeps point into it. */
	struct buf in = {0};
	for (const char *at = (const char *)data + 1, *end = (const char *)data + size; at < end;) {
		const char *pid = sc.away ? memmem(at, (size_t)(end - at), "PID", 3) : NULL;
		const char *upto = pid ? pid : end;
		buf_add(&in, at, (size_t)(upto - at));
		if (pid)
			buf_adds(&in, sc.away_pid);
		at = pid ? pid + 3 : end;
	}
	const char *p = in.p ? in.p : "", *end = p + in.len;
	while (p < end) {
		const char *sep = memchr(p, 0x1e, (size_t)(end - p));
		const char *pkt_end = sep ? sep : end;
		send_packet(&sc, p, (size_t)(pkt_end - p));
		p = sep ? sep + 1 : end;
	}
	buf_free(&in);
	buf_free(&sc.attachments);
	return 0;
}
