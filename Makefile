SHELL := /bin/bash

# lua-flowservice. The two commands of the README:
#   make demo   re-trigger a failed run against the local fake Flow Service
#   make test   the whole suite under Lua 5.4, 5.3, 5.1 and LuaJIT, then with
#               AddressSanitizer and UBSan, then under valgrind (Lua 5.4),
#               then each fuzz target for 20 s, then luacheck (.luacheckrc)
#   make fuzz   each fuzz target for FUZZ_SECONDS (default 300)
# Both install what is missing (Debian packages) first.

LUA          ?= lua5.4
BUSTED       ?= /usr/bin/busted
BUILD        := build
TREE         := $(BUILD)/tree
ROCKSPEC     := flowservice-scm-1.rockspec
VERSION      := 0.2.0
RELEASE      := rockspecs/flowservice-$(VERSION)-1.rockspec
CURL_INCDIR  ?= $(patsubst %/curl/curl.h,%,$(firstword $(wildcard /usr/include/*/curl/curl.h /usr/include/curl/curl.h)))
STRICT       := -std=c99 -Wall -Wextra -Werror
CFLAGS       ?= -O2 -g
SOURCES      := src/core.c src/engine.c src/journal.c src/request.c src/signals.c src/wire.c
HEADERS      := src/compat.h src/engine.h src/internal.h src/journal.h src/request.h src/signals.h src/wire.h
# The PostgreSQL journal's rock (flowservice.pg over libpq), built into the
# same trees and profiles when libpq-dev is installed; the main rock needs none.
PG_ROCKSPEC  := flowservice-postgresql-scm-1.rockspec
PQ_INCDIR    ?= $(shell pg_config --includedir 2>/dev/null || echo /usr/include/postgresql)
HAVE_PQ      := $(wildcard $(PQ_INCDIR)/libpq-fe.h)
LUAJIT_INC   := /usr/include/luajit-2.1
LUA51_INC    := /usr/include/lua5.1

# Loopback servers must never be reached through a proxy from the environment.
NO_PROXY_ENV := env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy
TEST_LOG     := $(BUILD)/test-results.tap

.PHONY: lint test-lint env rock all deps build trees compat asan noprereq testlib demo test test-lua test-lua5.3 \
        test-lua5.1 test-luajit test-asan test-noprereq test-valgrind bench bench-sandbox bench-postgresql \
        bench-nginx bench-nginx-callgrind bench-tick bench-callgrind clean fuzzers fuzz test-fuzz

all: build

deps:
	@sh .ci/deps

# The real install path: luarocks builds and installs the rock, one tree per
# Lua version (build/tree for 5.4; the 5.1 one also serves LuaJIT and nginx).
ROCK_DEPS := $(SOURCES) $(HEADERS) src/verify.c $(ROCKSPEC) lua/flowservice.lua lua/flowservice/*.lua bin/flowservice \
             lua/flowservice/cli/*.lua lua/flowservice/cli/commands/*.lua doc/flowservice.1

# $(call rock,LUA_VERSION,TREE)
define rock
	@mkdir -p $(BUILD)
	@rm -f src/*.o
	luarocks --lua-version=$(1) make --tree=$(2) --deps-mode=none \
	  CURL_INCDIR=$(CURL_INCDIR) CFLAGS="$(CFLAGS) -fPIC $(STRICT)" $(ROCKSPEC) >$(BUILD)/luarocks-$(1).log 2>&1 \
	  || { cat $(BUILD)/luarocks-$(1).log; exit 1; }
	@rm -f src/*.o; rm -rf flowservice
endef

# $(call pg_rock,LUA_VERSION,TREE): the PostgreSQL rock, after the main one
define pg_rock
	@mkdir -p $(BUILD)
	@rm -f src/*.o
	luarocks --lua-version=$(1) make --tree=$(2) --deps-mode=none \
	  PQ_INCDIR=$(PQ_INCDIR) CFLAGS="$(CFLAGS) -fPIC $(STRICT)" $(PG_ROCKSPEC) >$(BUILD)/luarocks-pg-$(1).log 2>&1 \
	  || { cat $(BUILD)/luarocks-pg-$(1).log; exit 1; }
	@rm -f src/*.o; rm -rf flowservice
endef

PG_54 := $(if $(HAVE_PQ),$(TREE)/lib/lua/5.4/flowservice/pg.so)
PG_53 := $(if $(HAVE_PQ),$(BUILD)/tree-5.3/lib/lua/5.3/flowservice/pg.so)
PG_51 := $(if $(HAVE_PQ),$(BUILD)/tree-5.1/lib/lua/5.1/flowservice/pg.so)
PG_ASAN := $(if $(HAVE_PQ),$(BUILD)/asan/flowservice/pg.so)
PG_ROCK_DEPS := src/pg.c src/compat.h $(PG_ROCKSPEC) lua/flowservice/journal_pg.lua

build: $(TREE)/lib/lua/5.4/flowservice/core.so $(PG_54)
trees: build $(BUILD)/tree-5.3/lib/lua/5.3/flowservice/core.so $(BUILD)/tree-5.1/lib/lua/5.1/flowservice/core.so \
  $(PG_53) $(PG_51)

$(TREE)/lib/lua/5.4/flowservice/pg.so: $(PG_ROCK_DEPS) $(TREE)/lib/lua/5.4/flowservice/core.so
	$(call pg_rock,5.4,$(TREE))

$(BUILD)/tree-5.3/lib/lua/5.3/flowservice/pg.so: $(PG_ROCK_DEPS) $(BUILD)/tree-5.3/lib/lua/5.3/flowservice/core.so
	$(call pg_rock,5.3,$(BUILD)/tree-5.3)

$(BUILD)/tree-5.1/lib/lua/5.1/flowservice/pg.so: $(PG_ROCK_DEPS) $(BUILD)/tree-5.1/lib/lua/5.1/flowservice/core.so
	$(call pg_rock,5.1,$(BUILD)/tree-5.1)

$(TREE)/lib/lua/5.4/flowservice/core.so: $(ROCK_DEPS)
	$(call rock,5.4,$(TREE))

$(BUILD)/tree-5.3/lib/lua/5.3/flowservice/core.so: $(ROCK_DEPS)
	$(call rock,5.3,$(BUILD)/tree-5.3)

$(BUILD)/tree-5.1/lib/lua/5.1/flowservice/core.so: $(ROCK_DEPS)
	$(call rock,5.1,$(BUILD)/tree-5.1)

# A source rock of the release (build/rock/flowservice-VERSION-1.src.rock):
# the files git tracks (as they are in the work tree) in
# lua-flowservice-VERSION.tar.gz, packed by luarocks pack with the release
# rockspec (given the local tarball to pack, then put back as it is).
# The PostgreSQL journal's rock (rockspecs/flowservice-postgresql-VERSION-1)
# is packed from the same tarball, beside it.
SRC_ROCK := $(BUILD)/rock/flowservice-$(VERSION)-1.src.rock
PG_RELEASE := rockspecs/flowservice-postgresql-$(VERSION)-1.rockspec
PG_SRC_ROCK := $(BUILD)/rock/flowservice-postgresql-$(VERSION)-1.src.rock
rock: $(SRC_ROCK)

# $(call pack,ROCK_NAME,RELEASE_ROCKSPEC)
define pack
	mkdir -p $(BUILD)/rock/pack
	sed 's|^  url = .*|  url = "file://$(CURDIR)/$(BUILD)/rock/lua-flowservice-$(VERSION).tar.gz",|' $(2) \
	  >$(BUILD)/rock/pack/$(1)-$(VERSION)-1.rockspec
	cd $(BUILD)/rock/pack && luarocks --lua-version=5.4 pack $(1)-$(VERSION)-1.rockspec >/dev/null
	mv $(BUILD)/rock/pack/$(1)-$(VERSION)-1.src.rock $(BUILD)/rock/ && rm -rf $(BUILD)/rock/pack
	cp $(2) $(BUILD)/rock/ && cd $(BUILD)/rock && zip -q $(1)-$(VERSION)-1.src.rock $(1)-$(VERSION)-1.rockspec
endef

$(SRC_ROCK): $(ROCK_DEPS) $(PG_ROCK_DEPS) $(RELEASE) $(PG_RELEASE)
	@rm -rf $(BUILD)/rock && mkdir -p $(BUILD)/rock
	git ls-files -co --exclude-standard | tar -czf $(BUILD)/rock/lua-flowservice-$(VERSION).tar.gz \
	  --transform 's,^,lua-flowservice-$(VERSION)/,' -T -
	$(call pack,flowservice,$(RELEASE))
	$(call pack,flowservice-postgresql,$(PG_RELEASE))
	@echo "$(SRC_ROCK) $(PG_SRC_ROCK)"

# The same sources against the Lua 5.1 and LuaJIT headers (OpenResty runs LuaJIT).
compat: $(BUILD)/luajit/flowservice/core.so $(BUILD)/lua51/flowservice/core.so \
        $(BUILD)/luajit/flowservice/verify.so $(BUILD)/lua51/flowservice/verify.so

$(BUILD)/luajit/flowservice/core.so: $(SOURCES) $(HEADERS)
	@mkdir -p $(@D)
	gcc $(CFLAGS) -fPIC $(STRICT) -shared -I$(LUAJIT_INC) -I$(CURL_INCDIR) -o $@ $(SOURCES) -lcurl

$(BUILD)/lua51/flowservice/core.so: $(SOURCES) $(HEADERS)
	@mkdir -p $(@D)
	gcc $(CFLAGS) -fPIC $(STRICT) -shared -I$(LUA51_INC) -I$(CURL_INCDIR) -o $@ $(SOURCES) -lcurl

# flowservice.verify (src/verify.c, OpenSSL's libcrypto): its own .so.
$(BUILD)/luajit/flowservice/verify.so: src/verify.c src/compat.h
	@mkdir -p $(@D)
	gcc $(CFLAGS) -fPIC $(STRICT) -shared -I$(LUAJIT_INC) -o $@ src/verify.c -lcrypto

$(BUILD)/lua51/flowservice/verify.so: src/verify.c src/compat.h
	@mkdir -p $(@D)
	gcc $(CFLAGS) -fPIC $(STRICT) -shared -I$(LUA51_INC) -o $@ src/verify.c -lcrypto

# The core as it builds on a libcurl without CURLOPT_PREREQFUNCTION (< 7.80):
# re-triggers get fresh connections that are never reused, so libcurl has
# nothing to resend them on; and as on a system without epoll: the socket
# set is an array polled with poll(2); and without MADV_WIPEONFORK: fork
# checks by getpid(), a getrandom() per request id. The client, bulk,
# stepped, events and exactly-once specs run against it.
noprereq: $(BUILD)/noprereq/flowservice/core.so

$(BUILD)/noprereq/flowservice/core.so: $(SOURCES) $(HEADERS)
	@mkdir -p $(@D)
	gcc $(CFLAGS) -DFS_NO_PREREQ -DFS_NO_EPOLL -DFS_NO_WIPEONFORK -fPIC $(STRICT) -shared -I/usr/include/lua5.4 -I$(CURL_INCDIR) -o $@ $(SOURCES) -lcurl

# The core and a Lua 5.4 interpreter built with AddressSanitizer and UBSan;
# the sanitizers live in the interpreter, so processes the tests start
# (curl, nginx) are not touched.
SANITIZE := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow
LUA54_STATIC := $(firstword $(wildcard /usr/lib/*/liblua5.4.a /usr/lib/liblua5.4.a))
asan: $(BUILD)/asan/flowservice/core.so $(BUILD)/asan/flowservice/verify.so $(BUILD)/asan/asan-lua $(PG_ASAN)

$(BUILD)/asan/flowservice/pg.so: src/pg.c src/compat.h
	@mkdir -p $(@D)
	gcc $(SANITIZE) -fPIC $(STRICT) -shared -I/usr/include/lua5.4 -I$(PQ_INCDIR) -o $@ src/pg.c -lpq

$(BUILD)/asan/flowservice/core.so: $(SOURCES) $(HEADERS)
	@mkdir -p $(@D)
	gcc $(SANITIZE) -fPIC $(STRICT) -shared -I/usr/include/lua5.4 -I$(CURL_INCDIR) -o $@ $(SOURCES) -lcurl

$(BUILD)/asan/flowservice/verify.so: src/verify.c src/compat.h
	@mkdir -p $(@D)
	gcc $(SANITIZE) -fPIC $(STRICT) -shared -I/usr/include/lua5.4 -o $@ src/verify.c -lcrypto

$(BUILD)/asan/asan-lua: spec/support/asan_lua.c
	@mkdir -p $(@D)
	gcc $(SANITIZE) $(STRICT) -I/usr/include/lua5.4 -o $@ $< $(LUA54_STATIC) -lm -ldl -Wl,-E

# Test-only C modules (spec/support/fork.c: spec_fork), one per Lua ABI;
# LuaJIT loads the 5.1 one. .busted puts build/testlib/<version> on the cpath.
TESTLIB := $(BUILD)/testlib/5.4/spec_fork.so $(BUILD)/testlib/5.3/spec_fork.so \
           $(BUILD)/testlib/5.1/spec_fork.so
testlib: $(TESTLIB)

$(BUILD)/testlib/%/spec_fork.so: spec/support/fork.c
	@mkdir -p $(@D)
	gcc $(CFLAGS) -fPIC $(STRICT) -shared -I/usr/include/lua$* -o $@ $<

# libFuzzer targets (fuzz/): the real C sources and Lua modules inside one
# Lua 5.4 state per process, built with clang's fuzzer, ASan and UBSan.
# fuzz/reply.c includes core.c and engine.c (it reaches their static reply
# readers), so that target links only the other sources.
FUZZ_TARGETS  := request reply journal parsers webhook wire
FUZZ_SECONDS  ?= 300
FUZZ_SMOKE    := 20
FUZZ_CFLAGS   := -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
                 -fno-sanitize-recover=undefined -std=c99 -Wall -Wextra -Werror \
                 -DFS_FUZZING -DFUZZ_ROOT='"$(CURDIR)"' -I/usr/include/lua5.4 -I$(CURL_INCDIR)
FUZZ_LIBS     := $(LUA54_STATIC) -lcurl -lm -ldl -Wl,-E
FUZZ_COMMON   := fuzz/harness.c fuzz/harness.h $(HEADERS)
fuzzers: $(FUZZ_TARGETS:%=$(BUILD)/fuzz/%)

$(BUILD)/fuzz/reply: fuzz/reply.c $(FUZZ_COMMON) $(SOURCES)
	@mkdir -p $(@D)
	clang $(FUZZ_CFLAGS) -o $@ fuzz/reply.c fuzz/harness.c $(filter-out src/core.c src/engine.c,$(SOURCES)) $(FUZZ_LIBS)

# fuzz/wire.c is plain C over the nginx transport's reply reader and
# engine.c's header and body readers (no Lua state), with the head and
# chunk-line caps lowered so its inputs reach them.
$(BUILD)/fuzz/wire: fuzz/wire.c src/wire.c src/wire.h src/engine.c src/engine.h src/internal.h
	@mkdir -p $(@D)
	clang $(FUZZ_CFLAGS) -DFS_WIRE_HEAD_MAX=1024 -DFS_WIRE_CHUNK_LINE_MAX=64 -o $@ fuzz/wire.c src/wire.c src/engine.c -lcurl

# fuzz/webhook.c adds flowservice.verify (src/verify.c, libcrypto).
$(BUILD)/fuzz/webhook: fuzz/webhook.c $(FUZZ_COMMON) $(SOURCES) src/verify.c
	@mkdir -p $(@D)
	clang $(FUZZ_CFLAGS) -o $@ fuzz/webhook.c fuzz/harness.c $(SOURCES) src/verify.c $(FUZZ_LIBS) -lcrypto

$(BUILD)/fuzz/%: fuzz/%.c $(FUZZ_COMMON) $(SOURCES)
	@mkdir -p $(@D)
	clang $(FUZZ_CFLAGS) -o $@ $< fuzz/harness.c $(SOURCES) $(FUZZ_LIBS)

fuzz: deps
	@$(MAKE) --no-print-directory fuzzers
	@status=0; n=0; for t in $(FUZZ_TARGETS); do \
	  n=$$((n + 1)); bash fuzz/run.sh $$t $(FUZZ_SECONDS) $$n || status=1; \
	done; exit $$status

# luacheck (Debian's lua-check) over lua/, bin/ and spec/, by .luacheckrc.
LINT_FILES := lua bin/flowservice spec .busted .luacheckrc
lint:
	luacheck --no-color $(LINT_FILES)

# In make test: one TAP line in the log (the findings above it on failure).
test-lint:
	@mkdir -p $(BUILD)
	@if luacheck --no-color --quiet $(LINT_FILES) >$(BUILD)/luacheck.log 2>&1; then \
	  echo "ok 1 - luacheck" | tee -a $(TEST_LOG); \
	else \
	  cat $(BUILD)/luacheck.log; echo "not ok 1 - luacheck" | tee -a $(TEST_LOG); exit 1; \
	fi

# The smoke in make test: 20 s a target, one TAP line each in the log.
test-fuzz: fuzzers
	@status=0; n=0; for t in $(FUZZ_TARGETS); do \
	  n=$$((n + 1)); bash fuzz/run.sh $$t $(FUZZ_SMOKE) $$n | tee -a $(TEST_LOG); \
	  [ $${PIPESTATUS[0]} -eq 0 ] || status=1; \
	done; exit $$status

# The lines that put build/tree's command on the PATH and its modules on
# lua5.4's paths: eval "$(make -s env)"
env:
	@luarocks --lua-version=5.4 path --tree=$(CURDIR)/$(TREE)

demo: deps
	@mkdir -p $(BUILD)
	@$(MAKE) --no-print-directory build
	@$(NO_PROXY_ENV) $(LUA) examples/demo.lua

test: deps
	@mkdir -p $(BUILD)
	@$(MAKE) --no-print-directory trees compat asan noprereq testlib fuzzers
	@rm -f $(TEST_LOG)
	@status=0; \
	for step in test-lua test-lua5.3 test-lua5.1 test-luajit test-asan test-noprereq test-valgrind test-fuzz test-lint; do \
	  $(MAKE) --no-print-directory $$step || status=1; \
	done; \
	echo; echo "$$(grep -c '^ok ' $(TEST_LOG)) passed, $$(grep -c '^not ok ' $(TEST_LOG)) failed"; \
	exit $$status

# Each step appends busted's TAP lines to the log the final count reads.
test-lua: build testlib
	@mkdir -p $(BUILD)
	$(NO_PROXY_ENV) $(LUA) $(BUSTED) --ignore-lua -o TAP | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

test-lua5.3: trees testlib
	$(NO_PROXY_ENV) lua5.3 $(BUSTED) --ignore-lua --run=lua53 -o TAP | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

test-lua5.1: trees testlib
	$(NO_PROXY_ENV) lua5.1 $(BUSTED) --ignore-lua --run=lua51 -o TAP | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

test-luajit: trees compat testlib
	$(NO_PROXY_ENV) luajit $(BUSTED) --ignore-lua --run=luajit -o TAP | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

test-asan: asan testlib
	$(NO_PROXY_ENV) ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(BUILD)/asan/asan-lua $(BUSTED) --ignore-lua --run=asan -o TAP | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

test-noprereq: noprereq testlib
	$(NO_PROXY_ENV) $(LUA) $(BUSTED) --ignore-lua --run=noprereq -o TAP | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

test-valgrind: build testlib
	$(NO_PROXY_ENV) FLOWSERVICE_UNDER_VALGRIND=1 sh spec/support/valgrind.sh $(BUSTED) --ignore-lua --run=valgrind -o TAP \
	  | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

clean:
	rm -rf $(BUILD) flowservice src/*.o

# Speed against the C floor, LuaSocket/LuaSec and the curl CLI, then memory
# over 100,000 calls (bench/run.lua: BENCH_N, ...), then the bulk job's speed
# (bench/bulk.lua: BULK_RUNS, ...).
bench: deps
	@sh .ci/deps lua-socket lua-sec lua-curl
	@$(MAKE) --no-print-directory trees
	$(NO_PROXY_ENV) $(LUA) bench/run.lua
	$(NO_PROXY_ENV) $(LUA) bench/run.lua memory
	$(NO_PROXY_ENV) $(LUA) bench/bulk.lua

# The bulk job with the PostgreSQL journal (a PostgreSQL of its own) beside
# the file journal and the ideal.
bench-postgresql: build
	$(NO_PROXY_ENV) BULK_POSTGRESQL=1 BULK_SEQUENTIAL=0 $(LUA) bench/bulk.lua

# The whole sandbox: retry-failed --all-flows over 20 flows and 1,000 failed
# runs at 50 ms, and max_active shown holding (bench/sandbox.lua).
bench-sandbox: build
	$(NO_PROXY_ENV) $(LUA) bench/sandbox.lua

# Instructions per call under callgrind: the C floor, the client (Lua 5.4
# and LuaJIT) and lua-curl, each at two call counts (bench/callgrind.lua).
bench-callgrind: deps
	@sh .ci/deps lua-curl
	@$(MAKE) --no-print-directory trees
	$(NO_PROXY_ENV) $(LUA) bench/callgrind.lua

# Inside nginx: one worker, wrk -c 100 and -c 1000, each request one
# re-trigger against a backend answering after 50 ms, the shared client
# against a hand-written ngx.socket.tcp keep-alive POST and issue 13's sketch
# of the pump (bench/nginx.lua:
# BENCH_NGINX_CONNS, BENCH_NGINX_SECONDS, BENCH_NGINX_ROUNDS, ...).
bench-nginx: deps
	@sh .ci/deps wrk
	@$(MAKE) --no-print-directory trees
	$(NO_PROXY_ENV) $(LUA) bench/nginx.lua

# The same worker's handlers under callgrind: instructions and simulated
# cache misses per request, in all and by object (bench/nginx_callgrind.lua:
# BENCH_NGINX_CG_ONLY, BENCH_NGINX_CG_ROUNDS, BENCH_NGINX_CG_SECONDS, ...).
bench-nginx-callgrind: deps
	@sh .ci/deps wrk
	@$(MAKE) --no-print-directory trees
	$(NO_PROXY_ENV) $(LUA) bench/nginx_callgrind.lua

# The pump's idle tick: one client:step() with 100 and 1000 re-triggers in
# flight and nothing ready (bench/tick.lua).
bench-tick: build
	$(NO_PROXY_ENV) LUA_PATH="$(BUILD)/tree/share/lua/5.4/?.lua;;" LUA_CPATH="$(BUILD)/tree/lib/lua/5.4/?.so;;" \
	  $(LUA) bench/tick.lua
