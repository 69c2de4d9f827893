import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from open_clip.tokenizer import SimpleTokenizer

from soar_ray.models import (
    build_model,
    build_transformer,
    count_parameters,
    get_preset,
    load_transformer,
    save_pretrained,
    save_transformer,
)
from soar_ray.models.sd3 import sd3_denoise
from soar_ray.models.tokenizers import clip_g_tokenizer, clip_l_tokenizer

PROMPTS = ["a photo of a cat", 'a sign that says "SOAR" in red, 2 people']
# tiny: 77 CLIP + 77 T5 tokens, T5 width 96; pooled = CLIP-L 32 + CLIP-G 48.
PROMPT_SHAPE, POOLED_SHAPE = (154, 96), (80,)


@pytest.fixture(scope="module")
def tiny():
    return build_model(preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    return save_pretrained(tiny, tmp_path_factory.mktemp("tiny_sd3"))


def _inputs(batch_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_BCHW = torch.randn(batch_size, 16, 8, 8, generator=gen)
    timestep_B = torch.rand(batch_size, generator=gen) * 1000
    return x_BCHW, timestep_B


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_method_has_the_sd3_shapes(tiny):
    cond = tiny.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, *PROMPT_SHAPE)
    assert cond["pooled_embeds"].shape == (2, *POOLED_SHAPE)
    x_BCHW, timestep_B = _inputs(2)
    v_BCHW = tiny.denoise(x_BCHW, timestep_B, cond)
    assert v_BCHW.shape == x_BCHW.shape and v_BCHW.dtype == torch.float32
    assert torch.equal(tiny(x_BCHW, timestep_B, cond), v_BCHW)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = tiny.encode_images(pixels)
    assert latents.shape == (2, 16, 8, 8)
    decoded = tiny.decode_latents(latents)
    assert decoded.shape == (2, 3, 64, 64)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert (tiny.latent_channels, tiny.vae_scale_factor) == (16, 8)


def test_encode_prompts_equals_the_diffusers_pipeline(tiny):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(scheduler=scheduler, **tiny.parts)
    embeds, neg_embeds, pooled, neg_pooled = pipeline.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=77
    )
    cond = tiny.encode_prompts(PROMPTS)
    assert torch.equal(cond["prompt_embeds"], embeds)
    assert torch.equal(cond["pooled_embeds"], pooled)
    # uncond is encoded once at batch 1, the pipeline's at batch 2: equal up to matmul rounding.
    uncond = tiny.uncond(2)
    torch.testing.assert_close(uncond["prompt_embeds"], neg_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond["pooled_embeds"], neg_pooled, rtol=1e-5, atol=1e-6)
    # CLIP columns 80..95 are the zero padding up to the T5 width; T5 rows follow the 77 CLIP rows.
    assert not cond["prompt_embeds"][:, :77, 80:].any()
    assert cond["prompt_embeds"][:, 77:, 80:].abs().sum() > 0


def test_clip_tokenizers_match_open_clip_and_sd3_padding():
    reference = SimpleTokenizer()
    tokenizer_l, tokenizer_g = clip_l_tokenizer(), clip_g_tokenizer()
    for text in ["A photo of a Cat", "  café   naïve 😀 don't", 'sign: "HELLO, World!" 123', ""]:
        assert tokenizer_l(text).input_ids == [49406, *reference.encode(text), 49407]
    padded_l = tokenizer_l("a dog", padding="max_length", max_length=77).input_ids
    padded_g = tokenizer_g("a dog", padding="max_length", max_length=77).input_ids
    assert padded_l[:4] == padded_g[:4] == [49406, 320, 1929, 49407]
    assert set(padded_l[4:]) == {49407} and set(padded_g[4:]) == {0}  # EOS vs "!"


def test_uncond_is_cached_and_repeated(tiny):
    first = tiny.uncond(3)
    assert first["prompt_embeds"].shape == (3, *PROMPT_SHAPE)
    assert torch.equal(first["prompt_embeds"][0], first["prompt_embeds"][2])
    assert tiny._uncond is not None
    assert torch.equal(tiny.encode_prompts([""])["pooled_embeds"], tiny.uncond(1)["pooled_embeds"])


def test_vae_applies_sd3_shift_then_scale(tiny):
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    posterior = tiny.vae.encode(pixels).latent_dist
    latents = tiny.encode_images(pixels)
    torch.testing.assert_close(latents, (posterior.mean - 0.0609) * 1.5305)
    assert torch.equal(tiny.encode_images(pixels), latents)  # posterior mean: deterministic
    sampled = tiny.encode_images(pixels, generator=torch.Generator().manual_seed(7))
    again = tiny.encode_images(pixels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sampled, again) and not torch.equal(sampled, latents)
    expected = tiny.vae.decode(latents / 1.5305 + 0.0609).sample.clamp(-1, 1)
    torch.testing.assert_close(tiny.decode_latents(latents), expected)


def test_bad_inputs_raise_clear_errors(tiny):
    x_BCHW, timestep_B = _inputs(2)
    cond = tiny.uncond(2)
    with pytest.raises(ValueError, match="list of str"):
        tiny.encode_prompts("a cat")
    with pytest.raises(ValueError, match="keys"):
        tiny.denoise(x_BCHW, timestep_B, {"prompt_embeds": cond["prompt_embeds"]})
    with pytest.raises(ValueError, match="of batch 2: \\(1, "):
        tiny.denoise(x_BCHW, timestep_B, tiny.uncond(1))
    with pytest.raises(ValueError, match="timestep"):
        tiny.denoise(x_BCHW, timestep_B[:1], cond)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.encode_images(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("sd4")
    with pytest.raises(ValueError, match="exactly one"):
        build_model()
    with pytest.raises(ValueError, match="sequence of names"):
        build_model(preset="tiny", components="transformer")
    with pytest.raises(ValueError, match="subset"):
        build_model(preset="tiny", components=("unet",))


def test_frozen_parts_and_trainable_transformer(tiny):
    for module in tiny.frozen_modules():
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert len(tiny.frozen_modules()) == 4
    assert all(p.requires_grad for p in tiny.transformer.parameters())


def test_random_weights_depend_only_on_the_seed(tiny):
    torch.manual_seed(123)  # the global RNG state must not matter
    global_draw = torch.rand(3)
    transformer = build_transformer("tiny", seed=0)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), global_draw)  # and is left untouched
    assert _same_weights(transformer, tiny.transformer)
    assert not _same_weights(build_transformer("tiny", seed=1), tiny.transformer)
    only_vae = build_model(preset="tiny", components=("vae",), seed=0)
    assert only_vae.transformer is None and _same_weights(only_vae.vae, tiny.vae)


def test_partial_model_names_what_is_missing():
    model = build_model(preset="tiny", components=("transformer",))
    with pytest.raises(ValueError, match="text encoders"):
        model.encode_prompts(["a cat"])
    with pytest.raises(ValueError, match="without vae"):
        model.decode_latents(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="all 3 encoders"):
        build_model(preset="tiny", components=("text_encoder", "text_encoder_3"))


def test_place_runs_transformer_in_bf16_and_returns_caller_dtype(tiny):
    model = build_model(preset="tiny", seed=0)
    model.place("cpu", dtype=torch.bfloat16, encoder_dtype=torch.float32)
    assert model.transformer.dtype == torch.bfloat16 and model.vae.dtype == torch.float32
    x_BCHW, timestep_B = _inputs(2)
    cond = model.uncond(2)
    v_BCHW = model.denoise(x_BCHW, timestep_B, cond)
    assert v_BCHW.dtype == torch.float32
    torch.testing.assert_close(v_BCHW, tiny.denoise(x_BCHW, timestep_B, cond), atol=0.1, rtol=0.1)


def test_transformer_round_trip_in_diffusers_format(tiny, tmp_path):
    save_transformer(tiny.transformer, tmp_path / "transformer")
    loaded = load_transformer(tmp_path / "transformer")
    assert _same_weights(loaded, tiny.transformer)
    assert isinstance(
        SD3Transformer2DModel.from_pretrained(tmp_path / "transformer"), SD3Transformer2DModel
    )
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_transformer(tmp_path)


def test_whole_tiny_model_round_trip_through_pretrained_loader(tiny, tiny_folder):
    loaded = build_model(pretrained=tiny_folder, max_sequence_length=77)
    cond, cond_loaded = tiny.encode_prompts(PROMPTS), loaded.encode_prompts(PROMPTS)
    assert all(torch.equal(cond[k], cond_loaded[k]) for k in cond)
    x_BCHW, timestep_B = _inputs(2)
    assert torch.equal(
        tiny.denoise(x_BCHW, timestep_B, cond), loaded.denoise(x_BCHW, timestep_B, cond)
    )
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.equal(tiny.encode_images(pixels), loaded.encode_images(pixels))
    assert (loaded.latent_channels, loaded.vae_scale_factor) == (16, 8)
    assert build_model(pretrained=tiny_folder).max_sequence_length == 256  # the training default
    only_transformer = build_model(pretrained=tiny_folder, components=("transformer",))
    assert only_transformer.vae is None
    assert _same_weights(only_transformer.transformer, tiny.transformer)


def test_missing_pretrained_folders_say_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="stabilityai/stable-diffusion-3.5-medium"):
        build_model(pretrained=tmp_path / "nowhere")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="no text_encoder/ subfolder"):
        build_model(pretrained=tmp_path, components=("transformer", "vae", "text_encoder"))


def test_sd35_parameter_counts_match_published_sizes():
    assert 1e6 < count_parameters("tiny")["total"] < 1e7  # "a few million"
    medium, large = count_parameters("sd35-medium"), count_parameters("sd35-large")
    assert 2.24e9 <= medium["transformer"] <= 2.5e9
    assert large["transformer"] == pytest.approx(8.1e9, rel=0.03)
    # Released encoders: CLIP-L 124M, OpenCLIP bigG text 695M, T5-XXL encoder 4.76B; VAE 84M.
    assert medium["text_encoder"] == pytest.approx(123.7e6, rel=0.01)
    assert medium["text_encoder_2"] == pytest.approx(694.7e6, rel=0.01)
    assert medium["text_encoder_3"] == pytest.approx(4.762e9, rel=0.01)
    assert medium["vae"] == pytest.approx(83.7e6, rel=0.01)
    assert medium["total"] == sum(v for k, v in medium.items() if k != "total")
    meta = build_model(preset="sd35-large", components=("transformer",), device="meta")
    assert meta.transformer.pos_embed.proj.weight.is_meta


@pytest.mark.parametrize("blocks, recomputed", [(True, 2), (1, 1), (5, 2), (False, 0), (0, 0)])
def test_selective_activation_checkpointing_recomputes_only_the_first_blocks(blocks, recomputed):
    from soar_ray.models.sd3 import set_activation_checkpointing

    def loss_and_grads(transformer):
        transformer.zero_grad()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 8, 8, generator=generator)
        cond = {"prompt_embeds": torch.randn(2, 5, transformer.config.joint_attention_dim,
                                             generator=generator),
                "pooled_embeds": torch.randn(2, transformer.config.pooled_projection_dim,
                                             generator=generator)}  # fmt: skip
        loss = sd3_denoise(transformer, x, torch.tensor([700.0, 200.0]), cond).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in transformer.parameters()]

    plain = build_transformer("tiny")
    expected_loss, expected_grads = loss_and_grads(plain)
    transformer = build_transformer("tiny")
    assert len(transformer.transformer_blocks) == 2
    assert set_activation_checkpointing(transformer, blocks) == recomputed
    calls = [0] * len(transformer.transformer_blocks)
    for i, block in enumerate(transformer.transformer_blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    loss, grads = loss_and_grads(transformer)
    # A recomputed block runs its forward again in backward; the others once.
    assert calls == [2] * recomputed + [1] * (2 - recomputed)
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_compiling_on_a_node_without_a_compiler_stops_in_one_line_naming_the_field(
    monkeypatch, tmp_path
):
    from soar_ray.models.sd3 import compile_blocks

    transformer = build_transformer("tiny")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, clang++ or c++
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError) as caught:
        compile_blocks(transformer, "cluster.compile_rollout_blocks")
    assert str(caught.value) == (
        "cluster.compile_rollout_blocks: torch.compile needs a C++ compiler (e.g. apt-get "
        "install g++) on this node to build its kernels, and finds none ($CXX, g++, clang++, "
        "c++ on PATH); install one or set cluster.compile_rollout_blocks: false"
    )
    assert transformer.transformer_blocks[0]._compiled_call_impl is None
    monkeypatch.setenv("CXX", "/opt/bin/g++")  # $CXX names one: inductor takes it
    compile_blocks(transformer, "cluster.compile_rollout_blocks")
    assert transformer.transformer_blocks[0]._compiled_call_impl is not None


def test_compiled_blocks_keep_their_names_and_a_deep_copy_runs_its_own_weights():
    import copy

    from soar_ray.models.sd3 import compile_blocks

    transformer = build_transformer("tiny")
    names = list(transformer.state_dict())
    compile_blocks(transformer, "deepspeed.compile_blocks")  # compiles at the first call: below,
    # nothing calls the original
    assert list(transformer.state_dict()) == names
    assert transformer.transformer_blocks[0]._compiled_call_impl is not None
    # A stage's reference policy is a deep copy: it must not call the original's compiled
    # forward (the original's weights) but run eagerly on its own.
    twin = copy.deepcopy(transformer)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in twin.modules())
    x = torch.randn(1, 16, 8, 8)
    cond = {"prompt_embeds": torch.randn(1, 5, transformer.config.joint_attention_dim),
            "pooled_embeds": torch.randn(1, transformer.config.pooled_projection_dim)}  # fmt: skip
    with torch.no_grad():
        before = sd3_denoise(twin, x, torch.tensor([500.0]), cond)
        for p in twin.transformer_blocks[0].parameters():
            p.add_(0.1)
        after = sd3_denoise(twin, x, torch.tensor([500.0]), cond)
    assert not torch.allclose(before, after)


def test_compiled_blocks_may_keep_a_variant_for_every_kind_and_mode_and_fail_loudly_past():
    """Dynamo's per-code-object variant limit (8) is below what SD3.5-Medium's blocks need (dual
    attention, plain and last blocks x grad mode x ... x static/dynamic shapes): compile_blocks
    raises it to cover every kind, and past it dynamo stops instead of running eagerly."""
    import torch._dynamo

    from soar_ray.models.sd3 import VARIANTS_PER_BLOCK_KIND, compile_blocks

    config = torch._dynamo.config
    # The tiny preset with a third layer has SD3.5-Medium's three kinds: MMDiT-X (dual
    # attention), plain, and the last (context_pre_only).
    transformer = SD3Transformer2DModel(**{**get_preset("tiny").transformer, "num_layers": 3})
    kinds = {(b.use_dual_attention, b.context_pre_only) for b in transformer.transformer_blocks}
    assert kinds == {(True, False), (False, False), (False, True)}
    with config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        compile_blocks(transformer, "deepspeed.compile_blocks")
        assert config.recompile_limit == 3 * VARIANTS_PER_BLOCK_KIND
        assert config.fail_on_recompile_limit_hit
        compile_blocks(build_transformer("tiny"), "deepspeed.compile_blocks")  # two kinds
        assert config.recompile_limit == 3 * VARIANTS_PER_BLOCK_KIND  # never lowered
