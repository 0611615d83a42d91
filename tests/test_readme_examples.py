"""Every Python block of the README, and the ``>>>`` examples of the public API, run as written, with small
real objects standing in for the placeholders a reader brings (a tiny diffusers UNet2DConditionModel, a
tiny class-conditional model, classifier and discriminator)."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

import fastguide  # noqa: E402
from fastguide.native import cudagraph  # noqa: E402

from graph_replay_emu import ReplayDriver  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyModel(nn.Module):
    """``model(x, t, y)`` -> eps of x's shape (any shape); ``y`` None or labels in [0, 1000] (1000: the null
    label)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.7))
        self.label = nn.Embedding(1001, 1)

    def forward(self, x, t, y=None):
        view = (-1,) + (1,) * (x.dim() - 1)
        h = self.weight * x + 1e-3 * t.float().reshape(view)
        if y is not None:
            h = h + self.label(y.long()).reshape(view)
        return torch.tanh(h)


class TinyClassifier(nn.Module):
    """``classifier(x, t)`` -> logits [B, 10], with ReLUs for ``fastguide.smooth`` to replace."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 10))

    def forward(self, x, t):
        return self.net(x)


class TinyDiscriminator(nn.Module):
    """``discriminator(x, t, y)`` -> logit [B]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(2, 1))

    def forward(self, x, t, y=None):
        return self.net(x).reshape(-1)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval()


def placeholders() -> dict:
    """The objects the README's blocks and the docstrings' examples take as given."""
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (4,))
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(50)
    emb = torch.randn(4, 7, 16)
    return dict(torch=torch, fastguide=fastguide, g=torch.Generator().manual_seed(0), unet=tiny_unet(),
                emb=emb, embeds=emb, scheduler=scheduler, t=scheduler.timesteps[0], generator=None,
                latents=torch.randn(2, 4, 16, 16), noise_pred=torch.randn(4, 4, 16, 16),
                model=TinyModel(), denoiser=lambda x, sigma, y: x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2),
                labels=labels, y=labels, resnet=TinyClassifier(), disc=TinyDiscriminator(),
                x_T=torch.randn(4, 3, 32, 32), x=torch.randn(4, 3, 8, 8), eps_u=torch.randn(4, 3, 8, 8),
                eps_c=torch.randn(4, 3, 8, 8), classifier=lambda x: x.flatten(1)[:, :10],
                s=fastguide.Schedule.ddpm())


def readme_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile with dynamo's eager backend: the README's compiled code traces (fullgraph included)
    without minutes of inductor codegen on 2 CPU cores; compile='graph' runs through the CPU stand-in of the
    CUDA runtime (tests/graph_replay_emu.py), as the graph-capture tests do."""
    real = torch.compile

    def compile_eagerly(fn=None, **kwargs):
        kwargs.pop("mode", None)
        kwargs.setdefault("backend", "eager")
        return real(fn, **kwargs) if fn is not None else (lambda f: real(f, **kwargs))

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    monkeypatch.setattr(cudagraph, "driver", ReplayDriver())
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    fastguide.native.clear_caches()


def test_the_readme_has_python_blocks():
    assert len(readme_blocks()) >= 5


def test_every_readme_block_runs_as_written(quick_compile):
    namespace = placeholders()
    for i, block in enumerate(readme_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"README python block {i + 1} fails:\n{block}\n{type(exc).__name__}: {exc}") from exc
    x = namespace["x"]
    assert isinstance(x, torch.Tensor) and torch.isfinite(x).all()
    assert torch.isfinite(namespace["latents"]).all()


PUBLIC_API = [fastguide.sample, fastguide.step, fastguide.guided_step, fastguide.temperature_lse_grad,
              fastguide.per_sample_rms, fastguide.backends, fastguide.Schedule, fastguide.Schedule.ddpm,
              fastguide.Schedule.edm, fastguide.CFG, fastguide.ClassifierGuidance, fastguide.DiscriminatorGuidance,
              fastguide.smooth, fastguide.StepOutput, fastguide.samplers.build, fastguide.dropin.prepare]


def _examples(obj):
    doc = obj.__doc__ or ""
    return [ex.source for ex in doctest.DocTestParser().get_examples(doc)]


def test_every_public_api_object_has_an_example():
    missing = [getattr(o, "__qualname__", repr(o)) for o in PUBLIC_API if not _examples(o)]
    assert not missing, f"no >>> example in the docstring of {missing}"


# Examples that need their own value of a placeholder.
EXAMPLE_OVERRIDES = {"temperature_lse_grad": lambda: {"x": torch.randn(4, 3, 8, 8, requires_grad=True)}}


@pytest.mark.parametrize("obj", PUBLIC_API, ids=lambda o: getattr(o, "__qualname__", repr(o)))
def test_public_api_examples_run(obj, quick_compile):
    namespace = placeholders()
    namespace.update(EXAMPLE_OVERRIDES.get(obj.__name__, dict)())
    for source in _examples(obj):
        try:
            exec(compile(source, f"{obj.__qualname__} example", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"example of {obj.__qualname__} fails:\n{source}{type(exc).__name__}: {exc}") from exc
