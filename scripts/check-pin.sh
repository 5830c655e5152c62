#!/usr/bin/env bash
# Checks that every tool module builds against the library version it
# requires, as `go install .../cmd/krakend-amqp@<version>` would: the
# library is taken from a worktree of the pinned commit, not from this
# checkout. Fails naming the module when a tool uses library code newer
# than its pin (then: make pin, and commit), and when the pin is not the
# newest commit that changed library code: a tool installed at a version
# would otherwise lack the library's newest fixes although it builds.
# Needs git and the pinned commit in the history.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/library.sh
source scripts/library.sh

git rev-parse --git-dir >/dev/null 2>&1 || { echo "check-pin: not a git checkout" >&2; exit 1; }

tmp=$(mktemp -d)
cleanup() {
	git worktree remove --force "$tmp/library" >/dev/null 2>&1 || true
	rm -rf "$tmp"
}
trap cleanup EXIT

pinned=""
for m in "${TOOLS[@]}"; do
	version=$(cd "$m" && GOWORK=off go mod edit -json | sed -n "/\"Path\": \"${LIBRARY//\//\\/}\"/{n;s/.*\"Version\": \"\(.*\)\".*/\1/p}")
	if [[ -z $version ]]; then
		echo "check-pin: $m does not require $LIBRARY" >&2
		exit 1
	fi
	if grep -q '^replace' "$m/go.mod"; then
		echo "check-pin: $m/go.mod has a replace directive: a published module must not (go install ignores it)" >&2
		exit 1
	fi
	if [[ -n $pinned && $version != "$pinned" ]]; then
		echo "check-pin: $m requires $LIBRARY@$version, another module $pinned: run make pin" >&2
		exit 1
	fi
	pinned=$version
done

# The commit of a pseudo-version is its last part; a tag is itself.
ref=${pinned##*-}
if ! git cat-file -e "$ref^{commit}" 2>/dev/null; then
	echo "check-pin: $LIBRARY@$pinned names no commit of this repository: run make pin" >&2
	exit 1
fi
newest=$(library_commit)
if [[ $(git rev-parse "$ref^{commit}") != "$newest" ]]; then
	echo "check-pin: the tool modules require $LIBRARY@$pinned (commit ${ref:0:12}), but the newest commit" \
		"that changed library code is ${newest:0:12}: run make pin and commit" >&2
	exit 1
fi
git worktree add --detach "$tmp/library" "$ref" >/dev/null 2>&1

{
	echo "go $(GOWORK=off go mod edit -json | sed -n 's/^\t"Go": "\(.*\)",$/\1/p')"
	echo "use ("
	for m in "${TOOLS[@]}"; do echo "	$PWD/$m"; done
	echo ")"
	echo "replace $LIBRARY $pinned => $tmp/library"
} >"$tmp/go.work"

status=0
for m in "${TOOLS[@]}"; do
	if ! (cd "$m" && GOWORK="$tmp/go.work" go vet -tags integration ./... >"$tmp/out" 2>&1); then
		echo "check-pin: $m does not build against $LIBRARY@$pinned (commit ${ref:0:12}); run make pin and commit:" >&2
		sed 's/^/  /' "$tmp/out" >&2
		status=1
	fi
done
((status == 0)) && echo "check-pin: every tool module builds against $LIBRARY@$pinned"
exit $status
