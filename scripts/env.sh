# Sourced by the other scripts after scripts/setup: where the cached tools are.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=$(realpath -m "${PREFLOOP_CACHE:-$root/.prefloop}")
export PREFLOOP_CACHE=$cache
# tch builds against the venv's torch (torch-sys runs `python` from an active venv).
export VIRTUAL_ENV=$cache/venv
export PATH=$VIRTUAL_ENV/bin:$PATH
export LIBTORCH_USE_PYTORCH=1
torch_lib=$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The venv's python: numerical references and interop checks in tests.
export PREFLOOP_PYTHON=$VIRTUAL_ENV/bin/python
export PREFLOOP_MODEL_DIR=$cache/models
export PREFLOOP_SANDBOX_DIR=$cache/sandbox
export PREFLOOP_DATA_DIR=$cache/data
# MKL picks fewer threads when the machine is busy, and its matrix products then round
# differently: runs that must resume bit for bit on the CPU (the tests' resume checks) need a
# fixed thread count.
export MKL_DYNAMIC=FALSE
