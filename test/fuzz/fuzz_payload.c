/*
 * Engine.IO long-poll payloads: payload_decode, the parser of a POST body, in its three
 * framings -- protocol 4 (packets joined by 0x1e, binary as "b" + base64), protocol 3
 * ("<length>:<packet>" with the length in UTF-16 units, binary as "b4" + base64) and
 * protocol 3's binary body (<0|1> <length digits> 0xFF <packet>). The first input byte
 * picks the framing, the rest is the body.
 *
 * Properties:
 *   - every packet handed up has a type from '0' to '6'; a text one is valid UTF-8
 *     (protocol 4 text never holds the separator 0x1e);
 *   - round trip: the packets handed up (those before a fault too), encoded again by
 *     chatroom's own encoder for long-poll answers (payload_gather, as a GET's answer is
 *     built), in every framing the protocol has, decode to the very same packets;
 *   - a well-formed body that holds no empty packet and whose lengths are written
 *     without leading zeros re-encodes to exactly its own bytes (protocol 4, and
 *     protocol 3 without binary).
 */
#include "fuzz.h"

/* What payload_decode hands over, in order. */
struct packets {
	struct buf bytes; /* each: type, binary, uint32_t length, data */
	int n;
};

static struct packets *into;

static bool collect(struct session *s, char type, const char *data, size_t len, bool binary)
{
	(void)s;
	REQUIRE(type >= '0' && type <= '6');
	REQUIRE(!binary || type == '4');
	if (!binary)
		REQUIRE(utf8_valid(data, len));
	if (!binary && s->eio == 4)
		REQUIRE(!memchr(data, 0x1e, len));
	buf_addc(&into->bytes, type);
	buf_addc(&into->bytes, binary);
	uint32_t n = (uint32_t)len;
	buf_add(&into->bytes, &n, sizeof n);
	buf_add(&into->bytes, data, len);
	into->n++;
	return true;
}

static bool decode(int eio, const char *body, size_t len, bool binary_body, struct packets *out)
{
	struct session s = {.eio = eio};
	into = out;
	return payload_decode(&s, body, len, binary_body, collect);
}

/* Up to POLL_MAX_PACKETS of the packets at *at, as the session queue holds them (a text
 * packet's blob holds its type character). Returns how many; *at moves past them. */
static int queue_form(const char **at, int left, struct packet *pk)
{
	int k = 0;
	for (; k < POLL_MAX_PACKETS && k < left; k++) {
		char type = (*at)[0];
		bool binary = (*at)[1];
		uint32_t len;
		memcpy(&len, *at + 2, sizeof len);
		const char *data = *at + 6;
		*at = data + len;
		struct blob *b = blob_new(len + !binary);
		if (!binary)
			b->data[0] = type;
		memcpy(b->data + !binary, data, len);
		pk[k] = (struct packet){b, binary};
	}
	return k;
}

/* The packets as long-poll GETs would answer with them, POLL_MAX_PACKETS at a time (what
 * one answer holds); each answer is decoded and the packets appended to `back`. */
static void round_trip(const struct packets *p, int eio, bool b64, struct packets *back)
{
	const char *at = p->bytes.p;
	for (int done = 0; done < p->n;) {
		struct packet pk[POLL_MAX_PACKETS];
		int k = queue_form(&at, p->n - done, pk);
		done += k;
		struct gather g = {0};
		bool binary_body = payload_gather(&g, eio, b64, pk, k);
		for (int i = 0; i < k; i++)
			blob_unref(pk[i].blob);
		struct buf body = {0};
		gather_flatten(&g, &body);
		gather_free(&g);
		REQUIRE(!binary_body || eio == 3);
		REQUIRE(decode(eio, body.p ? body.p : "", body.len, binary_body, back));
		buf_free(&body);
	}
}

static void require_same(const struct packets *a, const struct packets *b)
{
	REQUIRE(a->n == b->n);
	REQUIRE(same_bytes(a->bytes.p, a->bytes.len, b->bytes.p, b->bytes.len));
}

/* Would our encoder write this well-formed body byte for byte? Not if it has packets
 * our encoder never writes: empty ones ("0:" in protocol 3), lengths with leading
 * zeros, or, in protocol 4, binary whose base64 is not the canonical one. */
static bool canonical(int eio, const char *p, size_t n)
{
	if (eio == 4) { /* text packets only: no base64 to differ */
		for (size_t i = 0; i < n; i++)
			if (p[i] == 'b' && (i == 0 || p[i - 1] == 0x1e))
				return false;
		return true;
	}
	for (size_t i = 0; i < n;) {
		if (p[i] == '0')
			return false; /* a leading zero, or an empty packet */
		size_t units = 0;
		while (p[i] != ':')
			units = units * 10 + (size_t)(p[i++] - '0');
		i++;
		if (p[i] == 'b')
			return false;
		i += utf16_prefix_bytes(p + i, n - i, units);
	}
	return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_init();
	if (size < 1)
		return 0;
	int mode = data[0] % 3;
	int eio = mode == 0 ? 4 : 3;
	bool binary_body = mode == 2;
	const char *body = (const char *)data + 1;
	size_t len = size - 1;

	struct packets first = {0};
	bool ok = decode(eio, body, len, binary_body, &first);

	/* Again, in every framing the protocol answers with. */
	for (int b64 = 0; b64 < (eio == 3 ? 2 : 1); b64++) {
		struct packets again = {0};
		round_trip(&first, eio, b64, &again);
		require_same(&first, &again);
		buf_free(&again.bytes);
	}

	if (ok && !binary_body && len > 0 && first.n <= POLL_MAX_PACKETS && canonical(eio, body, len)) {
		const char *at = first.bytes.p;
		struct packet pk[POLL_MAX_PACKETS];
		queue_form(&at, first.n, pk);
		struct gather g = {0};
		payload_gather(&g, eio, false, pk, first.n);
		for (int k = 0; k < first.n; k++)
			blob_unref(pk[k].blob);
		struct buf out = {0};
		gather_flatten(&g, &out);
		gather_free(&g);
		REQUIRE(same_bytes(out.p, out.len, body, len));
		buf_free(&out);
	}
	buf_free(&first.bytes);
	return 0;
}
