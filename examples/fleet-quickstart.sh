#!/usr/bin/env bash
# The fleet quick start of the README, as one script: a fleet server, two local devices (a device runtime and an
# update agent each), a good adapter rolled out canary-first, then a bad one that the health gate rolls back.
# Run from the repository root after `make install`:  bash examples/fleet-quickstart.sh
# Open http://127.0.0.1:8080/console (log in with the token in fleet-demo/admin-token) while it runs.
# KEEP=1 leaves the server and devices running at the end (stop them with: kill $(cat fleet-demo/pids)).
set -euo pipefail
W=${W:-fleet-demo}
PORT=${PORT:-8080}
export PATH="$PWD/.venv/bin:$PATH"
rm -rf "$W" && mkdir -p "$W"
: > "$W/pids"
cleanup() { [ "${KEEP:-0}" = 1 ] || kill $(cat "$W/pids") 2>/dev/null || true; }
trap cleanup EXIT
DB="sqlite:///$W/fleet.db"
S="http://127.0.0.1:$PORT"

# 1. Two adapters for asset pump-a, fitted on its normal data: v1, and v2-bad, fitted by mistake on another pump
#    (a third of the amplitude). Both are signed with the release key.
python - "$W" <<'EOF'
import sys, numpy as np
from edgepeft.bench.loadtest import series
folder = sys.argv[1]
header = "a,b,c"
np.savetxt(f"{folder}/normal.csv", series(2000, seed=0), delimiter=",", header=header, comments="")
np.savetxt(f"{folder}/other-pump.csv", series(2000, seed=0) * 0.3, delimiter=",", header=header, comments="")
np.savetxt(f"{folder}/live.csv", series(4000, seed=7), delimiter=",", header=header, comments="")
EOF
edgepeft keygen --out "$W/keys/release"
edgepeft adapt "$W/normal.csv" --out "$W/v1" --base tiny --steps 40
edgepeft adapt "$W/other-pump.csv" --out "$W/v2-bad" --base tiny --steps 40
edgepeft pack "$W/v1" --key "$W/keys/release" --asset pump-a --version v1 --release 1 --out "$W/v1.edelta"
edgepeft pack "$W/v2-bad" --key "$W/keys/release" --asset pump-a --version v2-bad --release 2 --out "$W/v2-bad.edelta"

# 2. The fleet server: TUF keys (offline root/targets, online timestamp/snapshot/bins/director), an admin token.
edgepeft fleet tuf init --db "$DB" --offline-keys "$W/offline-keys" --online-keys "$W/online-keys"
edgepeft fleet tuf roots --db "$DB" --out "$W/roots"          # the trust anchors every device is provisioned with
edgepeft fleet token --db "$DB" --scopes admin > "$W/admin-token"
edgepeft fleet serve --db "$DB" --storage "$W/storage" --trusted-key "$W/keys/release.pub" \
  --online-keys "$W/online-keys" --poll-seconds 3 --port "$PORT" 2> "$W/server.log" & echo $! >> "$W/pids"
until curl -sf "$S/health" > /dev/null; do sleep 0.5; done

H="Authorization: Bearer $(cat "$W/admin-token")"; J="Content-Type: application/json"
# The base every bundle binds to (the manifest's base.sha256; `edgepeft inspect` shows it).
BASE=$(python -c 'import sys; from edgepeft.delta import read_bundle; print(read_bundle(open(sys.argv[1], "rb").read()).base_sha256)' "$W/v1.edelta")
curl -sf -H "$H" -H "$J" "$S/v1/bases" -d "{\"name\": \"tiny\", \"sha256\": \"$BASE\", \"reason\": \"the base\"}" > /dev/null
curl -sf -H "$H" -H "$J" "$S/v1/groups" -d '{"name": "line-1", "reason": "quick start"}' > /dev/null
V1=$(curl -sf -H "$H" --data-binary @"$W/v1.edelta" "$S/v1/bundles?reason=first+release" | python -c 'import json,sys; print(json.load(sys.stdin)["sha256"])')
BAD=$(curl -sf -H "$H" --data-binary @"$W/v2-bad.edelta" "$S/v1/bundles?reason=second+release" | python -c 'import json,sys; print(json.load(sys.stdin)["sha256"])')

# 3. Two local devices: enrol (the credential is shown once), a device runtime, an agent, and a feeder that streams
#    the pump's live rows into the runtime (what the plant's data pipeline does on a real device).
for i in 1 2; do
  D="$W/device-$i"; mkdir -p "$D"
  curl -sf -H "$H" -H "$J" "$S/v1/devices" -d "{\"device_id\": \"pump-$i\", \"groups\": [\"line-1\"],
       \"assets\": [\"pump-a\"], \"bases\": [\"$BASE\"], \"reason\": \"installed\"}" \
    | python -c 'import json,sys; print(json.load(sys.stdin)["credential"])' > "$D/credential"
  python -c 'import secrets; print(secrets.token_urlsafe(24))' > "$D/runtime-token"
  edgepeft serve --state "$D/runtime" --port $((8100 + i)) --trusted-key "$W/keys/release.pub" \
    --token-file "$D/runtime-token" 2> "$D/runtime.log" & echo $! >> "$W/pids"
  edgepeft agent --server "$S" --device-id "pump-$i" --credential-file "$D/credential" \
    --image-root "$W/roots/image-root.json" --director-root "$W/roots/director-root.json" \
    --runtime "http://127.0.0.1:$((8100 + i))" --runtime-token-file "$D/runtime-token" --state "$D/agent" \
    2> "$D/agent.log" & echo $! >> "$W/pids"
  python - "http://127.0.0.1:$((8100 + i))" "$W/live.csv" <<'EOF' & echo $! >> "$W/pids"
import sys, time, httpx, numpy as np
url, rows = sys.argv[1], np.loadtxt(sys.argv[2], delimiter=",", skiprows=1)
i = 0
while True:  # 100 rows a second, 300 per request: a request needs history (the first 64 rows are warm-up)
    try:
        httpx.post(f"{url}/v1/assets/pump-a/score", json={"rows": rows[i:i + 300].tolist()}, timeout=10)
    except httpx.HTTPError:
        pass
    i = (i + 300) % (len(rows) - 300)
    time.sleep(3)
EOF
done

state() { curl -sf -H "$H" "$S/v1/rollouts/$1" | python -c 'import json,sys; r=json.load(sys.stdin); print(r["state"], r["devices_by_status"], r["outcome"])'; }
wait_for() { for _ in $(seq 1 120); do s=$(state "$1"); case "$s" in $2*) echo "rollout $1: $s"; return 0;; esac; sleep 1; done; echo "rollout $1 stuck: $s"; return 1; }

# 4. Roll v1 out: one canary device first, then the rest once the canary is healthy.
R1=$(curl -sf -H "$H" -H "$J" "$S/v1/rollouts" -d "{\"name\": \"v1\", \"group\": \"line-1\", \"bundle\": \"$V1\",
     \"strategy\": {\"canary\": 1, \"waves\": [100]}, \"gates\": {\"min_rows\": 200}, \"reason\": \"first release\"}" \
     | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
wait_for "$R1" completed

# 5. Roll the bad adapter out the same way: its canary raises an alert storm, the health gate halts the rollout
#    and rolls the canary back to v1; the second device never gets it.
R2=$(curl -sf -H "$H" -H "$J" "$S/v1/rollouts" -d "{\"name\": \"v2\", \"group\": \"line-1\", \"bundle\": \"$BAD\",
     \"strategy\": {\"canary\": 1, \"waves\": [100]}, \"gates\": {\"min_rows\": 200}, \"reason\": \"second release\"}" \
     | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
wait_for "$R2" halted
for _ in $(seq 1 60); do
  a1=$(curl -sf http://127.0.0.1:8101/v1/assets/pump-a | python -c 'import json,sys; print(json.load(sys.stdin)["active"])')
  a2=$(curl -sf http://127.0.0.1:8102/v1/assets/pump-a | python -c 'import json,sys; print(json.load(sys.stdin)["active"])')
  [ "$a1" = v1 ] && [ "$a2" = v1 ] && break; sleep 1
done
echo "devices now run: pump-1 $a1, pump-2 $a2"
curl -sf -H "$H" "$S/v1/audit?limit=1000" | python -c 'import json,sys; [print(e["at"], e["actor"], e["action"], e["target"], "-", e["reason"]) for e in json.load(sys.stdin) if e["action"].startswith("rollout")]'
[ "$a1" = v1 ] && [ "$a2" = v1 ]
echo "console: $S/console (token in $W/admin-token)"
