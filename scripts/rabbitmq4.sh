#!/usr/bin/env bash
# A RabbitMQ 4.x node for the tests, beside the machine's broker (which it
# never touches): Debian 13 (trixie)'s rabbitmq-server, installed with
# debootstrap in a tree of its own and run there under chroot.
#
#   rabbitmq4.sh build         build the tree once (cached; see RABBITMQ4_CACHE)
#   rabbitmq4.sh start         build if needed, start the node if it is not
#                              running, wait for it, print AMQP_URL=... last
#   rabbitmq4.sh stop          stop the node, remove its data, unmount what
#                              start mounted; the tree stays
#   rabbitmq4.sh status        say whether the node runs
#   rabbitmq4.sh cli TOOL ...  run the tree's TOOL (rabbitmqctl,
#                              rabbitmq-diagnostics, ...) against the node;
#                              bin/rabbitmq4/rabbitmqctl is this
#
# Settings (environment):
#   RABBITMQ4_CACHE      the tree (default /var/cache/async-amqp/rabbitmq4-trixie)
#   RABBITMQ4_PORT       AMQP port on 127.0.0.1 (default 5682)
#   RABBITMQ4_DIST_PORT  Erlang distribution port (default RABBITMQ4_PORT+1);
#                        the CLI tools take ports from RABBITMQ4_PORT+2 to +9
#   RABBITMQ4_MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   RABBITMQ4_WAIT       seconds to wait for the node to boot (default 120)
#   RABBITMQ4_METADATA   the node's metadata store: khepri (default: what
#                        RabbitMQ 4.3 requires and 4.2 uses for new nodes;
#                        4.0 enables it as the feature flag khepri_db) or
#                        mnesia (what 4.0 and 4.1 use unless told)
#
# The node is rabbit4@localhost, listens on 127.0.0.1 only, has no plugins
# (no management or prometheus listener), lets guest/guest in from
# loopback, and denies the deprecated features RabbitMQ 4.3 denies by
# default (transient_nonexcl_queues, global_qos, queue_master_locator).
# It shares the machine's epmd (port 4369) and has an Erlang cookie of its
# own. Needs root (chroot, mount).
set -euo pipefail

readonly TREE=${RABBITMQ4_CACHE:-/var/cache/async-amqp/rabbitmq4-trixie}
readonly PORT=${RABBITMQ4_PORT:-5682}
readonly DIST_PORT=${RABBITMQ4_DIST_PORT:-$((PORT + 1))}
readonly CTL_PORT_MIN=$((PORT + 2)) CTL_PORT_MAX=$((PORT + 9))
readonly MIRROR=${RABBITMQ4_MIRROR:-http://deb.debian.org/debian}
readonly WAIT=${RABBITMQ4_WAIT:-120}
readonly METADATA=${RABBITMQ4_METADATA:-khepri}
readonly SUITE=trixie
readonly NODE=rabbit4@localhost
readonly HOST=127.0.0.1
# The node's data, config, cookie and logs, inside the tree (as the node
# sees it, and from outside). stop removes it.
readonly DATA_IN=/srv/async-amqp-rabbit4
readonly DATA=$TREE$DATA_IN
# Written last into a complete tree: a tree without it is not used.
readonly STAMP=$TREE/.async-amqp-complete
PARENT=$(dirname "$TREE")
readonly PARENT
readonly AMQP_URL="amqp://guest:guest@${HOST}:${PORT}/"

log() { echo "[rabbitmq4] $*" >&2; }
die() {
	echo "[rabbitmq4] FAILED: $*" >&2
	exit 1
}

need_root() {
	[[ $(id -u) -eq 0 ]] ||
		die "needs root: it builds a Debian tree with debootstrap and runs the node in it under chroot (run as root, e.g. sudo make rabbitmq4)"
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/${HOST}/$1" 2>/dev/null; }

# ---------------------------------------------------------------- the tree

tree_ok() { [[ -f $STAMP && -x $TREE/usr/lib/rabbitmq/bin/rabbitmq-server ]]; }

ensure_debootstrap() {
	command -v debootstrap >/dev/null 2>&1 && return
	log "debootstrap is not installed: installing it with apt-get"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >&2; then
		apt-get update >&2 || true
		DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >&2 ||
			die "debootstrap is not installed and 'apt-get install debootstrap' failed (no network or no Debian mirror?); install debootstrap and run again"
	fi
}

# mounted_under lists the mount points at or below dir.
mounted_under() {
	awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts
}

# remove_tree removes a tree that nothing is mounted in (rm -rf through
# a bind mount of /dev would wipe the machine's /dev).
remove_tree() {
	local dir=$1 m
	for m in $(mounted_under "$dir" | sort -r); do
		umount "$m" 2>/dev/null || umount -l "$m" || true
	done
	[[ -z $(mounted_under "$dir") ]] || die "$dir still has mounts ($(mounted_under "$dir" | tr '\n' ' ')); not removing it"
	rm -rf --one-file-system "$dir"
}

build() {
	need_root
	mkdir -p "$PARENT"
	lock
	# Builds go to a temporary directory beside the tree, renamed when
	# complete: a build that died leaves only a .build-* directory, which
	# the next start removes.
	local d
	for d in "$PARENT"/.build-"$(basename "$TREE")".*; do
		[[ -d $d ]] || continue
		log "removing an unfinished earlier build: $d"
		remove_tree "$d"
	done
	if tree_ok; then
		log "tree ready: $TREE ($(cat "$STAMP"))"
		return
	fi
	ensure_debootstrap
	if [[ -e $TREE ]]; then
		log "removing an incomplete tree (no $(basename "$STAMP")): $TREE"
		remove_tree "$TREE"
	fi
	local tmp buildlog=$PARENT/build.log started=$SECONDS
	tmp=$(mktemp -d "$PARENT/.build-$(basename "$TREE").XXXXXX")
	chmod 755 "$tmp"
	log "building a Debian $SUITE tree with rabbitmq-server in $tmp from $MIRROR (a few minutes; log: $buildlog)"
	if ! debootstrap --variant=minbase --include=rabbitmq-server "$SUITE" "$tmp" "$MIRROR" >"$buildlog" 2>&1; then
		tail -n 15 "$buildlog" >&2
		remove_tree "$tmp"
		die "debootstrap of $SUITE from $MIRROR failed (see above and $buildlog): no network, or the mirror is unreachable? Set RABBITMQ4_MIRROR for another mirror"
	fi
	local version
	# shellcheck disable=SC2016 # a dpkg-query format, not a shell expansion
	version=$(chroot "$tmp" dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null) ||
		{ remove_tree "$tmp"; die "rabbitmq-server is not installed in the tree (see $buildlog)"; }
	[[ $version == 4.* ]] || { remove_tree "$tmp"; die "$SUITE's rabbitmq-server is $version, not 4.x"; }
	# The downloaded packages are not needed any more (some 75 MB).
	chroot "$tmp" apt-get clean || true
	# The node's name is @localhost, resolved inside the tree.
	grep -qE '^127\.0\.0\.1[[:space:]].*\blocalhost\b' "$tmp/etc/hosts" 2>/dev/null ||
		echo "127.0.0.1 localhost" >>"$tmp/etc/hosts"
	echo "rabbitmq-server $version (Debian $SUITE), built $(date -u +%FT%TZ) in $((SECONDS - started))s" >"$tmp/.async-amqp-complete"
	[[ -z $(mounted_under "$tmp") ]] || { remove_tree "$tmp"; die "debootstrap left mounts in $tmp"; }
	mv -T "$tmp" "$TREE"
	log "tree ready in $((SECONDS - started))s: $TREE (rabbitmq-server $version)"
}

# lock serializes builds, starts and stops (fd 9, held until the script
# exits; taken once: a second open of the file would wait for ourselves).
LOCKED=
lock() {
	[[ -z $LOCKED ]] || return 0
	LOCKED=1
	exec 9>"$PARENT/.lock"
	flock -w 300 9 || die "another start or stop of the node holds $PARENT/.lock (fuser -v $PARENT/.lock)"
}

# ------------------------------------------------------------- the mounts

# The tree's programs need /proc (Erlang, the CLI), /sys and /dev.
MOUNTS=(proc sys dev)

mount_all() {
	local m
	for m in "${MOUNTS[@]}"; do
		mountpoint -q "$TREE/$m" && continue
		mkdir -p "$TREE/$m"
		case $m in
		proc) mount -t proc proc "$TREE/proc" ;;
		sys) mount -t sysfs -o ro sysfs "$TREE/sys" ;;
		dev) mount --bind /dev "$TREE/dev" ;;
		esac || die "cannot mount $m on $TREE/$m"
	done
}

umount_all() {
	local m
	for m in $(mounted_under "$TREE" | sort -r); do
		umount "$m" 2>/dev/null || umount -l "$m" || log "could not unmount $m"
	done
}

# --------------------------------------------------------------- the node

# The node runs as the tree's rabbitmq user; the CLI runs as that user
# too, with the same HOME, so both read the node's own Erlang cookie.
node_user() {
	local ids
	ids=$(awk -F: '$1 == "rabbitmq" { print $3 ":" $4 }' "$TREE/etc/passwd")
	[[ -n $ids ]] || die "no rabbitmq user in $TREE/etc/passwd"
	echo "$ids"
}

node_env() {
	local env=(
		HOME="$DATA_IN/home"
		PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin
		LANG=C.UTF-8 LC_ALL=C.UTF-8
		RABBITMQ_NODENAME="$NODE"
		RABBITMQ_DIST_PORT="$DIST_PORT"
		RABBITMQ_CTL_DIST_PORT_MIN="$CTL_PORT_MIN"
		RABBITMQ_CTL_DIST_PORT_MAX="$CTL_PORT_MAX"
		RABBITMQ_CONFIG_FILE="$DATA_IN/rabbitmq.conf"
		RABBITMQ_CONF_ENV_FILE="$DATA_IN/rabbitmq-env.conf"
		RABBITMQ_ENABLED_PLUGINS_FILE="$DATA_IN/enabled_plugins"
		RABBITMQ_MNESIA_BASE="$DATA_IN/mnesia"
		RABBITMQ_LOG_BASE="$DATA_IN/log"
		RABBITMQ_PID_FILE="$DATA_IN/pid"
		"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
		"RABBITMQ_CTL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
	)
	printf '%s\0' "${env[@]}"
}

# tree_argv sets ARGV to the command that runs its arguments in the tree
# as the node user, with the node's environment and nothing of ours.
tree_argv() {
	local env
	mapfile -d '' env < <(node_env)
	ARGV=(chroot --userspec="$(node_user)" "$TREE" /usr/bin/env -i "${env[@]}" "$@")
}

in_tree() {
	tree_argv "$@"
	"${ARGV[@]}"
}

# tree_pids lists the processes whose root is the tree: the node and its
# helpers, CLI calls. Nothing of the machine's broker (rooted at /) is
# ever among them.
tree_pids() {
	local p root want
	want=$(readlink -f "$TREE")
	for p in /proc/[0-9]*; do
		root=$(readlink "$p/root" 2>/dev/null) || continue
		[[ $root == "$want" ]] && echo "${p#/proc/}"
	done
	return 0
}

node_pid() {
	local pid
	pid=$(cat "$DATA/pid" 2>/dev/null) || return 1
	[[ $pid =~ ^[0-9]+$ && $(readlink "/proc/$pid/root" 2>/dev/null) == "$(readlink -f "$TREE")" ]] || return 1
	echo "$pid"
}

beam_running() {
	local p
	for p in $(tree_pids); do
		[[ $(cat "/proc/$p/comm" 2>/dev/null) == beam.smp ]] && return 0
	done
	return 1
}

write_config() {
	mkdir -p "$DATA/home" "$DATA/log" "$DATA/mnesia"
	cat >"$DATA/rabbitmq.conf" <<EOF
# Written by scripts/rabbitmq4.sh; removed by its stop.
listeners.tcp.1 = ${HOST}:${PORT}
loopback_users = none
log.console = false
log.file.level = info
# Denied by default from RabbitMQ 4.3 on: deny them here too.
deprecated_features.permit.transient_nonexcl_queues = false
deprecated_features.permit.global_qos = false
deprecated_features.permit.queue_master_locator = false
EOF
	: >"$DATA/rabbitmq-env.conf"
	echo "[]." >"$DATA/enabled_plugins"
	# The node's own cookie, not the machine broker's.
	head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-F' >"$DATA/home/.erlang.cookie"
	chmod 400 "$DATA/home/.erlang.cookie"
	chown -R "$(node_user)" "$DATA"
}

await_port() {
	local deadline=$((SECONDS + WAIT))
	until port_open "$PORT"; do
		# Before the VM starts, the tree runs only the start script.
		if [[ -z $(tree_pids) ]]; then
			tail -n 30 "$DATA/console.log" >&2 2>/dev/null || true
			die "the node died while booting (see above, $DATA/console.log and $DATA/log/)"
		fi
		((SECONDS < deadline)) || die "the node did not answer on ${HOST}:${PORT} within ${WAIT}s (see $DATA/log/)"
		sleep 0.5
	done
}

await_startup() {
	in_tree rabbitmqctl -q await_startup --timeout "$WAIT" >&2 ||
		die "rabbitmqctl await_startup against $NODE failed"
}

# store tells the node's metadata store: khepri or mnesia.
store() {
	local state
	state=$(in_tree rabbitmqctl -q list_feature_flags name state 2>/dev/null | awk '$1 == "khepri_db" { print $2 }')
	[[ $state == enabled ]] && echo khepri || echo mnesia
}

# use_store moves a fresh node's metadata to the store asked for, or
# says why it cannot. 4.0 marks khepri_db experimental and wants
# --experimental; later versions refuse the flag.
use_store() {
	case $METADATA in
	khepri | mnesia) ;;
	*) die "RABBITMQ4_METADATA is '$METADATA': use khepri or mnesia" ;;
	esac
	local have
	have=$(store)
	[[ $have == "$METADATA" ]] && return
	[[ $METADATA == khepri ]] ||
		die "$NODE keeps its metadata in $have from the start: this RabbitMQ cannot run on Mnesia (unset RABBITMQ4_METADATA)"
	in_tree rabbitmqctl -q enable_feature_flag khepri_db >/dev/null 2>&1 ||
		in_tree rabbitmqctl -q enable_feature_flag --experimental khepri_db >&2 ||
		die "could not enable the feature flag khepri_db on $NODE (set RABBITMQ4_METADATA=mnesia to run without Khepri)"
	[[ $(store) == khepri ]] || die "khepri_db is still not enabled on $NODE"
}

start() {
	need_root
	build
	lock
	if beam_running; then
		local listener
		listener=$(sed -n 's/^listeners\.tcp\.1 = //p' "$DATA/rabbitmq.conf" 2>/dev/null || true)
		[[ $listener == "${HOST}:${PORT}" ]] ||
			die "$NODE already runs, listening on ${listener:-an unknown port}, not ${HOST}:${PORT}: make rabbitmq4-stop first to start it on another port"
		log "$NODE already runs (tree $TREE)"
		mount_all
		await_port
		await_startup
		local have
		have=$(store)
		[[ $have == "$METADATA" ]] ||
			die "$NODE already runs on $have, not $METADATA (RABBITMQ4_METADATA): make rabbitmq4-stop first"
	else
		local p started=$SECONDS
		for p in "$PORT" "$DIST_PORT"; do
			port_open "$p" && die "port $p on $HOST is taken by another program (ss -ltnp 'sport = :$p'); set RABBITMQ4_PORT (and RABBITMQ4_DIST_PORT) to free ports"
		done
		# A node that died leaves its data: start afresh.
		rm -rf --one-file-system "$DATA"
		mount_all
		write_config
		log "starting $NODE: AMQP ${HOST}:${PORT}, distribution port $DIST_PORT, data $DATA"
		tree_argv rabbitmq-server
		# 9>&-: the node must not hold the lock.
		setsid "${ARGV[@]}" >"$DATA/console.log" 2>&1 </dev/null 9>&- &
		await_port
		await_startup
		use_store
		log "$NODE up in $((SECONDS - started))s, metadata in $METADATA"
	fi
	echo "AMQP_URL=$AMQP_URL"
}

stop() {
	need_root
	[[ -d $TREE ]] || {
		log "no tree at $TREE: nothing to stop"
		return
	}
	mkdir -p "$PARENT"
	lock
	if beam_running; then
		log "stopping $NODE"
		if [[ -d $TREE/proc/self ]]; then
			# -n names our node; its cookie is not the machine broker's.
			tree_argv rabbitmqctl -q -n "$NODE" stop
			timeout 60 "${ARGV[@]}" >&2 ||
				log "rabbitmqctl stop failed: killing the node's processes"
		fi
	fi
	# Whatever still runs in the tree (the node if stop failed, its
	# helpers, a CLI call): by process id, only processes rooted there.
	local pids deadline=$((SECONDS + 20))
	pids=$(tree_pids)
	while [[ -n $pids ]] && ((SECONDS < deadline)); do
		# shellcheck disable=SC2086
		kill $pids 2>/dev/null || true
		sleep 0.5
		pids=$(tree_pids)
	done
	if [[ -n $pids ]]; then
		# shellcheck disable=SC2086
		kill -9 $pids 2>/dev/null || true
		sleep 1
		pids=$(tree_pids)
	fi
	[[ -z $pids ]] || die "processes $pids in $TREE outlived SIGKILL"
	umount_all
	[[ -z $(mounted_under "$TREE") ]] || die "could not unmount $(mounted_under "$TREE" | tr '\n' ' ')"
	rm -rf --one-file-system "$DATA"
	log "stopped; its data is removed, the tree stays in $TREE"
}

status() {
	if ! tree_ok; then
		echo "no tree at $TREE (make rabbitmq4 builds it)"
		return 3
	fi
	if beam_running && port_open "$PORT"; then
		echo "$NODE runs: AMQP_URL=$AMQP_URL, metadata in $(store) ($(cat "$STAMP"))"
	elif beam_running; then
		echo "$NODE is booting or stuck (no answer on ${HOST}:${PORT})"
		return 1
	else
		echo "$NODE is not running ($(cat "$STAMP"))"
		return 3
	fi
}

cli() {
	(($# >= 1)) || die "usage: $0 cli TOOL [ARGS...]"
	local tool=$1
	shift
	need_root
	tree_ok || die "no RabbitMQ 4 tree at $TREE: run make rabbitmq4 first"
	[[ -d $TREE/proc/self ]] || die "$NODE is not started ($TREE/proc is not mounted): run make rabbitmq4 first"
	[[ -x $TREE/usr/lib/rabbitmq/bin/$tool ]] || die "no $tool in the tree"
	tree_argv "$tool" "$@"
	exec "${ARGV[@]}"
}

case ${1:-} in
build) build ;;
start) start ;;
stop) stop ;;
status) status ;;
cli)
	shift
	cli "$@"
	;;
*) die "usage: $0 build|start|stop|status|cli TOOL [ARGS...]" ;;
esac
