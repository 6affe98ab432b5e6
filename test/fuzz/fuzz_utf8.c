/*
 * UTF-8 and UTF-16 arithmetic: utf8_valid (every text chatroom takes), utf8_next,
 * utf16_length (protocol 3's packet lengths, as JavaScript counts) and utf16_prefix_bytes
 * (where such a length ends in UTF-8).
 *
 * Properties, for any input bytes:
 *   - utf8_valid agrees with a reference built from RFC 3629's table of well-formed byte
 *     sequences (no overlongs, no surrogates, nothing above U+10FFFF), and with iconv;
 *   - for valid text, utf16_length is the number of UTF-16 units iconv converts it to,
 *     and decoding it with utf8_next character by character covers it exactly;
 *   - for valid text, utf16_prefix_bytes(units) is the byte length of the first `units`
 *     units when they end between characters, SIZE_MAX when they end inside a surrogate
 *     pair or past the end; its answer, measured back with utf16_length, gives `units`.
 */
#include "fuzz.h" /* first: chatroom.c defines _GNU_SOURCE before any system header */

#include <iconv.h>

/* RFC 3629, section 4: the well-formed sequences, byte ranges per position. */
static bool reference_valid(const unsigned char *p, size_t n)
{
	static const struct {
		unsigned char lo[4], hi[4];
		int len;
	} forms[] = {
		{{0x00}, {0x7F}, 1},
		{{0xC2, 0x80}, {0xDF, 0xBF}, 2},
		{{0xE0, 0xA0, 0x80}, {0xE0, 0xBF, 0xBF}, 3},
		{{0xE1, 0x80, 0x80}, {0xEC, 0xBF, 0xBF}, 3},
		{{0xED, 0x80, 0x80}, {0xED, 0x9F, 0xBF}, 3},
		{{0xEE, 0x80, 0x80}, {0xEF, 0xBF, 0xBF}, 3},
		{{0xF0, 0x90, 0x80, 0x80}, {0xF0, 0xBF, 0xBF, 0xBF}, 4},
		{{0xF1, 0x80, 0x80, 0x80}, {0xF3, 0xBF, 0xBF, 0xBF}, 4},
		{{0xF4, 0x80, 0x80, 0x80}, {0xF4, 0x8F, 0xBF, 0xBF}, 4},
	};
	size_t i = 0;
	while (i < n) {
		int len = 0;
		for (size_t f = 0; f < sizeof forms / sizeof *forms && !len; f++) {
			if ((size_t)forms[f].len > n - i)
				continue;
			bool match = true;
			for (int k = 0; k < forms[f].len; k++)
				match &= p[i + k] >= forms[f].lo[k] && p[i + k] <= forms[f].hi[k];
			if (match)
				len = forms[f].len;
		}
		if (!len)
			return false;
		i += (size_t)len;
	}
	return true;
}

/* Converts with iconv; returns the UTF-16 units, or -1 if iconv refuses the input. */
static long iconv_units(const char *s, size_t n)
{
	static iconv_t cd = (iconv_t)-1;
	if (cd == (iconv_t)-1)
		cd = iconv_open("UTF-16LE", "UTF-8");
	REQUIRE(cd != (iconv_t)-1);
	iconv(cd, NULL, NULL, NULL, NULL);
	static char out[4 * 4096 + 16];
	char *in = (char *)s, *o = out;
	size_t left = n, room = sizeof out;
	if (iconv(cd, &in, &left, &o, &room) == (size_t)-1)
		return -1;
	return (long)((size_t)(o - out) / 2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > 4096)
		return 0;
	const char *s = (const char *)data;
	bool valid = utf8_valid(s, size);
	REQUIRE(valid == reference_valid(data, size));
	long units = iconv_units(s, size);
	REQUIRE(valid == (units >= 0));
	size_t length = utf16_length(s, size); /* defined for any bytes: must not fail */
	if (!valid)
		return 0;
	REQUIRE(length == (size_t)units);

	/* Character by character: where UTF-16 units end between characters. */
	static bool boundary[4 * 4096 + 2];  /* units -> ends between characters */
	static size_t bytes_at[4 * 4096 + 2]; /* units -> byte length there */
	memset(boundary, 0, (length + 2) * sizeof *boundary);
	size_t at = 0, u = 0;
	boundary[0] = true;
	bytes_at[0] = 0;
	while (at < size) {
		uint32_t cp;
		size_t k = utf8_next(data + at, size - at, &cp);
		REQUIRE(k >= 1 && k <= 4);
		REQUIRE(k == (cp < 0x80 ? 1u : cp < 0x800 ? 2u : cp < 0x10000 ? 3u : 4u));
		at += k;
		u += cp >= 0x10000 ? 2 : 1;
		REQUIRE(u <= length);
		boundary[u] = true;
		bytes_at[u] = at;
	}
	REQUIRE(at == size && u == length);
	size_t step = length / 64 + 1; /* every length of short texts, 64 of long ones */
	for (size_t want = 0; want <= length + 1; want += want + step > length ? 1 : step) {
		size_t b = utf16_prefix_bytes(s, size, want);
		if (want <= length && boundary[want]) {
			REQUIRE(b == bytes_at[want]);
			REQUIRE(utf16_length(s, b) == want);
		} else {
			REQUIRE(b == SIZE_MAX);
		}
	}
	return 0;
}
