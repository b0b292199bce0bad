#!/usr/bin/env bash
# Build the scanbridge Docker image with buildah and run it with podman on a tiny BIDS dataset, on a
# machine like CI's: root, no Docker engine, no container registry reachable (PyPI and Debian are).
#
#   sudo bash scripts/build-container.sh [options]
#
#   --work DIR          scratch folder for storage, config, data and logs (default /var/tmp/scanbridge-container)
#   --tag NAME          image name (default localhost/scanbridge:<version>)
#   --fetch-templates   fetch TemplateFlow files at build time (needs TemplateFlow's S3; default: off,
#                       the app's offline template source serves)
#   --nprocs N          --nprocs for the participant run (default 2)
#   --build-only        stop after the build and the --version/--help checks
#   --singularity       also build Singularity.def's %files/%post with buildah (no Apptainer runtime is
#                       needed) and run its %environment + %runscript read-only (about 5 more minutes)
#   --keep              keep the image, storage and data for inspection (default: remove them)
#   --reuse             use the image a previous --keep run left in --work instead of rebuilding it
#
# Phases: tools (apt-get install of buildah/podman/... when missing), config (private containers
# storage/config under --work), base (python:3.11-slim-bookworm, pulled when a registry is reachable,
# otherwise a debootstrap stand-in tagged with that name), wheel (the local CPU torch wheel, served
# from wheels/ so the PyTorch index is not needed), build, smoke (--version, --help, read-only
# write checks), data (tiny BIDS dataset), participant, group. Timings are printed per phase.
# Needs about 8 GB free disk at peak. Exit code: 0 all phases passed, 1 otherwise (the failing
# phase and the tail of its log are printed).
# shellcheck disable=SC2329  # phase functions are called indirectly, through run_phase and trap
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=/var/tmp/scanbridge-container
TAG=""
FETCH_TEMPLATES=0
NPROCS=2
BUILD_ONLY=0
SINGULARITY=0
KEEP=0
REUSE=0
MIN_FREE_GB=${MIN_FREE_GB:-9}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$REPO/Dockerfile" | head -n1)
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

while [ $# -gt 0 ]; do
    case "$1" in
        --work) WORK=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --fetch-templates) FETCH_TEMPLATES=1; shift ;;
        --nprocs) NPROCS=$2; shift 2 ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --singularity) SINGULARITY=1; shift ;;
        --keep) KEEP=1; shift ;;
        --reuse) REUSE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '/^# shellcheck/d; $d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-container.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/bidsapp/__init__.py")
TAG=${TAG:-localhost/scanbridge:${VERSION:-dev}}
LOGS=$WORK/logs
mkdir -p "$WORK" "$LOGS"
WORK=$(cd "$WORK" && pwd)
LOGS=$WORK/logs

exec 9>"$WORK/.lock"
flock -n 9 || { echo "build-container.sh: another build is using $WORK" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# phase bookkeeping
declare -a PHASES=() TIMES=() STATES=()
CURRENT=""
T0=$(date +%s.%N)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

summary() {
    echo
    echo "phase          seconds  result"
    echo "-------------  -------  ------"
    local i
    for i in "${!PHASES[@]}"; do
        printf '%-13s  %7s  %s\n' "${PHASES[$i]}" "${TIMES[$i]}" "${STATES[$i]}"
    done
    printf '%-13s  %7s\n' "total" "$(elapsed "$T0" "$(now)")"
    awk -v k="$PEAK_KB" 'BEGIN { printf "peak disk use about %.1f GB (drop in free space at phase ends)\n", k / 1048576 }'
}

# run_phase NAME FUNCTION: runs FUNCTION with its output in $LOGS/NAME.log and records its time and
# result; LAST_RC holds its exit status. It always returns 0 and must be called as a plain command
# (not in `if`, `&&` or `||`), or bash would ignore `set -e` inside the phase.
LAST_RC=0
FAILED=()
run_phase() {
    local name=$1 fn=$2 start
    CURRENT=$name
    LAST_RC=0
    start=$(now)
    echo "== $name"
    # A background subshell keeps `set -e` in force inside the phase (it is ignored in `f || ...`).
    ( set -e; "$fn" ) >"$LOGS/$name.log" 2>&1 &
    wait $! || LAST_RC=$?
    PHASES+=("$name"); TIMES+=("$(elapsed "$start" "$(now)")")
    disk_sample
    if [ "$LAST_RC" -eq 0 ]; then
        STATES+=("ok")
        echo "   ok (${TIMES[-1]} s)"
    else
        STATES+=("FAILED (exit $LAST_RC)")
        FAILED+=("$name")
        echo "   FAILED after ${TIMES[-1]} s (exit $LAST_RC); last lines of $LOGS/$name.log:" >&2
        tail -n 40 "$LOGS/$name.log" | sed 's/^/   | /' >&2
    fi
}

# Disk use of the run, approximated by the drop in free space under WORK (sampled at phase ends).
free_kb() { df -Pk "$WORK" | awk 'NR == 2 { print $4 }'; }
FREE0=""
PEAK_KB=0
disk_sample() {
    local used
    used=$(( ${FREE0:-0} - $(free_kb) ))
    if [ "$used" -gt "$PEAK_KB" ]; then PEAK_KB=$used; fi
}

skip_phase() {
    PHASES+=("$1"); TIMES+=("-"); STATES+=("skipped ($2)")
    echo "== $1: skipped ($2)"
}

# Stop here when the last phase failed (later phases need its result).
require_ok() {
    if [ "$LAST_RC" -ne 0 ]; then exit 1; fi
}

# ---------------------------------------------------------------------------------------------
# phases
phase_tools() {
    local missing=()
    for cmd in buildah podman debootstrap runc fuse-overlayfs slirp4netns newuidmap flock; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing (missing: ${missing[*]})"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            buildah podman fuse-overlayfs debootstrap runc slirp4netns uidmap
    fi
    buildah --version
    podman --version
}

phase_config() {
    local L=$WORK
    mkdir -p "$L/storage" "$L/run" "$L/tmp" "$L/engine/static" "$L/engine/volumes" "$L/pipconf"
    cat >"$L/storage.conf" <<EOF
[storage]
driver = "overlay"
runroot = "$L/run"
graphroot = "$L/storage"
EOF
    cat >"$L/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$L/run/libpod"
static_dir = "$L/engine/static"
volume_path = "$L/engine/volumes"
EOF
    cat >"$L/registries.conf" <<EOF
unqualified-search-registries = []
short-name-mode = "disabled"
EOF
    # pip inside the build: the host's CA bundle (HTTPS to PyPI may be re-signed by a proxy),
    # the local torch wheel via wheels/ (bind-mounted by the Dockerfile), no slow retries.
    cat >"$L/pipconf/pip.conf" <<EOF
[global]
cert = /run/ci-ca/ca-certificates.crt
retries = 1
timeout = 60
EOF
    cat "$L/storage.conf" "$L/containers.conf" "$L/registries.conf" "$L/pipconf/pip.conf"
}

export_config() {
    export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
    export CONTAINERS_CONF=$WORK/containers.conf
    export CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
    export TMPDIR=$WORK/tmp
}

debian_mirror() {
    local m=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        m=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

phase_base() {
    if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "base image already in storage: $BASE_IMAGE"; return 0
    fi
    if timeout 60 buildah pull --quiet "$BASE_IMAGE"; then
        echo "pulled $BASE_IMAGE"; return 0
    fi
    echo "no registry reachable: building a stand-in for $BASE_IMAGE from Debian bookworm"
    local mirror rootfs=$WORK/rootfs
    mirror=$(debian_mirror)
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
    tar --numeric-owner -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - localhost/bookworm-base
    rm -rf "$rootfs"
    mkdir -p "$WORK/shim"
    # What the official image provides that the build relies on: python3.11 with pip and venv at
    # /usr/local/bin/python, CA certificates, C.UTF-8.
    cat >"$WORK/shim/Containerfile" <<'EOF'
FROM localhost/bookworm-base
ENV LANG=C.UTF-8
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
    && python3 -m venv /usr/local \
    && ln -sf python3 /usr/local/bin/python
CMD ["python3"]
EOF
    buildah build --isolation chroot --pull=never -t "$BASE_IMAGE" "$WORK/shim"
    podman rmi localhost/bookworm-base
}

# phase_wheel runs in a subshell: it leaves its findings in $WORK/wheel.env.
WHEEL_ADDED=""
TORCH_INDEX_ARGS=()
phase_wheel() {
    local want="torch-${TORCH_VERSION}+cpu-"
    local have
    have=$(find "$REPO/wheels" -maxdepth 1 -name "${want}*.whl" | head -n1)
    if [ -z "$have" ]; then
        local pip=()
        if python3 -m pip --version >/dev/null 2>&1; then pip=(python3 -m pip)
        elif [ -x "$REPO/.venv/bin/pip" ]; then pip=("$REPO/.venv/bin/pip")
        fi
        if [ ${#pip[@]} -gt 0 ]; then
            # +cpu spelled out: only a CPU build (local index, find-links or pip cache) can match.
            "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.11 \
                --platform manylinux_2_28_x86_64 --implementation cp --abi cp311 \
                -d "$REPO/wheels" "torch==${TORCH_VERSION}+cpu" || true
        fi
        have=$(find "$REPO/wheels" -maxdepth 1 -name "${want}*.whl" | head -n1)
        if [ -n "$have" ]; then echo "WHEEL_ADDED=$(printf %q "$have")" >"$WORK/wheel.env"; fi
    fi
    if [ -n "$have" ]; then
        echo "local torch wheel: $have (PyTorch index not used)"
        echo 'TORCH_INDEX_ARGS=(--build-arg "TORCH_INDEX_URL=")' >>"$WORK/wheel.env"
    else
        echo "no local torch ${TORCH_VERSION}+cpu wheel: the build uses the PyTorch CPU index"
    fi
}

phase_build() {
    local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
    buildah build --isolation chroot --pull=never \
        -v "$ca:/run/ci-ca/ca-certificates.crt:ro" -v "$WORK/pipconf:/etc/xdg/pip:ro" \
        "${TORCH_INDEX_ARGS[@]}" \
        --build-arg "FETCH_TEMPLATES=$FETCH_TEMPLATES" \
        --build-arg "VERSION=${VERSION:-dev}" \
        --build-arg "IMAGE_NAME=${TAG%:*}" \
        --build-arg "VCS_REF=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -t "$TAG" -f "$REPO/Dockerfile" "$REPO"
    podman images
}

RUN_OPTS=(--rm --network none --read-only --user 1000:1000 -e HOME=/tmp --tmpfs /tmp)

phase_smoke() {
    local out
    out=$(podman run "${RUN_OPTS[@]}" "$TAG" --version)
    echo "$out"
    [ "$out" = "scanbridge ${VERSION}" ] || { echo "unexpected --version output: $out"; return 1; }
    podman run "${RUN_OPTS[@]}" "$TAG" --help
    # The image's environment must keep every runtime write under /tmp, and nothing else writable.
    podman run "${RUN_OPTS[@]}" --entrypoint python "$TAG" -c '
import importlib, os, pkgutil, sys, tempfile
import matplotlib.pyplot, nipype, templateflow.api, torch, ants, bids, nibabel, nilearn.datasets
import monai, neuroCombat, pandas, scipy.stats, sklearn.svm, statsmodels.api
print("torch", torch.__version__, "| user", os.getuid(), "| HOME", os.environ["HOME"])
# every module of the app imports (the image prunes dependencies test suites; the app must not need them)
broken = []
for pkg in ("bidsapp", "workflows"):
    root = importlib.import_module(pkg)
    for mod in pkgutil.walk_packages(root.__path__, pkg + "."):
        try:
            importlib.import_module(mod.name)
        except Exception as exc:
            broken.append(f"{mod.name}: {type(exc).__name__}: {exc}")
print("app modules that do not import:", broken or "none")
print("TEMPLATEFLOW_HOME", os.environ["TEMPLATEFLOW_HOME"], sorted(os.listdir(os.environ["TEMPLATEFLOW_HOME"]))[:5])
for var in ("MPLCONFIGDIR", "NIPYPE_CONFIG_DIR", "XDG_CACHE_HOME"):
    assert os.environ[var].startswith("/tmp/"), var
nipype.config.save_data("scanbridge-check", 1)   # what nipype writes under ~/.nipype
assert os.path.isfile(os.path.join(os.environ["NIPYPE_CONFIG_DIR"], "nipype.json"))
tempfile.NamedTemporaryFile().close()
try:
    open("/opt/scanbridge/probe", "w")
except OSError:
    pass
else:
    sys.exit("the image root is writable for the run-time user")
print("read-only checks passed")
'
    podman image inspect --format 'labels: {{json .Labels}}' "$TAG"
}

phase_data() {
    local data=$WORK/data
    rm -rf "$data"
    mkdir -p "$data/out" "$data/work"
    chown -R 1000:1000 "$data"
    local mount=(-v "$data:/data")
    if podman run "${RUN_OPTS[@]}" --entrypoint scanbridge-simulate "$TAG" --help >/dev/null 2>&1; then
        echo "making the dataset with scanbridge-simulate"
        podman run "${RUN_OPTS[@]}" "${mount[@]}" --entrypoint scanbridge-simulate "$TAG" \
            /data/bids --subjects 2 --sites 2 --sessions 1 --resolution 2 --seed 1
    else
        echo "scanbridge-simulate is not available in the image: writing a nibabel phantom"
        podman run "${RUN_OPTS[@]}" "${mount[@]}" --entrypoint python "$TAG" -c "$PHANTOM_PY" /data/bids
    fi
    find "$data/bids" -type f | sort
    (cd "$data/bids" && find . -type f -exec sha256sum {} + | sort) >"$WORK/bids.sha256"
}

# Two subjects on two sites: ellipsoidal CSF/GM/WM head at 2 mm, T1w-like contrast, sidecars.
PHANTOM_PY='
import json, os, sys
import numpy as np, nibabel as nib
root = sys.argv[1]
os.makedirs(root, exist_ok=True)
def dump(path, obj):
    with open(os.path.join(root, path), "w") as f:
        json.dump(obj, f, indent=1)
dump("dataset_description.json", {"Name": "scanbridge container check", "BIDSVersion": "1.9.0"})
with open(os.path.join(root, "participants.tsv"), "w") as f:
    f.write("participant_id\tsite\tage\tsex\nsub-01\tA\t30\tF\nsub-02\tB\t40\tM\n")
shape, vox = (80, 96, 80), 2.0
ijk = np.indices(shape).astype(np.float32)
c = (np.array(shape, dtype=np.float32) - 1) / 2
rng = np.random.default_rng(1)
for sub, field, scale in (("01", 3.0, 1.0), ("02", 1.5, 0.9)):
    r = np.sqrt(sum(((ijk[k] - c[k]) / (s / 2)) ** 2 for k, s in enumerate((70, 86, 70))))
    img = np.zeros(shape, np.float32)
    img[r < 1.0] = 300           # scalp/skull rim
    img[r < 0.9] = 150           # CSF
    img[r < 0.85] = 600 * scale  # GM
    img[r < 0.6] = 900 * scale   # WM
    img[r < 0.15] = 150          # ventricles
    img += rng.normal(0, 15, shape).astype(np.float32)
    img = np.clip(img, 0, None)
    affine = np.diag([vox, vox, vox, 1.0])
    affine[:3, 3] = -c * vox
    d = f"sub-{sub}/anat"
    os.makedirs(os.path.join(root, d), exist_ok=True)
    nib.save(nib.Nifti1Image(img, affine), os.path.join(root, d, f"sub-{sub}_T1w.nii.gz"))
    dump(f"{d}/sub-{sub}_T1w.json", {"RepetitionTime": 2.3, "EchoTime": 0.003, "InversionTime": 0.9,
         "FlipAngle": 9, "MagneticFieldStrength": field, "Manufacturer": "Siemens",
         "PulseSequenceType": "MPRAGE", "InstitutionName": "site " + ("A" if sub == "01" else "B")})
print("phantom written to", root)
'

run_app() {
    podman run "${RUN_OPTS[@]}" -v "$WORK/data/bids:/bids:ro" -v "$WORK/data/out:/out" \
        -v "$WORK/data/work:/work" "$TAG" /bids /out "$@" -w /work --nprocs "$NPROCS" --omp-nthreads 1
}

expect_files() {
    local absent=0 pattern
    for pattern in "$@"; do
        if [ -z "$(find "$WORK/data/out" -path "$WORK/data/out/$pattern" -print -quit)" ]; then
            echo "missing output: $pattern"; absent=1
        fi
    done
    return "$absent"
}

phase_participant() {
    run_app participant
    find "$WORK/data/out" -type f | sort
    expect_files dataset_description.json 'sub-*/anat/*desc-preproc_T1w.nii.gz' \
        'sub-*/anat/*desc-brain_mask.nii.gz' 'sub-*/anat/*_dseg.nii.gz' \
        'sub-*/anat/*label-GM_probseg.nii.gz' 'sub-*/anat/*desc-volumes_morph.tsv' 'sub-*.html'
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print("GeneratedBy:", json.dumps(d.get("GeneratedBy")))' \
        "$WORK/data/out/dataset_description.json" || true
    grep -q '"Container"' "$WORK/data/out/dataset_description.json" \
        || echo "warning: dataset_description.json GeneratedBy has no Container"
}

phase_group() {
    run_app group
    expect_files group.html group_volumes.tsv
    # bids_dir was mounted read-only; check that nothing changed anyway.
    (cd "$WORK/data/bids" && find . -type f -exec sha256sum {} + | sort) | diff - "$WORK/bids.sha256"
}

# Singularity.def exercised without Apptainer: %files become COPY, %post runs as one shell script
# (as Apptainer runs it), %environment and %runscript go where Apptainer puts them. TemplateFlow
# and the PyTorch index are unreachable in CI, so FETCH_TEMPLATES=0 and the local wheel is served
# with find-links unless --fetch-templates was given.
section() { awk -v s="$1" '/^%/ { on = ($1 == s); next } on' "$REPO/Singularity.def"; }

phase_singularity() {
    local ctx=$WORK/sif-context from
    rm -rf "$ctx"; mkdir -p "$ctx/.singularity.d/env" "$ctx/wheels"
    from=$(sed -n 's/^From:[[:space:]]*//p' "$REPO/Singularity.def")
    section %post >"$ctx/post.sh"
    if [ "$FETCH_TEMPLATES" = 0 ]; then sed -i 's/^\([[:space:]]*\)FETCH_TEMPLATES=1$/\1FETCH_TEMPLATES=0/' "$ctx/post.sh"; fi
    section %environment >"$ctx/.singularity.d/env/90-environment.sh"
    { echo '#!/bin/sh'; section %runscript; } >"$ctx/.singularity.d/runscript"
    chmod 755 "$ctx/.singularity.d/runscript"
    cp "$REPO"/wheels/*.whl "$ctx/wheels/" 2>/dev/null || true
    echo 'find-links = /run/ci-wheels' >>"$WORK/pipconf/pip.conf"
    {
        echo "FROM $from"
        section %files | awk 'NF { print "COPY " $1 " " $2 }'
        echo "COPY .singularity.d /.singularity.d"
        echo "RUN --mount=type=bind,source=post.sh,target=/tmp/post.sh /bin/sh -e /tmp/post.sh"
    } >"$ctx/Containerfile"
    cat "$ctx/Containerfile"
    section %files | awk 'NF { print $1 }' | while read -r src; do cp -r "$REPO/$src" "$ctx/"; done
    local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
    buildah build --isolation chroot --pull=never \
        -v "$ca:/run/ci-ca/ca-certificates.crt:ro" -v "$WORK/pipconf:/etc/xdg/pip:ro" \
        -v "$ctx/wheels:/run/ci-wheels:ro" -t localhost/scanbridge-sif-check "$ctx"
    rm -rf "$ctx"
    # what `apptainer run --cleanenv img --version` does: source the environment, exec the runscript
    podman run "${RUN_OPTS[@]}" -e APPTAINER_NAME=scanbridge.sif --entrypoint /bin/sh \
        localhost/scanbridge-sif-check -c '. /.singularity.d/env/90-environment.sh && env | grep -E "^(SCANBRIDGE|TEMPLATEFLOW|MPLCONFIGDIR|NIPYPE)" && exec /.singularity.d/runscript --version'
    podman image inspect --format '{{.Size}}' localhost/scanbridge-sif-check \
        | awk '{ printf "Singularity.def image: %.2f GB\n", $1 / 1e9 }'
    podman rmi localhost/scanbridge-sif-check
}

# ---------------------------------------------------------------------------------------------
cleanup() {
    local rc=$?
    set +e
    if [ -n "$CURRENT" ]; then summary; fi
    if [ -n "$WHEEL_ADDED" ]; then rm -f "$WHEEL_ADDED"; fi
    if [ "$KEEP" = 1 ]; then
        echo "kept $WORK (image $TAG); remove with: CONTAINERS_STORAGE_CONF=$WORK/storage.conf podman system reset -f; rm -rf $WORK"
    elif [ -f "$WORK/storage.conf" ]; then
        local start
        start=$(now)
        export_config
        podman system reset --force >/dev/null 2>&1
        buildah rm --all >/dev/null 2>&1
        # anything still mounted under WORK (overlay layers) must go before the files can
        findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | xargs -r -n1 umount -l 2>/dev/null
        find "$WORK" -mindepth 1 -maxdepth 1 ! -name logs ! -name .lock -exec rm -rf {} +
        echo "cleaned up $WORK in $(elapsed "$start" "$(now)") s (logs kept in $LOGS)"
    fi
    df -h "$WORK" | tail -n1 | awk '{ print "disk free after cleanup: " $4 }'
    exit "$rc"
}
# The whole run is one function, parsed before it starts and ending in exit: editing this file
# during a run is safe.
main() {
    trap cleanup EXIT

    rm -f "$LOGS"/*.log  # logs of an earlier run would be mistaken for this one's
    FREE0=$(free_kb)
    free_gb=$(( FREE0 / 1048576 ))
    echo "scanbridge ${VERSION} image build in $WORK (${free_gb} GB free), tag $TAG, FETCH_TEMPLATES=$FETCH_TEMPLATES"
    if [ "$free_gb" -lt "$MIN_FREE_GB" ]; then
        echo "build-container.sh: need about ${MIN_FREE_GB} GB free under $WORK, have ${free_gb} GB" >&2
        exit 1
    fi
    [ "$(id -u)" -eq 0 ] || { echo "build-container.sh: run as root (buildah/podman with private storage)" >&2; exit 1; }

    run_phase tools phase_tools; require_ok
    run_phase config phase_config; require_ok
    export_config
    run_phase base phase_base; require_ok
    rm -f "$WORK/wheel.env"
    run_phase wheel phase_wheel; require_ok
    # shellcheck disable=SC1091
    if [ -f "$WORK/wheel.env" ]; then . "$WORK/wheel.env"; fi
    if [ "$REUSE" = 1 ] && podman image exists "$TAG"; then
        skip_phase build "reusing $TAG"
    else
        run_phase build phase_build; require_ok
    fi
    size=$(podman image inspect --format '{{.Size}}' "$TAG")
    echo "image $TAG: $(awk -v s="$size" 'BEGIN { printf "%.2f GB", s / 1e9 }')"
    run_phase smoke phase_smoke; require_ok
    # The app phases depend on each other; the Singularity check does not depend on them.
    if [ "$BUILD_ONLY" = 0 ]; then
        run_phase data phase_data
        if [ "$LAST_RC" -eq 0 ]; then run_phase participant phase_participant; else skip_phase participant "no data"; fi
        if [ "$LAST_RC" -eq 0 ]; then run_phase group phase_group; else skip_phase group "participant level failed"; fi
    fi
    if [ "$SINGULARITY" = 1 ]; then
        run_phase singularity phase_singularity
    fi
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "failed phases: ${FAILED[*]}"
        exit 1
    fi
    echo "all phases passed"
    exit 0  # never return to read further lines of this file
}

main
