"""The distillation-quality benchmark: Frechet distance, confidence intervals, and one tiny end-to-end run."""
import copy
import json
import math

import numpy as np
import pytest
import scipy.linalg
from conftest import float32_default
from training_support import tiny_teacher

from benchmarks.common import mean_ci
from models.eval.embeddings import (
    frechet_distance,
    frechet_distance_samples,
    mfcc,
    shrinkage_intensity,
    shrunk_covariance,
)


# ------------------------------------------------------------------------------------------------ Frechet distance
def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d) + (0.0 if rank else 0.1) * np.eye(d)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_identical_gaussians_is_zero(method):
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=12), _random_cov(rng, 12)
    assert frechet_distance(mu, cov, mu, cov, method) == pytest.approx(0.0, abs=1e-8)
    low = _random_cov(rng, 12, rank=3)  # singular covariances too
    assert frechet_distance(mu, low, mu, low, "eigh") == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_closed_form(method):
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]], method) == pytest.approx(9.0 + 1.0, rel=1e-10)
    # commuting covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, unchanged by a common rotation
    rng = np.random.default_rng(1)
    d = 8
    a, b = rng.uniform(0.5, 4.0, d), rng.uniform(0.5, 4.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T, method)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_methods_agree_on_non_commuting_covariances():
    rng = np.random.default_rng(2)
    c1, c2 = _random_cov(rng, 10), _random_cov(rng, 10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    # the textbook formula with scipy's general square root
    reference = float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
                      - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real))
    assert frechet_distance(mu1, c1, mu2, c2, "eigh") == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(frechet_distance(mu2, c2, mu1, c1), rel=1e-8)


def test_shrunk_covariance_few_samples():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 20)) * np.linspace(1, 5, 20)
    cov, lam = shrunk_covariance(x)
    s = np.cov(x, rowvar=False)
    assert 0.0 < lam <= 1.0 and lam == pytest.approx(shrinkage_intensity(x))
    assert np.allclose(np.diag(cov), np.diag(s))  # the diagonal is kept
    off = ~np.eye(20, dtype=bool)
    assert np.allclose(cov[off], (1 - lam) * s[off])
    assert np.linalg.eigvalsh(cov).min() > 0  # well conditioned although 6 samples in 20 dimensions
    assert np.allclose(shrunk_covariance(x, 0.0)[0], s)
    # many samples of independent coordinates: little shrinkage is needed... and correlated ones keep theirs
    big = rng.normal(size=(4000, 5))
    assert shrinkage_intensity(big) > 0.5  # independent: the diagonal IS the truth
    corr = big @ np.triu(np.ones((5, 5)))
    assert shrinkage_intensity(corr) < 0.01
    # samples of the same distribution are close; a shifted one is far
    y, z = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    assert frechet_distance_samples(y, z)["fd"] < 0.2
    assert frechet_distance_samples(y, z + 3.0)["fd"] == pytest.approx(4 * 9.0, rel=0.1)


# ------------------------------------------------------------------------------------------------ intervals, MFCC
def test_mean_ci_t_distribution():
    r = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{0.975, 4} = 2.7764451051977987; s = sqrt(2.5)
    assert r["mean"] == 3.0 and r["n"] == 5
    assert r["ci"] == pytest.approx(2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    r2 = mean_ci([2.0, 4.0])  # t_{0.975, 1} = 12.706204736174698
    assert r2["ci"] == pytest.approx(12.706204736174698 * math.sqrt(2.0) / math.sqrt(2), rel=1e-9)
    assert mean_ci([7.0])["ci"] is None and mean_ci([7.0])["mean"] == 7.0
    assert mean_ci([None, float("nan"), 1.0, 1.0]) == {"mean": 1.0, "ci": 0.0, "n": 2, "std": 0.0}
    assert mean_ci([])["mean"] is None


def test_mfcc_shapes_and_sense():
    sr = 16000
    t = np.arange(sr) / sr
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    noise = np.random.default_rng(0).normal(scale=0.3, size=sr)
    m_tone, m_noise = mfcc(np.stack([tone, tone]), sr), mfcc(noise, sr)
    assert m_tone.shape == (1 + sr // 512, 20) and np.all(np.isfinite(m_tone))
    assert m_noise[:, 0].mean() > m_tone[:, 0].mean()  # c0 ~ total log energy over bands: noise fills them all
    quiet = mfcc(0.1 * noise, sr)
    # a gain of 0.1 shifts every log-mel band by log(0.01): only c0 moves (by sqrt(n_mels) log 0.01)
    assert np.allclose(quiet[:, 1:], m_noise[:, 1:], atol=1e-6)
    assert np.allclose(quiet[:, 0] - m_noise[:, 0], math.sqrt(64) * math.log(0.01), atol=1e-6)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, text_encoder):
    from models.training.derived import export_derived
    from models.training.distill import with_guidance_embedding

    root = tmp_path_factory.mktemp("dq-models")
    with float32_default():
        teacher = tiny_teacher(root, text_encoder, depth=1, default_steps=2)
        students = []
        for weighting, kind in (("bsa", "bsa"), ("min-snr", "distilled")):
            students.append(export_derived(
                teacher, with_guidance_embedding(teacher.denoiser), root / f"tiny-{weighting}-1", kind=kind,
                sampler="ddim", default_steps=1, guidance_in_model=True, training={"weighting": weighting}))
        arc = export_derived(teacher, copy.deepcopy(teacher.denoiser), root / "tiny-arc", kind="arc",
                             sampler="pingpong", default_steps=2, default_guidance=1.0, guidance_in_model=False)
    return root, teacher.path, students, arc


@pytest.mark.slow
def test_benchmark_end_to_end(tiny_models, tmp_path, text_encoder):
    from benchmarks import distill_quality

    root, teacher, students, arc = tiny_models
    argv = ["--teacher", str(teacher), "--students", str(root / "tiny-*-1"), "--arc", str(arc),
            "--teacher-steps", "2,1", "--reference-steps", "2", "--arc-steps", "2,1",
            "--clips", "2", "--seeds", "2", "--duration", "1", "--batch", "2", "--threads", "1",
            "--crepe-model", "tiny", "--crepe-frames", "4", "--pitch-frames", "8",
            "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "results"), "--out-name", "dq",
            "--no-progress"]
    with float32_default():
        data = distill_quality.main(argv, text_encoder=text_encoder)
    out = tmp_path / "results"
    for ext in ("json", "md", "png"):
        assert (out / f"dq.{ext}").stat().st_size > 0
    assert (out / "dq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "dq.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(data["rows"]))
    assert sorted(r["model"] for r in saved["rows"] if r["family"] in ("bsa", "min-snr")) == sorted(map(str, students))
    rows = {(r["family"], r["steps"]): r for r in saved["rows"]}
    assert set(rows) == {("teacher", 2), ("teacher", 1), ("bsa", 1), ("min-snr", 1), ("arc", 2), ("arc", 1)}
    assert saved["computed_runs"] == 12 and saved["clips"] and len(saved["clips"]) == 2
    assert "benchmarks.distill_quality" in saved["environment"]["command"]
    assert "--clips 2" in saved["environment"]["command"]
    for r in saved["rows"]:
        assert r["seeds"] == [0, 1]
        for key in ("fd_crepe", "fd_mfcc", "latent_mse", "mrstft", "s_per_clip", "ms_per_step"):
            m = r["metrics"][key]
            assert len(m["per_seed"]) == 2 and all(math.isfinite(v) for v in m["per_seed"]), (r["key"], key)
            assert math.isfinite(m["mean"]) and math.isfinite(m["ci"]) and m["mean"] >= 0
        assert r["forwards_per_step"] == (2 if r["family"] == "teacher" else 1)
    # the reference is its own reference; every other row started from the same noise but differs
    assert rows[("teacher", 2)]["metrics"]["latent_mse"]["mean"] == 0.0
    assert rows[("teacher", 2)]["metrics"]["mrstft"]["mean"] == 0.0
    assert all(r["metrics"]["latent_mse"]["mean"] > 0 for k, r in rows.items() if k != ("teacher", 2))
    # seeds differ, so the FDs do
    assert rows[("teacher", 1)]["metrics"]["fd_mfcc"]["per_seed"][0] != rows[("teacher", 1)]["metrics"]["fd_mfcc"]["per_seed"][1]
    md = (out / "dq.md").read_text()
    assert "| BSA | 1 |" in md and "FD-CREPE" in md and "±" in md and "dq.png" in md

    # resumable: a second run finds every (row, seed) in the work dir and reproduces the table
    with float32_default():
        again = distill_quality.main(argv, text_encoder=text_encoder)
    assert again["computed_runs"] == 0
    assert [r["metrics"]["fd_crepe"]["per_seed"] for r in again["rows"]] == \
        [r["metrics"]["fd_crepe"]["per_seed"] for r in saved["rows"]]
    # a lost (row, seed) result is recomputed alone, identically (same noise, same model)
    victim = tmp_path / "work" / "bsa-1" / "seed-1.json"
    before = json.loads(victim.read_text())
    victim.unlink()
    with float32_default():
        third = distill_quality.main(argv, text_encoder=text_encoder)
    assert third["computed_runs"] == 1
    after = json.loads(victim.read_text())
    assert np.allclose(after["embeddings"]["mfcc"], before["embeddings"]["mfcc"], rtol=1e-5, atol=1e-6)
    assert after["latent_mse"] == pytest.approx(before["latent_mse"], rel=1e-5)


def test_two_runs_of_one_method_both_keep_their_directory_names(tiny_models, tmp_path):
    import shutil

    from benchmarks.distill_quality import plan_rows

    _, teacher, students, _ = tiny_models
    runs = [shutil.copytree(students[0], tmp_path / name) for name in ("run-a", "run-b")]
    rows = plan_rows(str(teacher), [2], 2, runs + [students[1]], None, [])
    assert sorted(r.method for r in rows if r.family != "teacher") == ["BSA [run-a]", "BSA [run-b]", "Min-SNR"]
    assert len({r.key for r in rows}) == len(rows)


def test_stereo_mrstft_stays_finite_on_a_hard_panned_reference():
    """A reference with a silent channel (a tone panned hard left) must not put a near-zero norm under the spectral
    convergence: over the clip as a whole a faint leak into that channel costs little, per channel it explodes."""
    import torch

    from models.audio.spectral import multi_resolution_stft_distance

    t = torch.arange(44100) / 44100
    tone = 0.3 * torch.sin(2 * math.pi * 440 * t)
    ref = torch.stack([tone, torch.zeros_like(tone)])
    leaky = torch.stack([tone, 1e-3 * tone])
    whole = float(multi_resolution_stft_distance(leaky, ref, item_dims=2))
    per_channel = multi_resolution_stft_distance(leaky, ref)
    assert whole < 1.0 < float(per_channel[1])
    assert float(multi_resolution_stft_distance(ref, ref, item_dims=2)) == 0.0


def test_one_nearly_silent_reference_does_not_dominate_the_mrstft_summary():
    from benchmarks.distill_quality import distance_aggregates

    clips = [{"latent_mse": 0.1, "mrstft": 1.0}, {"latent_mse": 0.3, "mrstft": 2.0},
             {"latent_mse": 0.2, "mrstft": 7e4}]  # the model sounds where a brief reference tone is over
    agg = distance_aggregates(clips)
    assert agg["mrstft"] == 2.0 and agg["latent_mse"] == pytest.approx(0.2)
    assert distance_aggregates([{"latent_mse": None, "mrstft": None}]) == {"latent_mse": None, "mrstft": None}
