#!/usr/bin/env bash
# Emulated aarch64 check: build a Debian 12 (bookworm, the base of Raspberry Pi OS) arm64 root with
# debootstrap + qemu-user-static, install parsicore's wheel and its test extras into a venv inside it
# from aarch64 wheels, run the test suite (a documented subset by default) and `parsicore run`.
#
# Usage (as root, on a Debian/Ubuntu x86-64 host with network access to a Debian mirror and PyPI):
#   scripts/aarch64_emulated_check.sh [--cpu cortex-a72|cortex-a76] [--board NAME|none] [--full]
#                                     [--examples N] [--skip-tests] [--skip-run] [-- PYTEST_ARGS...]
#
#   --cpu          CPU qemu emulates and Numba compiles for: cortex-a72 = Raspberry Pi 4 (default),
#                  cortex-a76 = Raspberry Pi 5.
#   --board        PARSICORE_BOARD inside the root (default: the Pi matching --cpu, raspberry-pi-4 or
#                  raspberry-pi-5). Under qemu-user there is no device tree and /proc/cpuinfo is the
#                  host's, so detection cannot find the board; `none` leaves detection to itself
#                  (generic-aarch64 fallback with a notice on stderr).
#   --full         the whole suite with the default hypothesis profile (slow under emulation).
#   --examples N   hypothesis max_examples for the subset (PARSICORE_HYPOTHESIS_EXAMPLES; default 5).
#   -- ARGS        everything after `--` replaces the default selection -m "not slow and not frameworks"
#                  (e.g. -- -m "not slow" -k conv); tests/ is appended.
#
# Environment: PARSICORE_ARM64_ROOT (default /var/tmp/parsicore-arm64-root), PARSICORE_DEBIAN_MIRROR
# (default http://deb.debian.org/debian), PYTHON (host python building the wheel, default python3).
#
# Why a subset by default: under qemu-user, Numba compiles 7-11x slower and OpenBLAS matrix products
# run 130-215x slower than natively, so the heavy end-to-end tests (marker `slow`) and the framework
# tests (marker `frameworks`; torch/onnx are not installed in the root) are left out and hypothesis
# draws fewer examples. Every test module still runs; see boards/aarch64-emulation.md for timings.
#
# Re-runnable: an existing complete root (marker file) is reused; the script removes only what it
# created (its temp dirs, its mounts, a partial root it started itself). Emulation checks correctness
# on aarch64 only: its timings say nothing about the speed or memory of a board.
set -euo pipefail

ROOT="${PARSICORE_ARM64_ROOT:-/var/tmp/parsicore-arm64-root}"
MIRROR="${PARSICORE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-python3}"
SUITE=bookworm
CPU=cortex-a72
FULL=0
EXAMPLES=5
PYTEST_SELECT=(-m "not slow and not frameworks")
SKIP_TESTS=0
SKIP_RUN=0
BOARD_PROFILE=""
PYTEST_CUSTOM=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) CPU="$2"; shift 2 ;;
        --full) FULL=1; shift ;;
        --examples) EXAMPLES="$2"; shift 2 ;;
        --) shift; PYTEST_SELECT=("$@"); PYTEST_CUSTOM=1; break ;;
        --skip-tests) SKIP_TESTS=1; shift ;;
        --skip-run) SKIP_RUN=1; shift ;;
        --board) BOARD_PROFILE="$2"; shift 2 ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "aarch64_emulated_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$CPU" in
    cortex-a72) BOARD="Raspberry Pi 4"; BOARD_PROFILE="${BOARD_PROFILE:-raspberry-pi-4}" ;;
    cortex-a76) BOARD="Raspberry Pi 5"; BOARD_PROFILE="${BOARD_PROFILE:-raspberry-pi-5}" ;;
    *) echo "aarch64_emulated_check: --cpu must be cortex-a72 (Pi 4) or cortex-a76 (Pi 5), got $CPU" >&2; exit 2 ;;
esac
if [[ $BOARD_PROFILE == none ]]; then
    BOARD_PROFILE=""
fi
if [[ $FULL == 1 ]]; then
    [[ $PYTEST_CUSTOM == 1 ]] || PYTEST_SELECT=()
    EXAMPLES=""
fi

CHROOT="$(command -v chroot || echo /usr/sbin/chroot)"   # env -i below would not find it in /usr/sbin
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CREATED_MARKER="$ROOT/.parsicore-created-by-aarch64-check"   # we made this directory
COMPLETE_MARKER="$ROOT/.parsicore-root-complete"             # debootstrap finished
VENV=/opt/parsicore-venv                                     # paths inside the root
CHECK_DIR=/opt/parsicore-check
WHEEL_DIR=/opt/parsicore-wheels

if [[ $(id -u) != 0 ]]; then
    echo "aarch64_emulated_check: needs root (apt-get, debootstrap, chroot, mount)" >&2
    exit 2
fi

# ------------------------------------------------------------------------------------------- bookkeeping
STEP_NAMES=()
STEP_SECONDS=()
STEP_STATUS=()
MOUNTED=()          # mount points this run created, unmounted in reverse order on exit
HOST_TMP=""         # host-side temp dir (source copy, wheel), removed on exit
ROOT_INDEX_URL=""   # pip index settings used inside the root (see pip_settings_for_root)
ROOT_EXTRA_INDEX_URLS=""
NUMBA_CACHE_DIR_IN_ROOT=""
SCRIPT_T0=$SECONDS

log() { printf '[aarch64-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# run_step NAME FUNCTION: time one step and record its outcome; returns the step's exit status.
# The step runs in a subshell with errexit on: bash ignores `set -e` inside a function called as
# `fn || ...`, so a failing command in the middle of a step would otherwise go unnoticed. Steps
# therefore cannot set variables of the main shell; whatever later steps need is set outside them.
run_step() {
    local name="$1" fn="$2" t0=$SECONDS rc=0
    log "=== step: $name"
    set +e
    (set -e; "$fn")
    rc=$?
    set -e
    STEP_NAMES+=("$name")
    STEP_SECONDS+=("$((SECONDS - t0))")
    STEP_STATUS+=("$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")")
    log "=== step: $name: ${STEP_STATUS[-1]} in $((SECONDS - t0)) s"
    return "$rc"
}

summary() {
    local i
    echo
    echo "aarch64 emulated check summary (qemu-user, QEMU_CPU=$CPU ~ $BOARD; root $ROOT)"
    echo "emulation timings say nothing about the speed or memory of a real board"
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-28s %6s s  %s\n' "${STEP_NAMES[$i]}" "${STEP_SECONDS[$i]}" "${STEP_STATUS[$i]}"
    done
    printf '  %-28s %6s s\n' "total" "$((SECONDS - SCRIPT_T0))"
    if [[ -f $ROOT$CHECK_DIR/pytest.log && $SKIP_TESTS == 0 ]]; then
        echo "  pytest: $(grep -E '(passed|failed|error).* in [0-9.]+s' "$ROOT$CHECK_DIR/pytest.log" | tail -1 | tr -d '=' \
            || echo 'no summary line (pytest crashed: see its output above)')"
    fi
}

cleanup() {
    local rc=$? i
    # Unmount only what this run mounted, newest first; lazy as a last resort so no mount outlives us.
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" || log "could not unmount ${MOUNTED[$i]}"
    done
    if [[ -n $NUMBA_CACHE_DIR_IN_ROOT && -d $ROOT$NUMBA_CACHE_DIR_IN_ROOT ]]; then
        rm -rf -- "${ROOT:?}$NUMBA_CACHE_DIR_IN_ROOT"
    fi
    if [[ -n $HOST_TMP && -d $HOST_TMP ]]; then
        rm -rf -- "$HOST_TMP"
    fi
    summary
    if [[ $rc != 0 ]]; then
        echo "aarch64 emulated check: FAILED (exit $rc)"
    else
        echo "aarch64 emulated check: passed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mount_into SRC TARGET: bind-mount SRC at TARGET unless something is already mounted there.
mount_into() {
    local src="$1" target="$2"
    if mountpoint -q "$target"; then
        log "$target already mounted (not by this run): leaving it as it is"
        return 0
    fi
    mount --bind "$src" "$target"
    MOUNTED+=("$target")
}

# in_root CMD...: run CMD inside the root with a clean, explicit environment, set by the host's `env`
# before chroot (nothing of the host's environment, e.g. its PIP_* settings, leaks into the root).
in_root() {
    env -i PATH=/opt/parsicore-venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        QEMU_CPU="$CPU" NUMBA_CPU_NAME="$CPU" ${BOARD_PROFILE:+PARSICORE_BOARD="$BOARD_PROFILE"} \
        PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
        PIP_INDEX_URL="$ROOT_INDEX_URL" ${ROOT_EXTRA_INDEX_URLS:+PIP_EXTRA_INDEX_URL="$ROOT_EXTRA_INDEX_URLS"} \
        PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        ${NUMBA_CACHE_DIR_IN_ROOT:+NUMBA_CACHE_DIR="$NUMBA_CACHE_DIR_IN_ROOT"} \
        ${EXAMPLES:+PARSICORE_HYPOTHESIS_EXAMPLES="$EXAMPLES"} \
        "$CHROOT" "$ROOT" "$@"
}

# ------------------------------------------------------------------------------------------- steps
step_host_packages() {
    local missing=() pkg
    # debian-archive-keyring: debootstrap checks bookworm's Release signature with it (Ubuntu hosts lack it).
    for pkg in qemu-user-static binfmt-support debootstrap debian-archive-keyring; do
        if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        log "qemu-user-static, binfmt-support, debootstrap, debian-archive-keyring already installed"
    fi
    # Without binfmt, processes that an emulated program starts fail with "Exec format error".
    # binfmt_misc is a system setting like the packages above: mounted if absent, and left in place.
    if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
    if ! grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
        echo "binfmt handler qemu-aarch64 is not enabled (update-binfmts --enable qemu-aarch64 failed)" >&2
        return 1
    fi
    # The F (fix-binary) flag lets chrooted programs use the host's qemu without a copy inside the root.
    log "binfmt qemu-aarch64: $(grep -E '^(interpreter|flags)' /proc/sys/fs/binfmt_misc/qemu-aarch64 | tr '\n' ' ')"
    local cpus
    # `-cpu help` exits 1 after listing; not piped into grep -q, whose early exit would trip pipefail.
    cpus="$(qemu-aarch64-static -cpu help || true)"
    if ! grep -qw -- "$CPU" <<< "$cpus"; then
        echo "this qemu ($(qemu-aarch64-static --version | head -1)) has no CPU model $CPU" >&2
        return 1
    fi
}

step_debootstrap() {
    if [[ -f $COMPLETE_MARKER ]]; then
        log "reusing the complete root at $ROOT ($(cat "$COMPLETE_MARKER"))"
        return 0
    fi
    if [[ -e $ROOT ]]; then
        if [[ ! -f $CREATED_MARKER ]]; then
            if [[ -n $(ls -A "$ROOT") ]]; then
                echo "$ROOT exists, is not empty and was not made by this script: set PARSICORE_ARM64_ROOT" \
                    "to another directory" >&2
                return 1
            fi
        else
            # A root this script started but did not finish: remove it (nothing of anyone else's is in it),
            # unless something is still mounted below it.
            if findmnt -rn -o TARGET | grep -q "^$ROOT/"; then
                echo "partial root $ROOT still has mounts below it; unmount them and re-run" >&2
                return 1
            fi
            log "removing the partial root this script started earlier: $ROOT"
            rm -rf --one-file-system -- "$ROOT"
        fi
    fi
    mkdir -p "$ROOT"
    date -u +%FT%TZ > "$CREATED_MARKER"
    log "debootstrap --arch=arm64 --variant=minbase $SUITE $ROOT $MIRROR"
    # minbase + the few packages needed: python3 (3.11 in bookworm), venv/pip, libstdc++6 for numpy/numba.
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,libstdc++6,libgomp1,ca-certificates \
        "$SUITE" "$ROOT" "$MIRROR"
    echo "debian $SUITE arm64 via debootstrap, $(date -u +%FT%TZ)" > "$COMPLETE_MARKER"
}

# The host's pip settings that make sense inside the root: remote (http/https) indexes only. Local
# find-links and file:// indexes (e.g. /opt/wheels) hold x86-64 wheels and do not exist in the root.
pip_settings_for_root() {
    local value url
    ROOT_INDEX_URL="https://pypi.org/simple"
    ROOT_EXTRA_INDEX_URLS=""
    value="${PIP_INDEX_URL:-$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)}"
    if [[ $value == http://* || $value == https://* ]]; then
        ROOT_INDEX_URL="$value"
    fi
    value="${PIP_EXTRA_INDEX_URL:-$("$PYTHON" -m pip config get global.extra-index-url 2>/dev/null || true)}"
    for url in $value; do
        if [[ $url == http://* || $url == https://* ]]; then
            ROOT_EXTRA_INDEX_URLS="${ROOT_EXTRA_INDEX_URLS:+$ROOT_EXTRA_INDEX_URLS }$url"
        else
            log "pip inside the root ignores the host's local index $url (x86-64 wheels)"
        fi
    done
    log "pip inside the root: index $ROOT_INDEX_URL${ROOT_EXTRA_INDEX_URLS:+, extra $ROOT_EXTRA_INDEX_URLS}; no find-links"
}

step_build_wheel() {
    local src="$HOST_TMP/src"
    mkdir -p "$src" "$HOST_TMP/wheel"
    # Build from a copy of the working tree (tracked + untracked, not ignored) so the shared checkout
    # gets no build/ or *.egg-info from us.
    if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$REPO" && git ls-files -z -co --exclude-standard | xargs -0 -r cp --parents -t "$src" 2>/dev/null || true)
    else
        cp -a "$REPO/." "$src/"
    fi
    local isolation=()
    if "$PYTHON" -c "import setuptools, wheel" 2>/dev/null; then
        isolation=(--no-build-isolation)
    fi
    log "$PYTHON -m pip wheel --no-deps ${isolation[*]} -w WHEELDIR (copy of $REPO)"
    "$PYTHON" -m pip wheel -q --no-deps "${isolation[@]}" -w "$HOST_TMP/wheel" "$src"
    log "built $(basename "$HOST_TMP"/wheel/parsicore-*.whl)"
}

step_pip_install() {
    local wheel_file
    wheel_file="$(ls "$HOST_TMP"/wheel/parsicore-*.whl)"
    # pip verifies TLS with the root's bundle: this network needs the host's CA bundle.
    local ca="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
    install -m 644 "$ca" "$ROOT/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$ROOT$WHEEL_DIR"
    rm -f "$ROOT$WHEEL_DIR"/parsicore-*.whl
    cp "$wheel_file" "$ROOT$WHEEL_DIR/"
    local whl
    whl="$WHEEL_DIR/$(basename "$wheel_file")"
    if [[ ! -x $ROOT$VENV/bin/python ]]; then
        log "python3 -m venv $VENV (inside the root)"
        in_root /usr/bin/python3 -m venv "$VENV"
    fi
    # Same version number, new code: drop the old parsicore so pip does not call it "already satisfied".
    in_root "$VENV/bin/python" -m pip uninstall -q -y parsicore >/dev/null 2>&1 || true
    # Extras: test, and nohdf5 (pyfive, pure Python) so the h5py-less reader runs on aarch64 as well.
    log "pip install --no-compile --only-binary=:all: '$whl[test,nohdf5]' (aarch64 wheels from $ROOT_INDEX_URL)"
    # --no-compile: byte-compiling every module of numba, numpy, hypothesis... under emulation costs
    # minutes; Python compiles the few modules the tests import on first use instead.
    in_root "$VENV/bin/python" -m pip install -q --no-compile --only-binary=:all: "$whl[test,nohdf5]"
    in_root "$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
        | grep -iE '^(parsicore|numpy|numba|llvmlite|h5py|pyfive|pillow|click|pytest|hypothesis)==' | tr '\n' ' ' || true
    echo
}

mount_root_fs() {
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"   # pip inside the root resolves PyPI like the host
    mount_into /proc "$ROOT/proc"
    mount_into /dev "$ROOT/dev"
    # A fresh Numba cache per run: CI starts without one, and a stale one would hide compile time.
    NUMBA_CACHE_DIR_IN_ROOT="/tmp/parsicore-check-numba-$$"
    mkdir -p "$ROOT$NUMBA_CACHE_DIR_IN_ROOT"
}

step_tests() {
    # The tests run against the installed wheel: only tests/ and the pytest configuration are copied
    # (plus weights/ and boards/ data), never the parsicore/ source tree, which would shadow the wheel.
    rm -rf -- "${ROOT:?}$CHECK_DIR"
    mkdir -p "$ROOT$CHECK_DIR"
    cp -a "$REPO/tests" "$REPO/pyproject.toml" "$ROOT$CHECK_DIR/"
    local d
    for d in weights boards; do
        [[ -d $REPO/$d ]] && cp -a "$REPO/$d" "$ROOT$CHECK_DIR/"
    done
    find "$ROOT$CHECK_DIR" -name __pycache__ -prune -exec rm -rf {} +
    local args=(-q -p no:cacheprovider --durations=15 "${PYTEST_SELECT[@]}")
    log "in root: cd $CHECK_DIR && QEMU_CPU=$CPU NUMBA_CPU_NAME=$CPU ${BOARD_PROFILE:+PARSICORE_BOARD=$BOARD_PROFILE }" \
        "${EXAMPLES:+PARSICORE_HYPOTHESIS_EXAMPLES=$EXAMPLES }python -m pytest ${args[*]@Q} tests"
    in_root /bin/sh -c 'cd "$0" && exec python -m pytest "$@" tests' "$CHECK_DIR" "${args[@]}" \
        | tee "$ROOT$CHECK_DIR/pytest.log"
}

# Build the tiny gated model (conv -> LKAM gate -> gated conv -> Gemm) used when no shipped model exists.
TINY_MODEL_PY='
import sys
import numpy as np
from PIL import Image
from parsicore.builder import ModelBuilder
rng = np.random.default_rng(0)
def w(*shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)
b = ModelBuilder("aarch64-check-tiny", description="tiny gated CNN of scripts/aarch64_emulated_check.sh",
                 license="MIT", producer="aarch64_emulated_check.sh")
b.set_labels([f"class{i}" for i in range(10)])
b.set_preprocessing((28, 28), colour="L", mean=(0.5,), std=(0.25,))
b.add_input("image", (None, 1, 28, 28))
b.add_node("Conv", ["image"], ["c1"], name="conv1", attrs={"pads": (1, 1, 1, 1)},
           weights={"weight": w(8, 1, 3, 3), "bias": w(8)})
b.add_node("Relu", ["c1"], ["r1"], name="relu1")
b.add_node("MaxPool", ["r1"], ["p1"], name="pool1", attrs={"kernel": (2, 2), "stride": (2, 2)})
b.add_node("LKAMGate", ["p1"], ["m2"], name="gate2", attrs={"kernel_size": 3, "threshold": 0.5},
           weights={"w1": w(16, 8, 3, 3), "b1": w(16)})
b.add_node("Conv", ["p1"], ["c2"], name="conv2", attrs={"pads": (1, 1, 1, 1)},
           weights={"weight": w(16, 8, 3, 3), "bias": w(16)})
b.add_node("Relu", ["c2"], ["r2"], name="relu2")
b.add_node("ChannelMask", ["r2", "m2"], ["g2"], name="mask2")
b.add_node("GlobalAveragePool", ["g2"], ["gp"], name="gap")
b.add_node("Flatten", ["gp"], ["f"], name="flatten")
b.add_node("Gemm", ["f"], ["logits"], name="fc", weights={"weight": w(10, 16), "bias": w(10)})
b.add_output("logits")
b.save(sys.argv[1])
y, x = np.mgrid[0:28, 0:28]
Image.fromarray(((x * 9 + y * 5) % 256).astype(np.uint8), "L").save(sys.argv[2])
'

# Compare the JSON lines of two `parsicore run --json` calls: same labels, probabilities within 1e-4,
# same kernels run (a gate flipping on another architecture would show here).
COMPARE_PY='
import json, sys
def load(p):
    return [json.loads(line) for line in open(p) if line.startswith("{")]
a, b = load(sys.argv[1]), load(sys.argv[2])
if len(a) != len(b) or not a:
    sys.exit(f"{sys.argv[1]}: {len(a)} results, {sys.argv[2]}: {len(b)}")
bad = 0
for ra, rb in zip(a, b):
    la = [(t["label"], t["prob"]) for t in ra["top"]]
    lb = [(t["label"], t["prob"]) for t in rb["top"]]
    same = [x[0] for x in la] == [x[0] for x in lb] and all(abs(x[1] - y[1]) <= 1e-4 for x, y in zip(la, lb))
    same = same and ra["kernels_on"] == rb["kernels_on"] and ra["macs_executed"] == rb["macs_executed"]
    if not same:
        bad += 1
        print("MISMATCH", ra["image"], la, ra["kernels_on"], "vs", lb, rb["kernels_on"])
print(f"{len(a) - bad}/{len(a)} images agree: {sys.argv[1]} vs {sys.argv[2]}")
sys.exit(1 if bad else 0)
'

step_run() {
    local run_dir="$CHECK_DIR/run" model_args=() images=() host_images=() model_host=""
    rm -rf -- "${ROOT:?}$run_dir"
    mkdir -p "$ROOT$run_dir"
    local shipped samples_dir
    shipped="$(in_root python -c 'from parsicore.api import default_model_path as d; print(d())')"
    samples_dir="$(dirname "$shipped")/samples"
    if [[ -f $ROOT$shipped ]]; then
        log "shipped default model: $shipped"
        model_host="$REPO/weights/$(basename "$shipped")"
    else
        log "no shipped default model yet ($shipped): building a tiny gated model with ModelBuilder on the host"
        PYTHONPATH="$HOST_TMP/src" "$PYTHON" -c "$TINY_MODEL_PY" "$ROOT$run_dir/tiny.h5" "$ROOT$run_dir/tiny.png"
        model_args=(--model "$run_dir/tiny.h5")
        model_host="$ROOT$run_dir/tiny.h5"
    fi
    local f
    for f in "$ROOT$samples_dir"/*.png; do
        [[ -e $f ]] || continue
        images+=("${f#"$ROOT"}")
        host_images+=("$f")
    done
    if [[ ${#images[@]} == 0 ]]; then
        if [[ ! -f $ROOT$run_dir/tiny.png ]]; then
            PYTHONPATH="$HOST_TMP/src" "$PYTHON" -c "$TINY_MODEL_PY" "$ROOT$run_dir/tiny.h5" "$ROOT$run_dir/tiny.png"
        fi
        log "no shipped samples (weights/samples/*.png) yet: using a generated 28x28 image"
        images=("$run_dir/tiny.png")
        host_images=("$ROOT$run_dir/tiny.png")
    fi
    log "in root: parsicore info ${model_args[*]:1}"
    in_root parsicore info "${model_args[@]:1}"
    local backend
    for backend in numba numpy; do
        log "in root: parsicore run ${model_args[*]} --backend $backend --top-k 10 --json ${images[*]}"
        in_root parsicore run "${model_args[@]}" --backend "$backend" --top-k 10 --json "${images[@]}" \
            | tee "$ROOT$run_dir/emulated-$backend.jsonl"
    done
    # The same images on the host (x86-64, NumPy backend) as the reference the emulated runs must match.
    log "host: parsicore run --model $model_host --backend numpy --top-k 10 --json (reference)"
    PYTHONPATH="$HOST_TMP/src" "$PYTHON" -m parsicore run --model "$model_host" --backend numpy --top-k 10 --json \
        "${host_images[@]}" > "$ROOT$run_dir/host-numpy.jsonl"
    local rc=0
    "$PYTHON" -c "$COMPARE_PY" "$ROOT$run_dir/emulated-numba.jsonl" "$ROOT$run_dir/host-numpy.jsonl" || rc=1
    "$PYTHON" -c "$COMPARE_PY" "$ROOT$run_dir/emulated-numpy.jsonl" "$ROOT$run_dir/host-numpy.jsonl" || rc=1
    return "$rc"
}

# ------------------------------------------------------------------------------------------- main
log "repo $REPO; root $ROOT; QEMU_CPU=NUMBA_CPU_NAME=$CPU ($BOARD); PARSICORE_BOARD=${BOARD_PROFILE:-(detect)};" \
    "subset: ${PYTEST_SELECT[*]@Q}" \
    "${EXAMPLES:+, hypothesis examples $EXAMPLES}"
HOST_TMP="$(mktemp -d /var/tmp/parsicore-aarch64-check.XXXXXX)"
pip_settings_for_root
run_step "host packages + binfmt" step_host_packages
run_step "debootstrap arm64 root" step_debootstrap
run_step "build wheel (host)" step_build_wheel
mount_root_fs
run_step "pip install in root" step_pip_install
TEST_RC=0
if [[ $SKIP_TESTS == 0 ]]; then
    run_step "pytest in root" step_tests || TEST_RC=$?
fi
RUN_RC=0
if [[ $SKIP_RUN == 0 ]]; then
    run_step "parsicore run in root" step_run || RUN_RC=$?
fi
if [[ $TEST_RC != 0 || $RUN_RC != 0 ]]; then
    exit 1
fi
