"""The lecture's math, proved property by property, in float64 and in the float32 that training uses.

Every test states a property that fails if the formula it guards is wrong. Schedules, timesteps, shapes and
values are drawn with hypothesis; a drawn batch mixes timesteps, with t = 1 and t = T-1 always in it.
Tolerances are rounding bounds (see assert_within_rounding and CHAIN_ROUNDINGS), except in the few
Monte Carlo tests, whose tolerances come from the number of draws.

Sections: 1. schedule  2. forward process and the noise derivation  3. posterior and reverse mean
4. reverse step  5. loss  6. the whole reverse chain  7. DDIM and the cosine schedule (beyond the lecture).
"""
import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm

# ----------------------------------------------------------------------------- strategies

F64, F32 = torch.float64, torch.float32

# Linear schedules over T = 2 .. 2000. The end is kept at or below 0.3 so that prod(1 - beta) over
# 2000 steps stays far above float64's smallest normal number (>= 1e-150): below that, "strictly
# decreasing" would be a statement about underflow, not about the math.
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
def schedule_and_timesteps(draw, min_t=0):
    """A float64 schedule and a batch of timesteps, one per image: up to three drawn in [min_t, T), plus
    t = 1 (the first t whose abar_{t-1} is not 1, where a table shifted by one shows), t = T-1 (every
    table's last entry) and, unless min_t = 1, t = 0 (no noise, abar_{t-1} = 1); in drawn order."""
    schedule = draw(schedules())
    last = schedule.timesteps - 1
    forced = [1, last] if min_t else [0, 1, last]
    drawn = draw(st.lists(st.integers(min_t, last), max_size=3))
    return schedule, torch.tensor(draw(st.permutations(drawn + forced)))


image_dims = st.tuples(st.sampled_from([1, 3]), st.integers(1, 5), st.integers(1, 5))
dtypes = st.sampled_from([F64, F32])
seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------- helpers


def assume_float32_holds(schedule, dtype):
    """Skip the example when dtype is float32 and abar_{T-1} is below float32's smallest normal number (1.2e-38),
    where float32 tables would hold 0: the schedules training uses stay far above it (lecture 2.3e-3, cosine 1e-10)."""
    assume(dtype == F64 or schedule.alphas_cumprod[-1].item() > torch.finfo(F32).tiny)


def seeded(seed):
    """Return a torch.Generator seeded with seed."""
    return torch.Generator().manual_seed(seed)


def gaussian(shape, seed, dtype=F64):
    """Return a standard normal tensor of the given shape and dtype from a seeded generator."""
    return torch.randn(shape, generator=seeded(seed), dtype=dtype)


def lecture_betas(timesteps=600):
    """Return the lecture's betas as Python floats, written out: beta_t = 1e-4 + t (0.02 - 1e-4) / (T - 1)."""
    return [1e-4 + t * (0.02 - 1e-4) / (timesteps - 1) for t in range(timesteps)]


def lecture_schedule(timesteps=600, dtype=F64):
    """Return the lecture's schedule (linear, 1e-4 .. 0.02) with its tables in dtype."""
    return ddpm.Schedule.from_betas(ddpm.linear_beta_schedule(timesteps), dtype=dtype)


def running_product(betas):
    """Return [abar_0, ..., abar_{T-1}], abar_t = prod_{i <= t} (1 - beta_i), as a Python loop over floats."""
    products, product = [], 1.0
    for beta in betas:
        product *= 1 - beta
        products.append(product)
    return products


def per_image(values, ndim):
    """Return a float64 tensor of shape (B, 1, ..., 1) holding one value per image, to broadcast over a batch."""
    return torch.tensor(values, dtype=F64).reshape(-1, *([1] * (ndim - 1)))


def table_at(schedule, name, t, ndim):
    """Return schedule.<name>[t_b] for each image b in float64, shape (B, 1, ..., 1): indexed here, not by the code."""
    return per_image([getattr(schedule, name)[int(step)].item() for step in t], ndim)


def diffuse(x0, t, schedule, **kwargs):
    """Return forward_diffusion_sample(x0, t, ...) with the schedule's two tables: (x_t, noise)."""
    tables = (schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod)
    return ddpm.forward_diffusion_sample(x0, t, *tables, **kwargs)


def tables_at(schedule, t, ndim, *names):
    """Return table_at(schedule, name, t, ndim) for each name."""
    return tuple(table_at(schedule, name, t, ndim) for name in names)


def unit_roundoff(dtype):
    """Return u, the largest relative error of one rounding: 2^-53 in float64, 2^-24 in float32."""
    return torch.finfo(dtype).eps / 2


def cancellation(schedule):
    """Return the relative error that 1 - abar_t and 1 - abar_t / abar_{t-1} carry in float64: u / min(betas).

    abar_t is a product of t + 1 factors (relative error (t+1) u); subtracting it from 1 divides that by
    1 - abar_t >= (t+1) min(betas). Tables and references that subtract differently may differ by this much.
    """
    return unit_roundoff(F64) / schedule.betas.min().item()


ROUNDINGS = 32


def assert_within_rounding(actual, expected, magnitude, floor=0.0):
    """Assert |actual - expected| <= (ROUNDINGS * u + floor) * magnitude elementwise, u the unit roundoff of actual.

    magnitude is the formula evaluated with every term in absolute value: a formula of k roundings is then off
    by at most about k u magnitude (the forward error bound of sums of products, Higham 2002, ch. 3). Every formula
    here has fewer than ten (its tables rounded once to the dtype, then a few products, quotients and square
    roots), and the float64 reference fewer than ten at u = 2^-53: 32 covers both with room, and is still
    far below what a wrong coefficient, sign or index moves (1e-4 relative or more). floor: a relative error
    that the float64 tables already carry where they subtract nearly equal numbers (see cancellation).
    """
    assert actual.shape == expected.shape
    bound = (ROUNDINGS * unit_roundoff(actual.dtype) + floor) * magnitude.to(F64)
    error = (actual.to(F64) - expected.to(F64)).abs()
    worst = (error / bound).max().item()
    assert bool((error <= bound).all()), f"error up to {worst:.3g} times the rounding bound"


class ConstantModel(torch.nn.Module):
    """A stand-in for eps_theta that returns a fixed tensor whatever (x_t, t) it is given."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, t):
        return self.output.expand_as(x)


class RecordingModel(torch.nn.Module):
    """eps_theta = 0 that records the timesteps it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append(t.tolist())
        return torch.zeros_like(x)


# ----------------------------------------------------------------------------- 1. schedule


@given(schedules())
def test_every_table_is_its_lecture_formula_computed_independently(schedule):
    """Each table against its formula, evaluated in Python floats from betas alone (abar as a running product):
    alphas = 1 - betas; abar_t = prod_{i<=t} alphas_i; abar_prev = [1, abar_0, ..., abar_{T-2}];
    sqrt_recip_alphas = 1/sqrt(alpha_t); sqrt_alphas_cumprod = sqrt(abar_t); sqrt_one_minus_alphas_cumprod =
    sqrt(1 - abar_t); posterior_variance = beta_t (1 - abar_{t-1}) / (1 - abar_t);
    posterior_mean_coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t);
    posterior_mean_coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t).

    rtol 1e-10: the running product carries (t+1) u of relative error, which 1 - abar_t amplifies by
    abar_t / (1 - abar_t) <= 1 / ((t+1) beta_min); so at most u / beta_min <= 1.2e-11 for beta_min >= 1e-5.
    """
    betas = schedule.betas.tolist()
    abar = running_product(betas)
    abar_prev = [1.0] + abar[:-1]
    expected = {
        "alphas": [1 - b for b in betas],
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_recip_alphas": [1 / math.sqrt(1 - b) for b in betas],
        "sqrt_alphas_cumprod": [math.sqrt(a) for a in abar],
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(1 - a) for a in abar],
        "posterior_variance": [b * (1 - p) / (1 - a) for b, a, p in zip(betas, abar, abar_prev)],
        "posterior_mean_coef1": [b * math.sqrt(p) / (1 - a) for b, a, p in zip(betas, abar, abar_prev)],
        "posterior_mean_coef2": [(1 - p) * math.sqrt(1 - b) / (1 - a) for b, a, p in zip(betas, abar, abar_prev)],
    }
    for name, values in expected.items():
        expected_table = torch.tensor(values, dtype=F64)
        torch.testing.assert_close(getattr(schedule, name), expected_table, rtol=1e-10, atol=0, msg=name)
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    assert schedule.posterior_variance[0].item() == 0.0


@given(schedules())
def test_float32_tables_are_the_float64_tables_rounded_once(schedule):
    """Training's float32 tables are computed in float64 and cast: each equals the float64 table rounded to float32."""
    float32 = ddpm.Schedule.from_betas(schedule.betas, dtype=F32)
    for field in dataclasses.fields(ddpm.Schedule):
        table = getattr(float32, field.name)
        assert table.dtype == F32
        assert torch.equal(table, getattr(schedule, field.name).to(F32)), field.name


@given(schedules())
def test_posterior_variance_lies_between_zero_and_beta(schedule):
    """posterior_variance is 0 at t = 0 and in (0, beta_t] for t >= 1: the posterior is narrower than a forward step."""
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
    """For T = 600, abar_{T-1} < 0.01 and sqrt(abar_{T-1}) = 0.048 (to three decimals): x_T is almost noise."""
    schedule = lecture_schedule()
    assert schedule.alphas_cumprod[-1].item() < 0.01
    assert round(schedule.sqrt_alphas_cumprod[-1].item(), 3) == 0.048


def test_lecture_schedule_pinned_values_checkable_by_hand():
    """Pinned values of the lecture's schedule (its defaults 1e-4 .. 0.02), worked out by hand from
    betas[t] = 1e-4 + t * (0.02 - 1e-4) / 599:

    betas[1] = 1e-4 + 0.0199/599;  abar_0 = 1 - 1e-4;  abar_1 = abar_0 (1 - betas[1]);
    posterior_variance[1] = betas[1] (1 - abar_0) / (1 - abar_1)
                          = 1.33222e-4 * 1e-4 / (1 - 0.9999 * 0.99986678) = 1.33222e-8 / 2.33209e-4 = 5.7126e-5.
    """
    schedule = lecture_schedule()
    beta1 = 1e-4 + 0.0199 / 599
    abar0 = 1 - 1e-4
    abar1 = abar0 * (1 - beta1)
    assert math.isclose(schedule.betas[0].item(), 1e-4, rel_tol=1e-12)
    assert math.isclose(schedule.betas[-1].item(), 0.02, rel_tol=1e-12)
    assert math.isclose(schedule.betas[1].item(), beta1, rel_tol=1e-12)
    assert math.isclose(schedule.alphas_cumprod[1].item(), abar1, rel_tol=1e-12)
    assert math.isclose(schedule.posterior_variance[1].item(), beta1 * (1 - abar0) / (1 - abar1), rel_tol=1e-9)
    assert math.isclose(schedule.posterior_variance[1].item(), 5.7126e-5, rel_tol=1e-4)


def test_schedules_reject_what_is_not_a_noise_schedule():
    """T >= 2; 0 < start < end < 1 for the linear schedule; betas 1-D, at least two, each in (0, 1); known names.
    Each boundary is tried from both sides."""
    assert len(ddpm.linear_beta_schedule(2)) == 2 and len(ddpm.cosine_beta_schedule(2)) == 2
    for timesteps in (1, 0):
        with pytest.raises(ValueError, match="at least 2"):
            ddpm.linear_beta_schedule(timesteps)
        with pytest.raises(ValueError, match="at least 2"):
            ddpm.cosine_beta_schedule(timesteps)
    assert len(ddpm.linear_beta_schedule(3, 1e-9, 1 - 1e-9)) == 3
    for start, end in ((0.0, 0.02), (0.02, 0.02), (0.03, 0.02), (1e-4, 1.0)):
        with pytest.raises(ValueError, match="0 < start < end < 1"):
            ddpm.linear_beta_schedule(10, start, end)
    assert ddpm.Schedule.from_betas([0.5, 0.5]).timesteps == 2
    for betas in ([[0.1, 0.2], [0.3, 0.4]], [0.1]):
        with pytest.raises(ValueError, match="1-D tensor with at least 2 entries"):
            ddpm.Schedule.from_betas(betas)
    for betas in ([0.0, 0.5], [0.5, 1.0], [-0.1, 0.5], [0.5, 1.5]):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            ddpm.Schedule.from_betas(betas)
    with pytest.raises(ValueError, match="unknown schedule"):
        ddpm.Schedule.create(10, schedule="quadratic")


def test_schedule_is_immutable():
    """A Schedule's tables cannot be replaced by assignment (a frozen dataclass): every function sees the same ones."""
    schedule = ddpm.Schedule.create(10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.betas = torch.zeros(10)


def test_schedule_create_casts_every_table_and_to_casts_them_again():
    """create(T, name, dtype) is from_betas(BETA_SCHEDULES[name](T)) in dtype (float32 by default); to() casts every
    table."""
    for name, make_betas in (("linear", ddpm.linear_beta_schedule), ("cosine", ddpm.cosine_beta_schedule)):
        created = ddpm.Schedule.create(10, name)
        assert ddpm.BETA_SCHEDULES[name] is make_betas
        assert created.timesteps == 10 and created.betas.dtype == F32
        assert torch.equal(created.posterior_variance, ddpm.Schedule.from_betas(make_betas(10)).posterior_variance)
    assert ddpm.Schedule.create(10, dtype=F64).betas.dtype == F64
    half = ddpm.Schedule.create(10).to(dtype=torch.float16)
    assert all(getattr(half, field.name).dtype == torch.float16 for field in dataclasses.fields(half))


# ----------------------------------------------------------------------------- 2. forward process, noise derivation


@given(schedule_and_timesteps(), image_dims, dtypes, seeds)
def test_forward_process_and_its_two_inversions(schedule_t, dims, dtype, seed):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per image; eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
    and x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) recover what went in. In dtype, tables cast to it.
    Each inversion divides by sqrt(1 - abar_t) or sqrt(abar_t): its rounding bound grows by that factor."""
    schedule, t = schedule_t
    assume_float32_holds(schedule, dtype)
    tables = schedule.to(dtype=dtype)
    shape = (len(t), *dims)
    x0, noise = gaussian(shape, seed, dtype), gaussian(shape, seed + 1, dtype)
    x_t, returned_noise = diffuse(x0, t, tables, noise=noise)
    assert returned_noise is noise and x_t.dtype == dtype
    abar = table_at(schedule, "alphas_cumprod", t, x0.ndim)
    signal, noise_part = abar.sqrt() * x0.to(F64), (1 - abar).sqrt() * noise.to(F64)
    assert_within_rounding(x_t, signal + noise_part, signal.abs() + noise_part.abs())
    terms_of_x_t = signal.abs() + noise_part.abs()
    recovered_noise = ddpm.noise_from_x0(x_t, t, x0, tables)
    assert_within_rounding(recovered_noise, noise, (terms_of_x_t + signal.abs()) / (1 - abar).sqrt())
    recovered_x0 = ddpm.predict_x0_from_noise(x_t, t, noise, tables)
    assert_within_rounding(recovered_x0, x0, (terms_of_x_t + noise_part.abs()) / abar.sqrt())


@settings(max_examples=10)
@given(schedule_and_timesteps(), image_dims, seeds)
def test_forward_process_draws_its_noise_from_the_generator(schedule_t, dims, seed):
    """Without noise, forward_diffusion_sample draws eps ~ N(0, I) from the generator: its next normal draw."""
    schedule, t = schedule_t
    x0 = gaussian((len(t), *dims), seed)
    x_t, noise = diffuse(x0, t, schedule, generator=seeded(seed + 1))
    assert torch.equal(noise, gaussian(x0.shape, seed + 1))
    x_t_again, _ = diffuse(x0, t, schedule, noise=noise)
    assert torch.equal(x_t, x_t_again)


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
    x_t, _ = diffuse(x0, t_batch, schedule, generator=seeded(t))
    abar = schedule.alphas_cumprod[t].item()
    variance = 1 - abar
    assert abs(x_t.mean().item() - math.sqrt(abar) * x0_value) < 5 * math.sqrt(variance / n)
    assert abs(x_t.var().item() - variance) < 5 * variance * math.sqrt(2 / n)


def test_each_image_gets_its_own_timestep():
    """get_index_from_list gathers vals[t[b]] for image b and broadcasts over (C, H, W)."""
    vals = torch.arange(10, dtype=F64)
    out = ddpm.get_index_from_list(vals, torch.tensor([3, 0, 9]), (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 0.0, 9.0]
    assert ddpm.get_index_from_list(vals, torch.tensor([1, 2]), (2, 5)).shape == (2, 1)


def test_timestep_batch_repeats_an_int_and_checks_a_tensor():
    """An int t becomes (B,) copies; a tensor of shape (B,) passes as long; any other shape is refused."""
    assert ddpm.timestep_batch(4, 3, "cpu").tolist() == [4, 4, 4]
    given_t = ddpm.timestep_batch(torch.tensor([1, 0]), 2, "cpu")
    assert given_t.tolist() == [1, 0] and given_t.dtype == torch.long
    for wrong in (torch.tensor([1, 0, 2]), torch.tensor(1), torch.tensor([[1, 0]])):
        with pytest.raises(ValueError, match=r"t must be an int or a tensor of shape \(2,\)"):
            ddpm.timestep_batch(wrong, 2, "cpu")


# ----------------------------------------------------------------------------- 3. posterior and reverse mean


def product_of_gaussians_posterior(beta_t, abar_prev, x_t, x0):
    """Return (mean, variance) of q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), worked out independently.

    As a function of x_{t-1}: q(x_t | x_{t-1}) = N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) has precision alpha_t / beta_t
    and mean x_t / sqrt(alpha_t); q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}). Precisions add, means are
    precision-weighted.
    """
    alpha_t = 1 - beta_t
    precision = alpha_t / beta_t + 1 / (1 - abar_prev)
    mean = (alpha_t.sqrt() / beta_t * x_t + abar_prev.sqrt() / (1 - abar_prev) * x0) / precision
    return mean, 1 / precision


@given(schedule_and_timesteps(min_t=1), image_dims, dtypes, seeds)
def test_posterior_equals_product_of_gaussians(schedule_t, dims, dtype, seed):
    """mu_tilde(x_t, x0) and posterior_variance equal the precision-weighted product of the two Gaussians, per image.
    abar_{t-1} is taken as a running product over betas[:t], not from the tables."""
    schedule, t = schedule_t
    assume_float32_holds(schedule, dtype)
    shape = (len(t), *dims)
    x0, x_t = gaussian(shape, seed, dtype), gaussian(shape, seed + 1, dtype)
    betas = schedule.betas.tolist()
    beta_t = per_image([betas[step] for step in t.tolist()], x0.ndim)
    abar_prev = per_image([math.prod(1 - b for b in betas[:step]) for step in t.tolist()], x0.ndim)
    expected_mean, expected_variance = product_of_gaussians_posterior(beta_t, abar_prev, x_t.to(F64), x0.to(F64))
    coef1, coef2 = tables_at(schedule, t, x0.ndim, "posterior_mean_coef1", "posterior_mean_coef2")
    magnitude = (coef1 * x0.to(F64)).abs() + (coef2 * x_t.to(F64)).abs()
    # The reference's precision adds alpha_t (1 - abar_{t-1}) + beta_t where the tables subtract 1 - abar_t.
    mean = ddpm.posterior_mean(x_t, t, x0, schedule.to(dtype=dtype))
    assert_within_rounding(mean, expected_mean, magnitude, floor=ROUNDINGS * cancellation(schedule))
    variance = table_at(schedule, "posterior_variance", t, x0.ndim)
    torch.testing.assert_close(variance, expected_variance, rtol=1e-10, atol=0)


@given(schedule_and_timesteps(), image_dims, dtypes, seeds)
def test_lecture_reverse_mean_is_the_posterior_mean_at_the_implied_x0(schedule_t, dims, dtype, seed):
    """1/sqrt(alpha_t) (x_t - beta_t/sqrt(1 - abar_t) eps) equals its formula, and equals mu_tilde(x_t, x0) for the
    x0 that eps implies, x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al., eq. 11 from eq. 7)."""
    schedule, t = schedule_t
    assume_float32_holds(schedule, dtype)
    tables = schedule.to(dtype=dtype)
    shape = (len(t), *dims)
    x_t, noise = gaussian(shape, seed, dtype), gaussian(shape, seed + 1, dtype)
    ndim = x_t.ndim
    beta, abar = tables_at(schedule, t, ndim, "betas", "alphas_cumprod")
    step = beta / (1 - abar).sqrt() * noise.to(F64)
    expected = (x_t.to(F64) - step) / (1 - beta).sqrt()
    lecture_mean = ddpm.reverse_mean(x_t, t, noise, tables)
    assert_within_rounding(lecture_mean, expected, (x_t.to(F64).abs() + step.abs()) / (1 - beta).sqrt())
    abar_prev = table_at(schedule, "alphas_cumprod_prev", t, ndim)
    implied_x0 = (x_t.to(F64) - (1 - abar).sqrt() * noise.to(F64)) / abar.sqrt()
    coef1, coef2 = beta * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
    # coef1 * x0 divides by sqrt(abar_t): its terms are what the bound sees. The two forms agree because
    # beta_t + alpha_t (1 - abar_{t-1}) = 1 - abar_t, which the tables compute by subtraction (the floor).
    x0_terms = (x_t.to(F64).abs() + (1 - abar).sqrt() * noise.to(F64).abs()) / abar.sqrt()
    magnitude = coef1 * x0_terms + (coef2 * x_t.to(F64)).abs()
    posterior_form = coef1 * implied_x0 + coef2 * x_t.to(F64)
    assert_within_rounding(lecture_mean, posterior_form, magnitude, floor=ROUNDINGS * cancellation(schedule))


def gaussian_kl(mean1, var1, mean2, var2):
    """Return KL(N(mean1, var1) || N(mean2, var2)) per element:
    0.5 (log(var2/var1) + (var1 + (mean1-mean2)^2)/var2 - 1)."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


class TimestepModel(torch.nn.Module):
    """eps_theta(x_t, t) = x_t * (t + 1) / 8: depends on x_t and on t, so a loss at the wrong x_t or t differs."""

    def forward(self, x, t):
        return x * (t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) + 1) / 8


@given(schedule_and_timesteps(min_t=1), image_dims, seeds)
def test_simple_loss_is_the_elbo_term_up_to_a_weight(schedule_t, dims, seed):
    """KL(q(x_{t-1}|x_t,x0) || N(mean_theta, sigma_t^2)) = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))
    (eps - eps_theta)^2 per image (Ho et al., eq. 12), so get_loss, the mean of (eps - eps_theta)^2, is the mean of
    KL / weight.
    KL from gaussian_kl of the two means; mean_theta from reverse_mean."""
    schedule, t = schedule_t
    shape = (len(t), *dims)
    x0, noise, predicted_noise = gaussian(shape, seed), gaussian(shape, seed + 1), gaussian(shape, seed + 2)
    x_t, _ = diffuse(x0, t, schedule, noise=noise)
    variance = table_at(schedule, "posterior_variance", t, x0.ndim)
    true_mean = ddpm.posterior_mean(x_t, t, x0, schedule)
    model_mean = ddpm.reverse_mean(x_t, t, predicted_noise, schedule)
    kl = gaussian_kl(true_mean, variance, model_mean, variance)
    beta, abar = tables_at(schedule, t, x0.ndim, "betas", "alphas_cumprod")
    weight = beta**2 / (2 * variance * (1 - beta) * (1 - abar))
    # The two means are O(1) numbers known to ~1e-15; the KL divides their difference's square by the
    # variance, so its absolute rounding error is ~1e-15 |m1 - m2| / variance: that, with margin, is atol.
    atol = 1e-13 * (1 + (true_mean - model_mean).abs()) / variance
    assert bool(((kl - weight * (noise - predicted_noise) ** 2).abs() <= atol + 1e-6 * kl.abs()).all())
    loss = ddpm.get_loss(ConstantModel(predicted_noise), x0, schedule, t=t, noise=noise)
    # get_loss averages in float32: relative rounding of a float32 mean of n squares, n u32 at most.
    assert math.isclose(loss.item(), (kl / weight).mean().item(), rel_tol=kl.numel() * unit_roundoff(F32) + 1e-6)


# ----------------------------------------------------------------------------- 4. reverse step


@given(schedule_and_timesteps(), image_dims, dtypes, seeds)
def test_sample_timestep_is_the_lecture_formula(schedule_t, dims, dtype, seed):
    """x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1 - abar_t) eps_theta) + sqrt(posterior_variance_t) z, no z at
    t = 0, for each image at its own t; an int t is the same as a batch of it."""
    schedule, t = schedule_t
    assume_float32_holds(schedule, dtype)
    shape = (len(t), *dims)
    x_t, predicted_noise, z = (gaussian(shape, seed + k, dtype) for k in range(3))
    ndim = x_t.ndim
    beta, abar = tables_at(schedule, t, ndim, "betas", "alphas_cumprod")
    sigma = table_at(schedule, "posterior_variance", t, ndim).sqrt() * (t != 0).reshape(-1, *[1] * (ndim - 1))
    step = beta / (1 - abar).sqrt() * predicted_noise.to(F64)
    expected = (x_t.to(F64) - step) / (1 - beta).sqrt() + sigma * z.to(F64)
    magnitude = (x_t.to(F64).abs() + step.abs()) / (1 - beta).sqrt() + (sigma * z.to(F64)).abs()
    tables = schedule.to(dtype=dtype)
    result = ddpm.sample_timestep(ConstantModel(predicted_noise), x_t, t, tables, noise=z)
    assert_within_rounding(result, expected, magnitude)
    as_int = ddpm.sample_timestep(ConstantModel(predicted_noise[:1]), x_t[:1], int(t[0]), tables, noise=z[:1])
    assert torch.equal(as_int, result[:1])


def test_the_mask_keeps_noise_out_of_x_0_whatever_the_variance_table_says():
    """The t = 0 mask. With the lecture's tables it changes no number: posterior_variance[0] = 0 exactly, so
    mean + 0 * z = mean with or without it (an equivalent change, which no test can see). What it guarantees is
    seen with Ho et al.'s other variance, sigma_t^2 = beta_t, nonzero at t = 0: in a batch t = [0, 1, 5, 0],
    the images at t = 0 get exactly the mean, the others mean + sqrt(beta_t) z."""
    schedule = lecture_schedule(10)
    other_variance = dataclasses.replace(schedule, posterior_variance=schedule.betas)
    x_t, z = gaussian((4, 1, 2, 2), 0), gaussian((4, 1, 2, 2), 1)
    t = torch.tensor([0, 1, 5, 0])
    model = ConstantModel(gaussian((4, 1, 2, 2), 2))
    result = ddpm.sample_timestep(model, x_t, t, other_variance, noise=z)
    mean = ddpm.reverse_mean(x_t, t, model.output, schedule)
    assert torch.equal(result[[0, 3]], mean[[0, 3]])
    sigma = torch.tensor([0.0, schedule.betas[1].item(), schedule.betas[5].item(), 0.0], dtype=F64).sqrt()
    torch.testing.assert_close(result, mean + sigma.reshape(-1, 1, 1, 1) * z, rtol=1e-15, atol=1e-15)


@given(schedule_and_timesteps(min_t=1), image_dims, seeds)
def test_clipped_step_uses_posterior_mean_at_an_x0_in_range(schedule_t, dims, seed):
    """With clip_x0 the mean is mu_tilde(x_t, clamp(x0_hat, -1, 1)) = coef1 clamp(x0_hat) + coef2 x_t, worked out here;
    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) leaves [-1, 1] on both sides for a large eps_theta."""
    schedule, t = schedule_t
    shape = (len(t), *dims)
    x_t, z = gaussian(shape, seed), gaussian(shape, seed + 2)
    predicted_noise = 5 * gaussian(shape, seed + 1)
    ndim = x_t.ndim
    abar = table_at(schedule, "alphas_cumprod", t, ndim)
    x0_hat = (x_t - (1 - abar).sqrt() * predicted_noise) / abar.sqrt()
    clipped = x0_hat.clamp(-1, 1)
    coef1, coef2 = tables_at(schedule, t, ndim, "posterior_mean_coef1", "posterior_mean_coef2")
    sigma = table_at(schedule, "posterior_variance", t, ndim).sqrt()
    expected = coef1 * clipped + coef2 * x_t + sigma * z
    # x0_hat's rounding (relative u of its terms) passes through coef1 where it is not clipped.
    x0_terms = (x_t.abs() + (1 - abar).sqrt() * predicted_noise.abs()) / abar.sqrt()
    result = ddpm.sample_timestep(ConstantModel(predicted_noise), x_t, t, schedule, noise=z, clip_x0=True)
    assert_within_rounding(result, expected, coef1 * x0_terms + (coef2 * x_t).abs() + (sigma * z).abs())


@pytest.mark.parametrize("dtype", [F64, F32])
def test_reverse_step_draws_its_own_noise_with_the_posterior_variance(dtype):
    """Var(x_{t-1} | x_t) = posterior_variance[t] and E[x_{t-1} | x_t] = the lecture's mean, with the sampler's own
    noise (no noise passed), at t = 0, 1, 2, 300 and T-1. N = 100,000 draws of one pixel from one x_t: five standard
    errors, sqrt(var/N) for the mean and var sqrt(2/N) for the variance; at t = 0 no noise at all."""
    schedule = lecture_schedule(dtype=dtype)
    n = 100_000
    x_t = torch.full((n, 1, 1, 1), 0.7, dtype=dtype)
    model = ConstantModel(torch.full((1,), -0.3, dtype=dtype))
    generator = seeded(0)
    for t in (0, 1, 2, 300, 599):
        draws = ddpm.sample_timestep(model, x_t, t, schedule, generator=generator).to(F64)
        mean = ddpm.reverse_mean(x_t[:1], torch.tensor([t]), model.output.expand(1, 1, 1, 1), schedule).item()
        variance = schedule.posterior_variance[t].item()
        if t == 0:
            assert bool((draws == mean).all())
            continue
        assert abs(draws.mean().item() - mean) < 5 * math.sqrt(variance / n)
        assert abs(draws.var().item() - variance) < 5 * variance * math.sqrt(2 / n)


# ----------------------------------------------------------------------------- 5. loss


class OracleModel(torch.nn.Module):
    """eps_theta that knows x0 and so returns the true noise: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x, t):
        return ddpm.noise_from_x0(x, t, self.x0, self.schedule)


@given(schedule_and_timesteps(), image_dims, dtypes, seeds)
def test_loss_is_the_mean_squared_error_of_the_noise_at_each_images_t(schedule_t, dims, dtype, seed):
    """get_loss = mean (eps - eps_theta(x_t, t))^2, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at each image's t,
    in float32 (training's precision) whatever the inputs' dtype. The model here depends on x_t and t, so a wrong x_t
    or t shows; the bound is float32 rounding of x_t (passed through the model's factor (t+1)/8) and of the mean."""
    schedule, t = schedule_t
    assume_float32_holds(schedule, dtype)
    tables = schedule.to(dtype=dtype)
    shape = (len(t), *dims)
    x0, noise = gaussian(shape, seed, dtype), gaussian(shape, seed + 1, dtype)
    loss = ddpm.get_loss(TimestepModel(), x0, tables, t=t, noise=noise)
    assert loss.dtype == F32
    abar = table_at(schedule, "alphas_cumprod", t, x0.ndim)
    signal, noise_part = abar.sqrt() * x0.to(F64), (1 - abar).sqrt() * noise.to(F64)
    errors = noise.to(F64) - TimestepModel()(signal + noise_part, t)
    expected = (errors**2).mean().item()
    # e^2 moves by 2 |e| times e's rounding (of x_t's terms through the factor (t+1)/8, and of the cast to float32);
    # a float32 mean of n numbers adds at most n u32 of it.
    terms_of_e = TimestepModel()(signal.abs() + noise_part.abs(), t) + noise.to(F64).abs()
    magnitude = (2 * errors.abs() * terms_of_e).mean().item() + x0.numel() * expected
    assert abs(loss.item() - expected) <= ROUNDINGS * unit_roundoff(F32) * magnitude


@given(schedules(kinds=("linear",)), st.integers(1, 4), image_dims, seeds)
def test_loss_draws_t_then_the_noise_from_the_generator_one_t_per_image(schedule, batch_size, dims, seed):
    """Without t and noise, get_loss draws them from the generator in Algorithm 1's order: t ~ Uniform{0..T-1} of
    shape (B,), then eps ~ N(0, I); the oracle that returns the true noise scores 0 with whatever it draws."""
    x0 = gaussian((batch_size, *dims), seed)
    loss = ddpm.get_loss(TimestepModel(), x0, schedule, generator=seeded(seed + 1))
    generator = seeded(seed + 1)
    t = torch.randint(0, schedule.timesteps, (batch_size,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=F64)
    assert loss.item() == ddpm.get_loss(TimestepModel(), x0, schedule, t=t, noise=noise).item()
    assert ddpm.get_loss(OracleModel(x0, schedule), x0, schedule, generator=generator).item() < 1e-12


def test_loss_draws_timesteps_uniformly():
    """sample_t covers 0..T-1 uniformly: each of 10 values appears 10000 +- 5 sqrt(10000 * 0.9) times in 100000
    draws."""
    t = ddpm.sample_t(100_000, 10, "cpu", generator=seeded(0))
    counts = torch.bincount(t, minlength=10)
    assert len(counts) == 10
    assert bool(((counts - 10_000).abs() < 5 * math.sqrt(10_000 * 0.9)).all())


# ----------------------------------------------------------------------------- 6. the whole reverse chain
#
# With data x0 ~ N(mu, s^2) and the exact predictor E[eps | x_t], every reverse step is affine in x_t and in z:
# x_{t-1} = P_t x_t + Q_t + sigma_t z. The chain's output is then an affine function of x_T and of the z's that
# can be computed exactly, from the lecture's formulas written out here (not from ddpm.py), and the sampler must
# reproduce it to rounding, for every sample. Its distribution is exact too: mean and variance by recursion.


def gaussian_conditionals(x_t, abar_t, mu, s):
    """Return (E[x0 | x_t], E[eps | x_t]) for data N(mu, s^2), by Gaussian conditioning.

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps has variance v = abar s^2 + 1 - abar; Cov(x0, x_t) = sqrt(abar) s^2 and
    Cov(eps, x_t) = sqrt(1 - abar). With d = (x_t - sqrt(abar) mu) / v:
    E[x0 | x_t] = mu + sqrt(abar) s^2 d,  E[eps | x_t] = sqrt(1 - abar) d.
    """
    d = (x_t - math.sqrt(abar_t) * mu) / (abar_t * s**2 + 1 - abar_t)
    return mu + math.sqrt(abar_t) * s**2 * d, math.sqrt(1 - abar_t) * d


class GaussianDataOracle(torch.nn.Module):
    """eps_theta = E[eps | x_t] for scalar data N(mu, s^2) (gaussian_conditionals), from a list of abar_t.

    Indexes its own float64 abar table, so it shares nothing with the code under test."""

    def __init__(self, alphas_cumprod, mu, s):
        super().__init__()
        self.alphas_cumprod, self.mu, self.s = torch.tensor(alphas_cumprod, dtype=F64), mu, s

    def forward(self, x, t):
        abar = self.alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
        d = (x.to(F64) - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)
        return (1 - abar).sqrt() * d


def one_minus_running_product(betas):
    """Return [1 - abar_0, ..., 1 - abar_{T-1}] without subtracting nearly equal numbers:
    1 - abar_t = (1 - abar_{t-1}) + beta_t abar_{t-1}, a sum of positive terms, exact to a few u at every t."""
    values, one_minus, product = [], 0.0, 1.0
    for beta in betas:
        one_minus += beta * product
        product *= 1 - beta
        values.append(one_minus)
    return values


def ddpm_reference_steps(betas, mu, s):
    """Return the lecture chain's steps t = T-1 .. 0, each (mean_of_next(x), sigma), mean_of_next affine in x.

    Posterior form (Ho et al., eq. 7) at x0 = E[x0 | x_t], not the code's eq. 11:
    mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) E[x0 | x_t] + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t,
    sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t) for t >= 1, sigma_0 = 0; abar_{-1} = 1.
    """
    abar, one_minus_abar = running_product(betas), one_minus_running_product(betas)
    steps = []
    for t in reversed(range(len(betas))):
        beta, abar_t, one_minus_t = betas[t], abar[t], one_minus_abar[t]
        abar_prev, one_minus_prev = (abar[t - 1], one_minus_abar[t - 1]) if t > 0 else (1.0, 0.0)

        def mean_of_next(x, beta=beta, abar_t=abar_t, one_minus_t=one_minus_t, abar_prev=abar_prev,
                         one_minus_prev=one_minus_prev):
            x0, _ = gaussian_conditionals(x, abar_t, mu, s)
            return (beta * math.sqrt(abar_prev) * x0 + one_minus_prev * math.sqrt(1 - beta) * x) / one_minus_t

        steps.append((mean_of_next, math.sqrt(beta * one_minus_prev / one_minus_t)))
    return steps


def ddim_reference_steps(alphas_cumprod, taus, eta, mu, s):
    """Return DDIM's steps over tau (increasing) from tau[-1] down to x_0, each (mean_of_next(x), sigma).

    x_prev = sqrt(abar_prev) E[x0 | x_t] + sqrt(1 - abar_prev - sigma^2) E[eps | x_t] + sigma z   (Song et al., eq. 12)
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev), abar_prev = 1 for the last step.
    """
    steps = []
    for t, t_prev in zip(reversed(taus), reversed([None] + list(taus[:-1]))):
        abar_t = alphas_cumprod[t]
        abar_prev = 1.0 if t_prev is None else alphas_cumprod[t_prev]
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))

        def mean_of_next(x, abar_t=abar_t, abar_prev=abar_prev, sigma=sigma):
            x0, eps = gaussian_conditionals(x, abar_t, mu, s)
            return math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps

        steps.append((mean_of_next, sigma))
    return steps


def run_reference_chain(steps, x_T, noises):
    """Return (x_0 for each sample, mean, variance): x <- mean_of_next(x) + sigma z over the steps, and the exact
    distribution of x_0 for x_T ~ N(0, 1) by recursion, each step being affine: P = mean(1) - mean(0), Q = mean(0),
    m <- P m + Q, v <- P^2 v + sigma^2."""
    x, m, v = x_T.to(F64), 0.0, 1.0
    for (mean_of_next, sigma), z in zip(steps, noises):
        x = mean_of_next(x) + sigma * z.to(F64)
        slope, offset = mean_of_next(1.0) - mean_of_next(0.0), mean_of_next(0.0)
        m, v = slope * m + offset, slope**2 * v + sigma**2
    return x, m, v


def generator_draws(seed, count, shape, dtype):
    """Return the first `count` standard normal draws of `shape` from a generator seeded with seed."""
    generator = seeded(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(count)]


# n steps of ~10 roundings each; rounding errors add like a random walk, sqrt(10 n) ~ 80 for n = 600, on values
# |x| < 3, and a later step multiplies an earlier error by P_t (their product is below 1.2 for data std s <= 2).
# 80 * 3 * 1.2 ~ 300 u; with room, 2000 u: 2.2e-13 in float64 and 1.2e-4 in float32 (measured: 6e-15, 1.1e-6). A
# table or timestep shifted by one moves x_0 by ~1e-2, and a wrong variance by more.
CHAIN_ROUNDINGS = 2000

CHAIN_SHAPE = (16, 1, 2, 2)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_reverse_chain_with_the_exact_gaussian_predictor_is_the_exact_affine_map(dtype):
    """600 lecture steps (tables in dtype) with eps_theta = E[eps | x_t] for data N(0.5, 0.5^2): every sample equals
    the exact chain, computed from x_T and the sampler's noise draws (one per step, t = T-1 .. 0) to rounding.

    The exact chain's output distribution, from x_T ~ N(0, 1): mean 0.4997 and std 0.4951 (x_T still holds 4.8% of
    the signal and sigma_t^2 = posterior_variance slightly under-disperses). Started from q(x_T) instead, its mean is
    mu to 1e-12: E[x0 | x_t] makes each step's mean exact, a check of the reference itself.
    """
    mu, s = 0.5, 0.5
    betas = lecture_betas()
    steps = ddpm_reference_steps(betas, mu, s)
    x_T = gaussian(CHAIN_SHAPE, 1, dtype)
    noises = generator_draws(7, len(betas), CHAIN_SHAPE, dtype)
    expected, mean, variance = run_reference_chain(steps, x_T, noises)
    model = GaussianDataOracle(running_product(betas), mu, s)
    samples, _ = ddpm.sample(model, lecture_schedule(dtype=dtype), CHAIN_SHAPE, generator=seeded(7), x_T=x_T)
    assert samples.dtype == dtype
    assert (samples.to(F64) - expected).abs().max().item() < CHAIN_ROUNDINGS * unit_roundoff(dtype)
    assert abs(mean - 0.4997) < 1e-4 and abs(math.sqrt(variance) - 0.4951) < 1e-4
    m = math.sqrt(running_product(betas)[-1]) * mu
    for mean_of_next, _ in steps:
        m = mean_of_next(m)
    assert abs(m - mu) < 1e-12


@settings(max_examples=10)
@given(st.integers(2, 60), st.floats(-1, 1), st.floats(0.1, 2), seeds)
def test_reverse_chain_is_the_exact_affine_map_on_short_drawn_schedules(timesteps, mu, s, seed):
    """The same exact-chain property on linear schedules of T = 2 .. 60 steps (1e-4 .. 0.3) and drawn data N(mu, s^2),
    float64; there the last steps' tables differ most from their neighbours, so an index off by one shows most."""
    betas = ddpm.linear_beta_schedule(timesteps, 1e-4, 0.3).tolist()
    x_T = gaussian(CHAIN_SHAPE, seed)
    noises = generator_draws(seed + 1, timesteps, CHAIN_SHAPE, F64)
    expected, _, _ = run_reference_chain(ddpm_reference_steps(betas, mu, s), x_T, noises)
    schedule = ddpm.Schedule.from_betas(torch.tensor(betas, dtype=F64), dtype=F64)
    samples, _ = ddpm.sample(GaussianDataOracle(running_product(betas), mu, s), schedule, CHAIN_SHAPE,
                             generator=seeded(seed + 1), x_T=x_T)
    assert (samples - expected).abs().max().item() < CHAIN_ROUNDINGS * unit_roundoff(F64) * (1 + abs(mu) + s)


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


def test_reverse_chain_with_exact_predictor_recovers_two_points():
    """Non-Gaussian data: on {-1, +1} with the exact predictor, 600 steps land near -1 and +1 in about equal numbers
    (99% within 0.1 of a data point; the fraction at +1 is 1/2 within five standard errors, sqrt(0.25/N) = 0.0079).
    A sanity check that the chain denoises beyond the affine case; it is blind to small errors (an index off by one
    passes it), which the exact affine tests above catch."""
    schedule = lecture_schedule()
    n = 4000
    samples, _ = ddpm.sample(TwoPointOracle(schedule), schedule, (n, 1, 1, 1),
                             generator=seeded(0), x_T=gaussian((n, 1, 1, 1), 2))
    samples = samples.flatten()
    assert ((samples.abs() - 1).abs() < 0.1).double().mean().item() > 0.99
    assert abs((samples > 0).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)


def test_sampling_loop_visits_t_from_T_minus_1_down_to_0_once_each():
    """Algorithm 2 calls eps_theta at t = T-1, T-2, ..., 0, each once, for every image of the batch."""
    schedule = lecture_schedule(7)
    model = RecordingModel()
    ddpm.sample(model, schedule, (2, 1, 1, 1), generator=seeded(0))
    assert model.calls == [[t, t] for t in range(6, -1, -1)]


def test_sampling_loop_is_the_composition_of_sample_timestep_with_frames_and_progress():
    """sample() = sample_timestep(.., 0) o ... o sample_timestep(.., T-1) applied to x_T, x_T being the generator's
    first draw and each step's noise its next one; with clip_x0 passed to every step; frames are the x after the
    steps in frame_positions(T, K), i.e. t = 19, 14, 9, 5, 0 for T = 20, K = 5 (one frame: x_0; none by default);
    callback(step, T) after each step."""
    schedule = lecture_schedule(20, dtype=F32)
    model = TwoPointOracle(schedule)
    for clip_x0 in (False, True):
        calls = []
        result, frames = ddpm.sample(model, schedule, (3, 1, 2, 2), generator=seeded(9),
                                     clip_x0=clip_x0, num_frames=5, callback=lambda *args: calls.append(args))
        x, *noises = generator_draws(9, 21, (3, 1, 2, 2), torch.float32)
        expected_frames = []
        for t, noise in zip(range(19, -1, -1), noises):
            x = ddpm.sample_timestep(model, x, t, schedule, noise=noise, clip_x0=clip_x0)
            if t in (19, 14, 9, 5, 0):
                expected_frames.append(x)
        assert torch.equal(result, x)
        assert len(frames) == 5 and all(torch.equal(a, b) for a, b in zip(frames, expected_frames))
        assert calls == [(step, 20) for step in range(1, 21)]
    assert ddpm.sample(model, schedule, (1, 1, 1, 1))[1] == []
    x0, frames = ddpm.sample(model, schedule, (3, 1, 2, 2), generator=seeded(9), num_frames=1)
    assert len(frames) == 1 and torch.equal(frames[0], x0)


def test_frame_positions_are_evenly_spaced_from_the_first_step_to_the_last():
    """For every num_steps n in 1..40 and num_frames K in -1..45: min(max(K, 0), n) distinct positions in [0, n);
    the last step (x_0) is always kept; for K >= 2 the first is too and position k is within 1/2 of k (n-1)/(K-1)."""
    assert ddpm.frame_positions(20, 5) == {0, 5, 10, 14, 19}
    for n in range(1, 41):
        for k in range(-1, 46):
            positions = ddpm.frame_positions(n, k)
            assert len(positions) == min(max(k, 0), n) and positions <= set(range(n))
            if k >= 1:
                assert n - 1 in positions
            if 2 <= k <= n:
                assert sorted(positions) == [round(i * (n - 1) / (k - 1)) for i in range(k)]
                assert all(abs(p - i * (n - 1) / (k - 1)) <= 0.5 for i, p in enumerate(sorted(positions)))


# ----------------------------------------------------------------------------- 7. beyond the lecture: cosine, DDIM


@given(st.integers(2, 2000))
def test_cosine_schedule_follows_f_t_over_f_0(timesteps):
    """Cosine schedule: alphas_cumprod[t] = f(t+1) / f(0), f(u) = cos^2(((u/T) + s)/(1 + s) * pi/2), until betas clip
    at 0.999."""
    s = 0.008
    schedule = ddpm.Schedule.from_betas(ddpm.cosine_beta_schedule(timesteps), dtype=F64)

    def f(u):
        return math.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(timesteps)], dtype=F64)
    clipped = schedule.betas >= 0.999
    unclipped_prefix = int(clipped.long().argmax()) if bool(clipped.any()) else timesteps
    assert bool((schedule.betas <= 0.999).all())
    prefix = slice(0, unclipped_prefix)
    torch.testing.assert_close(schedule.alphas_cumprod[prefix], expected[prefix], rtol=1e-9, atol=1e-12)


def test_cosine_schedule_defaults_pinned_by_hand():
    """Nichol and Dhariwal's s = 0.008 and max_beta = 0.999, by hand for T = 4: the angles ((u/4) + 0.008)/1.008 * pi/2
    are 0.0124666, 0.4020491, 0.7916315, 1.1812139, pi/2, so f = cos^2 = 0.9998446, 0.8468805, 0.4937668, 0.1442445, 0;
    betas = 1 - f(u+1)/f(u) = 0.1529878, 0.4169581, 0.7078587, and 1 - 0 = 1 clipped to 0.999. For T = 1000,
    beta_0 = 1 - cos^2(0.0140250) / cos^2(0.0124666) = 4.12842e-5."""
    by_hand = torch.tensor([0.1529878, 0.4169581, 0.7078587, 0.999], dtype=F64)
    torch.testing.assert_close(ddpm.cosine_beta_schedule(4), by_hand, rtol=1e-6, atol=0)
    assert ddpm.cosine_beta_schedule(4)[-1].item() == 0.999
    assert math.isclose(ddpm.cosine_beta_schedule(1000)[0].item(), 4.12842e-5, rel_tol=1e-5)


def test_ddim_timesteps_start_at_T_minus_1_and_are_evenly_spaced_for_every_step_count():
    """For every T in 1..120 and every steps in 1..T: `steps` distinct increasing timesteps, the last T-1 (x_T is pure
    noise only there), the first 0 when steps >= 2, tau_k within 1/2 of k (T-1)/(steps-1). Outside 1..T: refused."""
    for timesteps in range(1, 121):
        for steps in range(1, timesteps + 1):
            taus = ddpm.ddim_timesteps(timesteps, steps)
            assert len(taus) == steps and taus[-1] == timesteps - 1
            assert all(a < b for a, b in zip(taus, taus[1:]))
            if steps >= 2:
                assert taus[0] == 0
                assert all(abs(tau - k * (timesteps - 1) / (steps - 1)) <= 0.5 for k, tau in enumerate(taus))
        for wrong in (0, timesteps + 1):
            with pytest.raises(ValueError, match="DDIM steps must be between 1 and"):
                ddpm.ddim_timesteps(timesteps, wrong)


@given(st.integers(121, 5000), st.data())
def test_ddim_timesteps_properties_hold_for_long_schedules(timesteps, data):
    """The same properties for T up to 5000, steps drawn in 1..T (1, 2, T-1 and T among hypothesis' favourites)."""
    steps = data.draw(st.integers(1, timesteps))
    taus = ddpm.ddim_timesteps(timesteps, steps)
    assert len(taus) == steps and taus[-1] == timesteps - 1
    assert all(a < b for a, b in zip(taus, taus[1:]))
    assert steps == 1 or all(abs(tau - k * (timesteps - 1) / (steps - 1)) <= 0.5 for k, tau in enumerate(taus))


def test_ddim_timesteps_small_cases_by_hand():
    """ddim_timesteps(600, 1) = [599] (the review's bug: it was [0]); (600, 2) = [0, 599]; (10, 4) = [0, 3, 6, 9];
    (10, 10) = 0..9; (600, 50) has stride 599/49 = 12.2."""
    assert ddpm.ddim_timesteps(600, 1) == [599]
    assert ddpm.ddim_timesteps(600, 2) == [0, 599]
    assert ddpm.ddim_timesteps(10, 4) == [0, 3, 6, 9]
    assert ddpm.ddim_timesteps(10, 10) == list(range(10))
    assert ddpm.ddim_timesteps(600, 50)[:3] == [0, 12, 24]


@given(schedule_and_timesteps(min_t=1), image_dims, seeds)
def test_ddim_with_eta_one_over_all_steps_is_the_ddpm_posterior(schedule_t, dims, seed):
    """With eta = 1 and t_prev = t - 1, the DDIM update is mu_tilde(x_t, x0) + sqrt(posterior_variance_t) z, for x_t
    made from x0 and the true noise at t. (ddim_step takes one int t: each drawn t is checked on its own image.)"""
    schedule, t = schedule_t
    shape = (len(t), *dims)
    x0, noise, z = gaussian(shape, seed), gaussian(shape, seed + 1), gaussian(shape, seed + 2)
    x_t, _ = diffuse(x0, t, schedule, noise=noise)
    ndim = x0.ndim
    coef1, coef2 = tables_at(schedule, t, ndim, "posterior_mean_coef1", "posterior_mean_coef2")
    sigma = table_at(schedule, "posterior_variance", t, ndim).sqrt()
    abar = table_at(schedule, "alphas_cumprod", t, ndim)
    # x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar) carries the rounding of x_t's terms and its own over sqrt(abar);
    # DDIM's sigma and sqrt(1 - abar_prev - sigma^2) subtract where the tables do not (the floor).
    x0_terms = (abar.sqrt() * x0.abs() + 2 * (1 - abar).sqrt() * noise.abs()) / abar.sqrt()
    magnitude = coef1 * x0_terms + (coef2 * x_t).abs() + (sigma * z).abs() + (1 - abar).sqrt() * noise.abs()
    for b, step in enumerate(t.tolist()):
        image = slice(b, b + 1)
        model = ConstantModel(noise[image])
        ddim = ddpm.ddim_step(model, x_t[image], step, step - 1, schedule, eta=1.0, noise=z[image])
        expected = coef1[b] * x0[b] + coef2[b] * x_t[b] + sigma[b] * z[b]
        assert_within_rounding(ddim[0], expected, magnitude[b], floor=ROUNDINGS * cancellation(schedule))


@settings(max_examples=20)
@given(st.sampled_from([50, 600]), st.integers(1, 50), st.sampled_from([0.0, 0.4, 1.0]), st.floats(-1, 1), seeds)
def test_ddim_chain_with_the_exact_gaussian_predictor_is_the_exact_affine_map(timesteps, steps, eta, mu, seed):
    """DDIM over a strided tau of the lecture-like linear schedule (T = 50 or 600), eta = 0, 0.4 or 1, data
    N(mu, 0.6^2): every sample equals the exact chain computed from x_T and the sampler's draws (one per step) to
    rounding. The last step lands on abar = 1 (x_0 = E[x0 | x_tau_0]); with eta = 0, a second generator gives the
    same samples. A mean started at q(x_T)'s stays mu exactly: a check of the reference."""
    s = 0.6
    betas = lecture_betas(timesteps)
    abar = running_product(betas)
    taus = ddpm.ddim_timesteps(timesteps, min(steps, timesteps))
    reference_steps = ddim_reference_steps(abar, taus, eta, mu, s)
    x_T = gaussian(CHAIN_SHAPE, seed)
    expected, _, _ = run_reference_chain(reference_steps, x_T, generator_draws(seed + 1, len(taus), CHAIN_SHAPE, F64))
    model, schedule = GaussianDataOracle(abar, mu, s), lecture_schedule(timesteps)
    samples, _ = ddpm.ddim_sample(model, schedule, CHAIN_SHAPE, steps=len(taus), eta=eta, x_T=x_T,
                                  generator=seeded(seed + 1))
    # The code's x0_hat divides x_t's terms by sqrt(abar_t), the reference's does not: rounding grows by
    # 1/sqrt(abar_{T-1}).
    tolerance = CHAIN_ROUNDINGS * unit_roundoff(F64) * (1 + abs(mu)) / math.sqrt(abar[-1])
    assert (samples - expected).abs().max().item() < tolerance
    if eta == 0:
        again, _ = ddpm.ddim_sample(model, schedule, CHAIN_SHAPE, steps=len(taus), x_T=x_T, generator=seeded(seed))
        assert torch.equal(again, samples)
    m = math.sqrt(abar[-1]) * mu
    for mean_of_next, _ in reference_steps:
        m = mean_of_next(m)
    assert abs(m - mu) < 1e-12


def test_ddim_chain_exact_in_float32_over_fifty_steps():
    """DDIM, eta = 0.5, 50 of the 600 lecture steps, tables in float32: the exact chain to CHAIN_ROUNDINGS u32, times
    1/sqrt(abar_{T-1}) = 21 for the code's division of x_t's terms by sqrt(abar_t)."""
    mu, s = -0.4, 0.6
    betas = lecture_betas()
    abar = running_product(betas)
    taus = ddpm.ddim_timesteps(600, 50)
    x_T = gaussian(CHAIN_SHAPE, 3, F32)
    noises = generator_draws(4, 50, CHAIN_SHAPE, F32)
    expected, _, _ = run_reference_chain(ddim_reference_steps(abar, taus, 0.5, mu, s), x_T, noises)
    model, schedule = GaussianDataOracle(abar, mu, s), lecture_schedule(dtype=F32)
    samples, _ = ddpm.ddim_sample(model, schedule, CHAIN_SHAPE, steps=50, eta=0.5,
                                  x_T=x_T, generator=seeded(4))
    assert samples.dtype == F32
    assert (samples.to(F64) - expected).abs().max().item() < CHAIN_ROUNDINGS * unit_roundoff(F32) / math.sqrt(abar[-1])


def test_ddim_with_eta_one_over_all_steps_equals_ddpm_step_by_step():
    """ddim_sample(eta = 1, steps = T) and sample(), from the same x_T and the same generator, agree after every step
    (frames at all T steps), to rounding: DDIM with eta = 1 and t_prev = t - 1 is the DDPM step, noise included."""
    schedule = lecture_schedule(40)
    model = GaussianDataOracle(running_product(lecture_betas(40)), 0.3, 0.5)
    x_T = gaussian(CHAIN_SHAPE, 5)
    _, ddpm_frames = ddpm.sample(model, schedule, CHAIN_SHAPE, generator=seeded(6), x_T=x_T, num_frames=40)
    _, ddim_frames = ddpm.ddim_sample(model, schedule, CHAIN_SHAPE, steps=40, eta=1.0, generator=seeded(6), x_T=x_T,
                                      num_frames=40)
    assert len(ddpm_frames) == len(ddim_frames) == 40
    for ddpm_x, ddim_x in zip(ddpm_frames, ddim_frames):
        assert (ddpm_x - ddim_x).abs().max().item() < CHAIN_ROUNDINGS * unit_roundoff(F64)


@given(schedule_and_timesteps(min_t=1), image_dims, seeds, st.data())
def test_ddim_clipped_step_recomputes_the_noise_from_the_clipped_x0(schedule_t, dims, seed, data):
    """With clip_x0, the step to t_prev = -1 returns x0_c = clamp(x0_hat, -1, 1), and the step to any s < t (eta = 0)
    returns sqrt(abar_s) x0_c + sqrt(1 - abar_s) eps_used. Solved for eps_used, x_t = sqrt(abar_t) x0_c
    + sqrt(1 - abar_t) eps_used must hold: the noise that goes on is the one the clipped x0 implies, not the model's."""
    schedule, t = schedule_t
    step = int(t.max())
    s = data.draw(st.integers(0, step - 1))
    shape = (1, *dims)
    x_t, predicted_noise = gaussian(shape, seed), 5 * gaussian(shape, seed + 1)  # x0_hat leaves [-1, 1] on both sides
    model = ConstantModel(predicted_noise)
    abar_t, abar_s = schedule.alphas_cumprod[step].item(), schedule.alphas_cumprod[s].item()
    x0_hat = (x_t - math.sqrt(1 - abar_t) * predicted_noise) / math.sqrt(abar_t)
    x0_clipped = ddpm.ddim_step(model, x_t, step, -1, schedule, clip_x0=True)
    assert bool((x0_clipped.abs() <= 1).all())
    x0_terms = (x_t.abs() + math.sqrt(1 - abar_t) * predicted_noise.abs()) / math.sqrt(abar_t)
    assert_within_rounding(x0_clipped, x0_hat.clamp(-1, 1), x0_terms)
    x_s = ddpm.ddim_step(model, x_t, step, s, schedule, clip_x0=True)
    eps_used = (x_s - math.sqrt(abar_s) * x0_clipped) / math.sqrt(1 - abar_s)
    rebuilt = math.sqrt(abar_t) * x0_clipped + math.sqrt(1 - abar_t) * eps_used
    # eps_used is x_s's and x0_c's rounding over sqrt(1 - abar_s), times sqrt(1 - abar_t) <= 1 in rebuilt.
    magnitude = (x_s.abs() + math.sqrt(abar_s) * x0_clipped.abs()) / math.sqrt(1 - abar_s) + x_t.abs() + x0_terms
    assert_within_rounding(rebuilt, x_t, magnitude)


@given(schedule_and_timesteps(min_t=1), image_dims, seeds)
def test_ddim_final_step_lands_on_abar_one_and_eta_above_one_drops_the_direction(schedule_t, dims, seed):
    """t_prev = -1 means abar_prev = 1: the step returns x0_hat exactly as predict_x0_from_noise, whatever eta and z
    (sigma = 0 there). With eta = 3 on a step t -> t-1: x_prev = sqrt(abar_{t-1}) x0_hat + sqrt(max(1 - abar_{t-1}
    - sigma^2, 0)) eps + sigma z, finite; at t = 1 (in every drawn batch) sigma^2 > 1 - abar_0, the direction drops."""
    schedule, t = schedule_t
    shape = (1, *dims)
    x_t, predicted_noise, z = gaussian(shape, seed), gaussian(shape, seed + 1), gaussian(shape, seed + 2)
    model = ConstantModel(predicted_noise)
    for step in t.tolist():
        x0_hat = ddpm.predict_x0_from_noise(x_t, torch.tensor([step]), predicted_noise, schedule)
        for eta in (0.0, 1.0):
            assert torch.equal(ddpm.ddim_step(model, x_t, step, -1, schedule, eta=eta, noise=z), x0_hat)
        abar_t, abar_prev = schedule.alphas_cumprod[step].item(), schedule.alphas_cumprod[step - 1].item()
        sigma = 3 * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        direction = math.sqrt(max(1 - abar_prev - sigma**2, 0.0))
        assert step != 1 or direction == 0.0
        result = ddpm.ddim_step(model, x_t, step, step - 1, schedule, eta=3.0, noise=z)
        x0_terms = (x_t.abs() + math.sqrt(1 - abar_t) * predicted_noise.abs()) / math.sqrt(abar_t)
        expected = math.sqrt(abar_prev) * x0_hat + direction * predicted_noise + sigma * z
        magnitude = math.sqrt(abar_prev) * x0_terms + math.sqrt(1 - abar_prev) * predicted_noise.abs() + sigma * z.abs()
        assert_within_rounding(result, expected, magnitude, floor=ROUNDINGS * cancellation(schedule))


def test_ddim_sample_visits_tau_frames_and_progress_and_defaults():
    """ddim_sample calls eps_theta at reversed(tau), steps to tau_{k-1} and last to x_0; frames are the x after the
    steps in frame_positions(steps, K) (one frame: x_0); callback(step, steps) after each. Defaults: 50 steps, eta = 0,
    no clipping, no frames;
    x_T the generator's first draw. One step starts at T-1 (the review's bug: it started at t = 0)."""
    schedule = lecture_schedule(600, dtype=F32)
    recording = RecordingModel()
    _, frames = ddpm.ddim_sample(recording, schedule, (2, 1, 1, 1))
    assert recording.calls == [[t, t] for t in reversed(ddpm.ddim_timesteps(600, 50))] and frames == []
    recording = RecordingModel()
    ddpm.ddim_sample(recording, schedule, (1, 1, 1, 1), steps=1)
    assert recording.calls == [[599]]
    model = TwoPointOracle(schedule)
    calls = []
    result, frames = ddpm.ddim_sample(model, schedule, (3, 1, 2, 2), steps=7, eta=0.5, clip_x0=True, num_frames=3,
                                      generator=seeded(2), callback=lambda *args: calls.append(args))
    x, *noises = generator_draws(2, 8, (3, 1, 2, 2), torch.float32)
    taus = ddpm.ddim_timesteps(600, 7)
    expected_frames = []
    for position, (t, t_prev, noise) in enumerate(zip(reversed(taus), reversed([-1] + taus[:-1]), noises)):
        x = ddpm.ddim_step(model, x, t, t_prev, schedule, eta=0.5, noise=noise, clip_x0=True)
        if position in (0, 3, 6):
            expected_frames.append(x)
    assert torch.equal(result, x)
    assert len(frames) == 3 and all(torch.equal(a, b) for a, b in zip(frames, expected_frames))
    assert calls == [(step, 7) for step in range(1, 8)]
    one_frame, frames = ddpm.ddim_sample(model, schedule, (3, 1, 2, 2), steps=7, num_frames=1)
    assert len(frames) == 1 and torch.equal(frames[0], one_frame)
    x_T = gaussian((2, 1, 1, 1), 0, F32)
    zero = ConstantModel(torch.zeros(1))  # x0_hat = x_t / sqrt(abar_t) leaves [-1, 1]: clipping would show
    default, _ = ddpm.ddim_sample(zero, schedule, x_T.shape, x_T=x_T, generator=seeded(1))
    taus = ddpm.ddim_timesteps(600, 50)
    x = x_T
    for t, t_prev in zip(reversed(taus), reversed([-1] + taus[:-1])):
        x = ddpm.ddim_step(zero, x, t, t_prev, schedule, eta=0.0, noise=gaussian(x.shape, t, F32), clip_x0=False)
    assert torch.equal(default, x)


# ----------------------------------------------------------------------------- beyond the lecture: Min-SNR weights


@given(schedule_and_timesteps(), st.floats(min_value=0.01, max_value=1e4))
def test_min_snr_weights_are_the_smaller_of_snr_and_gamma_over_snr(schedule_t, gamma):
    """w_t = min(SNR_t, gamma) / SNR_t with SNR_t = abar_t / (1 - abar_t), from the running product of the betas:
    exactly 1 where SNR_t <= gamma, gamma / SNR_t < 1 above. abar_t carries (t + 1) roundings and 1 - abar_t the
    cancellation of the subtraction, so w agrees to T u + cancellation, relatively; a shifted t, SNR inverted or
    gamma misplaced moves it by a factor."""
    schedule, t = schedule_t
    abar = running_product(schedule.betas.tolist())
    weights = ddpm.min_snr_weights(schedule, t, gamma)
    assert weights.shape == t.shape
    tolerance = ROUNDINGS * (schedule.timesteps * unit_roundoff(F64) + cancellation(schedule))
    for step, weight in zip(t.tolist(), weights.tolist()):
        snr = abar[step] / (1 - abar[step])
        expected = min(snr, gamma) / snr
        assert abs(weight - expected) <= tolerance * expected, (step, weight, expected)
        assert 0 < weight <= 1
        if snr < gamma * (1 - tolerance):
            assert weight == 1.0


@given(schedule_and_timesteps(), image_dims, dtypes, seeds)
def test_weighted_loss_is_the_mean_over_images_of_each_weight_times_its_squared_error(schedule_t, dims, dtype, seed):
    """get_loss(weights=w) = mean_b w_b mean_pixels (eps - eps_theta(x_t, t))^2 at each image's t, in float32; with
    every w_b = 1 it is L_simple. Weights drawn in [0, 2), so a weight applied to the wrong image, a sum for the
    mean, or a reduction over the whole batch before weighting shows; the bound is the float32 rounding of the
    unweighted test, weighted."""
    schedule, t = schedule_t
    assume_float32_holds(schedule, dtype)
    tables = schedule.to(dtype=dtype)
    shape = (len(t), *dims)
    x0, noise = gaussian(shape, seed, dtype), gaussian(shape, seed + 1, dtype)
    weights = 2 * torch.rand(len(t), generator=seeded(seed + 2), dtype=F64)
    loss = ddpm.get_loss(TimestepModel(), x0, tables, t=t, noise=noise, weights=weights.to(dtype))
    assert loss.dtype == F32
    abar = table_at(schedule, "alphas_cumprod", t, x0.ndim)
    signal, noise_part = abar.sqrt() * x0.to(F64), (1 - abar).sqrt() * noise.to(F64)
    errors = noise.to(F64) - TimestepModel()(signal + noise_part, t)
    expected = (weights * (errors**2).flatten(1).mean(dim=1)).mean().item()
    terms_of_e = TimestepModel()(signal.abs() + noise_part.abs(), t) + noise.to(F64).abs()
    per_image_error = (errors**2 + 2 * errors.abs() * terms_of_e).flatten(1).mean(dim=1)
    magnitude = (weights * per_image_error).mean().item() * (1 + x0.numel())
    assert abs(loss.item() - expected) <= ROUNDINGS * unit_roundoff(F32) * magnitude
    ones = ddpm.get_loss(TimestepModel(), x0, tables, t=t, noise=noise, weights=torch.ones(len(t), dtype=dtype))
    plain = ddpm.get_loss(TimestepModel(), x0, tables, t=t, noise=noise)
    unweighted_magnitude = (errors**2 + 2 * errors.abs() * terms_of_e).mean().item() * (1 + x0.numel())
    assert abs(ones.item() - plain.item()) <= ROUNDINGS * unit_roundoff(F32) * unweighted_magnitude


# ----------------------------------------------------------------------------- beyond the lecture: second order


def lambdas_by_running_product(schedule):
    """Return [lambda_0, ..., lambda_{T-1}], lambda_t = log(abar_t / (1 - abar_t)) / 2, from the betas by a Python
    loop (running_product), sharing nothing with ddpm.half_log_snrs."""
    return [0.5 * math.log(abar / (1 - abar)) for abar in running_product(schedule.betas.tolist())]


@st.composite
def three_timesteps(draw):
    """A float64 schedule with T >= 3 and t_before > t > t_prev >= 0 in it."""
    schedule = draw(schedules())
    assume(schedule.timesteps >= 3)
    t_prev, t, t_before = sorted(draw(st.lists(st.integers(0, schedule.timesteps - 1), min_size=3, max_size=3,
                                               unique=True)))
    return schedule, t_before, t, t_prev


@given(three_timesteps(), image_dims, seeds)
def test_second_order_update_is_dpm_solver_plus_plus_in_its_log_snr_form(steps, dims, seed):
    """The DDIM update at D = multistep_x0(...) and the eps D implies is DPM-Solver++(2M) as Lu et al. (2022) write
    it, with alpha = sqrt(abar), sigma = sqrt(1 - abar), h = lambda_prev - lambda_t, r = h_before / h:

    D = (1 + 1/(2r)) x0 - 1/(2r) x0_before
    eta = 0 (ODE):       x_prev = sigma_prev / sigma_t * x_t + alpha_prev (1 - e^-h) D
    eta = 1 (SDE):       x_prev = sigma_prev / sigma_t * e^-h * x_t + alpha_prev (1 - e^-2h) D
                                  + sigma_prev sqrt(1 - e^-2h) z
    computed here from lambdas of the running product of the betas, in float64. The code gets there another way
    (sqrt(abar) and sqrt(1 - abar - sigma^2) of its tables, lambda from its cumprod table), so the two agree to the
    rounding of lambda: each lambda carries an absolute error up to about (T u + cancellation) (the product's t + 1
    roundings, then log of 1 - abar), which the differences h and h_before turn into a relative error of that over
    |h| and |h_before|; 32 of those cover both sides with room. A wrong r (inverted, or h for h_before), a dropped
    half or a wrong coefficient moves the result by a fraction of its magnitude, orders of magnitude above that.
    """
    schedule, t_before, t, t_prev = steps
    shape = (1, *dims)
    x_t, x0, x0_before, z = (gaussian(shape, seed + k) for k in range(4))
    lambdas = lambdas_by_running_product(schedule)
    abar = running_product(schedule.betas.tolist())
    lambda_error = ROUNDINGS * (schedule.timesteps * unit_roundoff(F64) + cancellation(schedule))
    code_lambdas = ddpm.half_log_snrs(schedule)
    assert len(code_lambdas) == schedule.timesteps
    for step in (t_before, t, t_prev):
        assert abs(code_lambdas[step] - lambdas[step]) <= lambda_error * (1 + abs(lambdas[step]))
    h, h_before = lambdas[t_prev] - lambdas[t], lambdas[t] - lambdas[t_before]
    r = h_before / h
    floor = 2 * lambda_error * (1 + max(abs(value) for value in lambdas)) * (1 / h + 1 / h_before)
    expected_d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_before
    d = ddpm.multistep_x0(x0, x0_before, t_before, t, t_prev, code_lambdas)
    d_magnitude = (1 + 1 / (2 * r)) * x0.abs() + 1 / (2 * r) * x0_before.abs()
    assert_within_rounding(d, expected_d, d_magnitude, floor=floor)
    sigma_t, sigma_prev, alpha_prev = math.sqrt(1 - abar[t]), math.sqrt(1 - abar[t_prev]), math.sqrt(abar[t_prev])
    eps = ddpm.noise_from_x0(x_t, torch.tensor([t]), d, schedule)
    ode = ddpm.ddim_update(x_t, t, t_prev, d, eps, schedule, eta=0.0, noise=z)
    expected_ode = sigma_prev / sigma_t * x_t + alpha_prev * -math.expm1(-h) * expected_d
    magnitude = (sigma_prev / sigma_t * x_t.abs() + alpha_prev * d_magnitude
                 + sigma_prev * (x_t.abs() + math.sqrt(abar[t]) * d_magnitude) / sigma_t)
    assert_within_rounding(ode, expected_ode, magnitude, floor=floor + ROUNDINGS * cancellation(schedule))
    sde = ddpm.ddim_update(x_t, t, t_prev, d, eps, schedule, eta=1.0, noise=z)
    expected_sde = (sigma_prev / sigma_t * math.exp(-h) * x_t + alpha_prev * -math.expm1(-2 * h) * expected_d
                    + sigma_prev * math.sqrt(-math.expm1(-2 * h)) * z)
    # Song et al.'s sqrt(1 - abar_prev - sigma^2), as the code writes it, cancels where sigma^2 nearly equals
    # 1 - abar_prev (eta = 1 and abar_t << abar_prev): the difference's absolute error delta = 32 u (1 - abar_prev)
    # moves the coefficient, whose exact value is sigma_prev^2 sqrt(abar_t / abar_prev) / sigma_t, by at most
    # min(sqrt(delta), delta / (2 coefficient)), times |eps|.
    delta = ROUNDINGS * unit_roundoff(F64) * (1 - abar[t_prev])
    coefficient = (1 - abar[t_prev]) * math.sqrt(abar[t] / abar[t_prev]) / sigma_t
    cancelled = min(math.sqrt(delta), delta / (2 * coefficient)) * eps.abs()
    sde_magnitude = magnitude + sigma_prev * z.abs()
    assert_within_rounding(sde, expected_sde, sde_magnitude,
                           floor=floor + ROUNDINGS * cancellation(schedule) + cancelled / sde_magnitude)


class SmoothX0Model(torch.nn.Module):
    """eps_theta whose x0 prediction depends on t alone, smoothly in lambda: x0_hat(lambda) = a + b e^-lambda.

    The probability-flow ODE then has the closed-form solution (Lu et al., 2022, eq. 9, integrated by hand)
    x_t / sigma_t = x_s / sigma_s + a (e^lambda_t - e^lambda_s) + b (lambda_t - lambda_s).
    Uses its own float64 abar and lambda tables (running_product)."""

    def __init__(self, schedule, a, b):
        super().__init__()
        self.abar = running_product(schedule.betas.tolist())
        self.lambdas, self.a, self.b = lambdas_by_running_product(schedule), a, b

    def x0(self, t):
        return self.a + self.b * math.exp(-self.lambdas[t])

    def forward(self, x, t):
        (step,) = set(t.tolist())
        return (x - math.sqrt(self.abar[step]) * self.x0(step)) / math.sqrt(1 - self.abar[step])

    def exact(self, x_s, s, t):
        """Return x_t on the ODE's solution through x_s at s."""
        sigma = [math.sqrt(1 - abar) for abar in (self.abar[s], self.abar[t])]
        lam_s, lam_t = self.lambdas[s], self.lambdas[t]
        return sigma[1] * (x_s / sigma[0] + self.a * (math.exp(lam_t) - math.exp(lam_s)) + self.b * (lam_t - lam_s))


def test_second_order_sampler_converges_at_second_order_where_ddim_converges_at_first():
    """Deterministic (eta = 0) chains from x_T at T-1 to t = 0 (the state before the last step, frames[-2]) of the
    lecture's schedule, against the ODE's exact solution for the SmoothX0Model:

    doubling the steps (100 -> 200) halves DDIM's error (ratio 2 for order 1: measured 2.1) and divides order 2's
    by more than 3 (4 in the limit, measured 3.4: the first step is first order and the steps are even in t, not in
    lambda). With b = 0 (x0_hat constant) both are exact to rounding: DDIM's own property, which the correction
    keeps because it vanishes when x0_hat does not change.
    """
    schedule = lecture_schedule(600)
    x_T = torch.tensor([[[[0.7]]]], dtype=F64)

    def error(model, steps, order):
        _, frames = ddpm.ddim_sample(model, schedule, x_T.shape, steps=steps, x_T=x_T, order=order, num_frames=steps)
        return abs(frames[-2].item() - model.exact(0.7, 599, 0))

    smooth = SmoothX0Model(schedule, a=0.3, b=-0.7)
    first = [error(smooth, steps, 1) for steps in (100, 200)]
    second = [error(smooth, steps, 2) for steps in (100, 200)]
    assert 1.7 < first[0] / first[1] < 2.5
    assert second[0] / second[1] > 3
    assert second[1] < first[1] / 2
    constant = SmoothX0Model(schedule, a=0.3, b=0.0)
    for order in (1, 2):
        assert error(constant, 50, order) < 1e-12


@pytest.mark.parametrize("clip", [True, False], ids=["two_point_clipped", "smooth"])
def test_second_order_sample_is_first_order_at_its_first_and_last_step_and_multistep_between(clip):
    """ddim_sample(order=2): step 1 is ddim_step (no earlier x0_hat); steps 2 .. S-1 are ddim_update at
    D = multistep_x0(x0_hat, the previous step's x0_hat) with eps from D (D differs from x0_hat at each of them, so
    each shows); the last step, to abar = 1, is ddim_step again. With clipping (the two-point oracle), the clipped
    x0_hat is what is remembered; without (the smooth model), the raw one. Two images of three channels, so that a
    timestep batch of the wrong length cannot broadcast. Other orders are refused, as is a multistep_x0 whose
    timesteps are not t_before > t > t_prev >= 0; ddim_denoise and ddim_update default to no clipping and eta = 0."""
    schedule = lecture_schedule(600, dtype=F32)
    model = TwoPointOracle(schedule) if clip else SmoothX0Model(schedule, a=0.3, b=-0.7)
    result, frames = ddpm.ddim_sample(model, schedule, (2, 3, 2, 2), steps=7, eta=0.5, clip_x0=clip, num_frames=7,
                                      generator=seeded(4), order=2)
    x, *noises = generator_draws(4, 8, (2, 3, 2, 2), torch.float32)
    taus = ddpm.ddim_timesteps(600, 7)
    pairs = list(zip(reversed(taus), reversed([-1] + taus[:-1])))
    expected_frames, x0_before = [], None
    for position, ((t, t_prev), noise) in enumerate(zip(pairs, noises)):
        x0, eps = ddpm.ddim_denoise(model, x, t, schedule, clip_x0=clip)
        if position in (0, 6):
            x_next = ddpm.ddim_step(model, x, t, t_prev, schedule, eta=0.5, noise=noise, clip_x0=clip)
        else:
            d = ddpm.multistep_x0(x0, x0_before, pairs[position - 1][0], t, t_prev, ddpm.half_log_snrs(schedule))
            assert not torch.equal(d, x0)
            eps_d = ddpm.noise_from_x0(x, torch.full((2,), t), d, schedule)
            x_next = ddpm.ddim_update(x, t, t_prev, d, eps_d, schedule, eta=0.5, noise=noise)
        x, x0_before = x_next, x0
        expected_frames.append(x)
    assert torch.equal(result, x) and all(torch.equal(a, b) for a, b in zip(frames, expected_frames))
    first_order, _ = ddpm.ddim_sample(model, schedule, (2, 3, 2, 2), steps=7, eta=0.5, clip_x0=clip,
                                      generator=seeded(4))
    assert not torch.equal(first_order, result)
    with pytest.raises(ValueError, match="order must be 1"):
        ddpm.ddim_sample(model, schedule, (1, 1, 1, 1), steps=3, order=3)
    for t_before, t, t_prev in ((5, 5, 1), (5, 3, 4), (5, 3, 3), (5, 3, -1)):
        with pytest.raises(ValueError, match="t_before > t > t_prev >= 0"):
            ddpm.multistep_x0(x0, x0, t_before, t, t_prev, ddpm.half_log_snrs(schedule))
    far = torch.full((1, 1, 1, 1), 3.0)  # x0_hat = 3 / sqrt(abar_t) under eps = 0: clipping would show
    zero = ConstantModel(torch.zeros(1))
    x0_default, eps_default = ddpm.ddim_denoise(zero, far, 300, schedule)
    assert torch.equal(x0_default, ddpm.predict_x0_from_noise(far, torch.tensor([300]), torch.zeros(1), schedule))
    assert x0_default.item() > 1 and torch.equal(eps_default, torch.zeros_like(far))
    z = torch.ones_like(far)
    assert torch.equal(ddpm.ddim_update(far, 300, 200, x0_default, eps_default, schedule, noise=z),
                       ddpm.ddim_update(far, 300, 200, x0_default, eps_default, schedule, eta=0.0, noise=z))
    assert not torch.equal(ddpm.ddim_update(far, 300, 200, x0_default, eps_default, schedule, eta=1.0, noise=z),
                           ddpm.ddim_update(far, 300, 200, x0_default, eps_default, schedule, eta=0.0, noise=z))


class HostReads(TorchDispatchMode):
    """Record, in order, the network's calls ("model") and every number read back from a tensor ("read":
    aten._local_scalar_dense, behind .item(), float(t), int(t) and bool(t)). On a GPU each read waits for all the
    work queued before it, so a read inside the chain stalls every step."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append("read")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "fast, second order", "ddpm, clipped", "fast, second order, clipped"])
def test_no_sampler_reads_a_number_back_from_the_device_once_its_chain_has_started(sampler):
    """From the first network call to the end, the samplers read nothing back from a tensor (every step's numbers
    stay on the device), so on a GPU the chain's steps queue without waiting. The recorder sees reads: a float()
    of a table entry made inside the loop (as half_log_snrs once was) would show as "read" after "model"."""
    schedule = lecture_schedule(60, dtype=F32)
    reads = HostReads()
    linear = torch.nn.Conv2d(1, 1, kernel_size=1)

    def model(x, t):
        reads.events.append("model")
        return linear(x) + 1e-3 * t.reshape(-1, 1, 1, 1)

    with reads:
        if sampler.startswith("ddpm"):
            ddpm.sample(model, schedule, (2, 1, 4, 4), generator=seeded(0), clip_x0="clipped" in sampler)
        else:
            ddpm.ddim_sample(model, schedule, (2, 1, 4, 4), steps=6, eta=1.0 if "fast" in sampler else 0.0,
                             generator=seeded(0), clip_x0="clipped" in sampler, order=2 if "second" in sampler else 1)
    first_call = reads.events.index("model")
    assert reads.events[first_call:].count("model") == (60 if sampler.startswith("ddpm") else 6)
    assert "read" not in reads.events[first_call:]
    with reads:  # the recorder is not blind to reads
        float(schedule.alphas_cumprod[5])
    assert reads.events[-1] == "read"
