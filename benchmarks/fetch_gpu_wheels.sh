#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on the GPU machine (which has no network).
#
#   bash benchmarks/fetch_gpu_wheels.sh                   # -> wheels/ (ignored by git), for Python 3.12 x86-64
#   bash benchmarks/fetch_gpu_wheels.sh -d DIR --with-build-tools --max-mib 20 [EXTRA_REQUIREMENT ...]
#
# How: resolve the whole dependency tree of the requirements once, for the target interpreter (CPython 3.12,
# manylinux x86-64), without installing anything (pip install --dry-run --report); drop the packages the
# GPU machine already has (torch and what torch and pytest pull in, numpy, pillow, safetensors, tqdm, ...:
# see EXCLUDE); then download exactly the remaining name==version pairs with --no-deps, so that nothing can
# pull torch or nvidia-* wheels. Writes DIR/requirements.txt (the top-level requirements, which
# gpu_check.sh resolves against what the GPU machine has installed) and DIR/MANIFEST.txt, removes wheels
# of earlier runs that are no longer wanted (two versions of one package stop an install), prints the total
# size and fails when it exceeds --max-mib (everything carried must fit in the 64 MiB working tree).
#
# Options:
#   -d, --dest DIR         where the wheels go (default: wheels/ at the repository root)
#   --with-build-tools     also carry pybind11 and ninja (the image has both; small insurance)
#   --with-cmake           also carry cmake (~30 MiB: only when the GPU machine has no cmake; raise --max-mib)
#   --exclude "A B ..."    extra distribution names to leave out (the machine has them)
#   --max-mib N            size limit of the downloaded wheels (default 20)
#   --python-version V     target Python (default 3.12)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/wheels"
PYVER=3.12
MAX_MIB=20
EXTRA_EXCLUDE=""
REQS=(diffusers)
PY=${PYTHON:-python3}

# On the GPU machine already (torch and its requirements, pytest's, the brief's list): never carried.
EXCLUDE="torch triton numpy safetensors tqdm pillow scipy scikit-learn joblib threadpoolctl
filelock fsspec typing-extensions sympy mpmath networkx jinja2 markupsafe setuptools packaging
pytest pluggy iniconfig hypothesis attrs sortedcontainers"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    -d|--dest) DEST=$2; shift ;;
    --dest=*) DEST=${1#*=} ;;
    --with-build-tools) REQS+=(pybind11 ninja) ;;
    --with-cmake) REQS+=(cmake) ;;
    --exclude) EXTRA_EXCLUDE="$EXTRA_EXCLUDE $2"; shift ;;
    --exclude=*) EXTRA_EXCLUDE="$EXTRA_EXCLUDE ${1#*=}" ;;
    --max-mib) MAX_MIB=$2; shift ;;
    --max-mib=*) MAX_MIB=${1#*=} ;;
    --python-version) PYVER=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "fetch_gpu_wheels: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) REQS+=("$1") ;;
  esac
  shift
done

ABI="cp${PYVER/./}"
TARGET_FLAGS=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none
              --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64
              --platform linux_x86_64 --platform any)

TMP=$(mktemp -d "${TMPDIR:-/tmp}/fetch_gpu_wheels.XXXXXX") || exit 2
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$DEST" || exit 2
DEST="$(cd "$DEST" && pwd)"

echo "fetch_gpu_wheels: resolving ${REQS[*]} for CPython $PYVER manylinux x86-64 (no install)"
if ! "$PY" -m pip install --dry-run --ignore-installed --quiet --no-cache-dir --report "$TMP/report.json" \
      --target "$TMP/unused" "${TARGET_FLAGS[@]}" "${REQS[@]}"; then
  echo "fetch_gpu_wheels: pip could not resolve ${REQS[*]} for the target" >&2
  exit 1
fi

# name==version of everything resolved, minus the excluded names (normalized as PEP 503 does).
if ! "$PY" - "$TMP/report.json" "$EXCLUDE $EXTRA_EXCLUDE" > "$TMP/pins.txt" <<'EOF'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
report = json.load(open(sys.argv[1]))
exclude = {norm(n) for n in sys.argv[2].split()}
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    n = norm(name)
    if n in exclude or n.startswith(("nvidia-", "cuda-")):
        print(f"  skip {name} {version} (the GPU machine has it)", file=sys.stderr)
        continue
    print(f"{name}=={version}")
EOF
then
  echo "fetch_gpu_wheels: could not read pip's report" >&2
  exit 1
fi
mapfile -t PINS < "$TMP/pins.txt"
echo "fetch_gpu_wheels: downloading ${#PINS[@]} wheels with --no-deps: ${PINS[*]}"
mkdir -p "$TMP/dl"
if ! "$PY" -m pip download --no-deps --quiet --no-cache-dir -d "$TMP/dl" "${TARGET_FLAGS[@]}" "${PINS[@]}"; then
  echo "fetch_gpu_wheels: download failed" >&2
  exit 1
fi

# Replace the wheels of earlier runs: one version of each package only.
rm -f "$DEST"/*.whl
mv "$TMP"/dl/*.whl "$DEST"/ || exit 1
printf '%s\n' "# top-level requirements; gpu_check.sh resolves them against the GPU machine's packages" \
  "${REQS[@]}" > "$DEST/requirements.txt"
( cd "$DEST" && for f in *.whl; do printf '%9d  %s\n' "$(stat -c %s "$f")" "$f"; done ) > "$DEST/MANIFEST.txt"

TOTAL=$(cat "$DEST"/*.whl | wc -c)
TOTAL_MIB=$(awk -v b="$TOTAL" 'BEGIN { printf "%.2f", b / 1048576 }')
WHEELS=("$DEST"/*.whl)
echo "fetch_gpu_wheels: ${#WHEELS[@]} wheels in $DEST:"
cat "$DEST/MANIFEST.txt"
echo "fetch_gpu_wheels: total $TOTAL bytes = $TOTAL_MIB MiB (limit $MAX_MIB MiB)"
if awk -v b="$TOTAL" -v m="$MAX_MIB" 'BEGIN { exit !(b > m * 1048576) }'; then
  echo "fetch_gpu_wheels: over the limit: carry less (--exclude) or raise --max-mib" >&2
  exit 1
fi
if compgen -G "$DEST/[tT]orch-*.whl" >/dev/null || compgen -G "$DEST/triton-*.whl" >/dev/null ||
   compgen -G "$DEST/nvidia*.whl" >/dev/null; then
  echo "fetch_gpu_wheels: torch/triton/nvidia wheels slipped in; check EXCLUDE" >&2
  exit 1
fi
