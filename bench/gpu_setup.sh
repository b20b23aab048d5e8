# Sourced at the start of every device run: install the carried wheels and our own distributions
# into /tmp/site (the image has torch, triton, numpy, rich, scipy, matplotlib; not pydantic or mlflow).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . ./plugins/native
for plugin in plugins/*/; do
    [ "$plugin" = "plugins/native/" ] && continue
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site "$plugin" || true
done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
set +e
