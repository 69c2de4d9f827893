# Sourced by the GPU benchmark scripts on the lent device machine (no network): installs the
# wheels carried in .whl/ (see benchmarks/RESULTS.md for how they were made) and sets the paths.
# Installed once per machine, under a lock, so scripts started side by side (one per GPU) share it.
(
  flock 9
  listing=$(ls -l .whl/*.whl .whl/raypkg/ray.tar.xz)
  if [ "$(cat /tmp/site/.carried 2>/dev/null)" != "$listing" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    tar -xJf .whl/raypkg/ray.tar.xz -C /tmp/site
    echo "$listing" > /tmp/site/.carried
  fi
) 9> /tmp/device_env.lock
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
