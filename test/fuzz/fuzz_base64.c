/*
 * Base64: base64_encode (binary to long-polling clients, Sec-WebSocket-Accept) and
 * base64_decode (binary from long-polling clients: "b..." and "b4..." packets).
 *
 * Properties, for any input bytes:
 *   - encode: the text is 4 * ceil(n / 3) characters of the standard alphabet, with '='
 *     only as the last one or two, and it decodes to the input again;
 *   - decode of the input taken as text agrees with a reference: it succeeds exactly
 *     when, without trailing '=', every character is in the standard or URL alphabet and
 *     the length is not 1 more than a multiple of 4; then it yields floor(6n / 8) bytes,
 *     the ones the reference decodes, and those, encoded and decoded again, come back the
 *     same;
 *   - decoding appends: what the buffer held before is left as it was.
 */
#include "fuzz.h"

static int reference_value(unsigned char c)
{
	static const char standard[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	static const char url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	const char *at = c ? strchr(standard, c) : NULL;
	if (at)
		return (int)(at - standard);
	at = c ? strchr(url, c) : NULL;
	return at ? (int)(at - url) : -1;
}

/* Bit by bit: character i holds bits 6i .. 6i+5 of the output. */
static bool reference_decode(const char *s, size_t n, struct buf *out)
{
	while (n && s[n - 1] == '=')
		n--;
	if (n % 4 == 1)
		return false;
	size_t bytes = n * 6 / 8;
	buf_reserve(out, bytes + 1);
	memset(out->p + out->len, 0, bytes);
	for (size_t i = 0; i < n; i++) {
		int v = reference_value((unsigned char)s[i]);
		if (v < 0)
			return false;
		for (int b = 0; b < 6; b++) {
			size_t bit = i * 6 + (size_t)b;
			if (bit / 8 < bytes && (v >> (5 - b) & 1))
				out->p[out->len + bit / 8] |= (char)(0x80 >> (bit % 8));
		}
	}
	out->len += bytes;
	return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *text = (const char *)data;

	/* encode, then decode */
	struct buf enc = {0}, dec = {0};
	base64_encode(&enc, data, size);
	REQUIRE(enc.len == (size + 2) / 3 * 4);
	for (size_t i = 0; i < enc.len; i++) {
		bool pad = enc.p[i] == '=';
		REQUIRE(pad ? i + 2 >= enc.len : strchr(b64_alphabet, enc.p[i]) != NULL);
		REQUIRE(!pad || i + 1 == enc.len || enc.p[i + 1] == '=');
	}
	REQUIRE(base64_decode(&dec, enc.p ? enc.p : "", enc.len));
	REQUIRE(same_bytes(dec.p, dec.len, text, size));

	/* decode arbitrary text, after something already in the buffer */
	struct buf ours = {0}, ref = {0};
	buf_adds(&ours, "kept");
	buf_adds(&ref, "kept");
	bool ok = base64_decode(&ours, text, size);
	bool ref_ok = reference_decode(text, size, &ref);
	REQUIRE(ok == ref_ok);
	REQUIRE(memcmp(ours.p, "kept", 4) == 0);
	if (ok) {
		REQUIRE(same_bytes(ours.p, ours.len, ref.p, ref.len));
		struct buf again = {0}, back = {0};
		base64_encode(&again, (const unsigned char *)ours.p + 4, ours.len - 4);
		REQUIRE(base64_decode(&back, again.p ? again.p : "", again.len));
		REQUIRE(same_bytes(back.p, back.len, ours.p + 4, ours.len - 4));
		buf_free(&again), buf_free(&back);
	}
	buf_free(&enc), buf_free(&dec), buf_free(&ours), buf_free(&ref);
	return 0;
}
