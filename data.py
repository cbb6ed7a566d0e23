"""
Everything that turns files, or nothing at all, into images, captions and tensors:

    python data.py [toy_samples.png]     # save a grid of toy samples, print captions and the images/s

The toy world, in a few lines. Item i of a split is a B-mode-like fetal ultrasound image rendered from
(seed, split, i) alone: a fan-shaped field of view on black with speckle, depth attenuation, bright bone echoes
that cast acoustic shadows, and one of five planes, shown near horizontal as sonographers display them: fetal
abdomen (stomach bubble, umbilical vein, spine), fetal brain (skull ring, midline), fetal femur (a bright bar), fetal
thorax (four-chamber heart, ribs) or maternal cervix (canal). Two scans in five are heads, cut trans-thalamic (grey
thalami in the middle), trans-cerebellum (a bright cerebellum at the back) or trans-ventricular (a bright choroid
plexus in the far ventricle): structures a few pixels across, inside a head of 20-50. The gestational age (14-40
weeks) sets sizes in mm; a head's circumference follows the WHO curve with its spread. The field of view has one of
four widths, so a head spans HC / pixel_mm pixels around and the age can be read only from the image and the pixel
spacing in the text together, as in HC18. A caption states some of: plane, sub-plane, structures seen, age in weeks
and days, pixel spacing; each age in weeks and each spacing is one token of the toy tokenizer.

The real formats: caption CSV/TSV, webdataset tar shards, FETAL_PLANES_DB, HC18; then FetalCLIP's preprocessing.
"""
import csv
import gzip
import html
import io
import itertools
import math
import os
import random
import re
import sys
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, which FetalCLIP keeps
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --- the toy world ---
PLANES = ('Fetal abdomen', 'Fetal brain', 'Fetal femur', 'Fetal thorax', 'Maternal cervix')  # FETAL_PLANES_DB's labels
BRAIN_PLANES = ('Trans-thalamic', 'Trans-cerebellum', 'Trans-ventricular')
HC_COEFFS = {  # WHO fetal growth, as FetalCLIP uses it: HC(t) = exp(b0 + b1 t + b2 t^2 + b3 t^3) mm, t in weeks
    'median': (2.09924879247164, 0.253373656106037, -6.05647816678282e-3, 5.14256072059917e-5),
    'p2.5': (1.59317517131532, 0.29459800552433, -7.3860372566707e-3, 6.56951770216148e-5),
    'p97.5': (2.50074069629423, 0.220067854715719, -4.93623111462443e-3, 3.89066000946519e-5)}
FIELDS_MM = (96, 128, 160, 192)  # field-of-view widths: 1.5/2/2.5/3 mm/pixel at 64 px, few enough to learn
PLANE_MIX = (0.1, 0.6, 0.1, 0.1, 0.1)  # how often each plane is scanned: heads carry two of the three tasks
SPLITS = ('train', 'val', 'test')
_SPLIT_STRIDE = 10 ** 9  # split s owns indices [s * stride, (s + 1) * stride): splits never share an item


def hc_curve(ga_weeks, q='median'):
    """Head circumference (mm) at gestational age ga_weeks for quantile q in 'median', 'p2.5', 'p97.5'."""
    b0, b1, b2, b3 = HC_COEFFS[q]
    t = np.asarray(ga_weeks, dtype=np.float64)
    return np.exp(b0 + b1 * t + b2 * t ** 2 + b3 * t ** 3)


def _axes(perimeter, ratio):
    """Semi-axes (a, ratio * a) of the ellipse with this perimeter (Ramanujan's second approximation)."""
    h = ((1 - ratio) / (1 + ratio)) ** 2
    a = perimeter / (math.pi * (1 + ratio) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h))))
    return a, ratio * a


def _sample(rng):
    """What the scan shows, in mm: plane, sub-plane, age, the size of the part and the field of view."""
    plane = int(rng.choice(5, p=PLANE_MIX))
    days = int(rng.integers(14 * 7, 40 * 7 + 1))
    z = float(np.clip(rng.standard_normal(), -2.5, 2.5))  # this fetus's size percentile, as a z-score
    med = hc_curve(days / 7)
    edge = hc_curve(days / 7, 'p97.5' if z > 0 else 'p2.5')  # the curve is skewed: each side has its own spread
    hc = float(med * (edge / med) ** (abs(z) / 1.96))
    size = (hc * rng.uniform(0.88, 1.02),                                # abdominal circumference
            hc,                                                          # head circumference
            (-40 + 4.5 * days / 7 - 0.04 * (days / 7) ** 2) * math.exp(0.06 * z),  # femur length (Hadlock-like)
            hc * rng.uniform(0.78, 0.9),                                 # thoracic circumference
            rng.uniform(25, 45))[plane]                                  # cervical length
    extent = size * 1.5 if plane in (2, 4) else size / math.pi           # how much of the field it fills
    # the sonographer zooms so the part fills 50-85% of the width (the smallest field if none does)
    fits = [f for f in FIELDS_MM if 0.5 <= extent / f <= 0.85] or [FIELDS_MM[0]]
    return dict(plane=plane, brain_plane=int(rng.integers(3)) if plane == 1 else -1, days=days,
                hc=hc if plane == 1 else float('nan'), size=size, extent=extent, fov=float(rng.choice(fits)))


class _Scan:
    """One frame drawn on the scanner's own polar grid (depth x beam angle), in mm: speckle comes out wider than
    deep, and an acoustic shadow is a cumulative sum down each beam, as on a real scanner. E is the tissue's echo
    level, R bright specular echoes, A attenuation per mm (bone)."""

    def __init__(self, rng, n, fov, wide):
        m = min(n, 128)  # polar grid size: finer would only sharpen speckle that is blurry on a real scanner anyway
        self.n, self.m, self.fov, self.px = n, m, fov, fov / m  # px: mm per polar cell, about a pixel or more
        self.half = math.radians(rng.uniform(55, 70) if wide else rng.uniform(30, 40))  # transvaginal: wider, closer
        self.apex = fov * (rng.uniform(0.02, 0.08) if wide else rng.uniform(0.15, 0.35))  # virtual apex above the image
        self.r0 = self.apex + fov * rng.uniform(0, 0.05)  # the probe's face
        self.r1 = self.apex + fov * rng.uniform(0.9, 1.05)  # the deepest echo
        r = np.linspace(self.r0, self.r1, m)[:, None]
        th = np.linspace(-self.half, self.half, m)[None, :]
        self.x, self.y = r * np.sin(th), r * np.cos(th) - self.apex  # mm; y is the depth below the image's top edge
        hat = np.maximum(0, 1 - np.abs(np.linspace(0, 4, m)[:, None] - np.arange(5)))  # linear interpolation
        self.lumpy = hat @ rng.standard_normal((5, 5)) @ hat.T  # a slowly varying random field, ~N(0, 1)
        self.E = 0.3 + 0.1 * self.lumpy  # maternal tissue
        for depth in rng.uniform(0.02, 0.15, 2) * fov:  # fascia layers under the probe
            self.E += 0.15 * np.exp(-((self.y - depth) / (0.01 * fov + self.px)) ** 2)
        self.R, self.A = np.zeros_like(self.E), np.zeros_like(self.E)

    def frame(self, cx, cy, phi):  # the part's own axes: u along its length, v across
        dx, dy = self.x - cx, self.y - cy
        self.u, self.v = dx * math.cos(phi) + dy * math.sin(phi), -dx * math.sin(phi) + dy * math.cos(phi)

    def move(self, du, dv, rot):  # a sub-part's axes (the heart in the chest)
        u, v = self.u - du, self.v - dv
        self.u, self.v = u * math.cos(rot) + v * math.sin(rot), -u * math.sin(rot) + v * math.cos(rot)

    def inside(self, du, dv, a, b):  # 1 inside the ellipse, 0 outside, with a one-cell soft edge against aliasing
        q = np.sqrt(((self.u - du) / a) ** 2 + ((self.v - dv) / b) ** 2)
        return np.clip((1 - q) * np.minimum(a, b) / self.px + 0.5, 0, 1)

    def ring(self, a, b, thick):  # a Gaussian ridge along the centred ellipse, never thinner than a cell
        q = np.sqrt((self.u / a) ** 2 + (self.v / b) ** 2)
        return np.exp(-((q - 1) * a / max(thick, 0.6 * self.px)) ** 2)

    def line(self, length, thick, bend=0.0):  # a centred bar along u, optionally curved
        return np.exp(-((self.v - bend * self.u ** 2) / max(thick, 0.6 * self.px)) ** 2) * (np.abs(self.u) < length / 2)

    def blob(self, du, dv, a, b, echo):  # tissue of this echo level inside an ellipse
        self.E += self.inside(du, dv, a, b) * (echo - self.E)

    def mark(self, w, bright, shadow=0.0):  # a specular echo; bone also casts a shadow
        self.R += bright * w
        self.A += shadow * w

    def image(self, rng):
        """Speckle, shadows, attenuation and gain on the polar grid, then scan conversion to n x n uint8."""
        n, m = self.n, self.m
        z = rng.standard_normal((2, m, m))
        z = z + np.roll(z, 1, 2) + np.roll(z, -1, 2) + 0.5 * np.roll(z, 1, 1)  # beam wider than the pulse is long
        speckle = np.hypot(z[0], z[1])  # Rayleigh-distributed amplitude of many random scatterers
        speckle /= speckle.mean()
        dr = (self.r1 - self.r0) / (m - 1)
        beam = np.exp(-(np.cumsum(self.A, 0) - self.A) * dr)  # what is left of the beam after the bone above
        depth = np.exp(-rng.uniform(0.2, 0.8) * np.linspace(0, 1, m))[:, None]  # attenuation the gain left over
        polar = np.maximum(self.E * speckle + self.R * (0.6 + 0.4 * speckle), 0) * beam * depth
        polar = rng.uniform(0.75, 1.2) * polar ** rng.uniform(0.5, 0.7)  # overall gain and log-like compression
        c = ((np.arange(n) + 0.5) * self.fov / n).astype(np.float32)  # pixel centres in mm
        X, Y = c[None, :] - self.fov / 2, c[:, None] + self.apex
        fi = (np.hypot(X, Y) - self.r0) / dr  # fractional polar indices of every output pixel
        fj = (np.arctan2(X, Y) + self.half) / (2 * self.half) * (m - 1)
        fan = (fi >= 0) & (fi <= m - 1) & (fj >= 0) & (fj <= m - 1)
        i, j = np.clip(fi, 0, m - 2).astype(int), np.clip(fj, 0, m - 2).astype(int)
        di, dj = np.clip(fi - i, 0, 1), np.clip(fj - j, 0, 1)
        out = ((polar[i, j] * (1 - dj) + polar[i, j + 1] * dj) * (1 - di)
               + (polar[i + 1, j] * (1 - dj) + polar[i + 1, j + 1] * dj) * di) * fan  # bilinear scan conversion
        return (255 * np.clip(out, 0, 1)).astype(np.uint8)


def _abdomen(c, rng, p):
    a, b = _axes(p['size'], rng.uniform(0.85, 0.97))
    c.blob(0, 0, a, b, 0.3)  # liver and bowel: mid-grey
    c.mark(c.ring(a, b, 0.8), 0.5, 0.02)  # abdominal wall
    c.blob(0.15 * a, -0.35 * b, 0.28 * a, 0.18 * b, 0.03)  # stomach bubble
    c.blob(0.3 * a, 0.1 * b, 0.3 * a, 0.06 * b, 0.05)  # umbilical vein
    for du, dv in ((-0.8, 0), (-0.66, -0.13), (-0.66, 0.13)):  # the spine's three ossification centres
        c.mark(c.inside(du * a, dv * b, 0.06 * a, 0.06 * a), 1.5, 0.4)


def _brain(c, rng, p):
    a, b = _axes(p['size'], rng.uniform(0.74, 0.86))  # cephalic index
    brain = rng.uniform(0.12, 0.2)
    c.blob(0, 0, a, b, brain)
    c.mark(c.ring(a, b, 0.02 * a + 0.3), 1.6, 0.1)  # the skull, where HC is measured: the brightest echo
    c.mark(c.line(1.7 * a, 0.4), 0.3)  # midline falx
    vis = rng.uniform(0.8, 1.0)  # how clearly the sub-plane's structures came out
    blob = lambda du, dv, ra, rb, echo: c.blob(du * a, dv * b, ra * a, rb * b, brain + vis * (echo - brain))
    blob(0.45, 0, 0.1, 0.08, 0.02)  # cavum septi pellucidi, in all three planes: it marks the front
    if p['brain_plane'] == 0:  # trans-thalamic: two grey thalami either side of the dark third ventricle, centred
        for side in (-1, 1):
            blob(-0.05, side * 0.22, 0.26, 0.2, 0.55)
        blob(-0.05, 0, 0.24, 0.05, 0.0)
    elif p['brain_plane'] == 1:  # trans-cerebellum: the bright cerebellum at the back, the dark cisterna magna behind
        for side in (-1, 1):
            blob(-0.55, side * 0.2, 0.17, 0.22, 0.85)
        blob(-0.82, 0, 0.1, 0.35, 0.0)
    else:  # trans-ventricular: the far lateral ventricle, dark, filled by its bright choroid plexus
        blob(-0.1, 0.5, 0.6, 0.18, 0.0)
        blob(-0.2, 0.5, 0.4, 0.12, 1.0)


def _femur(c, rng, p):
    length = p['size']
    c.blob(0, 0, 0.75 * length, 0.22 * length, 0.3)  # thigh
    c.mark(c.line(length, 0.02 * length + 0.4, rng.uniform(-0.1, 0.1) / length), 1.6, 0.6)  # the bone


def _thorax(c, rng, p):
    a, b = _axes(p['size'], rng.uniform(0.85, 0.97))
    c.blob(0, 0, a, b, 0.38)  # lungs: brighter than liver
    c.mark(c.ring(a, b, 0.8), 0.3, 0.02)
    ribs = np.cos(7 * np.arctan2(c.v / b, c.u / a) + rng.uniform(0, 2 * math.pi)) > 0.5  # arcs around the wall
    c.mark(c.ring(0.93 * a, 0.93 * b, 0.6) * ribs, 1.2, 0.3)
    c.mark(c.inside(-0.85 * a, 0, 0.07 * a, 0.07 * a), 1.5, 0.4)  # spine
    r = 0.42 * a
    c.move(0.15 * a, 0.1 * b, rng.choice((-1, 1)) * rng.uniform(0.3, 1.0))  # heart axis ~45 deg to the midline
    c.blob(0, 0, r, 0.85 * r, 0.3)  # myocardium
    for su, sv in ((1, 1), (1, -1), (-1, 1), (-1, -1)):  # four chambers; what is left between them is the septum
        c.blob(su * 0.46 * r, sv * 0.4 * r, 0.36 * r, 0.3 * r, 0.03)


def _cervix(c, rng, p):
    length = p['size']
    width = length * rng.uniform(0.55, 0.75)
    c.blob(-0.2 * length, -0.9 * width, 0.5 * length, 0.35 * width, 0.03)  # bladder
    c.blob(0, 0, length / 2, width / 2, 0.55)  # cervical stroma
    c.blob(0, 0, 0.45 * length, 0.12 * width, 0.15)  # endocervical mucosa
    c.mark(c.line(0.9 * length, 0.4), 1.0)  # the canal


def _render(p, n, rng):
    c = _Scan(rng, n, p['fov'], wide=p['plane'] == 4)
    # standard planes are shown in a standard orientation: the head's midline, the spine-to-belly axis, the femur and
    # the canal near horizontal, either way round (a small model cannot learn every rotation in minutes)
    phi = rng.uniform(-0.4, 0.4) + math.pi * rng.integers(2)
    c.frame(rng.uniform(-0.12, 0.12) * p['fov'], rng.uniform(0.45, 0.6) * p['fov'], phi)
    if p['plane'] != 4:  # amniotic fluid: a dark pocket with an irregular outline around the fetus
        e, wobble = p['extent'] / 2, 1 + 0.05 * c.lumpy
        du, dv = rng.uniform(-0.2, 0.2, 2) * e
        c.blob(du, dv, e * rng.uniform(1.2, 1.7) * wobble, e * rng.uniform(1.1, 1.5) * wobble, rng.uniform(0, 0.03))
    (_abdomen, _brain, _femur, _thorax, _cervix)[p['plane']](c, rng, p)
    return c.image(rng)


# How captions say things. The first name of each plane is the one the zero-shot prompts use, and the most common.
_NAMES = (('fetal abdomen', 'fetal abdomen', 'abdominal circumference plane', 'fetal belly'),
          ('fetal brain', 'fetal brain', 'fetal head', 'axial view of the fetal head'),
          ('fetal femur', 'fetal femur', 'femur length plane', 'fetal thigh bone'),
          ('fetal thorax', 'fetal thorax', 'fetal chest', 'four chamber view of the fetal heart'),
          ('maternal cervix', 'maternal cervix', 'uterine cervix', 'transvaginal view of the cervix'))
_SUBS = (('in the trans-thalamic plane',) * 3 + ('at the level of the thalami',),
         ('in the trans-cerebellum plane',) * 3 + ('at the level of the cerebellum',),
         ('in the trans-ventricular plane',) * 3 + ('at the level of the lateral ventricles',))
_SEEN = (('stomach bubble', 'umbilical vein', 'spine'), ('skull', 'midline falx', 'cavum septi pellucidi'),
         ('femoral diaphysis', 'acoustic shadow'), ('heart', 'four chambers', 'ribs', 'spine'),
         ('cervical canal', 'internal os', 'bladder'))
_SUB_SEEN = (('thalami', 'third ventricle'), ('cerebellum', 'cisterna magna'), ('lateral ventricle', 'choroid plexus'))
_OPENERS = ('ultrasound image of the {}', 'ultrasound of the {}', 'scan of the {}', '{}', 'sonogram of the {}')
_SHOWING = ('showing the {}', 'with visible {}', '{} seen')
_GA = ('at {} weeks and {} days', 'gestational age {} weeks {} days', '{} weeks {} days of gestation')
_SPACING = ('pixel spacing {:.2f} mm/pixel', 'spacing of {:.2f} mm per pixel', '{:.2f} mm/pixel')


def _caption(p, pixel_mm, rng):
    pick = lambda options: options[rng.integers(len(options))]
    head = p['plane'] == 1
    first = pick(_OPENERS).format(pick(_NAMES[p['plane']]))
    if head and rng.random() < 0.95:
        first += ' ' + pick(_SUBS[p['brain_plane']])
    facts = []
    seen = _SEEN[p['plane']] + (_SUB_SEEN[p['brain_plane']] if head else ())
    k = int(rng.integers(3))
    if k:
        facts.append(pick(_SHOWING).format(' and '.join(rng.choice(seen, k, replace=False))))
    if rng.random() < 0.95:  # every part grows with age: each caption that states it teaches the age tokens
        facts.append(pick(_GA).format(*divmod(p['days'], 7)))
    if rng.random() < 0.95:
        facts.append(pick(_SPACING).format(pixel_mm))
    rng.shuffle(facts)
    return ', '.join([first] + facts) + '.'


TOY_PLANE_PROMPTS = {plane: [o.format(names[0]) + '.' for o in _OPENERS] for plane, names in zip(PLANES, _NAMES)}
TOY_BRAIN_PROMPTS = {sub: [o.format('fetal brain') + ' ' + s[0] + '.' for o in _OPENERS]
                     for sub, s in zip(BRAIN_PLANES, _SUBS)}


def toy_ga_prompts(weeks, days, pixel_mm):
    """Zero-shot prompts for 'this head is weeks+days old', in the captions' words, with the image's pixel spacing."""
    return [f"{o.format('fetal brain')}, {g.format(weeks, days)}, {s.format(pixel_mm)}."
            for o, g, s in zip(_OPENERS[:3], _GA, _SPACING)]


class ToyWorld(torch.utils.data.Dataset):
    """Item i -> dict(image=PIL 'L' size x size, caption, plane, brain_plane (-1 unless a brain), ga_weeks, hc_mm
    (NaN unless a brain), pixel_mm (mm per pixel at this size: render at the model's input size, or rescale it the
    way HC18 does). The same (seed, split, i) gives the same item; length defaults to 100k train, 1k val and test."""

    def __init__(self, split='train', size=64, seed=0, length=None, cache=False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.size, self.seed = split, size, seed
        self.cache = {} if cache else None  # rendering is most of a CPU batch's data time: keep items for the next epoch
        self.length = length or {'train': 100_000, 'val': 1000, 'test': 1000}[split]
        assert self.length <= _SPLIT_STRIDE

    def __len__(self):
        return self.length

    def index(self, i):
        """The world-wide index of item i of this split."""
        return SPLITS.index(self.split) * _SPLIT_STRIDE + i

    def facts(self, i, rng=None):
        """What item i shows, without rendering it: plane, brain_plane, days, hc, size, extent (mm), fov (mm)."""
        return _sample(rng or np.random.default_rng([self.seed, self.index(i)]))

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        if self.cache is not None and i in self.cache:
            return dict(self.cache[i])
        g = self.index(i)
        rng = np.random.default_rng([self.seed, g])
        p = self.facts(i, rng)
        pixel_mm = p['fov'] / self.size
        caption = _caption(p, pixel_mm, np.random.default_rng([self.seed, g, 1]))  # own stream: words can change
        item = dict(image=Image.fromarray(_render(p, self.size, rng)), caption=caption, plane=p['plane'],
                    brain_plane=p['brain_plane'], ga_weeks=p['days'] / 7, hc_mm=p['hc'], pixel_mm=pixel_mm)
        if self.cache is not None:
            self.cache[i] = item
        return dict(item)


def save_grid(path, n=16, size=128, split='train', seed=0):
    """Save n toy samples as one PNG, each labelled with its plane (or sub-plane) and age."""
    world, cols = ToyWorld(split, size, seed, n), math.ceil(math.sqrt(n))
    grid = Image.new('L', (cols * size, math.ceil(n / cols) * size))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        item, x, y = world[i], i % cols * size, i // cols * size
        grid.paste(item['image'], (x, y))
        name = BRAIN_PLANES[item['brain_plane']] if item['plane'] == 1 else PLANES[item['plane']]
        weeks, days = divmod(round(item['ga_weeks'] * 7), 7)
        draw.text((x + 3, y + 2), f"{name} {weeks}w{days}d", fill=255)
    grid.save(path)


# --- tokenizers ---
def _pack(seqs, context_length, eot):
    """Token lists -> LongTensor[N, context_length], zero-padded; a long one is cut but keeps its end token, since
    the text towers pool at the end token."""
    out = torch.zeros(len(seqs), context_length, dtype=torch.long)
    for row, ids in zip(out, seqs):
        ids = ids[:context_length - 1] + [eot] if len(ids) > context_length else ids
        row[:len(ids)] = torch.tensor(ids)
    return out


def _bytes_to_unicode():
    """CLIP's reversible map from the 256 byte values to printable characters, so BPE never sees spaces or controls."""
    bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the rest go to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# CLIP's pre-tokenizer. Python's re has no \p{L} / \p{N}: [^\W\d_] is letters plus the numeric characters outside
# Nd (², ½, Ⅻ), which _words() splits off again, and (?:[^\s\w]|_) is [^\s\p{L}\p{N}].
_CLIP_PAT = re.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")
_STRAIGHT_QUOTES = {**dict.fromkeys([0x2bc, *range(0x2018, 0x201c)], "'"), **dict.fromkeys(range(0x201c, 0x2020), '"')}


def _words(text):
    """_CLIP_PAT's pieces, with numbers outside Nd (², ½) split off their letter run, one each, as \\p{N} would."""
    for word in _CLIP_PAT.findall(text):
        if len(word) > 1 and word.isalnum() and not word.isalpha():
            for alpha, run in itertools.groupby(word, str.isalpha):
                yield from [''.join(run)] if alpha else run
        else:
            yield word


def _find_bpe(path=None):
    """The CLIP merges file: the argument, else $DARK_BPE, else the copy inside an installed open_clip."""
    path = path or os.environ.get('DARK_BPE')
    if not path:
        import importlib.util  # find open_clip without importing it
        spec = importlib.util.find_spec('open_clip')
        path = spec and spec.origin and Path(spec.origin).parent / 'bpe_simple_vocab_16e6.txt.gz'
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found ({path or 'no path given, DARK_BPE unset, open_clip not installed'}). "
            "Get bpe_simple_vocab_16e6.txt.gz from https://github.com/openai/CLIP/tree/main/clip or "
            "https://github.com/mlfoundations/open_clip/tree/main/src/open_clip, then pass it (train.py --bpe=PATH) or set DARK_BPE=PATH.")
    return path


class SimpleTokenizer:
    """CLIP's byte-level BPE (openai/CLIP simple_tokenizer.py), giving open_clip's ids: start 49406, end 49407,
    pad 0. Cleaning is open_clip's (html-unescape twice, collapse whitespace, lower-case) with ftfy.fix_text
    reduced to straight quotes and NFC; its repairs of mojibake, ligatures and full-width forms are left out."""

    def __init__(self, bpe_path=None, context_length=77):
        merges = gzip.open(_find_bpe(bpe_path)).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + '</w>' for v in vocab] + [''.join(m) for m in merges] + ['<start_of_text>', '<end_of_text>']
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder['<start_of_text>'], self.encoder['<end_of_text>']
        self.vocab_size, self.context_length = len(vocab), context_length
        self.cache = {}

    def bpe(self, token):
        """Merge the characters of one pre-token, lowest-ranked pair first, until no known pair is left."""
        if token not in self.cache:
            word = list(token[:-1]) + [token[-1] + '</w>']
            while len(word) > 1:
                best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            self.cache[token] = word
        return self.cache[token]

    def encode(self, text):
        text = html.unescape(html.unescape(text)).translate(_STRAIGHT_QUOTES)  # ftfy's fixes that clean text needs:
        text = ' '.join(unicodedata.normalize('NFC', text).split()).lower()  # straight quotes, composed accents
        ids = []
        for word in _words(text):
            ids += [self.encoder[t] for t in self.bpe(''.join(self.byte_encoder[b] for b in word.encode('utf-8')))]
        return ids

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        return _pack([[self.sot] + self.encode(t) + [self.eot] for t in texts], self.context_length, self.eot)


TOY_WORDS = tuple((  # everything the toy world says, one token each; new words go at the end so old ids keep their meaning
    'fetal maternal abdomen abdominal circumference plane belly brain head axial view of the femur length thigh '
    'bone thorax chest four chamber heart cervix uterine transvaginal in trans thalamic at level thalami '
    'cerebellum ventricular lateral ventricles stomach bubble umbilical vein spine skull midline falx cavum septi '
    'pellucidi femoral diaphysis acoustic shadow chambers ribs cervical canal internal os bladder third ventricle '
    'cisterna magna choroid plexus ultrasound image scan sonogram showing with visible seen weeks and days '
    'gestational age gestation pixel spacing mm per 0 1 2 3 4 5 6 7 8 9 . , - / : ; ( )').split())
TOY_NUMBERS = tuple(map(str, range(10, 41))) + ('1.50', '2.00', '2.50', '3.00')  # the ages in weeks and the toy
#   world's four pixel spacings at 64 px, one token each: a CLIP text tower learns what a number token means only
#   from the images it comes with, and one token per age is what it can learn in minutes; other numbers are spelled
TOY_VOCAB_SIZE = 160  # 0 pad, 1 start, 2 unknown, then TOY_WORDS and TOY_NUMBERS, then room to grow, end-of-text last
TOY_CONTEXT = 44  # the longest toy caption is 42 tokens with start and end


class ToyTokenizer:
    """The toy world's word-level tokenizer: lower-case words, punctuation marks, and numbers: one token for each of
    TOY_NUMBERS, any other number spelled out digit by digit. No file. An unknown word gets id 2. End-of-text is
    TOY_VOCAB_SIZE - 1, the largest id, because the text towers pool at argmax(token id), as CLIP's do."""

    def __init__(self, context_length=TOY_CONTEXT):
        self.ids = {word: i for i, word in enumerate(TOY_WORDS + TOY_NUMBERS, start=3)}
        self.sot, self.unk, self.eot = 1, 2, TOY_VOCAB_SIZE - 1
        self.vocab_size, self.context_length = TOY_VOCAB_SIZE, context_length

    def encode(self, text):
        words = re.findall(r'[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]', text.lower())
        spelled = lambda w: w[0].isdigit() and w not in self.ids  # a number without its own token: digit by digit
        return [self.ids.get(c, self.unk) for w in words for c in (w if spelled(w) else [w])]

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        return _pack([[self.sot] + self.encode(t) + [self.eot] for t in texts], self.context_length, self.eot)


def get_tokenizer(kind, context_length, bpe_path=None):
    """'toy' -> ToyTokenizer, 'bpe' -> SimpleTokenizer (CLIP's, for FetalCLIP and MobileCLIP2)."""
    if kind == 'toy':
        return ToyTokenizer(context_length)
    if kind == 'bpe':
        return SimpleTokenizer(bpe_path, context_length)
    raise ValueError(f"tokenizer kind must be 'toy' or 'bpe', got {kind!r}")


# --- the real formats ---
def load_image(path, where=''):
    """Open and decode an image now, so a missing or corrupt file fails here, naming the file and the row."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as e:  # missing, unreadable, not an image, truncated
        raise ValueError(f"{where + ': ' if where else ''}cannot read image {path}: {e}") from e


def _read_table(path, columns, sep):
    """Rows of a delimited text file as dicts with 'where' = 'file, line N'. Stray whitespace around headers and
    values is dropped (published files have it: FETAL_PLANES_DB's header says 'Train '); nothing else is forgiven."""
    path = Path(path)
    with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: a spreadsheet's byte-order mark is no header
        reader = csv.reader(f, delimiter=sep, skipinitialspace=True)
        header = [h.strip() for h in next(reader, [])]
        while header and not header[-1]:  # a trailing separator
            header.pop()
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the header has {header}")
        rows = []
        for values in reader:
            values = [v.strip() for v in values]
            while len(values) > len(header) and not values[-1]:
                values.pop()
            if not any(values):
                continue
            where = f"{path}, line {reader.line_num}"
            if len(values) != len(header):
                raise ValueError(f"{where}: {len(values)} fields where the header has {len(header)}")
            rows.append(dict(zip(header, values), where=where))
    return rows


def read_captions(path, image_col='filepath', caption_col='title', sep=None, root=None):
    """Image-caption pairs from a CSV (',') or TSV ('\\t', by extension) with open_clip's column names by default.
    Relative image paths are taken from root, else from the file's own folder. -> [dict(image_path, caption, where)]"""
    path = Path(path)
    sep = sep or ('\t' if path.suffix.lower() in ('.tsv', '.tab') else ',')
    root = Path(root) if root else path.parent
    rows = []
    for r in _read_table(path, (image_col, caption_col), sep):
        if not r[caption_col]:
            raise ValueError(f"{r['where']}: empty caption")
        rows.append(dict(image_path=root / r[image_col], caption=r[caption_col], where=r['where']))
    return rows


def _label(row, column, allowed):
    value = ' '.join(row[column].split())
    if value not in allowed:
        raise ValueError(f"{row['where']}: {column} {row[column]!r} is none of {allowed}")
    return value


def read_fetal_planes(root):
    """FETAL_PLANES_DB (Burgos-Artizzu et al. 2020): root/FETAL_PLANES_DB_data.csv (';') and root/Images/*.png.
    -> [dict(image_path, patient, plane, brain_plane, operator, machine, train, where)] for every row; plane indexes
    PLANES (-1: 'Other', which the 5-plane task leaves out), brain_plane BRAIN_PLANES (-1: 'Other', 'Not A Brain').
    An unknown label raises rather than quietly joining or leaving a class."""
    root = Path(root)
    columns = ('Image_name', 'Patient_num', 'Plane', 'Brain_plane', 'Operator', 'US_Machine', 'Train')
    rows = []
    for r in _read_table(root / 'FETAL_PLANES_DB_data.csv', columns, ';'):
        plane = _label(r, 'Plane', PLANES + ('Other',))
        brain = _label(r, 'Brain_plane', BRAIN_PLANES + ('Other', 'Not A Brain'))
        if brain in BRAIN_PLANES and plane != 'Fetal brain':
            raise ValueError(f"{r['where']}: Brain_plane {brain!r} on a {plane!r} image")
        rows.append(dict(image_path=root / 'Images' / f"{r['Image_name']}.png", patient=r['Patient_num'],
                         plane=PLANES.index(plane) if plane in PLANES else -1,
                         brain_plane=BRAIN_PLANES.index(brain) if brain in BRAIN_PLANES else -1,
                         operator=r['Operator'], machine=r['US_Machine'],
                         train=_label(r, 'Train', ('0', '1')) == '1', where=r['where']))
    return rows


def read_hc18(root):
    """HC18 (van den Heuvel et al. 2018): root/training_set_pixel_size_and_HC.csv and root/training_set/<filename>.
    -> [dict(image_path, pixel_mm, hc_mm, width, height, where)]. Each image's header is read here, so a missing
    file fails early; the pixel spacing of a model's input is max(width, height) / input_size * pixel_mm."""
    root = Path(root)
    rows = []
    for r in _read_table(root / 'training_set_pixel_size_and_HC.csv',
                         ('filename', 'pixel size(mm)', 'head circumference (mm)'), ','):
        try:
            pixel_mm, hc_mm = float(r['pixel size(mm)']), float(r['head circumference (mm)'])
        except ValueError as e:
            raise ValueError(f"{r['where']}: {e}") from e
        path = root / 'training_set' / r['filename']
        try:
            with Image.open(path) as image:
                width, height = image.size
        except OSError as e:
            raise ValueError(f"{r['where']}: cannot read image {path}: {e}") from e
        rows.append(dict(image_path=path, pixel_mm=pixel_mm, hc_mm=hc_mm, width=width, height=height,
                         where=r['where']))
    return rows


class ImageRows(torch.utils.data.Dataset):
    """A reader's rows as a dataset: item i is row i plus its decoded image."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return dict(row, image=load_image(row['image_path'], row['where']))


def expand_braces(pattern):
    """'shard_{0001..0003}.tar' -> shard_0001.tar, shard_0002.tar, shard_0003.tar (zero padding kept), and
    '{a,b}' -> a, b, as webdataset expands them; several groups multiply."""
    m = re.search(r'\{([^{}]*)\}', pattern)
    if not m:
        return [pattern]
    span = re.fullmatch(r'(\d+)\.\.(\d+)', m[1])
    items = [str(i).zfill(len(span[1])) for i in range(int(span[1]), int(span[2]) + 1)] if span else m[1].split(',')
    return [p for item in items for p in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


class TarShards(torch.utils.data.IterableDataset):
    """Image-caption pairs streamed from webdataset-style tar shards (members KEY.png|jpg|jpeg and KEY.txt, next to
    each other), so a corpus never has to fit in memory. The shards are dealt out over ranks (shard_by) and then over
    DataLoader workers; give each rank at least num_workers shards. skip_bad=True skips a bad sample or unreadable
    shard instead of raising, and reports each skip on stderr with its process's running count (also in .skipped)."""

    def __init__(self, pattern, skip_bad=False, shuffle=False, seed=0):
        self.shards = expand_braces(str(pattern))
        self.skip_bad, self.shuffle, self.seed = skip_bad, shuffle, seed
        self.rank, self.world_size, self.epoch = 0, 1, 0
        self.skipped = []

    def shard_by(self, rank, world_size):
        self.rank, self.world_size = rank, world_size
        return self

    def set_epoch(self, epoch):  # a new shard order each epoch, the same on every rank
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(shards)
        for shard in shards[self.rank * workers + worker::self.world_size * workers]:
            try:
                with tarfile.open(shard, 'r|*') as tar:  # stream mode: one pass, no index
                    key, group = None, {}
                    for member in tar:
                        if not member.isfile():
                            continue
                        folder, name = os.path.split(member.name)
                        stem, _, ext = name.partition('.')  # webdataset: the key ends at the first dot
                        if os.path.join(folder, stem) != key:
                            yield from self._sample(f"{shard}: {key}", group)
                            key, group = os.path.join(folder, stem), {}
                        group[ext.lower()] = tar.extractfile(member).read()
                    yield from self._sample(f"{shard}: {key}", group)
            except (tarfile.TarError, OSError) as e:
                self._bad(shard, f"unreadable shard ({e})")

    def _sample(self, where, group):
        if not group:
            return
        try:
            ext = next((e for e in ('png', 'jpg', 'jpeg') if e in group), None)
            if ext is None or 'txt' not in group:
                raise ValueError(f"needs an image (.png/.jpg/.jpeg) and a .txt, has {sorted(group)}")
            caption = group['txt'].decode('utf-8').strip()
            if not caption:
                raise ValueError('empty caption')
            image = Image.open(io.BytesIO(group[ext]))
            image.load()
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError, a corrupt image an OSError
            self._bad(where, e)
            return
        yield dict(image=image, caption=caption, where=where)

    def _bad(self, where, why):
        if not self.skip_bad:
            raise ValueError(f"{where}: {why} (TarShards(skip_bad=True) skips and counts such samples)")
        self.skipped.append((where, str(why)))
        print(f"data: skipped {where}: {why} [{len(self.skipped)} skipped so far]", file=sys.stderr)


# --- preprocessing, as FetalCLIP and MobileFetalCLIP do it ---
def pad_square(image):
    """Zero-pad to a centred black square (FetalCLIP's make_image_square_with_zero_padding): resizing then keeps
    the anatomy's proportions."""
    if image.mode not in ('L', 'RGB'):
        image = image.convert('RGB')
    w, h = image.size
    square = Image.new(image.mode, (max(w, h),) * 2)
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


class Preprocess:
    """PIL image -> FloatTensor[3, size, size]: pad to a square, bicubic resize, gray to RGB, normalise."""

    def __init__(self, size, mean=CLIP_MEAN, std=CLIP_STD):
        self.size = size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image):
        return self.finish(pad_square(image))

    def finish(self, square):
        # open_clip's Resize(size, bicubic) + CenterCrop(size); on a square the crop has nothing left to cut
        x = torch.from_numpy(np.asarray(square.resize((self.size,) * 2, Image.BICUBIC), dtype=np.float32) / 255)
        x = x.expand(3, -1, -1) if x.ndim == 2 else x.permute(2, 0, 1)  # shape = [3, size, size]
        return (x - self.mean) / self.std


class DistillTransform:
    """PIL image -> (teacher view, student view) from ONE random draw (rotation up to 7 degrees, translation up to
    5%, brightness and contrast x [0.85, 1.15]) applied once to the padded square, so both models see the same
    picture, each at its own size and normalisation. teacher/student = (size, mean, std). The draw uses torch's
    generator, which DataLoader seeds per worker."""

    def __init__(self, teacher, student, augment=True):
        self.views = (Preprocess(*teacher), Preprocess(*student))
        self.augment = augment

    def __call__(self, image):
        square = pad_square(image)
        if self.augment:
            angle, dx, dy, bright, contrast = (2 * torch.rand(5) - 1).tolist()
            shift = 0.05 * square.size[0]
            square = square.rotate(7 * angle, Image.BICUBIC, translate=(shift * dx, shift * dy))
            square = ImageEnhance.Brightness(square).enhance(1 + 0.15 * bright)  # what torchvision's ColorJitter does
            square = ImageEnhance.Contrast(square).enhance(1 + 0.15 * contrast)
        return tuple(view.finish(square) for view in self.views)


class Collate:
    """DataLoader collate_fn: list of item dicts -> batch dict. 'image' goes through transform and is stacked (a
    DistillTransform gives a (teacher, student) pair of stacks); with a tokenizer, captions become 'ids'; other
    numbers become tensors, and strings and paths lists."""

    def __init__(self, transform, tokenizer=None):
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, items):
        views = [self.transform(item['image']) for item in items]
        batch = {'image': tuple(map(torch.stack, zip(*views))) if isinstance(views[0], tuple) else torch.stack(views)}
        for key in items[0].keys() - {'image'}:
            values = [item[key] for item in items]
            batch[key] = torch.tensor(values) if isinstance(values[0], (int, float)) else values
        if self.tokenizer is not None:
            batch['ids'] = self.tokenizer([item['caption'] for item in items])
        return batch


if __name__ == '__main__':
    import time
    torch.set_num_threads(1)
    out = sys.argv[1] if len(sys.argv) > 1 else 'toy_samples.png'
    save_grid(out)
    print(f"saved {out}")
    for i in range(6):
        print(ToyWorld('train')[i]['caption'])
    for size, n in ((64, 500), (224, 100)):
        world, start = ToyWorld('train', size), time.perf_counter()
        for i in range(n):
            world[i]
        print(f"{size} px: {n / (time.perf_counter() - start):.0f} images/s on one core")
