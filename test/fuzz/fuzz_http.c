/*
 * HTTP request heads, as the wire thread and the handlers read them: head_end (where a
 * head ends), head_tidy (tabs to spaces, other control bytes refused), head_framing (its
 * body's length: Content-Length, Transfer-Encoding),
 * head_session (the ?sid= of the request line, to keep a session's requests in order),
 * header_has_token and request_wants_close (Connection), and query_get (mg_get_var, as
 * eio_http reads transport, EIO, sid and b64). The input is what a client sends.
 *
 * Properties:
 *   - head_end finds the first end ("\n\n" or "\r\n\r\n"), within the input, where
 *     civetweb's own get_http_header_len finds it;
 *   - head_tidy refuses exactly the heads with a control byte other than tab, CR and LF,
 *     and leaves no tab; civetweb, handed a tidied head (on_connection_open), reads it
 *     again and finds it whole, ending where head_end said: a head civetweb thought
 *     unfinished would keep its worker waiting for bytes the wire thread already took;
 *   - head_framing agrees with a simple reference (every header line in order:
 *     Transfer-Encoding is refused with 411; Content-Length must be digits, with spaces
 *     around, at most SIZE_MAX / 2, the same if repeated, else 400) and never overflows;
 *   - header_has_token agrees with a reference that splits at commas and trims;
 *     request_wants_close, given what civetweb parsed, with the rule it implements;
 *   - query_get returns -1 (absent), -2 (too long for the buffer) or the length of the
 *     value URL-decoded as a reference decodes it, always NUL-terminated;
 *   - head_session finds the session that the handler (query_get on civetweb's query
 *     string) finds, for requests that write their sid as clients do: in the URI's query,
 *     as lowercase "sid=", without %-escapes or '+', in a request line without a bare CR.
 *     (Others may differ: such a request is only not kept in its session's order, or is
 *     kept in the order of a session whose sid it names; neither needs a sid the client
 *     does not have.)
 */
#include "fuzz.h"

static const char fuzz_sid[] = "FUZZsidFUZZsidFUZZ_-";

/* An open session whose sid is fuzz_sid, for head_session and query_get to find. */
static struct session *known_session(void)
{
	static struct session *s;
	if (s)
		return s;
	fuzz_init();
	const char *refusal;
	room_lock_acquire();
	s = session_new(&recording_endpoint, 4, POLLING, -1, &refusal);
	strmap_del(&sids, s->sid);
	memcpy(s->sid, fuzz_sid, SID_LEN + 1);
	strmap_put(&sids, s->sid, s->index);
	room_unlock();
	return s;
}

/* ---- references ---- */

/* The first "\n\n" or "\r\n\r\n" (what HTTP allows, and civetweb). */
static size_t reference_end(const char *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i++) {
		if (p[i] == '\n' && p[i + 1] == '\n')
			return i + 2;
		if (i + 3 < n && memcmp(p + i, "\r\n\r\n", 4) == 0)
			return i + 4;
	}
	return 0;
}

static bool is_space(char c) { return c == ' ' || c == '\t'; }

static int reference_framing(const char *p, size_t n, size_t *body_len)
{
	*body_len = 0;
	bool have = false;
	const char *line = memchr(p, '\n', n);
	while (line && ++line < p + n) {
		const char *eol = memchr(line, '\n', (size_t)(p + n - line));
		if (!eol)
			break;
		char text[HEAD_MAX + 1];
		size_t len = (size_t)(eol - line);
		memcpy(text, line, len);
		text[len] = 0;
		line = eol;
		char *colon = memchr(text, ':', len);
		if (!colon)
			continue;
		*colon = 0;
		char *v = colon + 1, *end = text + len;
		if (strlen(text) != (size_t)(colon - text))
			continue; /* a NUL in the name: no name we know */
		if (strcasecmp(text, "Transfer-Encoding") == 0)
			return 411;
		if (strcasecmp(text, "Content-Length") != 0)
			continue;
		while (v < end && is_space(*v))
			v++;
		while (end > v && (is_space(end[-1]) || end[-1] == '\r'))
			end--;
		if (v == end)
			return 400;
		size_t value = 0;
		for (char *d = v; d < end; d++) {
			if (*d < '0' || *d > '9')
				return 400;
			size_t digit = (size_t)(*d - '0');
			if (value > (SIZE_MAX / 2 - digit) / 10)
				return 400; /* over SIZE_MAX / 2 */
			value = value * 10 + digit;
		}
		if (have && value != *body_len)
			return 400;
		*body_len = (size_t)value;
		have = true;
	}
	return 0;
}

static bool reference_has_token(const char *value, const char *token)
{
	char copy[HEAD_MAX + 1];
	snprintf(copy, sizeof copy, "%s", value);
	for (char *rest = copy, *item; (item = strsep(&rest, ","));) {
		while (is_space(*item))
			item++;
		char *end = item + strlen(item);
		while (end > item && is_space(end[-1]))
			*--end = 0;
		if (strcasecmp(item, token) == 0)
			return true;
	}
	return false;
}

static int hex(char c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* The value of the first name=... parameter (name in any case, as civetweb matches it),
 * %XX and '+' decoded; its length, or -1 if there is none. */
static long reference_query(const char *q, const char *name, char *out, size_t cap)
{
	size_t nl = strlen(name), n = strlen(q);
	for (size_t i = 0; i + nl < n; i++) {
		if ((i > 0 && q[i - 1] != '&') || q[i + nl] != '=' || strncasecmp(q + i, name, nl) != 0)
			continue;
		size_t k = 0;
		for (size_t j = i + nl + 1; j < n && q[j] != '&'; j++) {
			char c = q[j];
			if (c == '%' && j + 2 < n && hex(q[j + 1]) >= 0 && hex(q[j + 2]) >= 0 && q[j + 1] != '&') {
				c = (char)(hex(q[j + 1]) * 16 + hex(q[j + 2]));
				j += 2;
			} else if (c == '+') {
				c = ' ';
			}
			if (k + 1 < cap)
				out[k] = c;
			k++;
		}
		return (long)k;
	}
	return -1;
}

/* ---- the target ---- */

static void check_query(const char *query)
{
	static const struct {
		const char *name;
		size_t cap;
	} params[] = {{"transport", 16}, {"EIO", 8}, {"sid", SID_LEN + 1}, {"b64", 8}, {"t", 4}};
	for (size_t i = 0; i < sizeof params / sizeof *params; i++) {
		char out[64], ref[HEAD_MAX];
		memset(out, 'x', sizeof out);
		int n = query_get(query, params[i].name, out, params[i].cap);
		long want = reference_query(query, params[i].name, ref, sizeof ref);
		if (want < 0) {
			REQUIRE(n == -1 && out[0] == 0);
		} else if ((size_t)want >= params[i].cap) {
			REQUIRE(n == -2 && out[0] == 0);
		} else {
			REQUIRE(n == want && out[n] == 0 && same_bytes(out, (size_t)n, ref, (size_t)want));
		}
	}
}

/* Is the request line METHOD SP URI SP VERSION, with the sid written as clients do? */
static bool plain_sid(const char *head, size_t n, const char *query)
{
	const char *eol = memchr(head, '\n', n);
	if (!eol)
		return false;
	const char *q = memchr(head, '?', (size_t)(eol - head));
	const char *space = memchr(head, ' ', (size_t)(eol - head));
	const char *uri_end = space ? memchr(space + 1, ' ', (size_t)(eol - space - 1)) : NULL;
	if (!q || !space || !uri_end || q < space || q > uri_end || memchr(uri_end, '?', (size_t)(eol - uri_end)))
		return false;
	const char *cr = memchr(head, '\r', (size_t)(eol - head));
	if (cr && cr + 1 != eol)
		return false; /* civetweb ends the line at a bare CR, head_session at LF */
	if (strpbrk(query, "%+"))
		return false;
	for (const char *p = query; (p = strcasestr(p, "sid=")); p++)
		if ((p == query || p[-1] == '&') && strncmp(p, "sid=", 4) != 0)
			return false;
	return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > HEAD_MAX)
		return 0;
	struct session *known = known_session();
	const char *p = (const char *)data;

	size_t end = head_end(p, size);
	REQUIRE(end == 0 || (end >= 2 && end <= size));
	int theirs = get_http_header_len(p, (int)size);
	if (theirs > 0)
		REQUIRE(end == (size_t)theirs);
	REQUIRE(end == reference_end(p, size));
	if (!end)
		return 0;

	/* The wire thread tidies the head in place (conn_advance); the rest sees that. */
	static char head[HEAD_MAX + 1];
	memcpy(head, p, end);
	bool control = false;
	for (size_t i = 0; i < end; i++) {
		unsigned char ch = (unsigned char)p[i];
		control |= (ch < 0x20 && ch != '\t' && ch != '\r' && ch != '\n') || ch == 0x7F;
	}
	bool tidy = head_tidy(head, end);
	REQUIRE(tidy == !control);
	if (!tidy)
		return 0;
	REQUIRE(!memchr(head, '\t', end));
	REQUIRE(get_http_header_len(head, (int)end) == (int)end); /* what a worker reads again */
	p = head;

	size_t body_len = 12345, ref_len = 54321;
	int refusal = head_framing(p, end, &body_len);
	REQUIRE(refusal == reference_framing(p, end, &ref_len));
	if (refusal == 0)
		REQUIRE(body_len == ref_len && body_len <= SIZE_MAX / 2);

	/* What civetweb makes of it, as a worker would: request line, headers, query. */
	static char buf[HEAD_MAX + 1];
	memcpy(buf, p, end);
	buf[end] = 0;
	struct mg_request_info ri;
	memset(&ri, 0, sizeof ri);
	if (parse_http_request(buf, (int)end, &ri) <= 0)
		return 0;
	for (int i = 0; i < ri.num_headers; i++) {
		static const char *const tokens[] = {"close", "keep-alive", "upgrade", "websocket"};
		for (size_t t = 0; t < 4; t++)
			REQUIRE(header_has_token(ri.http_headers[i].value, tokens[t]) ==
			        reference_has_token(ri.http_headers[i].value, tokens[t]));
	}
	const char *connection = get_header(ri.http_headers, ri.num_headers, "Connection");
	bool close = connection && reference_has_token(connection, "close");
	bool keep = connection && reference_has_token(connection, "keep-alive");
	REQUIRE(request_wants_close(ri.http_version, connection) ==
	        (close || (!keep && strcmp(ri.http_version, "1.1") != 0)));

	const char *q = strchr(ri.request_uri, '?');
	const char *query = q ? q + 1 : "";
	check_query(query);
	char sid[SID_LEN + 1];
	int n = query_get(query, "sid", sid, sizeof sid);
	room_lock_acquire();
	struct session *by_head = head_session(p, end);
	struct session *by_query = n > 0 ? session_find(sid) : NULL;
	room_unlock();
	REQUIRE(by_head == NULL || by_head == known);
	if (plain_sid(p, end, query))
		REQUIRE(by_head == by_query);
	return 0;
}
