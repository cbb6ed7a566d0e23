"""
Everything that turns files, or nothing at all, into images, captions and tensors:

    python data.py --out=toy_samples.png     # save a grid of toy samples, print captions and the images/s

The toy world, in a few lines. Item i of a split is a B-mode-like fetal ultrasound image rendered from
(seed, split, i) alone: a fan-shaped field of view on black with speckle, depth attenuation, bright bone echoes
that cast acoustic shadows, and one of five planes, shown near horizontal as sonographers display them: fetal
abdomen (stomach bubble, umbilical vein, spine), fetal brain (skull ring, midline), fetal femur (a bright bar), fetal
thorax (four-chamber heart, ribs) or maternal cervix (canal). Three scans in five are heads, cut trans-thalamic (grey
thalami in the middle), trans-cerebellum (a bright cerebellum at the back) or trans-ventricular (a bright choroid
plexus in the far ventricle): structures a quarter to two thirds of the head long, inside a head of 20-50 pixels.
The gestational age (14-40 weeks) sets sizes in mm; a head's circumference follows the WHO curve with its spread. The
field of view has one of four widths, so a head spans HC / pixel_mm pixels around and the age can be read only from the
image and the pixel spacing in the text together, as in HC18. A caption states the plane (and most heads' sub-plane)
and some of: structures seen, age in weeks and days with the pixel spacing; each age in weeks and each spacing is one
token of the toy tokenizer.

The real formats: caption CSV/TSV, webdataset tar shards, FETAL_PLANES_DB, HC18; then FetalCLIP's preprocessing.
"""
import collections
import contextlib
import csv
import difflib
import errno
import functools
import gzip
import hashlib
import html
import io
import itertools
import json
import lzma
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import unicodedata
import zlib
from pathlib import Path

if sys.version_info < (3, 10):  # the floor of every script (each imports this file): zip(strict=), str.removeprefix
    sys.exit(f"DARK needs Python 3.10 or later; this is {sys.version.split()[0]}")

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
FIELDS_MM = (112, 128, 144, 160)  # field-of-view widths: 1.75/2/2.25/2.5 mm/pixel at 64 px, few enough to learn
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
    # the sonographer zooms so the part fills 30-85% of the width (the smallest field if none does): fields close
    # together and a wide range, so that most sizes fit every field and the spacing alone says little about the age
    fits = [f for f in FIELDS_MM if 0.3 <= extent / f <= 0.85] or [FIELDS_MM[0]]
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
    c.blob(0.15 * a, -0.35 * b, 0.36 * a, 0.26 * b, 0.03)  # stomach bubble, large: belly and chest are most confused
    c.blob(0.3 * a, 0.1 * b, 0.3 * a, 0.06 * b, 0.05)  # umbilical vein
    for du, dv in ((-0.8, 0), (-0.66, -0.13), (-0.66, 0.13)):  # the spine's three ossification centres
        c.mark(c.inside(du * a, dv * b, 0.06 * a, 0.06 * a), 1.5, 0.4)


def _brain(c, rng, p):
    a, b = _axes(p['size'], rng.uniform(0.74, 0.86))  # cephalic index
    brain = rng.uniform(0.12, 0.2)
    c.blob(0, 0, a, b, brain)
    c.mark(c.ring(a, b, 0.02 * a + 0.3), 1.6, 0.1)  # the skull, where HC is measured: the brightest echo
    c.mark(c.line(1.7 * a, 0.4), 0.3)  # midline falx
    # the sub-plane's structures are drawn large and at full contrast (a quarter to two thirds of the head long): at
    # 64 px a head is 20-50 pixels, and smaller, fainter ones took a model far longer than the default run to find
    # (measured: the teacher's brain F1 stayed at chance)
    blob = lambda du, dv, ra, rb, echo: c.blob(du * a, dv * b, ra * a, rb * b, echo)
    blob(0.45, 0, 0.16, 0.13, 0.02)  # cavum septi pellucidi, in all three planes: it marks the front
    if p['brain_plane'] == 0:  # trans-thalamic: two grey thalami either side of the dark third ventricle, centred
        for side in (-1, 1):
            blob(-0.05, side * 0.22, 0.42, 0.32, 0.45)
        blob(-0.05, 0, 0.38, 0.08, 0.0)
    elif p['brain_plane'] == 1:  # trans-cerebellum: the bright cerebellum at the back, the dark cisterna magna behind
        for side in (-1, 1):
            blob(-0.55, side * 0.2, 0.27, 0.35, 1.0)
        blob(-0.82, 0, 0.16, 0.56, 0.0)
    else:  # trans-ventricular: the far lateral ventricle, dark, filled by its bright choroid plexus
        blob(-0.1, 0.5, 0.96, 0.29, 0.0)
        blob(-0.2, 0.5, 0.64, 0.19, 1.0)


def _femur(c, rng, p):
    length = p['size']
    c.blob(0, 0, 0.75 * length, 0.22 * length, 0.3)  # thigh
    c.mark(c.line(length, 0.02 * length + 0.4, rng.uniform(-0.1, 0.1) / length), 1.6, 0.6)  # the bone


def _thorax(c, rng, p):
    a, b = _axes(p['size'], rng.uniform(0.85, 0.97))
    c.blob(0, 0, a, b, 0.7)  # lungs: brighter than liver
    c.mark(c.ring(a, b, 0.8), 0.3, 0.02)
    ribs = np.cos(7 * np.arctan2(c.v / b, c.u / a) + rng.uniform(0, 2 * math.pi)) > 0.5  # arcs around the wall
    c.mark(c.ring(0.93 * a, 0.93 * b, 0.6) * ribs, 1.5, 0.6)  # their shadows streak the chest: no belly has them
    c.mark(c.inside(-0.85 * a, 0, 0.07 * a, 0.07 * a), 1.5, 0.4)  # spine
    r = 0.55 * a
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
# Most head captions name the sub-plane, not all: with every one naming it, no caption says just "fetal brain", the
# text tower learns three head concepts and no plane-level one, and the plane's prompt falls between them (one
# teacher: some sub-plane prompt beat every other plane's for 99% of test heads, the plane's for 89%). 85%: planes F1
# 0.967 / 0.961, brain 0.857 / 0.829 on two teacher seeds, against 0.945 / 0.911 and 0.887 / 0.884 at 100%, 0.951 /
# 0.962 and 0.697 / 0.818 at 67% (README, "The toy run").
_SUB_NAMED = 0.85


def _caption(p, pixel_mm, rng):
    pick = lambda options: options[rng.integers(len(options))]
    head = p['plane'] == 1
    first = pick(_OPENERS).format(pick(_NAMES[p['plane']]))
    if head and rng.random() < _SUB_NAMED:
        first += ' ' + pick(_SUBS[p['brain_plane']])
    facts = []
    seen = _SEEN[p['plane']] + (_SUB_SEEN[p['brain_plane']] if head else ())
    k = int(rng.integers(3))
    if k:
        facts.append(pick(_SHOWING).format(' and '.join(rng.choice(seen, k, replace=False))))
    # age and spacing come together (the GA task reads both), in four captions in five: a CLIP text tower learns what
    # an age token means only from the images it comes with (teacher validity 34% and 61% at epoch 3 in two runs,
    # against 25-31% with the age in half the captions; sub-planes are now large enough to be learnt beside the ages)
    if rng.random() < 0.8:
        facts += [pick(_GA).format(*divmod(p['days'], 7)), pick(_SPACING).format(pixel_mm)]
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
                    brain_plane=p['brain_plane'], ga_weeks=p['days'] / 7, hc_mm=p['hc'], pixel_mm=pixel_mm, index=i)
        if self.cache is not None:
            self.cache[i] = item
        return dict(item)


def save_grid(path, n=16, size=128, split='train', seed=0):
    """Save n toy samples as one PNG, each labelled with its plane (or sub-plane) and age. OSError names path."""
    world, cols = ToyWorld(split, size, seed, n), math.ceil(math.sqrt(n))
    grid = Image.new('L', (cols * size, math.ceil(n / cols) * size))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        item, x, y = world[i], i % cols * size, i // cols * size
        grid.paste(item['image'], (x, y))
        name = BRAIN_PLANES[item['brain_plane']] if item['plane'] == 1 else PLANES[item['plane']]
        weeks, days = divmod(round(item['ga_weeks'] * 7), 7)
        draw.text((x + 3, y + 2), f"{name} {weeks}w{days}d", fill=255)
    try:
        grid.save(path)
    except OSError as e:  # a full disk: Pillow's error names no file, and leaves a cut one
        Path(path).unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e


# --- tokenizers ---
class Tokenizer:
    """What both tokenizers share: texts -> LongTensor[N, context_length] of start, encode(text), end, zero-padded;
    a long one is cut but keeps its end token, since the text towers pool at the end token."""

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in zip(out, texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            ids = ids[:self.context_length - 1] + [self.eot] if len(ids) > self.context_length else ids
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


# CLIP's pre-tokenizer, as open_clip writes it but for '<end_of_text>' (clean_text says why). Python's re has no
# \p{L} / \p{N}: [^\W\d_] is letters plus the numeric characters outside Nd (², ½, Ⅻ), which _words() splits off
# again, and (?:[^\s\w]|_) is [^\s\p{L}\p{N}].
_CLIP_PAT = re.compile(r"<start_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.I)  # I: 'ſ is 's


def _ftfy_tables():
    """What ftfy.fix_text (6.x, default settings) does character by character, from Unicode's own data: one
    str.translate table for its fixes in their order (C1 controls read as Windows-1252, keeping the five codes it
    leaves undefined; Latin ligatures split one level; half- and full-width forms and U+3000 to their plain forms;
    curly quotes straightened) and one for the controls it drops (C0 but tab, newline, form feed and carriage return;
    DEL; deprecated Arabic format controls U+206A-206F; the byte-order mark; U+FFF9-FFFC)."""
    quotes = {**dict.fromkeys([0x2bc, *range(0x2018, 0x201c)], "'"), **dict.fromkeys(range(0x201c, 0x2020), '"')}
    split = lambda c: ''.join(chr(int(h, 16)) for h in unicodedata.decomposition(chr(c)).split()[1:])
    ligatures = {c: split(c) for c in (0x132, 0x133, 0x149, *range(0x1c4, 0x1cd), *range(0x1f1, 0x1f4),
                                       *range(0xfb00, 0xfb07))}
    width = {0x3000: ' ', **{c: unicodedata.normalize('NFKC', chr(c)) for c in range(0xff01, 0xfff0)
                             if unicodedata.normalize('NFKC', chr(c)) != chr(c)}}
    c1 = {c: bytes([c]).decode('cp1252', 'ignore') or chr(c) for c in range(0x80, 0xa0)}
    fix = {**quotes, **width, **ligatures, **c1}
    fix = {c: s.translate(ligatures).translate(width).translate(quotes) for c, s in fix.items()}
    drop = dict.fromkeys([*range(9), 0xb, *range(0xe, 0x20), 0x7f, *range(0x206a, 0x2070), 0xfeff,
                          *range(0xfff9, 0xfffd)])
    return fix, drop


_FTFY_FIX, _FTFY_DROP = _ftfy_tables()
_FTFY_ESCAPE = re.compile('\x1b\\[[\\d;]*[a-zA-Z]')  # ftfy removes colour codes and cursor moves only
_ENTITY = re.compile(r'&#?[0-9A-Za-z]{1,24};')  # ftfy's unescaping: only what ends in ';', some names in capitals
_ENTITIES = {f'&{n}': c for n, c in html.entities.html5.items() if n.endswith(';')}
_ENTITIES.update({f'&{n.upper()}': c.upper() for n, c in html.entities.html5.items() if n.endswith(';')
                  and n == n.lower() and html.unescape(f'&{n.upper()}') == f'&{n.upper()}'})


def _entity(match):
    """One '&...;' as ftfy unescapes it: a known name, or a numeric reference that html.unescape reads whole."""
    text = match[0]
    if text in _ENTITIES:
        return _ENTITIES[text]
    plain = html.unescape(text) if text.startswith('&#') else text
    return text if ';' in plain else plain  # html.unescape read only a part of it


def _ftfy(segment, unescape):
    """ftfy.fix_text's passes over one segment, repeated until nothing changes, mojibake repair left out."""
    while True:
        before = segment
        if unescape:
            segment = _ENTITY.sub(_entity, segment)
        segment = segment.translate(_FTFY_FIX)
        segment = segment.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')  # pairs joined, else U+FFFD
        segment = unicodedata.normalize('NFC', _FTFY_ESCAPE.sub('', segment).translate(_FTFY_DROP))
        if segment == before:
            return segment


def clean_text(text):
    """A caption as open_clip cleans it before BPE: ftfy.fix_text with its defaults, html.unescape twice, whitespace
    collapsed, lower case, with ftfy written out here (no dependency). ftfy works line by line (at most 1e6
    characters a segment); it unescapes HTML entities that end in ';' unless a '<' was seen in this or an earlier
    line; reads C1 controls as the Windows-1252 characters they stand for (\\x92 -> ’); splits Latin ligatures (ﬁ);
    turns half- and full-width forms into plain ones; straightens curly quotes; joins surrogate pairs, a lone one
    becoming U+FFFD; removes colour and cursor escapes (ESC [ digits ; letter); drops C0 controls but whitespace, DEL,
    the byte-order mark and a few more (_ftfy_tables); NFC. It keeps zero-width spaces and joiners, soft hyphens,
    bidi marks, variation selectors and emoji tags, and so does this.

    Where the ids differ from open_clip's (a test pins each): ftfy's mojibake repair (fix_encoding: text decoded in
    the wrong encoding, 'Ã©' for 'é') is not done, so such a caption tokenizes as written; SimpleTokenizer keeps the
    literal text '<end_of_text>' as text, where open_clip makes it the end token and the text tower, which pools at
    the first end token, would ignore the rest of the caption; and a character newer than Python's Unicode database
    (unicodedata.unidata_version, 14.0 in Python 3.11) is no letter to Python's re, where open_clip's regex module
    may know it. A lone surrogate becomes U+FFFD, as ftfy makes it."""
    out, unescape = [], True
    for segment in re.findall(r'[^\n]{0,999999}\n|[^\n]{1,1000000}', text):
        unescape = unescape and '<' not in segment  # ftfy: once a line looks like HTML, it unescapes no more
        out.append(_ftfy(segment, unescape))
    return ' '.join(html.unescape(html.unescape(''.join(out))).split()).lower()


def _words(text):
    """_CLIP_PAT's pieces, with numbers outside Nd (², ½) split off their letter run, one each, as \\p{N} would."""
    for word in _CLIP_PAT.findall(text):
        if len(word) > 1 and word.isalnum() and not word.isalpha():
            for alpha, run in itertools.groupby(word, str.isalpha):
                yield from [''.join(run)] if alpha else run
        else:
            yield word


def _find_bpe(path=None):
    """The CLIP merges file: the argument, else $DARK_BPE, else the copy inside an installed open_clip (pip install
    open_clip_torch bundles it)."""
    path = path or os.environ.get('DARK_BPE')
    if not path:
        import importlib.util  # find open_clip without importing it
        spec = importlib.util.find_spec('open_clip')
        path = spec and spec.origin and Path(spec.origin).parent / 'bpe_simple_vocab_16e6.txt.gz'
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found ({path or 'no path given, DARK_BPE unset, open_clip not installed'}). "
            "Get bpe_simple_vocab_16e6.txt.gz from https://github.com/openai/CLIP/tree/main/clip or "
            "https://github.com/mlfoundations/open_clip/tree/main/src/open_clip (pip install open_clip_torch bundles "
            "it, and it is found then), or pass it (--bpe=PATH to train.py, eval.py or export_ios.py) or set "
            "DARK_BPE=PATH. A checkpoint train.py wrote carries its own copy.")
    return path


_BPE_MERGES = 49152 - 256 - 2  # CLIP's 49408 ids: 256 bytes, the same with '</w>', these merges, 2 special tokens


def read_bpe(raw, path):
    """The first _BPE_MERGES merges of CLIP's merges file -> [(a, b), ...]. raw: the file's bytes, gzipped or the same
    file gunzipped (bpe_simple_vocab_16e6.txt: browsers unpack .gz on download); path: where they came from, for the
    message. Anything else raises ValueError naming the file and what it holds: an empty file, an HTML page, a
    download cut short, another first line."""
    refuse = lambda what: ValueError(f"CLIP BPE vocabulary {path}: {what}. Expected bpe_simple_vocab_16e6.txt.gz "
                                     "(or the same file gunzipped)")
    try:
        raw = gzip.decompress(raw) if raw[:2] == b'\x1f\x8b' else raw
    except (EOFError, OSError, zlib.error) as e:
        raise refuse(f"a gzip file cut short or damaged ({e})") from None
    lines = raw.decode('utf-8', 'replace').split('\n')
    merges = [tuple(m.split()) for m in lines[1:_BPE_MERGES + 1]]
    good = next((i for i, m in enumerate(merges) if len(m) != 2), len(merges))  # merges before the first bad line
    if not raw.strip():
        raise refuse('an empty file')
    if re.match(rb'\s*<(!doctype|html|\?xml)', raw, re.I):
        raise refuse("an HTML page, not the file (a download of the web page? take the 'raw' link)")
    if '#version' not in lines[0]:
        raise refuse(f"a first line {lines[0][:60]!r}, where a merges file has its '#version' line")
    if good < _BPE_MERGES:
        raise refuse(f"{good} merges, then {'the end' if good == len(merges) else f'line {good + 2}'} (cut short?), "
                     f"where CLIP's vocabulary needs {_BPE_MERGES}")
    return merges


class SimpleTokenizer(Tokenizer):
    """CLIP's byte-level BPE (openai/CLIP simple_tokenizer.py), giving open_clip's ids: start 49406, end 49407,
    pad 0, after clean_text (open_clip's cleaning, with the differences listed there). bpe_path: the merges file, or
    its bytes as a checkpoint stores them (`vocab_file`: what train.py saves, so a checkpoint carries its tokenizer)."""

    def __init__(self, bpe_path=None, context_length=77):
        path = None if isinstance(bpe_path, bytes) else _find_bpe(bpe_path)
        self.vocab_file = bpe_path if path is None else Path(path).read_bytes()
        merges = read_bpe(self.vocab_file, path or 'carried by the checkpoint')
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + '</w>' for v in vocab] + [''.join(m) for m in merges] + ['<start_of_text>', '<end_of_text>']
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder['<start_of_text>'], self.encoder['<end_of_text>']
        self.vocab_size, self.context_length = len(vocab), context_length
        self.cache = {'<start_of_text>': ['<start_of_text>']}  # as open_clip: the start token, in a caption too

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
        ids = []
        for word in _words(clean_text(text)):
            ids += [self.encoder[t] for t in self.bpe(''.join(self.byte_encoder[b] for b in word.encode('utf-8')))]
        return ids


TOY_WORDS = tuple((  # everything the toy world says, one token each; new words go at the end so old ids keep their meaning
    'fetal maternal abdomen abdominal circumference plane belly brain head axial view of the femur length thigh '
    'bone thorax chest four chamber heart cervix uterine transvaginal in trans thalamic at level thalami '
    'cerebellum ventricular lateral ventricles stomach bubble umbilical vein spine skull midline falx cavum septi '
    'pellucidi femoral diaphysis acoustic shadow chambers ribs cervical canal internal os bladder third ventricle '
    'cisterna magna choroid plexus ultrasound image scan sonogram showing with visible seen weeks and days '
    'gestational age gestation pixel spacing mm per 0 1 2 3 4 5 6 7 8 9 . , - / : ; ( )').split())
TOY_WEEKS = tuple(map(str, range(10, 41)))  # the ages in weeks ...
TOY_SPACINGS = tuple(f'{f / 64:.2f}' for f in FIELDS_MM)  # ... and the four pixel spacings at 64 px, one token each,
TOY_NUMBERS = TOY_WEEKS + TOY_SPACINGS  # whose embeddings start in the order of their values (train.init_toy_numbers:
#   teacher GA validity 31% -> 68% on one seed); other numbers are spelled
TOY_VOCAB_SIZE = 160  # 0 pad, 1 start, 2 unknown, then TOY_WORDS and TOY_NUMBERS, then room to grow, end-of-text last
TOY_CONTEXT = 44  # the longest toy caption is 42 tokens with start and end


class ToyTokenizer(Tokenizer):
    """The toy world's word-level tokenizer: lower-case words, punctuation marks, and numbers, after clean_text: one
    token for each of TOY_NUMBERS, any other number spelled out digit by digit. No file. An unknown word gets id 2.
    End-of-text is TOY_VOCAB_SIZE - 1, the largest id, because the text towers pool at argmax(token id), as CLIP's do."""

    def __init__(self, context_length=TOY_CONTEXT):
        self.ids = {word: i for i, word in enumerate(TOY_WORDS + TOY_NUMBERS, start=3)}
        self.sot, self.unk, self.eot = 1, 2, TOY_VOCAB_SIZE - 1
        self.vocab_size, self.context_length = TOY_VOCAB_SIZE, context_length

    def encode(self, text):
        words = re.findall(r'[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]', clean_text(text))
        spelled = lambda w: w[0].isdigit() and w not in self.ids  # a number without its own token: digit by digit
        return [self.ids.get(c, self.unk) for w in words for c in (w if spelled(w) else [w])]

    def unknown_share(self, texts):
        """The share of the tokens of texts that are unknown words (0 for no tokens)."""
        ids = [i for text in texts for i in self.encode(text)]
        return ids.count(self.unk) / max(len(ids), 1)


def get_tokenizer(kind, context_length, bpe_path=None):
    """'toy' -> ToyTokenizer, 'bpe' -> SimpleTokenizer (CLIP's, for FetalCLIP and MobileCLIP2; bpe_path: the merges
    file or its bytes, else _find_bpe's places)."""
    if kind == 'toy':
        return ToyTokenizer(context_length)
    if kind == 'bpe':
        return SimpleTokenizer(bpe_path, context_length)
    raise ValueError(f"tokenizer kind must be 'toy' or 'bpe', got {kind!r}")


# --- the real formats ---
# Every way Pillow reports an image it cannot decode: missing, zero bytes or an unknown format (OSError, of which
# UnidentifiedImageError), cut short or corrupt (OSError, SyntaxError, EOFError, struct.error, ValueError, IndexError
# from its format plugins), too many pixels (DecompressionBombError: Pillow's guard against a small file that
# decodes to gigabytes, an Exception only), and a mode as_l_or_rgb refuses (ValueError).
DECODE_ERRORS = (OSError, SyntaxError, EOFError, struct.error, ValueError, IndexError, Image.DecompressionBombError)


def as_l_or_rgb(image):
    """Any image a dataset holds -> mode 'L' (grey) or 'RGB', 8 bits, each value meaning what it meant: '1' -> L
    (0, 255); P, CMYK, YCbCr, RGBX -> RGB (Pillow's conversion); an alpha channel (LA, PA, RGBA, P with
    transparency) is composited over black, the colour of the padding; 16-bit grey (I;16, I;16B, I;16L, I;16N, as
    ultrasound and DICOM exports are saved, and I holding 0..65535, as older Pillow opened them) -> L = value / 257
    rounded, the 16-bit range scaled to 8 bits; F holding 0..1 -> L = 255 * value rounded. Anything else (LAB, HSV,
    I or F outside those ranges) raises ValueError naming the mode: there is no one right scale."""
    mode = image.mode
    if mode in ('L', 'RGB'):
        return image
    if mode in ('1', 'CMYK', 'YCbCr', 'RGBX') or mode == 'P' and 'transparency' not in image.info:
        return image.convert('L' if mode == '1' else 'RGB')
    if mode in ('LA', 'PA', 'RGBA', 'P'):
        black = Image.new('RGBA', image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image.convert('RGBA')).convert('L' if mode == 'LA' else 'RGB')
    top = {'F': 1.0, 'I': 65535}.get(mode, 65535 if mode.startswith('I;16') else None)
    x = np.asarray(image) if top else None
    if top is None or not (np.isfinite(x).all() and 0 <= x.min() and x.max() <= top):
        raise ValueError(f"image mode {mode!r}{f' with values {x.min()}..{x.max()}' if top else ''} is not read here: "
                         "save it as 8-bit or 16-bit grey or RGB (PNG), or as 32-bit float in 0..1")
    return Image.fromarray(np.round(x.astype(np.float64) * (255 / top)).astype(np.uint8))


def check_square(width, height):
    """Raises DecompressionBombError when the black square that pad_square makes of a width x height image would
    have more pixels than Pillow's bomb limit (Image.MAX_IMAGE_PIXELS; None: no limit): a 1.5 KB PNG of 60000 x 8
    pixels pads to 3.6 G pixels."""
    side, limit = max(width, height), Image.MAX_IMAGE_PIXELS
    if limit and side * side > limit:
        raise Image.DecompressionBombError(f"{width} x {height} pixels pad to a {side} x {side} square, over Pillow's "
                                           f"limit of {limit} pixels (Image.MAX_IMAGE_PIXELS): crop or resize it")


def load_image(source, where='', header_only=False):
    """Decode an image now -> PIL image in mode 'L' or 'RGB' (as_l_or_rgb). source: a path, or the bytes of a shard
    member. Anything in DECODE_ERRORS raises ValueError naming where (the file and row) and the cause; the readers
    skip on it or stop. An image whose padded square check_square refuses is one of them, refused from its header.
    header_only: open without decoding the pixels (size and mode; a bomb is still refused)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            check_square(*image.size)
            if header_only:
                return image
            image.load()
            return as_l_or_rgb(image)
    except DECODE_ERRORS as e:
        name = f"({len(source)} bytes)" if isinstance(source, bytes) else source
        raise ValueError(f"{where + ': ' if where else ''}cannot read image {name}: {type(e).__name__}: {e}") from e


def _skip(skipped, where, why):
    """Count a skipped sample and say so on stderr, with this process's running count."""
    skipped.append((where, str(why)))
    print(f"data: skipped {where}: {why} [{len(skipped)} skipped so far]", file=sys.stderr)


_BOMS = ((b'\xef\xbb\xbf', 'utf-8-sig'), (b'\xff\xfe\x00\x00', 'utf-32'), (b'\x00\x00\xfe\xff', 'utf-32'),
         (b'\xff\xfe', 'utf-16'), (b'\xfe\xff', 'utf-16'))  # utf-32's mark starts like utf-16's: test it first
_SEPARATORS = {',': 'comma', ';': 'semicolon', '\t': 'tab', '|': 'pipe'}


def _line_of(text):
    """1-based number of the line that text's end sits on, counting \\n, \\r\\n and a lone \\r as csv does."""
    return text.count('\n') + text.count('\r') - text.count('\r\n') + 1


def decode_text(raw, name):
    """Bytes of a caption file or shard caption -> str: UTF-8, or UTF-8, UTF-16 or UTF-32 with a byte-order mark
    (Excel's 'CSV UTF-8' and 'Unicode text'). Anything else (Windows-1252 'ANSI', Latin-1, UTF-16 without a mark)
    raises ValueError naming name and the line: such bytes decode as *some* text in almost any single-byte encoding,
    so a guess would silently change captions."""
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), 'utf-8')
    if encoding == 'utf-8' and b'\0' in raw:  # UTF-8 text has no NUL; UTF-16/32 text of Latin letters is half NULs
        raise ValueError(f"{name}, line {_line_of(raw[:raw.index(0)].decode('latin-1'))}: a NUL byte (UTF-16 without "
                         "a byte-order mark?); save it as UTF-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = _line_of(raw[:e.start].decode(encoding, 'replace'))
        raise ValueError(f"{name}, line {line}: not {encoding.removesuffix('-sig')} (bytes {raw[e.start:e.start + 4]!r})."
                         " Save it as UTF-8 (Excel: 'CSV UTF-8'; or iconv -f cp1252 -t utf-8): other encodings are "
                         "not guessed") from None
    return text


def read_table(path, columns, sep=None):
    """Rows of a delimited text file (CSV, TSV, FETAL_PLANES_DB's ';' file) -> [dict(header -> value, where)], where
    'where' is 'PATH, line N' with N the line each row starts on (a quoted caption may span lines). sep: one
    character, or '\\t' for a tab; None: tab for .tsv/.tab, else ',', unless the header holds every name in columns
    only when split at one other of , ; tab | (detected: a spreadsheet saves ';' where ',' is the decimal mark).
    Every name in columns must be in the header.

    The encoding is decode_text's. Stray whitespace and byte-order marks around headers and values are dropped
    (published files have them: FETAL_PLANES_DB's header says 'Train '), as are trailing separators and blank lines;
    nothing else is forgiven: another encoding, a wrong field count, a quote never closed, a missing or doubled
    column raise ValueError naming the file and line. Quoting is csv's (Excel's): '"a" ,' reads as a; a quote inside
    an unquoted field (5" probe) is a character."""
    path, raw, detect = Path(path), Path(path).read_bytes(), sep is None
    sep = {None: '\t' if path.suffix.lower() in ('.tsv', '.tab') else ',', '\\t': '\t'}.get(sep, sep)
    if len(sep) != 1:
        raise ValueError(f"separator must be one character (or '\\t'), got {sep!r}")
    text = decode_text(raw, path)
    lines = io.StringIO(text, newline='').readlines()  # split as csv splits: at \\n, \\r\\n and a lone \\r
    reader = csv.reader(lines, delimiter=sep, skipinitialspace=True)  # not strict: '"a" ,' is a, as spreadsheets read it
    header, rows = None, []
    while True:
        start = reader.line_num + 1  # the line this record starts on
        where = f"{path}, line {start}"
        try:
            values = [v.replace('\ufeff', '').strip() for v in next(reader)]
        except StopIteration:
            break
        except csv.Error as e:  # NUL is caught above; what is left is csv.field_size_limit
            raise ValueError(f"{where}: {e} (a quote opened here and never closed?)") from None
        while values and not values[-1] and (header is None or len(values) > len(header)):
            values.pop()  # a trailing separator
        if not any(values):
            continue
        quote = f" (a quote opened on line {start} and closed on line {reader.line_num}?)" * (reader.line_num > start)
        if reader.line_num == len(lines) > start:  # the last record spans lines: was its quote ever closed?
            try:
                list(csv.reader(lines[start - 1:], delimiter=sep, skipinitialspace=True, strict=True))
            except csv.Error as e:
                if 'end of data' in str(e):
                    raise ValueError(f"{where}: a quote opened here is never closed") from None
        if header is None:
            header, missing = values, [c for c in columns if c not in values]
            fits = [s for s in _SEPARATORS if s != sep and set(columns) <= {v.strip() for v in sep.join(values).split(s)}]
            if missing and detect and len(fits) == 1:
                return read_table(path, columns, fits[0])
            if missing:
                guess = next((f"; it looks {name}-separated: pass sep={s!r} (train.py --csv_separator)"
                              for s, name in _SEPARATORS.items() if s != sep and s in ''.join(values)), '')
                raise ValueError(f"{where}: missing column(s) {missing}; the header has {values}, split at {sep!r}{guess}")
            if any(values.count(c) > 1 for c in columns):
                raise ValueError(f"{where}: a column of {list(columns)} appears twice in the header {values}")
            continue
        if len(values) != len(header):
            raise ValueError(f"{where}: {len(values)} fields where the header has {len(header)} (split at "
                             f"{sep!r}){quote}")
        rows.append(dict(zip(header, values), where=where))
    if header is None:
        raise ValueError(f"{path}: empty file; expected a header with {list(columns)}")
    return rows


def read_captions(path, image_col='filepath', caption_col='title', sep=None, root=None):
    """Image-caption pairs from a CSV or TSV (read_table) with open_clip's column names by default (open_clip's
    --csv-img-key, --csv-caption-key). Relative image paths are taken from root, else from the file's own folder.
    -> [dict(image_path, caption, where)]; an empty caption raises ValueError naming file and line."""
    path = Path(path)
    root = Path(root) if root else path.parent
    rows = []
    for r in read_table(path, (image_col, caption_col), sep):
        if not clean_text(r[caption_col]):  # nothing but whitespace, controls or invisible characters
            raise ValueError(f"{r['where']}: empty caption (column {caption_col!r})")
        rows.append(dict(image_path=root / r[image_col], caption=r[caption_col], where=r['where']))
    return rows


def load_prompts(path):
    """A class-prompts JSON -> {class name: [prompt, ...]}, in the file's order. Either FetalCLIP's format,
    {"class name": ["prompt", ...], ...}, or open_clip's templates, {"templates": ["a photo of a {}.", ...],
    "classes": ["name", ...]}, where '{}' (or CLIP_benchmark's '{c}') marks the class name. The one loader behind
    eval.py --prompts, train.py --val_prompts and export_ios.py --classes. Raises ValueError naming the file and the
    class, key or template at fault (a class given twice too, which json.loads would quietly merge)."""
    def unique(pairs):
        if dup := sorted({k for k, _ in pairs if [k for k, _ in pairs].count(k) > 1}):
            raise ValueError(f"{path}: {dup} given more than once")
        return dict(pairs)

    try:
        given = json.loads(Path(path).read_text(encoding='utf-8-sig'), object_pairs_hook=unique)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read prompts {path}: {e}") from e
    texts = lambda v: isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v)
    if isinstance(given, dict) and given.keys() & {'templates', 'classes'}:  # open_clip's templates x classes
        if given.keys() != {'templates', 'classes'} or not texts(given['templates']) or not texts(given['classes']):
            raise ValueError(f"{path}: a templates file has exactly two keys, 'templates' and 'classes', each a "
                             f"non-empty list of strings; it has {sorted(given)}")
        if bad := [t for t in given['templates'] if '{}' not in t and '{c}' not in t]:
            raise ValueError(f"{path}: templates {bad} have no '{{}}' (or '{{c}}') where the class name goes")
        if dup := sorted({c for c in given['classes'] if given['classes'].count(c) > 1}):
            raise ValueError(f"{path}: classes {dup} listed more than once")
        return {c: [t.replace('{c}', c).replace('{}', c) for t in given['templates']] for c in given['classes']}
    if not isinstance(given, dict) or not given:
        raise ValueError(f"{path}: expected {{\"class name\": [\"prompt\", ...]}} or {{\"templates\": [...], "
                         f"\"classes\": [...]}}, got {type(given).__name__}")
    if bad := [c for c, v in given.items() if not texts(v) or not c.strip()]:
        raise ValueError(f"{path}: classes {bad} need a name and a non-empty list of non-empty prompt strings")
    return given


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
    for r in read_table(root / 'FETAL_PLANES_DB_data.csv', columns, ';'):
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
    for r in read_table(root / 'training_set_pixel_size_and_HC.csv',
                         ('filename', 'pixel size(mm)', 'head circumference (mm)'), ','):
        try:
            pixel_mm, hc_mm = float(r['pixel size(mm)']), float(r['head circumference (mm)'])
        except ValueError as e:
            raise ValueError(f"{r['where']}: {e}") from e
        path = root / 'training_set' / r['filename']
        width, height = load_image(path, r['where'], header_only=True).size
        rows.append(dict(image_path=path, pixel_mm=pixel_mm, hc_mm=hc_mm, width=width, height=height,
                         where=r['where']))
    return rows


class ImageRows(torch.utils.data.Dataset):
    """A reader's rows as a dataset: item i is row i plus its decoded image. skip_bad=True: a row whose image does not
    decode (DECODE_ERRORS) is skipped, counted in .skipped and reported on stderr, and the next row that decodes
    takes its place, so that every batch keeps its size on every rank (that row appears twice in the epoch)."""

    def __init__(self, rows, skip_bad=False):
        self.rows, self.skip_bad, self.skipped = rows, skip_bad, []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if not -len(self.rows) <= i < len(self.rows):
            raise IndexError(f"row {i} of {len(self.rows)}")  # the sequence protocol: list(ImageRows(...)) ends
        for j in range(i % len(self.rows), i % len(self.rows) + len(self.rows)):
            row = self.rows[j % len(self.rows)]
            try:  # index: the row whose image this is (pair_id, --teacher_cache)
                return dict(row, image=load_image(row['image_path']), index=j % len(self.rows))
            except ValueError as e:
                if not self.skip_bad:
                    raise ValueError(f"{row['where']}: {e}") from e.__cause__
                _skip(self.skipped, row['where'], e)
        raise ValueError(f"no row of {len(self.rows)} has an image that decodes")


def expand_braces(pattern):
    """Shard names from a pattern, as webdataset and open_clip expand them: '::' joins patterns ('a/{0..1}.tar::b.tar'),
    braces nest and multiply, left to right, as in bash: lists ('{a,b}', '{,x}' with an empty item), integer ranges
    ('{1..3}', '{3..1}', '{-1..1}', step '{0..8..4}'; a leading zero pads every number to the wider end: '{08..10}'),
    letter ranges ('{a..c}'). Refused with ValueError naming the pattern: unbalanced braces, a group that is neither a
    list nor a range ('{a}', '{}', '{1..x}'), an empty pattern, a name given twice. A backslash is a character (a
    Windows path), not an escape, so braces cannot be part of a shard's name."""
    names = [name for part in str(pattern).split('::') for name in _expand(part, pattern)]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if '' in names or doubled:
        raise ValueError(f"shard pattern {pattern!r} gives {'an empty name' if '' in names else f'{doubled[:3]} twice'}")
    return names


def _expand(text, pattern):
    depth = start = 0
    for i, c in enumerate(text):
        depth += (c == '{') - (c == '}')
        if depth < 0:
            break
        if c == '{' and depth == 1:
            start = i
        elif c == '}' and depth == 0:  # the first top-level group: text = head {body} tail
            tails = _expand(text[i + 1:], pattern)
            return [text[:start] + b + t for b in _group(text[start + 1:i], pattern) for t in tails]
    if depth:
        raise ValueError(f"shard pattern {pattern!r}: unbalanced braces")
    return [text]


_LETTERS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'  # braceexpand's order: {Z..b} is Z, a, b


def _group(body, pattern):
    """The expansions of one brace group's inside: a list at its top-level commas, else a range."""
    depth, cuts = 0, [-1]
    for i, c in enumerate(body):
        depth += (c == '{') - (c == '}')
        if c == ',' and depth == 0:
            cuts.append(i)
    if len(cuts) > 1:
        return [x for a, b in zip(cuts, cuts[1:] + [len(body)]) for x in _expand(body[a + 1:b], pattern)]
    m = re.fullmatch(r'(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.-?(\d+))?', body)
    if m and m[1].isalpha() == m[2].isalpha():
        lo, hi = (_LETTERS.index(m[1]), _LETTERS.index(m[2])) if m[1].isalpha() else (int(m[1]), int(m[2]))
        way = 1 if hi >= lo else -1
        values = range(lo, hi + way, way * (int(m[3] or 1) or 1))
        pad = max(len(m[1]), len(m[2])) if re.match(r'-?0\d', m[1]) or re.match(r'-?0\d', m[2]) else 0
        return [_LETTERS[v] if m[1].isalpha() else f"{v:0{pad}d}" for v in values]
    raise ValueError(f"shard pattern {pattern!r}: '{{{body}}}' is neither a list (a,b) nor a range (1..9, a..z)")


def shard_names(shards):
    """The name each shard goes by in sample keys (and so in pair_id, augment_draw and --teacher_cache rows): its file
    name, or as many of its last path components as every shard needs to differ ('yfcc/000.tar', 'cc/000.tar'); the
    same from any working folder, and when the whole tree moves. A 'pipe:' spec is its own name."""
    parts = [(s,) if s.startswith('pipe:') else Path(os.path.abspath(s)).parts for s in shards]
    depth = 1
    while len({p[-depth:] for p in parts}) < len(parts) and any(len(p) > depth for p in parts):
        depth += 1
    return {s: '/'.join(p[-depth:]) for s, p in zip(shards, parts)}


# How a shard fails to read: cut short or not a tar (TarError; EOFError from a cut .tar.gz or .tar.xz), corrupt
# compressed data (zlib.error, lzma.LZMAError), missing or unreadable (OSError)
SHARD_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
IMAGE_EXTENSIONS = ('png', 'jpg', 'jpeg', 'webp')  # open_clip's webdataset image keys


def _check_end(tar, shard):
    """Raises tarfile.ReadError if a plain tar file, read to its end, lacks the two zero blocks that end a whole one:
    tarfile takes one cut short at (or in) a member's header for its end, in stream and random access alike."""
    plain = isinstance(tar.fileobj, io.BufferedReader) or getattr(tar.fileobj, 'comptype', None) == 'tar'
    if plain and os.path.isfile(shard) and os.path.getsize(shard) < tar.offset + 1024:
        raise tarfile.ReadError("unexpected end of data (no end-of-archive blocks)")


@contextlib.contextmanager
def open_shard(shard, stream=True):
    """A shard -> tarfile.TarFile: a path (stream: one pass; else random access, which seeks over data), or
    webdataset's 'pipe:COMMAND', whose standard output is read as one tar stream (its own messages go to stderr). A
    command that exits with a non-zero status raises OSError naming it, once its output is read or fails to read."""
    if not shard.startswith('pipe:'):
        with tarfile.open(shard, 'r|*' if stream else 'r') as tar:
            yield tar
        return
    proc = subprocess.Popen(shard[5:], shell=True, stdout=subprocess.PIPE, start_new_session=True)  # a group to stop
    failed = None
    try:
        with tarfile.open(fileobj=proc.stdout, mode='r|*') as tar:
            yield tar
        proc.stdout.read(1 << 20)  # what follows the archive's end (tar pads to a 10 KB record): the command ends
    except SHARD_ERRORS as e:
        failed = e
    finally:  # a command whose output has ended ends too; one still running is stopped (the reader stopped early,
        proc.stdout.close()  # or its tar broke), and then its status says nothing, nor does the close's SIGPIPE
        try:
            status = proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait() and 0
    if status not in (0, -signal.SIGPIPE, 128 + signal.SIGPIPE):  # a shell reports a child's signal as 128 + it
        raise OSError(f"command {shard[5:]!r} exited with status {status} (its own message is above)") from failed
    if failed:
        raise failed


class TarShards(torch.utils.data.IterableDataset):
    """Image-caption pairs streamed from webdataset-style tar shards (members KEY.png|jpg|jpeg|webp and KEY.txt, next
    to each other), so a corpus never has to fit in memory. The shards (expand_braces) are dealt out over ranks
    (shard_by) and then over DataLoader workers; give each rank at least num_workers shards. A bad sample (an image
    in DECODE_ERRORS, a caption decode_text refuses or that is empty, a missing part) or an unreadable shard
    (SHARD_ERRORS: what came before the break is kept) raises ValueError naming the shard and the key; skip_bad=True
    skips it instead, counted in .skipped and reported on stderr with this process's running count. A shard is a
    path or webdataset's 'pipe:COMMAND' (open_shard); a URL (http://, s3://) raises ValueError naming the pipe: that
    reads it."""

    def __init__(self, pattern, skip_bad=False, shuffle=False, seed=0):
        self.shards = expand_braces(str(pattern))
        if remote := next((s for s in self.shards if re.match(r'[a-z][a-z\d+.-]*://', s, re.I)), None):
            via = f"aws s3 cp {remote} -" if remote.lower().startswith('s3://') else f"curl -fsSL {remote}"
            raise ValueError(f"shard {remote!r} is remote, which is read only through a command, as webdataset does: "
                             f"'pipe:{via}'")
        self.names = shard_names(self.shards)
        self.skip_bad, self.shuffle, self.seed = skip_bad, shuffle, seed
        self.rank, self.world_size, self.epoch = 0, 1, 0
        self.skipped = []

    def shard_by(self, rank, world_size):
        self.rank, self.world_size = rank, world_size
        return self

    def set_epoch(self, epoch):  # a new shard order each epoch, the same on every rank
        self.epoch = epoch

    def captions(self, n):
        """Up to n captions from the first shards, text only (train.py's vocabulary check); a bad shard or caption
        is left to the stream, which names or skips it."""
        out = []
        for shard in self.shards:
            try:
                with open_shard(shard, stream=False) as tar:
                    out += [tar.extractfile(m).read().decode('utf-8', 'replace') for m in tar
                            if m.isfile() and m.name.endswith('.txt')]
            except SHARD_ERRORS:
                continue
            if len(out) >= n:
                break
        return out[:n]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(shards)
        for shard in shards[self.rank * workers + worker::self.world_size * workers]:
            key, group = None, {}
            try:
                with open_shard(shard) as tar:  # stream mode: one pass, no index
                    for member in tar:
                        if not member.isfile():
                            continue
                        folder, name = os.path.split(member.name)
                        stem, _, ext = name.partition('.')  # webdataset: the key ends at the first dot
                        if os.path.join(folder, stem) != key:
                            yield from self._sample(shard, key, group)
                            key, group = os.path.join(folder, stem), {}
                        group[ext.lower()] = tar.extractfile(member).read()
                    _check_end(tar, shard)
            except SHARD_ERRORS as e:
                self._bad(shard, f"unreadable shard ({type(e).__name__}: {e})")
                if 'txt' not in group or not group.keys() & set(IMAGE_EXTENSIONS):
                    group = {}  # the sample the break cut into: counted with the shard
            yield from self._sample(shard, key, group)

    def _sample(self, shard, key, group):
        if not group:
            return
        where = f"{shard}: {key}"
        try:
            ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
            if ext is None or 'txt' not in group:
                raise ValueError(f"needs an image ({', '.join(IMAGE_EXTENSIONS)}) and a .txt, has {sorted(group)}")
            caption = decode_text(group['txt'], 'txt').strip()
            if not clean_text(caption):
                raise ValueError('empty caption')
            image = load_image(group[ext])
        except ValueError as e:
            self._bad(where, e)
            return
        yield dict(image=image, caption=caption, where=where, key=f"{self.names[shard]}/{key}")

    def keys(self):
        """The key ('shard name/sample key', shard_names) of every sample with a caption and an image, in shard
        order, read from the tar headers alone (train.py's epoch length and --teacher_cache rows). An unreadable shard
        gives what came before the break and is skipped or named, as when streaming."""
        keys = []
        for shard in self.shards:
            exts = {}
            try:
                with open_shard(shard, stream=False) as tar:  # random access: seeks over the members' data
                    for member in (m for m in tar if m.isfile()):
                        folder, name = os.path.split(member.name)
                        stem, _, ext = name.partition('.')
                        exts.setdefault(os.path.join(folder, stem), set()).add(ext.lower())
                    _check_end(tar, shard)
            except SHARD_ERRORS as e:
                self._bad(shard, f"unreadable shard ({type(e).__name__}: {e})")
            keys += [f"{self.names[shard]}/{k}" for k, e in exts.items()
                     if 'txt' in e and not e.isdisjoint(IMAGE_EXTENSIONS)]
        return keys

    def _bad(self, where, why):
        if not self.skip_bad:
            raise ValueError(f"{where}: {why} (TarShards(skip_bad=True) skips and counts such samples)")
        _skip(self.skipped, where, why)


# --- preprocessing, as FetalCLIP and MobileFetalCLIP do it ---
def pad_square(image):
    """Zero-pad to a centred black square (FetalCLIP's make_image_square_with_zero_padding): resizing then keeps
    the anatomy's proportions. A square over Pillow's bomb limit raises DecompressionBombError (check_square)."""
    image = as_l_or_rgb(image)
    w, h = image.size
    check_square(w, h)
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


AUGMENT = dict(rotate_degrees=7, translate=0.05, brightness=0.15, contrast=0.15)  # DistillTransform's ranges


def augment_draw(seed, pair, view):
    """Augmentation `view` of pair `pair` (pair_id) as DistillTransform's five numbers in [-1, 1): a pure function of
    its arguments, so the view that a stored teacher embedding came from is rebuilt exactly for the student."""
    return (2 * np.random.default_rng([seed, pair, view]).random(5) - 1).tolist()


def pair_id(item):
    """What a pair's augmentations are keyed by: its 'index' in map-style data, or a 64-bit hash of its shard 'key'
    (tar shards have no index, and their order changes from epoch to epoch)."""
    if 'index' in item:
        return item['index']
    return int.from_bytes(hashlib.blake2b(item['key'].encode(), digest_size=8).digest(), 'little')


class DistillTransform:
    """PIL image -> (teacher view, student view) from ONE draw (rotation, translation, brightness and contrast within
    AUGMENT's ranges) applied once to the padded square, so both models see the same picture, each at its own size
    and normalisation. Views are (size, mean, std), any number of them: the student's alone when the teacher's
    embeddings are stored. The draw is augment_draw's five numbers when given, else one from torch's generator
    (which DataLoader seeds per worker)."""

    def __init__(self, *views, augment=True):
        self.views = tuple(Preprocess(*view) for view in views)
        self.augment = augment

    def __call__(self, image, draw=None):
        square = pad_square(image)
        if self.augment:
            angle, dx, dy, bright, contrast = draw if draw is not None else (2 * torch.rand(5) - 1).tolist()
            shift = AUGMENT['translate'] * square.size[0]
            square = square.rotate(AUGMENT['rotate_degrees'] * angle, Image.BICUBIC, translate=(shift * dx, shift * dy))
            # what torchvision's ColorJitter does
            square = ImageEnhance.Brightness(square).enhance(1 + AUGMENT['brightness'] * bright)
            square = ImageEnhance.Contrast(square).enhance(1 + AUGMENT['contrast'] * contrast)
        return tuple(view.finish(square) for view in self.views)


class Collate:
    """DataLoader collate_fn: list of item dicts -> batch dict. 'image' goes through transform and is stacked (a
    DistillTransform gives a tuple of stacks, one per view); with a tokenizer, captions become 'ids'; other
    numbers become tensors, and strings and paths lists. replay=(seed, epoch, K) replays stored views instead of
    drawing new ones: pair p takes view (epoch + pair_id(p)) % K (batch 'view'), augmented by augment_draw; with
    epoch None, every pair comes K times in a row, as views 0..K-1 (the caching pass)."""

    def __init__(self, transform, tokenizer=None, replay=None):
        self.transform, self.tokenizer, self.replay = transform, tokenizer, replay

    def __call__(self, items):
        if self.replay:
            seed, epoch, k = self.replay
            items = [dict(item, view=v) for item in items
                     for v in (range(k) if epoch is None else [(epoch + pair_id(item)) % k])]
            views = [self.transform(item['image'], augment_draw(seed, pair_id(item), item['view'])) for item in items]
        else:
            views = [self.transform(item['image']) for item in items]
        batch = {'image': tuple(map(torch.stack, zip(*views))) if isinstance(views[0], tuple) else torch.stack(views)}
        for key in items[0].keys() - {'image'}:
            values = [item[key] for item in items]
            batch[key] = torch.tensor(values) if isinstance(values[0], (int, float)) else values
        if self.tokenizer is not None:
            batch['ids'] = self.tokenizer([item['caption'] for item in items])
        return batch


# --- stored teacher embeddings (train.py --teacher_cache) ---
class TeacherCache:
    """A frozen teacher's embeddings of every training pair, stored once and memory-mapped, so that training reads
    them instead of running the teacher (MobileCLIP's dataset reinforcement). Files in root:
      header.json    what the numbers depend on (train.cache_header: teacher hash, preprocessing, tokenizer, ...)
      image.f16      float16 [N, K, D]: the L2-normalised image embedding of view k of pair i
      text.f16       float16 [N, D]: the L2-normalised embedding of pair i's caption
      done.u8        uint8 [N]: 1 once pair i is stored, flushed after its batch, so a killed pass resumes
      keys.npy       tar shards only: every sample's key, sorted: row i holds keys[i], whatever the shard order
      complete.json  the teacher's logit scale, written once every pair is stored
    View k of pair p is augmented by augment_draw(seed, pair_id(p), k). Only the rows asked for are read."""

    def __init__(self, root, header=None):
        """Open the cache in root. header: what this run would store; a field stored differently raises ValueError
        naming it. A missing root/header.json raises FileNotFoundError (TeacherCache.create makes one)."""
        self.root = Path(root)
        self.header = json.loads((self.root / 'header.json').read_text())
        for key, value in json.loads(json.dumps(header or {})).items():  # through JSON: tuples compare as lists
            if self.header.get(key) != value:
                raise ValueError(f"--teacher_cache {self.root}: its embeddings were made for {key} = "
                                 f"{self.header.get(key)!r}, this run has {key} = {value!r}. Use another folder, "
                                 "or delete this one to build it again")
        n, k, d = self.header['pairs'], self.header['cache_views'], self.header['embed_dim']
        mode = 'r' if self.complete else 'r+'  # a finished cache is only read, by any number of runs at once
        self.image = np.memmap(self.root / 'image.f16', np.float16, mode, shape=(n, k, d))
        self.text = np.memmap(self.root / 'text.f16', np.float16, mode, shape=(n, d))
        self.done = np.memmap(self.root / 'done.u8', np.uint8, mode, shape=(n,))
        self.keys = np.load(self.root / 'keys.npy', mmap_mode='r') if (self.root / 'keys.npy').exists() else None

    @staticmethod
    def create(root, header, keys=None):
        """Zero-filled files for header's 'pairs' x 'cache_views' x 'embed_dim', or with keys (tar sample keys, which
        must be unique) one row per key, allocated on the disk now (os.posix_fallocate where there is one). The header
        is written last: a folder without one is unfinished. A disk too small raises OSError naming root, the bytes
        needed and free."""
        root = Path(root)
        if keys is not None:
            header = dict(header, pairs=len(keys))
            if len(set(keys)) < len(keys):
                twice = next(key for key, n in collections.Counter(keys).items() if n > 1)
                raise ValueError(f"sample {twice!r} appears twice: a shard listed twice, or a key twice in one shard?")
        root.mkdir(parents=True, exist_ok=True)
        n, k, d = header['pairs'], header['cache_views'], header['embed_dim']
        sizes = {'image.f16': 2 * n * k * d, 'text.f16': 2 * n * d, 'done.u8': n}
        stored = None if keys is None else np.array(sorted(k.encode() for k in keys), dtype=bytes)  # utf-8: in order
        need = sum(sizes.values()) + (0 if keys is None else stored.nbytes + 128)  # keys.npy: np.save's 128-byte header
        free = shutil.disk_usage(root).free
        if need > free:  # mapped files past the disk's end would kill the pass with SIGBUS
            raise OSError(f"--teacher_cache {root}: the cache needs {need} bytes "
                          f"({n} pairs x {k} views x {d} dims in fp16) and its disk has {free} free: free some space, "
                          "or give a folder on a larger disk")
        for name, size in sizes.items():
            with open(root / name, 'wb') as f:
                f.truncate(size)
                try:  # the blocks are taken now, so a disk filled by others since is an error here, not a SIGBUS
                    if size and hasattr(os, 'posix_fallocate'):
                        os.posix_fallocate(f.fileno(), 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: sparse, checked
                        raise OSError(f"--teacher_cache {root}: cannot allocate {name} ({size} bytes): "
                                      f"{e.strerror or e}") from e
        try:
            if keys is not None:
                np.save(root / 'keys.npy', stored)
        except OSError as e:
            raise OSError(f"--teacher_cache {root}: cannot write keys.npy: {e.strerror or e}") from e
        _write_json(root / 'header.json', header)

    def rows(self, batch):
        """Rows of a batch's pairs: their 'index', or their shard 'key' in keys.npy (else ValueError) -> int64 [B]"""
        if self.keys is None:
            return np.asarray(batch['index'], dtype=np.int64)
        want = np.array([k.encode() for k in batch['key']], dtype=bytes)
        rows = np.minimum(np.searchsorted(self.keys, want), len(self.keys) - 1)
        missing = [key for key, found in zip(batch['key'], self.keys[rows] == want) if not found]
        if missing:
            raise ValueError(f"--teacher_cache {self.root} has no sample {missing[0]!r} (and {len(missing) - 1} more of "
                           "this batch): the shards changed since it was built")
        return rows

    def write(self, rows, image, text):
        """Store pairs `rows` (int [n]): image float [n, K, D], text float [n, D]; embeddings reach the disk first."""
        self.image[rows], self.text[rows] = image, text  # numpy rounds to float16 to nearest, as torch's .half()
        self.image.flush()
        self.text.flush()
        self.done[rows] = 1
        self.done.flush()

    def fill(self, loader, encode, rank=0):
        """Store the pairs of loader's batches (Collate with replay=(seed, None, K): each pair K times in a row) that
        are not stored yet. encode(images [n K, 3, S, S], ids [n, L]) -> float tensors ([n K, D], [n, D]). Rank 0
        prints every 10 s the pairs stored by all ranks out of all pairs, their rate and the time left."""
        k, n = self.header['cache_views'], len(self.done)
        t0, start, shown = time.time(), int(self.done.sum()), 0
        for batch in loader:
            rows = self.rows(batch)[::k]
            if self.done[rows].all():  # stored by a pass that was killed: tar shards stream past them again
                continue
            image, text = encode(batch['image'][0], batch['ids'][::k])
            self.write(rows, image.view(len(rows), k, -1).numpy(), text.numpy())
            if rank == 0 and time.time() - shown > 10:
                done, shown = int(self.done.sum()), time.time()
                rate = (done - start) / (shown - t0)
                print(f"teacher cache {self.root}: {done}/{n} pairs, {rate:.1f} pairs/s ({k} views each), "
                      f"{(n - done) / max(rate, 1e-9) / 60:.1f} min left", flush=True)
        if rank == 0:
            print(f"teacher cache {self.root}: this pass took {(time.time() - t0) / 60:.1f} min", flush=True)

    def read(self, batch):
        """The teacher's targets for a batch from Collate(replay=...): its pairs' stored views.
        -> (image [B, D], text [B, D], logit scale []) float32 tensors."""
        rows, views = self.rows(batch), np.asarray(batch['view'], dtype=np.int64)
        if not self.done[rows].all():
            raise ValueError(f"--teacher_cache {self.root}: rows {np.asarray(rows)[self.done[rows] == 0][:5]} were "
                             "never stored (unreadable samples when it was built?)")
        return (torch.from_numpy(self.image[rows, views].astype(np.float32)),
                torch.from_numpy(self.text[rows].astype(np.float32)), torch.tensor(self.logit_scale))

    @property
    def complete(self):
        return (self.root / 'complete.json').exists()

    @property
    def logit_scale(self):
        return json.loads((self.root / 'complete.json').read_text())['logit_scale']

    def finish(self, logit_scale):
        _write_json(self.root / 'complete.json', dict(logit_scale=logit_scale, stored=int((self.done == 1).sum()),
                                                      pairs=len(self.done)))


def sha256_file(path, chunk=1 << 20):
    """Hex SHA-256 of a file, read 1 MiB at a time (hashlib.file_digest does this from Python 3.11 on); a run asks
    for a 1.7 GB teacher's more than once, so the answer is kept while the file's size and mtime stay the same."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=64)
def _sha256(path, size, mtime_ns, chunk):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path, obj):
    """obj as JSON (a str as it is) to path through a temp file; a failed write removes it, keeps any earlier file
    and raises OSError naming path and the cause (a full disk)."""
    tmp = Path(f"{path}.tmp")
    try:
        tmp.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1) + '\n')
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e


# --- the command line: one grammar for train.py, eval.py, export_ios.py and this file ---
def parse_flags(argv, defaults, accepts=None, doc='', source=None, notes=None):
    """Command-line flags over `defaults` {key: default}, the default's type being the flag's type.
    -> (config dict, set of keys given). The grammar of every script: --key=value, or --key value for all but
    booleans; a bare --flag sets a boolean (--flag=true|false also). -h/--help prints `doc`, then each option with
    the comment beside its default in the file `source` and its note in `notes` {key: text}. `accepts` {key: rule}
    is checked here, before any work: a tuple is the closed set of values, a string such as '[1, inf)' or '(0, 1)'
    an interval, a function a check that raises ValueError saying what it accepts (its docstring's first line is
    the rule --help shows).
    Raises SystemExit with a message naming the flag: unknown key (listing the valid keys), wrong type, bad value."""
    prog, cfg, given, args, accepts = Path(source or sys.argv[0]).name, dict(defaults), set(), list(argv), accepts or {}
    while args:
        arg = args.pop(0)
        if arg in ('-h', '--help'):
            print(flags_help(defaults, accepts, doc, source, notes or {}))
            sys.exit(0)
        key, has_value, value = arg[2:].partition('=')
        if not arg.startswith('--') or key not in defaults:
            near = difflib.get_close_matches(key, defaults, 1)
            sys.exit(f"{prog}: unknown argument {arg!r}" + (f" (did you mean --{near[0]}?)" if near else '') +
                     f"; the options are --{', --'.join(defaults)} (given as --key=value; --help explains each)")
        kind = type(defaults[key])
        if not has_value and kind is not bool:
            if not args or args[0].startswith('--'):
                sys.exit(f"{prog}: --{key} needs a value: --{key}=VALUE")
            value = args.pop(0)
        try:
            cfg[key] = flag_value(value if has_value or kind is not bool else 'true', kind)
            check_flag(cfg[key], accepts.get(key))
        except ValueError as e:
            sys.exit(f"{prog}: --{key}={value}: {e}")
        given.add(key)
    return cfg, given


def flag_value(text, kind):
    """'--key=text' -> a value of the default's type. Raises ValueError saying what the flag takes."""
    if kind is bool:
        if text.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
            raise ValueError('takes true or false (or a bare --flag for true)')
        return text.lower() in ('true', '1', 'yes')
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"takes {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError('takes a finite number')
    return value


def check_flag(value, rule):
    """Raises ValueError unless value meets its rule (see parse_flags)."""
    if isinstance(rule, tuple) and value not in rule:
        raise ValueError(f"takes {show_rule(rule)}")
    if isinstance(rule, str):  # an interval: [ or ] includes the bound, ( or ) excludes it
        lo, hi = (float(b) for b in rule[1:-1].split(','))
        if not ((lo < value or rule[0] == '[' and lo == value) and (value < hi or rule[-1] == ']' and value == hi)):
            raise ValueError(f"takes a value {show_rule(rule)}")
    if callable(rule):
        rule(value)


def show_rule(rule):
    """A closed set as 'a | b', an interval as written, a check function by its docstring's first line."""
    return ' | '.join(str(v) or "''" for v in rule) if isinstance(rule, tuple) else f"in {rule}" if isinstance(
        rule, str) else rule.__doc__.splitlines()[0]


def pick_device(name):
    """auto | cpu | cuda | cuda:N present here
    -> torch.device (auto: cuda when there is one). Raises ValueError saying what is accepted or present."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise ValueError(f"takes {show_rule(pick_device)}")
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA devices (torch {torch.__version__}); "
                         "--device=cpu runs anywhere")
    return device


def flags_help(defaults, accepts, doc, source, notes):
    """doc, then one line per option: --key=default, its rule, the comment beside it in `source`, its note."""
    comments, names, keys = {}, [], list(defaults)
    for line in Path(source).read_text().splitlines() if source else ():
        if names and re.match(r'\s*#\s\s', line):  # an indented comment line continues the option above it
            comments.update({n: f"{comments[n]} {line.strip(' #')}" for n in names})
            continue
        code, _, comment = line.partition('  # ')
        names = [n.strip() for n in code.split('=')[0].split(',')]
        # the options are defined in their order (`key = 1  # why` or `key=1,  # why`): a later `key=...` is not one
        if '=' in code and names == keys[:len(names)]:
            keys = keys[len(names):]
        else:
            names = []
        comments.update(dict.fromkeys(names, comment.strip()) if comment else {})
        names = names if comment else []
    shown = {k: f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in defaults.items()}
    width = min(max(map(len, shown.values())), 30)  # a longer default pushes only its own line
    return doc.strip() + '\n\noptions (--key=value, or --key value; a bare --flag sets a boolean):\n' + '\n'.join(
        (f"  {shown[k]:<{width}}  " + '; '.join(filter(None, (k in accepts and show_rule(accepts[k]), comments.get(k))))
         + (f" ({notes[k]})" if k in notes else '')).rstrip() for k in defaults)


def run_script(main, prog):
    """A script's entry point: main(sys.argv[1:]), where a refusal (SystemExit with a message; ValueError, OSError
    or FloatingPointError, which name the file, row, key or flag) ends in one line on stderr and exit status 2,
    argparse's for bad usage, never a traceback (a message left by Ctrl-C: status 130, as the shell's); under a
    launcher only rank 0 says it. Called in-process, main raises."""
    status = 2
    try:
        return main(sys.argv[1:])
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message, status = e.code, 130 if isinstance(e.__context__, KeyboardInterrupt) else 2
    except (ValueError, OSError, FloatingPointError) as e:
        message = f"{prog}: {e}"
    except KeyboardInterrupt:  # Ctrl-C where main leaves no message of its own (eval.py, export_ios.py)
        message, status = f"{prog}: interrupted", 130
    # the rank of torchrun, SLURM's srun or Open MPI's mpirun, in train.LAUNCHERS' order: torchrun's wins in a SLURM job
    if int(next((os.environ[k] for k in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK') if k in os.environ), 0)) == 0:
        print(' '.join(message.split()), file=sys.stderr, flush=True)
    sys.exit(status)


def main(argv):
    """`python data.py`: a grid of toy images, some captions and the toy world's speed."""
    opt, _ = parse_flags(argv, dict(out='toy_samples.png'), doc=__doc__, notes=dict(out='a PNG grid of 16 toy '
                         'training images; then captions and the images/s of the toy world are printed'))
    torch.set_num_threads(1)
    out = opt['out']
    save_grid(out)
    print(f"saved {out}")
    for i in range(6):
        print(ToyWorld('train')[i]['caption'])
    for size, n in ((64, 500), (224, 100)):
        world, start = ToyWorld('train', size), time.perf_counter()
        for i in range(n):
            world[i]
        print(f"{size} px: {n / (time.perf_counter() - start):.0f} images/s on one core")


if __name__ == '__main__':
    run_script(main, 'data.py')
