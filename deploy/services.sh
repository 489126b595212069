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
#   deploy/services.sh cyrus-install | courier-install  unpack the .debs into the cache (idempotent)
#   deploy/services.sh cyrus-start DIR PORT [EXTRA_FILE]   prints the master PID
#   deploy/services.sh cyrus-add-user DIR NAME PASSWORD
#   deploy/services.sh courier-start DIR PORT [EXTRA_FILE] prints the PID to stop
#   deploy/services.sh courier-add-user DIR NAME PASSWORD UID
#   deploy/services.sh imap-create PORT USER FOLDER...   (password in $MP_IMAP_PASSWORD)
# Or `source` it and call the mp_* functions.
set -euo pipefail

MP_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MP_VENV=${MAILPUMP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mailpump/venv}
MP_SECANTUS_VERSION=0.7.0b3
# Cyrus and Courier conflict with dovecot-imapd as packages: their .debs (and the libraries they
# need that this machine lacks) are unpacked here instead of installed.
MP_SERVERS_DIR=${MAILPUMP_SERVERS_DIR:-/var/cache/mailpump-test-servers}
MP_SERVERS_ROOT=$MP_SERVERS_DIR/root
MP_MULTIARCH=$(uname -m)-linux-gnu
MP_SERVERS_LD=$MP_SERVERS_ROOT/usr/lib/$MP_MULTIARCH:$MP_SERVERS_ROOT/lib/$MP_MULTIARCH:$MP_SERVERS_ROOT/usr/lib
# Cyrus drops root for this user (the package would create a "cyrus" user; "daemon" always exists).
MP_CYRUS_USER=${MAILPUMP_CYRUS_USER:-daemon}

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
  # A WiredTiger cache of 4 GiB instead of the default 1 GiB: its dirty trigger (a fifth of it)
  # is where SecantusDB makes a writer wait for eviction while it holds the one storage lock; a
  # whole test run or a benchmark writes gigabytes (MP_SECANTUS_CACHE sets another size).
  "$MP_VENV/bin/secantusd-py" --host 127.0.0.1 --port "$port" --storage-path "$dir/data" \
    --standalone --cache-size "${MP_SECANTUS_CACHE:-4G}" "$@" >"$dir/secantus.log" 2>&1 &
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

# ---- Cyrus IMAP and Courier IMAP, unpacked (never installed: they conflict with dovecot-imapd)

# The packages among PKG... and their library dependencies (followed through Depends, lib*
# only) that this machine does not have installed.
mp_deb_closure() {
  local seen=" " level=("$@") out=() next p
  while [ ${#level[@]} -gt 0 ]; do
    next=()
    for p in "${level[@]}"; do
      case "$seen" in *" $p "*) continue ;; esac
      seen+="$p "
      if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
        out+=("$p")
        next+=("$p")
      fi
    done
    [ ${#next[@]} -gt 0 ] || break
    mapfile -t level < <(apt-cache depends --no-recommends --no-suggests --no-conflicts \
      --no-breaks --no-replaces --no-enhances "${next[@]}" 2>/dev/null |
      awk '$1 ~ /^\|?(Pre)?Depends:$/ && $2 ~ /^lib/ { print $2 }' | sort -u)
  done
  printf '%s\n' "${out[@]}"
}

# unpack NAME PKG...: downloads PKG... and the missing libraries they need into the cache and
# unpacks them with dpkg-deb -x; NAME's stamp makes the next call instant. Never touches dpkg's
# database: dovecot-imapd stays installed.
mp_unpack() {
  local name=$1; shift
  local stamp="$MP_SERVERS_ROOT/.$name.ok"
  [ -f "$stamp" ] && return 0
  mkdir -p "$MP_SERVERS_DIR/debs" "$MP_SERVERS_ROOT"
  (
    flock 9
    [ -f "$stamp" ] && exit 0
    export DEBIAN_FRONTEND=noninteractive
    apt-cache show "$1" >/dev/null 2>&1 || apt-get update -qq
    local pkgs
    mapfile -t pkgs < <(mp_deb_closure "$@")
    mp_log "unpacking $name: ${pkgs[*]}"
    # apt drops to user _apt for downloads: let it write there (else it warns and goes on as root)
    chown _apt "$MP_SERVERS_DIR/debs" 2>/dev/null || true
    (cd "$MP_SERVERS_DIR/debs" && apt-get download -q "${pkgs[@]}" >/dev/null)
    local p deb
    for p in "${pkgs[@]}"; do
      deb=$(ls "$MP_SERVERS_DIR/debs/${p}_"*.deb | tail -n 1)
      dpkg-deb -x "$deb" "$MP_SERVERS_ROOT"
    done
    printf '%s\n' "${pkgs[@]}" > "$stamp.tmp"
    mv "$stamp.tmp" "$stamp"
  ) 9>"$MP_SERVERS_DIR/.lock"
}

# Fails naming every library that BINARY... cannot find with the unpacked tree.
mp_check_libs() {
  local b missing
  for b in "$@"; do
    missing=$(LD_LIBRARY_PATH=$MP_SERVERS_LD ldd "$b" 2>&1 | grep 'not found' || true)
    if [ -n "$missing" ]; then
      mp_log "$b: $missing"
      return 1
    fi
  done
}

MP_CYRUS_BIN=$MP_SERVERS_ROOT/usr/lib/cyrus/bin

mp_cyrus_install() {
  mp_unpack cyrus cyrus-imapd cyrus-common sasl2-bin
  mp_check_libs "$MP_CYRUS_BIN/master" "$MP_CYRUS_BIN/imapd" "$MP_CYRUS_BIN/idled" \
    "$MP_CYRUS_BIN/ctl_cyrusdb" "$MP_SERVERS_ROOT/usr/sbin/saslpasswd2"
}

# env(1) arguments for Cyrus's programs: the unpacked libraries, and the unpacked SASL plugins
# when libsasl2-modules was not installed (then it was unpacked).
mp_cyrus_env() {
  local plugins=$MP_SERVERS_ROOT/usr/lib/$MP_MULTIARCH/sasl2
  printf '%s\n' "LD_LIBRARY_PATH=$MP_SERVERS_LD"
  [ -d "$plugins" ] && printf '%s\n' "SASL_PATH=$plugins:/usr/lib/$MP_MULTIARCH/sasl2"
  return 0
}

# Waits until 127.0.0.1:PORT sends an IMAP greeting (or PID dies, or 10 s pass).
mp_wait_greeting() {
  local port=$1 pid=$2 i line
  for i in $(seq 1 200); do
    line=$( (exec 3<>"/dev/tcp/127.0.0.1/$port" && read -r -t 2 l <&3 && printf '%s' "$l") 2>/dev/null || true)
    case "$line" in "* OK"*) return 0 ;; esac
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# cyrus-start DIR PORT [EXTRA_FILE]: a Cyrus with config and state in DIR (imapd.conf,
# cyrus.conf, sasldb2, conf/, spool/, run/), plain IMAP on 127.0.0.1:PORT, LOGIN checked against
# DIR/sasldb2. EXTRA_FILE holds imapd.conf lines that replace the defaults below (e.g.
# "unixhierarchysep: yes"). Prints the master PID (also in DIR/run/master.pid); SIGTERM stops it
# and every child. Starting again on the same DIR keeps its mail.
mp_cyrus_start() {
  local dir=$1 port=$2 extra=${3:-}
  mp_cyrus_install
  mkdir -p "$dir/conf/socket" "$dir/spool" "$dir/run/proc" "$dir/run/lock"
  chmod 755 "$dir"
  local conf
  conf=$(cat <<EOF
configdirectory: $dir/conf
defaultpartition: default
partition-default: $dir/spool
proc_path: $dir/run/proc
mboxname_lockpath: $dir/run/lock
cyrus_user: $MP_CYRUS_USER
servername: localhost
altnamespace: no
unixhierarchysep: no
hashimapspool: true
virtdomains: off
allowplaintext: yes
autocreate_quota: 0
umask: 077
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: $dir/sasldb2
sasl_mech_list: PLAIN LOGIN
syslog_prefix: cyrus-test
EOF
)
  if [ -n "$extra" ]; then
    local keys
    keys=$(sed -n 's/^\([A-Za-z0-9_-]*\):.*/\1/p' "$extra" | paste -sd '|' -)
    if [ -n "$keys" ]; then conf=$(printf '%s\n' "$conf" | grep -Ev "^($keys):"); fi
    conf=$(printf '%s\n%s\n' "$conf" "$(cat "$extra")")
  fi
  printf '%s\n' "$conf" > "$dir/imapd.conf"
  local b=$MP_CYRUS_BIN c="-C $dir/imapd.conf"
  cat > "$dir/cyrus.conf" <<EOF
START {
  recover cmd="$b/ctl_cyrusdb $c -r"
}
SERVICES {
  imap cmd="$b/imapd $c" listen="127.0.0.1:$port" prefork=0
}
EVENTS {
  checkpoint cmd="$b/ctl_cyrusdb $c -c" period=30
}
DAEMON {
  idled cmd="$b/idled $c"
}
EOF
  chown -R "$MP_CYRUS_USER" "$dir/conf" "$dir/spool" "$dir/run"
  rm -f "$dir/run/master.pid"
  local envs
  mapfile -t envs < <(mp_cyrus_env)
  env "${envs[@]}" setsid "$b/master" -C "$dir/imapd.conf" \
    -M "$dir/cyrus.conf" -p "$dir/run/master.pid" -L "$dir/master.log" </dev/null >/dev/null 2>&1 &
  local pid=$!
  if ! mp_wait_greeting "$port" "$pid"; then
    mp_log "Cyrus did not start; its log:"
    cat "$dir/master.log" >&2 || true
    kill "$pid" 2>/dev/null || true
    return 1
  fi
  echo "$pid"
}

# cyrus-add-user DIR NAME PASSWORD: a login in DIR/sasldb2. Its INBOX is created at its first
# login (autocreate); other folders with IMAP CREATE as the user (imap-create).
mp_cyrus_add_user() {
  local dir=$1 name=$2 pass=$3
  local envs
  mapfile -t envs < <(mp_cyrus_env)
  printf '%s' "$pass" | env "${envs[@]}" "$MP_SERVERS_ROOT/usr/sbin/saslpasswd2" -p -c \
    -f "$dir/sasldb2" -u localhost "$name"
  chown "$MP_CYRUS_USER" "$dir/sasldb2"
  chmod 600 "$dir/sasldb2"
}

mp_courier_install() {
  mp_unpack courier courier-imap courier-base courier-authlib courier-authlib-userdb gamin
  mp_check_libs "$MP_SERVERS_ROOT/usr/bin/imapd" "$MP_SERVERS_ROOT/usr/sbin/couriertcpd" \
    "$MP_SERVERS_ROOT/usr/lib/courier/courier/imaplogin" \
    "$MP_SERVERS_ROOT/usr/lib/courier/courier-authlib/authdaemond" \
    "$MP_SERVERS_ROOT/usr/lib/courier-authlib/libauthuserdb.so" \
    "$MP_SERVERS_ROOT/usr/lib/courier/courier-authlib/makedatprog" \
    "$MP_SERVERS_ROOT/usr/libexec/gam_server"
}

# Rebuilds DIR/conf/userdb.dat and userdbshadow.dat from DIR/conf/userdb, as makeuserdb does.
mp_courier_makedat() {
  local conf=$1/conf prog=$MP_SERVERS_ROOT/usr/lib/courier/courier-authlib/makedatprog
  { sed 's/|systempw=[^|]*//' "$conf/userdb"; echo .; } |
    LD_LIBRARY_PATH=$MP_SERVERS_LD "$prog" - "$conf/userdb.tmp" "$conf/userdb.dat"
  { sed -n 's/^\([^\t]*\)\t.*|\(systempw=[^|]*\).*/\1\t\2/p' "$conf/userdb"; echo .; } |
    LD_LIBRARY_PATH=$MP_SERVERS_LD "$prog" - "$conf/userdbshadow.tmp" "$conf/userdbshadow.dat"
}

# courier-start DIR PORT [EXTRA_FILE]: Courier IMAP (couriertcpd + imaplogin + imapd) with
# authdaemond and its userdb module, config and state in DIR, plain IMAP on 127.0.0.1:PORT.
# Courier's paths are compiled in (/etc/courier, /run/courier/authdaemon/socket): it runs in
# its own mount and PID namespaces (unshare) where /etc and /run are overlays whose courier
# entries are symlinks into DIR (and /etc/passwd is DIR/conf/passwd, which names the test
# users). EXTRA_FILE: shell lines appended to DIR/conf/imapd (the stock Debian settings), later
# ones win. Prints the PID of the namespace's first process (also in DIR/pid): SIGTERM to it
# ends every process of this Courier.
mp_courier_start() {
  local dir=$1 port=$2 extra=${3:-}
  mp_courier_install
  mkdir -p "$dir/conf" "$dir/run/authdaemon" "$dir/home" \
    "$dir/ns/etc-up" "$dir/ns/etc-work" "$dir/ns/run-up" "$dir/ns/run-work"
  chmod 755 "$dir" "$dir/home"
  local conf=$dir/conf
  cat > "$conf/authdaemonrc" <<'EOF'
authmodulelist="authuserdb"
daemons=2
authdaemonvar=/run/courier/authdaemon
DEBUG_LOGIN=0
DEFAULTOPTIONS=""
EOF
  {
    cat "$MP_SERVERS_ROOT/etc/courier/imapd"
    # realtime IDLE through gamin (the stock 0 polls every IMAP_IDLE_TIMEOUT s)
    echo "IMAP_ENHANCEDIDLE=1"
    if [ -n "$extra" ]; then cat "$extra"; fi
  } > "$conf/imapd"
  [ -f "$conf/passwd" ] || cp /etc/passwd "$conf/passwd"
  [ -f "$conf/userdb" ] || install -m 600 /dev/null "$conf/userdb"
  mp_courier_makedat "$dir"
  ln -sfn "$conf" "$dir/ns/etc-up/courier"
  ln -sfn "$conf/passwd" "$dir/ns/etc-up/passwd"
  ln -sfn "$dir/run" "$dir/ns/run-up/courier"
  # Test users have no passwd entry outside: one gamin server per user and instance.
  cat > "$dir/imapd-session" <<EOF
#!/bin/sh
export GAM_CLIENT_ID="\${AUTHENTICATED:-none}-\$(id -u)-$port"
export GAMIN_DEBUG_SERVER=$MP_SERVERS_ROOT/usr/libexec/gam_server
exec $MP_SERVERS_ROOT/usr/bin/imapd "\$@"
EOF
  chmod 755 "$dir/imapd-session"
  rm -f "$dir/pid"
  setsid unshare --mount --propagation private --pid --fork --kill-child --mount-proc \
    bash "$MP_ROOT/deploy/services.sh" courier-run "$dir" "$port" \
    </dev/null >>"$dir/courier.log" 2>&1 &
  local outer=$! pid="" i
  for i in $(seq 1 100); do
    pid=$(cat "/proc/$outer/task/$outer/children" 2>/dev/null | awk '{print $1}')
    [ -n "$pid" ] && break
    sleep 0.02
  done
  if [ -z "$pid" ] || ! mp_wait_greeting "$port" "$pid"; then
    mp_log "Courier did not start; its logs:"
    cat "$dir/courier.log" "$dir/imapd.log" "$dir/authdaemond.log" >&2 2>/dev/null || true
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    return 1
  fi
  echo "$pid" > "$dir/pid"
  echo "$pid"
}

# courier-run DIR PORT: the first process inside Courier's namespaces (see courier-start).
mp_courier_run() {
  local dir=$1 port=$2 root=$MP_SERVERS_ROOT
  mount -t overlay overlay -o "lowerdir=/etc,upperdir=$dir/ns/etc-up,workdir=$dir/ns/etc-work" /etc
  mount -t overlay overlay -o "lowerdir=/run,upperdir=$dir/ns/run-up,workdir=$dir/ns/run-work" /run
  export LD_LIBRARY_PATH=$MP_SERVERS_LD:$root/usr/lib/courier-authlib
  export LTDL_LIBRARY_PATH=$root/usr/lib/courier-authlib
  "$root/usr/lib/courier/courier-authlib/authdaemond" >>"$dir/authdaemond.log" 2>&1 &
  (
    set +u -a
    # shellcheck disable=SC1091
    . "$dir/conf/imapd"
    set +a
    exec "$root/usr/sbin/couriertcpd" -address=127.0.0.1 -maxprocs=200 -maxperip=200 \
      -nodnslookup -noidentlookup "$port" "$root/usr/lib/courier/courier/imaplogin" \
      "$dir/imapd-session" "$MAILDIRPATH"
  ) >>"$dir/imapd.log" 2>&1 &
  # PID 1 of the namespace: when it exits, the kernel ends every other process in it
  trap 'exit 0' TERM INT
  wait
}

# courier-add-user DIR NAME PASSWORD UID: a userdb entry (SHA-512 crypt), a passwd entry inside
# the namespace, and ~/Maildir owned by UID (folders are INBOX.x: create them over IMAP).
mp_courier_add_user() {
  local dir=$1 name=$2 pass=$3 uid=$4
  local home="$dir/home/$name" hash
  mkdir -p "$home/Maildir/cur" "$home/Maildir/new" "$home/Maildir/tmp"
  chown -R "$uid:65534" "$home"
  chmod 700 "$home/Maildir"
  hash=$(printf '%s\n' "$pass" | openssl passwd -6 -stdin)
  printf '%s\tuid=%s|gid=65534|home=%s|mail=%s|systempw=%s\n' \
    "$name" "$uid" "$home" "$home/Maildir" "$hash" >> "$dir/conf/userdb"
  printf '%s:x:%s:65534::%s:/usr/sbin/nologin\n' "$name" "$uid" "$home" >> "$dir/conf/passwd"
  mp_courier_makedat "$dir"
}

# imap-create PORT USER FOLDER...: logs in (password in $MP_IMAP_PASSWORD, never on a command
# line) and CREATEs each folder, given in UTF-8 with the server's prefix and delimiter
# ("INBOX.Projects"), sent as modified UTF-7.
mp_imap_create() {
  local port=$1 user=$2; shift 2
  python3 - "$port" "$user" "$@" <<'PY'
import base64, imaplib, os, sys
def mutf7(name):
    out, buf = [], []
    def flush():
        if buf:
            b = "".join(buf).encode("utf-16-be")
            out.append("&" + base64.b64encode(b).decode().rstrip("=").replace("/", ",") + "-")
            buf.clear()
    for c in name:
        if " " <= c <= "~":
            flush()
            out.append("&-" if c == "&" else c)
        else:
            buf.append(c)
    flush()
    return "".join(out)
port, user, folders = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
m = imaplib.IMAP4("127.0.0.1", port)
m.login(user, os.environ["MP_IMAP_PASSWORD"])
for f in folders:
    name = '"' + mutf7(f).replace("\\", "\\\\").replace('"', '\\"') + '"'
    typ, data = m.create(name)
    if typ != "OK":
        sys.exit(f"CREATE {f}: {typ} {data}")
m.logout()
PY
}

# db-watch PORT DBPID TARGET OUT: while TARGET runs, probes the database on PORT every 10 s. If it
# has answered nothing for 180 s (MP_DB_STALL_SECS) it has stalled (SecantusDB can deadlock with
# a writer waiting for cache eviction while holding its storage lock): writes the server's
# thread stacks to OUT, says so, and stops TARGET's process group, so that a stalled run fails at
# once with the reason instead of hanging until CI's limit.
mp_db_watch() {
  local port=$1 dbpid=$2 target=$3 out=$4 last_ok child=""
  # stopped by TERM (the test script's cleanup): the probe or sleep under way goes too
  trap '[ -n "$child" ] && kill "$child" 2>/dev/null; exit 0' TERM
  last_ok=$(date +%s)
  while kill -0 "$target" 2>/dev/null; do
    # a write, not a ping: SecantusDB answers a ping without its storage lock, so a ping is
    # answered while every storage operation waits
    timeout 40 "$MP_VENV/bin/python" -c "import pymongo; pymongo.MongoClient('mongodb://127.0.0.1:$port', serverSelectionTimeoutMS=5000, socketTimeoutMS=30000).mp_watchdog.probe.update_one({'_id': 1}, {'\$inc': {'n': 1}}, upsert=True)" 2>/dev/null &
    child=$!
    if wait "$child"; then
      last_ok=$(date +%s)
    elif [ $(($(date +%s) - last_ok)) -ge "${MP_DB_STALL_SECS:-180}" ]; then
      mp_log "the database on 127.0.0.1:$port (pid $dbpid) has answered no probe (a small write) for ${MP_DB_STALL_SECS:-180} s: it has stalled; stopping the tests (its threads: $out)"
      {
        timeout 120 "$MP_VENV/bin/pip" install -q py-spy >/dev/null 2>&1 &&
          timeout 60 "$MP_VENV/bin/py-spy" dump --pid "$dbpid"
        command -v gdb >/dev/null && timeout 60 gdb -p "$dbpid" -batch -ex "thread apply all bt" 2>/dev/null
      } >"$out" 2>&1 || true
      grep -E "^Thread|\(secantus/" "$out" 2>/dev/null | head -60 >&2 || true
      # TARGET leads its own process group (setsid): the test binary and what it started go too
      kill -TERM -- "-$target" 2>/dev/null || kill -TERM "$target" 2>/dev/null || true
      return 0
    fi
    sleep 10 &
    child=$!
    wait "$child" || true
  done
}

# Stops a process by PID: SIGTERM, then SIGKILL after 10 s.
mp_stop_pid() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  # a stopped process (a test SIGSTOPs its database) acts on the TERM only once continued
  kill -CONT "$pid" 2>/dev/null || true
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
    cyrus-install) mp_cyrus_install ;;
    cyrus-start) mp_cyrus_start "$@" ;;
    cyrus-add-user) mp_cyrus_add_user "$@" ;;
    courier-install) mp_courier_install ;;
    courier-start) mp_courier_start "$@" ;;
    courier-run) mp_courier_run "$@" ;;
    courier-add-user) mp_courier_add_user "$@" ;;
    imap-create) mp_imap_create "$@" ;;
    *) echo "usage: $0 install|certs|dovecot-config|add-user|deliver|secantus-start|free-port|cyrus-install|cyrus-start|cyrus-add-user|courier-install|courier-start|courier-add-user|imap-create ..." >&2; exit 64 ;;
  esac
fi
