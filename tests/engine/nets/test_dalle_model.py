"""DalleModel behaviour on tiny seeded random-weight models."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from app.engine.nets.dalle import (
    DALLE_PRESETS,
    FP16_MAX,
    DalleConfig,
    DalleModel,
    attention,
    build_mask,
    gelu,
    layer_mask_kind,
)

TEXT, D = 8, 4


def _cfg(**overrides) -> DalleConfig:
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, text_seq_length=TEXT,
                image_tokens_per_dim=D, vocab_size=40, image_vocab_size=24)
    base.update(overrides)
    return DalleConfig(**base)


def _model(cfg: DalleConfig, seed: int = 0) -> DalleModel:
    torch.manual_seed(seed)
    model = DalleModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms so that every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(cfg: DalleConfig, batch: int, n_image: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.vocab_size - cfg.text_seq_length, (batch, cfg.text_seq_length), generator=g)
    text[:, cfg.text_seq_length // 2:] = 0
    image = torch.randint(0, cfg.image_vocab_size, (batch, n_image), generator=g)
    return torch.cat([text, image], dim=1)


@pytest.fixture(params=["v3", "v2"])
def model(request) -> DalleModel:
    return _model(_cfg(hf_version=request.param))


# --- config ---------------------------------------------------------------------------------------


def test_config_derived_sizes():
    cfg = DALLE_PRESETS["kandinsky"]
    assert (cfg.image_seq_length, cfg.total_seq_length, cfg.head_dim) == (1024, 1152, 64)
    assert cfg.total_vocab_size == 16512 + 8192
    assert cfg.n_text == 128 and DALLE_PRESETS["emojich"].n_text == 129


def test_presets_match_the_published_models():
    k, m, e = DALLE_PRESETS["kandinsky"], DALLE_PRESETS["malevich"], DALLE_PRESETS["emojich"]
    assert (k.num_layers, k.hidden_size, k.num_attention_heads, k.hf_version) == (64, 3840, 60, "v3")
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.hf_version) == (24, 2048, 16, "v3")
    assert dataclasses.replace(e, hf_version="v3") == m and e.hf_version == "v2"
    assert all(c.cogview_sandwich_layernorm and c.cogview_pb_relax for c in (k, m, e))


def test_from_manifest_ignores_checkpoint_and_unknown_keys():
    block = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "hf_version": "v2",
             "checkpoint": "dalle.pt", "description": "catalog text"}
    cfg = DalleConfig.from_manifest(block)
    assert cfg == DalleConfig(num_layers=2, hidden_size=16, num_attention_heads=2, hf_version="v2")


def test_from_manifest_names_a_missing_key():
    with pytest.raises(ValueError, match="num_attention_heads"):
        DalleConfig.from_manifest({"num_layers": 2, "hidden_size": 16})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": 30}, "hidden_size"),
        ({"hf_version": "v4"}, "hf_version"),
        ({"num_layers": "64"}, "num_layers"),
        ({"num_layers": 0}, "num_layers"),
        ({"cogview_pb_relax": "yes"}, "cogview_pb_relax"),
        ({"vocab_size": 8}, "vocab_size"),
    ],
)
def test_from_manifest_names_an_invalid_key(change, field):
    block = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, **change}
    with pytest.raises(ValueError, match=field):
        DalleConfig.from_manifest(block)


# --- structure ------------------------------------------------------------------------------------


def test_builds_on_meta_device_without_real_memory():
    with torch.device("meta"):
        model = DalleModel(DALLE_PRESETS["kandinsky"])
    assert all(p.is_meta for p in model.parameters())
    assert len(list(model.buffers())) == 0


def test_without_sandwich_there_are_no_before_addition_norms():
    names = set(DalleModel(_cfg(cogview_sandwich_layernorm=False)).state_dict())
    assert not any("before_" in n for n in names)
    assert "transformer.layers.0.input_layernorm.weight" in names


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    assert torch.allclose(gelu(x), F.gelu(x, approximate="tanh"), atol=1e-12)


def test_dense_output_is_clamped_to_the_fp16_range():
    layer = DalleModel(_cfg(cogview_sandwich_layernorm=False)).transformer.layers[0]
    with torch.no_grad():
        layer.attention.dense.bias.fill_(1e6)
    out = layer.attn_out(torch.zeros(1, 4, 3, 8))
    assert torch.all(out == FP16_MAX)


def test_layer_pieces_compose_to_the_layer_forward(model):
    cfg = model.cfg
    layer = model.transformer.layers[1]
    x = torch.randn(2, cfg.total_seq_length, cfg.hidden_size)
    mask = build_mask("col", cfg)
    q, k, v = layer.qkv(layer.input_layernorm(x))
    assert q.shape == (2, cfg.num_attention_heads, cfg.total_seq_length, cfg.head_dim)
    composed = layer.mlp_block(x + layer.attn_out(attention(q, k, v, mask)))
    with torch.no_grad():
        assert torch.equal(composed, layer(x, mask))


# --- embeddings -----------------------------------------------------------------------------------


def test_embed_text_replaces_each_pad_with_its_position_id_v3():
    model = _model(_cfg())
    ids = torch.tensor([[2, 5, 7, 3, 0, 0, 0, 0]])
    expected_ids = torch.tensor([[2, 5, 7, 3, 36, 37, 38, 39]])  # vocab 40 - 8 + i
    with torch.no_grad():
        got = model.embed_text(ids)
        want = model.text_embeddings(expected_ids) + model.text_pos_embeddings.weight[:TEXT]
    assert got.shape == (1, TEXT, 32)
    assert torch.equal(got, want)


def test_embed_text_v2_prepends_id_2_and_uses_one_more_position():
    model = _model(_cfg(hf_version="v2"))
    ids = torch.tensor([[2, 5, 7, 3, 0, 0, 0, 0]])
    expected_ids = torch.tensor([[2, 2, 5, 7, 3, 36, 37, 38, 39]])
    with torch.no_grad():
        got = model.embed_text(ids)
        want = model.text_embeddings(expected_ids) + model.text_pos_embeddings.weight[: TEXT + 1]
    assert got.shape == (1, TEXT + 1, 32)
    assert torch.equal(got, want)


def test_embed_text_rejects_a_wrong_length():
    with pytest.raises(ValueError, match="text_ids"):
        _model(_cfg()).embed_text(torch.zeros(1, TEXT + 1, dtype=torch.long))


def test_embed_image_uses_grid_row_and_column_of_each_token_index():
    model = _model(_cfg())
    codes = torch.tensor([[3, 9, 1]])
    with torch.no_grad():
        got = model.embed_image(codes, 3)  # token indices 3, 4, 5 -> (0, 3), (1, 0), (1, 1)
        rows, cols = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 1])
        want = (model.image_embeddings(codes) + model.image_row_embeddings(rows)
                + model.image_col_embeddings(cols))
    assert torch.equal(got, want)


def test_embed_image_accepts_one_start_per_row():
    model = _model(_cfg())
    codes = torch.tensor([[3], [9]])
    with torch.no_grad():
        both = model.embed_image(codes, torch.tensor([2, 13]))
        assert torch.equal(both[0], model.embed_image(codes[:1], 2)[0])
        assert torch.equal(both[1], model.embed_image(codes[1:], torch.tensor(13))[0])


# --- forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_image", "v3_len", "v2_len"), [(0, 8, 9), (5, 13, 14), (16, 24, 24)])
def test_forward_shapes_and_the_v2_extra_position(n_image, v3_len, v2_len):
    for version, length in (("v3", v3_len), ("v2", v2_len)):
        cfg = _cfg(hf_version=version)
        with torch.no_grad():
            logits = _model(cfg)(_ids(cfg, 2, n_image))
        assert logits.shape == (2, length, cfg.total_vocab_size)


def test_forward_rejects_sequences_that_do_not_fit(model):
    cfg = model.cfg
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, cfg.total_seq_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, cfg.text_seq_length - 1, dtype=torch.long))


def test_fp32_forward_is_deterministic(model):
    ids = _ids(model.cfg, 2, 16)
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))


def test_text_positions_do_not_see_image_tokens(model):
    cfg = model.cfg
    ids = _ids(cfg, 1, 16)
    other = ids.clone()
    other[:, cfg.text_seq_length:] = (other[:, cfg.text_seq_length:] + 5) % cfg.image_vocab_size
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert torch.allclose(a[:, : cfg.n_text], b[:, : cfg.n_text], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, cfg.n_text:], b[:, cfg.n_text:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("j", [0, 5, 11])
def test_changing_image_token_j_leaves_earlier_positions_unchanged(model, j):
    cfg = model.cfg
    ids = _ids(cfg, 1, 16)
    pos = cfg.text_seq_length + j  # input position of image token j
    other = ids.clone()
    other[0, pos] = (other[0, pos] + 1) % cfg.image_vocab_size
    with torch.no_grad():
        a, b = model(ids), model(other)
    seq_pos = pos + (cfg.n_text - cfg.text_seq_length)  # v2 shifts image tokens by one position
    assert torch.allclose(a[:, :seq_pos], b[:, :seq_pos], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, seq_pos], b[:, seq_pos], atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_each_layer_attends_through_its_own_mask(version):
    # A 12x12 grid so that the 11x11 conv window is smaller than the grid. With the attention output
    # of every other layer zeroed, the only mixing across positions is the active layer's attention,
    # so the positions that react to a changed key are exactly that layer's mask column.
    cfg = _cfg(num_layers=3, hidden_size=16, num_attention_heads=2, text_seq_length=4,
               image_tokens_per_dim=12, cogview_sandwich_layernorm=False, hf_version=version)
    ids = _ids(cfg, 1, cfg.image_seq_length - 1)  # v2's extra text position pushes one token out
    shift = cfg.n_text - cfg.text_seq_length
    for active in range(3):
        model = _model(cfg)
        with torch.no_grad():
            for i, layer in enumerate(model.transformer.layers):
                if i != active:
                    layer.attention.dense.weight.zero_()
                    layer.attention.dense.bias.zero_()
        mask = build_mask(layer_mask_kind(active, 3), cfg)
        for key_token in (0, 30, 77):
            pos = cfg.text_seq_length + key_token
            other = ids.clone()
            other[0, pos] = (other[0, pos] + 1) % cfg.image_vocab_size
            with torch.no_grad():
                changed = (model(ids) - model(other)).abs().amax(dim=-1)[0] > 1e-5  # [S]
            # Sequence position of the changed token (v2: one later); masks index sequence positions.
            assert torch.equal(changed, mask[: changed.shape[0], pos + shift]), (active, key_token)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_forward_follows_layers_across_devices():
    cfg = _cfg()
    model = _model(cfg)
    ids = _ids(cfg, 2, 16)
    with torch.no_grad():
        want = model(ids)
        model.transformer.layers[1:].to("cuda")
        model.transformer.final_layernorm.to("cuda")
        got = model(ids.cuda())
    assert got.device.type == "cpu"  # to_logits stayed on the CPU
    assert torch.allclose(got, want, atol=1e-4)


# --- the model's own KV-cached decoding -----------------------------------------------------------


def _cached_logits(model: DalleModel, ids: torch.Tensor, text_rows: torch.Tensor, *, device_pos: bool,
                   groups: list[slice]) -> torch.Tensor:
    """prefill + one step per image token through the model's caches: image logits [B, image_seq, iv]."""
    cfg = model.cfg
    texts = ids[:, : cfg.text_seq_length]  # [R, text]
    codes = ids[:, cfg.text_seq_length :].index_select(0, text_rows)  # [B, image_seq]
    out = [model.prefill(texts, text_rows)]  # [B, iv]
    for j in range(codes.shape[1] - 1):
        pos = cfg.n_text + j
        at: int | torch.Tensor = torch.tensor([pos]) if device_pos else pos
        out.append(torch.cat([model.step(codes[g, j], at, rows=g) for g in groups]))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("device_pos", [False, True], ids=["int-pos", "tensor-pos"])
@pytest.mark.parametrize("windowed", [True, False], ids=["ring", "full"])
@pytest.mark.parametrize("version", ["v3", "v2"])
def test_cached_prefill_and_step_equal_the_uncached_forward(version, windowed, device_pos):
    # 4 layers (row, col, row, conv); a 4x4 grid is long enough to wrap the 5-slot row ring.
    cfg = _cfg(num_layers=4, hf_version=version)
    model = _model(cfg, seed=2)
    ids = _ids(cfg, 2, cfg.image_seq_length, seed=3)  # [R, text + image]
    text_rows = torch.tensor([0, 1, 1])  # three cache rows: request 0 once, request 1 twice
    with torch.no_grad():
        full = model(ids).float()  # [R, S', total_vocab]
        model.setup_caches(3, windowed=windowed)
        assert model.cache_windowed == windowed
        # Rows 0..1 and 2..3 stepped separately, as micro-batches slice the cache rows.
        groups = [slice(0, 1), slice(1, 3)]
        cached = _cached_logits(model, ids, text_rows, device_pos=device_pos, groups=groups)
    first = cfg.n_text - 1  # the last text position predicts image token 0
    reference = full[:, first : first + cfg.image_seq_length, cfg.vocab_size :].index_select(0, text_rows)
    assert cached.dtype == torch.float32 and cached.shape == reference.shape
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)


def test_image_logits_are_the_last_columns_of_to_logits(model):
    hidden = torch.randn(3, 2, model.cfg.hidden_size)
    with torch.no_grad():
        full = model.to_logits(model.transformer.final_layernorm(hidden))
        torch.testing.assert_close(model.image_logits(hidden), full[..., model.cfg.vocab_size :])


def test_caches_are_not_state_and_release_drops_them(model):
    names = set(model.state_dict())
    model.setup_caches(2)
    assert len(model.kv_caches) == model.cfg.num_layers and model.cache_rows == 2
    assert set(model.state_dict()) == names  # cache buffers are not saved
    generation = model.cache_generation
    model.release_caches()
    assert model.kv_caches == [] and model.cache_rows == 0 and model.cache_generation != generation
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.step(torch.zeros(1, dtype=torch.long), model.cfg.n_text)


def test_compact_caches_moves_the_kept_rows_to_the_front(model):
    model.setup_caches(3)
    for cache in model.kv_caches:
        cache.k_cache.copy_(torch.arange(3.0).view(3, 1, 1, 1).expand_as(cache.k_cache))
    model.compact_caches(torch.tensor([0, 2]), 3)
    for cache in model.kv_caches:
        assert cache.k_cache[:, 0, 0, 0].tolist() == [0.0, 2.0, 2.0]
