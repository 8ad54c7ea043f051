#!/usr/bin/env bash
# Checks the Docker image end to end: lints the Dockerfile with hadolint, builds the image,
# starts it, runs the image's own HEALTHCHECK command, trains a short run through the API
# inside it, and cleans up.
#
#   scripts/check_docker.sh              lint, build, run, check (docker, else buildah)
#   scripts/check_docker.sh --lint-only  just hadolint (what CI always runs, via scripts/test)
#
# With a Docker engine it uses docker. Without one (as on the project's build machines) it uses
# buildah with chroot isolation; where no base image can be pulled it makes a stand-in for
# python:3.11-slim from Debian bookworm with mmdebstrap (needs root and apt; see
# ../shared/PLATFORM.md). Set BNSCOPE_KEEP_IMAGE=1 to keep the built image.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGE="${BNSCOPE_IMAGE:-localhost/bnscope:check}"
BASE="docker.io/library/python:3.11-slim"
PORT="${BNSCOPE_CHECK_PORT:-18765}"
say() { echo "check_docker: $*" >&2; }

lint() {
  local hadolint
  hadolint="$(command -v hadolint || true)"
  if [ -z "$hadolint" ]; then
    source "$ROOT/scripts/bootstrap.sh" test
    hadolint="$(command -v hadolint)"
  fi
  "$hadolint" --failure-threshold warning Dockerfile
  say "hadolint: Dockerfile clean"
}

lint
[ "${1:-}" = "--lint-only" ] && exit 0

# --- a short run through the API of the started image -----------------------------------
wait_healthy() {  # the image's HEALTHCHECK command, run inside the container by $1...
  for _ in $(seq 1 120); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  say "the server in the image never became healthy"
  return 1
}

train_through_api() {
  local url="http://127.0.0.1:$PORT" id status=""
  id="$(curl -fsS -X POST "$url/api/runs" -H 'content-type: application/json' \
    -d '{"name": "docker check", "steps": 60, "eval_interval": 30, "batch_size": 32,
         "model": {"depth": 2, "width": 16}, "data": {"name": "digits"}}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')"
  say "run $id launched"
  for _ in $(seq 1 300); do
    status="$(curl -fsS "$url/api/runs/$id" | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')"
    case "$status" in
      completed) break ;;
      queued | running) sleep 1 ;;
      *) say "run $id ended $status"; curl -fsS "$url/api/runs/$id" >&2; return 1 ;;
    esac
  done
  [ "$status" = completed ] || { say "run $id did not finish in time ($status)"; return 1; }
  curl -fsS "$url/api/runs/$id/metrics?stat=loss" | python3 -c '
import json, sys
s = json.load(sys.stdin)["series"][0]
assert s["points_total"] == 60, s["points_total"]'
  curl -fsS -o /dev/null "$url/dashboard/"
  say "run $id completed inside the image: 60 steps of loss stored; dashboard served"
}

health_cmd() {  # the image's HEALTHCHECK, as an argv (exec form), from its config
  python3 -c '
import json, sys
hc = json.load(sys.stdin)
test = hc["Test"]
assert test[0] == "CMD", test
print("\0".join(test[1:]), end="")'
}

# --- torch for the image --------------------------------------------------------------------
# The image takes torch from PyTorch's index. Where that index cannot be reached (as on the
# project's build machines), torch and its dependencies are fetched with this machine's pip
# configuration and served to the build from a PEP 503 index on loopback.
build_args=()
index_dir=""
index_server=""
local_torch_index() {
  local version port
  version="$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)"
  index_dir="$(mktemp -d)"
  say "PyTorch's index is unreachable: serving torch==$version from this machine's pip on loopback"
  python3 -m pip download --quiet --only-binary=:all: --dest "$index_dir/wheels" "torch==$version"
  python3 - "$index_dir" <<'EOF'
import re, sys
from pathlib import Path
root = Path(sys.argv[1])
for wheel in (root / "wheels").glob("*.whl"):
    project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    (root / "cpu" / project).mkdir(parents=True, exist_ok=True)
    (root / "cpu" / project / wheel.name).symlink_to(wheel)
EOF
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  python3 -m http.server --bind 127.0.0.1 --directory "$index_dir" "$port" >/dev/null 2>&1 &
  index_server=$!
  build_args=(--build-arg "TORCH_INDEX=http://127.0.0.1:$port" --build-arg TORCH_VARIANT=cpu)
}
stop_index() {
  [ -z "$index_server" ] || kill "$index_server" 2>/dev/null || true
  [ -z "$index_dir" ] || rm -rf "$index_dir"
}
if ! curl -fsS -o /dev/null --max-time 10 "https://download.pytorch.org/whl/cpu/torch/"; then
  local_torch_index
fi
trap stop_index EXIT

# --- docker -------------------------------------------------------------------------------
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  name="bnscope-check-$$"
  data="$(mktemp -d)"
  cleanup() {
    docker rm -f "$name" >/dev/null 2>&1 || true
    [ -n "${BNSCOPE_KEEP_IMAGE:-}" ] || docker rmi "$IMAGE" >/dev/null 2>&1 || true
    rm -rf "$data"
    stop_index
  }
  trap cleanup EXIT
  docker build --network host "${build_args[@]}" -t "$IMAGE" .
  chmod 777 "$data"
  docker run -d --name "$name" -p "127.0.0.1:$PORT:8000" -v "$data:/data" "$IMAGE"
  mapfile -d '' hc < <(docker inspect -f '{{json .Config.Healthcheck}}' "$IMAGE" | health_cmd)
  wait_healthy docker exec "$name" "${hc[@]}"
  train_through_api
  [ -f "$data/bnscope.db" ] || { say "nothing stored in the /data volume"; exit 1; }
  say "docker: image built, healthy, trains, stores in its volume"
  exit 0
fi

# --- buildah (no engine) ------------------------------------------------------------------
if ! command -v buildah >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing buildah, podman and mmdebstrap"
    apt-get update -qq && apt-get install -y -qq buildah podman mmdebstrap >/dev/null
  else
    say "neither a Docker engine nor buildah here (and no root to install buildah)"
    exit 2
  fi
fi

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  if ! timeout 60 buildah pull -q "$BASE" >/dev/null 2>&1; then
    say "no registry: making a stand-in for $BASE from Debian bookworm"
    tar="$(mktemp --suffix=.tar)"
    # the host's CA bundle: pip inside the build goes through the same TLS path as the host's
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
      --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/' \
      bookworm "$tar"
    podman import --quiet --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
      --change 'CMD ["python3"]' "$tar" "$BASE" >/dev/null
    rm -f "$tar"
  fi
fi

data="$(mktemp -d)"
ctr=""
server=""
cleanup() {  # every step runs, whatever failed before it
  if [ -n "$server" ]; then kill -- "-$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  if [ -n "$ctr" ]; then buildah rm "$ctr" >/dev/null 2>&1 || true; fi
  if [ -z "${BNSCOPE_KEEP_IMAGE:-}" ]; then buildah rmi "$IMAGE" >/dev/null 2>&1 || true; fi
  rm -rf "$data"
  stop_index
}
trap cleanup EXIT

buildah bud --isolation chroot --network host --format docker --layers "${build_args[@]}" \
  -t "$IMAGE" .
config="$(buildah inspect --type image "$IMAGE")"
python3 - "$config" <<'EOF'
import json, sys
cfg = json.loads(sys.argv[1])["Docker"]["config"]
assert cfg["Cmd"] == ["bnscope", "serve"], cfg["Cmd"]
assert cfg["User"].split(":")[0] not in ("", "root", "0"), cfg["User"]
assert "/data" in cfg["Volumes"], cfg["Volumes"]
assert "BNSCOPE_DATA_DIR=/data" in cfg["Env"], cfg["Env"]
assert "8000/tcp" in cfg["ExposedPorts"], cfg["ExposedPorts"]
assert "/healthz" in " ".join(cfg["Healthcheck"]["Test"]), cfg["Healthcheck"]
print("check_docker: image config: CMD bnscope serve, user", cfg["User"], ", volume /data,"
      " port 8000, HEALTHCHECK on /healthz", file=sys.stderr)
EOF
user="$(buildah inspect --type image --format '{{.Docker.Config.User}}' "$IMAGE")"
chown "$user" "$data"
ctr="$(buildah from "$IMAGE")"
# CMD as the image runs it, as its user, on this check's port, storing in a host directory.
# buildah run gives a path the image declares a VOLUME a fresh copy of its own, whatever -v
# says, so the host directory goes to another path; the config check above covers /data.
mapfile -t cmd < <(buildah inspect --type image --format '{{range .Docker.Config.Cmd}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
setsid buildah run --isolation chroot --network host --user "$user" -v "$data:/srv/data" \
  "$ctr" -- env BNSCOPE_PORT="$PORT" BNSCOPE_DATA_DIR=/srv/data "${cmd[@]}" &
server=$!
mapfile -d '' hc < <(python3 -c 'import json, sys; print(json.dumps(json.loads(sys.argv[1])["Docker"]["config"]["Healthcheck"]))' "$config" | health_cmd)
[ "${#hc[@]}" -gt 0 ] || { say "no HEALTHCHECK command in the image"; exit 1; }
wait_healthy buildah run --isolation chroot --network host --user "$user" "$ctr" -- env BNSCOPE_PORT="$PORT" "${hc[@]}"
train_through_api
[ -f "$data/bnscope.db" ] || { say "nothing stored in the data directory"; exit 1; }
say "buildah: image built, healthy, trains, stores in its data directory"
