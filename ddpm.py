"""DDPM as regression on the added noise: the lecture's math, one function per formula.

Reads in the order of the lecture: schedule -> forward process -> the noise derivation -> posterior ->
reverse step -> sampling loop -> loss. After the loss, in a section marked as beyond the lecture:
the cosine schedule (Nichol and Dhariwal, 2021), the Min-SNR-gamma loss weights (Hang et al., 2023), the DDIM
sampler (Song et al., 2021) and its second-order update (DPM-Solver++(2M), Lu et al., 2022).

Indexing: the code's t = 0 .. T-1 is the paper's t = 1 .. T (Ho et al., 2020). So
alphas_cumprod[t] = prod_{i <= t} (1 - betas[i]) and alphas_cumprod_prev[0] = 1 stands for abar_0 = 1.

Only torch, math and the standard library are imported: copy this file alone into another project.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- schedule


def linear_beta_schedule(timesteps, start=0.0001, end=0.02):
    """Return the lecture's linear noise schedule, float64, shape (timesteps,).

    betas[t] = start + (end - start) * t / (timesteps - 1),  t = 0 .. T-1
    """
    if timesteps < 2:
        raise ValueError(f"timesteps must be at least 2, got {timesteps}")
    if not 0.0 < start < end < 1.0:
        raise ValueError(f"need 0 < start < end < 1 for a linear schedule, got start={start}, end={end}")
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


@dataclass(frozen=True)
class Schedule:
    """The lecture's precomputed constants, each a 1-D tensor of length T indexed by t = 0 .. T-1.

    Built in float64 by `from_betas`, then cast to `dtype`, so that tests can hold them to tight
    tolerances while training uses float32. `posterior_mean_coef1/2` are the two coefficients of
    the posterior mean (Ho et al., eq. 7).
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_recip_alphas: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def from_betas(cls, betas, dtype=torch.float32):
        """Return the Schedule of a beta schedule, computed in float64 and cast to dtype.

        alphas = 1 - betas
        alphas_cumprod[t] = prod_{i <= t} alphas[i]
        alphas_cumprod_prev = [1, alphas_cumprod[0], ..., alphas_cumprod[T-2]]
        sqrt_recip_alphas = sqrt(1 / alphas)
        sqrt_alphas_cumprod = sqrt(alphas_cumprod)
        sqrt_one_minus_alphas_cumprod = sqrt(1 - alphas_cumprod)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        posterior_mean_coef1 = betas * sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod)        (multiplies x0)
        posterior_mean_coef2 = (1 - alphas_cumprod_prev) * sqrt(alphas) / (1 - alphas_cumprod)  (multiplies x_t)
        """
        betas = torch.as_tensor(betas).to(torch.float64).cpu()
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie strictly between 0 and 1")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        tables = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_recip_alphas=torch.sqrt(1.0 / alphas),
            sqrt_alphas_cumprod=torch.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - alphas_cumprod),
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef1=betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
        )
        return cls(**{name: table.to(dtype) for name, table in tables.items()})

    @classmethod
    def create(cls, timesteps, schedule="linear", dtype=torch.float32):
        """Return the Schedule of a named beta schedule ("linear", the lecture's, or "cosine") with T steps."""
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}: choose one of {sorted(BETA_SCHEDULES)}")
        return cls.from_betas(BETA_SCHEDULES[schedule](timesteps), dtype=dtype)

    @property
    def timesteps(self):
        """Return T, the number of diffusion steps."""
        return len(self.betas)

    def to(self, device=None, dtype=None):
        """Return a copy with every table moved to device and/or cast to dtype."""
        return Schedule(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})


def get_index_from_list(vals, t, x_shape):
    """Return vals[t] for each sample, shaped (B, 1, 1, ...) to broadcast over a batch of shape x_shape.

    out[b, 0, 0, 0] = vals[t[b]]   (t: LongTensor of shape (B,), one timestep per image)
    """
    batch_size = t.shape[0]
    out = vals.gather(-1, t.to(vals.device))
    return out.reshape(batch_size, *((1,) * (len(x_shape) - 1)))


# ----------------------------------------------------------------------------- forward process


def forward_diffusion_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise=None, generator=None):
    """Return (x_t, noise): a draw from q(x_t | x0) in closed form, and the noise that made it.

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,   eps ~ N(0, I)      (Ho et al., eq. 4)
    The signature is the lecture's forward_diffusion_sample(x_0, t): the two tables its notebook reads
    from globals are passed in, not a Schedule as everywhere else here, so the notebook's calls carry over.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    sqrt_alphas_cumprod_t = get_index_from_list(sqrt_alphas_cumprod, t, x0.shape).to(x0.dtype)
    sqrt_one_minus_alphas_cumprod_t = get_index_from_list(sqrt_one_minus_alphas_cumprod, t, x0.shape).to(x0.dtype)
    return sqrt_alphas_cumprod_t * x0 + sqrt_one_minus_alphas_cumprod_t * noise, noise


# ----------------------------------------------------------------------------- the noise derivation


def noise_from_x0(x_t, t, x0, schedule):
    """Return the noise that takes x0 to x_t: the forward process solved for eps.

    eps = (x_t - sqrt(abar_t) * x0) / sqrt(1 - abar_t)
    """
    sqrt_alphas_cumprod_t = get_index_from_list(schedule.sqrt_alphas_cumprod, t, x_t.shape)
    sqrt_one_minus_alphas_cumprod_t = get_index_from_list(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    return (x_t - sqrt_alphas_cumprod_t * x0) / sqrt_one_minus_alphas_cumprod_t


def predict_x0_from_noise(x_t, t, noise, schedule):
    """Return the x0 that a noise estimate implies: the forward process solved for x0.

    x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)      (Ho et al., eq. 15)
    """
    sqrt_alphas_cumprod_t = get_index_from_list(schedule.sqrt_alphas_cumprod, t, x_t.shape)
    sqrt_one_minus_alphas_cumprod_t = get_index_from_list(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    return (x_t - sqrt_one_minus_alphas_cumprod_t * noise) / sqrt_alphas_cumprod_t


# ----------------------------------------------------------------------------- posterior


def posterior_mean(x_t, t, x0, schedule):
    """Return the mean of the forward-process posterior q(x_{t-1} | x_t, x0).

    mu_tilde = betas_t * sqrt(abar_{t-1}) / (1 - abar_t) * x0
             + (1 - abar_{t-1}) * sqrt(alpha_t) / (1 - abar_t) * x_t          (Ho et al., eq. 7)
    Its variance is schedule.posterior_variance[t] = betas_t * (1 - abar_{t-1}) / (1 - abar_t).
    """
    coef1 = get_index_from_list(schedule.posterior_mean_coef1, t, x_t.shape)
    coef2 = get_index_from_list(schedule.posterior_mean_coef2, t, x_t.shape)
    return coef1 * x0 + coef2 * x_t


# ----------------------------------------------------------------------------- reverse step


def reverse_mean(x_t, t, predicted_noise, schedule):
    """Return the lecture's mean of p_theta(x_{t-1} | x_t) from a noise estimate.

    mean = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - abar_t) * eps_theta)   (Ho et al., eq. 11)
    """
    betas_t = get_index_from_list(schedule.betas, t, x_t.shape)
    sqrt_one_minus_alphas_cumprod_t = get_index_from_list(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    sqrt_recip_alphas_t = get_index_from_list(schedule.sqrt_recip_alphas, t, x_t.shape)
    return sqrt_recip_alphas_t * (x_t - betas_t / sqrt_one_minus_alphas_cumprod_t * predicted_noise)


def timestep_batch(t, batch_size, device):
    """Return t as a LongTensor of shape (batch_size,): an int is repeated, a tensor is checked."""
    if isinstance(t, int):
        return torch.full((batch_size,), t, dtype=torch.long, device=device)
    t = torch.as_tensor(t, device=device)
    if t.shape != (batch_size,):
        raise ValueError(f"t must be an int or a tensor of shape ({batch_size},), got shape {tuple(t.shape)}")
    return t.long()


@torch.no_grad()
def sample_timestep(model, x, t, schedule, noise=None, clip_x0=False, generator=None):
    """Return x_{t-1}: one step of the reverse process from x = x_t (the lecture's sample_timestep).

    eps_theta = model(x_t, t)
    mean = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - abar_t) * eps_theta)
           or, with clip_x0: mean = mu_tilde(x_t, clamp(x0_hat, -1, 1)),
              x0_hat = (x_t - sqrt(1 - abar_t) * eps_theta) / sqrt(abar_t)
    x_{t-1} = mean + sqrt(posterior_variance_t) * z   for t > 0,   z ~ N(0, I)
    x_{t-1} = mean                                     for t = 0
    A mask replaces the lecture's `if t == 0`, so a batch may mix timesteps. With this file's tables the
    mask changes no number (posterior_variance[0] = 0 already); it keeps x_0 free of noise for any variance
    table, e.g. Ho et al.'s other choice sigma_t^2 = beta_t, whose value at t = 0 is not 0.
    z is drawn at t = 0 too, so every step takes one draw from the generator.
    """
    t = timestep_batch(t, x.shape[0], x.device)
    predicted_noise = model(x, t).to(x.dtype)
    if clip_x0:
        x0 = predict_x0_from_noise(x, t, predicted_noise, schedule).clamp(-1.0, 1.0)
        mean = posterior_mean(x, t, x0, schedule)
    else:
        mean = reverse_mean(x, t, predicted_noise, schedule)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *((1,) * (x.ndim - 1)))
    posterior_variance_t = get_index_from_list(schedule.posterior_variance, t, x.shape)
    return mean + nonzero_mask * torch.sqrt(posterior_variance_t) * noise


# ----------------------------------------------------------------------------- sampling loop


def frame_positions(num_steps, num_frames):
    """Return the steps (0 = the first, num_steps - 1 = the one that gives x_0) after which a sampler keeps a frame.

    position_k = round(k * (num_steps - 1) / (num_frames - 1)),  k = 0 .. num_frames - 1
    evenly spaced from the first step to the last; one frame is x_0 alone; no frames for num_frames <= 0.
    min(num_frames, num_steps) distinct positions: asking for more frames than steps keeps every step.
    """
    if num_frames == 1:
        return {num_steps - 1}
    return {round(k * (num_steps - 1) / (num_frames - 1)) for k in range(num_frames)}


@torch.no_grad()
def sample(model, schedule, shape, generator=None, clip_x0=False, num_frames=0, x_T=None, callback=None):
    """Return (x0, frames): images drawn by the reverse process from pure noise (Ho et al., Algorithm 2).

    x_T ~ N(0, I);  for t = T-1 .. 0:  x_{t-1} = sample_timestep(model, x_t, t)
    frames: the x after each step in frame_positions(T, num_frames), from the first step to x_0.
    callback(step, total), when given, is called after each step (a progress line).
    The caller chooses model.eval() and any autocast; the schedule must be on x's device.
    """
    device = schedule.betas.device
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
    keep = frame_positions(schedule.timesteps, num_frames)
    frames = []
    for step, t in enumerate(reversed(range(schedule.timesteps))):
        x = sample_timestep(model, x, t, schedule, clip_x0=clip_x0, generator=generator)
        if step in keep:
            frames.append(x.clone())
        if callback is not None:
            callback(step + 1, schedule.timesteps)
    return x, frames


# ----------------------------------------------------------------------------- loss


def sample_t(batch_size, timesteps, device, generator=None):
    """Return t ~ Uniform{0, ..., T-1}, one per image, as a LongTensor of shape (batch_size,)."""
    return torch.randint(0, timesteps, (batch_size,), generator=generator, device=device)


def get_loss(model, x0, schedule, t=None, noise=None, generator=None, weights=None):
    """Return L_simple, the lecture's loss: the mean squared error between the added and the predicted noise.

    t ~ Uniform{0..T-1},  eps ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    L_simple = mean ||eps - eps_theta(x_t, t)||^2                  (Ho et al., eq. 14, Algorithm 1)
    with weights (one per image, e.g. min_snr_weights below):
    L = mean_b w_b * mean ||eps_b - eps_theta(x_t, t)_b||^2          (w = 1 gives L_simple)
    """
    if t is None:
        t = sample_t(x0.shape[0], schedule.timesteps, x0.device, generator)
    x_t, noise = forward_diffusion_sample(
        x0, t, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, noise=noise, generator=generator
    )
    predicted_noise = model(x_t, t)
    if weights is None:
        return F.mse_loss(predicted_noise.float(), noise.float())
    per_image = F.mse_loss(predicted_noise.float(), noise.float(), reduction="none").flatten(1).mean(dim=1)
    return (weights.float() * per_image).mean()


# =============================================================================
# Beyond the lecture: the cosine schedule, the Min-SNR loss weights and the DDIM sampler.
# Nothing above depends on what follows, except Schedule.create's lookup in BETA_SCHEDULES.
# =============================================================================


def cosine_beta_schedule(timesteps, s=0.008, max_beta=0.999):
    """Return the cosine noise schedule of Nichol and Dhariwal (2021), float64, shape (timesteps,).

    f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),  abar(t) = f(t) / f(0),  t = 0 .. T
    betas[t] = min(1 - abar(t + 1) / abar(t), max_beta) = min(1 - f(t + 1) / f(t), max_beta)   (f(0) cancels)
    so that alphas_cumprod[t] = abar(t + 1) (up to the clipping, which only bites near t = T).
    """
    if timesteps < 2:
        raise ValueError(f"timesteps must be at least 2, got {timesteps}")
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


BETA_SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}


def min_snr_weights(schedule, t, gamma):
    """Return w_t = min(SNR_t, gamma) / SNR_t for each image's t: the Min-SNR-gamma loss weights (Hang et al., 2023).

    SNR_t = abar_t / (1 - abar_t).  For the noise prediction loss, w_t = 1 where SNR_t <= gamma (the noisier
    steps) and gamma / SNR_t < 1 where the image is clearer: the nearly clean steps count less. Hang et al. found
    that this balance between the timesteps' conflicting gradients speeds up training. Pass the result to get_loss.
    """
    alphas_cumprod_t = get_index_from_list(schedule.alphas_cumprod, t, t.shape)
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / snr


def ddim_timesteps(timesteps, steps):
    """Return the DDIM sub-sequence tau: `steps` distinct timesteps, increasing, the last always T-1.

    tau_k = round(k * (T - 1) / (steps - 1)),  k = 0 .. steps - 1   (0 first and T-1 last)
    tau = [T - 1] for one step: x_T is pure noise only at t = T-1, so every chain must start there.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be between 1 and the schedule's {timesteps} timesteps, got {steps}")
    if steps == 1:
        return [timesteps - 1]
    return [round(k * (timesteps - 1) / (steps - 1)) for k in range(steps)]


@torch.no_grad()
def ddim_denoise(model, x, t, schedule, clip_x0=False):
    """Return (x0_hat, eps): the network's noise estimate at x = x_t and the x0 it implies.

    eps = model(x_t, t),  x0_hat = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
    with clip_x0: x0_hat = clamp(x0_hat, -1, 1) and eps = (x_t - sqrt(abar_t) * x0_hat) / sqrt(1 - abar_t)
    """
    t_batch = timestep_batch(t, x.shape[0], x.device)
    predicted_noise = model(x, t_batch).to(x.dtype)
    x0 = predict_x0_from_noise(x, t_batch, predicted_noise, schedule)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        predicted_noise = noise_from_x0(x, t_batch, x0, schedule)
    return x0, predicted_noise


def ddim_update(x, t, t_prev, x0, predicted_noise, schedule, eta=0.0, noise=None, generator=None):
    """Return x_{t_prev}: the DDIM update from x = x_t given x0_hat and eps (t_prev = -1 means x_0).

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    x_prev = sqrt(abar_prev) * x0_hat + sqrt(max(1 - abar_prev - sigma^2, 0)) * eps + sigma * z   (Song et al., eq. 12)
    abar_prev = alphas_cumprod_prev[t_prev + 1], so abar_prev = 1 at t_prev = -1.
    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is the DDPM step; where sigma^2 > 1 - abar_prev
    (possible for eta > 1) the eps direction is dropped. z is drawn even when sigma = 0: one draw per step,
    as in sample_timestep.
    """
    alphas_cumprod_t = schedule.alphas_cumprod[t].to(x.dtype)
    alphas_cumprod_prev = schedule.alphas_cumprod_prev[t_prev + 1].to(x.dtype)
    sigma = eta * torch.sqrt(
        (1 - alphas_cumprod_prev) / (1 - alphas_cumprod_t) * (1 - alphas_cumprod_t / alphas_cumprod_prev)
    )
    direction = torch.sqrt((1 - alphas_cumprod_prev - sigma**2).clamp(min=0)) * predicted_noise
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.sqrt(alphas_cumprod_prev) * x0 + direction + sigma * noise


@torch.no_grad()
def ddim_step(model, x, t, t_prev, schedule, eta=0.0, noise=None, clip_x0=False, generator=None):
    """Return x_{t_prev}: one DDIM step from x = x_t, ddim_update at the network's (x0_hat, eps) (ddim_denoise)."""
    x0, predicted_noise = ddim_denoise(model, x, t, schedule, clip_x0=clip_x0)
    return ddim_update(x, t, t_prev, x0, predicted_noise, schedule, eta=eta, noise=noise, generator=generator)


def half_log_snrs(schedule):
    """Return [lambda_0, ..., lambda_{T-1}] as Python floats (float64), read from the schedule in one copy.

    lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)) = (log(abar_t) - log(1 - abar_t)) / 2,
    half the log signal-to-noise ratio at t; it rises as t falls (abar_t rises towards 1).
    """
    return [0.5 * (math.log(abar) - math.log1p(-abar)) for abar in schedule.alphas_cumprod.tolist()]


def multistep_x0(x0, x0_before, t_before, t, t_prev, lambdas):
    """Return D: the x0 prediction carried to the middle of the step t -> t_prev by the line through the last two.

    D = x0 + (x0 - x0_before) / (2 r),  r = h_before / h,
    h = lambda_{t_prev} - lambda_t,  h_before = lambda_t - lambda_{t_before}   (t_before > t > t_prev >= 0)
    where x0_before was predicted at t_before, the step before, and lambdas = half_log_snrs(schedule). With D and
    the eps it implies in place of (x0_hat, eps), the DDIM update is DPM-Solver++(2M) (Lu et al., 2022): at eta = 0
    its ODE form, at eta = 1 its SDE form with the midpoint rule. The ODE form is second order: halving the step
    size quarters its error, where the DDIM update's halves.
    """
    if not t_before > t > t_prev >= 0:
        raise ValueError(f"multistep_x0 needs t_before > t > t_prev >= 0, got {t_before}, {t}, {t_prev}")
    h = lambdas[t_prev] - lambdas[t]
    h_before = lambdas[t] - lambdas[t_before]
    return x0 + (x0 - x0_before) * (h / (2 * h_before))


@torch.no_grad()
def ddim_sample(model, schedule, shape, steps=50, eta=0.0, generator=None, clip_x0=False, num_frames=0, x_T=None,
                callback=None, order=1):
    """Return (x0, frames): images drawn with DDIM over `steps` timesteps of the schedule.

    x_T ~ N(0, I);  for tau_k in reversed(tau):  x = ddim_step(x, tau_k, tau_{k-1})   (tau_{-1} = -1: x_0)
    order = 2: from the second step on, up to the last, the update takes D = multistep_x0(x0_hat, the previous
    step's x0_hat) and eps = (x_t - sqrt(abar_t) * D) / sqrt(1 - abar_t): DPM-Solver++(2M). The first step has no
    previous prediction and the last lands on abar = 1 (lambda infinite), so both stay first order.
    The lambdas are read from the schedule before the first step: no step reads a number back from the
    device, which on a GPU would wait for the work queued before it.
    frames and callback as in `sample`, over the `steps` steps.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (DDIM) or 2 (DPM-Solver++(2M)), got {order!r}")
    device = schedule.betas.device
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
    taus = ddim_timesteps(schedule.timesteps, steps)
    previous_taus = [-1] + taus[:-1]
    keep = frame_positions(len(taus), num_frames)
    frames = []
    lambdas = half_log_snrs(schedule) if order == 2 else None
    x0_before, t_before = None, None
    for step, (t, t_prev) in enumerate(zip(reversed(taus), reversed(previous_taus))):
        x0, predicted_noise = ddim_denoise(model, x, t, schedule, clip_x0=clip_x0)
        if order == 2 and x0_before is not None and t_prev >= 0:
            x0_used = multistep_x0(x0, x0_before, t_before, t, t_prev, lambdas)
            predicted_noise = noise_from_x0(x, timestep_batch(t, x.shape[0], x.device), x0_used, schedule)
        else:
            x0_used = x0
        x0_before, t_before = x0, t
        x = ddim_update(x, t, t_prev, x0_used, predicted_noise, schedule, eta=eta, generator=generator)
        if step in keep:
            frames.append(x.clone())
        if callback is not None:
            callback(step + 1, len(taus))
    return x, frames
