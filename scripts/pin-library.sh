#!/usr/bin/env bash
# Pins the library version that the gateway, bench and examples modules
# require: the pseudo-version (or tag) of the newest commit that changed
# the library module. A published module must not replace the library,
# so each requires a real version of it; go.work replaces that version
# with this checkout for development. Run it (make pin) after committing
# a library change that those modules use, then commit what it changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/library.sh
source scripts/library.sh

commit=$(library_commit)
[[ -n $commit ]] || { echo "pin-library: no commit changes the library" >&2; exit 1; }

# The version the go command gives that commit: its tag, or a pseudo-version
# after the newest tag before it (v0.0.0-... when there is none).
stamp=$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S "$commit")
short=$(git rev-parse --short=12 "$commit")
if tag=$(git describe --tags --exact-match --match 'v[0-9]*.[0-9]*.[0-9]*' "$commit" 2>/dev/null); then
	version=$tag
elif base=$(git describe --tags --abbrev=0 --match 'v[0-9]*.[0-9]*.[0-9]*' "$commit" 2>/dev/null); then
	IFS=. read -r major minor patch <<<"${base%%-*}"
	version="$major.$minor.$((patch + 1))-0.$stamp-$short"
else
	version="v0.0.0-$stamp-$short"
fi

for m in "${TOOLS[@]}"; do
	(cd "$m" && go mod edit -require="$LIBRARY@$version")
done
{
	echo "go $(go mod edit -json | sed -n 's/^\t"Go": "\(.*\)",$/\1/p')"
	echo
	echo "use ("
	echo "	."
	for m in "${TOOLS[@]}"; do echo "	./$m"; done
	echo ")"
	echo
	echo "// The tool modules require a published version of the library; in this"
	echo "// workspace that version is this checkout. scripts/pin-library.sh sets it."
	echo "replace $LIBRARY $version => ./"
} >go.work
echo "pin-library: $LIBRARY@$version (commit $short)"
