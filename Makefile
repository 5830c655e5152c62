# Build and test targets. Needs only Go and a C compiler (for -race).
# `make test` also needs a RabbitMQ at AMQP_URL and rabbitmqctl on PATH:
# see README.md, "Testing". CI runs .ci/run, which starts one and then
# runs `make test` and `make demo`.

GO ?= go
# The race detector needs cgo; fail clearly if no C compiler is found.
CGO_ENABLED ?= 1
export CGO_ENABLED

FUZZTIME ?= 30s
# gofmt ships with Go; found through GOROOT even when it is not on PATH.
GOFMT ?= $(shell $(GO) env GOROOT)/bin/gofmt

.DEFAULT_GOAL := test
.PHONY: test unit fuzz fmt vet lint

## test: vet (with and without the integration tag), then every test,
## integration tests included, against the broker at AMQP_URL.
test: vet
	$(GO) test -race -count=1 -tags integration -timeout 20m ./...

## unit: the tests that need no broker.
unit:
	$(GO) test -race ./...

## fuzz: fuzz the driver block parser.
fuzz:
	$(GO) test -run XXX -fuzz FuzzParse -fuzztime $(FUZZTIME) ./config

## fmt: rewrite the Go files in gofmt style.
fmt:
	$(GOFMT) -w .

## vet: go vet, with and without the integration build tag.
vet:
	$(GO) vet ./...
	$(GO) vet -tags integration ./...

## lint: fail when a Go file is not gofmt-formatted.
lint:
	@out="$$($(GOFMT) -l .)"; \
	if [ -n "$$out" ]; then echo "not gofmt-formatted (run make fmt):"; echo "$$out"; exit 1; fi

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

# Soak settings, e.g. make soak SOAK_MESSAGES=20000 SOAK_RATE=500.
SOAK_MESSAGES ?= 100000
SOAK_RATE ?= 1000

.PHONY: soak

## soak: not part of `make test`. SOAK_MESSAGES messages published at
## SOAK_RATE per second, a backend failing 5% of requests, connection cuts
## through a TCP proxy every 2-6 s; prints one line: delivered,
## duplicates, dead-lettered, lost (must be 0), cuts, latency p50/p99.
soak:
	SOAK_MESSAGES=$(SOAK_MESSAGES) SOAK_RATE=$(SOAK_RATE) $(GO) test -count=1 -tags 'integration soak' -run TestSoak -timeout 60m -v .
