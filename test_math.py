"""The lecture's math, proved property by property (fp64 wherever exactness matters).

Every test states a property that fails if the formula it guards is wrong. Schedules, timesteps,
shapes and values are drawn with hypothesis; statistical checks use fixed seeds and tolerances
derived from the number of draws.
"""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ddpm

# ----------------------------------------------------------------------------- strategies

F64 = torch.float64

# Linear schedules over the range of T. The end is kept at or below 0.3 so that
# prod(1 - beta) over 2000 steps stays far above float64's smallest normal number (>= 1e-150):
# below that, "strictly decreasing" would be a statement about underflow, not about the math.
linear_params = st.tuples(
    st.integers(min_value=2, max_value=2000),
    st.floats(min_value=1e-5, max_value=0.1),
    st.floats(min_value=1.05, max_value=30.0),
).map(lambda p: (p[0], p[1], min(p[1] * p[2], 0.3)))


@st.composite
def schedules(draw, kinds=("linear", "cosine")):
    """A float64 Schedule: a drawn linear schedule, or a cosine schedule with drawn T."""
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        timesteps, start, end = draw(linear_params)
        return ddpm.Schedule.from_betas(ddpm.linear_beta_schedule(timesteps, start, end), dtype=F64)
    return ddpm.Schedule.from_betas(ddpm.cosine_beta_schedule(draw(st.integers(2, 2000))), dtype=F64)


@st.composite
def schedule_and_t(draw, min_t=0):
    """A float64 schedule and a timestep t in [min_t, T)."""
    schedule = draw(schedules())
    assume(schedule.timesteps > min_t)
    return schedule, draw(st.integers(min_t, schedule.timesteps - 1))


image_shapes = st.tuples(
    st.integers(1, 4), st.sampled_from([1, 3]), st.integers(1, 6), st.integers(1, 6)
)
seeds = st.integers(0, 2**31 - 1)


def gaussian(shape, seed):
    """Return a float64 standard normal tensor of the given shape from a seeded generator."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def lecture_schedule(timesteps=600):
    """Return the lecture's schedule (linear, 1e-4 .. 0.02) in float64."""
    return ddpm.Schedule.from_betas(ddpm.linear_beta_schedule(timesteps), dtype=F64)


class ConstantModel(torch.nn.Module):
    """A stand-in for eps_theta that returns a fixed tensor whatever (x_t, t) it is given."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, t):
        return self.output.expand_as(x)


# ----------------------------------------------------------------------------- 1. schedule closed forms


@given(schedules())
def test_alphas_are_one_minus_betas(schedule):
    """alphas = 1 - betas."""
    torch.testing.assert_close(schedule.alphas, 1 - schedule.betas, rtol=0, atol=0)


@given(schedules())
def test_alphas_cumprod_equals_independent_product(schedule):
    """alphas_cumprod[t] = prod_{i<=t} alphas[i], computed independently as exp(cumsum(log(alphas)))."""
    independent = torch.exp(torch.cumsum(torch.log(schedule.alphas), dim=0))
    torch.testing.assert_close(schedule.alphas_cumprod, independent, rtol=1e-10, atol=1e-300)


@given(schedules())
def test_alphas_cumprod_prev_is_shifted_and_padded_with_one(schedule):
    """alphas_cumprod_prev[0] = 1 and alphas_cumprod_prev[t] = alphas_cumprod[t-1]."""
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1], rtol=0, atol=0)


@given(schedules())
def test_sqrt_recip_alphas_squared_times_alphas_is_one(schedule):
    """sqrt_recip_alphas^2 * alphas = 1."""
    torch.testing.assert_close(schedule.sqrt_recip_alphas**2 * schedule.alphas, torch.ones_like(schedule.alphas))


@given(schedules())
def test_signal_and_noise_scales_are_on_the_unit_circle(schedule):
    """sqrt_alphas_cumprod^2 + sqrt_one_minus_alphas_cumprod^2 = 1: x_t keeps unit variance for unit-variance x0."""
    total = schedule.sqrt_alphas_cumprod**2 + schedule.sqrt_one_minus_alphas_cumprod**2
    torch.testing.assert_close(total, torch.ones_like(total))


@given(schedules())
def test_posterior_variance_closed_form_and_bounds(schedule):
    """posterior_variance = beta_t (1 - abar_{t-1}) / (1 - abar_t); it is 0 at t = 0 and in (0, beta_t] for t >= 1."""
    betas, abar = schedule.betas.tolist(), schedule.alphas_cumprod.tolist()
    expected = [0.0] + [betas[t] * (1 - abar[t - 1]) / (1 - abar[t]) for t in range(1, len(betas))]
    torch.testing.assert_close(schedule.posterior_variance, torch.tensor(expected, dtype=F64))
    assert schedule.posterior_variance[0].item() == 0.0
    later = schedule.posterior_variance[1:]
    assert bool((later > 0).all())
    assert bool((later <= schedule.betas[1:] * (1 + 1e-12)).all())


@given(schedules())
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(schedule):
    """0 < abar_t < 1 and abar_t < abar_{t-1}: every step removes some signal."""
    abar = schedule.alphas_cumprod
    assert bool(((abar > 0) & (abar < 1)).all())
    assert bool((abar[1:] < abar[:-1]).all())


@given(linear_params)
def test_linear_schedule_has_constant_steps_and_given_endpoints(params):
    """betas[0] = start, betas[-1] = end, and betas[t+1] - betas[t] = (end - start) / (T - 1)."""
    timesteps, start, end = params
    betas = ddpm.linear_beta_schedule(timesteps, start, end)
    assert betas.shape == (timesteps,) and betas.dtype == F64
    assert math.isclose(betas[0].item(), start, rel_tol=1e-12)
    assert math.isclose(betas[-1].item(), end, rel_tol=1e-12)
    steps = betas[1:] - betas[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, (end - start) / (timesteps - 1)), rtol=1e-9, atol=1e-15)


def test_lecture_schedule_leaves_five_percent_of_the_signal_at_x_T():
    """For T = 600, abar_{T-1} < 0.01 and sqrt(abar_{T-1}) = 0.048 (to three decimals): x_T is almost, not quite, noise."""
    schedule = lecture_schedule()
    assert schedule.alphas_cumprod[-1].item() < 0.01
    assert round(schedule.sqrt_alphas_cumprod[-1].item(), 3) == 0.048


def test_lecture_schedule_pinned_values_checkable_by_hand():
    """Pinned values of the lecture's schedule, worked out by hand from betas[t] = 1e-4 + t * (0.02 - 1e-4) / 599.

    betas[1] = 1e-4 + 0.0199/599;  abar_0 = 1 - 1e-4;  abar_1 = abar_0 (1 - betas[1]);
    posterior_variance[1] = betas[1] (1 - abar_0) / (1 - abar_1)
                          = 1.33222e-4 * 1e-4 / (1 - 0.9999 * 0.99986678) = 1.33222e-8 / 2.33209e-4 = 5.7126e-5.
    """
    schedule = lecture_schedule()
    beta1 = 1e-4 + 0.0199 / 599
    abar0 = 1 - 1e-4
    abar1 = abar0 * (1 - beta1)
    assert math.isclose(schedule.betas[1].item(), beta1, rel_tol=1e-12)
    assert math.isclose(schedule.alphas_cumprod[1].item(), abar1, rel_tol=1e-12)
    assert math.isclose(schedule.posterior_variance[1].item(), beta1 * (1 - abar0) / (1 - abar1), rel_tol=1e-9)
    assert math.isclose(schedule.posterior_variance[1].item(), 5.7126e-5, rel_tol=1e-4)


@given(st.integers(2, 2000))
def test_cosine_schedule_follows_f_t_over_f_0(timesteps):
    """Cosine schedule: alphas_cumprod[t] = f(t+1) / f(0), f(u) = cos^2(((u/T) + s)/(1 + s) * pi/2), until betas clip at 0.999."""
    s = 0.008
    schedule = ddpm.Schedule.from_betas(ddpm.cosine_beta_schedule(timesteps, s=s), dtype=F64)

    def f(u):
        return math.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(timesteps)], dtype=F64)
    clipped = schedule.betas >= 0.999
    unclipped_prefix = int(clipped.long().argmax()) if bool(clipped.any()) else timesteps
    assert bool((schedule.betas <= 0.999).all())
    torch.testing.assert_close(schedule.alphas_cumprod[:unclipped_prefix], expected[:unclipped_prefix], rtol=1e-9, atol=1e-12)


def test_schedule_moves_and_casts_every_table():
    """Schedule.to(dtype) casts every table; create() rejects an unknown schedule name with a clear message."""
    schedule = ddpm.Schedule.create(10).to(dtype=torch.float16)
    assert all(getattr(schedule, name).dtype == torch.float16 for name in ("betas", "posterior_variance", "alphas_cumprod_prev"))
    with pytest.raises(ValueError, match="unknown schedule"):
        ddpm.Schedule.create(10, schedule="quadratic")
    with pytest.raises(ValueError, match="at least 2"):
        ddpm.linear_beta_schedule(1)


# ----------------------------------------------------------------------------- 2. the noise derivation


@given(schedule_and_t(), image_shapes, seeds)
def test_noise_recovered_from_x_t_equals_added_noise(schedule_t, shape, seed):
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) recovers the noise forward_diffusion_sample added."""
    schedule, t = schedule_t
    x0 = gaussian(shape, seed)
    noise = gaussian(shape, seed + 1)
    t_batch = torch.full((shape[0],), t)
    x_t, returned_noise = ddpm.forward_diffusion_sample(
        x0, t_batch, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, noise=noise
    )
    assert returned_noise is noise
    abar = schedule.alphas_cumprod[t].item()
    torch.testing.assert_close(x_t, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise)
    recovered = ddpm.noise_from_x0(x_t, t_batch, x0, schedule)
    # Recovering eps divides by sqrt(1 - abar_t), which is 1e-2.5 at the smallest t: scale atol with it.
    torch.testing.assert_close(recovered, noise, rtol=1e-9, atol=1e-12 / math.sqrt(1 - abar))


@given(schedule_and_t(), image_shapes, seeds)
def test_x0_predicted_from_true_noise_equals_x0(schedule_t, shape, seed):
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) inverts the forward process."""
    schedule, t = schedule_t
    x0 = gaussian(shape, seed)
    t_batch = torch.full((shape[0],), t)
    x_t, noise = ddpm.forward_diffusion_sample(
        x0, t_batch, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, generator=torch.Generator().manual_seed(seed)
    )
    assume(schedule.alphas_cumprod[t].item() > 1e-6)
    predicted = ddpm.predict_x0_from_noise(x_t, t_batch, noise, schedule)
    torch.testing.assert_close(predicted, x0, rtol=1e-8, atol=1e-8 / schedule.sqrt_alphas_cumprod[t].item())


def test_each_image_gets_its_own_timestep():
    """get_index_from_list gathers vals[t[b]] for image b and broadcasts over (C, H, W)."""
    vals = torch.arange(10, dtype=F64)
    out = ddpm.get_index_from_list(vals, torch.tensor([3, 0, 9]), (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 0.0, 9.0]


# ----------------------------------------------------------------------------- 3. the forward marginal


@settings(max_examples=8)
@given(st.integers(0, 599), st.floats(-1, 1))
def test_forward_process_marginal_mean_and_variance(t, x0_value):
    """Over N draws at fixed x0 and t: mean = sqrt(abar_t) x0 and variance = 1 - abar_t.

    N = 200,000: the sample mean's standard error is sqrt((1 - abar)/N) and the sample variance's is
    (1 - abar) sqrt(2/N); five standard errors (a 6e-7 chance per check under the null) is the tolerance.
    """
    schedule = lecture_schedule()
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), x0_value, dtype=F64)
    t_batch = torch.full((n,), t)
    x_t, _ = ddpm.forward_diffusion_sample(
        x0, t_batch, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, generator=torch.Generator().manual_seed(t)
    )
    abar = schedule.alphas_cumprod[t].item()
    variance = 1 - abar
    assert abs(x_t.mean().item() - math.sqrt(abar) * x0_value) < 5 * math.sqrt(variance / n)
    assert abs(x_t.var().item() - variance) < 5 * variance * math.sqrt(2 / n)


# ----------------------------------------------------------------------------- 4-6. posterior and reverse mean


def product_of_gaussians_posterior(schedule, t, x_t, x0):
    """Return (mean, variance) of q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), worked out independently.

    As a function of x_{t-1}: q(x_t | x_{t-1}) = N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) has precision alpha_t / beta_t
    and mean x_t / sqrt(alpha_t); q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}). Precisions add, means are
    precision-weighted. abar_{t-1} is taken as a product in a Python loop, not from the schedule's tables.
    """
    betas = schedule.betas.tolist()
    beta_t = betas[t]
    alpha_t = 1 - beta_t
    abar_prev = math.prod(1 - b for b in betas[:t])
    precision = alpha_t / beta_t + 1 / (1 - abar_prev)
    mean = (math.sqrt(alpha_t) / beta_t * x_t + math.sqrt(abar_prev) / (1 - abar_prev) * x0) / precision
    return mean, 1 / precision


@given(schedule_and_t(min_t=1), image_shapes, seeds)
def test_posterior_equals_product_of_gaussians(schedule_t, shape, seed):
    """mu_tilde(x_t, x0) and posterior_variance equal the precision-weighted product of the two Gaussians."""
    schedule, t = schedule_t
    x0, x_t = gaussian(shape, seed), gaussian(shape, seed + 1)
    t_batch = torch.full((shape[0],), t)
    expected_mean, expected_variance = product_of_gaussians_posterior(schedule, t, x_t, x0)
    torch.testing.assert_close(ddpm.posterior_mean(x_t, t_batch, x0, schedule), expected_mean, rtol=1e-7, atol=1e-9)
    assert math.isclose(schedule.posterior_variance[t].item(), expected_variance, rel_tol=1e-7)


@given(schedule_and_t(), image_shapes, seeds)
def test_lecture_reverse_mean_with_true_noise_equals_posterior_mean(schedule_t, shape, seed):
    """1/sqrt(alpha_t) (x_t - beta_t/sqrt(1 - abar_t) eps) = mu_tilde(x_t, x0) = mu_tilde(x_t, x0_hat(x_t, eps))."""
    schedule, t = schedule_t
    assume(schedule.alphas_cumprod[t].item() > 1e-6)
    x0 = gaussian(shape, seed)
    t_batch = torch.full((shape[0],), t)
    x_t, noise = ddpm.forward_diffusion_sample(
        x0, t_batch, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, noise=gaussian(shape, seed + 1)
    )
    lecture_mean = ddpm.reverse_mean(x_t, t_batch, noise, schedule)
    torch.testing.assert_close(lecture_mean, ddpm.posterior_mean(x_t, t_batch, x0, schedule), rtol=1e-7, atol=1e-7)
    x0_hat = ddpm.predict_x0_from_noise(x_t, t_batch, noise, schedule)
    torch.testing.assert_close(lecture_mean, ddpm.posterior_mean(x_t, t_batch, x0_hat, schedule), rtol=1e-7, atol=1e-7)


def gaussian_kl(mean1, var1, mean2, var2):
    """Return KL(N(mean1, var1) || N(mean2, var2)) per element: 0.5 (log(var2/var1) + (var1 + (mean1-mean2)^2)/var2 - 1)."""
    return 0.5 * (math.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


@given(schedule_and_t(min_t=1), image_shapes, seeds)
def test_simple_loss_is_the_elbo_term_up_to_a_weight(schedule_t, shape, seed):
    """KL(q(x_{t-1}|x_t,x0) || N(mean_theta, posterior_variance_t)) = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) (eps - eps_theta)^2."""
    schedule, t = schedule_t
    x0 = gaussian(shape, seed)
    noise, predicted_noise = gaussian(shape, seed + 1), gaussian(shape, seed + 2)
    t_batch = torch.full((shape[0],), t)
    x_t, _ = ddpm.forward_diffusion_sample(
        x0, t_batch, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, noise=noise
    )
    variance = schedule.posterior_variance[t].item()
    true_mean = ddpm.posterior_mean(x_t, t_batch, x0, schedule)
    model_mean = ddpm.reverse_mean(x_t, t_batch, predicted_noise, schedule)
    kl = torch.tensor(
        [gaussian_kl(m1, variance, m2, variance) for m1, m2 in zip(true_mean.flatten().tolist(), model_mean.flatten().tolist())],
        dtype=F64,
    ).reshape(shape)
    beta_t, alpha_t, abar_t = schedule.betas[t].item(), schedule.alphas[t].item(), schedule.alphas_cumprod[t].item()
    weight = beta_t**2 / (2 * variance * alpha_t * (1 - abar_t))
    # The two means are O(1) numbers known to ~1e-15; the KL divides their difference's square by the
    # variance, so its absolute rounding error is ~1e-15 |m1 - m2| / variance: that, with margin, is atol.
    atol = 1e-13 * (1 + (true_mean - model_mean).abs().max().item()) / variance
    torch.testing.assert_close(kl, weight * (noise - predicted_noise) ** 2, rtol=1e-6, atol=atol)


# ----------------------------------------------------------------------------- 7. the reverse step


@given(schedule_and_t(), image_shapes, seeds)
def test_sample_timestep_is_the_lecture_formula(schedule_t, shape, seed):
    """sample_timestep = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1 - abar_t) eps_theta) + sqrt(posterior_variance_t) z, no z at t = 0."""
    schedule, t = schedule_t
    x_t, predicted_noise, z = gaussian(shape, seed), gaussian(shape, seed + 1), gaussian(shape, seed + 2)
    beta_t, alpha_t, abar_t = schedule.betas[t].item(), 1 - schedule.betas[t].item(), schedule.alphas_cumprod[t].item()
    mean = 1 / math.sqrt(alpha_t) * (x_t - beta_t / math.sqrt(1 - abar_t) * predicted_noise)
    expected = mean + (math.sqrt(schedule.posterior_variance[t].item()) * z if t > 0 else 0)
    result = ddpm.sample_timestep(ConstantModel(predicted_noise), x_t, t, schedule, noise=z)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    as_tensor = ddpm.sample_timestep(ConstantModel(predicted_noise), x_t, torch.full((shape[0],), t), schedule, noise=z)
    torch.testing.assert_close(as_tensor, result, rtol=0, atol=0)


def test_sample_timestep_adds_no_noise_at_t_zero_even_in_a_mixed_batch():
    """In a batch with t = [0, 5], the image at t = 0 gets exactly the mean, the other mean + sigma z."""
    schedule = lecture_schedule()
    x_t, z = gaussian((2, 1, 2, 2), 0), gaussian((2, 1, 2, 2), 1)
    model = ConstantModel(torch.zeros(1, dtype=F64))
    t = torch.tensor([0, 5])
    result = ddpm.sample_timestep(model, x_t, t, schedule, noise=z)
    mean = ddpm.reverse_mean(x_t, t, torch.zeros_like(x_t), schedule)
    torch.testing.assert_close(result[0], mean[0], rtol=0, atol=0)
    torch.testing.assert_close(result[1], mean[1] + math.sqrt(schedule.posterior_variance[5].item()) * z[1])


@given(schedule_and_t(min_t=1), image_shapes, seeds)
def test_clipped_step_uses_posterior_mean_at_an_x0_in_range(schedule_t, shape, seed):
    """With clip_x0 the mean is mu_tilde(x_t, clamp(x0_hat, -1, 1)); the x0 it implies lies in [-1, 1]."""
    schedule, t = schedule_t
    x_t, z = gaussian(shape, seed), gaussian(shape, seed + 2)
    predicted_noise = 5 * gaussian(shape, seed + 1)  # large, so that x0_hat leaves [-1, 1]
    t_batch = torch.full((shape[0],), t)
    result = ddpm.sample_timestep(ConstantModel(predicted_noise), x_t, t, schedule, noise=z, clip_x0=True)
    mean = result - math.sqrt(schedule.posterior_variance[t].item()) * z
    coef1, coef2 = schedule.posterior_mean_coef1[t].item(), schedule.posterior_mean_coef2[t].item()
    implied_x0 = (mean - coef2 * x_t) / coef1
    assume(coef1 > 1e-3)  # dividing by a tiny coefficient would only test rounding
    assert bool((implied_x0.abs() <= 1 + 1e-6).all())
    x0_hat = ddpm.predict_x0_from_noise(x_t, t_batch, predicted_noise, schedule)
    torch.testing.assert_close(mean, ddpm.posterior_mean(x_t, t_batch, x0_hat.clamp(-1, 1), schedule), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- 8. the loss


class OracleModel(torch.nn.Module):
    """eps_theta that knows x0 and so returns the true noise: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x, t):
        return ddpm.noise_from_x0(x, t, self.x0, self.schedule)


@given(schedules(kinds=("linear",)), image_shapes, seeds)
def test_loss_is_zero_for_the_true_noise_and_the_mse_otherwise(schedule, shape, seed):
    """get_loss = mean (eps - eps_theta)^2: 0 for a model that returns the true noise, mean eps^2 for a model returning 0."""
    x0 = gaussian(shape, seed)
    generator = torch.Generator().manual_seed(seed)
    assert ddpm.get_loss(OracleModel(x0, schedule), x0, schedule, generator=generator).item() < 1e-12
    noise = gaussian(shape, seed + 1)
    t = torch.randint(0, schedule.timesteps, (shape[0],), generator=generator)
    zero_model = ConstantModel(torch.zeros(1, dtype=F64))
    loss = ddpm.get_loss(zero_model, x0, schedule, t=t, noise=noise)
    assert math.isclose(loss.item(), (noise**2).mean().item(), rel_tol=1e-6)


def test_loss_draws_timesteps_uniformly():
    """sample_t covers 0..T-1 uniformly: each of 10 values appears 10000 +- 5 sqrt(10000 * 0.9) times in 100000 draws."""
    t = ddpm.sample_t(100_000, 10, "cpu", generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10)
    assert len(counts) == 10
    assert bool(((counts - 10_000).abs() < 5 * math.sqrt(10_000 * 0.9)).all())


# ----------------------------------------------------------------------------- 9. the whole reverse chain


class GaussianDataOracle(torch.nn.Module):
    """The optimal predictor E[eps | x_t] for scalar data x0 ~ N(mu, s^2).

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is Gaussian with mean sqrt(abar) mu and variance abar s^2 + 1 - abar,
    and Cov(eps, x_t) = sqrt(1 - abar), so E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar).
    """

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x, t):
        abar = ddpm.get_index_from_list(self.schedule.alphas_cumprod, t, x.shape)
        return torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * self.mu) / (abar * self.s**2 + 1 - abar)


class TwoPointOracle(torch.nn.Module):
    """The optimal predictor E[eps | x_t] for data on {-1, +1} with equal weight.

    p(x0 = +1 | x_t) = sigmoid(2 sqrt(abar) x_t / (1 - abar)), so E[x0 | x_t] = tanh(sqrt(abar) x_t / (1 - abar))
    and E[eps | x_t] = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar).
    """

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t):
        abar = ddpm.get_index_from_list(self.schedule.alphas_cumprod, t, x.shape)
        expected_x0 = torch.tanh(torch.sqrt(abar) * x / (1 - abar))
        return (x - torch.sqrt(abar) * expected_x0) / torch.sqrt(1 - abar)


N_CHAIN = 4000


def test_reverse_chain_with_exact_predictor_recovers_gaussian_data():
    """600 lecture steps from N(0, 1) with the exact E[eps | x_t] give samples with mean mu and std s.

    N = 4000 samples: the mean's standard error is s/sqrt(N) = 0.008 and the std's s/sqrt(2N) = 0.0056.
    The tolerance, 0.04, is five standard errors plus room for the chain's own small bias (x_T still holds
    4.8% of the signal, and each reverse step is Gaussian only approximately); an off-by-one index in the
    loop moves the std by more than that (checked by hand).
    """
    mu, s = 0.5, 0.5
    schedule = lecture_schedule()
    samples, _ = ddpm.sample(GaussianDataOracle(schedule, mu, s), schedule, (N_CHAIN, 1, 1, 1),
                             generator=torch.Generator().manual_seed(0), x_T=gaussian((N_CHAIN, 1, 1, 1), 1))
    assert abs(samples.mean().item() - mu) < 0.04
    assert abs(samples.std().item() - s) < 0.04


def test_reverse_chain_with_exact_predictor_recovers_two_points():
    """With data on {-1, +1} and the exact predictor, 600 steps land near -1 and +1 in about equal numbers.

    99% of the samples lie within 0.1 of a data point, and the fraction at +1 is 1/2 within five standard errors
    (sqrt(0.25/N) = 0.0079).
    """
    schedule = lecture_schedule()
    samples, _ = ddpm.sample(TwoPointOracle(schedule), schedule, (N_CHAIN, 1, 1, 1),
                             generator=torch.Generator().manual_seed(0), x_T=gaussian((N_CHAIN, 1, 1, 1), 2))
    samples = samples.flatten()
    near_a_point = ((samples.abs() - 1).abs() < 0.1).double().mean().item()
    assert near_a_point > 0.99
    assert abs((samples > 0).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / N_CHAIN)


class RecordingModel(torch.nn.Module):
    """eps_theta = 0 that records the timesteps it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append(t.tolist())
        return torch.zeros_like(x)


def test_sampling_loop_visits_t_from_T_minus_1_down_to_0_once_each():
    """Algorithm 2 calls eps_theta at t = T-1, T-2, ..., 0, each once, for every image of the batch."""
    schedule = lecture_schedule(7)
    model = RecordingModel()
    ddpm.sample(model, schedule, (2, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert model.calls == [[t, t] for t in range(6, -1, -1)]


def test_sampling_loop_is_the_composition_of_sample_timestep():
    """sample() = sample_timestep(.., 0) o ... o sample_timestep(.., T-1) applied to x_T, with the same noise draws."""
    schedule = lecture_schedule(5)
    model = GaussianDataOracle(schedule, 0.2, 0.5)
    x_T = gaussian((3, 1, 2, 2), 4)
    result, _ = ddpm.sample(model, schedule, x_T.shape, generator=torch.Generator().manual_seed(9), x_T=x_T)
    generator, x = torch.Generator().manual_seed(9), x_T
    for t in [4, 3, 2, 1, 0]:
        x = ddpm.sample_timestep(model, x, t, schedule, noise=torch.randn(x.shape, generator=generator, dtype=F64))
    torch.testing.assert_close(result, x, rtol=0, atol=0)


def test_sampling_loop_keeps_frames_from_noise_to_x0():
    """sample(num_frames=K) keeps K snapshots, the last one being the returned x_0."""
    schedule = lecture_schedule(20)
    model = ConstantModel(torch.zeros(1, dtype=F64))
    x0, frames = ddpm.sample(model, schedule, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                             x_T=gaussian((2, 1, 2, 2), 0), num_frames=5)
    assert len(frames) == 5
    torch.testing.assert_close(frames[-1], x0, rtol=0, atol=0)
    assert ddpm.frame_steps(20, 5) == {19, 14, 10, 5, 0}


# ----------------------------------------------------------------------------- DDIM (beyond the lecture)


@given(seeds)
@settings(max_examples=10)
def test_ddim_with_eta_zero_is_deterministic(seed):
    """With eta = 0 the same x_T always gives the same x_0, whatever random generator is passed."""
    schedule = lecture_schedule(50)
    x_T = gaussian((3, 1, 2, 2), seed)
    model = GaussianDataOracle(schedule, 0.3, 0.7)
    first, _ = ddpm.ddim_sample(model, schedule, x_T.shape, steps=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(1))
    second, _ = ddpm.ddim_sample(model, schedule, x_T.shape, steps=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@given(schedule_and_t(min_t=1), image_shapes, seeds)
def test_ddim_with_eta_one_over_all_steps_is_the_ddpm_posterior(schedule_t, shape, seed):
    """With eta = 1 and t_prev = t - 1, the DDIM update is mu_tilde(x_t, x0) + sqrt(posterior_variance_t) z."""
    schedule, t = schedule_t
    assume(schedule.alphas_cumprod[t].item() > 1e-6)
    x0, noise, z = gaussian(shape, seed), gaussian(shape, seed + 1), gaussian(shape, seed + 2)
    t_batch = torch.full((shape[0],), t)
    x_t, _ = ddpm.forward_diffusion_sample(x0, t_batch, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, noise=noise)
    ddim = ddpm.ddim_step(ConstantModel(noise), x_t, t, t - 1, schedule, eta=1.0, noise=z)
    ddpm_step = ddpm.posterior_mean(x_t, t_batch, x0, schedule) + math.sqrt(schedule.posterior_variance[t].item()) * z
    torch.testing.assert_close(ddim, ddpm_step, rtol=1e-6, atol=1e-6)


def test_ddim_fifty_steps_with_exact_predictor_recovers_gaussian_data():
    """DDIM, eta = 0, 50 of the 600 steps, exact predictor: N(0, 1) maps to N(mu, s^2).

    The map is deterministic and, for Gaussian data, linear in x_T: mean and std must match to the same
    0.04 as the DDPM chain (N = 4000: standard errors 0.008 and 0.0056, plus the discretisation bias of 50 steps).
    """
    mu, s = -0.4, 0.6
    schedule = lecture_schedule()
    samples, _ = ddpm.ddim_sample(GaussianDataOracle(schedule, mu, s), schedule, (N_CHAIN, 1, 1, 1), steps=50,
                                  x_T=gaussian((N_CHAIN, 1, 1, 1), 3))
    assert abs(samples.mean().item() - mu) < 0.04
    assert abs(samples.std().item() - s) < 0.04


def test_ddim_timesteps_are_an_increasing_subsequence_ending_at_T_minus_1():
    """tau holds `steps` distinct timesteps from 0 to T-1; asking for more steps than T is refused."""
    taus = ddpm.ddim_timesteps(600, 50)
    assert len(taus) == 50 and taus[0] == 0 and taus[-1] == 599
    assert all(a < b for a, b in zip(taus, taus[1:]))
    with pytest.raises(ValueError, match="DDIM steps"):
        ddpm.ddim_timesteps(10, 11)
