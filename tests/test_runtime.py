"""support.runtime.place_model: the model's memory format, and the CPU's contiguous GroupNorm under channels_last."""
import copy

import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import train
from support import runtime

CPU = torch.device("cpu")


def contiguous_copy_of(norm):
    """Return a deep copy of an nn.GroupNorm as a runtime.ContiguousGroupNorm (what place_model does in place)."""
    copied = copy.deepcopy(norm)
    copied.__class__ = runtime.ContiguousGroupNorm
    return copied


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 4, 8]), channels_per_group=st.integers(1, 8), size=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_contiguous_group_norm_is_group_norm_in_value_and_in_every_gradient(groups, channels_per_group, size, seed):
    """The same function: outputs and the gradients of input, weight and bias agree with nn.GroupNorm (float64)."""
    torch.manual_seed(seed)
    reference = nn.GroupNorm(groups, groups * channels_per_group).double()
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    contiguous = contiguous_copy_of(reference)
    x = torch.randn(3, groups * channels_per_group, size, size, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    x_reference, x_contiguous = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_reference, out_contiguous = reference(x_reference), contiguous(x_contiguous)
    upstream = torch.randn_like(out_reference)
    (out_reference * upstream).sum().backward()
    (out_contiguous * upstream).sum().backward()
    torch.testing.assert_close(out_contiguous, out_reference)
    torch.testing.assert_close(x_contiguous.grad, x_reference.grad)
    torch.testing.assert_close(contiguous.weight.grad, reference.weight.grad)
    torch.testing.assert_close(contiguous.bias.grad, reference.bias.grad)
    assert out_contiguous.is_contiguous(memory_format=torch.channels_last), "the convolutions after it want channels_last"


def test_contiguous_group_norm_normalizes_a_contiguous_copy_only_while_gradients_are_recorded(monkeypatch):
    """With gradients the norm sees a contiguous tensor (the fast backward); in sampling (no_grad) channels_last as is."""
    seen = []
    group_norm = torch.nn.functional.group_norm

    def recording_group_norm(x, *args, **kwargs):
        seen.append("contiguous" if x.is_contiguous() else "channels_last")
        return group_norm(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "group_norm", recording_group_norm)
    norm = contiguous_copy_of(nn.GroupNorm(8, 16))
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    norm(x)
    with torch.no_grad():
        norm(x)
    assert seen == ["contiguous", "channels_last"]


def norm_classes(model):
    """Return {channels per group: set of class names} over the model's GroupNorms."""
    classes = {}
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            classes.setdefault(module.num_channels // module.num_groups, set()).add(type(module).__name__)
    return classes


def test_place_model_makes_only_the_cpus_channels_last_norms_with_few_channels_a_group_contiguous():
    """bf16 on the CPU (channels_last): norms of up to 8 channels a group swapped, wider ones kept; fp32: none.
    The parameters, and so the state_dict a checkpoint saves, stay those of the unplaced model."""
    lecture = {**train.DEFAULTS, "channels": 1}  # widths 64, 128, 256 in 8 groups; the up path's norms see the skips too
    torch.manual_seed(0)
    unplaced = runtime.build_model(lecture)
    placed = runtime.place_model(copy.deepcopy(unplaced), CPU, "bf16")
    assert norm_classes(placed) == {8: {"ContiguousGroupNorm"}, 16: {"GroupNorm"}, 24: {"GroupNorm"},
                                    32: {"GroupNorm"}, 48: {"GroupNorm"}, 64: {"GroupNorm"}}
    convolution = next(module for module in placed.modules() if isinstance(module, nn.Conv2d))
    assert convolution.weight.is_contiguous(memory_format=torch.channels_last)
    assert placed.state_dict().keys() == unplaced.state_dict().keys()
    for name, value in unplaced.state_dict().items():
        assert torch.equal(placed.state_dict()[name], value), name
    quick = {**train.DEFAULTS, "channels": 1, **train.PRESETS["quick"]}  # widths 8, 16, 64, 64: 4 groups a norm
    assert norm_classes(runtime.place_model(runtime.build_model(quick), CPU, "bf16")) == {
        2: {"ContiguousGroupNorm"}, 4: {"ContiguousGroupNorm"}, 6: {"ContiguousGroupNorm"},
        16: {"GroupNorm"}, 20: {"GroupNorm"}, 32: {"GroupNorm"}}
    assert set().union(*norm_classes(runtime.place_model(runtime.build_model(quick), CPU, "fp32")).values()) == {
        "GroupNorm"}
