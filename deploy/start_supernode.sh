#!/usr/bin/env bash
# Start a Flower 1.41 SuperNode that talks TLS to the SuperLink and authenticates itself.
#
#   deploy/start_supernode.sh --superlink HOST:PORT --ca CA.crt --key NODE_KEY
#       (--partition-id I --num-partitions N | --data-path FILE.npz)
#       [--port 9094] [--restart SECONDS] [--fork] [--insecure] [-- EXTRA...]
#
# --superlink        SuperLink address as dialled (must be a SAN of its certificate)
# --ca               root CA that signed the SuperLink certificate (ca.crt)
# --key              this node's OpenSSH EC private key (node-I from deploy.certs); its
#                    .pub must be registered first: deploy/register_nodes.sh
# --partition-id/--num-partitions   which slice of the run's dataset this node trains on
# --data-path        train on this device's own .npz (x_train, y_train, x_test, y_test)
# --port             local port where this node's ClientApp processes connect (one per
#                    SuperNode on the same host)
# --restart SECONDS  restart after a crash or refusal, waiting SECONDS between tries.
#                    After a crash the SuperLink refuses the same key for up to 60 s
#                    (until it declares the node offline), so keep trying.
# --fork             start each ClientApp by forking it from fedshield-superexec, which
#                    imported Flower and torch once (the node runs with --isolation
#                    process). For several SuperNodes on few cores: a cold ClientApp
#                    imports Flower's entry (2-3.4 CPU-s) before its first heartbeat, and
#                    Flower gives it 30 s. If fedshield-superexec exits, the node is
#                    stopped too (and restarted with --restart): it could run no task
# --insecure         plain HTTP, no authentication: prints a warning; never for real data
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

superlink_addr="" ca="" key="" pid="" nparts="" data_path="" port="9094" restart="" insecure=0
fork=0
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --superlink) superlink_addr="$2"; shift 2 ;;
        --ca) ca="$2"; shift 2 ;;
        --key) key="$2"; shift 2 ;;
        --partition-id) pid="$2"; shift 2 ;;
        --num-partitions) nparts="$2"; shift 2 ;;
        --data-path) data_path="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --restart) restart="$2"; shift 2 ;;
        --insecure) insecure=1; shift ;;
        --fork) fork=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ -n "$superlink_addr" ]] || die "--superlink HOST:PORT is required"
[[ "$superlink_addr" != *"://"* ]] || die "--superlink is HOST:PORT without a scheme, got $superlink_addr"
node_config=""
if [[ -n "$data_path" ]]; then
    need_file "$data_path" "--data-path"
    [[ "$data_path" != *'"'* && "$data_path" != *"'"* ]] || die "--data-path must not contain quotes"
    node_config="data-path=\"$(cd "$(dirname "$data_path")" && pwd)/$(basename "$data_path")\""
fi
if [[ -n "$pid$nparts" ]]; then
    [[ "$pid" =~ ^[0-9]+$ && "$nparts" =~ ^[0-9]+$ && "$pid" -lt "$nparts" ]] \
        || die "--partition-id I and --num-partitions N need 0 <= I < N, got I='$pid' N='$nparts'"
    node_config="partition-id=$pid num-partitions=$nparts${node_config:+ $node_config}"
fi
[[ -n "$node_config" ]] || die "give --partition-id/--num-partitions or --data-path"
[[ -z "$restart" || "$restart" =~ ^[0-9]+$ ]] || die "--restart wants whole seconds, got $restart"

supernode="$(find_flower_bin flower-supernode)"
# The SuperNode starts `flower-superexec` by name: it must be on PATH.
export PATH="$(dirname "$supernode"):$PATH"

args=(--superlink "$superlink_addr" --port "$port" --node-config "$node_config")
if [[ $insecure -eq 1 ]]; then
    warn_insecure
    args+=(--insecure)
else
    [[ -n "$ca" ]] || die "TLS needs --ca CA.crt (or pass --insecure)"
    need_file "$ca" "--ca"
    args+=(--root-certificates "$ca")
    if [[ -n "$key" ]]; then
        need_file "$key" "--key"
        args+=(--auth-supernode-private-key "$key")
    fi
fi

superexec="" secret=""
if [[ $fork -eq 1 ]]; then
    superexec="$(find_flower_bin fedshield-superexec)"
    # only a holder of this secret may take tasks from the node's Runtime API
    secret="$(mktemp "${TMPDIR:-/tmp}/fedshield-superexec.XXXXXX")"  # 0600
    head -c 32 /dev/urandom > "$secret"
    trap 'rm -f "$secret"' EXIT
    args+=(--isolation process --superexec-auth-secret-file "$secret")
fi

if [[ -z "$restart" && $fork -eq 0 ]]; then
    exec "$supernode" "${args[@]}" "${extra[@]}"
fi
child=0 helper=0
trap 'trap - TERM INT; [[ $child -ne 0 ]] && kill -TERM "$child" 2>/dev/null; [[ $helper -ne 0 ]] && kill -TERM "$helper" 2>/dev/null; wait || true; exit 143' TERM INT
while true; do
    "$supernode" "${args[@]}" "${extra[@]}" &
    child=$!
    if [[ -n "$superexec" ]]; then
        # dials the node's Runtime API (retrying until it listens); exits with the node
        "$superexec" --insecure --runtime-api-address "127.0.0.1:$port" --parent-pid "$child" \
            --superexec-auth-secret-file "$secret" &
        helper=$!
    fi
    if [[ $helper -ne 0 ]]; then
        # both must run: a node whose SuperExec is gone would hold its tasks unrun
        while kill -0 "$child" 2>/dev/null && kill -0 "$helper" 2>/dev/null; do
            sleep 1
        done
        if kill -0 "$child" 2>/dev/null; then
            set +e; wait "$helper"; hrc=$?; set -e
            echo "$(date -u +%FT%TZ) fedshield-superexec exited with $hrc; stopping the SuperNode" >&2
            kill -TERM "$child" 2>/dev/null || true
        fi
    fi
    set +e; wait "$child"; rc=$?; set -e
    child=0
    if [[ $helper -ne 0 ]]; then
        kill -TERM "$helper" 2>/dev/null || true
        wait "$helper" 2>/dev/null || true
        helper=0
        [[ ${hrc:-0} -ne 0 && $rc -eq 0 ]] && rc=1  # stopped for its SuperExec: a failure
        hrc=0
    fi
    [[ $rc -eq 0 || -z "$restart" ]] && exit "$rc"
    echo "$(date -u +%FT%TZ) flower-supernode exited with $rc; restarting in ${restart}s" >&2
    sleep "$restart"
done
