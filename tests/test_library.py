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


SETTINGS = {"pomt": dict(r=5, layer=1), "tome": dict(r=3), "topk": dict(r=2)}


@pytest.mark.parametrize("method", ["pomt", "tome", "topk"])
def test_forward_intermediates_runs_the_patched_blocks(method):
    model = tiny_vit("deit_tiny_distilled_patch16_224")
    x = images()
    with torch.no_grad():
        timm_first = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
        apply(model, method, **SETTINGS[method])
        final, inter = model.forward_intermediates(x, output_fmt="NLC", norm=True)
        expected = model.forward_features(x)
    # ToMe's sizes reach every block: the final features are those of forward.
    torch.testing.assert_close(final, expected, rtol=0, atol=0)
    torch.testing.assert_close(inter[-1], expected[:, 2:], rtol=0, atol=0)  # prefix tokens split off
    assert [t.shape[1] + 2 for t in inter] == token_counts(model)[1:]
    if method == "pomt":  # block 0 runs before the pruning: timm's own intermediate, on the grid too
        with torch.no_grad():
            first = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
            grid = model.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        torch.testing.assert_close(first, timm_first, rtol=0, atol=1e-6)
        assert grid.shape == (2, 48, 4, 4)


def test_intermediates_of_pruned_blocks_have_no_grid():
    model = apply(tiny_vit(), "pomt", r=5, layer=1)
    with pytest.raises(PruningError, match="block 1 leaves 12 of 17 tokens.*output_fmt='NLC'"):
        model.forward_intermediates(images())


def test_gradient_checkpointing_is_kept_by_the_patched_model():
    x = images()
    grads = []
    for checkpointing in (False, True):
        model = apply(tiny_vit(), "tome", r=3).train()
        model.set_grad_checkpointing(checkpointing)
        calls = []
        mlp_forward = model.blocks[1].mlp.forward
        model.blocks[1].mlp.forward = lambda t: calls.append(1) or mlp_forward(t)
        model(x).square().sum().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["pomt", "tome"])
def test_a_patched_model_pickles_and_loads_in_a_new_process(tmp_path, method):
    import copy
    import pickle
    import subprocess
    import sys

    model = apply(tiny_vit("deit_tiny_distilled_patch16_224"), method, **SETTINGS[method])
    x = images()
    with torch.no_grad():
        expected = model(x)
        for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            torch.testing.assert_close(twin(x), expected, rtol=0, atol=1e-6)
            assert twin.pomt_config == model.pomt_config and twin.blocks[1] is not model.blocks[1]
    torch.save({"model": model, "x": x}, tmp_path / "model.pt")
    script = (
        "import sys, torch; from pomt_cli.pruning import remove, token_counts\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "with torch.no_grad():\n"
        "    pruned = saved['model'](saved['x']); counts = token_counts(saved['model'])\n"
        "    full = remove(saved['model'])(saved['x'])\n"
        "torch.save({'pruned': pruned, 'counts': counts, 'full': full,"
        " 'type': type(saved['model']).__name__}, sys.argv[2])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["pruned"], expected, rtol=0, atol=1e-6)
    assert out["counts"] == token_counts(model) and out["type"] == "VisionTransformerDistilled"
    with torch.no_grad():
        torch.testing.assert_close(out["full"], remove(model)(x), rtol=0, atol=1e-6)


def test_remove_leaves_any_unpatched_module_as_it_is():
    linear = torch.nn.Linear(2, 2)
    assert remove(linear) is linear and type(linear) is torch.nn.Linear
    model = tiny_vit()
    assert remove(remove(model)) is model and type(model).__name__ == "VisionTransformer"


def test_patch_dropout_that_drops_tokens_is_refused():
    model = apply(tiny_vit(patch_drop_rate=0.5), "topk", r=[5, 5, 5])
    with torch.no_grad():
        assert model(images()).shape == (2, 10)  # in eval, patch dropout is off
    with pytest.raises(PruningError, match="patch dropout"):
        model.train()(images())


@pytest.mark.parametrize("method,setting", [("pomt", dict(r=6, layer=0)), ("tome", dict(r=3)), ("topk", dict(r=2))])
def test_a_block_refuses_a_token_count_other_than_planned(method, setting):
    model = apply(tiny_vit(), method, **setting)
    with pytest.raises(PruningError, match="got 5 tokens where its plan expects 17: .*call apply") as info:
        model.blocks[0](torch.randn(1, 5, 48))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not hasattr(timm.models.vision_transformer.VisionTransformer, "set_input_size"),
                    reason=f"timm {timm.__version__} has no set_input_size")
@pytest.mark.parametrize("method,setting", [("pomt", dict(r=6, layer=1)), ("tome", dict(r=3)), ("topk", dict(r=2))])
def test_a_changed_input_size_is_refused_not_run_on_the_old_plan(method, setting):
    """timm's set_input_size changes the token count after apply: the stale plan must not run."""
    model = apply(tiny_vit(), method, **setting)
    model.set_input_size(img_size=16)  # 4 patch tokens instead of 16
    with pytest.raises(PruningError, match="got 5 tokens where its plan expects 17: .*call apply") as info:
        model(torch.randn(1, 3, 16, 16))
    assert "\n" not in str(info.value)
    apply(model, method, **{**setting, "r": 1})  # planned again for the new size, it runs
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert token_counts(model)[0] == 5


@pytest.mark.parametrize("method,setting", [("pomt", dict(r=6, layer=1)), ("tome", dict(r=3)), ("topk", dict(r=2))])
def test_hooks_on_the_blocks_of_a_patched_model_run(method, setting):
    """Feature extractors hook model.blocks[i]: the patched model calls its blocks as modules."""
    model = apply(tiny_vit(), method, **setting)
    seen = {}

    def hook(index):
        def record(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            seen[index] = (x.shape[1], isinstance(output, tuple))
        return record

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(model.blocks)]
    model(images())
    for h in handles:
        h.remove()
    counts = token_counts(model)
    assert {i: n for i, (n, _) in seen.items()} == {i: counts[i + 1] for i in range(3)}
    # Only a merging method's blocks return (x, size); the others return the tokens alone.
    assert {t for _, t in seen.values()} == {method == "tome"}


def test_tome_blocks_called_one_by_one_need_the_sizes():
    model = apply(tiny_vit(), "tome", r=3)
    x0 = model.norm_pre(model._pos_embed(model.patch_embed(images())))
    x, size = x0, None
    for blk in model.blocks:
        x, size = blk(x, size=size, return_size=True)
    torch.testing.assert_close(model.forward_head(model.norm(x)), model(images()), rtol=0, atol=0)
    assert size is not None and int(size.sum(dim=1).max()) == 17  # every token is counted once
    y = model.blocks[0](x0)  # the first block needs no sizes
    with pytest.raises(PruningError, match="follows ToMe's first merge and needs the merged tokens' sizes"):
        model.blocks[1](y)  # without them proportional attention would be lost silently


def test_library_helpers_refuse_bad_arguments_in_one_line():
    from pomt_cli import pruning
    from pomt_cli.pruning import forward_ideal, unregister

    assert pruning.PruningError is PruningError
    with pytest.raises(PruningError, match="unknown method 'nope'"):
        unregister("nope")
    model = tiny_vit()
    with pytest.raises(PruningError, match="2 token counts for 3 blocks"):
        forward_ideal(model, images(), [17, 17])
    with pytest.raises(PruningError, match="must not rise"):
        forward_ideal(model, images(), [17, 12, 14, 10])
    with pytest.raises(PruningError, match="at most at the model's 17 tokens"):
        forward_ideal(model, images(), [18, 12, 10, 10])
    assert forward_ideal(model, images(), [17, 12, 12, 2]).shape == (2, 10)
