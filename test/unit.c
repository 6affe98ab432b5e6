/*
 * Unit tests for chatroom's pure parts: JSON scanning and stamping, UTF-8 and UTF-16
 * counting, base64, SHA-1, Engine.IO payload framing, Socket.IO packet parsing, the
 * string map, the nickname pool and the timer heap. It includes chatroom.c itself, so
 * it tests the very code the server runs. The network is tested elsewhere, for real.
 */
#define CHATROOM_NO_MAIN
#include "../chatroom.c"

/* The sanitizer build also checks that compared or subtracted pointers point into one
 * object (-fsanitize=pointer-compare,pointer-subtract), which needs this option. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "detect_invalid_pointer_pairs=2"; }

static int failures, checks;

#define CHECK(cond)                                                                    \
	do {                                                                               \
		checks++;                                                                      \
		if (!(cond)) {                                                                 \
			failures++;                                                                \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
		}                                                                              \
	} while (0)

#define CHECK_STR(got, want)                                                           \
	do {                                                                               \
		checks++;                                                                      \
		if (strcmp((got), (want)) != 0) {                                              \
			failures++;                                                                \
			fprintf(stderr, "%s:%d: got  %s\n%*swant %s\n", __FILE__, __LINE__, (got), \
			        (int)strlen(__FILE__) + 8, "", (want));                            \
		}                                                                              \
	} while (0)

static bool valid(const char *s) { return json_check(s, strlen(s), NULL); }

static void test_json_check(void)
{
	const char *good[] = {"0", "-0.5e+10", "\"\"", "\"\\u00e9\\n\"", "[]", "{}", " [1, {\"a\":[null,true,false]}] ",
	                      "\"é😀\"", "123456789012345678901234567890", "{\"a\":1,\"a\":2}"};
	for (size_t i = 0; i < sizeof good / sizeof *good; i++)
		CHECK(valid(good[i]));
	const char *bad[] = {"", " ", "[", "[1,]", "{\"a\"}", "{a:1}", "01", "1.", "-", ".5", "1e",
	                     "tru", "nul", "\"\\x\"", "\"\\u12\"", "\"a", "[1] [2]", "\"\x01\"",
	                     "\"\xff\"", "\"\xed\xa0\x80\"", "{\"a\":1,}", "NaN", "[1 2]"};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		checks++;
		if (valid(bad[i])) {
			failures++;
			fprintf(stderr, "json_check accepted bad input #%zu\n", i);
		}
	}
	char deep[2 * JSON_MAX_DEPTH + 3];
	memset(deep, '[', JSON_MAX_DEPTH);
	memset(deep + JSON_MAX_DEPTH, ']', JSON_MAX_DEPTH);
	deep[2 * JSON_MAX_DEPTH] = 0;
	CHECK(valid(deep)); /* exactly the limit */
	char deeper[2 * JSON_MAX_DEPTH + 3];
	memset(deeper, '[', JSON_MAX_DEPTH + 1);
	memset(deeper + JSON_MAX_DEPTH + 1, ']', JSON_MAX_DEPTH + 1);
	deeper[2 * JSON_MAX_DEPTH + 2] = 0;
	CHECK(!valid(deeper));

	struct json_shape sh;
	const char *ev = "[\"msg\", {\"a\":1}, 3]";
	CHECK(json_check(ev, strlen(ev), &sh));
	CHECK(sh.kind == '[' && sh.count == 3);
	CHECK(sh.item[0].n == 5 && memcmp(sh.item[0].p, "\"msg\"", 5) == 0);
	CHECK(sh.item[1].n == 7 && sh.item[1].p[0] == '{');
	CHECK(json_check("-1", 2, &sh) && sh.kind == '0');
}

static void test_json_strings(void)
{
	char out[32];
	const char *lit = "\"m\\u0073g\\ud83d\\ude00\\n\"";
	int n = json_string_text((struct json_span){lit, strlen(lit)}, out, sizeof out);
	CHECK(n == 8 && memcmp(out, "msg\xf0\x9f\x98\x80\n", 8) == 0);
	const char *nul = "\"a\\u0000\"";
	CHECK(json_string_text((struct json_span){nul, strlen(nul)}, out, sizeof out) == -1);
	const char *lone = "\"\\ud800\"";
	CHECK(json_string_text((struct json_span){lone, strlen(lone)}, out, sizeof out) == -1);
	const char *longer = "\"usernameusername\"";
	CHECK(json_string_text((struct json_span){longer, strlen(longer)}, out, 8) == -1);

	struct buf b = {0};
	json_put_string(&b, "a\"b\\c\n\x01é");
	buf_addc(&b, 0);
	CHECK_STR(b.p, "\"a\\\"b\\\\c\\u000a\\u0001é\"");
	buf_free(&b);
}

static char *stamp(const char *obj, const char *name)
{
	static char out[256];
	struct buf b = {0};
	json_stamp_username(&b, (struct json_span){obj, strlen(obj)}, name);
	snprintf(out, sizeof out, "%.*s", (int)b.len, b.p);
	buf_free(&b);
	CHECK(valid(out));
	return out;
}

static void test_stamp_username(void)
{
	CHECK_STR(stamp("{}", "Otter"), "{\"username\":\"Otter\"}");
	CHECK_STR(stamp("{\"action\":\"send msg\",\"username\":\"Otter\",\"msg\":\"hi\"}", "Otter"),
	          "{\"action\":\"send msg\",\"username\":\"Otter\",\"msg\":\"hi\"}");
	CHECK_STR(stamp("{ \"msg\" : [1, 2] }", "A\"B"), "{\"msg\" : [1, 2],\"username\":\"A\\\"B\"}");
	CHECK_STR(stamp("{\"username\":\"x\",\"a\":1,\"username\":\"y\",\"user\\u006eame\":\"z\"}", "Q"),
	          "{\"username\":\"Q\",\"a\":1}");
	CHECK_STR(stamp("{\"u\":{\"username\":\"inner\"}}", "Q"),
	          "{\"u\":{\"username\":\"inner\"},\"username\":\"Q\"}");
}

static void test_utf8(void)
{
	CHECK(utf8_valid("", 0));
	CHECK(utf8_valid("héllo 你好 😀", strlen("héllo 你好 😀")));
	CHECK(!utf8_valid("\xc0\xaf", 2));         /* overlong '/' */
	CHECK(!utf8_valid("\xed\xa0\x80", 3));     /* a surrogate */
	CHECK(!utf8_valid("\xf4\x90\x80\x80", 4)); /* above U+10FFFF */
	CHECK(!utf8_valid("\xe4\xbd", 2));         /* cut short */
	CHECK(!utf8_valid("\x80", 1));
	CHECK(utf16_length("a😀é", strlen("a😀é")) == 4);
	const char *s = "a😀b";
	CHECK(utf16_prefix_bytes(s, strlen(s), 3) == 5);
	CHECK(utf16_prefix_bytes(s, strlen(s), 2) == SIZE_MAX); /* inside the pair */
	CHECK(utf16_prefix_bytes(s, strlen(s), 5) == SIZE_MAX); /* past the end */
}

static void test_base64_sha1(void)
{
	struct buf b = {0};
	base64_encode(&b, (const unsigned char *)"\x01\x02\x03\x04", 4);
	buf_addc(&b, 0);
	CHECK_STR(b.p, "AQIDBA==");
	buf_free(&b);
	CHECK(base64_decode(&b, "AQIDBA==", 8) && b.len == 4 && memcmp(b.p, "\x01\x02\x03\x04", 4) == 0);
	buf_free(&b);
	CHECK(!base64_decode(&b, "AQ*D", 4));
	buf_free(&b);
	char accept[29];
	ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", accept); /* RFC 6455, section 1.3 */
	CHECK_STR(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
	unsigned char d[20];
	sha1("abc", 3, d);
	CHECK(d[0] == 0xa9 && d[1] == 0x99 && d[19] == 0x9d);
	char million[1000] = {0};
	memset(million, 'a', sizeof million);
	sha1(million, 1000, d); /* crosses block boundaries */
	CHECK(d[0] == 0x29 && d[1] == 0x1e && d[19] == 0xba);
}

/* Engine.IO payloads */
static struct buf seen;
static bool collect(struct session *s, char type, const char *data, size_t len, bool binary)
{
	(void)s;
	buf_printf(&seen, "%c%c:", binary ? 'B' : 'T', type);
	buf_add(&seen, data, len);
	buf_addc(&seen, '|');
	return true;
}

static void gather_flatten(const struct gather *g, struct buf *out)
{
	struct iovec iov[GATHER_PIECES];
	int n = gather_iov(g, 0, iov);
	for (int i = 0; i < n; i++)
		buf_add(out, iov[i].iov_base, iov[i].iov_len);
}

static bool encode(struct buf *out, int eio, bool b64, const struct packet *pk, int n)
{
	struct gather g = {0};
	bool binary = payload_gather(&g, eio, b64, pk, n);
	out->len = 0;
	gather_flatten(&g, out);
	gather_free(&g);
	return binary;
}

static const char *decode(int eio, const char *body, size_t len, bool binary_body, bool *ok)
{
	static char out[512];
	struct session s = {.eio = eio};
	seen.len = 0;
	*ok = payload_decode(&s, body, len, binary_body, collect);
	snprintf(out, sizeof out, "%.*s", (int)seen.len, seen.p ? seen.p : "");
	return out;
}

static void test_payloads(void)
{
	struct blob *t1 = blob_of("4hello", 6), *t2 = blob_of("4€😀", 8), *b1 = blob_of("\x01\x02\x03\x04", 4);
	struct packet pk[] = {{t1, false}, {b1, true}, {t2, false}};
	struct buf out = {0};
	CHECK(!encode(&out, 4, false, pk, 3));
	CHECK(out.len == 6 + 1 + 9 + 1 + 8 && memcmp(out.p, "4hello\x1e" "bAQIDBA==\x1e" "4€😀", out.len) == 0);
	CHECK(!encode(&out, 3, true, pk, 3));
	CHECK(out.len == strlen("6:4hello10:b4AQIDBA==4:4€😀") &&
	      memcmp(out.p, "6:4hello10:b4AQIDBA==4:4€😀", out.len) == 0);
	CHECK(encode(&out, 3, false, pk, 3)); /* binary payload */
	const unsigned char want[] = {0, 6, 0xFF, '4', 'h', 'e', 'l', 'l', 'o', 1, 5, 0xFF, 4, 1, 2, 3, 4};
	CHECK(out.len == sizeof want + 11 && memcmp(out.p, want, sizeof want) == 0);
	/* the message bytes are the blobs', not copies */
	struct gather g = {0};
	payload_gather(&g, 4, false, pk, 3);
	CHECK(g.n == 5 && g.piece[0].p == t1->data && g.piece[4].p == t2->data);
	CHECK(g.piece[2].p == atomic_load(&b1->base64)->data);
	gather_free(&g);
	buf_free(&out);
	blob_unref(t1), blob_unref(t2), blob_unref(b1);

	bool ok;
	CHECK_STR(decode(4, "4a\x1e" "2\x1e" "bAQI=", 10, false, &ok), "T4:a|T2:|B4:\x01\x02|");
	CHECK(ok);
	decode(4, "", 0, false, &ok);
	CHECK(!ok);
	CHECK_STR(decode(4, "4a\x1e" "x", 4, false, &ok), "T4:a|");
	CHECK(!ok); /* a bad packet after a good one: the good one counts */
	decode(4, "4a\x1e", 3, false, &ok);
	CHECK(!ok);
	CHECK_STR(decode(3, "3:4😀6:b4AQI=1:2", strlen("3:4😀6:b4AQI=1:2"), false, &ok),
	          "T4:😀|B4:\x01\x02|T2:|");
	CHECK(ok);
	decode(3, "2:4😀", strlen("2:4😀"), false, &ok); /* a length ending inside a pair */
	CHECK(!ok);
	decode(3, "9:4", 3, false, &ok);
	CHECK(!ok);
	decode(3, ":4", 2, false, &ok);
	CHECK(!ok);
	const char bin[] = {0, 2, 0xFF - 256, '4', 'x', 1, 3, 0xFF - 256, 4, 9, 8};
	CHECK_STR(decode(3, bin, sizeof bin, true, &ok), "T4:x|B4:\x09\x08|");
	CHECK(ok);
	const char badbin[] = {0, 12, 0xFF - 256, '4'};
	decode(3, badbin, sizeof badbin, true, &ok);
	CHECK(!ok);
	/* A body in a block of its own size: the decoder must not form a pointer past its
	 * end (the sanitizer build's pointer-compare check sees one it compares) */
	char *exact = xstrndup("4a\x1e" "4b", 5);
	exact = xrealloc(exact, 5);
	CHECK_STR(decode(4, exact, 5, false, &ok), "T4:a|T4:b|");
	CHECK(ok);
	free(exact);
	buf_free(&seen);
}

static bool parses(const char *s, struct sio_packet *p) { return sio_parse(s, strlen(s), p); }

static bool span_eq(struct json_span a, const char *b) { return span_is(a, b); }

static void test_sio_parse(void)
{
	/* the rules of socket.io-parser 4.2, which Node's server decodes with */
	struct sio_packet p;
	CHECK(parses("0", &p) && p.type == 0 && span_eq(p.nsp, "/") && p.ack.n == 0);
	CHECK(parses("0/admin,{\"t\":1}", &p) && span_eq(p.nsp, "/admin") && p.json.n == 7);
	CHECK(parses("0/admin?x=1,", &p) && span_eq(p.nsp, "/admin?x=1")); /* the query: protocol 4's */
	CHECK(parses("2/chat,17[\"msg\",1]", &p) && span_eq(p.ack, "17") && p.shape.count == 2);
	CHECK(parses("52-[\"a\",{\"_placeholder\":true,\"num\":1}]", &p) && p.attachments == 2);
	CHECK(parses("312[]", &p) && p.type == 3 && span_eq(p.ack, "12"));
	CHECK(parses("1", &p) && p.type == 1);
	CHECK(parses("2", &p) && p.json.n == 0);                    /* no data: ignored later */
	CHECK(parses("2[1,\"x\"]", &p) && p.shape.item[0].p[0] == '1'); /* a numeric name */
	CHECK(parses("3[]", &p) && p.ack.n == 0);                   /* an ack without an id */
	CHECK(parses("21234567890123456789012[\"a\"]", &p) && span_eq(p.ack, "1234567890123456789012"));
	CHECK(parses("510-[\"a\"]", &p) && p.attachments == 10);
	CHECK(parses("2/chat", &p) && span_eq(p.nsp, "/chat") && p.json.n == 0);
	const char *bad[] = {"", "7", "x", "2{}", "2[]", "2[null]", "2[\"disconnect\"]", "0[]",
	                     "1{}", "1[]", "4", "4{}", "4\"no\"", "5[\"a\"]", "50-[\"a\"]", "511-[\"a\"]",
	                     "5999-[\"a\"]", "2[\"a\"", "2x", "3{}"};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		checks++;
		if (sio_parse(bad[i], strlen(bad[i]), &p)) {
			failures++;
			fprintf(stderr, "sio_parse accepted bad packet \"%s\"\n", bad[i]);
		}
	}
}

static bool placeholders(const char *json, int attachments)
{
	json_t *v = json_loads(json, JSON_DECODE_INT_AS_REAL, NULL);
	bool ok = placeholders_ok(v, attachments);
	json_decref(v);
	return ok;
}

static void test_placeholders(void)
{
	CHECK(placeholders("[\"a\",{\"_placeholder\":true,\"num\":0}]", 1));
	CHECK(!placeholders("[\"a\",{\"_placeholder\":true,\"num\":1}]", 1));
	CHECK(!placeholders("[\"a\",{\"_placeholder\":true,\"num\":\"0\"}]", 1));
	CHECK(!placeholders("[\"a\",{\"_placeholder\":true}]", 1));
	CHECK(!placeholders("[\"a\",{\"_placeholder\":true,\"num\":0.5}]", 1));
	CHECK(placeholders("[\"a\",{\"_placeholder\":false,\"num\":7}]", 1)); /* data, not a placeholder */
	CHECK(placeholders("[\"a\",{\"_placeholder\":1}]", 1));
	CHECK(!placeholders("[\"a\",{\"_placeholder\":{\"_placeholder\":true,\"num\":3}}]", 1));
	CHECK(!placeholders("[\"a\",{\"x\":[{\"_placeholder\":true,\"num\":-1}]}]", 1));
}

/* ["msg"] with no DATA is relayed as it is; nothing is computed from DATA it lacks (the
 * sanitizer build's pointer-subtract check catches arithmetic on the missing span). */
static void test_chat_talk_without_data(void)
{
	struct sio_packet p;
	CHECK(parses("2[\"msg\"]", &p));
	char nick[] = "Otter";
	struct session s = {.state = S_OPEN, .nick = nick};
	int flood = opt.flood_limit;
	opt.flood_limit = 0;
	chat_talk(&s, 0, &p, NULL);
	opt.flood_limit = flood;
	CHECK(history.count == 0);
}

/* However full of pongs a socket's control buffer is, our close frame fits behind them. */
static void test_close_frame_always_fits(void)
{
	static struct wsconn ws;
	ws.state = WS_OPEN;
	unsigned char ping[125] = {0};
	for (int i = 0; i < 8; i++)
		ws_control(&ws, 0xA, ping, sizeof ping);
	ws_control(&ws, 0xA, "", 0);
	ws_control(&ws, 0xA, "", 0);
	ws.ctl_off = 1; /* the kernel took part of it: what is queued must stay */
	wire.evfd = -1;
	ws_close(&ws, 1000, "test");
	CHECK(ws.ctl_len >= WS_CLOSE_FRAME);
	CHECK(memcmp(ws.ctl + ws.ctl_len - 4, "\x88\x02\x03\xe8", 4) == 0);
	ws_timed = NULL;
}

static void test_strmap(void)
{
	struct strmap m;
	strmap_init(&m, 8); /* small: collisions and wrap-around */
	char keys[8][16];
	for (int i = 0; i < 8; i++) {
		snprintf(keys[i], sizeof keys[i], "k%d", i);
		strmap_put(&m, keys[i], i);
	}
	for (int i = 0; i < 8; i++)
		CHECK(strmap_get(&m, keys[i]) == i);
	for (int i = 0; i < 8; i += 2)
		strmap_del(&m, keys[i]);
	for (int i = 0; i < 8; i++)
		CHECK(strmap_get(&m, keys[i]) == (i % 2 ? i : -1));
	CHECK(strmap_get(&m, "nope") == -1);
	free(m.slots);
}

static void test_names(void)
{
	const char *text = "\xEF\xBB\xBF  Otter \n\nHeron\r\nOtter\n\t\n";
	CHECK(names_load(text, strlen(text)) == NULL);
	CHECK(names.count == 2);
	rng_state = 12345;
	char *a = name_pick();
	name_claim(a, 1);
	char *b = name_pick();
	name_claim(b, 2);
	CHECK(strcmp(a, b) != 0);
	CHECK((strcmp(a, "Otter") == 0 || strcmp(a, "Heron") == 0));
	char *c = name_pick(); /* all taken: a suffix */
	name_claim(c, 3);
	char *d = name_pick();
	name_claim(d, 4);
	CHECK(strchr(c, '#') && strchr(d, '#') && strcmp(c, d) != 0);
	name_release(a);
	char *e = name_pick(); /* the freed list name comes back first */
	CHECK_STR(e, a);
	free(a), free(b), free(c), free(d), free(e);
	CHECK(names_load("\n \n", 3) != NULL);
	names_free();
}

static void test_timers(void)
{
	sessions_init();
	int64_t at[] = {50, 10, 40, 20, 30, 60, 5};
	for (int i = 0; i < 7; i++) {
		sessions[i].index = i;
		sessions[i].timer.pos = -1;
		timer_set(&sessions[i], at[i]);
	}
	timer_cancel(&sessions[2]);             /* 40 goes */
	timer_set(&sessions[5], 1);             /* 60 becomes the first */
	int64_t order[8], n = 0;
	struct session *s;
	while (n < 8 && (s = timer_due(1000))) {
		order[n++] = s->timer.at;
		timer_cancel(s);
	}
	int64_t want[] = {1, 5, 10, 20, 30, 50};
	CHECK(n == 6 && memcmp(order, want, sizeof want) == 0);
}

int main(void)
{
	test_json_check();
	test_json_strings();
	test_stamp_username();
	test_utf8();
	test_base64_sha1();
	test_payloads();
	test_sio_parse();
	test_placeholders();
	test_chat_talk_without_data();
	test_close_frame_always_fits();
	test_strmap();
	test_names();
	test_timers();
	printf("unit: %d checks, %d failed\n", checks, failures);
	return failures ? 1 : 0;
}
