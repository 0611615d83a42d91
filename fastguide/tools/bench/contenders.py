"""The networks and contenders of ``fastguide bench``: each contender is a function ``run() -> samples``
built for one configuration (network, batch, steps), so timing measures the loop and nothing else."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

import fastguide

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
CFG_SCALE = 4.0
SHAPE = (3, 32, 32)



# ---------------------------------------------------------------------------------------------------
# Networks


class FreeNet(nn.Module):
    """A nearly free eps-network: one multiply, so a loop's time is the sampler's own."""

    def forward(self, x, t, y=None):
        return x * 0.1


class SmallUNet(nn.Module):
    """A small class-conditional diffusers ``UNet2DModel`` (random init) as ``model(x, t, y)``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from diffusers import UNet2DModel
        torch.manual_seed(seed)
        self.unet = UNet2DModel(sample_size=SHAPE[1], in_channels=SHAPE[0], out_channels=SHAPE[0],
                                layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                num_class_embeds=NUM_CLASSES + 1)

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y).sample


class SmallClassifier(nn.Module):
    """A small time-aware conv classifier ``clf(x, t) -> logits [B, 10]`` (random init)."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(SHAPE[0], 16, 3, padding=1)
        self.act = nn.SiLU()
        self.head = nn.Linear(16, NUM_CLASSES)
        self.time = nn.Linear(1, 16)

    def forward(self, x, t):
        h = self.act(self.conv(x)).mean(dim=(2, 3)) + self.time(t.reshape(-1, 1).to(x.dtype) / 1000.0)
        return self.head(self.act(h))


# ---------------------------------------------------------------------------------------------------
# Contenders: each is a function run() -> samples, built for one configuration


def _ddim_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def diffusers_cfg_loop(net, x_T, y, steps: int, dropin: bool = False) -> Callable[[], torch.Tensor]:
    """The diffusers pipeline loop: CFG by chunk + combine and ``scheduler.step`` (or ``fastguide.step``)."""
    scheduler = _ddim_scheduler()
    y_pair = torch.cat([torch.full_like(y, NULL_LABEL), y])

    def run():
        scheduler.set_timesteps(steps, device=x_T.device)
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            noise_pred = net(x_in, t, y_pair)
            if dropin:
                x = fastguide.step(noise_pred, t, x, scheduler=scheduler, guidance_scale=CFG_SCALE)
            else:
                uncond, cond = noise_pred.chunk(2)
                x = scheduler.step(uncond + CFG_SCALE * (cond - uncond), t, x).prev_sample
        return x

    return run


def fastguide_cfg(net, x_T, y, steps: int, compile: Optional[str] = None,
                  compile_options: Optional[dict] = None) -> Callable[[], torch.Tensor]:
    schedule = fastguide.Schedule.from_diffusers(_ddim_scheduler())
    guidance = [fastguide.CFG(CFG_SCALE, null_label=NULL_LABEL)]

    def run():
        return fastguide.sample(net, x_T, schedule=schedule, sampler="ddim", steps=steps, y=y, guidance=guidance,
                                compile=compile, compile_options=compile_options)

    return run


def k_diffusion_cfg(net, x_T, y, steps: int) -> Callable[[], torch.Tensor]:
    """k-diffusion's Euler sampler on the VP model through its own eps wrapper, with a CFG wrapper."""
    import k_diffusion
    from diffusers import DDPMScheduler

    class EpsModel(nn.Module):  # k-diffusion's eps wrapper calls inner_model(x, t, **kwargs)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t, cond=None):
            return self.net(x, t, cond)

    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    denoiser = k_diffusion.external.DiscreteEpsDDPMDenoiser(EpsModel(), abar.to(x_T.device), quantize=True)
    y_pair = torch.cat([torch.full_like(y, NULL_LABEL), y])

    def cfg_denoiser(x, sigma):
        uncond, cond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=y_pair).chunk(2)
        return uncond + CFG_SCALE * (cond - uncond)

    sigmas = denoiser.get_sigmas(steps)

    def run():
        return k_diffusion.sampling.sample_euler(cfg_denoiser, x_T * sigmas[0], sigmas, disable=True)

    return run


def _vp_chain(steps: int):
    """Respaced DDPM chain (guided-diffusion): timesteps, abar, abar_prev, posterior variance (float64)."""
    schedule = fastguide.Schedule.ddpm(timestep_spacing="guided")
    ts = schedule.timesteps(steps).astype("int64")
    abar = torch.tensor(schedule.alphas_cumprod[ts], dtype=torch.float64)
    abar_prev = torch.cat([abar[1:], torch.ones(1, dtype=torch.float64)])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    return schedule, ts.tolist(), abar.tolist(), abar_prev.tolist(), beta.tolist(), post_var.tolist()


def gd_cond_fn_loop(net, clf, x_T, y, steps: int, method: str, generator_seed: int = 0):
    """A guided-diffusion-style ``p_sample_loop``: per step the model, x0^, the posterior mean and variance,
    ``cond_fn`` through autograd, ``mean + variance * grad`` and the noise, each its own torch op.
    ``method="adm"``: grad of log softmax(clf(x_t, t))_y; ``"ma"``: clf on the clipped x0^ with
    ``tau1 l_y - logsumexp(tau2 l)`` and the extra variance gamma * Sigma_max * sin(pi i / N)."""
    _, ts, abar, abar_prev, beta, post_var = _vp_chain(steps)
    sigma_max = max(post_var)
    tau1, tau2, gamma = 1.0, 0.5, 0.3

    def cond_fn(inp, t):
        with torch.enable_grad():
            leaf = inp.detach().requires_grad_(True)
            logits = clf(leaf, t)
            if method == "adm":
                objective = torch.log_softmax(logits, dim=-1)[torch.arange(len(y)), y].sum()
            else:
                objective = (tau1 * logits[torch.arange(len(y)), y] - torch.logsumexp(tau2 * logits, dim=-1)).sum()
            return torch.autograd.grad(objective, leaf)[0]

    def run():
        g = torch.Generator(device=x_T.device).manual_seed(generator_seed)
        x = x_T
        n = len(ts)
        for i, t in enumerate(ts):
            t_batch = torch.full((x.shape[0],), float(t), device=x.device)
            eps = net(x, t_batch, None)
            x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
            if method == "ma":
                x0 = x0.clamp(-1, 1)
            mean = (math.sqrt(abar_prev[i]) * beta[i] / (1 - abar[i])) * x0 + \
                (math.sqrt(1 - beta[i]) * (1 - abar_prev[i]) / (1 - abar[i])) * x
            variance = post_var[i]
            if method == "adm":
                mean = mean + variance * cond_fn(x, t_batch)
            else:
                extra = max(0.0, gamma * sigma_max * math.sin(math.pi * (n - 1 - i) / n))
                mean = mean + (variance + extra) * cond_fn(x0, t_batch)
            x = mean + math.sqrt(variance) * torch.randn(x.shape, generator=g, device=x.device) if i < n - 1 else mean
        return x

    return run


def fastguide_classifier(net, clf, x_T, y, steps: int, method: str, compile: Optional[str] = None):
    schedule = fastguide.Schedule.ddpm(timestep_spacing="guided")
    spec = fastguide.ClassifierGuidance(clf, 1.0) if method == "adm" else \
        fastguide.ClassifierGuidance(clf, 1.0, input="x0", tau1=1.0, tau2=0.5, gamma=0.3)
    clip = None if method == "adm" else (-1.0, 1.0)

    def unconditional(x, t, _y):  # built once: compiled loops are cached per model object
        return net(x, t, None)

    def run():
        g = torch.Generator(device=x_T.device).manual_seed(0)
        return fastguide.sample(unconditional, x_T, schedule=schedule, sampler="ddpm",
                                steps=steps, y=y, guidance=[spec], generator=g, clip_denoised=clip,
                                compile=compile)

    return run
