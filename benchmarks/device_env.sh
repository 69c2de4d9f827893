# Sourced by the GPU benchmark scripts on the lent device machine (no network): installs the
# wheels carried in .whl/ (see benchmarks/RESULTS.md for how they were made) and sets the paths.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
tar -xJf .whl/raypkg/ray.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
