#!/usr/bin/env bash
# Checks the systemd files of dropcut without installing anything:
#   1. `systemd-analyze verify` of systemd/dropcut.service, alone and with each example
#      drop-in of systemd/examples/, inside a throw-away --root= tree: verify insists that
#      ExecStart='s binary exists, so the tree holds an executable stub at
#      /opt/dropcut/bin/dropcut (plus a copy of the host's units and of the other Exec*=
#      binaries); the unit itself is checked exactly as shipped. Any message verify prints
#      about dropcut counts as a failure (verify exits 0 on e.g. unknown keys).
#   2. systemd-sysusers and systemd-tmpfiles on dropcut.sysusers / dropcut.tmpfiles in
#      another throw-away root: the user, the group and the folders are created as meant.
#   3. `systemd-analyze security --offline=yes`: prints the exposure score and fails when
#      it is above $DROPCUT_MAX_EXPOSURE (default 2.0). On systemd 252 --threshold= takes
#      the exposure times ten (0..100, default 100) and fails when exposure*10 > threshold.
#   4. the unit (and no example drop-in undoes it) sets LimitCORE=0: a core dump would hold
#      the API key. systemd-analyze security does not score core dumps.
# Usage: bash systemd/verify.sh        (exit 0 = all good)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
unit_name=dropcut.service
unit="$here/$unit_name"
max_exposure="${DROPCUT_MAX_EXPOSURE:-2.0}"

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "verify.sh: $tool not found (Debian/Ubuntu: apt-get install systemd)" >&2
        exit 1
    fi
done

work="$(mktemp -d "${TMPDIR:-/tmp}/dropcut-verify.XXXXXX")"
trap 'rm -rf "$work"' EXIT
status=0
fail() {
    echo "FAIL: $*" >&2
    status=1
}

# --- 1. systemd-analyze verify -------------------------------------------------------------
make_root() {
    local root="$1"
    mkdir -p "$root/etc/systemd/system" "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib/systemd"
    # merged /usr as on Debian 12 (paths like /bin/kill resolve inside the root)
    for d in bin sbin lib; do ln -s "usr/$d" "$root/$d"; done
    # the units our unit depends on (sysinit.target, network-online.target ...)
    local src
    for src in /usr/lib/systemd/system /lib/systemd/system; do
        [ -d "$src" ] && cp -a "$src/." "$root/usr/lib/systemd/system/"
    done
    # every Exec*= binary: the host's own, except dropcut itself (not installed here)
    local path
    while read -r path; do
        if [ "$path" = /opt/dropcut/bin/dropcut ]; then
            mkdir -p "$root/opt/dropcut/bin"
            printf '#!/bin/sh\nexit 0\n' >"$root$path"
            chmod 755 "$root$path"
        elif [ -x "$path" ]; then
            mkdir -p "$root$(dirname "$path")"
            [ -e "$root$path" ] || cp -L "$path" "$root$path"
        else
            fail "$unit_name: $path (an Exec*= command) does not exist on this machine"
        fi
    done < <(sed -n -E 's/^Exec[A-Za-z]*=[-@:+!]*([^[:space:]]+).*/\1/p' "$unit" | sort -u)
    cp "$unit" "$root/etc/systemd/system/$unit_name"
}

run_verify() {  # run_verify ROOT LABEL
    local out
    if ! out="$(systemd-analyze verify --root="$1" --man=no --recursive-errors=no \
        "$unit_name" 2>&1)"; then
        fail "systemd-analyze verify ($2): $out"
        return
    fi
    if grep -E "dropcut|$1" <<<"$out" >/dev/null; then
        fail "systemd-analyze verify ($2) complained: $out"
        return
    fi
    echo "ok: systemd-analyze verify ($2)"
}

root="$work/root"
make_root "$root"
run_verify "$root" "$unit_name"

dropins="$root/etc/systemd/system/$unit_name.d"
for example in "$here"/examples/*.conf; do
    [ -e "$example" ] || continue
    rm -rf "$dropins"
    mkdir -p "$dropins"
    cp "$example" "$dropins/"
    run_verify "$root" "$unit_name + examples/$(basename "$example")"
done
rm -rf "$dropins"

# --- 2. sysusers.d and tmpfiles.d ----------------------------------------------------------
uroot="$work/users"
mkdir -p "$uroot/etc" "$uroot/usr/lib/sysusers.d" "$uroot/usr/lib/tmpfiles.d"
cp "$here/dropcut.sysusers" "$uroot/usr/lib/sysusers.d/dropcut.conf"
cp "$here/dropcut.tmpfiles" "$uroot/usr/lib/tmpfiles.d/dropcut.conf"
if ! out="$(systemd-sysusers --root="$uroot" 2>&1)"; then
    fail "systemd-sysusers: $out"
elif ! grep -q '^dropcut:x:[0-9]*:[0-9]*:[^:]*:[^:]*:/usr/sbin/nologin$' "$uroot/etc/passwd" ||
    ! grep -q '^dropcut:x:' "$uroot/etc/group"; then
    fail "systemd-sysusers did not create user and group dropcut: $out"
else
    echo "ok: dropcut.sysusers creates $(grep '^dropcut:' "$uroot/etc/passwd")"
fi
if ! out="$(systemd-tmpfiles --root="$uroot" --create 2>&1)" || [ -n "$out" ]; then
    fail "systemd-tmpfiles: $out"
else
    uid="$(grep '^dropcut:' "$uroot/etc/passwd" | cut -d: -f3)"
    for d in inbox outbox quarantine archive; do
        got="$(stat -c '%a %u:%g' "$uroot/srv/dropcut/$d" 2>/dev/null || echo missing)"
        [ "$got" = "2770 $uid:$uid" ] || fail "tmpfiles: /srv/dropcut/$d is '$got', want '2770 $uid:$uid'"
    done
    got="$(stat -c '%a %u:%g' "$uroot/etc/dropcut" 2>/dev/null || echo missing)"
    [ "$got" = "750 0:$uid" ] || fail "tmpfiles: /etc/dropcut is '$got', want '750 0:$uid'"
    echo "ok: dropcut.tmpfiles creates /etc/dropcut and /srv/dropcut/{inbox,outbox,quarantine,archive}"
fi

# --- 3. systemd-analyze security -----------------------------------------------------------
threshold="$(awk -v m="$max_exposure" 'BEGIN { printf "%d", m * 10 + 0.5 }')"
report="$work/security.txt"
sec_rc=0
systemd-analyze security --offline=yes --root="$root" --threshold="$threshold" \
    "$unit_name" >"$report" 2>&1 || sec_rc=$?
exposure="$(sed -n -E 's/.*Overall exposure level for [^:]*: ([0-9]+\.[0-9]+).*/\1/p' "$report")"
if [ -z "$exposure" ]; then
    cat "$report" >&2
    fail "systemd-analyze security printed no exposure level"
elif [ "$sec_rc" -ne 0 ]; then
    grep -E '^✗' "$report" >&2 || true
    fail "$unit_name exposure $exposure is above $max_exposure"
else
    echo "ok: systemd-analyze security --offline=yes: $unit_name exposure $exposure (max $max_exposure)"
fi

# --- 4. no core dumps ------------------------------------------------------------------------
if ! grep -Eq '^[[:space:]]*LimitCORE=0[[:space:]]*$' "$unit"; then
    fail "$unit_name does not set LimitCORE=0 (a core dump would hold the API key)"
else
    undone=""
    for example in "$here"/examples/*.conf; do
        [ -e "$example" ] || continue
        if grep -Eq '^[[:space:]]*LimitCORE=' "$example" &&
            ! grep -Eq '^[[:space:]]*LimitCORE=0[[:space:]]*$' "$example"; then
            undone="$undone $(basename "$example")"
        fi
    done
    if [ -n "$undone" ]; then
        fail "drop-in examples set LimitCORE= to something other than 0:$undone"
    else
        echo "ok: $unit_name sets LimitCORE=0 (no core dumps)"
    fi
fi

exit "$status"
