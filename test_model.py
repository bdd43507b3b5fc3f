"""Tests of unet.py: shapes, the timestep embedding, that t and every parameter are used, the full-resolution skip,
that an image's prediction does not depend on the rest of its batch, the image-size check, that the network can fit
a batch, and bfloat16 autocast with channels_last.

Tiny widths and small images keep the file fast on two CPU cores; the properties do not depend on size.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from test_math import HostReads
from unet import SimpleUnet, SinusoidalPositionEmbeddings, count_parameters, group_norm_groups, size_multiple

NUM_TIMESTEPS = 1000

timesteps = st.integers(0, NUM_TIMESTEPS - 1)
timestep_lists = st.lists(timesteps, min_size=1, max_size=8)
embedding_dims = st.integers(2, 64).map(lambda half: 2 * half)
tiny_widths = st.sampled_from([(8,), (8, 16), (16, 8), (8, 16, 32), (12, 24)])
image_channel_counts = st.sampled_from([1, 3])
blocks_per_level_counts = st.sampled_from([1, 2])
batch_sizes = st.integers(1, 3)
seeds = st.integers(0, 2**31 - 1)


@st.composite
def unet_configs(draw):
    """Draw (image_channels, widths, blocks_per_level, image size): the size a multiple of 2**(levels - 1)."""
    widths = draw(tiny_widths)
    factor = 2 ** (len(widths) - 1)
    size = factor * draw(st.integers(1, max(1, 16 // factor)))
    return draw(image_channel_counts), widths, draw(blocks_per_level_counts), size


@st.composite
def sizes_not_divisible(draw):
    """Draw (widths, image size) with the size NOT a multiple of 2**(levels - 1)."""
    widths = draw(st.sampled_from([(8, 16), (8, 16, 32), (8, 8, 8, 8)]))
    factor = 2 ** (len(widths) - 1)
    size = draw(st.integers(1, 40).filter(lambda s: s % factor))
    return widths, size


def linear_alphas_cumprod():
    """Return abar_t = prod_{s<=t} (1 - beta_s) for the linear schedule beta = 1e-4 .. 0.02 over 1000 steps, float64."""
    betas = torch.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def smooth_blobs(batch_size, size, generator):
    """Return (batch_size, 1, size, size) images in [-1, 1]: one Gaussian blob each, random centre and width."""
    coordinates = torch.arange(size, dtype=torch.float32)
    centres = torch.rand(batch_size, 2, generator=generator) * size
    radii = 2.0 + torch.rand(batch_size, generator=generator) * size / 4
    squared_distance = (coordinates[None, :, None] - centres[:, 0, None, None]) ** 2 + (
        coordinates[None, None, :] - centres[:, 1, None, None]
    ) ** 2
    blobs = torch.exp(-squared_distance / (2 * radii[:, None, None] ** 2))
    return (2.0 * blobs - 1.0)[:, None]


def noise_prediction_loss(model, images, noise, t):
    """Return mean((eps - eps_theta(x_t, t))^2) with x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps (Algorithm 1)."""
    alphas_cumprod = linear_alphas_cumprod()[t].to(torch.float32)[:, None, None, None]
    noisy_images = alphas_cumprod.sqrt() * images + (1.0 - alphas_cumprod).sqrt() * noise
    return F.mse_loss(model(noisy_images, t), noise)


def random_batch(image_channels, size, batch_size, seed):
    """Return (images, noise, t) drawn from a seeded generator: images in [-1, 1], noise N(0, 1), t in [0, T)."""
    generator = torch.Generator().manual_seed(seed)
    images = 2.0 * torch.rand(batch_size, image_channels, size, size, generator=generator) - 1.0
    noise = torch.randn(batch_size, image_channels, size, size, generator=generator)
    t = torch.randint(0, NUM_TIMESTEPS, (batch_size,), generator=generator)
    return images, noise, t


def nudged_model(seed=0, image_channels=1, widths=(8, 16, 32), blocks_per_level=1, size=16):
    """Return a SimpleUnet after ONE Adam step (lr 1e-3) on the noise-prediction loss, gradients cleared.

    A fresh net has every block's second conv at zero, so each block is exactly its shortcut: the time
    projection and the first conv of every block are invisible and get no gradient. One Adam step moves every
    weight that had a gradient, the zero convs included, by about lr, after which every path carries signal.
    """
    torch.manual_seed(seed)
    model = SimpleUnet(image_channels=image_channels, widths=widths, time_emb_dim=16, blocks_per_level=blocks_per_level)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    noise_prediction_loss(model, *random_batch(image_channels, size, 4, seed)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


def parameters_without_gradient(model, floor=1e-7):
    """Return the names of the parameters whose .grad is missing, not finite, or nowhere above floor in size.

    A gradient that is zero in exact arithmetic (e.g. a per-channel offset that a one-channel GroupNorm group
    subtracts again) comes out of float32 as rounding noise of ~1e-10 here, real ones are above 5e-6: floor
    1e-7 separates them.
    """
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or not torch.isfinite(parameter.grad).all() or not parameter.grad.abs().max() > floor
    ]


def one_pixel_change(model, image, t, row, column):
    """Return |model(image + delta at (row, column)) - model(image)| summed over channels, shape (H, W)."""
    perturbed = image.clone()
    perturbed[:, :, row, column] += 1.0
    with torch.no_grad():
        return (model(perturbed, t) - model(image, t)).abs().sum(dim=(0, 1))


# ---- 1. shapes -------------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(unet_configs(), batch_sizes, st.data())
def test_output_shape_equals_input_shape(config, batch_size, data):
    """eps_theta(x_t, t) has x_t's shape (B, C, H, W) for any batch, channel count, width list and valid size."""
    image_channels, widths, blocks_per_level, size = config
    model = SimpleUnet(image_channels=image_channels, widths=widths, time_emb_dim=8, blocks_per_level=blocks_per_level)
    x = torch.randn(batch_size, image_channels, size, size)
    t = torch.tensor(data.draw(st.lists(timesteps, min_size=batch_size, max_size=batch_size)))
    with torch.no_grad():
        assert model(x, t).shape == x.shape


def test_count_parameters_of_the_smallest_unet_is_4657():
    """One level, widths (8,), time_emb_dim 4, 4 GroupNorm groups; counted by hand (weights + biases):
    time MLP 2 * (4*4 + 4) = 40; stem 1*8*9 + 8 = 80;
    block 8->8: norms 2 * 16, conv1 8*8*9 + 8 = 584, time projection 4*8 + 8 = 40, conv2 584, no shortcut = 1240;
    middle block 8->8 = 1240; up block 16->8: norm1 32, conv1 16*8*9 + 8 = 1160, time 40, norm2 16, conv2 584,
    1x1 shortcut 16*8 + 8 = 136 -> 1968; head: norm 16, conv 8*1*9 + 1 = 73 -> 89.  Sum = 4657.
    """
    assert count_parameters(SimpleUnet(widths=(8,), time_emb_dim=4)) == 4657
    assert count_parameters(nn.Linear(3, 2)) == 8


# ---- 2. the timestep embedding ------------------------------------------------------------------------------------


@given(embedding_dims, timestep_lists)
def test_embedding_has_shape_b_by_dim_float32_values_in_unit_interval(dim, ts):
    """sinusoidal(t) is (B, dim) float32 with every entry a sine or cosine, so in [-1, 1]."""
    embedding = SinusoidalPositionEmbeddings(dim)(torch.tensor(ts))
    assert embedding.shape == (len(ts), dim)
    assert embedding.dtype == torch.float32
    assert embedding.abs().max() <= 1.0


@given(embedding_dims, timestep_lists)
def test_embedding_sine_and_cosine_of_each_frequency_have_unit_norm(dim, ts):
    """Column i and column i + dim/2 are sin and cos of the same angle: sin^2 + cos^2 = 1."""
    embedding = SinusoidalPositionEmbeddings(dim)(torch.tensor(ts)).double()
    half = dim // 2
    squared_norms = embedding[:, :half] ** 2 + embedding[:, half:] ** 2
    torch.testing.assert_close(squared_norms, torch.ones_like(squared_norms), rtol=0, atol=1e-6)


@given(embedding_dims, timestep_lists)
def test_embedding_first_frequency_is_exactly_one(dim, ts):
    """Column 0 is sin(t) and column dim/2 is cos(t): frequency_0 = 10000**0 = 1 exactly.
    A frequency off by one float32 ulp (6e-8) would shift the angle at t = 999 by 6e-5, over the 1e-6 tolerance.
    """
    embedding = SinusoidalPositionEmbeddings(dim)(torch.tensor(ts)).double().numpy()
    t = np.asarray(ts, dtype=np.float64)
    np.testing.assert_allclose(embedding[:, 0], np.sin(t), rtol=0, atol=1e-6)
    np.testing.assert_allclose(embedding[:, dim // 2], np.cos(t), rtol=0, atol=1e-6)


@given(embedding_dims)
def test_embedding_frequencies_are_geometric_from_one_to_one_ten_thousandth(dim):
    """At t = 1 the sine columns are sin(frequency_i) with every frequency in (0, 1] < pi/2, so arcsin recovers
    them; they must equal the independent float64 numpy 10000 ** (-i / (half - 1)): 1, ..., 1e-4, constant ratio.
    """
    half = dim // 2
    sines = SinusoidalPositionEmbeddings(dim)(torch.tensor([1]))[0, :half].double().numpy()
    expected = 10000.0 ** (-np.arange(half) / (half - 1))
    np.testing.assert_allclose(np.arcsin(sines), expected, rtol=1e-5)
    assert expected[0] == 1.0 and np.isclose(expected[-1], 1e-4)


@given(embedding_dims, timestep_lists)
def test_embedding_equals_an_independent_numpy_computation(dim, ts):
    """[sin(t f_i), cos(t f_i)] with f_i = 10000 ** (-i / (half - 1)) in float64 numpy; the float32 tolerance is
    |t| * 2 ulp(f) ~ 999 * 1.2e-7 ~ 1.2e-4 on the angle, hence on sin and cos.
    """
    half = dim // 2
    angles = np.asarray(ts, dtype=np.float64)[:, None] * 10000.0 ** (-np.arange(half) / (half - 1))[None, :]
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    embedding = SinusoidalPositionEmbeddings(dim)(torch.tensor(ts)).double().numpy()
    np.testing.assert_allclose(embedding, expected, rtol=0, atol=3e-4)


@pytest.mark.parametrize("dim", [4, 32, 128])
def test_distinct_timesteps_give_distinct_embeddings(dim):
    """All 1000 timesteps 0 .. 999 have pairwise distinct embeddings: min over t != s of |e(t) - e(s)| > 1e-3.
    Even dim 4 works: its second frequency 1e-4 makes sin(1e-4 t) strictly increasing on [0, 999].
    """
    embedding = SinusoidalPositionEmbeddings(dim)(torch.arange(NUM_TIMESTEPS)).double()
    distances = torch.cdist(embedding, embedding) + torch.eye(NUM_TIMESTEPS) * 1e9
    assert distances.min() > 1e-3


@given(embedding_dims, timestep_lists, timesteps)
def test_embedding_of_t_is_the_same_on_every_call_and_in_any_batch(dim, ts, t):
    """e(t) depends on t alone: bitwise equal on two calls, and wherever t sits in a batch."""
    embed = SinusoidalPositionEmbeddings(dim)
    alone = embed(torch.tensor([t]))
    assert torch.equal(alone, embed(torch.tensor([t])))
    batched = embed(torch.tensor(ts + [t]))
    torch.testing.assert_close(batched[-1:], alone, rtol=0, atol=1e-6)


def test_embedding_stays_float32_under_bfloat16_autocast():
    """bfloat16 would round angles near 1000 rad to steps of 4 rad; the embedding must ignore autocast."""
    ts = torch.arange(0, NUM_TIMESTEPS, 37)
    embed = SinusoidalPositionEmbeddings(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = embed(ts)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, embed(ts))


@pytest.mark.parametrize("dim", [0, 2, 7])
def test_embedding_dim_that_is_odd_or_below_four_raises(dim):
    """half - 1 must be > 0 for the frequency formula, and sin/cos halves need an even dim."""
    with pytest.raises(ValueError, match="even number >= 4"):
        SinusoidalPositionEmbeddings(dim)


# ---- 3. the network uses t -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nudged_unet():
    """A (8, 16, 32) SimpleUnet after one Adam step (see nudged_model)."""
    return nudged_model()


@settings(max_examples=20)
@given(timesteps, timesteps, seeds)
def test_output_depends_on_timestep(nudged_unet, t1, t2, seed):
    """For a fixed x, eps_theta(x, t1) != eps_theta(x, t2) when t1 != t2.
    Checked on a model after one Adam step: fresh, every block's zero-initialised second conv hides the time
    projection added before it, so a fresh net is exactly independent of t (test below) whatever the code.
    """
    assume(t1 != t2)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        difference = nudged_unet(x, torch.tensor([t1, t1])) - nudged_unet(x, torch.tensor([t2, t2]))
    assert difference.abs().max() > 1e-6


def test_fresh_model_has_zero_second_convs_and_a_nonzero_head():
    """Design check: every residual block starts as its shortcut (conv2 weight and bias zero), hence the fresh
    output does not depend on t; the head conv is not zero, so the output and all gradients start non-zero.
    """
    torch.manual_seed(0)
    model = SimpleUnet(widths=(8, 16, 32), time_emb_dim=16, blocks_per_level=2)
    second_convs = [module.conv2 for module in model.modules() if hasattr(module, "conv2")]
    assert len(second_convs) == 2 * 3 * 2 + 1
    assert all(not conv.weight.any() and not conv.bias.any() for conv in second_convs)
    assert model.head[-1].weight.abs().min() > 0
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([0, 0])), model(x, torch.tensor([999, 999])))


# ---- 4. every parameter is trained --------------------------------------------------------------------------------


@pytest.mark.parametrize("image_channels", [1, 3])
@pytest.mark.parametrize("blocks_per_level", [1, 2])
def test_every_parameter_gets_a_nonzero_finite_gradient(image_channels, blocks_per_level):
    """One backward pass of the noise-prediction MSE gives every parameter a finite, non-zero gradient.
    Taken after ONE Adam step: at exact initialisation the zero second convs block the gradient to the first
    half of each block (norm1, conv1, time projection) and to the time MLP; that is the design, not a dead branch.
    """
    model = nudged_model(seed=1, image_channels=image_channels, blocks_per_level=blocks_per_level)
    noise_prediction_loss(model, *random_batch(image_channels, 16, 4, seed=2)).backward()
    assert parameters_without_gradient(model) == []


def test_gradient_check_catches_a_time_projection_that_is_never_used():
    """The check above can fail: zero out one block's time projection output and its parameters get no gradient."""
    model = nudged_model(seed=1)
    model.middle.time_projection.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
    noise_prediction_loss(model, *random_batch(1, 16, 4, seed=2)).backward()
    assert parameters_without_gradient(model) == ["middle.time_projection.1.weight", "middle.time_projection.1.bias"]


# ---- 5. the skip connections ---------------------------------------------------------------------------------


@settings(max_examples=15)
@given(st.integers(0, 31), st.integers(0, 31), seeds)
@example(row=5, column=22, seed=7584)  # the draw that broke the earlier, pixel-exact version of this property
def test_full_resolution_skip_alone_carries_a_pixel_change_mostly_to_its_neighbourhood(
    nudged_unet, row, column, seed
):
    """With the first down-sampling's output forced to zero, every lower-resolution path is input-independent,
    so the output can depend on the input only through the level-0 skip concatenated into the up path.
    Then changing pixel p must change the output (exactly zero without that skip), most of all within the receptive
    radius of the full-resolution path, stem (1) + down block (2 convs) + up block (2 convs) + head (1) = 6 pixels;
    beyond it only through GroupNorm's image-wide mean and variance, which one pixel of 32x32 moves by a few percent
    at most: below a tenth of the largest change (measured: at most 0.049 over 1,500 random draws). The change AT p
    itself is not bounded below: the convolutions' taps can nearly cancel there (0.5% of the largest change for
    row 5, column 22, seed 7584), so the property names the neighbourhood, not the pixel.
    """
    image = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([seed % NUM_TIMESTEPS])
    handle = nudged_unet.downsamples[0].register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
    try:
        change = one_pixel_change(nudged_unet, image, t, row, column)
    finally:
        handle.remove()
    rows, columns = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    far = torch.maximum((rows - row).abs(), (columns - column).abs()) > 6
    assert change.max() > 0
    assert change[~far].max() == change.max()
    assert change[far].max() < 0.1 * change.max()


def test_cutting_the_full_resolution_skip_makes_a_pixel_change_spread_out():
    """Locality comes from the level-0 skip: the share of the output change within 1 pixel of the changed pixel
    is much larger with the skip than with the skip's channels zeroed before the up path (everything then goes
    through the stride-2 conv and nearest up-sampling, which blur over at least 2x2 pixels).
    """
    model = nudged_model(seed=3)
    image = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([100])
    row, column = 13, 18

    def share_near(change):
        return (change[row - 1 : row + 2, column - 1 : column + 2].sum() / change.sum()).item()

    with_skip = share_near(one_pixel_change(model, image, t, row, column))
    skip_width = model.widths[0]

    def zero_the_skip(module, args):
        features = args[0]
        return torch.cat([features[:, :-skip_width], torch.zeros_like(features[:, -skip_width:])], dim=1), args[1]

    handle = model.up_levels[0][0].register_forward_pre_hook(zero_the_skip)
    without_skip = share_near(one_pixel_change(model, image, t, row, column))
    handle.remove()
    assert with_skip > 2 * without_skip


# ---- 6. one image's prediction, whatever its batch -----------------------------------------------------------------


def predictions_alone_and_in_batches(model, seed):
    """Return (each image's prediction computed alone, the same images' predictions inside batches of four).

    Each image sits at every position 0..3 of a batch whose other images and timesteps are drawn anew."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 1, 16, 16, generator=generator)
    t = torch.randint(0, NUM_TIMESTEPS, (4,), generator=generator)
    with torch.no_grad():
        alone = torch.cat([model(images[i : i + 1], t[i : i + 1]) for i in range(4)])
        in_batches = []
        for i in range(4):
            batch = torch.randn(4, 1, 16, 16, generator=generator)
            batch_t = torch.randint(0, NUM_TIMESTEPS, (4,), generator=generator)
            batch[i], batch_t[i] = images[i], t[i]
            in_batches.append(model(batch, batch_t)[i : i + 1])
    return alone, torch.cat(in_batches)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_an_images_prediction_does_not_depend_on_the_rest_of_its_batch(mode):
    """eps_theta of one image is the same alone and inside any batch of other images and timesteps, in train mode
    (where the lecture's notebook sampled) and in eval mode: every norm is a GroupNorm, which normalises within one
    image. Tolerance: float32 (u = 6e-8) convolutions may sum in another order for another batch size, ~1e-6 relative
    after ~20 layers; with BatchNorm in train mode the batch's statistics move a prediction by O(1)."""
    model = nudged_model(seed=5)
    model.train(mode == "train")
    for seed in range(3):
        alone, in_batches = predictions_alone_and_in_batches(model, seed)
        torch.testing.assert_close(in_batches, alone, rtol=1e-5, atol=1e-5)


def test_batch_independence_check_fails_for_batchnorm():
    """The check above can fail: the same network with each GroupNorm replaced by a BatchNorm (same parameter
    count, the notebook's choice) gives in train mode predictions that depend on the batch."""
    model = nudged_model(seed=5)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, child_name, nn.BatchNorm2d(child.num_channels))
    model.train()
    alone, in_batches = predictions_alone_and_in_batches(model, 0)
    assert (in_batches - alone).abs().max() > 1e-2


# ---- 7. input checks -----------------------------------------------------------------------------------------


@given(sizes_not_divisible())
def test_image_size_not_divisible_by_two_to_the_down_samplings_raises_a_clear_error(widths_and_size):
    """H = W = size with size % 2**(levels - 1) != 0 cannot return to the skip sizes: one-line ValueError up front."""
    widths, size = widths_and_size
    factor = 2 ** (len(widths) - 1)
    model = SimpleUnet(widths=widths, time_emb_dim=8)
    with pytest.raises(ValueError, match=rf"^image size {size} is not divisible by {factor} = 2\*\*\(levels-1\)"):
        model(torch.zeros(1, 1, size, size), torch.tensor([0]))


@given(unet_configs())
def test_size_multiple_is_the_ratio_of_the_image_side_to_the_middle_blocks_side(config):
    """size_multiple(widths) = 2**(levels - 1) is exactly how much the down path shrinks a side: H / H_middle."""
    image_channels, widths, blocks_per_level, size = config
    model = SimpleUnet(image_channels=image_channels, widths=widths, blocks_per_level=blocks_per_level, time_emb_dim=8)
    middle_sides = []
    model.middle.register_forward_hook(lambda module, inputs, output: middle_sides.append(output.shape[2:]))
    with torch.no_grad():
        model(torch.zeros(1, image_channels, size, size), torch.tensor([0]))
    assert tuple(middle_sides[0]) == (size // size_multiple(widths),) * 2


def test_wrong_shapes_of_x_and_t_raise_clear_errors():
    """x must be (B, image_channels, H, W) and t must be (B,); each violation names itself."""
    model = SimpleUnet(widths=(8, 16), time_emb_dim=8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        model(torch.zeros(1, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="x has 3 channels but the model was built for image_channels=1"):
        model(torch.zeros(1, 3, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\)"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\)"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor(0))


def test_widths_that_groupnorm_cannot_split_raise_a_clear_error():
    """The group count min(groups, smallest width // 2) must divide every width; widths below 2 cannot be split."""
    assert group_norm_groups((64, 128, 256), 8) == 8
    assert group_norm_groups((8, 16), 8) == 4
    with pytest.raises(ValueError, match=r"widths \(8, 12, 18\) are not all multiples of the 4 GroupNorm groups"):
        SimpleUnet(widths=(8, 12, 18))
    with pytest.raises(ValueError, match="channel counts >= 2"):
        SimpleUnet(widths=(1, 2))
    with pytest.raises(ValueError, match="channel counts >= 2"):
        SimpleUnet(widths=())


# ---- 8. the network can learn ------------------------------------------------------------------------------------


def test_model_fits_a_fixed_batch_within_100_adam_steps():
    """On one fixed batch of 16 smooth 1x32x32 blobs, fixed noise and fixed timesteps spread over [0, T), 100 Adam
    steps (lr 1e-3) bring the noise-prediction loss below half its starting value. Seeded; a net that cannot
    learn (wrong skip sizes, dead blocks, detached output) stays near its start.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = smooth_blobs(16, 32, generator)
    noise = torch.randn(images.shape, generator=generator)
    t = torch.linspace(0, NUM_TIMESTEPS - 1, 16).long()
    model = SimpleUnet(widths=(8, 16, 32), time_emb_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = noise_prediction_loss(model, images, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final_loss = noise_prediction_loss(model, images, noise, t).item()
    assert final_loss < 0.5 * losses[0]


# ---- 9. bfloat16 autocast and channels_last ----------------------------------------------------------------------


def test_channels_last_input_gives_the_contiguous_result_in_float32(nudged_unet):
    """Memory format is layout only: the same numbers up to float32 summation order (different conv kernels)."""
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        contiguous = nudged_unet(x, t)
        channels_last = nudged_unet(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_with_channels_last_is_close_to_float32(nudged_unet):
    """bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 2e-3 per op); through ~20 convs and norms the
    errors add up to about sqrt(20) * 2e-3 ~ 1e-2 relative, so require relative L2 error < 5e-2 against float32.
    """
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        reference = nudged_unet(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = nudged_unet(x.to(memory_format=torch.channels_last), t)
    assert low_precision.shape == reference.shape
    relative_error = (low_precision.float() - reference).norm() / reference.norm()
    assert relative_error < 5e-2


@pytest.mark.parametrize("autocast", [False, True])
def test_channels_last_stays_channels_last_through_every_layer(nudged_unet, autocast):
    """No layer makes an NCHW copy: every 4-D module output of a channels_last input is channels_last."""
    layers_in_nchw = []

    def record_nchw(module, inputs, output):
        if output.dim() == 4 and not output.is_contiguous(memory_format=torch.channels_last):
            layers_in_nchw.append(type(module).__name__)

    handles = [module.register_forward_hook(record_nchw) for module in nudged_unet.modules() if module is not nudged_unet]
    x = torch.randn(2, 1, 16, 16).to(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            nudged_unet(x, torch.tensor([1, 2]))
    finally:
        for handle in handles:
            handle.remove()
    assert layers_in_nchw == []


@pytest.mark.parametrize("image_channels", [1, 3])
def test_forward_and_backward_read_nothing_back_from_the_device(image_channels):
    """The network's forward (sampling) and its loss's backward (training) read no number back from a tensor:
    on a GPU such a read (.item(), float(t), a Python `if` on a tensor) would make every step wait for the work
    queued before it. test_math's recorder, which sees those reads, watches both."""
    model = SimpleUnet(image_channels=image_channels, widths=(8, 16, 32), time_emb_dim=16, groups=4)
    x, t = torch.randn(2, image_channels, 8, 8), torch.tensor([3, 500])
    reads = HostReads()
    with reads:
        with torch.no_grad():
            model.eval()(x, t)
        F.mse_loss(model.train()(x, t), torch.randn_like(x)).backward()
    assert "read" not in reads.events
    assert all(parameter.grad is not None for parameter in model.parameters())
