/*
 * The protocol test server: chatroom's own Engine.IO and Socket.IO layers -- this file
 * includes chatroom.c -- configured as the official test suites of the public repositories
 * socketio/engine.io-protocol and socketio/socket.io-protocol (their test-suite/ folders)
 * expect their server:
 *
 *   port 3000, pingInterval 300, pingTimeout 200, maxPayload 1000000;
 *   /engine.io/  raw Engine.IO: every message comes back as it went, text as text and
 *                binary as binary;
 *   /socket.io/  Socket.IO with namespaces "/" and "/custom": a client that connects is
 *                sent "auth" with its CONNECT payload; "message" is answered with
 *                "message-back" and the same arguments; "message-with-ack" is
 *                acknowledged with its arguments; other namespaces are refused.
 *
 * Start it with: make protocol-server   (--port changes 3000, and --ping-interval and
 * --ping-timeout the heartbeat, for our own tests)
 *
 * The chat server has none of this: what is here is this file's handlers, plugged into the
 * same extension points (struct eio_app, struct sio_handler) the chat room uses.
 */
#define CHATROOM_NO_MAIN
#include "../chatroom.c"

/* ---- /engine.io/: echo ---- */

static void echo_nothing(struct session *s) { (void)s; }

static void echo_message(struct session *s, const char *data, size_t len, bool binary)
{
	struct blob *b = blob_new(len + !binary);
	if (!binary)
		b->data[0] = '4'; /* text goes back as an Engine.IO message packet */
	memcpy(b->data + !binary, data, len);
	room_lock_acquire();
	session_send(s, b, binary);
	room_unlock();
	blob_unref(b);
}

static const struct eio_app echo_app = {
	.on_open = echo_nothing,
	.on_close = echo_nothing,
	.on_message = echo_message,
};

/* ---- /socket.io/: "/" and "/custom" ---- */

static const char *admit_everyone(struct session *s, int slot, const json_t *auth)
{
	(void)s, (void)slot, (void)auth;
	return NULL;
}

/*
 * The "auth" event leaves 5 ms after the CONNECT answer. The suites' WebSocket client
 * takes each message with a one-shot listener and loses the second of two frames that
 * arrive in one read (see the README beside run.sh); Node's reference test server passes
 * them reliably only because its auth event leaves a little later. So does this one: the
 * packet waits for the session's deadline timer. The chat server has nothing of this.
 */
static struct blob *pending_auth[MAX_SESSIONS][MAX_NAMESPACES];

static void send_pending_auth(struct session *s)
{
	for (int slot = 0; slot < MAX_NAMESPACES; slot++) {
		struct blob *msg = pending_auth[s->index][slot];
		pending_auth[s->index][slot] = NULL;
		if (msg)
			session_send(s, msg, false);
		blob_unref(msg);
	}
}

static void emit_auth(struct session *s, int slot, const json_t *auth)
{
	struct buf b = {0};
	sio_head(&b, SIO_EVENT, span_of(namespaces[slot]->name), 0, NO_ACK);
	buf_adds(&b, "[\"auth\",");
	if (auth)
		json_dump_to(&b, auth);
	else
		buf_adds(&b, "{}");
	buf_addc(&b, ']');
	send_pending_auth(s); /* an earlier one goes first */
	pending_auth[s->index][slot] = blob_from_buf(&b);
	session_deadline(s, now_ms() + 5);
}

static void auth_deadline(struct session *s)
{
	bool pending = false;
	for (int slot = 0; slot < MAX_NAMESPACES; slot++)
		pending |= pending_auth[s->index][slot] != NULL;
	if (pending)
		send_pending_auth(s);
	else
		socketio_app.on_deadline(s); /* the connect timeout */
}

static void auth_close(struct session *s)
{
	for (int slot = 0; slot < MAX_NAMESPACES; slot++) {
		blob_unref(pending_auth[s->index][slot]);
		pending_auth[s->index][slot] = NULL;
	}
	socketio_app.on_close(s);
}

static const struct eio_app socketio_with_late_auth = {
	.on_open = sio_on_open,
	.on_close = auth_close,
	.on_message = sio_on_message,
	.on_deadline = auth_deadline,
};

/* The arguments after the event name, as an array: ["x",1,"2"] gives [1,"2"]. */
static void put_rest_of_arguments(struct buf *b, const struct sio_packet *p)
{
	const char *after = p->shape.item[0].p + p->shape.item[0].n;
	const char *end = p->json.p + p->json.n;
	while (after < end && strchr(" \t\r\n", *after))
		after++;
	buf_addc(b, '[');
	if (after < end && *after == ',')
		buf_add(b, after + 1, (size_t)(end - after - 1));
	else
		buf_addc(b, ']');
}

static void reply(struct session *s, struct buf *b, struct blob *const *att, int natt)
{
	struct blob *head = blob_from_buf(b);
	sio_send_blobs(s, head, att, natt);
	blob_unref(head);
}

static void echo_event(struct session *s, int slot, const struct sio_packet *p,
                       struct blob *const *att)
{
	struct json_span nsp = span_of(namespaces[slot]->name);
	bool binary = p->attachments > 0;
	char name[32];
	int n = json_string_text(p->shape.item[0], name, sizeof name - 1);
	name[n < 0 ? 0 : n] = 0;
	struct buf b = {0};
	if (strcmp(name, "message") == 0) {
		sio_head(&b, binary ? SIO_BINARY_EVENT : SIO_EVENT, nsp, p->attachments, NO_ACK);
		buf_adds(&b, "[\"message-back\"");
		struct buf rest = {0};
		put_rest_of_arguments(&rest, p);
		if (rest.len > 2) {
			buf_addc(&b, ',');
			buf_add(&b, rest.p + 1, rest.len - 1);
		} else {
			buf_addc(&b, ']');
		}
		buf_free(&rest);
		reply(s, &b, att, p->attachments);
	} else if (strcmp(name, "message-with-ack") == 0 && p->ack.n > 0) {
		sio_head(&b, binary ? SIO_BINARY_ACK : SIO_ACK, nsp, p->attachments, p->ack);
		put_rest_of_arguments(&b, p);
		reply(s, &b, att, p->attachments);
	}
}

static void leave_quietly(struct session *s, int slot, const char *reason)
{
	(void)s, (void)slot, (void)reason;
}

static const struct sio_handler main_namespace = {
	.name = "/", .admit = admit_everyone, .on_connect = emit_auth,
	.on_event = echo_event, .on_disconnect = leave_quietly,
};

static const struct sio_handler custom_namespace = {
	.name = "/custom", .admit = admit_everyone, .on_connect = emit_auth,
	.on_event = echo_event, .on_disconnect = leave_quietly,
};

int main(int argc, char **argv)
{
	opt.port = 3000;
	opt.quiet = true;
	opt.ping_interval = 300;
	opt.ping_timeout = 200;
	parse_options(argc, argv);
	opt.max_payload = 1000000;
	int sigfd = signals_block();

	static struct endpoint engine = {.path = "/engine.io/", .app = &echo_app};
	static struct endpoint socketio = {.path = "/socket.io/", .app = &socketio_with_late_auth};
	for (struct endpoint *ep = &engine; ep; ep = ep == &engine ? &socketio : NULL) {
		ep->ping_interval = opt.ping_interval;
		ep->ping_timeout = opt.ping_timeout;
		ep->max_payload = opt.max_payload;
		endpoints[n_endpoints++] = ep;
	}
	sio_register(&main_namespace);
	sio_register(&custom_namespace);

	server_start();
	wait_for_signal(sigfd);
	server_stop();
	return 0;
}
