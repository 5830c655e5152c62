// Package oteltest holds the tests of the driver's telemetry that need the
// OpenTelemetry SDK (an in-memory span recorder, a manual metric reader).
// It is a module of its own so that the library module, which KrakenD
// builds in, does not require the SDK: a build brings its own.
package oteltest
