"""pomt as a Python library (README step 6): timm model variants, the life cycle of a patched
model, and the arguments of apply. Every refusal is one PruningError before the model changes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_vit

from pomt_cli.errors import PomtError, PruningError
from pomt_cli.pruning import apply, remove, token_counts


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_refused(model, method: str, match: str, **setting) -> None:
    """apply raises one PruningError (a PomtError and a ValueError) and leaves the model as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = (type(model), [type(b) for b in model.blocks])
    with pytest.raises(PruningError, match=match) as info:
        apply(model, method, **setting)
    assert isinstance(info.value, PomtError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert (type(model), [type(b) for b in model.blocks]) == classes
    assert not hasattr(model, "pomt_config")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "block_fn", [timm.models.vision_transformer.ParallelScalingBlock, timm.models.vision_transformer.ResPostBlock]
)
def test_blocks_other_than_timms_block_are_refused(block_fn):
    model = tiny_vit(block_fn=block_fn)
    assert_refused(model, "pomt", f"block 0 is {block_fn.__name__}.*needs timm's Block", r=2, layer=1)


def test_a_dynamic_image_size_is_refused():
    assert_refused(tiny_vit(dynamic_img_size=True), "tome", "dynamic image size", r=2)


@pytest.mark.parametrize(
    "method,setting,match",
    [
        ("pomt", dict(r=True, layer=1), "r must be an int or a list of ints"),
        ("pomt", dict(r=3.0, layer=1), "r must be an int or a list of ints"),
        ("pomt", dict(r=3, layer=True), "layer must be an int, got True"),
        ("pomt", dict(r=3, layer=1.0), "layer must be an int, got 1.0"),
        ("pomt", dict(r=[3, 0, 0], layer=1), "POMT prunes once"),
        ("tome", dict(r=2.5), "r must be an int or a list of ints"),
        ("tome", dict(r=None), "r must be an int or a list of ints"),
        ("tome", dict(r="3"), "r must be an int or a list of ints"),
        ("tome", dict(r=[1.7, 2, 3]), r"r\[0\] must be an int, got 1.7"),
        ("tome", dict(r=[True, 2, 3]), r"r\[0\] must be an int, got True"),
        ("tome", dict(r=(2.5, 0.0)), r"ToMe's r in \(r, inflection\) must be an int"),
        ("tome", dict(r=(2, float("nan"))), "inflection .* must be a finite number, got nan"),
        ("tome", dict(r=(2, "a")), "inflection .* must be a finite number"),
        ("topk", dict(r=2.0), "r must be an int or a list of ints"),
        ("topk", dict(r=[2.9, 0, 0]), r"r\[0\] must be an int"),
        ("topk", dict(r=[2, 2]), "r has 2 entries but the model has 3 blocks"),
        ("Tome", dict(r=2), "unknown method 'Tome': use one of none, pomt, tome, topk"),
        (["tome"], dict(r=2), "unknown method"),
    ],
)
def test_bad_settings_are_one_line_and_leave_the_model_alone(method, setting, match):
    model = apply(tiny_vit(), "topk", r=1)  # a patched model stays patched as it was
    config = dict(model.pomt_config)
    classes = (type(model), [type(b) for b in model.blocks])
    with pytest.raises(PruningError, match=match):
        apply(model, method, **setting)
    assert model.pomt_config == config and (type(model), [type(b) for b in model.blocks]) == classes
    assert_refused(remove(model), method, match, **setting)


@pytest.mark.parametrize(
    "method,setting,plain",
    [
        ("pomt", dict(r=np.int64(3), layer=np.int32(1)), dict(r=3, layer=1)),
        ("pomt", dict(r=torch.tensor(3), layer=1), dict(r=3, layer=1)),
        ("tome", dict(r=np.int64(2)), dict(r=2)),
        ("tome", dict(r=np.array([1, 2, 3])), dict(r=[1, 2, 3])),
        ("tome", dict(r=(np.int64(2), np.float64(-0.5))), dict(r=(2, -0.5))),
        ("topk", dict(r=np.int32(2)), dict(r=2)),
    ],
)
def test_integer_scalars_and_arrays_act_as_python_ints(method, setting, plain):
    x = images()
    with torch.no_grad():
        expected = apply(tiny_vit(), method, **plain)(x)
        model = apply(tiny_vit(), method, **setting)
        actual = model(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert type(model.pomt_config["r"]) is type(plain["r"])  # stored as plain Python values
