# Sourced at the start of every device run: install the carried wheels and our own distributions
# into /tmp/site (the image has torch, triton, numpy, rich, scipy, matplotlib; not pydantic or mlflow).
# NOVA_WHEELS names the carried folders (default .whl). A folder may also hold *.tar.xz: a wheel's
# installed files repacked smaller (nvidia-cutlass-dsl-libs-base does not fit a carry as a wheel),
# unpacked into /tmp/site as they are.
set -e
for dir in ${NOVA_WHEELS:-.whl}; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/*.whl
    for packed in "$dir"/*.tar.xz; do
        [ -e "$packed" ] && tar xJf "$packed" -C /tmp/site
    done
done
# --upgrade: a warm machine keeps /tmp/site, and without it pip leaves the last call's copy of our code.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site \
    . plugins/*/
# A .pth file is read only in site directories, not on PYTHONPATH: the CUTLASS DSL's goes here by hand.
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
set +e
