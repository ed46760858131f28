from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler

from lidit.encoder import EncoderConfig, PromptEncoder
from lidit.generator import GeneratorConfig, LiDiTGenerator, TextFeatures
from lidit.objectives import ddpm_scheduler
from lidit.pipeline import LiDiTPipeline, PipelineSpec
from tests.lidit.tiny_lms import save_tiny_vae


class Oracle(torch.nn.Module):
    """Predicts the exact epsilon / velocity for data that is a single point x0."""

    def __init__(self, objective: str, x0: torch.Tensor) -> None:
        super().__init__()
        self.objective, self.x0 = objective, x0
        self.config = type("C", (), {"latent_channels": x0.shape[1], "patch_size": 2})()
        self.abar = ddpm_scheduler().alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor, texts: list) -> torch.Tensor:
        if self.objective == "flow":
            sigma = (t / 1000).view(-1, 1, 1, 1)
            noise = (x - (1 - sigma) * self.x0) / sigma
            return noise - self.x0
        a = self.abar[t.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


@pytest.mark.parametrize("objective", ["epsilon", "flow"])
def test_sampler_recovers_the_data_point_with_an_exact_model(objective: str) -> None:
    x0 = torch.full((1, 4, 8, 8), 0.7)
    pipe = LiDiTPipeline(Oracle(objective, x0), vae=None, objective=objective)
    texts = [TextFeatures(torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool), 1)]
    out = pipe.sample(texts, None, seeds=[3], latent_height=8, latent_width=8, num_inference_steps=10)
    # flow/Euler with the exact velocity is exact; DDIM stops at abar_0 = 1 - 1e-4, leaving 0.01 * eps of noise
    atol = 1e-4 if objective == "flow" else 0.05
    torch.testing.assert_close(out, x0, atol=atol, rtol=0)


@pytest.mark.parametrize("objective", ["epsilon", "flow"])
def test_sampling_loop_agrees_with_diffusers_scheduler(objective: str) -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    model = Oracle(objective, torch.zeros(1, 4, 8, 8))
    model.forward = lambda x, t, texts: net(x) * (t.view(-1, 1, 1, 1) / 1000)  # any t-dependent net
    pipe = LiDiTPipeline(model, vae=None, objective=objective)
    texts = [TextFeatures(torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool), 1)]
    ours = pipe.sample(texts, None, seeds=[5], latent_height=8, latent_width=8, num_inference_steps=7)
    # the same loop written against diffusers directly
    if objective == "flow":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:
        sched = DDIMScheduler.from_config(
            ddpm_scheduler().config, timestep_spacing="trailing", set_alpha_to_one=False
        )
    sched.set_timesteps(7)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * getattr(
        sched, "init_noise_sigma", 1.0
    )
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x) * (t.float() / 1000), t, x).prev_sample
    torch.testing.assert_close(ours, x)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_lm_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("pipe")
    save_tiny_vae(root / "vae")
    encoders = [PromptEncoder(EncoderConfig(name=n, path=str(tiny_lm_paths[n]))) for n in ("llama", "qwen")]
    gen = LiDiTGenerator(GeneratorConfig.from_preset("tiny", [e.branch_spec() for e in encoders]))
    for name, p in gen.named_parameters():  # make the output depend on text, as training would
        if "ada" in name or "final.linear" in name:
            torch.nn.init.normal_(p, std=0.05)
    pipe = LiDiTPipeline(gen, AutoencoderKL.from_pretrained(root / "vae"), "epsilon", encoders)
    spec = PipelineSpec(
        objective="epsilon",
        encoders=[e.config for e in encoders],
        encoder_fingerprints={e.name: e.fingerprint for e in encoders},
        vae=str(root / "vae"),
    )
    pipe.save_pretrained(root / "export", spec)
    return pipe, root


def test_pipeline_generates_images_of_requested_size(tiny_pipeline: tuple) -> None:
    pipe, _ = tiny_pipeline
    images = pipe(
        ["a red circle", "two blue squares"],
        num_inference_steps=3,
        height=32,
        width=48,
        num_images_per_prompt=2,
    )
    assert len(images) == 4
    assert all(im.size == (48, 32) and im.mode == "RGB" for im in images)


def test_same_seed_same_image_and_seed_changes_image(tiny_pipeline: tuple) -> None:
    pipe, _ = tiny_pipeline
    kw = dict(num_inference_steps=3, height=32, width=32, guidance_scale=3.0)
    a = np.asarray(pipe("a red circle", seed=7, **kw)[0])
    b = np.asarray(pipe("a red circle", seed=7, **kw)[0])
    c = np.asarray(pipe("a red circle", seed=8, **kw)[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # an image does not depend on its batch-mates
    d = np.asarray(pipe(["a red circle", "two blue squares"], seed=7, **kw)[0])
    assert np.abs(a.astype(int) - d.astype(int)).max() <= 1


def test_negative_prompt_changes_output(tiny_pipeline: tuple) -> None:
    pipe, _ = tiny_pipeline
    kw = dict(num_inference_steps=3, height=32, width=32, guidance_scale=5.0, seed=1)
    a = np.asarray(pipe("a red circle", **kw)[0])
    b = np.asarray(pipe("a red circle", negative_prompt="two blue squares", **kw)[0])
    assert not np.array_equal(a, b)


def test_bad_size_is_a_clear_error(tiny_pipeline: tuple) -> None:
    pipe, _ = tiny_pipeline
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe("a red circle", height=30, width=32)


def test_exported_pipeline_reloads_and_checks_fingerprints(tiny_pipeline: tuple) -> None:
    pipe, root = tiny_pipeline
    loaded = LiDiTPipeline.from_pretrained(root / "export")
    kw = dict(num_inference_steps=2, height=32, width=32, seed=3)
    assert np.array_equal(
        np.asarray(pipe("a red circle", **kw)[0]), np.asarray(loaded("a red circle", **kw)[0])
    )
    spec_file = root / "export" / "pipeline.json"
    spec = PipelineSpec.model_validate_json(spec_file.read_text())
    spec.encoder_fingerprints["llama"] = "0" * 16
    spec_file.write_text(spec.model_dump_json())
    try:
        with pytest.raises(ValueError, match="trained on"):
            LiDiTPipeline.from_pretrained(root / "export")
    finally:
        spec.encoder_fingerprints["llama"] = pipe.encoders[0].fingerprint
        spec_file.write_text(spec.model_dump_json())


def test_portable_export_loads_from_another_models_root(tiny_pipeline: tuple, tmp_path) -> None:
    """Encoders and VAE exported as lidit-models:// locations load from wherever the root is configured."""
    import shutil

    from lidit.locations import MODELS_ROOT_ENV, ModelLocationError
    from lidit.pipeline import FingerprintMismatchError, read_spec

    pipe, root = tiny_pipeline
    first = tmp_path / "first"
    shutil.copytree(root / "vae", first / "vae")
    for enc in pipe.encoders:
        shutil.copytree(enc.config.path, first / "lms" / enc.name)
    spec = read_spec(root / "export")
    spec = spec.model_copy(
        update={
            "vae": str(first / "vae"),
            "encoders": [e.model_copy(update={"path": str(first / "lms" / e.name)}) for e in spec.encoders],
        }
    )
    portable, absolute = spec.portable(first)
    assert not absolute
    assert portable.vae == "lidit-models://vae"
    assert [e.path for e in portable.encoders] == ["lidit-models://lms/llama", "lidit-models://lms/qwen"]
    export = tmp_path / "export"
    shutil.copytree(root / "export", export)
    (export / "pipeline.json").write_text(portable.model_dump_json())

    # The models move to another machine's root: the export loads there, and only there.
    second = tmp_path / "second"
    first.rename(second)
    loaded = LiDiTPipeline.from_pretrained(export, models_root=second)
    assert [e.config.path for e in loaded.encoders] == [str(second / "lms" / n) for n in ("llama", "qwen")]
    kw = dict(num_inference_steps=2, height=32, width=32, seed=3)
    assert np.array_equal(
        np.asarray(pipe("a red circle", **kw)[0]), np.asarray(loaded("a red circle", **kw)[0])
    )
    with pytest.raises(ModelLocationError) as missing:
        LiDiTPipeline.from_pretrained(export, models_root=first)
    message = str(missing.value)
    assert "\n" not in message and str(first) in message and MODELS_ROOT_ENV in message

    # A changed checkpoint under the right name is refused, one line naming it and where it was found.
    (second / "lms" / "qwen" / "notes.txt").write_text("fine-tuned since\n")
    with pytest.raises(FingerprintMismatchError) as changed:
        LiDiTPipeline.from_pretrained(export, models_root=second)
    message = str(changed.value)
    assert "\n" not in message and "encoder 'qwen'" in message and str(second / "lms" / "qwen") in message


def test_pyfunc_flavor_predicts_the_pipeline_images(tiny_pipeline: tuple, tmp_path) -> None:
    """The MLflow model directory loads with `mlflow.pyfunc` and returns the pipeline's own images as PNG."""
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from lidit.pyfunc import save_pyfunc

    pipe, root = tiny_pipeline
    model_dir = save_pyfunc(root / "export", tmp_path / "model")
    assert (model_dir / "artifacts" / "pipeline" / "pipeline.json").is_file()
    assert not list(model_dir.rglob("*.pkl"))  # models from code: nothing pickled
    model = mlflow.pyfunc.load_model(str(model_dir))
    frame = pd.DataFrame({"prompt": ["a red circle", "two blue squares"], "seed": [7, 8]})
    params = {"num_inference_steps": 2, "height": 32, "width": 32}
    pngs = model.predict(frame, params=params)
    assert len(pngs) == 2
    images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs]
    for image, prompt, seed in zip(images, frame["prompt"], frame["seed"], strict=True):
        want = np.asarray(pipe(prompt, num_inference_steps=2, height=32, width=32, seed=int(seed))[0])
        assert image.shape == (32, 32, 3)
        assert np.abs(image.astype(int) - want.astype(int)).max() <= 1  # batch-mates change only rounding
    # seed defaults to the row index; a negative prompt changes the image; default size is the export's
    one = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"num_inference_steps": 2})
    assert Image.open(io.BytesIO(one[0])).size == (64, 64)
    neg = model.predict(
        pd.DataFrame({"prompt": ["a red circle"], "negative_prompt": ["two blue squares"], "seed": [7]}),
        params=params,
    )
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(neg[0])).convert("RGB")), images[0])
