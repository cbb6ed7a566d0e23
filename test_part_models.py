"""Tests of models.py (merged into test_dark.py by the lead): python -m pytest -q test_part_models.py"""
import copy
import json
import re

import pytest
import torch

import models


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize_(model, seed=0):
    """Move every parameter and buffer off its init (BatchNorm statistics, layer scales), so that a wrong fold,
    a missed branch or a swapped norm changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if 'running_var' in name or name.endswith('bn.weight') or 'gamma' in name:
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


def branch_mode(model):
    """training=True, so every re-parameterisable block runs its separate branches (eval mode runs their sum as one
    conv), with BatchNorm kept on running statistics so that outputs compare with eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    return model


# --- architecture: open_clip / timm names, shapes and sizes ---
@pytest.mark.parametrize('preset, ref', [('fetalclip', 'fetalclip_vit_l14_ctx117'),
                                         ('mobileclip2-s0', 'mobileclip2_s0_ctx117')])
def test_preset_matches_open_clip_keys_and_param_counts(shared, preset, ref):
    with torch.device('meta'):  # no memory, no init time
        model = models.build_model(preset)
    got = [f"{k}\t{tuple(v.shape)}\t{str(v.dtype).removeprefix('torch.')}" for k, v in model.state_dict().items()]
    assert got == (shared / 'reference' / f'{ref}.keys.tsv').read_text().splitlines()
    counts = json.loads((shared / 'reference' / 'param_counts.json').read_text())[ref]
    assert models.count_params(model) == counts['total']
    assert models.count_params(model.visual) == counts['visual']


def test_toy_presets_are_cheap_and_unequal():
    teacher, student = models.build_model('toy-teacher'), models.build_model('toy-student')
    assert teacher.image_size == student.image_size == 64
    assert teacher.context_length == student.context_length == models.TOY_CONTEXT
    assert models.count_params(student.visual) < 500_000
    assert models.count_params(teacher.visual) >= 10 * models.count_params(student.visual)
    assert student.image_mean == (0.0, 0.0, 0.0) and teacher.image_mean == models.OPENAI_MEAN


# --- parity with open_clip / timm on the reference fixtures ---
def test_vit_clip_reproduces_open_clip(shared):
    ckpt = torch.load(shared / 'reference' / 'tiny_vit_clip.pt', weights_only=True)
    model = models.load_checkpoint(models.build_model(ckpt['config']).eval(), ckpt['state_dict'])
    ref = ckpt['reference']
    with torch.no_grad():
        assert rel_err(model.encode_image(ref['image']), ref['image_features']) < 1e-4
        assert rel_err(model.encode_text(ref['text']), ref['text_features']) < 1e-4
    assert model.logit_scale.item() == pytest.approx(ref['logit_scale'].item())


def test_mci0_clip_reproduces_open_clip_and_timm_folded(shared):
    ckpt = torch.load(shared / 'reference' / 'mci0_tinytext_clip.pt', weights_only=True)  # fp16 weights
    model = models.load_checkpoint(models.build_model(ckpt['config']).eval(), ckpt['state_dict'])
    ref = ckpt['reference']
    with torch.no_grad():
        assert rel_err(model.encode_image(ref['image']), ref['image_features']) < 1e-4
        assert rel_err(model.encode_text(ref['text']), ref['text_features']) < 1e-4
        folded = models.reparameterize(copy.deepcopy(model))
        assert rel_err(folded.encode_image(ref['image']), ref['image_features_reparameterized']) < 1e-4
        assert rel_err(branch_mode(model).encode_image(ref['image']), ref['image_features']) < 1e-4
    foldable = [m for m in folded.modules() if isinstance(m, models.Reparameterizable)]
    assert foldable and all(m.reparam_conv is not None for m in foldable)
    branches = re.compile(r'conv_kxk|conv_scale|identity|large_conv|small_conv|pos_enc|token_mixer\.(norm|mixer)')
    assert not [k for k in folded.state_dict() if branches.search(k)]


# --- re-parameterisation ---
def test_folded_equals_unfolded_on_toy_student():
    model = randomize_(models.build_model('toy-student')).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = branch_mode(copy.deepcopy(model)).encode_image(images)  # the branches as trained
        assert rel_err(model.encode_image(images), want) < 1e-5  # eval mode: each block's branches as one conv
        folded = models.reparameterize(copy.deepcopy(model))
        assert rel_err(folded.encode_image(images), want) < 1e-5
        assert models.reparameterize(folded) is folded  # a second call changes nothing
        assert rel_err(folded.encode_image(images), want) < 1e-5
    assert models.count_params(folded.visual) < models.count_params(model.visual)


# --- checkpoint loading ---
def test_load_unwraps_state_dict_and_module_prefix(tmp_path):
    source = randomize_(models.build_model('toy-student'))
    path = tmp_path / 'ckpt.pt'
    torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in source.state_dict().items()}}, path)
    model = models.load_checkpoint(models.build_model('toy-student'), path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_renamed_or_reshaped_key_is_named_in_the_error():
    model = models.build_model('toy-student')
    sd = model.state_dict()
    sd['text.ln_final.scale'] = sd.pop('text.ln_final.weight')
    with pytest.raises(ValueError, match=r"missing: text\.ln_final\.weight(.|\n)*unexpected: text\.ln_final\.scale"):
        models.load_checkpoint(model, sd)
    sd = model.state_dict()
    sd['visual.trunk.head.fc.weight'] = sd['visual.trunk.head.fc.weight'][:, :-1]
    with pytest.raises(ValueError, match=r"wrong shape: visual\.trunk\.head\.fc\.weight is \(128, 255\)"):
        models.load_checkpoint(model, sd)


def to_ml_mobileclip(state_dict, prefix, stages):
    """Our timm-named trunk keys in Apple ml-mobileclip's mci.py layout (the inverse of the loader's rules)."""
    network, n = {}, 0  # ml-mobileclip's flat list: [blocks0, downsample1, blocks1, ..., downsample3, pe3, blocks3]
    for s, stage in enumerate(stages):
        parts = [('downsample.proj.', 'proj.')] if s > 0 else []
        if hasattr(stage.pos_emb, 'pos_enc'):
            parts.append(('pos_emb.pos_enc.', 'pe.'))
        for ours, theirs in parts + [('blocks.', '')]:
            network[f'stages.{s}.{ours}'] = f'network.{n}.{theirs}'
            n += 1
    renames = [('stem.', 'patch_embed.'), ('conv_kxk.', 'rbr_conv.'), ('conv_scale.', 'rbr_scale.'),
               ('identity.', 'rbr_skip.'), ('final_conv.', 'conv_exp.'), ('large_conv.', 'lkb_origin.'),
               ('mlp.', 'convffn.'), ('se.fc1.', 'se.reduce.'), ('se.fc2.', 'se.expand.'), ('.gamma', '')]
    out = {}
    for key, value in state_dict.items():
        if not key.startswith('visual.trunk.'):
            out[key] = value
            continue
        key = key.removeprefix('visual.trunk.')
        for ours, theirs in network.items():
            key = key.replace(ours, theirs)
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        if key == 'head.fc.weight':
            key, value = 'head.proj', value.t()  # GlobalPool2D: pooled @ proj, no bias
        if key != 'head.fc.bias':
            out[prefix + key] = value
    return out


def test_ml_mobileclip_layout_round_trip():
    source = randomize_(models.build_model('toy-student'))
    with torch.no_grad():
        source.visual.trunk.head.fc.bias.zero_()  # ml-mobileclip's projection head has no bias
    apple = to_ml_mobileclip(source.state_dict(), 'image_encoder.model.', source.visual.trunk.stages)
    for key in ['patch_embed.0.rbr_conv.0.conv.weight', 'network.0.0.token_mixer.mixer.rbr_skip.running_var',
                'network.0.0.token_mixer.layer_scale', 'network.0.0.convffn.conv.bn.weight',
                'network.1.proj.0.lkb_origin.conv.weight', 'network.5.proj.0.se.reduce.weight',
                'network.6.pe.weight', 'network.7.0.layer_scale_1', 'conv_exp.se.expand.bias', 'head.proj']:
        assert 'image_encoder.model.' + key in apple  # spot checks against ml-mobileclip's mci.py names
    model = models.load_checkpoint(models.build_model('toy-student'), apple)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


# --- text tower ---
@pytest.mark.parametrize('preset, key', [('toy-teacher', 'positional_embedding'),
                                         ('toy-student', 'text.positional_embedding')])
def test_text_positions_are_linearly_interpolated(preset, key):
    model = models.build_model(preset)
    sd = model.state_dict()
    half = models.TOY_CONTEXT // 2  # e.g. MobileCLIP2's 77 positions loaded at 117
    sd[key] = torch.arange(half, dtype=torch.float32)[:, None].expand(half, sd[key].shape[1]).clone()
    models.load_checkpoint(model, sd)
    # linear, align_corners=False: output i samples the source at (i + 0.5) / 2 - 0.5, clamped to the ends
    want = ((torch.arange(models.TOY_CONTEXT) + 0.5) / 2 - 0.5).clamp(0, half - 1)
    assert torch.allclose(model.state_dict()[key][:, 0], want, atol=1e-6)


def test_causal_mask_is_switchable():
    ids = torch.tensor([[1, 5, 7, models.TOY_VOCAB_SIZE - 1, 0, 0]])  # end-of-text = largest id, then padding
    changed = ids.clone()
    changed[0, -1] = 9  # a token after end-of-text
    with torch.no_grad():
        causal = models.build_model('toy-teacher').eval()  # open_clip default: causal mask
        assert torch.equal(causal.encode_text(ids), causal.encode_text(changed))
        unmasked = models.build_model('toy-student').eval()  # MobileCLIP2: no mask at all, not even for padding
        assert unmasked.text.attn_mask is None
        assert not torch.allclose(unmasked.encode_text(ids), unmasked.encode_text(changed))


# --- configs and the CLIP interface ---
def test_forward_returns_normalized_features_and_scale():
    model = models.build_model('toy-student').eval()
    ids = torch.randint(1, models.TOY_VOCAB_SIZE, (3, models.TOY_CONTEXT))
    with torch.no_grad():
        img, txt, scale = model(torch.randn(2, 3, 64, 64), ids)
    assert img.shape == (2, 128) and txt.shape == (3, 128)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_config_from_json_quick_gelu_and_unknown_keys(tmp_path):
    cfg = models.get_config('toy-teacher')
    path = tmp_path / 'open_clip_config.json'
    path.write_text(json.dumps({'model_cfg': {**cfg, 'quick_gelu': True}, 'preprocess_cfg': {'mean': [0.5] * 3}}))
    model = models.build_model(str(path))
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, models.QuickGELU)
    assert model.image_mean == (0.5, 0.5, 0.5) and model.config['quick_gelu']
    cfg['vision_cfg']['ls_init_value'] = 1e-5
    with pytest.raises(ValueError, match=r"vision_cfg\.ls_init_value"):
        models.build_model(cfg)
    with pytest.raises(ValueError, match="unknown model config 'vit-huge'"):
        models.get_config('vit-huge')
