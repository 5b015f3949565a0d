#!/bin/sh
# The one place that says how the service is pip-installed for an image.
# The Dockerfile's builder stages run it, and scripts/image_install_check.sh runs the
# same script in a throw-away virtual environment, so the check exercises exactly the
# commands the image build does.
#
# Usage: deploy/install.sh TARGET [PROJECT_DIR]
#   TARGET       cpu | cuda
#   PROJECT_DIR  when given, the project at that path is installed (non-editable) on top;
#                when left out only the heavy, rarely-changing layer (torch and, for cuda,
#                the GPU runtimes) is installed, which lets Docker cache it apart.
#
# Environment knobs:
#   PYTHON           interpreter of the target environment (default: python)
#   TORCH_VERSION    exact torch release (default: 2.13.0)
#   TORCH_INDEX_URL  extra index to take torch from (the Dockerfile's cpu target points it
#                    at PyTorch's CPU-only wheel index; empty means the configured indexes)
#   TTA_EXTRAS       project extras for the cpu target (default: onnx)
set -eu

target=${1:?usage: deploy/install.sh cpu|cuda [PROJECT_DIR]}
project=${2:-}
py=${PYTHON:-python}
torch_version=${TORCH_VERSION:-2.13.0}
extras=${TTA_EXTRAS-onnx}

pip_install() {
    "$py" -m pip install --no-cache-dir --disable-pip-version-check "$@"
}

case "$target" in
    cpu)
        # torch is pinned first and on its own: the project only asks for torch>=2.3, and a
        # loose requirement resolved against the default index pulls the CUDA build.
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            pip_install --extra-index-url "$TORCH_INDEX_URL" "torch==${torch_version}"
        else
            pip_install "torch==${torch_version}"
        fi
        if [ -n "$project" ]; then
            if [ -n "$extras" ]; then
                pip_install "${project}[${extras}]"
            else
                pip_install "$project"
            fi
        fi
        ;;
    cuda)
        # On Linux x86_64 the default-index torch wheel is the CUDA build (its CUDA
        # libraries arrive as nvidia-* wheels). onnxruntime-gpu replaces the project's
        # "onnx" extra, whose CPU onnxruntime would shadow the GPU one.
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            pip_install --extra-index-url "$TORCH_INDEX_URL" "torch==${torch_version}"
        else
            pip_install "torch==${torch_version}"
        fi
        pip_install onnx onnxruntime-gpu 'tensorrt-cu12>=10,<11'  # the runtime uses TensorRT 10's API
        if [ -n "$project" ]; then
            pip_install "$project"
        fi
        ;;
    *)
        echo "deploy/install.sh: unknown target '$target' (expected cpu or cuda)" >&2
        exit 2
        ;;
esac

"$py" -m pip check
