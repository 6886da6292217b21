# Fulcrum: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go

.PHONY: test deps vet build demo bench bench-peers fuzz clean install

# Every test: installs what the tests need when it is missing, then vet + race tests
# (the fuzz seed corpora run as ordinary tests), then the memory bounds once more without the
# race detector, which inflates goroutine stacks.
test: deps vet
	$(GO) test -race -count=1 -timeout 20m ./...
	$(GO) test -count=1 -run 'Memory' ./listener/l4 ./listener/conformance

# Tools the tests talk to as real peers. CI runs as root on a clean machine.
TEST_PACKAGES := softhsm2 opensc curl openssl haproxy nginx hey etcd-server etcd-client systemd prometheus slowhttptest testssl.sh chromium wrk nghttp2-client
deps:
	@missing=""; \
	for p in $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

vet:
	$(GO) vet ./...

# The release name in `fulcrum --version`; the module version and commit come from the build.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null)
build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o bin/fulcrum ./cmd/fulcrum
	$(GO) build -o bin/fulcrum-echo ./cmd/fulcrum-echo

# make install [PREFIX=/usr/local] [DESTDIR=]: the binary, and the systemd unit where systemd
# looks for local units (PREFIX/lib/systemd/system), its paths rewritten to PREFIX.
PREFIX ?= /usr/local
install: build
	install -D -m 0755 bin/fulcrum $(DESTDIR)$(PREFIX)/bin/fulcrum
	install -d $(DESTDIR)$(PREFIX)/lib/systemd/system
	sed 's#/usr/local/bin/fulcrum#$(PREFIX)/bin/fulcrum#g' configs/systemd/fulcrum.service > $(DESTDIR)$(PREFIX)/lib/systemd/system/fulcrum.service
	chmod 0644 $(DESTDIR)$(PREFIX)/lib/systemd/system/fulcrum.service
	@echo "installed $(DESTDIR)$(PREFIX)/bin/fulcrum and $(DESTDIR)$(PREFIX)/lib/systemd/system/fulcrum.service (see the unit's header for the rest)"

# The demo: three sample back ends and Fulcrum with configs/quickstart.toml, in the foreground.
# Ctrl-C stops Fulcrum, and the trap stops the back ends.
demo: build
	@set -m; pids=""; trap 'kill $$pids 2>/dev/null' EXIT INT TERM; \
	for i in 1 2 3; do ./bin/fulcrum-echo -listen 127.0.0.1:910$$i -name backend-$$i & pids="$$pids $$!"; done; \
	echo; echo "Fulcrum demo: HTTP on 127.0.0.1:8080, HTTPS on 127.0.0.1:8443, admin on 127.0.0.1:9900. Try:"; \
	echo "  curl -s http://127.0.0.1:8080/hello                 # round robin across backend-1..3"; \
	echo "  curl -si http://127.0.0.1:8080/one/x                # path rule: always backend-1, with a response header"; \
	echo "  curl -si http://127.0.0.1:8080/maintenance          # fixed response"; \
	echo "  curl -s --cacert configs/state/authorities/demo-ca.pem https://localhost:8443/  # TLS from the built-in CA"; \
	echo "  curl -s http://127.0.0.1:9900/admin/targets          # health (or open http://127.0.0.1:9900/ for the status page)"; \
	echo "  hey -z 10s -c 50 http://127.0.0.1:8080/              # load"; \
	echo "  curl -s -X POST http://127.0.0.1:9900/admin/reload  # live reload (as SIGHUP does)"; \
	echo "Access log (JSON lines): tail -f configs/state/access.log"; echo; \
	./bin/fulcrum -config configs/quickstart.toml

# Load-test recipe: sample back ends, Fulcrum pinned to CPU 1 (GOMAXPROCS=1), wrk or hey on CPU 0,
# plain HTTP, HTTPS and TCP pass-through next to the same load straight to a back end, 10 s each.
# Observation cost: make bench BENCH_FLAGS='-observe both -reps 3'
BENCH_FLAGS ?=
bench: build
	@command -v wrk >/dev/null || command -v hey >/dev/null || { echo "make bench needs wrk or hey (apt-get install wrk)"; exit 1; }
	$(GO) run ./cmd/fulcrum-bench -fulcrum bin/fulcrum -echo bin/fulcrum-echo $(BENCH_FLAGS)

# The event-loop prototype behind the README's "Choosing the I/O model", kept to reproduce that
# comparison: its own module (not a dependency of Fulcrum), built to bin/ioproto and tested.
.PHONY: ioproto
ioproto:
	cd cmd/fulcrum-bench/ioproto && $(GO) build -o ../../../bin/ioproto . && $(GO) test -count=1 .

# Fulcrum side by side with nginx and HAProxy (cmd/fulcrum-bench peers): each proxy pinned to
# CPU 1 with one worker/thread (GOMAXPROCS=1), an nginx origin and the load generators on CPU 0;
# h1, tls, h2, rate, idle, idle-tls; prints the README's tables. Installs the Debian packages
# it needs when they are missing, as deps does. A subset or more repetitions:
#   make bench-peers BENCH_PEERS_FLAGS='-only h1,tls -reps 3 -duration 10s'
BENCH_PEERS_PACKAGES := nginx haproxy wrk nghttp2-client hey util-linux
BENCH_PEERS_FLAGS ?=
bench-peers: build
	@missing=""; \
	for p in $(BENCH_PEERS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(GO) run ./cmd/fulcrum-bench peers -fulcrum bin/fulcrum $(BENCH_PEERS_FLAGS)

# Native fuzzing beyond the seed corpus, 30 s per target: make fuzz
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 30s $$pkg || exit 1; \
	  done; \
	done

clean:
	rm -rf bin
