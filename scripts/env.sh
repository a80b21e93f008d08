# Sourced by the other scripts after scripts/setup: where the cached tools are.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${PREFLOOP_CACHE:-$root/.prefloop}
export PREFLOOP_CACHE=$cache
# The venv's python: numerical references and interop checks in tests.
export PREFLOOP_PYTHON=$cache/venv/bin/python
export PREFLOOP_MODEL_DIR=$cache/models
