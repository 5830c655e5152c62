#!/usr/bin/env bash
# The demo behind `make demo`: the gateway and the sample backend consume
# 1,000 events from the broker at AMQP_URL, and one line sums up what
# happened:
#
#   demo: published 1000, delivered 1000, duplicates 0, acked 1000, left 0, latency p50 3.1ms p99 12.4ms
#
# Steps: check that a broker answers; copy examples/krakend.json to a
# temporary directory, with queue and exchange names of this run's own
# and free ports (so the demo never touches anyone else's queues on a
# shared broker); start the sample backend and the gateway; wait until
# /__health lists both agents; publish the events, half to each agent;
# wait (at most DEMO_TIMEOUT seconds) until the backend has them all; stop
# the gateway with SIGTERM (it drains and exits 0); count what is left in
# the queues; stop the backend; delete the run's queues and exchange.
# Whatever happens, everything it started is stopped and deleted on exit.
#
# Exit status 1 if an event is missing, anything is left in the queues,
# or a step fails.
#
# Environment: AMQP_URL (default amqp://guest:guest@localhost:5672/),
# BIN (where `make build` put the binaries, default bin), DEMO_EVENTS
# (default 1000), DEMO_TIMEOUT (seconds, default 60).
set -euo pipefail
export LC_ALL=C # a decimal point in printf, whatever the user's locale

cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly BIN=${BIN:-bin}
readonly AMQP_URL=${AMQP_URL:-amqp://guest:guest@localhost:5672/}
readonly EVENTS=${DEMO_EVENTS:-1000}
readonly TIMEOUT=${DEMO_TIMEOUT:-60}
readonly EXAMPLE=examples/krakend.json
# The example's agents and, for each, a routing key its topic matches.
readonly AGENTS=(orders payments)
readonly KEYS=(orders.created payments.card.eu)

log() { echo "[demo] $*"; }
fail() {
	echo "[demo] FAILED: $*" >&2
	exit 1
}

# redacted prints a URL with its password replaced, as the Go code does.
redacted() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:xxxxx@#' <<<"$1"; }

[[ $EVENTS =~ ^[1-9][0-9]*$ ]] || fail "DEMO_EVENTS=$EVENTS: want a positive whole number"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || fail "DEMO_TIMEOUT=$TIMEOUT: want a positive whole number of seconds"
for b in krakend-amqp backend publisher; do
	[[ -x $BIN/$b ]] || fail "$BIN/$b is missing: run \`make demo\` (or \`make build\` first)"
done
command -v curl >/dev/null 2>&1 || fail "curl is not installed; the demo reads /__health and /__stats with it"

# --- the broker -------------------------------------------------------
if ! answer=$("$BIN/publisher" -ping -url "$AMQP_URL" 2>&1); then
	cat >&2 <<EOF
[demo] No AMQP broker answers at $(redacted "$AMQP_URL")
[demo] (${answer#publisher: })
Start one, then run \`make demo\` again:
  with Docker:              docker compose -f examples/docker-compose.yml up -d rabbitmq
  with RabbitMQ installed:  sudo rabbitmq-server -detached
                            (Debian/Ubuntu: sudo apt-get install -y rabbitmq-server)
or use a broker you have:   AMQP_URL=amqp://user:password@host:5672/ make demo
EOF
	exit 1
fi
log "$answer"

# --- this run's copy of the example -------------------------------------
# port_in_use: something accepts connections on 127.0.0.1:$1.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port prints a port nothing listens on, below the kernel's usual
# range for outgoing connections, and other than $1.
free_port() {
	local p i
	for ((i = 0; i < 200; i++)); do
		p=$((20000 + RANDOM % 12000))
		if [[ $p != "${1:-}" ]] && ! port_in_use "$p"; then
			echo "$p"
			return 0
		fi
	done
	echo "[demo] FAILED: found no free TCP port" >&2
	return 1
}

run_id=$(printf '%04x%04x' $RANDOM $RANDOM)
exchange=events-demo-$run_id
orders_queue=orders-queue-demo-$run_id
payments_queue=payments-queue-demo-$run_id
backend_port=$(free_port)
gateway_port=$(free_port "$backend_port")
work=$(mktemp -d "${TMPDIR:-/tmp}/krakend-amqp-demo.XXXXXX")
cfg=$work/krakend.json
gateway_pid="" backend_pid="" publisher_pid="" cleaned=""

# stop_process sends SIGTERM to the child $1, waits up to 30 s, then
# sends SIGKILL; it leaves the exit code in $stopped_code.
stopped_code=0
stop_process() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 300; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		echo "[demo] pid $pid still runs 30s after SIGTERM: killing it" >&2
		kill -KILL "$pid" 2>/dev/null || true
	fi
	stopped_code=0
	wait "$pid" 2>/dev/null || stopped_code=$?
}

# show_logs prints the end of the gateway's and the backend's logs.
logs_shown=""
show_logs() {
	local f
	for f in "$work/gateway.log" "$work/backend.log"; do
		[[ -s $f ]] && { echo "--- last lines of $(basename "$f")"; tail -n 20 "$f"; } >&2
	done
	logs_shown=yes
}

# cleanup runs on every exit: it stops what is still running, deletes the
# run's queues and exchange unless that was done, shows the logs after a
# failure, and removes the temporary directory.
cleanup() {
	local code=$?
	set +e
	trap - INT TERM
	[[ -n $publisher_pid ]] && stop_process "$publisher_pid"
	[[ -n $gateway_pid ]] && stop_process "$gateway_pid"
	[[ -n $backend_pid ]] && stop_process "$backend_pid"
	if [[ -z $cleaned && -f $cfg ]]; then
		"$BIN/publisher" -cleanup "$cfg" >"$work/cleanup.log" 2>&1 ||
			{ echo "[demo] could not delete all of this run's queues and exchange:" >&2; cat "$work/cleanup.log" >&2; }
	fi
	if ((code == 130 || code == 143)); then
		echo "[demo] interrupted: stopped what it started and deleted its queues" >&2
	elif ((code != 0)) && [[ -z $logs_shown ]]; then
		show_logs
	fi
	rm -rf "$work"
	exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The URL, escaped for a JSON string and then for sed's replacement.
url_json=${AMQP_URL//\\/\\\\}
url_json=${url_json//\"/\\\"}
url_sed=$(printf '%s' "$url_json" | sed -e 's/[\\&|]/\\&/g')
sed -E \
	-e "s|\"port\": *8080,|\"port\": $gateway_port, \"listen_ip\": \"127.0.0.1\",|" \
	-e "s|http://127\\.0\\.0\\.1:8081|http://127.0.0.1:$backend_port|g" \
	-e "s|\"host\": *\"amqp://[^\"]*\"|\"host\": \"$url_sed\"|g" \
	-e "s|\"name\": *\"orders-queue\"|\"name\": \"$orders_queue\"|" \
	-e "s|\"name\": *\"payments-queue\"|\"name\": \"$payments_queue\"|" \
	-e "s|\"exchange\": *\"events\"|\"exchange\": \"$exchange\"|g" \
	"$EXAMPLE" >"$cfg"
# The copy must point at nothing of the example's own, and at all of
# this run's.
if grep -Eq '"port": *8080|127\.0\.0\.1:8081|"(orders|payments)-queue"|"exchange": *"events"' "$cfg" ||
	! grep -qF "\"port\": $gateway_port," "$cfg" || ! grep -qF "\"$orders_queue\"" "$cfg" ||
	! grep -qF "\"$payments_queue\"" "$cfg" || ! grep -qF "\"$exchange\"" "$cfg"; then
	fail "$EXAMPLE no longer has the shape examples/demo.sh rewrites (port 8080, backend 127.0.0.1:8081, queues orders-queue and payments-queue, exchange events): update the script"
fi
check=$("$BIN/krakend-amqp" check -c "$cfg" 2>&1) || fail "the gateway refuses the demo's copy of $EXAMPLE: $check"
log "run $run_id: exchange $exchange, queues $orders_queue and $payments_queue, gateway on 127.0.0.1:$gateway_port, backend on 127.0.0.1:$backend_port"

# --- start the backend and the gateway -------------------------------
http_get() { curl -fsS --max-time 2 "http://127.0.0.1:$1"; }

# wait_for polls the command in $3.. every 0.2 s for $2 seconds, while the
# process $1 lives; the command's output is left in $polled.
polled=""
wait_for() {
	local pid=$1 seconds=$2 i
	shift 2
	for ((i = 0; i < seconds * 5; i++)); do
		kill -0 "$pid" 2>/dev/null || return 1
		if polled=$("$@" 2>/dev/null); then
			return 0
		fi
		sleep 0.2
	done
	return 1
}

"$BIN/backend" -q -addr "127.0.0.1:$backend_port" >"$work/backend.log" 2>&1 &
backend_pid=$!
wait_for "$backend_pid" 10 http_get "$backend_port/__stats" ||
	fail "the sample backend did not answer on 127.0.0.1:$backend_port"

"$BIN/krakend-amqp" run -c "$cfg" >"$work/gateway.log" 2>&1 &
gateway_pid=$!

# agents_healthy: /__health lists every agent with a ping time.
agents_healthy() {
	local body agent
	body=$(http_get "$gateway_port/__health") || return 1
	for agent in "${AGENTS[@]}"; do
		[[ $body == *"\"$agent\":\""* ]] || return 1
	done
	echo "$body"
}
wait_for "$gateway_pid" 30 agents_healthy ||
	fail "/__health of the gateway did not list the agents ${AGENTS[*]} within 30s"
log "gateway up: GET /__health: $polled"

# --- publish -----------------------------------------------------------
published=0
for i in "${!KEYS[@]}"; do
	n=$(((EVENTS + ${#KEYS[@]} - 1 - i) / ${#KEYS[@]})) # split as evenly as possible
	((n > 0)) || continue
	# The progress bar, on a terminal, goes to stderr; the summary line to
	# stdout. Run in the background so that a signal stops the demo at once.
	"$BIN/publisher" -url "$AMQP_URL" -exchange "$exchange" -key "${KEYS[i]}" -n "$n" >"$work/publisher.out" &
	publisher_pid=$!
	code=0
	wait "$publisher_pid" || code=$?
	publisher_pid=""
	out=$(<"$work/publisher.out")
	((code == 0)) || fail "publishing to ${KEYS[i]}: $out"
	log "publisher: $out"
	confirmed=$(sed -nE 's/.*: ([0-9]+) confirmed,.*/\1/p' <<<"$out")
	published=$((published + ${confirmed:-0}))
done

# --- wait for the backend ---------------------------------------------
# json_number prints the number after "key": in the JSON document $2.
json_number() { sed -nE "s/.*\"$1\":(-?[0-9][0-9.eE+-]*).*/\1/p" <<<"$2"; }

# all_delivered: the backend saw every published message id.
all_delivered() {
	local stats distinct
	stats=$(http_get "$backend_port/__stats") || return 1
	distinct=$(json_number distinct_message_ids "$stats")
	((${distinct:-0} >= published))
}
if wait_for "$backend_pid" "$TIMEOUT" all_delivered; then
	log "the backend has all $published events"
else
	log "after ${TIMEOUT}s the backend still lacks events; stopping"
fi

# --- stop, count, clean up --------------------------------------------
# The gateway drains on SIGTERM; once its connection is closed, the
# queues' counts include any message it had not acknowledged.
stop_process "$gateway_pid"
gateway_exit=$stopped_code gateway_pid=""
log "gateway stopped on SIGTERM, exit code $gateway_exit"

queues=$("$BIN/publisher" -inspect "$cfg") || fail "reading the queues: $queues"
left=$(awk 'NR > 1 { sum += $4 } END { print sum + 0 }' <<<"$queues")

stats=$(http_get "$backend_port/__stats") || fail "the backend did not answer GET /__stats"
stop_process "$backend_pid"
backend_pid=""
((stopped_code == 0)) || log "the backend exited with $stopped_code"

cleanup_out=$("$BIN/publisher" -cleanup "$cfg" 2>&1) || fail "deleting this run's queues and exchange: $cleanup_out"
cleaned=yes

requests=$(json_number requests "$stats")
delivered=$(json_number distinct_message_ids "$stats")
p50=$(json_number p50 "$stats")
p99=$(json_number p99 "$stats")
duplicates=$((requests - delivered))
missing=$((published - delivered))
acked=$((published - left))

problems=()
((published == EVENTS)) || problems+=("$((EVENTS - published)) not confirmed by the broker")
((missing <= 0)) || problems+=("$missing missing")
((left == 0)) || problems+=("$left left in the queues")
((gateway_exit == 0)) || problems+=("gateway exit code $gateway_exit")

summary=$(printf 'published %d, delivered %d, duplicates %d, acked %d, left %d, latency p50 %.1fms p99 %.1fms' \
	"$published" "$delivered" "$duplicates" "$acked" "$left" "${p50:-0}" "${p99:-0}")
if ((${#problems[@]} > 0)); then
	show_logs
	((left == 0)) || echo "$queues" >&2
	reasons=$(printf '%s, ' "${problems[@]}")
	echo "demo: FAILED (${reasons%, }): $summary"
	exit 1
fi
echo "demo: $summary"
