# Sourced by pin-library.sh and check-pin.sh: what the library module is,
# which modules are tools beside it, and the newest commit that changed
# the library's code.

readonly LIBRARY=github.com/krakend-contrib/async-amqp
readonly TOOLS=(bench cmd/krakend-amqp examples internal/oteltest internal/cetest)

# library_commit prints the newest commit that changed the library's code:
# its Go files and go.mod/go.sum, outside the tool modules. A change of
# docs or scripts needs no new pin.
library_commit() {
	local excludes=() m
	for m in "${TOOLS[@]}"; do excludes+=(":(exclude)$m"); done
	git log -1 --format=%H -- '*.go' go.mod go.sum "${excludes[@]}"
}
