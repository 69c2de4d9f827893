import copy

import pytest
import torch

from soar_ray.models import (
    LORA_TARGETS,
    adapters_disabled,
    add_lora,
    build_model,
    build_transformer,
    has_lora,
    merge_lora,
    save_transformer,
    trainable_parameters,
)


@pytest.fixture(scope="module")
def base():
    """Tiny model and a fixed batch with its base-model velocity."""
    model = build_model(preset="tiny", seed=0)
    gen = torch.Generator().manual_seed(0)
    x_BCHW = torch.randn(2, 16, 8, 8, generator=gen)
    timestep_B = torch.tensor([900.0, 150.0])
    cond = model.encode_prompts(["a red cube", "two dogs"])
    with torch.no_grad():
        v_base = model.denoise(x_BCHW, timestep_B, cond)
    return model, (x_BCHW, timestep_B, cond), v_base


@pytest.fixture
def lora_transformer(base):
    transformer = copy.deepcopy(base[0].transformer)
    add_lora(transformer, seed=0)
    return transformer


def _velocity(transformer, inputs):
    x_BCHW, timestep_B, cond = inputs
    return transformer(
        hidden_states=x_BCHW,
        encoder_hidden_states=cond["prompt_embeds"],
        pooled_projections=cond["pooled_embeds"],
        timestep=timestep_B,
        return_dict=False,
    )[0]


def _perturb_lora_b(transformer):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))


def test_only_spec_targets_get_lora_and_only_lora_trains(lora_transformer):
    names = [name for name, _ in trainable_parameters(lora_transformer)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    targeted = {n.split(".lora_")[0].split(".", 2)[2] for n in names}
    assert targeted == set(LORA_TARGETS)
    assert not any(".attn2." in n for n in names)  # SD3.5's second self-attention is untouched
    # The last block is context-pre-only (no to_add_out): 2 blocks x 8 + 7 targets, A and B each.
    assert len(names) == 2 * (8 + 7)
    lora_a = lora_transformer.transformer_blocks[0].attn.to_q.lora_A["default"].weight
    assert lora_a.shape == (32, 32)  # rank 32 on the tiny 32-wide attention


def test_gaussian_init_keeps_the_base_output(base, lora_transformer):
    _, inputs, v_base = base
    with torch.no_grad():
        torch.testing.assert_close(_velocity(lora_transformer, inputs), v_base, rtol=0, atol=0)


def test_same_seed_gives_same_lora_init():
    first, second = build_transformer("tiny"), build_transformer("tiny")
    add_lora(first, seed=4)
    add_lora(second, seed=4)
    a_first = dict(trainable_parameters(first))
    a_second = dict(trainable_parameters(second))
    assert all(torch.equal(a_first[k], a_second[k]) for k in a_first)


def test_init_and_dropout_options_reach_peft():
    gaussian, default = build_transformer("tiny"), build_transformer("tiny")
    add_lora(gaussian, rank=8, seed=4)
    add_lora(default, rank=8, seed=4, init="default", dropout=0.25)
    a_gauss = gaussian.transformer_blocks[0].attn.to_q.lora_A["default"].weight
    layer = default.transformer_blocks[0].attn.to_q
    # gaussian: A ~ N(0, 1/r), std 1/8; peft's default: Kaiming-uniform, |A| <= 1/sqrt(32) here.
    assert a_gauss.abs().max() > 1 / 32**0.5
    assert layer.lora_A["default"].weight.abs().max() <= 1 / 32**0.5 + 1e-6
    assert torch.equal(
        layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight)
    )
    assert layer.lora_dropout["default"].p == 0.25
    with pytest.raises(ValueError, match="LoRA init must be one of"):
        add_lora(build_transformer("tiny"), init="pissa")


def test_gradients_reach_only_lora_weights(base, lora_transformer):
    _, inputs, _ = base
    _perturb_lora_b(lora_transformer)
    _velocity(lora_transformer, inputs).square().mean().backward()
    for name, param in lora_transformer.named_parameters():
        # The last block's context queries feed nothing (its text stream is dropped): zero grad.
        if "lora_" in name and "1.attn.add_q_proj" not in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        elif "lora_" not in name:
            assert param.grad is None, name


def test_adapters_disabled_gives_the_reference_then_restores(base, lora_transformer):
    _, inputs, v_base = base
    _perturb_lora_b(lora_transformer)
    flags = [p.requires_grad for p in lora_transformer.parameters()]
    with torch.no_grad():
        v_lora = _velocity(lora_transformer, inputs)
        assert not torch.allclose(v_lora, v_base, atol=1e-4)
        with adapters_disabled(lora_transformer):
            torch.testing.assert_close(_velocity(lora_transformer, inputs), v_base, rtol=0, atol=0)
        torch.testing.assert_close(_velocity(lora_transformer, inputs), v_lora, rtol=0, atol=0)
    assert [p.requires_grad for p in lora_transformer.parameters()] == flags


def test_merge_equals_the_adapter_and_exports_a_plain_transformer(base, lora_transformer, tmp_path):
    _, inputs, _ = base
    _perturb_lora_b(lora_transformer)
    with torch.no_grad():
        v_lora = _velocity(lora_transformer, inputs)
    with pytest.raises(ValueError, match="merge"):
        save_transformer(lora_transformer, tmp_path / "unmerged")
    merged = merge_lora(lora_transformer)
    assert not has_lora(merged)
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_velocity(merged, inputs), v_lora, rtol=1e-4, atol=1e-5)
    save_transformer(merged, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()


def test_misuse_raises(lora_transformer):
    with pytest.raises(ValueError, match="already"):
        add_lora(lora_transformer)
    plain = build_transformer("tiny")
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(plain)
    with pytest.raises(ValueError, match="no LoRA"), adapters_disabled(plain):
        pass
