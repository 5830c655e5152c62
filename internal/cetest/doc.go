// Package cetest holds the test that a CloudEvents receiver reads, with
// the official Go SDK (github.com/cloudevents/sdk-go/v2) and its HTTP
// binding, the events the driver takes from a real broker under the AMQP
// binding. It is a module of its own so that the library module, which
// KrakenD builds in, does not require the SDK.
package cetest
