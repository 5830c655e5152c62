# Build and test targets. Needs only Go and a C compiler (for -race).
# `make test` also needs a RabbitMQ at AMQP_URL and rabbitmqctl on PATH:
# see CONTRIBUTING.md, "Running the tests". CI runs .ci/run, which starts one and then
# runs `make test`, `make cluster-test` and `make demo`.
#
# The repository holds several Go modules: the library (the root, the only
# one a KrakenD build pulls in) and the tool modules below, tied together
# for development by go.work. The library is vetted and tested on its own
# (GOWORK=off), with exactly the versions its go.mod gives a KrakenD build.

GO ?= go
# The race detector needs cgo; fail clearly if no C compiler is found.
CGO_ENABLED ?= 1
export CGO_ENABLED

# The modules besides the library: the gateway, the benchmark, the
# examples, the telemetry tests that need the OpenTelemetry SDK, and the
# CloudEvents test that needs the CloudEvents SDK.
TOOL_MODULES := cmd/krakend-amqp bench examples internal/oteltest internal/cetest

FUZZTIME ?= 30s
# gofmt ships with Go; found through GOROOT even when it is not on PATH.
GOFMT ?= $(shell $(GO) env GOROOT)/bin/gofmt
TEST_FLAGS ?= -race -count=1 -tags integration -timeout 20m

.DEFAULT_GOAL := test
.PHONY: test unit fuzz fmt vet lint pin check-pin tidy

## test: vet (with and without the integration tag), check-pin, then
## every test of every module, integration tests included, against the
## broker at AMQP_URL. The library's tests include the KrakenD floor check.
test: vet check-pin
	GOWORK=off $(GO) test $(TEST_FLAGS) ./...
	@set -e; for m in $(TOOL_MODULES); do \
		echo "(cd $$m && $(GO) test $(TEST_FLAGS) ./...)"; \
		(cd $$m && $(GO) test $(TEST_FLAGS) ./...); \
	done

## unit: the tests that need no broker, in every module.
unit:
	GOWORK=off $(GO) test -race ./...
	@set -e; for m in $(TOOL_MODULES); do (cd $$m && $(GO) test -race ./...); done

## fuzz: run each fuzz target for FUZZTIME: the driver block parser, the
## frame filter of the consuming connection, the message-to-request
## mapping, the failure decision with its copy, the CloudEvents
## mapping, and a delivery's fingerprint. (make test runs them over their
## seed corpus.)
fuzz:
	GOWORK=off $(GO) test -run XXX -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s ./config
	GOWORK=off $(GO) test -run XXX -fuzz '^FuzzFrames$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s ./consumer
	GOWORK=off $(GO) test -run XXX -fuzz '^FuzzRequest$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s ./driver
	GOWORK=off $(GO) test -run XXX -fuzz '^FuzzFailure$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s ./driver
	GOWORK=off $(GO) test -run XXX -fuzz '^FuzzCloudEvents$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s ./driver
	GOWORK=off $(GO) test -run XXX -fuzz '^FuzzFingerprint$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s ./driver

## fmt: rewrite the Go files in gofmt style.
fmt:
	$(GOFMT) -w .

## vet: go vet of every module, with and without the integration build
## tag. Its stdversion check holds the library to the Go of its go.mod.
vet:
	GOWORK=off $(GO) vet ./...
	GOWORK=off $(GO) vet -tags integration ./...
	GOWORK=off $(GO) vet -tags integration,cluster ./...
	@set -e; for m in $(TOOL_MODULES); do \
		echo "(cd $$m && $(GO) vet ./... && $(GO) vet -tags integration ./...)"; \
		(cd $$m && $(GO) vet ./... && $(GO) vet -tags integration ./...); \
	done

## lint: fail when a Go file is not gofmt-formatted.
lint:
	@out="$$($(GOFMT) -l .)"; \
	if [ -n "$$out" ]; then echo "not gofmt-formatted (run make fmt):"; echo "$$out"; exit 1; fi

## pin: make the tool modules require the library at its newest commit
## (see scripts/pin-library.sh); run after committing a library change
## they use, then commit.
pin:
	bash scripts/pin-library.sh

## check-pin: every tool module requires the newest commit that changed
## library code, and builds against it (a worktree of that commit), as go
## install would build it.
check-pin:
	bash scripts/check-pin.sh

## tidy: go mod tidy in every module. A tool module is tidied against this
## checkout of the library (a replace added for the run, then removed).
tidy:
	GOWORK=off $(GO) mod tidy
	@set -e; for m in $(TOOL_MODULES); do \
		rel=$$(echo $$m | sed 's#[^/][^/]*#..#g'); \
		echo "tidy $$m"; \
		(cd $$m && $(GO) mod edit -replace=github.com/krakend-contrib/async-amqp=$$rel && \
		 GOWORK=off $(GO) mod tidy; status=$$?; \
		 $(GO) mod edit -dropreplace=github.com/krakend-contrib/async-amqp; exit $$status); \
	done

# The version `krakend-amqp version` reports: the nearest tag and commit
# (git describe), or "devel" outside a git checkout.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
BIN ?= bin

.PHONY: build demo

## build: build the gateway, the sample backend and the publisher into
## $(BIN)/, the gateway stamped with $(VERSION).
build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/ ./cmd/krakend-amqp ./examples/backend ./examples/publisher

## demo: build, then run the gateway and the sample backend against the
## broker at AMQP_URL (queues and exchange of their own, deleted after),
## publish 1,000 events and print a one-line summary; fails if any is
## missing. See examples/demo.sh.
demo: build
	BIN=$(BIN) bash examples/demo.sh

# Flags for `make bench`, e.g. make bench BENCH_FLAGS='-points 16/100 -runs 5'.
BENCH_OUT ?= bench-results.txt
BENCH_FLAGS ?=

.PHONY: bench

## bench: throughput, CPU per message, latency of the driver beside the
## amqp091, net/http and Lura-pipeline ceilings, against the broker at
## AMQP_URL (queues of its own, deleted after); prints the tables and
## appends them to $(BENCH_OUT). See bench/main.go. Takes several minutes.
bench:
	$(GO) run ./bench -out $(BENCH_OUT) $(BENCH_FLAGS)

# Flags for `make cluster-test`. No -race by default: the tests report
# throughput, and the race detector's cost would land on the cores the
# nodes need; CLUSTER_TEST_FLAGS='-race -count=1 -timeout 20m' adds it.
CLUSTER_TEST_FLAGS ?= -count=1 -timeout 20m

.PHONY: cluster-test

## cluster-test: the cluster tests (build tags integration and cluster):
## three RabbitMQ nodes of their own on free loopback ports (never the
## broker at AMQP_URL), three gateways on a quorum queue, a leader node
## killed, a rolling restart, a node cut off, throughput with 1-3
## gateways. Needs rabbitmq-server and rabbitmqctl; as root, a rabbitmq
## user. About four minutes on 2 cores. See CONTRIBUTING.md.
cluster-test:
	GOWORK=off $(GO) test $(CLUSTER_TEST_FLAGS) -tags cluster -v ./internal/clustertest
	GOWORK=off $(GO) test $(CLUSTER_TEST_FLAGS) -tags 'integration cluster' -run '^TestCluster$$' -v .

# Soak settings, e.g. make soak SOAK_MESSAGES=20000 SOAK_RATE=500; the
# environment variable SOAK_BACK_PRESSURE=0 runs the agent without back-pressure.
SOAK_MESSAGES ?= 100000
SOAK_RATE ?= 1000

.PHONY: soak

## soak: not part of `make test`. SOAK_MESSAGES messages published at
## SOAK_RATE per second, a backend failing 5% of requests, connection cuts
## through a TCP proxy every 2-6 s; prints one line: delivered,
## duplicates, dead-lettered, lost (must be 0), cuts, latency p50/p99.
soak:
	SOAK_MESSAGES=$(SOAK_MESSAGES) SOAK_RATE=$(SOAK_RATE) $(GO) test -count=1 -tags 'integration soak' -run TestSoak -timeout 60m -v .

# The RabbitMQ 4.x node of `make rabbitmq4` (scripts/rabbitmq4.sh): its
# AMQP port on 127.0.0.1, and the tree it runs in (outside the checkout,
# shared by every checkout of the machine).
RABBITMQ4_PORT ?= 5682
RABBITMQ4_CACHE ?= /var/cache/async-amqp/rabbitmq4-trixie
# Its metadata store: khepri (RabbitMQ 4.3's only one) or mnesia (4.0's
# and 4.1's default). A running node keeps its store: stop it to change.
RABBITMQ4_METADATA ?= khepri
RABBITMQ4_ENV = RABBITMQ4_PORT=$(RABBITMQ4_PORT) RABBITMQ4_CACHE=$(RABBITMQ4_CACHE) RABBITMQ4_METADATA=$(RABBITMQ4_METADATA)

.PHONY: rabbitmq4 rabbitmq4-stop test-rabbitmq4

## rabbitmq4: a RabbitMQ 4.x node for the tests, beside the machine's
## broker (never touching it): Debian 13's rabbitmq-server (4.0.5), in a
## debootstrap tree under RABBITMQ4_CACHE built once (about 100 s),
## run under chroot as rabbit4@localhost on 127.0.0.1:RABBITMQ4_PORT
## (default 5682, distribution on the next port), no plugins, with the
## deprecated features RabbitMQ 4.3 denies denied, and its metadata in
## Khepri as 4.3 keeps it (RABBITMQ4_METADATA=mnesia for 4.0's default).
## Starts it if it is not running (15-25 s) and prints AMQP_URL=... last.
## Needs root.
## bin/rabbitmq4/rabbitmqctl runs rabbitmqctl against it.
rabbitmq4:
	@$(RABBITMQ4_ENV) bash scripts/rabbitmq4.sh start

## rabbitmq4-stop: stop that node (only it), remove its data, unmount what
## it mounted; the tree stays for the next start.
rabbitmq4-stop:
	@$(RABBITMQ4_ENV) bash scripts/rabbitmq4.sh stop

## test-rabbitmq4: make test against that node (started if needed), with
## bin/rabbitmq4 first on PATH so the tests' rabbitmqctl reaches it.
test-rabbitmq4: rabbitmq4
	PATH="$(CURDIR)/bin/rabbitmq4:$$PATH" AMQP_URL=amqp://guest:guest@127.0.0.1:$(RABBITMQ4_PORT)/ \
		$(RABBITMQ4_ENV) $(MAKE) test
