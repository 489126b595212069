#!/usr/bin/env bash
# The local services mailpump's demo, tests and benchmarks run against: a self-contained
# Dovecot (IMAP + POP3, plain and TLS on high ports) and SecantusDB (a MongoDB wire-protocol
# server), all on 127.0.0.1 with their state in a directory of the caller's choosing.
#
# Usage (as a command):
#   deploy/services.sh install                         apt + venv (idempotent)
#   deploy/services.sh certs DIR                       throw-away CA + leaf for localhost/127.0.0.1
#   deploy/services.sh dovecot-config DIR IMAP IMAPS POP3 POP3S [EXTRA_FILE]
#   deploy/services.sh add-user DIR NAME PASSWORD UID
#   deploy/services.sh deliver DIR USER FILE...        write messages straight into the Maildir
#   deploy/services.sh secantus-start DIR PORT [--sync-on-commit]   prints the PID
#   deploy/services.sh free-port
# Or `source` it and call the mp_* functions.
set -euo pipefail

MP_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MP_VENV=${MAILPUMP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mailpump/venv}
MP_SECANTUS_VERSION=0.7.0b3

mp_log() { printf '%s\n' "services: $*" >&2; }

mp_install() {
  local need=()
  command -v dovecot >/dev/null || need+=(dovecot-imapd)
  [ -x /usr/lib/dovecot/pop3 ] || need+=(dovecot-pop3d)
  command -v openssl >/dev/null || need+=(openssl)
  dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
  command -v pkg-config >/dev/null || need+=(pkg-config)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  # the packaging tests run systemd-analyze verify and systemd-sysusers on the unit files
  command -v systemd-analyze >/dev/null || need+=(systemd)
  if [ ${#need[@]} -gt 0 ]; then
    mp_log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [ ! -x "$MP_VENV/bin/secantusd-py" ]; then
    mp_log "installing secantusdb $MP_SECANTUS_VERSION into $MP_VENV"
    python3 -m venv "$MP_VENV"
    "$MP_VENV/bin/pip" install -q "secantusdb==$MP_SECANTUS_VERSION"
  fi
}

mp_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

mp_certs() {
  local dir=$1
  mkdir -p "$dir"
  [ -f "$dir/cert.pem" ] && return 0
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=mailpump test CA" \
      -keyout ca.key -out ca.pem -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout key.pem -out leaf.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
      -extfile leaf.ext -out cert.pem 2>/dev/null
    # A certificate nobody vouches for, for the "refused by default" tests.
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=localhost" \
      -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout selfsigned.key -out selfsigned.pem 2>/dev/null
    chmod 644 ./*.pem ./*.key
  )
}

# dovecot-config DIR IMAP IMAPS POP3 POP3S [EXTRA_FILE]: DIR/dovecot.conf, DIR/users, certs.
mp_dovecot_config() {
  local dir=$1 imap=$2 imaps=$3 pop3=$4 pop3s=$5 extra=${6:-}
  mkdir -p "$dir/run" "$dir/state" "$dir/home"
  chmod 755 "$dir" "$dir/home"
  mp_certs "$dir"
  touch "$dir/users"
  chgrp dovecot "$dir/users" 2>/dev/null || true
  chmod 640 "$dir/users"
  local extra_text=""
  [ -n "$extra" ] && extra_text=$(cat "$extra")
  EXTRA_TEXT=$extra_text python3 - "$MP_ROOT/tests/dovecot/dovecot.conf.in" "$dir/dovecot.conf" \
    "$dir" "$imap" "$imaps" "$pop3" "$pop3s" <<'PY'
import os, sys
src, dst, d, imap, imaps, pop3, pop3s = sys.argv[1:]
t = open(src).read()
for k, v in {"@DIR@": d, "@IMAP_PORT@": imap, "@IMAPS_PORT@": imaps,
             "@POP3_PORT@": pop3, "@POP3S_PORT@": pop3s, "@EXTRA@": os.environ.get("EXTRA_TEXT", "")}.items():
    t = t.replace(k, v)
open(dst, "w").write(t)
PY
}

# add-user DIR NAME PASSWORD UID: a mail user with its own unprivileged uid (inotify limits
# are per uid) and a Maildir.
mp_add_user() {
  local dir=$1 name=$2 pass=$3 uid=$4
  local home="$dir/home/$name"
  mkdir -p "$home/Maildir/cur" "$home/Maildir/new" "$home/Maildir/tmp"
  chown -R "$uid:65534" "$home"
  printf '%s:{PLAIN}%s:%s:65534::%s::\n' "$name" "$pass" "$uid" "$home" >> "$dir/users"
}

# deliver DIR USER FILE...: tmp/ then rename into new/, as a delivery agent would.
mp_deliver() {
  local dir=$1 user=$2; shift 2
  local md="$dir/home/$user/Maildir" owner
  owner=$(stat -c %u "$md")
  local f i=0
  for f in "$@"; do
    i=$((i + 1))
    local name
    name="$(date +%s%N).$$_$i.mailpump"
    cp "$f" "$md/tmp/$name"
    chown "$owner:65534" "$md/tmp/$name"
    mv "$md/tmp/$name" "$md/new/$name"
  done
}

# secantus-start DIR PORT [--sync-on-commit]: starts SecantusDB in the background, waits until
# it answers a ping, prints its PID.
mp_secantus_start() {
  local dir=$1 port=$2; shift 2
  mkdir -p "$dir/data"
  "$MP_VENV/bin/secantusd-py" --host 127.0.0.1 --port "$port" --storage-path "$dir/data" \
    --standalone "$@" >"$dir/secantus.log" 2>&1 &
  local pid=$!
  local i
  for i in $(seq 1 100); do
    if "$MP_VENV/bin/python" -c "import pymongo,sys; pymongo.MongoClient('mongodb://127.0.0.1:$port', serverSelectionTimeoutMS=300).admin.command('ping')" 2>/dev/null; then
      echo "$pid"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  mp_log "SecantusDB did not start; its log:"
  cat "$dir/secantus.log" >&2
  kill "$pid" 2>/dev/null || true
  return 1
}

# Stops a process by PID: SIGTERM, then SIGKILL after 10 s.
mp_stop_pid() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cmd=${1:-}; shift || true
  case "$cmd" in
    install) mp_install ;;
    certs) mp_certs "$@" ;;
    dovecot-config) mp_dovecot_config "$@" ;;
    add-user) mp_add_user "$@" ;;
    deliver) mp_deliver "$@" ;;
    secantus-start) mp_secantus_start "$@" ;;
    free-port) mp_free_port ;;
    *) echo "usage: $0 install|certs|dovecot-config|add-user|deliver|secantus-start|free-port ..." >&2; exit 64 ;;
  esac
fi
