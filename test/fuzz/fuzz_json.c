/*
 * JSON as chatroom reads what clients send: json_check (the scanner every packet's JSON
 * goes through, with its depth limit JSON_MAX_DEPTH), json_string_text (a string
 * literal's text) and json_stamp_username (DATA's "username" set to the sender's name).
 * The input is a JSON text, or not. jansson is the reference:
 *   - what jansson parses (within our depth limit, without NUL bytes, which jansson
 *     takes for the end) json_check accepts;
 *   - what json_check accepts jansson parses, but for lone surrogate escapes, numbers
 *     beyond a double and \u0000 in keys (jansson refuses them; JavaScript takes them);
 *   - a string literal decodes to the very text jansson has for it;
 *   - a stamped object parses, its "username" is the name, its other members are the
 *     original's (the last of duplicates, as JSON.parse has it).
 */
#include "fuzz.h"

static int depth_of(const json_t *v)
{
	int deepest = 0;
	if (json_is_array(v)) {
		for (size_t i = 0; i < json_array_size(v); i++) {
			int d = depth_of(json_array_get(v, i));
			deepest = d > deepest ? d : deepest;
		}
		return deepest + 1;
	}
	if (json_is_object(v)) {
		const char *k;
		json_t *x;
		json_object_foreach((json_t *)v, k, x) {
			int d = depth_of(x);
			deepest = d > deepest ? d : deepest;
		}
		return deepest + 1;
	}
	return 0;
}

static bool has_surrogate_escape(const char *p, size_t n)
{
	for (size_t i = 0; i + 3 < n; i++)
		if (p[i] == '\\' && p[i + 1] == 'u' && (p[i + 2] == 'd' || p[i + 2] == 'D') &&
		    strchr("89abcdefABCDEF", p[i + 3]) != NULL)
			return true;
	return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *p = (const char *)data;
	struct json_shape shape;
	bool ours = json_check(p, size, &shape);
	json_error_t err;
	json_t *ref = json_loadb(p, size, JSON_DECODE_ANY | JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &err);
	/* (jansson stops at a NUL byte outside strings, which JSON does not allow) */
	if (ref && depth_of(ref) <= JSON_MAX_DEPTH && utf8_valid(p, size) && !memchr(p, 0, size))
		REQUIRE(ours);
	if (ours && !has_surrogate_escape(p, size) && !strstr(err.text, "overflow") &&
	    !strstr(err.text, "NUL byte"))
		REQUIRE(ref != NULL);

	const char *start = p, *end = p + size;
	while (start < end && strchr(" \t\n\r", *start))
		start++;
	while (end > start && strchr(" \t\n\r", end[-1]))
		end--;
	if (ours && ref && shape.kind == '"') { /* a string literal decodes as jansson has it */
		static char text[1 << 16];
		int n = json_string_text((struct json_span){start, (size_t)(end - start)}, text, sizeof text);
		if (n >= 0)
			REQUIRE((size_t)n == json_string_length(ref) &&
			        memcmp(text, json_string_value(ref), (size_t)n) == 0);
	}
	if (ours && ref && shape.kind == '{' && json_is_object(ref)) {
		static const char name[] = "Ot\"ter\\ é \xf0\x9f\xa6\x8a";
		struct buf out = {0};
		json_stamp_username(&out, (struct json_span){start, (size_t)(end - start)}, name);
		json_t *stamped = json_loadb(out.p, out.len, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &err);
		REQUIRE(stamped && json_is_object(stamped));
		const char *username = json_string_value(json_object_get(stamped, "username"));
		REQUIRE(username && strcmp(username, name) == 0);
		const char *k;
		json_t *v;
		json_object_foreach(ref, k, v) {
			if (strcmp(k, "username") != 0)
				REQUIRE(json_equal(json_object_get(stamped, k), v));
		}
		REQUIRE(json_object_size(stamped) == json_object_size(ref) + !json_object_get(ref, "username"));
		json_decref(stamped);
		buf_free(&out);
	}
	json_decref(ref);
	return 0;
}
