# chatroom: build, run, test.
#
#   make              builds ./chatroom
#   make run          builds it and runs it on port 5000, every interface
#   make test         builds, then runs every test against ./chatroom and again against
#                     an ASan+UBSan build; fails if any test fails
#   make conformance  the official Engine.IO and Socket.IO suites (../shared/conformance)
#   make bench        runs chatroom and Node's socket.io through the same load (minutes)
#   sudo make deps    installs what building needs (Debian, Ubuntu)
#   sudo make test-deps   installs what the tests need as well
#
# make, make run and make test install what they need themselves when it is missing (as
# root, or through sudo), saying in one line what and why; make deps and make test-deps
# are that step on its own.
#
# civetweb is compiled into chatroom.c's translation unit from its source, fetched at
# build time from Debian's package registry (apt-get source) into build/, or taken from
# CIVETWEB_SRC=/path/to/civetweb. jansson and hiredis (Redis, for --redis) come from
# libjansson-dev and libhiredis-dev, linked statically.

CC           ?= gcc
ifeq ($(origin CC),default)
CC           := gcc
endif
CFLAGS       ?= -O2 -g
BUILD        := build
CIVETWEB_SRC ?= $(BUILD)/civetweb
CIVETWEB_C   := $(CIVETWEB_SRC)/src/civetweb.c

# civetweb: HTTP only (no TLS, CGI or files), IPv6, 256 KiB worker stacks, and a
# 200 ms poll quantum (instead of 2 s) so that it stops promptly.
CIVETWEB_DEFS := -DNO_SSL -DNO_CGI -DNO_FILES -DUSE_IPV6 -DUSE_STACK_SIZE=262144 \
                 -DSOCKET_TIMEOUT_QUANTUM=200
WARNINGS      := -std=c11 -Wall -Wextra -Werror
EMBED         := -DCHATROOM_CIVETWEB_C='"$(CIVETWEB_C)"' -I$(CIVETWEB_SRC)/include \
                 $(CIVETWEB_DEFS) -Wa,-I$(CURDIR)
LIBS          := -ljansson -lhiredis
LIBS_STATIC   := -Wl,-Bstatic $(LIBS) -Wl,-Bdynamic
SANITIZE      := -fsanitize=address,undefined,pointer-compare,pointer-subtract -fno-sanitize-recover=undefined \
                 -fno-omit-frame-pointer

SOURCES := chatroom.c name.txt web/index.html Makefile

.PHONY: all run test test-all test-unit test-python test-node deps test-deps check-deps clean \
        protocol-server conformance static install bench

all: chatroom

chatroom: $(SOURCES) $(CIVETWEB_C) | check-deps
	$(CC) $(WARNINGS) $(CFLAGS) $(EMBED) -pthread -o $@ chatroom.c $(LIBS_STATIC)

$(BUILD)/chatroom-asan: $(SOURCES) $(CIVETWEB_C) | check-deps
	$(CC) $(WARNINGS) -O1 -g $(SANITIZE) $(EMBED) -pthread -o $@ chatroom.c $(LIBS)

$(BUILD)/protocol-server: test/protocol-server.c $(SOURCES) $(CIVETWEB_C) | check-deps
	$(CC) $(WARNINGS) $(CFLAGS) $(EMBED) -pthread -o $@ test/protocol-server.c $(LIBS_STATIC)

$(BUILD)/protocol-server-asan: test/protocol-server.c $(SOURCES) $(CIVETWEB_C) | check-deps
	$(CC) $(WARNINGS) -O1 -g $(SANITIZE) $(EMBED) -pthread -o $@ test/protocol-server.c $(LIBS)

$(BUILD)/unit: test/unit.c $(SOURCES) $(CIVETWEB_C) | check-deps
	$(CC) $(WARNINGS) -O1 -g $(SANITIZE) $(EMBED) -pthread -o $@ test/unit.c $(LIBS)

# Sources are fetched after check-deps: on a fresh machine it installs dpkg-dev and adds
# the deb-src entries that apt-get source needs.
$(CIVETWEB_C): | check-deps
	@.ci/fetch-source civetweb $(CIVETWEB_SRC)

check-deps:
	@CC="$(CC)" CIVETWEB_SRC="$(CIVETWEB_SRC)" .ci/install-deps --if-missing build

run: chatroom
	./chatroom

# The server the official Engine.IO and Socket.IO test suites expect: port 3000.
protocol-server: $(BUILD)/protocol-server
	$(BUILD)/protocol-server

# The official suites (mocha, from npm), against the protocol test server and its
# ASan+UBSan build; each run must end with engine.io: 24/24, socket.io: 32/32.
CONFORMANCE ?= ../shared/conformance

conformance: $(BUILD)/protocol-server $(BUILD)/protocol-server-asan
	@[ -x "$(CONFORMANCE)/run.sh" ] || { echo "chatroom: the official protocol suites are not in $(CONFORMANCE). They are the test-suite/ folders of github.com/socketio/engine.io-protocol and github.com/socketio/socket.io-protocol, with run.sh beside them: make conformance CONFORMANCE=/path/to/them"; exit 1; }
	$(CONFORMANCE)/run.sh $(BUILD)/protocol-server
	$(CONFORMANCE)/run.sh $(BUILD)/protocol-server-asan

# ---- the benchmark ----------------------------------------------------------------------
# Not a test: it takes minutes and its numbers depend on the machine. bench/run.py says at
# its top what it does; BENCH_ARGS passes options to it (e.g. BENCH_ARGS=--quick).

$(BUILD)/loadgen: bench/loadgen.c
	@mkdir -p $(BUILD)
	$(CC) -std=c11 -Wall -Wextra -Werror -O2 -o $@ bench/loadgen.c

$(BUILD)/attack: bench/attack.c
	@mkdir -p $(BUILD)
	$(CC) -std=c11 -Wall -Wextra -Werror -O2 -pthread -o $@ bench/attack.c

bench/node_modules: bench/package.json bench/package-lock.json
	@command -v npm >/dev/null || { echo "chatroom: the benchmark needs Node.js and npm. Fix: sudo apt-get install nodejs npm"; exit 1; }
	cd bench && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

bench: chatroom $(BUILD)/loadgen $(BUILD)/attack bench/node_modules
	$(PYTHON) bench/run.py $(BENCH_ARGS)

# ---- static and cross builds ----------------------------------------------------------
# make static [ARCH=x86_64|arm64|armhf] builds build/chatroom-ARCH: fully static, civetweb,
# jansson and hiredis compiled in from their sources (fetched like civetweb's, or taken
# from JANSSON_SRC=/path/to/jansson and HIREDIS_SRC=/path/to/hiredis), stripped. arm64 is the 64-bit Raspberry Pi OS (Pi
# 3, 4, 5); armhf is 32-bit ARMv7 (Pi 2 and newer). Cross compilers: Debian's
# gcc-aarch64-linux-gnu and gcc-arm-linux-gnueabihf.

NATIVE_ARCH  := $(shell uname -m | sed 's/^aarch64$$/arm64/; s/^armv7l$$/armhf/')
ARCH         ?= $(NATIVE_ARCH)
CROSS_arm64  := aarch64-linux-gnu-
CROSS_armhf  := arm-linux-gnueabihf-
CROSS_PKG_arm64 := gcc-aarch64-linux-gnu
CROSS_PKG_armhf := gcc-arm-linux-gnueabihf
cross         = $(if $(filter $(1),$(NATIVE_ARCH)),,$(CROSS_$(1)))
JANSSON_SRC  ?= $(BUILD)/jansson
HIREDIS_SRC  ?= $(BUILD)/hiredis
HIREDIS_C    := hiredis.c net.c read.c sds.c alloc.c async.c
STATIC_FLAGS := -Os -static -ffunction-sections -fdata-sections -Wl,--gc-sections

static: $(BUILD)/chatroom-$(ARCH)
	@ls -l $(BUILD)/chatroom-$(ARCH)

$(BUILD)/chatroom-%: $(SOURCES) $(CIVETWEB_C) $(JANSSON_SRC)/src/load.c $(HIREDIS_SRC)/hiredis.c \
                     .ci/jansson-config
	@command -v $(call cross,$*)gcc >/dev/null || { echo "chatroom: building for $* needs $(call cross,$*)gcc. Fix: sudo apt-get install $(CROSS_PKG_$*)"; exit 1; }
	@rm -rf $(BUILD)/static-$*
	@.ci/jansson-config $(BUILD)/static-$*/include
	cd $(BUILD)/static-$* && $(call cross,$*)gcc -Os -w -ffunction-sections -fdata-sections \
	    -DHAVE_CONFIG_H -Iinclude -c $(abspath $(JANSSON_SRC))/src/*.c
	@mkdir -p $(BUILD)/static-$*/include/hiredis
	cp $(HIREDIS_SRC)/*.h $(BUILD)/static-$*/include/hiredis/
	cd $(BUILD)/static-$* && $(call cross,$*)gcc -Os -w -ffunction-sections -fdata-sections \
	    -c $(addprefix $(abspath $(HIREDIS_SRC))/,$(HIREDIS_C))
	$(call cross,$*)gcc $(WARNINGS) $(STATIC_FLAGS) $(EMBED) -I$(BUILD)/static-$*/include \
	    -I$(JANSSON_SRC)/src -pthread -o $@ chatroom.c $(BUILD)/static-$*/*.o
	$(call cross,$*)strip $@

$(JANSSON_SRC)/src/load.c: | check-deps
	@.ci/fetch-source jansson $(JANSSON_SRC)

$(HIREDIS_SRC)/hiredis.c: | check-deps
	@.ci/fetch-source hiredis $(HIREDIS_SRC)

# ---- install --------------------------------------------------------------------------
# make install [PREFIX=/usr/local] [DESTDIR=]: the binary and its man page. For a service,
# see dist/chatroom.service.

PREFIX ?= /usr/local

install: chatroom
	install -D -m 755 chatroom $(DESTDIR)$(PREFIX)/bin/chatroom
	install -D -m 644 dist/chatroom.1 $(DESTDIR)$(PREFIX)/share/man/man1/chatroom.1

# ---- tests ----------------------------------------------------------------------------
# Every suite runs against the binary named by CHATROOM; `make test` runs them all twice.

PYTHON := /usr/bin/python3

STATIC_BINARIES := $(BUILD)/chatroom-x86_64 $(BUILD)/chatroom-arm64 $(BUILD)/chatroom-armhf

# What the tests need is installed first (if missing): the static builds need the cross
# compilers, the tests their clients.
test:
	@.ci/install-deps --if-missing test
	@$(MAKE) --no-print-directory test-all

test-all: chatroom $(BUILD)/protocol-server $(BUILD)/chatroom-asan $(BUILD)/protocol-server-asan \
      $(BUILD)/unit $(STATIC_BINARIES) $(BUILD)/loadgen
	$(MAKE) --no-print-directory test/node_modules
	$(BUILD)/unit
	$(MAKE) --no-print-directory -j2 $(FUZZ_BINARIES)
	$(MAKE) --no-print-directory fuzz-replay
	$(MAKE) --no-print-directory test-python test-node CHATROOM=$(CURDIR)/chatroom \
	        PROTOCOL_SERVER=$(CURDIR)/$(BUILD)/protocol-server
	$(MAKE) --no-print-directory test-python test-node CHATROOM=$(CURDIR)/$(BUILD)/chatroom-asan \
	        PROTOCOL_SERVER=$(CURDIR)/$(BUILD)/protocol-server-asan
	@echo "all tests passed"

test-python: test/node_modules
	CHATROOM=$(CHATROOM) PROTOCOL_SERVER=$(PROTOCOL_SERVER) $(PYTHON) -m pytest -q -p no:cacheprovider \
	        -n 3 --dist loadfile test/

test-node: test/node_modules
	CHATROOM=$(CHATROOM) PROTOCOL_SERVER=$(PROTOCOL_SERVER) node --test test/node/*.test.mjs

test/node_modules: test/package.json test/package-lock.json
	cd test && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

deps:
	.ci/install-deps build

test-deps:
	.ci/install-deps test

clean:
	rm -rf chatroom $(BUILD)/chatroom-asan $(BUILD)/unit test/__pycache__

# ---- mutation testing -----------------------------------------------------------------
# make mutate: each mutant of test/mutants.toml (a small bug that breaks one promise of the
# README or one rule of the protocols) is applied to a copy of chatroom.c or of the page,
# built in a temporary directory and run against the tests named for it; the summary says
# which survived. Not part of make test: it takes many minutes. MUTATE_ARGS passes
# options to test/mutate.py (e.g. MUTATE_ARGS="--list", or mutant ids).
.PHONY: mutate
mutate: $(CIVETWEB_C) test/node_modules | check-deps
	$(PYTHON) test/mutate.py $(MUTATE_ARGS)

# ---- fuzzing --------------------------------------------------------------------------
# make fuzz: builds the libFuzzer targets of test/fuzz/ (clang, ASan+UBSan; each says at
# its top what it fuzzes and which property it asserts) and runs each for FUZZ_SECONDS
# (default 60) on a scratch copy of its corpus; fails if any finds a crash or a broken
# property (the input is left in build/fuzz/). make fuzz-replay: each target once over
# its committed corpus, seeds and regression inputs (crash-*), in seconds.
FUZZ_TARGETS  := json payload websocket socketio base64 utf8 http
FUZZ_SECONDS  ?= 60
FUZZ_CC       ?= clang
FUZZ_FLAGS    := -std=c11 -Wall -Wextra -Werror -Wno-null-pointer-subtraction -g -O1 \
                 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
FUZZ_BINARIES := $(FUZZ_TARGETS:%=$(BUILD)/fuzz/%)

.PHONY: fuzz fuzz-replay fuzz-deps

fuzz: $(FUZZ_BINARIES)
	@test/fuzz/run.sh fuzz $(FUZZ_SECONDS) $(BUILD)/fuzz $(FUZZ_TARGETS)

fuzz-replay: $(FUZZ_BINARIES)
	@test/fuzz/run.sh replay $(BUILD)/fuzz $(FUZZ_TARGETS)

$(BUILD)/fuzz/%: test/fuzz/fuzz_%.c test/fuzz/fuzz.h $(SOURCES) $(CIVETWEB_C) | check-deps fuzz-deps
	@mkdir -p $(BUILD)/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) $(EMBED) -pthread -o $@ $< $(LIBS)

fuzz-deps:
	@echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' | \
	    $(FUZZ_CC) -fsanitize=fuzzer -x c - -o /dev/null 2>/dev/null || { echo "chatroom: fuzzing needs clang and its libFuzzer runtime. Fix: sudo apt-get install clang libclang-rt-dev"; exit 1; }

# ---- soak ------------------------------------------------------------------------------
# make soak [SOAK_MINUTES=2]: runs the ASan+UBSan build and then ./chatroom, SOAK_MINUTES
# each (SOAK_ASAN_MINUTES=N gives the sanitizer build a run of its own length), under a
# steady mix of test/soak.py (clients joining and leaving over every transport and
# upgrade, steady chat checked by observers that stay, slow readers, vanished clients,
# malformed HTTP, Engine.IO, Socket.IO and WebSocket input). It samples RSS, threads, open
# descriptors and queued bytes into build/soak-asan.csv and build/soak-normal.csv, draws
# them into test/artifacts/soak.svg (test/plot_soak.py), and fails if a resource trends
# upward after warm-up, an observer lost a message or got one out of order, the server
# did not stop cleanly, or a sanitizer said anything; soak.py's header has the exact rule.
.PHONY: soak
SOAK_MINUTES      ?= 2
SOAK_ASAN_MINUTES ?= $(SOAK_MINUTES)

soak: chatroom $(BUILD)/chatroom-asan
	@.ci/install-deps --if-missing test
	@rc=0; \
	$(PYTHON) test/soak.py --minutes $(SOAK_ASAN_MINUTES) --name asan $(BUILD)/chatroom-asan || rc=1; \
	$(PYTHON) test/soak.py --minutes $(SOAK_MINUTES) --name normal ./chatroom || rc=1; \
	$(PYTHON) test/plot_soak.py -o test/artifacts/soak.svg \
	        asan=$(BUILD)/soak-asan.csv normal=$(BUILD)/soak-normal.csv || rc=1; \
	exit $$rc

# ---- ThreadSanitizer ---------------------------------------------------------------------
# make tsan: builds build/chatroom-tsan and build/protocol-server-tsan (-fsanitize=thread,
# same sources and libraries as the ASan builds), runs against them the tests that put the
# most threads at once on the same sessions (TSAN_TESTS: upgrades racing long-polls, many
# clients joining and leaving at once, stalled, killed and flooding clients among
# chatters, garbage on the wire, shutdown while busy), then TSAN_SOAK_MINUTES (default 1;
# 0: none) of test/soak.py's mix. Every report goes to build/tsan/report.PID, and
# test/tsan_check.py sums them up: it fails if any report that test/tsan.supp does not
# suppress (races inside civetweb judged benign, each with its reason there) has a frame
# in chatroom.c. Tests and soak checks that fail under ThreadSanitizer's 5-15x slowdown
# (timing bounds; once in a while the soak's long-polling observer misses a heartbeat)
# are listed but do not fail it, unless TSAN_TESTS_MUST_PASS=1: make test and make soak
# are where they count. TSAN_DESELECT are tests that always fail that way (a 300 ms
# connect timeout, a 400 ms ping interval, a memory bound, a throughput bound).
.PHONY: tsan
TSAN_FLAGS        := -fsanitize=thread -fno-omit-frame-pointer
TSAN_OPTIONS_MAKE := halt_on_error=0 second_deadlock_stack=1 exitcode=0 history_size=4 \
                     suppressions=$(CURDIR)/test/tsan.supp log_path=$(CURDIR)/$(BUILD)/tsan/report
TSAN_SOAK_MINUTES ?= 1
TSAN_TESTS        ?= test/test_chat.py test/test_engineio.py test/test_robustness.py \
                     test/test_socketio.py test/test_http.py test/test_slow_clients.py \
                     test/test_wire_edges.py test/test_bench_smoke.py \
                     test/test_protocol.py::test_protocol_4_clients_are_in_main_at_once \
                     test/test_startup.py::test_signal_disconnects_everyone_and_exits_0_quickly
TSAN_DESELECT     ?= test/test_socketio.py::test_leaving_the_room_keeps_the_engineio_session \
                     test/test_robustness.py::test_client_that_stops_reading_is_dropped_and_hurts_nobody \
                     test/test_slow_clients.py::test_a_few_hundred_bytes_per_waiting_connection \
                     test/test_robustness.py::test_half_sent_frame_and_header_do_not_hang_anything

$(BUILD)/chatroom-tsan: $(SOURCES) $(CIVETWEB_C) | check-deps
	$(CC) $(WARNINGS) -O1 -g $(TSAN_FLAGS) $(EMBED) -pthread -o $@ chatroom.c $(LIBS)

$(BUILD)/protocol-server-tsan: test/protocol-server.c $(SOURCES) $(CIVETWEB_C) | check-deps
	$(CC) $(WARNINGS) -O1 -g $(TSAN_FLAGS) $(EMBED) -pthread -o $@ test/protocol-server.c $(LIBS)

tsan: $(BUILD)/chatroom-tsan $(BUILD)/protocol-server-tsan $(BUILD)/loadgen
	@.ci/install-deps --if-missing test
	@rm -rf $(BUILD)/tsan && mkdir -p $(BUILD)/tsan
	@rc=0; tests=0; \
	CHATROOM=$(CURDIR)/$(BUILD)/chatroom-tsan PROTOCOL_SERVER=$(CURDIR)/$(BUILD)/protocol-server-tsan \
	TSAN_OPTIONS="$(TSAN_OPTIONS_MAKE)" $(PYTHON) -m pytest -q -p no:cacheprovider \
	        -n 2 --dist loadfile $(TSAN_TESTS) $(TSAN_DESELECT:%=--deselect %) || tests=1; \
	if [ "$(TSAN_SOAK_MINUTES)" != 0 ]; then \
	    TSAN_OPTIONS="$(TSAN_OPTIONS_MAKE)" $(PYTHON) test/soak.py --minutes $(TSAN_SOAK_MINUTES) \
	        --name tsan --no-trend $(BUILD)/chatroom-tsan || tests=1; \
	fi; \
	$(PYTHON) test/tsan_check.py $(BUILD)/tsan || rc=1; \
	if [ $$tests = 1 ]; then \
	    echo "tsan: some tests or soak checks failed under ThreadSanitizer (see above)$(if $(TSAN_TESTS_MUST_PASS),,; not counted: TSAN_TESTS_MUST_PASS=1 counts them)"; \
	    $(if $(TSAN_TESTS_MUST_PASS),rc=1,:); \
	fi; \
	exit $$rc
