# shellcheck shell=bash
# Shared helpers for deploy/local/{up,down,ctl}.  Sourced, not executed.
#
# Layout (all paths overridable, see README.md):
#   $TIMERDB_LOCAL_CACHE/<svc>-<pom hash>/lib   jars collected by Maven (kept across runs)
#   $TIMERDB_LOCAL_DIR/<svc>/                   one server's conf, data and logs
#   $TIMERDB_LOCAL_DIR/<svc>.pid                pid of the running server
#
# Everything a running server needs (config, ports) is written into its state dir
# when it is initialised, so `ctl SVC start` after `ctl SVC stop` brings back the
# same server on the same ports with the same data, whatever the caller's env says.

LOCAL_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

STATE="${TIMERDB_LOCAL_DIR:-/tmp/timerdb-local}"
CACHE="${TIMERDB_LOCAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/timerdb-local}"
READY_TIMEOUT="${TIMERDB_LOCAL_READY_TIMEOUT:-180}"
STOP_TIMEOUT="${TIMERDB_LOCAL_STOP_TIMEOUT:-60}"

# Ports used when a server is initialised.  Everything is moved off the stock
# ports (9092/9093, 9042/7000/7199) so a developer's own Kafka/Cassandra/Scylla
# can keep running next to this one.
DEFAULT_KAFKA_PORT="${TIMERDB_LOCAL_KAFKA_PORT:-19092}"
DEFAULT_KAFKA_CONTROLLER_PORT="${TIMERDB_LOCAL_KAFKA_CONTROLLER_PORT:-19093}"
DEFAULT_CQL_PORT="${TIMERDB_LOCAL_CQL_PORT:-19042}"
DEFAULT_CASSANDRA_STORAGE_PORT="${TIMERDB_LOCAL_CASSANDRA_STORAGE_PORT:-17000}"
DEFAULT_CASSANDRA_JMX_PORT="${TIMERDB_LOCAL_CASSANDRA_JMX_PORT:-17199}"

# Pinned so the result does not depend on which plugin version the local Maven
# would pick by default.
DEP_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

# Topic the Kafka readiness probe writes to (auto-create is off, the probe creates it).
KAFKA_READY_TOPIC="timerdb-local-ready"

# shellcheck disable=SC2034 # used by up
SERVICES=(kafka cassandra)

log() { printf '[timerdb-local] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

now() { date +%s; }

svc_dir() { printf '%s/%s' "$STATE" "$1"; }
pid_file() { printf '%s/%s.pid' "$STATE" "$1"; }

valid_service() {
    case "$1" in kafka | cassandra) return 0 ;; *) return 1 ;; esac
}

# Serialise up/down/ctl on one state dir: two concurrent `up`s would otherwise
# both decide "not running" and race on the same data dirs.  fd 9 is closed for
# the servers we launch (9>&-) so they do not hold the lock forever.
take_lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    if ! flock -w 600 9; then
        die "could not lock $STATE/.lock within 600s (another up/down/ctl stuck?)"
    fi
}

# --- process bookkeeping ---------------------------------------------------------

# True if $2 is a live server process for service $1 of *this* state dir.  Checking
# the command line, not just `kill -0`, protects against pid reuse and ignores
# zombies (whose cmdline is empty).
is_our_process() {
    local svc=$1 pid=$2 cmdline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmdline="$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline")" || return 1
    grep -qxF -- "-Dtimerdb.local.service=$svc" <<<"$cmdline" &&
        grep -qxF -- "-Dtimerdb.local.dir=$STATE" <<<"$cmdline"
}

# Prints the pid of the running server for $1; fails if it is not running.
svc_pid() {
    local f pid
    f="$(pid_file "$1")"
    [[ -f $f ]] || return 1
    pid="$(<"$f")"
    is_our_process "$1" "$pid" || return 1
    printf '%s\n' "$pid"
}

# Fails if something already listens on 127.0.0.1:$1 (e.g. a stale server from a
# different state dir, or a developer's own Kafka).
port_free() {
    ! timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Fails if one of the ports stays in use for 15s.  The grace period matters right
# after a stop/kill: a JVM with hundreds of threads keeps its listening sockets for
# a moment after its pid has stopped looking alive.
require_ports_free() {
    local svc=$1 port i
    shift
    for port in "$@"; do
        for ((i = 0; i < 30; i++)); do
            port_free "$port" && continue 2
            sleep 0.5
        done
        die "$svc: port 127.0.0.1:$port is already in use; stop whatever holds it or pick other ports (see deploy/local/README.md)"
    done
}

# Ports of an initialised service, from its service.env.
svc_ports() {
    local f
    f="$(svc_dir "$1")/service.env"
    [[ -f $f ]] || return 0
    (
        # shellcheck source=/dev/null
        source "$f"
        case "$1" in
        kafka) echo "$KAFKA_PORT $KAFKA_CONTROLLER_PORT" ;;
        cassandra) echo "$CQL_PORT $CASSANDRA_STORAGE_PORT $CASSANDRA_JMX_PORT" ;;
        esac
    )
}

# After stop/kill: block until the server's ports are really closed, so that a
# `ctl SVC start` right after it does not race the dying JVM.
wait_ports_released() {
    local svc=$1 port i
    for port in $(svc_ports "$svc"); do
        for ((i = 0; i < 100; i++)); do
            port_free "$port" && break
            sleep 0.1
        done
    done
}

# Main log file of a service, tailed on failure.
main_log() {
    case "$1" in
    kafka) printf '%s/logs/server.log' "$(svc_dir kafka)" ;;
    cassandra) printf '%s/logs/system.log' "$(svc_dir cassandra)" ;;
    esac
}

dump_logs() {
    local svc=$1 d f
    d="$(svc_dir "$svc")"
    for f in "$(main_log "$svc")" "$d/logs/stdout.log"; do
        if [[ -s $f ]]; then
            printf '\n----- last 80 lines of %s -----\n' "$f" >&2
            tail -n 80 "$f" >&2
        fi
    done
}

# Stop a server: SIGTERM (both Kafka and Cassandra shut down cleanly on it: Kafka
# does a controlled shutdown, Cassandra drains memtables to disk), then SIGKILL if
# it has not exited after $STOP_TIMEOUT seconds.  Succeeds if it was not running.
stop_service() {
    local svc=$1 pid i
    if ! pid="$(svc_pid "$svc")"; then
        rm -f "$(pid_file "$svc")"
        log "$svc: not running"
        return 0
    fi
    log "$svc: stopping (pid $pid, SIGTERM)"
    kill -TERM "$pid" 2>/dev/null || true
    # A paused (SIGSTOPped) server would never see the SIGTERM otherwise.
    kill -CONT "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        is_our_process "$svc" "$pid" || break
        sleep 0.1
    done
    if is_our_process "$svc" "$pid"; then
        log "$svc: still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            is_our_process "$svc" "$pid" || break
            sleep 0.1
        done
    fi
    wait_ports_released "$svc"
    rm -f "$(pid_file "$svc")"
    log "$svc: stopped"
}

# Crash-style stop for fault-injection tests: SIGKILL, no clean shutdown.
kill_service() {
    local svc=$1 pid i
    if ! pid="$(svc_pid "$svc")"; then
        rm -f "$(pid_file "$svc")"
        log "$svc: not running"
        return 0
    fi
    log "$svc: killing (pid $pid, SIGKILL)"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        is_our_process "$svc" "$pid" || break
        sleep 0.1
    done
    wait_ports_released "$svc"
    rm -f "$(pid_file "$svc")"
    log "$svc: killed"
}

# --- jars ------------------------------------------------------------------------

# The lib dir is keyed on the pom's hash, so editing a version in the pom makes the
# next `up` fetch the new jars instead of silently reusing the old ones.
lib_dir() {
    local h
    h="$(sha256sum "$LOCAL_SRC/$1/pom.xml" | cut -c1-12)"
    printf '%s/%s-%s/lib' "$CACHE" "$1" "$h"
}

# Collect the jars of service $1 with Maven unless already done.  Maven keeps the
# downloads in ~/.m2, so after the first run this is a local copy.
ensure_libs() {
    local svc=$1 lib tmp start
    lib="$(lib_dir "$svc")"
    [[ -f $lib/.complete ]] && return 0
    command -v mvn >/dev/null || die "mvn not found: install Maven (apt-get install maven)"
    command -v java >/dev/null || die "java not found: install a JDK 17 (apt-get install openjdk-17-jdk-headless)"
    log "$svc: collecting jars with Maven into $lib (the first run downloads them into ~/.m2)"
    start=$(now)
    tmp="$lib.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # Maven's output goes to a file (the stdout of `up` is eval'ed by callers) and
    # is only shown when it fails.
    if ! mvn -B -f "$LOCAL_SRC/$svc/pom.xml" "$DEP_PLUGIN:copy-dependencies" \
        -DoutputDirectory="$tmp" -DincludeScope=runtime >"$lib.mvn.log" 2>&1 9>&-; then
        tail -n 40 "$lib.mvn.log" >&2
        rm -rf "$tmp"
        die "$svc: Maven could not resolve $LOCAL_SRC/$svc/pom.xml (full output: $lib.mvn.log)"
    fi
    touch "$tmp/.complete"
    rm -rf "$lib"
    mv "$tmp" "$lib"
    log "$svc: $(find "$lib" -name '*.jar' | wc -l) jars ready in $(($(now) - start))s"
}

# --- Kafka -----------------------------------------------------------------------

kafka_initialised() {
    [[ -f $(svc_dir kafka)/data/meta.properties && -f $(svc_dir kafka)/service.env ]]
}

# Fresh Kafka state: config + `kafka-storage format` with a new cluster id.
kafka_init() {
    local d lib cluster_id
    d="$(svc_dir kafka)"
    lib="$(lib_dir kafka)"
    rm -rf "$d"
    mkdir -p "$d/conf" "$d/data" "$d/logs"

    cat >"$d/service.env" <<EOF
KAFKA_PORT=$DEFAULT_KAFKA_PORT
KAFKA_CONTROLLER_PORT=$DEFAULT_KAFKA_CONTROLLER_PORT
EOF
    cp "$LOCAL_SRC/kafka/log4j2.properties" "$LOCAL_SRC/kafka/tools-log4j2.properties" "$d/conf/"

    cat >"$d/conf/server.properties" <<EOF
# Generated by deploy/local (lib.sh kafka_init): single-node KRaft, loopback only.
process.roles=broker,controller
node.id=1
# Static single-voter quorum: no ZooKeeper, no dynamic-quorum bootstrapping.
controller.quorum.voters=1@127.0.0.1:$DEFAULT_KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$DEFAULT_KAFKA_PORT,CONTROLLER://127.0.0.1:$DEFAULT_KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$DEFAULT_KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$d/data

# One broker: every internal topic must live with replication factor 1.
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Tests create their topics explicitly; a typo must fail, not create a topic.
auto.create.topics.enable=false
# Consumer groups in tests should not wait 3s for more members to join.
group.initial.rebalance.delay.ms=0
# After a crash (ctl kafka kill) the restarted broker cannot register until the
# controller has expired the dead incarnation's session (default 9s); 5s with a 1s
# heartbeat keeps crash-restart tests quicker, with headroom for a busy machine.
broker.session.timeout.ms=5000
broker.heartbeat.interval.ms=1000
EOF

    # Kafka's Uuid.randomUuid() never hands out ids starting with '-' (they look
    # like CLI flags); do the same.
    cluster_id="$(python3 -c '
import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break
')"
    log "kafka: formatting storage (cluster id $cluster_id)"
    java -Xmx256m -Dlog4j2.configurationFile="file:$d/conf/tools-log4j2.properties" -cp "$lib/*" \
        kafka.tools.StorageTool format --cluster-id "$cluster_id" --config "$d/conf/server.properties" \
        >"$d/logs/format.log" 2>&1 9>&- ||
        { cat "$d/logs/format.log" >&2; die "kafka: storage format failed"; }
}

# TIMERDB_LOCAL_KAFKA_OVERRIDES="k=v k=v": broker settings for this start only, on top of
# server.properties (e.g. auto.create.topics.enable=true for the test that proves TimerDB
# never creates topics); the next start without it is the plain broker again.
kafka_start() {
    local d lib o
    local -a overrides=()
    for o in ${TIMERDB_LOCAL_KAFKA_OVERRIDES:-}; do
        overrides+=(--override "$o")
    done
    d="$(svc_dir kafka)"
    lib="$(lib_dir kafka)"
    # shellcheck source=/dev/null
    source "$d/service.env"
    require_ports_free kafka "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
    log "kafka: starting on 127.0.0.1:$KAFKA_PORT (controller 127.0.0.1:$KAFKA_CONTROLLER_PORT)${TIMERDB_LOCAL_KAFKA_OVERRIDES:+ with $TIMERDB_LOCAL_KAFKA_OVERRIDES}, logs in $d/logs"
    # setsid: own session, so ^C in the caller's terminal does not kill the server.
    # stdin/stdout/stderr are detached from the caller (its stdout may be the pipe
    # of `eval "$(deploy/local/up)"`, which would otherwise never close).
    (
        cd "$d" || exit 1
        exec setsid java \
            -Dtimerdb.local.service=kafka \
            -Dtimerdb.local.dir="$STATE" \
            -Xms512m -Xmx512m \
            -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
            -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
            -Dkafka.logs.dir="$d/logs" \
            -Dlog4j2.configurationFile="file:$d/conf/log4j2.properties" \
            -cp "$lib/*" \
            kafka.Kafka "$d/conf/server.properties" "${overrides[@]}" \
            </dev/null >>"$d/logs/stdout.log" 2>&1 9>&-
    ) &
    echo $! >"$(pid_file kafka)"
}

# Compiled once per lib dir; needs javac (any JDK 17 has it).
kafka_probe_classes() {
    local lib out
    lib="$(lib_dir kafka)"
    out="$(dirname "$lib")/probe"
    if [[ ! -f $out/KafkaReady.class || $LOCAL_SRC/kafka/KafkaReady.java -nt $out/KafkaReady.class ]]; then
        command -v javac >/dev/null || die "javac not found: install a full JDK 17 (openjdk-17-jdk-headless)"
        mkdir -p "$out"
        javac -nowarn -d "$out" -cp "$lib/*" "$LOCAL_SRC/kafka/KafkaReady.java" >&2 9>&- ||
            die "kafka: could not compile the readiness probe"
    fi
    printf '%s' "$out"
}

# Runs the produce+fetch probe; $1 = seconds to keep retrying.
kafka_probe() {
    local d lib probe
    d="$(svc_dir kafka)"
    lib="$(lib_dir kafka)"
    probe="$(kafka_probe_classes)"
    # shellcheck source=/dev/null
    source "$d/service.env"
    java -Xmx128m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        -Dlog4j2.configurationFile="file:$d/conf/tools-log4j2.properties" \
        -cp "$probe:$lib/*" KafkaReady "127.0.0.1:$KAFKA_PORT" "$KAFKA_READY_TOPIC" "$1" >&2 9>&-
}

# --- Cassandra -------------------------------------------------------------------

cassandra_initialised() {
    [[ -f $(svc_dir cassandra)/conf/cassandra.yaml && -f $(svc_dir cassandra)/service.env ]]
}

cassandra_init() {
    local d
    d="$(svc_dir cassandra)"
    rm -rf "$d"
    mkdir -p "$d/conf" "$d/data" "$d/commitlog" "$d/saved_caches" "$d/hints" "$d/cdc_raw" "$d/triggers" "$d/logs"

    cat >"$d/service.env" <<EOF
CQL_PORT=$DEFAULT_CQL_PORT
CASSANDRA_STORAGE_PORT=$DEFAULT_CASSANDRA_STORAGE_PORT
CASSANDRA_JMX_PORT=$DEFAULT_CASSANDRA_JMX_PORT
EOF
    cp "$LOCAL_SRC/cassandra/logback.xml" "$d/conf/"

    cat >"$d/conf/cassandra.yaml" <<EOF
# Generated by deploy/local (lib.sh cassandra_init): single node, loopback only.
cluster_name: timerdb-local
# 16 vnodes like a default Cassandra 5 node, so token-range code sees several ranges.
num_tokens: 16
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
# A lone seed never bootstraps; say so instead of letting it look for peers.
auto_bootstrap: false

listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $DEFAULT_CASSANDRA_STORAGE_PORT
native_transport_port: $DEFAULT_CQL_PORT
start_native_transport: true
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$DEFAULT_CASSANDRA_STORAGE_PORT"

data_file_directories:
  - $d/data
commitlog_directory: $d/commitlog
saved_caches_directory: $d/saved_caches
hints_directory: $d/hints
cdc_raw_directory: $d/cdc_raw

commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 32MiB
disk_failure_policy: stop
commit_failure_policy: stop

authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
role_manager: CassandraRoleManager

# Smaller off-heap chunk cache than the default (min(512MiB, heap/4)): test data
# sets are tiny and the machine is shared with builds.
file_cache_size: 64MiB

# Tests create and drop keyspaces freely: do not keep a snapshot of each drop.
auto_snapshot: false
EOF
}

# JVM flags from cassandra/jvm17.options (comments and blank lines skipped).
cassandra_jvm_options() {
    grep -vE '^[[:space:]]*(#|$)' "$LOCAL_SRC/cassandra/jvm17.options"
}

cassandra_start() {
    local d lib jamm
    local -a jvm_opts
    d="$(svc_dir cassandra)"
    lib="$(lib_dir cassandra)"
    # shellcheck source=/dev/null
    source "$d/service.env"
    require_ports_free cassandra "$CQL_PORT" "$CASSANDRA_STORAGE_PORT" "$CASSANDRA_JMX_PORT"
    mapfile -t jvm_opts < <(cassandra_jvm_options)
    # jamm measures object sizes for memtable accounting; the tarball loads it as an
    # agent too.
    jamm="$(find "$lib" -maxdepth 1 -name 'jamm-*.jar' | head -n 1)"
    [[ -n $jamm ]] && jvm_opts+=("-javaagent:$jamm")
    log "cassandra: starting on 127.0.0.1:$CQL_PORT (storage $CASSANDRA_STORAGE_PORT, jmx $CASSANDRA_JMX_PORT), logs in $d/logs"
    (
        cd "$d" || exit 1
        exec setsid java \
            -Dtimerdb.local.service=cassandra \
            -Dtimerdb.local.dir="$STATE" \
            -Xms3g -Xmx3g -Xss512k \
            "${jvm_opts[@]}" \
            -Dcassandra.config="file://$d/conf/cassandra.yaml" \
            -Dcassandra.storagedir="$d" \
            -Dcassandra.logdir="$d/logs" \
            -Dcassandra.triggers_dir="$d/triggers" \
            -Dlogback.configurationFile="file://$d/conf/logback.xml" \
            -Dcassandra.jmx.local.port="$CASSANDRA_JMX_PORT" \
            -Dcom.sun.management.jmxremote.rmi.port="$CASSANDRA_JMX_PORT" \
            -Dcassandra-foreground=yes \
            -Dcassandra.skip_wait_for_gossip_to_settle=0 \
            -Dcassandra.superuser_setup_delay_ms=0 \
            -cp "$d/conf:$lib/*" \
            org.apache.cassandra.service.CassandraDaemon \
            </dev/null >>"$d/logs/stdout.log" 2>&1 9>&-
    ) &
    echo $! >"$(pid_file cassandra)"
}

cassandra_probe() {
    local d
    d="$(svc_dir cassandra)"
    # shellcheck source=/dev/null
    source "$d/service.env"
    python3 "$LOCAL_SRC/cassandra/cql_ping.py" 127.0.0.1 "$CQL_PORT" "$1" 9>&-
}

# --- generic ---------------------------------------------------------------------

# Wait until service $1 passes its probe.  The probe retries on its own until the
# deadline; meanwhile we watch the server so a crash during start-up fails fast
# instead of after the full timeout.  On failure: log tail and exit non-zero; the
# caller's EXIT trap stops the server if that caller started it.
wait_ready() {
    local svc=$1 start probe_pid rc
    start=$(now)
    "${svc}_probe" "$READY_TIMEOUT" &
    probe_pid=$!
    while kill -0 "$probe_pid" 2>/dev/null; do
        if ! svc_pid "$svc" >/dev/null; then
            # The probe runs as a child of the backgrounded subshell: end both, or
            # it keeps retrying (and writing to our stderr) after we exit.
            pkill -TERM -P "$probe_pid" 2>/dev/null || true
            kill "$probe_pid" 2>/dev/null || true
            wait "$probe_pid" 2>/dev/null || true
            log "$svc: the server process exited during start-up"
            dump_logs "$svc"
            rm -f "$(pid_file "$svc")"
            exit 1
        fi
        sleep 0.5
    done
    rc=0
    wait "$probe_pid" || rc=$?
    if ((rc != 0)); then
        log "$svc: not ready within ${READY_TIMEOUT}s"
        dump_logs "$svc"
        exit 1
    fi
    log "$svc: ready (waited $(($(now) - start))s)"
}

# The lines callers eval.  Ports come from the running servers' state, not the env.
print_exports() {
    local KAFKA_PORT CQL_PORT
    # shellcheck source=/dev/null
    source "$(svc_dir kafka)/service.env"
    # shellcheck source=/dev/null
    source "$(svc_dir cassandra)/service.env"
    printf 'export TIMERDB_KAFKA=127.0.0.1:%s\n' "$KAFKA_PORT"
    printf 'export TIMERDB_SCYLLA=127.0.0.1:%s\n' "$CQL_PORT"
}
