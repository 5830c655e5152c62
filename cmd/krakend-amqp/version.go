package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// version is the gateway's version. A release build sets it with
//
//	go build -ldflags "-X main.version=v1.2.3" ./cmd/krakend-amqp
//
// Left empty, it is the module version `go install …@version` records,
// or "devel".
var version string

// Module paths whose versions the version command reports.
const (
	luraModule = "github.com/luraproject/lura/v2"
	amqpModule = "github.com/rabbitmq/amqp091-go"
)

// buildVersions are the versions compiled into this binary.
type buildVersions struct {
	gateway, lura, amqp, goVersion string
}

func versions() buildVersions {
	v := buildVersions{gateway: version, lura: "unknown", amqp: "unknown", goVersion: runtime.Version()}
	info, ok := debug.ReadBuildInfo()
	if v.gateway == "" {
		v.gateway = "devel"
		if ok && info.Main.Version != "" && info.Main.Version != "(devel)" {
			v.gateway = info.Main.Version
		}
	}
	if !ok {
		return v
	}
	for _, dep := range info.Deps {
		ver := dep.Version
		if dep.Replace != nil {
			ver = dep.Replace.Version + " (replaced by " + dep.Replace.Path + ")"
		}
		switch dep.Path {
		case luraModule:
			v.lura = ver
		case amqpModule:
			v.amqp = ver
		}
	}
	return v
}

func versionCommand(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("version", "", stderr)
	if code, done := parseFlags(fs, args); done {
		return code
	}
	v := versions()
	fmt.Fprintf(stdout, "krakend-amqp %s\nlura        %s\namqp091-go  %s\ngo          %s\n", v.gateway, v.lura, v.amqp, v.goVersion)
	return exitOK
}
