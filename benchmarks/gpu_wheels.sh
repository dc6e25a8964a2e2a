# Sourced from the repository root by the GPU scripts (gpu.sh, gpu_recipe.sh): the GPU machine's image has no
# albumentations, so the wheels carried in .whl/ (fetched by ../shared/device/wheels.sh) go into /tmp/site.
if ! python3 -c "import albumentations" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
