# Build and test targets. Needs only Go and a C compiler (for -race).
# `make test` also needs a RabbitMQ at AMQP_URL and rabbitmqctl on PATH:
# see README.md, "Testing". CI runs .ci/run, which starts one and then
# runs `make test`.

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
