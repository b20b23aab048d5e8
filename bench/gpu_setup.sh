# Sourced at the start of every device run: install the carried wheels and our own distributions
# into /tmp/site (the image has torch, triton, numpy, rich, scipy, matplotlib; not pydantic or mlflow).
# NOVA_WHEELS names the carried folders (default .whl). A folder may also hold *.tar.xz: a wheel's
# installed files repacked smaller (nvidia-cutlass-dsl-libs-base does not fit a carry as a wheel),
# unpacked into /tmp/site as they are.
set -e
# A warm machine keeps /tmp/site from the call before, which may have carried another set (.fa4's CUTLASS DSL 4.4.2
# breaks flashinfer 0.6.13 and vLLM, which find it first): every call starts from its own carry only.
rm -rf /tmp/site
for dir in ${NOVA_WHEELS:-.whl}; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/*.whl
    for packed in "$dir"/*.tar.xz; do
        [ -e "$packed" ] && tar xJf "$packed" -C /tmp/site
    done
done
# flashinfer's modules (vLLM's sampler among them) are ninja builds over headers in /tmp/site, and ninja rebuilds
# whatever is older than its newest input, by the file's time and by the time its log recorded. Fresh install times
# made every call rebuild vLLM's sampler (85 to 97 s of nvcc at its first start, even on a warm machine that kept
# .cache/fi: bench/RESULTS.md, eighth session); one fixed old time keeps a kept or carried build current.
find /tmp/site -exec touch -h -d 2020-01-01 {} +
# A .pth file is read only in site directories, not on PYTHONPATH: the CUTLASS DSL's goes here by hand. Set before
# our own builds, so that a setuptools carried in .whl is the one that builds them.
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
# Every JIT cache (Triton's kernels, flashinfer's modules, vLLM's torch.compile artifacts) under the repository's
# ignored .cache/, which a warm machine keeps for the next call: a second call then skips what the first compiled
# (on a fresh machine, ~110 s of flashinfer JIT and ~90 to 130 s of a vLLM start).
export TRITON_CACHE_DIR=$PWD/.cache/triton FLASHINFER_WORKSPACE_BASE=$PWD/.cache/fi VLLM_CACHE_ROOT=$PWD/.cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
# A fresh machine starts from a carried .cache/jit.tar.xz where there is one (what pack_jit_cache brought back from an
# earlier machine of the same image), so that vLLM's first start skips what it compiles (bench/RESULTS.md, seventh
# session: its torch.compile 19.7 -> 4.7 s).
if [ -f .cache/jit.tar.xz ] && [ ! -d .cache/triton ]; then
    tar xJf .cache/jit.tar.xz -C .cache
fi
# Our pyproject files state their licence as a PEP 639 expression, which setuptools reads from 77 on.
if ! python3 -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then
    echo "gpu_setup.sh: building our distributions needs setuptools 77 or newer, the image has" \
        "$(python3 -c 'import setuptools; print(setuptools.__version__)'): carry setuptools==80.9.0 in .whl" >&2
    return 1 2>/dev/null || exit 1  # sourced, as the device runs do, or run
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site \
    . plugins/*/
# pip check: the installs above take --no-deps (the carry is all the device gets), so nothing has asked whether the
# set fits together. A version our distributions do not admit (a carried flashinfer or cudnn-frontend other than the
# one a plugin was measured with, a torch outside the core's range) stops the run here, before any trial. A library
# missing altogether only makes its backend unavailable (`nova-ab backends` and the sweep say so), and conflicts
# among other packages (flashinfer 0.6.13 asks for a newer CUTLASS DSL than the .fa4 carry's) are the carry's known
# compromises (bench/RESULTS.md): those are printed and let through.
if ! python3 -m pip check > /tmp/pip-check.txt 2>&1; then
    sed 's/^/pip check: /' /tmp/pip-check.txt >&2
    if grep -E '^novainfer(-plugin-[a-z0-9-]+)? [^ ]+ has requirement ' /tmp/pip-check.txt > /dev/null; then
        echo "gpu_setup.sh: a carried wheel is a version our distributions do not admit (pip check, above)" >&2
        return 1 2>/dev/null || exit 1  # sourced, as the device runs do, or run
    fi
fi
set +e

# vLLM from the bundle that the calls just before stashed in /tmp (`bash .vllm/vllm_device_setup.sh`, carrying
# .vllm/c1, then .vllm/c2: bench/carries.sh), unpacked into /tmp/vsite and put on PYTHONPATH; without it the calling
# script ($1 names it) stops before any trial.
install_vllm() {
    bash .vllm/vllm_device_setup.sh install > $OUT/vllm_setup.txt 2>&1 || {
        tail -5 $OUT/vllm_setup.txt; echo "$1: vLLM is not installed (stash it first): no trial run"; exit 1;
    }
    export PYTHONPATH=$PYTHONPATH:/tmp/vsite
}

# The Triton, torch.compile, inductor and flashinfer caches packed into $OUT/jit.tar.xz, to be carried as
# .cache/jit.tar.xz by a later call on a fresh machine; left out, with a line saying so, when packed they pass a
# returned file's 16 MiB.
pack_jit_cache() {
    tar cf - -C .cache triton vllm inductor fi 2>/dev/null | xz -T0 -6 > $OUT/jit.tar.xz
    local size=$(stat -c %s $OUT/jit.tar.xz)
    echo "JIT caches packed: $((size >> 10)) KiB"
    if [ "$size" -gt $((16 << 20)) ]; then
        rm $OUT/jit.tar.xz; echo "too large to come back from a call: not packed"
    fi
}
