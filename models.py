"""The teacher and the student: open_clip-compatible CLIP models written in plain torch.

    python -c "import models; m = models.build_model('toy-student'); print(models.count_params(m))"

Two image towers and one text tower, named exactly like the checkpoints they load:
  - VisionTransformer: open_clip's ViT (FetalCLIP is ViT-L/14 at 224 px), keys `visual.conv1`, `visual.transformer...`
  - MCi: timm's `fastvit_mci0` (MobileCLIP2-S0's image encoder), keys `visual.trunk.*`. Multi-branch for training;
    `reparameterize(model)` folds every branch into one conv for inference and export.
  - TextTransformer: open_clip's text tower, at the top level of the state_dict or under `text.` (`custom_text`).
Models are built from open_clip model-config dicts (the format of FetalCLIP_config.json and open_clip's
model_configs/*.json); `load_checkpoint` reads open_clip, timm and Apple ml-mobileclip checkpoints strictly.
"""
import bisect
import copy
import itertools
import json
import math
import os
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default preprocessing
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The toy presets' text side equals data.ToyTokenizer's (models.py imports torch only; a test checks they agree)
TOY_VOCAB_SIZE = 160
TOY_CONTEXT = 44

# --- configs ---
PRESETS = {
    # FetalCLIP_config.json: open_clip ViT-L/14 with a 117-token text context (longer clinical captions)
    'fetalclip': dict(
        embed_dim=768,
        vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
        text_cfg=dict(context_length=117, vocab_size=49408, width=768, heads=12, layers=12)),
    # open_clip's MobileCLIP2-S0.json at the paper's context 117; the image tower takes raw [0, 1] pixels
    'mobileclip2-s0': dict(
        embed_dim=512,
        vision_cfg=dict(timm_model_name='fastvit_mci0', timm_model_pretrained=False, timm_pool='avg', timm_proj=None,
                        timm_drop=0.0, timm_drop_path=0.0, image_size=256),
        text_cfg=dict(context_length=117, vocab_size=49408, width=512, heads=8, layers=12, no_causal_mask=True),
        custom_text=True,
        preprocess_cfg=dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))),
    # CPU-sized stand-ins with the same code paths. The teacher: a wide MCi (4.6M image params), the mobile family's
    # big member. A ViT learns from pixels alone far too slowly for a CPU (measured: a 64 px, 8 px patch ViT was still
    # near chance after 200 steps where this MCi had learned the planes), and FetalCLIP itself started from a
    # pretrained CLIP; the ViT path is the real teacher's, proved by the parity tests. OpenAI CLIP's mean and std and
    # a causal text tower, as FetalCLIP, so the student still sees its own normalisation of the same picture ...
    'toy-teacher': dict(
        embed_dim=256,
        vision_cfg=dict(timm_model_name='fastvit_mci0', timm_pool='avg', timm_proj=None, image_size=64,
                        mci_cfg=dict(layers=(1, 1, 4, 2), embed_dims=(24, 48, 192, 384))),
        text_cfg=dict(context_length=TOY_CONTEXT, vocab_size=TOY_VOCAB_SIZE, width=256, heads=4, layers=3),
        custom_text=True,
        preprocess_cfg=dict(mean=OPENAI_MEAN, std=OPENAI_STD)),
    # ... and a 22x smaller MCi student (0.21M image params) with MobileCLIP2's text layout (no causal mask)
    'toy-student': dict(
        embed_dim=128,
        vision_cfg=dict(timm_model_name='fastvit_mci0', timm_pool='avg', timm_proj=None, image_size=64,
                        mci_cfg=dict(layers=(1, 1, 2, 1), embed_dims=(12, 24, 48, 96))),
        text_cfg=dict(context_length=TOY_CONTEXT, vocab_size=TOY_VOCAB_SIZE, width=128, heads=4, layers=3,
                      no_causal_mask=True),
        custom_text=True,
        preprocess_cfg=dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))),
    # Laptop-sized starting points for one's own captions (CLIP's BPE, open_clip's 77-token context): a ViT teacher
    # to train first (64 px, 8 px patches; 0.64M image params) and an MCi student of the toy student's shape
    # (0.21M image params). Most of their parameters are the 49,408-token embeddings.
    'small-teacher': dict(
        embed_dim=128,
        vision_cfg=dict(image_size=64, layers=3, width=128, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)),
    'small-student': dict(
        embed_dim=128,
        vision_cfg=dict(timm_model_name='fastvit_mci0', timm_pool='avg', timm_proj=None, image_size=64,
                        mci_cfg=dict(layers=(1, 1, 2, 1), embed_dims=(12, 24, 48, 96))),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, no_causal_mask=True),
        custom_text=True,
        preprocess_cfg=dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))),
}

# timm's fastvit_mci* variants. `vision_cfg.mci_cfg` (ours, not open_clip's) overrides any of these for a smaller
# member: {"layers": [blocks per stage x 4], "embed_dims": [channels per stage x 4]}, as the toy and small presets do
MCI_ARCHS = {
    'fastvit_mci0': dict(layers=(2, 6, 10, 2), embed_dims=(64, 128, 256, 512)),
    'fastvit_mci1': dict(layers=(4, 12, 20, 4), embed_dims=(64, 128, 256, 512)),
    'fastvit_mci2': dict(layers=(4, 12, 24, 4), embed_dims=(80, 160, 320, 640)),
}

# every config key this file reads: any other would be ignored silently and build a different model
_KNOWN_KEYS = dict(
    top={'embed_dim', 'vision_cfg', 'text_cfg', 'custom_text', 'quick_gelu', 'preprocess_cfg'},
    vision_cfg={'image_size', 'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size', 'timm_model_name',
                'timm_model_pretrained', 'timm_pool', 'timm_proj', 'timm_drop', 'timm_drop_path', 'mci_cfg'},
    text_cfg={'context_length', 'vocab_size', 'width', 'heads', 'layers', 'mlp_ratio', 'no_causal_mask'})


def get_config(name_or_path):
    """A preset name (PRESETS: 'fetalclip', 'mobileclip2-s0', 'toy-teacher', 'toy-student', 'small-teacher',
    'small-student') or an open_clip JSON -> dict."""
    if name_or_path in PRESETS:
        return copy.deepcopy(PRESETS[name_or_path])
    if Path(name_or_path).is_file():
        cfg = json.loads(Path(name_or_path).read_text())
        # a hub-style open_clip_config.json keeps the model config and the preprocessing side by side
        return {**cfg['model_cfg'], 'preprocess_cfg': cfg.get('preprocess_cfg', {})} if 'model_cfg' in cfg else cfg
    raise ValueError(f"unknown model config {name_or_path!r}: use a preset {sorted(PRESETS)} "
                     "or the path of an open_clip model-config JSON")


# keys of open_clip model families this file does not implement, and what they are, for the refusal message
_FAMILIES = {'init_logit_bias': "SigLIP's sigmoid loss", 'text_cfg.hf_model_name': 'a Hugging Face text tower',
             'multimodal_cfg': "CoCa's caption decoder", 'vision_cfg.layers': 'a ResNet image tower (layers per stage)'}


def _check_config(cfg):
    """Refuse, naming each key, a config this file would build wrongly: any key it does not read (which would be
    ignored silently), the open_clip families of _FAMILIES, a timm tower other than MCi0/1/2, other pooling."""
    vision = cfg['vision_cfg']
    bad = [f"{part}.{key}".removeprefix('top.') for part, known in _KNOWN_KEYS.items()
           for key in (cfg if part == 'top' else cfg.get(part, {})) if key not in known]
    if not isinstance(vision.get('layers', 12), int):
        bad.append('vision_cfg.layers')
    if vision.get('timm_model_name') not in (None, *MCI_ARCHS):
        bad.append(f"vision_cfg.timm_model_name={vision['timm_model_name']!r} (the timm towers here: {sorted(MCI_ARCHS)})")
    if vision.get('timm_pool', 'avg') != 'avg' or vision.get('timm_proj'):
        bad.append("vision_cfg.timm_pool/timm_proj (only 'avg' pooling into the trunk's own linear head)")
    if bad:
        raise ValueError("model config keys not supported (ViT and MCi0/1/2 image towers, open_clip's text tower, "
                         "the CLIP loss): " + ", ".join(f"{b} ({_FAMILIES[b]})" if b in _FAMILIES else b for b in bad))


def preprocess_of(cfg):
    """(mean, std) per RGB channel of [0, 1] pixels, from cfg['preprocess_cfg']; a config that leaves it out (as
    open_clip's model_configs/*.json do: open_clip keeps it with the pretrained tag) gets its family's tag default
    from open_clip's pretrained.py: an MCi tower (MobileCLIP-S1/S2, MobileCLIP2-S0/S2, `_mccfg`) takes raw pixels,
    mean 0 and std 1; open_clip's own ViT (FetalCLIP, OpenAI CLIP) OpenAI's mean and std. A preprocess_cfg with only
    one of the two, or without three values each, raises ValueError."""
    given = cfg.get('preprocess_cfg') or {}
    if 'mean' not in given and 'std' not in given:  # a hub config's preprocess_cfg may hold only the resize mode
        return ((0.0,) * 3, (1.0,) * 3) if cfg['vision_cfg'].get('timm_model_name') else (OPENAI_MEAN, OPENAI_STD)
    mean, std = tuple(given.get('mean', ())), tuple(given.get('std', ()))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"preprocess_cfg needs 'mean' and 'std', three numbers each (std > 0), got {given}")
    return mean, std


# --- transformer (shared by the ViT and the text tower) ---
class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU; only for checkpoints trained with it (cfg quick_gelu)."""
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def multi_head_attention(qkv, heads, attn_mask=None):
    """Packed projections qkv [B, L, 3 * D] -> attention output [B, L, D] (before the output projection)."""
    B, L, D3 = qkv.shape
    q, k, v = qkv.view(B, L, 3, heads, D3 // (3 * heads)).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, L, head_dim]
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, heads, L, head_dim]
    return x.transpose(1, 2).reshape(B, L, D3 // 3)


class Attention(nn.Module):
    """nn.MultiheadAttention's parameter names (in_proj_weight, in_proj_bias, out_proj), batch first."""
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, attn_mask=None):  # x [B, L, width]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return self.out_proj(multi_head_attention(qkv, self.heads, attn_mask))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    def __init__(self, width, heads, mlp_ratio=4.0, act_layer=nn.GELU):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)  # eps 1e-5, as open_clip
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden), gelu=act_layer(), c_proj=nn.Linear(hidden, width)))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0, act_layer=nn.GELU):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """open_clip's ViT: patchify, prepend a class token, transformer, LayerNorm + projection of the class token."""
    def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, output_dim, act_layer):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):  # x [B, 3, H, W]
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid ** 2, width]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # [B, grid ** 2 + 1, width]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # [B, output_dim]


class TextTransformer(nn.Module):
    """open_clip's text tower: pools the token with the largest id (the end-of-text token) after ln_final."""
    def __init__(self, context_length, vocab_size, width, heads, layers, output_dim, mlp_ratio=4.0,
                 causal=True, act_layer=nn.GELU):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        # additive mask, -inf above the diagonal; MobileCLIP2 uses none at all, not even for padding
        mask = torch.full((context_length, context_length), float('-inf')).triu_(1) if causal else None
        self.register_buffer('attn_mask', mask, persistent=False)

    def forward(self, ids):
        """ids [N, L] int64 (L <= context_length) -> [N, output_dim], read at each row's end-of-text (its largest
        id). A causal tower runs only up to the batch's last end-of-text: no later token reaches a pooled one, so
        the output is the same up to float rounding, for less work when captions are short against the context.
        Exported and traced graphs keep all L."""
        if self.attn_mask is not None and len(ids) and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            ids = ids[:, :int(ids.argmax(dim=-1).max()) + 1]
        L = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:L]  # [N, L, width]
        mask = None if self.attn_mask is None else self.attn_mask[:L, :L]
        x = self.ln_final(self.transformer(x, mask))
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]  # [N, width] at end-of-text
        return x @ self.text_projection  # [N, output_dim]


# --- MCi / FastViT (timm fastvit names) ---
def fuse_bn(kernel, bn):
    """conv(kernel) followed by eval-mode BatchNorm == one conv with the returned (kernel, bias)."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()  # eval BatchNorm: scale * (x - running_mean) + bias
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def identity_kernel(channels, in_per_group, k, like):
    """The kxk conv kernel [channels, in_per_group, k, k] that copies its input (a skip connection as a conv)."""
    kernel = torch.zeros(channels, in_per_group, k, k, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % in_per_group, k // 2, k // 2] = 1
    return kernel


def folded_conv(kernel, bias, stride=1, groups=1):
    """A Conv2d ('same' padding) holding a folded kernel [out, in / groups, k, k] and bias [out]."""
    out_ch, in_per_group, k, _ = kernel.shape
    conv = nn.Conv2d(in_per_group * groups, out_ch, k, stride, k // 2, groups=groups,
                     device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


def conv_bn(cin, cout, k, stride=1, groups=1):
    """timm's ConvNormAct without activation: bias-free conv ('same' padding), then BatchNorm (eps 1e-5)."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn=nn.BatchNorm2d(cout)))


class SqueezeExcite(nn.Module):
    """timm's SEModule: channel gates sigmoid(fc2(relu(fc1(mean over H, W))))."""
    def __init__(self, channels, reduced):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        return x * self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class LayerScale2d(nn.Module):
    def __init__(self, dim, init_value=1e-5):  # small init: each residual branch starts near zero
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), init_value))

    def forward(self, x):
        return x * self.gamma


class Reparameterizable(nn.Module):
    """Parallel linear branches (conv-BNs, BatchNorm skips, plain skips) that add up to a single conv whenever
    BatchNorm uses its running statistics. Training runs the branches; eval mode runs their sum as one conv made on
    the fly by `fused()` (same numbers, fewer ops); `reparameterize()` keeps that conv for inference and export."""
    branch_names = ()  # the submodules that the folded conv replaces

    def __init__(self, stride=1, groups=1):
        super().__init__()
        self.stride, self.groups = stride, groups
        self.reparam_conv = None

    def forward(self, x):
        return self.linear(x)

    def linear(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        if self.training:  # BatchNorm normalises with batch statistics: the branches do not add up to one conv
            return self.branches(x)
        kernel, bias = self.fused()
        return F.conv2d(x, kernel, bias, self.stride, kernel.shape[-1] // 2, 1, self.groups)

    def reparameterize(self):
        self.reparam_conv = folded_conv(*self.fused(), self.stride, self.groups)
        for name in self.branch_names:
            setattr(self, name, None)


class MobileOneBlock(Reparameterizable):
    """Sum of a kxk conv-BN (`conv_kxk`), a 1x1 conv-BN (`conv_scale`) and a BatchNorm skip (`identity`), then SE
    and GELU."""
    branch_names = ('identity', 'conv_kxk', 'conv_scale')

    def __init__(self, cin, cout, k, stride=1, groups=1, use_se=False, use_act=True,
                 scale_branch=True, conv_branch=True):
        super().__init__(stride, groups)
        self.cin, self.k = cin, k
        # timm's SE width here: round(cout / 16), at least 1
        self.se = SqueezeExcite(cout, max(1, int(cout / 16 + 0.5))) if use_se else nn.Identity()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList([conv_bn(cin, cout, k, stride, groups)]) if conv_branch else None
        self.conv_scale = conv_bn(cin, cout, 1, stride, groups) if k > 1 and scale_branch else None
        self.act = nn.GELU() if use_act else nn.Identity()

    def forward(self, x):
        return self.act(self.se(self.linear(x)))

    def branches(self, x):
        return sum(b(x) for b in (self.identity, self.conv_scale, *(self.conv_kxk or ())) if b is not None)

    def fused(self):
        """(kernel [cout, cin / groups, k, k], bias [cout]) of the one conv equal to the three branches."""
        pairs = [(branch.conv.weight, branch.bn) for branch in self.conv_kxk or ()]  # (kernel, its BatchNorm)
        if self.conv_scale is not None:  # the 1x1 kernel is the centre of a zero kxk kernel
            pairs.append((F.pad(self.conv_scale.conv.weight, [self.k // 2] * 4), self.conv_scale.bn))
        if self.identity is not None:
            eye = identity_kernel(self.cin, self.cin // self.groups, self.k, like=self.identity.weight)
            pairs.append((eye, self.identity))
        kernels, biases = zip(*(fuse_bn(kernel, bn) for kernel, bn in pairs))
        return sum(kernels), sum(biases)


class RepMixer(Reparameterizable):
    """Token mixer x + gamma * (mixer(x) - norm(x)) with depthwise MobileOne blocks: one depthwise conv."""
    branch_names = ('norm', 'mixer', 'layer_scale')

    def __init__(self, dim, k=3):
        super().__init__(groups=dim)
        self.norm = MobileOneBlock(dim, dim, k, groups=dim, use_act=False, scale_branch=False, conv_branch=False)
        self.mixer = MobileOneBlock(dim, dim, k, groups=dim, use_act=False)
        self.layer_scale = LayerScale2d(dim)

    def branches(self, x):
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def fused(self):
        (mixer_w, mixer_b), (norm_w, norm_b), gamma = self.mixer.fused(), self.norm.fused(), self.layer_scale.gamma
        dim, _, k, _ = mixer_w.shape
        kernel = identity_kernel(dim, 1, k, like=gamma) + gamma[..., None] * (mixer_w - norm_w)
        return kernel, gamma.flatten() * (mixer_b - norm_b)


class ReparamLargeKernelConv(Reparameterizable):
    """Strided depthwise 7x7 conv-BN plus a parallel 3x3 conv-BN (one 7x7 conv), then SE and GELU."""
    branch_names = ('large_conv', 'small_conv')

    def __init__(self, cin, cout, k=7, stride=2, small_k=3, use_se=False):
        super().__init__(stride, groups=cin)
        self.large_conv = conv_bn(cin, cout, k, stride, groups=cin)
        self.small_conv = conv_bn(cin, cout, small_k, stride, groups=cin)
        # timm's SE width here: cout / 4 rounded to a multiple of 8, at least 8
        self.se = SqueezeExcite(cout, max(8, int(cout / 4 + 4) // 8 * 8)) if use_se else nn.Identity()
        self.act = nn.GELU()  # MCi applies it (timm lkc_use_act=True); plain FastViT did not

    def forward(self, x):
        return self.act(self.se(self.linear(x)))

    def branches(self, x):
        return self.large_conv(x) + self.small_conv(x)

    def fused(self):
        kernel, bias = fuse_bn(self.large_conv.conv.weight, self.large_conv.bn)
        small, small_bias = fuse_bn(self.small_conv.conv.weight, self.small_conv.bn)
        pad = (kernel.shape[-1] - small.shape[-1]) // 2
        return kernel + F.pad(small, [pad] * 4), bias + small_bias


class RepConditionalPosEnc(Reparameterizable):
    """Conditional positional encoding x + dwconv7x7(x): the skip is the conv's centre tap."""
    branch_names = ('pos_enc',)

    def __init__(self, dim, k=7):
        super().__init__(groups=dim)
        self.pos_enc = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)

    def branches(self, x):
        return x + self.pos_enc(x)

    def fused(self):
        w = self.pos_enc.weight  # [dim, 1, k, k]
        return identity_kernel(w.shape[0], 1, w.shape[-1], like=w) + w, self.pos_enc.bias


def conv_mlp(dim, hidden):
    """timm's ConvMlp: depthwise 7x7 conv-BN (kept as is by ml-mobileclip's folding), then a 1x1-conv MLP."""
    return nn.Sequential(OrderedDict(conv=conv_bn(dim, dim, 7, groups=dim), fc1=nn.Conv2d(dim, hidden, 1),
                                     act=nn.GELU(), fc2=nn.Conv2d(hidden, dim, 1)))


class ConvAttention(nn.Module):
    """Self-attention over the H x W positions of a feature map (timm fastvit Attention: head_dim 32, no qkv bias)."""
    def __init__(self, dim, head_dim=32):
        super().__init__()
        self.heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x [B, C, H, W]
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, H * W, C]
        out = self.proj(multi_head_attention(self.qkv(tokens), self.heads))
        return out.transpose(1, 2).reshape(B, C, H, W)


class RepMixerBlock(nn.Module):
    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.token_mixer = RepMixer(dim)
        self.mlp = conv_mlp(dim, int(dim * mlp_ratio))
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x):
        x = self.token_mixer(x)  # the mixer carries its own residual
        return x + self.layer_scale(self.mlp(x))


class AttentionBlock(nn.Module):
    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = ConvAttention(dim)
        self.layer_scale_1 = LayerScale2d(dim)
        self.mlp = conv_mlp(dim, int(dim * mlp_ratio))
        self.layer_scale_2 = LayerScale2d(dim)

    def forward(self, x):
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))


def fastvit_stage(cin, dim, depth, mlp_ratio, downsample, se_downsample, attention):
    # downsampling: a large-kernel stride-2 conv, then a 1x1 MobileOne block that mixes channels
    proj = nn.Sequential(ReparamLargeKernelConv(cin, dim, use_se=se_downsample), MobileOneBlock(dim, dim, 1))
    block = AttentionBlock if attention else RepMixerBlock
    return nn.Sequential(OrderedDict(
        downsample=nn.Sequential(OrderedDict(proj=proj)) if downsample else nn.Identity(),
        # attention has no notion of position: attention stages start with a conditional positional encoding
        pos_emb=RepConditionalPosEnc(dim) if attention else nn.Identity(),
        blocks=nn.Sequential(*[block(dim, mlp_ratio) for _ in range(depth)])))


class MCi(nn.Module):
    """timm's FastVit as `fastvit_mci0` configures it, with a linear head to the CLIP embedding (`head.fc`).

    Defaults are MCi0: depths 2/6/10/2, widths 64/128/256/512, ConvMlp ratio 3, RepMixer stages then one attention
    stage, squeeze-excite in the last two downsamplings, a 2x-wide final MobileOne conv with SE, average pooling.
    """
    def __init__(self, embed_dim, layers=(2, 6, 10, 2), embed_dims=(64, 128, 256, 512), mlp_ratio=3.0,
                 se_downsamples=(False, False, True, True), attention_stages=(False, False, False, True)):
        super().__init__()
        width = embed_dims[0]
        self.stem = nn.Sequential(  # [B, 3, H, W] -> [B, width, H / 4, W / 4]
            MobileOneBlock(3, width, 3, stride=2),
            MobileOneBlock(width, width, 3, stride=2, groups=width),
            MobileOneBlock(width, width, 1))
        stages, cin = [], width
        for i, (depth, dim) in enumerate(zip(layers, embed_dims)):  # each later stage halves H and W
            stages.append(fastvit_stage(cin, dim, depth, mlp_ratio, i > 0, se_downsamples[i], attention_stages[i]))
            cin = dim
        self.stages = nn.Sequential(*stages)
        self.final_conv = MobileOneBlock(cin, 2 * cin, 3, groups=cin, use_se=True)
        self.head = nn.ModuleDict(dict(fc=nn.Linear(2 * cin, embed_dim)))

    def forward(self, x):  # x [B, 3, H, W]
        x = self.final_conv(self.stages(self.stem(x)))  # [B, 2 * embed_dims[-1], H / 32, W / 32]
        return self.head.fc(x.mean((2, 3)))  # [B, embed_dim]


# --- CLIP ---
class CLIP(nn.Module):
    """An open_clip CLIP / CustomTextCLIP built from a model-config dict, with the same state_dict keys."""
    def __init__(self, cfg):
        super().__init__()
        _check_config(cfg)
        self.config = copy.deepcopy(cfg)
        vision, text, embed_dim = cfg['vision_cfg'], cfg['text_cfg'], cfg['embed_dim']
        act_layer = QuickGELU if cfg.get('quick_gelu') else nn.GELU
        self.image_size = vision.get('image_size', 224)
        self.context_length = text.get('context_length', 77)
        self.image_mean, self.image_std = preprocess_of(cfg)
        self.custom_text = bool(cfg.get('custom_text'))

        if vision.get('timm_model_name'):
            arch = {**MCI_ARCHS[vision['timm_model_name']], **vision.get('mci_cfg', {})}
            # open_clip's timm adapter with timm_proj null is just the trunk, whose own head projects
            self.visual = nn.Sequential(OrderedDict(trunk=MCi(embed_dim, **arch)))
        else:
            width = vision.get('width', 768)
            self.visual = VisionTransformer(
                self.image_size, vision.get('patch_size', 16), width, vision.get('layers', 12),
                width // vision.get('head_width', 64), vision.get('mlp_ratio', 4.0), embed_dim, act_layer)

        tower = TextTransformer(
            self.context_length, text.get('vocab_size', 49408), text.get('width', 512), text.get('heads', 8),
            text.get('layers', 12), embed_dim, text.get('mlp_ratio', 4.0), not text.get('no_causal_mask', False),
            act_layer)
        if self.custom_text:
            self.text = tower
        else:  # open_clip's CLIP keeps the text tower's parts at the top level of its state_dict
            self.transformer = tower.transformer
            self.token_embedding = tower.token_embedding
            self.positional_embedding = tower.positional_embedding
            self.ln_final = tower.ln_final
            self.text_projection = tower.text_projection
            self.register_buffer('attn_mask', tower.attn_mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def encode_image(self, images, normalize=False):  # [B, 3, S, S] -> [B, embed_dim]
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids, normalize=False):  # [N, L] -> [N, embed_dim]
        # one forward for both layouts: the top-level CLIP has the attributes TextTransformer.forward reads
        x = self.text(ids) if self.custom_text else TextTransformer.forward(self, ids)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, ids):
        return self.encode_image(images, normalize=True), self.encode_text(ids, normalize=True), self.logit_scale.exp()


def build_model(cfg_or_name):
    """A CLIP from a preset name, an open_clip JSON path or a config dict."""
    return CLIP(cfg_or_name if isinstance(cfg_or_name, dict) else get_config(cfg_or_name))


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def reparameterize(model):
    """Fold every multi-branch block in place (MobileOne, RepMixer, large-kernel conv, positional encoding), as
    ml-mobileclip's reparameterize_model. Uses BatchNorm running statistics, so it is for inference: call it on
    copy.deepcopy(model) to keep training the original."""
    # modules() visits a parent before its children, so a RepMixer folds and drops its two MobileOne blocks before
    # the walk reaches them. Folded blocks have a reparam_conv and are skipped: calling this twice is harmless.
    for module in model.modules():
        if isinstance(module, Reparameterizable) and module.reparam_conv is None:
            module.reparameterize()
    return model


# --- checkpoints ---
_APPLE_RENAMES = [  # ml-mobileclip mci.py name -> timm fastvit name (the rules of timm's checkpoint_filter_fn)
    ('patch_embed.', 'stem.'), ('rbr_conv.', 'conv_kxk.'), ('rbr_scale.', 'conv_scale.'), ('rbr_skip.', 'identity.'),
    ('conv_exp.', 'final_conv.'), ('lkb_origin.', 'large_conv.'), ('convffn.', 'mlp.'),
    ('se.reduce.', 'se.fc1.'), ('se.expand.', 'se.fc2.')]


_APPLE_TEXT_RENAMES = [  # ml-mobileclip text_encoder.py + modules/common/transformer.py -> open_clip text tower
    (r'embedding_layer\.', 'token_embedding.'), (r'positional_embedding\.pos_embed\.pos_embed$', 'positional_embedding'),
    (r'transformer\.(\d+)\.pre_norm_mha\.0\.', r'transformer.resblocks.\1.ln_1.'),
    (r'transformer\.(\d+)\.pre_norm_mha\.1\.qkv_proj\.', r'transformer.resblocks.\1.attn.in_proj_'),  # q, k, v rows
    (r'transformer\.(\d+)\.pre_norm_mha\.1\.out_proj\.', r'transformer.resblocks.\1.attn.out_proj.'),
    (r'transformer\.(\d+)\.pre_norm_ffn\.0\.', r'transformer.resblocks.\1.ln_2.'),
    (r'transformer\.(\d+)\.pre_norm_ffn\.1\.', r'transformer.resblocks.\1.mlp.c_fc.'),  # .2 GELU, .3 dropout
    (r'transformer\.(\d+)\.pre_norm_ffn\.4\.', r'transformer.resblocks.\1.mlp.c_proj.'),
    (r'final_layer_norm\.', 'ln_final.'), (r'projection_layer$', 'text_projection')]


def from_ml_mobileclip(state_dict, text_prefix='text.'):
    """Map Apple ml-mobileclip keys to open_clip's. Image tower: `image_encoder.model.*` or `visual.trunk.*` with
    `network.N` -> timm fastvit names. The flat `network` list interleaves stages with downsamplers (`network.N.proj`)
    and positional encodings (`network.N.pe`): every downsampler opens the next stage. Text tower ('base' variant,
    MobileCLIP2's): `text_encoder.*` -> open_clip names under text_prefix ('text.' for custom_text, '' for the
    top-level layout); its positional embedding [1, 1, context, width] becomes [context, width]. Its 'mct' variant
    (RepMixer text blocks, MobileCLIP-S0) has no counterpart here and is refused by name."""
    text = [k for k in state_dict if k.startswith('text_encoder.')]
    if any('.token_mixer.' in k or '.convffn.' in k for k in text):
        raise ValueError("ml-mobileclip 'mct' text tower (RepMixer text blocks, MobileCLIP-S0 v1) is not implemented: "
                         "only the plain transformer text tower of MobileCLIP2 loads")
    state_dict = dict(state_dict)
    for key in text:
        new = key.removeprefix('text_encoder.')
        for old, repl in _APPLE_TEXT_RENAMES:
            new = re.sub('^' + old, repl, new)
        value = state_dict.pop(key)
        state_dict[text_prefix + new] = value.reshape(value.shape[-2:]) if new == 'positional_embedding' else value
    if not any(re.search(r'(^|\.)network\.\d+\.', k) for k in state_dict):
        return state_dict
    stage_starts = sorted({int(m.group(1)) for k in state_dict if (m := re.search(r'network\.(\d+)\.proj\.', k))})
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r'^image_encoder\.model\.', 'visual.trunk.', key)
        if not key.startswith('visual.trunk.'):
            out[key] = value
            continue
        for old, new in _APPLE_RENAMES:
            key = key.replace(old, new)
        key = re.sub(r'layer_scale(_\d)?$', r'layer_scale\1.gamma', key)  # bare tensors -> LayerScale2d.gamma
        if m := re.search(r'network\.(\d+)\.(proj\.|pe\.)?', key):
            stage = bisect.bisect_right(stage_starts, int(m.group(1)))
            part = {'proj.': 'downsample.proj.', 'pe.': 'pos_emb.pos_enc.', None: 'blocks.'}[m.group(2)]
            key = f'{key[:m.start()]}stages.{stage}.{part}{key[m.end():]}'
        if key == 'visual.trunk.head.proj':  # GlobalPool2D: pooled @ proj [in, out], no bias
            out['visual.trunk.head.fc.weight'] = value.t()
            out['visual.trunk.head.fc.bias'] = value.new_zeros(value.shape[1])
            continue
        out[re.sub(r'head\.(weight|bias)$', r'head.fc.\1', key)] = value  # nn.Linear head
    return out


def resize_text_positions(state_dict, model):
    """Linearly interpolate the text positional embedding to the model's context (MobileCLIP2 ships 77, we use 117),
    as open_clip's resize_text_pos_embed."""
    key = 'text.positional_embedding' if model.custom_text else 'positional_embedding'
    old, want = state_dict.get(key), model.state_dict()[key].shape
    if old is not None and old.ndim == 2 and old.shape[1] == want[1] and old.shape[0] != want[0]:
        resized = F.interpolate(old.float().t()[None], size=want[0], mode='linear', align_corners=False)
        state_dict[key] = resized[0].t()  # [context, width]
    return state_dict


# What wrappers put in front of (or inside) parameter names: DDP and DataParallel `module.` (DeepSpeed too),
# torch.compile's `_orig_mod.`, FSDP's and activation checkpointing's wrapped-module names; inside a key when only a
# submodule was wrapped (model.visual = torch.compile(model.visual)); stacked in any order. No model here has a part
# of these names, so every such component goes.
_WRAPPERS = re.compile(r'(?:^|(?<=\.))(?:module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.')
_CONTAINERS = ('state_dict', 'model', 'model_state_dict', 'module')  # open_clip/timm, train.py, common scripts


def unwrap_state_dict(sd):
    """A checkpoint as saved -> {name: tensor}: the weights inside a container dict, wrapper names removed."""
    while not all(torch.is_tensor(v) for v in sd.values()):
        inner = next((sd[k] for k in _CONTAINERS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"no weights found: the checkpoint is a dict of {sorted(sd)[:12]}, with none of "
                             f"{list(_CONTAINERS)} holding a state_dict")
        sd = inner
    return {_WRAPPERS.sub('', key): value for key, value in sd.items()}


def read_checkpoint(path, mmap=False):
    """A weights file -> what torch.save stored, read with torch.load(weights_only=True) so that no code is unpickled,
    or the state_dict of a TorchScript archive (OpenAI's CLIP .pt files) read as open_clip reads one: torch.jit.load on
    the CPU (TorchScript runs no Python), less its 'input_resolution', 'context_length' and 'vocab_size' entries.
    mmap: leave the tensors on disk (torch.save's zip format only). Anything else raises ValueError, one line naming
    the file and what it holds: none, empty, an HTML page, cut short, a zip or safetensors file torch.save did not
    write, Python objects that weights_only refuses; each with how to get a file that loads."""
    refuse = lambda what: ValueError(f"cannot read checkpoint {path}: {what}")
    if not Path(path).is_file():
        raise refuse("a folder, not a file" if Path(path).is_dir() else "no such file")
    with open(path, "rb") as f:
        head = f.read(4096)
    names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
    if any(n.endswith("/constants.pkl") for n in names):  # TorchScript keeps its constants beside the weights
        try:
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:  # torch.jit raises RuntimeError for nearly everything
            raise refuse(f"a TorchScript archive torch.jit.load cannot read ({str(e).splitlines()[0]})") from None
        return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    size = int.from_bytes(head[:8], "little")
    if not head:
        raise refuse("an empty file")
    if names and not any(n.endswith("/data.pkl") for n in names):
        raise refuse(f"a zip archive that torch.save did not write (it holds {', '.join(names[:3])})")
    if head[8:9] == b"{" and size < os.path.getsize(path):  # safetensors: a header length, then its JSON
        raise refuse("a safetensors file; convert it once with: python -c \"import torch, safetensors.torch as s; "
                     f"torch.save(s.load_file('{path}'), 'weights.pt')\"")
    if re.match(rb"\s*<", head):
        raise refuse("an HTML page (text starting with '<'), not the file: download the file itself")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and bool(names))
    except Exception as e:  # torch.load raises pickle, zip, EOF and runtime errors alike
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):
            raise refuse(f"it holds Python objects ({found[1]}) that weights_only loading refuses (unpickling could "
                         "run code). If you trust the file, save its weights alone (a whole pickled model's too): "
                         f"python -c \"import torch; m = torch.load('{path}', weights_only=False); torch.save("
                         "m.state_dict() if isinstance(m, torch.nn.Module) else m['state_dict'], 'weights.pt')\"") \
                from None
        cut = "a zip archive cut short" if head[:4] == b"PK\x03\x04" else "cut short, or not a torch.save file"
        raise refuse(f"{cut} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from None


def load_checkpoint(model, state_dict_or_path):
    """Load weights strictly from a state_dict or a file (read_checkpoint: torch.save's, or a TorchScript
    archive's weights), in any layout the project's models are published in: open_clip's, Apple ml-mobileclip's (both
    towers mapped), inside {'state_dict': ...} or a train.py checkpoint, with any stack of wrapper names (`module.`,
    `_orig_mod.`); text positions resized. Missing, unexpected or mis-shaped keys raise a ValueError naming them (the
    first 10 of each kind) and the likely cause. Half-precision weights are cast to the model's dtype."""
    sd = state_dict_or_path
    if not isinstance(sd, dict):
        sd = read_checkpoint(sd)
    sd = from_ml_mobileclip(unwrap_state_dict(sd), 'text.' if model.custom_text else '')
    sd = resize_text_positions(sd, model)
    expected = model.state_dict()
    problems = {'missing': [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in sd],
                'unexpected': [f"{k} {tuple(v.shape)}" for k, v in sd.items() if k not in expected],
                'wrong shape': [f"{k} is {tuple(v.shape)}, model has {tuple(expected[k].shape)}"
                                for k, v in sd.items() if k in expected and v.shape != expected[k].shape]}
    if any(problems.values()):
        image = "timm fastvit names under 'visual.trunk.'" if hasattr(model.visual, 'trunk') else "ViT names"
        text = "under 'text.' (custom_text)" if model.custom_text else "at the top level"
        ours = {k.split('.')[0] for k in expected}
        common = os.path.commonprefix([k.split('.') for k in sd])  # components every key starts with
        prefix = '.'.join(itertools.takewhile(lambda part: part not in ours, common[:-1] if len(sd) == 1 else common))
        if any('reparam_conv' in k for k in sd):
            hint = "the weights are folded: call reparameterize(model) before loading them"
        elif prefix:
            hint = f"every key starts with '{prefix}.', which this model has no part named: a wrapper's prefix? Remove it"
        else:
            hint = "a different architecture? Build the model from the checkpoint's own config"
        lines = [f"  {kind}: {item}" for kind, items in problems.items() for item in items[:10]]
        lines += [f"  ... and {len(items) - 10} more {kind}" for kind, items in problems.items() if len(items) > 10]
        raise ValueError(f"checkpoint does not match the model, which expects the open_clip layout (image tower: "
                         f"{image}; text tower {text}); {hint}:\n" + "\n".join(lines))
    model.load_state_dict(sd, strict=True)  # copy_ casts fp16 weights to the model's fp32
    return model
