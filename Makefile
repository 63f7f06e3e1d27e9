SHELL := /bin/bash

# lua-flowservice. The two commands of the README:
#   make demo   re-trigger a failed run against the local fake Flow Service
#   make test   the whole suite (Lua 5.4, a LuaJIT smoke test, valgrind)
# Both install what is missing (Debian packages) first.

LUA          ?= lua5.4
BUSTED       ?= /usr/bin/busted
BUILD        := build
TREE         := $(BUILD)/tree
ROCKSPEC     := flowservice-scm-1.rockspec
CURL_INCDIR  ?= $(patsubst %/curl/curl.h,%,$(firstword $(wildcard /usr/include/*/curl/curl.h /usr/include/curl/curl.h)))
STRICT       := -std=c99 -Wall -Wextra -Werror
CFLAGS       ?= -O2 -g
SOURCES      := src/core.c src/engine.c src/journal.c src/request.c
HEADERS      := src/compat.h src/engine.h src/journal.h src/request.h
LUAJIT_INC   := /usr/include/luajit-2.1
LUA51_INC    := /usr/include/lua5.1

# Loopback servers must never be reached through a proxy from the environment.
NO_PROXY_ENV := env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy
TEST_LOG     := $(BUILD)/test-results.tap

.PHONY: all deps build compat demo test test-lua test-luajit test-valgrind bench clean

all: build

deps:
	@sh .ci/deps

# The real install path: luarocks builds and installs the rock into build/tree.
build: $(TREE)/lib/lua/5.4/flowservice/core.so

$(TREE)/lib/lua/5.4/flowservice/core.so: $(SOURCES) $(HEADERS) $(ROCKSPEC) lua/flowservice.lua lua/flowservice/*.lua
	@mkdir -p $(BUILD)
	luarocks --lua-version=5.4 make --tree=$(TREE) --deps-mode=none \
	  CURL_INCDIR=$(CURL_INCDIR) CFLAGS="$(CFLAGS) -fPIC $(STRICT)" $(ROCKSPEC) >$(BUILD)/luarocks.log 2>&1 \
	  || { cat $(BUILD)/luarocks.log; exit 1; }
	@rm -f src/*.o; rm -rf flowservice

# The same sources against the Lua 5.1 and LuaJIT headers (OpenResty runs LuaJIT).
compat: $(BUILD)/luajit/flowservice/core.so $(BUILD)/lua51/flowservice/core.so

$(BUILD)/luajit/flowservice/core.so: $(SOURCES) $(HEADERS)
	@mkdir -p $(@D)
	gcc $(CFLAGS) -fPIC $(STRICT) -shared -I$(LUAJIT_INC) -I$(CURL_INCDIR) -o $@ $(SOURCES) -lcurl

$(BUILD)/lua51/flowservice/core.so: $(SOURCES) $(HEADERS)
	@mkdir -p $(@D)
	gcc $(CFLAGS) -fPIC $(STRICT) -shared -I$(LUA51_INC) -I$(CURL_INCDIR) -o $@ $(SOURCES) -lcurl

demo: deps
	@mkdir -p $(BUILD)
	@$(MAKE) --no-print-directory build
	@$(NO_PROXY_ENV) $(LUA) examples/demo.lua

test: deps
	@mkdir -p $(BUILD)
	@$(MAKE) --no-print-directory build compat
	@rm -f $(TEST_LOG)
	@status=0; \
	$(MAKE) --no-print-directory test-lua || status=1; \
	$(MAKE) --no-print-directory test-luajit || status=1; \
	$(MAKE) --no-print-directory test-valgrind || status=1; \
	echo; echo "$$(grep -c '^ok ' $(TEST_LOG)) passed, $$(grep -c '^not ok ' $(TEST_LOG)) failed"; \
	exit $$status

# Each step appends busted's TAP lines to the log the final count reads.
test-lua: build
	@mkdir -p $(BUILD)
	$(NO_PROXY_ENV) $(LUA) $(BUSTED) --ignore-lua -o TAP | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

test-luajit: build compat
	$(NO_PROXY_ENV) luajit $(BUSTED) --ignore-lua --run=luajit -o TAP | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

test-valgrind: build
	$(NO_PROXY_ENV) FLOWSERVICE_UNDER_VALGRIND=1 sh spec/support/valgrind.sh $(BUSTED) --ignore-lua --run=valgrind -o TAP \
	  | tee -a $(TEST_LOG); exit $${PIPESTATUS[0]}

clean:
	rm -rf $(BUILD) flowservice src/*.o

# Speed against the C floor, LuaSocket/LuaSec and the curl CLI, then memory
# over 100,000 calls (bench/run.lua: BENCH_N, ...), then the bulk job's speed
# (bench/bulk.lua: BULK_RUNS, ...).
bench: deps
	@sh .ci/deps lua-socket lua-sec
	@$(MAKE) --no-print-directory build
	$(NO_PROXY_ENV) $(LUA) bench/run.lua
	$(NO_PROXY_ENV) $(LUA) bench/run.lua memory
	$(NO_PROXY_ENV) $(LUA) bench/bulk.lua
