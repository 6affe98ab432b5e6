/*
 * WebSocket frames from a client: ws_take_input, the wire thread's entry for bytes read
 * from a socket, and under it ws_parse and ws_frame (masking, fragmentation, control
 * frames between fragments, 16- and 64-bit lengths, maxPayload), and the Engine.IO layer
 * it hands messages to (a recording session). The first input byte picks a mode, a
 * protocol revision (3 or 4) and a maxPayload; the second seeds how the bytes are cut into
 * reads.
 *
 * Mode "raw": the rest of the input is what the client sends. Properties:
 *   - however the bytes are cut into reads, the same messages are handed up, the same
 *     control frames (pongs, our close) are queued and the socket ends in the same state
 *     as when they come in one read;
 *   - what the session is given to send in answer (protocol 3's pongs) is UTF-8 if text;
 *   - what is kept between reads never exceeds a frame header plus maxPayload (or a
 *     control frame's 125 bytes), a fragmented message never exceeds maxPayload, and
 *     nothing is kept once the socket is closing.
 *
 * Mode "round trip": the rest of the input describes messages (see next_message). They
 * are framed by chatroom's own frame builder (plan_frame, ws_frame_header), fragmented,
 * with pings between fragments, masked as a client must, and sent in reads of random
 * sizes. Properties: every message within maxPayload is handed up as it was sent, each
 * ping is answered with a pong carrying its payload, in order; the first message over
 * maxPayload ends the connection with close 1009 and nothing after it is handed up.
 */
#include "fuzz.h"

static const size_t max_payloads[] = {125, 126, 1000, 65535, 65536, 100000, 1 << 20, 200};

static struct wsconn ws;

static void ws_start(int eio, size_t max_payload)
{
	struct session *s = recording_session(eio, WEBSOCKET);
	memset(&ws, 0, sizeof ws);
	ws.state = WS_OPEN;
	ws.fd = -1;
	ws.peer = -1;
	ws.eio = eio;
	ws.max_payload = max_payload;
	room_lock_acquire();
	ws.s = s;
	s->ws = &ws;
	room_unlock();
}

/* What ws_destroy does, but for the socket. */
static void ws_finish(void)
{
	room_lock_acquire();
	ws_detach(&ws, "fuzz");
	room_unlock();
	inbound_mem_give(ws.rcap + ws.msg.cap);
	free(ws.rbuf);
	buf_free(&ws.msg);
	memset(&ws, 0, sizeof ws);
}

static void require_bounded(void)
{
	size_t frame = ws.max_payload > 125 ? ws.max_payload : 125;
	REQUIRE(ws.rlen <= 14 + frame);
	REQUIRE(ws.msg.len <= ws.max_payload);
	if (ws.state != WS_OPEN)
		REQUIRE(ws.rlen == 0);
}

/* Sends bytes (copied: the parser unmasks in place) in reads of random sizes, or in one
 * read if seed is 0. With ctl, the control frames queued after each read are appended to
 * it and taken away, as the socket's writer would; without, they stay (a writer that is
 * blocked), and whether a pong fits does not depend on how the reads were cut. Stops
 * where the wire thread stops reading. */
static void send_bytes(const unsigned char *p, size_t n, uint32_t seed, struct buf *ctl)
{
	unsigned char *copy = xmalloc(n);
	if (n)
		memcpy(copy, p, n);
	size_t at = 0;
	while (at < n && ws.state == WS_OPEN) {
		size_t k = n - at;
		if (seed) {
			uint32_t r = fuzz_rand(&seed);
			k = 1 + (r & 0xFF) % (r & 0x100 ? 16 : 256) * ((r >> 9 & 7) + 1) * ((r >> 12 & 1) ? 64 : 1);
			k = k < n - at ? k : n - at;
		}
		ws_take_input(&ws, copy + at, k);
		at += k;
		require_bounded();
		if (ctl) {
			buf_add(ctl, ws.ctl, ws.ctl_len);
			ws.ctl_len = ws.ctl_off = 0;
		}
	}
	free(copy);
}

/* What the session was given to send (protocol 3's pongs), as bytes. Text must be
 * UTF-8: it goes out in text frames. */
static void queued(struct session *s, struct buf *out)
{
	for (unsigned i = 0; i < s->q.count; i++) {
		const struct packet *p = &s->q.ring[(s->q.head + i) % s->q.cap];
		REQUIRE(p->binary || utf8_valid(p->blob->data, p->blob->len));
		buf_addc(out, p->binary);
		buf_add(out, p->blob->data, p->blob->len);
		buf_addc(out, 0);
	}
}

static void raw(int eio, size_t max_payload, uint32_t seed, const unsigned char *p, size_t n)
{
	struct buf got1 = {0}, ctl1 = {0}, q1 = {0}, ctl2 = {0}, q2 = {0};
	ws_start(eio, max_payload);
	send_bytes(p, n, 0, NULL);
	buf_add(&ctl1, ws.ctl, ws.ctl_len);
	enum ws_state state1 = ws.state;
	bool open1 = ws.s != NULL;
	if (open1)
		queued(ws.s, &q1);
	buf_add(&got1, got.p, got.len);
	ws_finish();

	ws_start(eio, max_payload);
	send_bytes(p, n, seed | 1, NULL);
	buf_add(&ctl2, ws.ctl, ws.ctl_len);
	REQUIRE(ws.state == state1);
	REQUIRE((ws.s != NULL) == open1);
	if (open1)
		queued(ws.s, &q2);
	REQUIRE(same_bytes(got.p, got.len, got1.p, got1.len));
	REQUIRE(same_bytes(ctl2.p, ctl2.len, ctl1.p, ctl1.len));
	REQUIRE(same_bytes(q2.p, q2.len, q1.p, q1.len));
	ws_finish();
	buf_free(&got1), buf_free(&ctl1), buf_free(&q1), buf_free(&ctl2), buf_free(&q2);
}

/* ---- round trip ---- */

/* One message from the input: a header byte (bit 0: binary; bits 1-2: fragments less
 * one; bit 3: a ping after the first fragment; bit 4: big, its data repeated to 300
 * times its length), a length byte, and that many bytes of data. Text that is not
 * UTF-8 goes as binary. */
struct message {
	bool binary;
	int fragments;
	bool ping;
	struct buf data;
};

static bool next_message(const unsigned char **p, const unsigned char *end, struct message *m)
{
	if (end - *p < 2)
		return false;
	unsigned hdr = (*p)[0], len = (*p)[1];
	*p += 2;
	len = len < (size_t)(end - *p) ? len : (unsigned)(end - *p);
	m->binary = hdr & 1;
	m->fragments = 1 + (hdr >> 1 & 3);
	m->ping = hdr & 8;
	m->data.len = 0;
	size_t total = hdr & 16 ? (size_t)len * 300 : len;
	for (size_t i = 0; len && i < total; i += len)
		buf_add(&m->data, *p, len);
	*p += len;
	if (!m->binary && !utf8_valid(m->data.p, m->data.len))
		m->binary = true;
	return true;
}

/* A client's frame: header, mask, masked payload. */
static void client_frame(struct buf *out, bool fin, int opcode, const char *p, size_t n,
                         uint32_t *seed)
{
	unsigned char h[14];
	size_t hl = ws_frame_header(h, opcode, n);
	if (!fin)
		h[0] &= 0x7F;
	h[1] |= 0x80;
	uint32_t r = fuzz_rand(seed);
	unsigned char *mask = h + hl;
	memcpy(mask, &r, 4);
	buf_add(out, h, hl + 4);
	buf_reserve(out, n);
	for (size_t i = 0; i < n; i++)
		out->p[out->len++] = (char)(p[i] ^ mask[i & 3]);
}

/* The frame chatroom's writer would build for this message, unmasked: header and payload
 * (protocol 3 puts a byte 4 before binary data). Returns where the payload begins. */
static size_t server_frame(struct buf *out, int eio, const struct message *m)
{
	static struct wsconn builder;
	builder.eio = eio;
	struct blob *b;
	if (m->binary) {
		b = blob_of(m->data.p ? m->data.p : "", m->data.len);
	} else {
		b = blob_new(m->data.len + 1);
		b->data[0] = '4';
		if (m->data.len)
			memcpy(b->data + 1, m->data.p, m->data.len);
	}
	builder.out[0] = (struct packet){b, m->binary};
	builder.nout = 1;
	builder.out_off = 0;
	struct send_plan sp;
	sp.n = 0;
	plan_frame(&sp, &builder, 0);
	for (int i = 0; i < sp.n; i++)
		buf_add(out, sp.iov[i].iov_base, sp.iov[i].iov_len);
	blob_unref(b);
	unsigned len7 = (unsigned char)out->p[1] & 0x7F;
	return 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0);
}

static void round_trip(int eio, size_t max_payload, uint32_t seed, const unsigned char *p,
                       size_t n)
{
	struct buf wire = {0}, expect = {0}, pings = {0}, frame = {0}, ctl = {0};
	struct message m = {0};
	const unsigned char *end = p + n;
	bool over = false;
	int npings = 0;
	while (!over && wire.len < (4u << 20) && next_message(&p, end, &m)) {
		frame.len = 0;
		size_t at = server_frame(&frame, eio, &m);
		/* the frame as built: FIN, the opcode, the length, unmasked */
		size_t plen = frame.len - at;
		REQUIRE((unsigned char)frame.p[0] == (m.binary ? 0x82 : 0x81));
		REQUIRE(plen == m.data.len + (m.binary ? eio == 3 : 1));
		over = plen > max_payload;
		int opcode = m.binary ? 2 : 1;
		for (int f = 0; f < m.fragments; f++) {
			size_t from = plen * (size_t)f / (size_t)m.fragments;
			size_t to = plen * (size_t)(f + 1) / (size_t)m.fragments;
			client_frame(&wire, f == m.fragments - 1, f ? 0 : opcode, frame.p + at + from,
			             to - from, &seed);
			if (f == 0 && m.ping && npings < 40) {
				size_t k = m.data.len < 8 ? m.data.len : 8;
				client_frame(&wire, true, 0x9, m.data.p, k, &seed);
				if (from == 0 && to <= max_payload) { /* read unless its fragment was over */
					unsigned char h[2] = {0x8A, (unsigned char)k};
					buf_add(&pings, h, 2);
					buf_add(&pings, m.data.p, k);
					npings++;
				}
			}
		}
		if (!over) {
			buf_addc(&expect, m.binary ? 'B' : 'T');
			uint32_t len = (uint32_t)m.data.len;
			buf_add(&expect, &len, sizeof len);
			buf_add(&expect, m.data.p, m.data.len);
		}
	}
	ws_start(eio, max_payload);
	send_bytes((const unsigned char *)wire.p, wire.len, seed, &ctl);
	REQUIRE(same_bytes(got.p, got.len, expect.p, expect.len));
	if (!over) {
		REQUIRE(ws.state == WS_OPEN);
		REQUIRE(same_bytes(ctl.p, ctl.len, pings.p, pings.len));
		REQUIRE(ws.rlen == 0 && ws.msg.len == 0);
	} else {
		/* pongs queued in the read that went over are dropped for the close frame */
		REQUIRE(ws.state == WS_CLOSING);
		REQUIRE(ctl.len >= 4 && ctl.len - 4 <= pings.len &&
		        same_bytes(ctl.p, ctl.len - 4, pings.p, ctl.len - 4));
		REQUIRE(memcmp(ctl.p + ctl.len - 4, "\x88\x02\x03\xf1", 4) == 0); /* 1009 */
	}
	ws_finish();
	buf_free(&wire), buf_free(&expect), buf_free(&pings), buf_free(&frame), buf_free(&ctl);
	buf_free(&m.data);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	int eio = data[0] & 1 ? 3 : 4;
	size_t max_payload = max_payloads[data[0] >> 1 & 7];
	uint32_t seed = data[1] * 0x01010101u;
	if (data[0] & 0x10)
		round_trip(eio, max_payload, seed, data + 2, size - 2);
	else
		raw(eio, max_payload, seed, data + 2, size - 2);
	return 0;
}
