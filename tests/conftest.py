from __future__ import annotations

import os

import pytest
import torch

from models.default_dtype import default_dtype

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def float32_default():
    """Other test modules set a float64 default dtype at import (collection time); the service and its models are
    float32, so everything the service tests build or load happens under float32."""
    return default_dtype(torch.float32)


def cuda_only(reason: str = "needs a CUDA device (GPU suite)"):
    """A test that runs on CUDA alone: marked ``gpu``, so that the GPU suite (``benchmarks/gpu_suite.sh``) runs just
    these (``-m gpu``), and skipped where no CUDA device is. Such tests compare execution paths, so they build
    their models with random weights (``arc_random``, ``minilm_random``): the GPU machine gets no weights."""
    def mark(test):
        return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)(test))
    return mark


@pytest.fixture(scope="session")
def arc_random(tmp_path_factory):
    """The embedded ARC model's architecture (models/zoo/tta-arc) with random weights, its text encoder's too."""
    from models.random_weights import random_model_copy
    from models.registry import ZOO

    with float32_default():
        return random_model_copy(ZOO / "tta-arc", tmp_path_factory.mktemp("arc-random"))


@pytest.fixture(scope="session")
def minilm_random(tmp_path_factory):
    """The embedded text encoder (all-MiniLM-L6-v2) with random weights: a directory HFTextEncoder loads."""
    from models.random_weights import random_text_encoder_copy

    with float32_default():
        return random_text_encoder_copy({"name": "minilm"}, tmp_path_factory.mktemp("minilm") / "minilm")["path"]


@pytest.fixture(scope="session")
def text_encoder():
    from service.runtimes.torch_runtime import shared_text_encoder

    with float32_default():
        return shared_text_encoder({"name": "minilm"}, "cpu")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, text_encoder):
    from service_support import build_model_dir

    with float32_default():
        return build_model_dir(tmp_path_factory.mktemp("zoo"), text_encoder)


@pytest.fixture(scope="session")
def base_settings(model_dir):
    from service.settings import Settings

    # the eager torch runtime: these tests pin its behaviour (test_export.py covers runtime=onnxruntime / auto);
    # every length in one padded forward, so companions of other durations share the target's forwards (the
    # length grouping of the default max_padding is tested at engine level, test_service_scheduler.py)
    return Settings(_env_file=None, model_dir=model_dir, default_model="tiny", threads=1, debug_faults=True,
                    max_batch=16, queue_size=64, request_timeout=30, log_level="warning", runtime="torch",
                    max_padding=1e9)


@pytest.fixture(scope="session")
def server(base_settings):
    from service_support import LiveServer

    with float32_default():
        srv = LiveServer(base_settings)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _float32_default(request):
    """Some model tests set a float64 default dtype at import; the service and checkpoints are float32."""
    if not request.node.fspath.basename.startswith(("test_service", "test_checkpoints", "test_sized", "test_modes",
                                                      "test_formats", "test_compat_route")):
        yield
        return
    with float32_default():
        yield


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, text_encoder):
    """A tiny saved teacher bundle for the distillation and ARC tests."""
    from training_support import tiny_teacher

    return tiny_teacher(tmp_path_factory.mktemp("teacher"), text_encoder)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher):
    """A tiny latent cache encoded by the tiny teacher's codec."""
    from training_support import tiny_cache

    return tiny_cache(teacher, tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="session")
def sao_tiny(tmp_path_factory):
    """A tiny random Stable Audio Open Small checkpoint (``models.checkpoints.sized``), stable-audio-tools format; the
    tests read it and write nothing into it."""
    from models.checkpoints.sized import write_random_sao_small

    with float32_default():
        root = tmp_path_factory.mktemp("ckpt") / "sao-tiny"
        write_random_sao_small(root, scale="tiny", seed=5)
    return root
