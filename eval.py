"""Evaluation: the paper's zero-shot protocols, linear probing, the teacher-student analysis, speed. It only evaluates:
choosing a checkpoint is train.py's business, on validation data.

    python eval.py --checkpoint=out/best.pt                                   # toy world, test split
    python eval.py --checkpoint=ckpt.pt --task=planes --data=FETAL_PLANES_DB  # or brain, or hc18 --data=HC18
    python eval.py --checkpoint=ckpt.pt --task=paper --data=FETAL_PLANES_DB,HC18   # all three + the composite
    python eval.py --checkpoint=FetalCLIP_weights.pt --model_config=fetalclip --task=hc18 --data=HC18
    python eval.py --checkpoint=student.pt --probe --analysis --teacher=teacher.pt
    python eval.py --checkpoint=ckpt.pt --task=planes --data=FETAL_PLANES_DB --probe --probe_splits=DIR  # FetalCLIP's
    python eval.py --checkpoint=ckpt.pt --task=classify --data=labels.csv --prompts=classes.json  # any labelled images
    python eval.py --checkpoint=ckpt.pt --task=retrieval --data=pairs.csv     # or tar shards: recall@1/5/10, mean rank
    python eval.py --speed                                    # FetalCLIP vs MobileCLIP2-S0: params, GMACs, CPU ms
    python eval.py --table=out/table1     # a folder of train.py runs -> Table 1 (table1.md, .json), dynamics.png
    python eval.py --table=out --task=classify --data=test.csv --prompts=classes.json  # runs on your own data

Zero-shot, as FetalCLIP's released evaluation (reused by MobileFetalCLIP):
- A class embedding is normalise(mean of normalised prompt embeddings); logits = 100 * cosine, CLIP's fixed
  zero-shot scale rather than the model's learned one, so every model is scored alike; softmax over classes.
- 5 planes: FETAL_PLANES_DB without "Other", a 9-class text classifier over 5 labels; per-class F1 and accuracy
  (recall) averaged over the classes present, so a prediction of an absent class is simply a miss. Brain: 3 classes.
- Gestational age on HC18: 175 daily candidates, each scored by the mean over its prompts of 100 * cosine; the
  median by age of the 15 best is the prediction; valid when P2.5(age) <= true HC <= P97.5(age).
- Class F1 = (5 F1_planes + 3 F1_brain) / 8; composite = (class F1 + validity / 100) / 2, the paper's "Avg".
The planes and brain tasks are the generic `classify` with fixed prompts and FETAL_PLANES_DB's labels. Long loops
report progress on stderr (silent with --quiet).
"""
import collections
import copy
import functools
import itertools
import json
import math
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import models

PROTOCOL = "dark-eval-4"  # bump when a metric, prompt, filter or the toy world changes: results files (and toy
# teacher caches) made under another are recomputed, not compared
# (2: acc and top-k count images; the mean recall over the classes present, once 'acc', is balanced_acc)
QUIET = False  # --quiet: no progress lines

# --- prompts: our own wording; a {class: [prompts]} JSON (FetalCLIP's files too) can replace them ---
PLANE_PROMPTS = {  # 9 classes, as FetalCLIP's classifier, though FETAL_PLANES_DB labels only 5 of them
    "abdomen": ["fetal ultrasound of the abdomen", "transverse view of the fetal abdomen with the stomach bubble"],
    "brain": ["fetal ultrasound of the head", "axial view of the fetal brain inside the skull"],
    "femur": ["fetal ultrasound of the femur", "long axis of the fetal thigh bone"],
    "heart": ["fetal ultrasound of the heart", "four chamber view of the fetal heart in the thorax"],
    "kidney": ["fetal ultrasound of the kidneys", "view of both fetal kidneys beside the spine"],
    "lips_nose": ["fetal ultrasound of the lips and nose", "coronal view of the fetal upper lip and nostrils"],
    "profile_patient": ["fetal profile on ultrasound", "sagittal view of the fetal face and forehead"],
    "spine": ["fetal ultrasound of the spine", "sagittal view of the fetal vertebral column"],
    "cervix": ["transvaginal ultrasound of the maternal cervix", "the mother's cervical canal measured on ultrasound"],
}
BRAIN_PROMPTS = {
    "trans-thalamic": ["transthalamic plane of the fetal brain", "fetal head at the level of the thalami"],
    "trans-cerebellum": ["transcerebellar plane of the fetal brain", "fetal head showing the cerebellum"],
    "trans-ventricular": ["transventricular plane of the fetal brain", "fetal head with the lateral ventricles"],
}
GA_TEMPLATES = [  # FetalCLIP's placeholders, so its template files work too
    "fetal head ultrasound at {weeks} weeks and {day} days of gestation, pixel spacing {pixel_spacing} mm/pixel",
    "ultrasound of the fetal brain, gestational age {weeks} weeks {day} days, {pixel_spacing} mm per pixel",
    "fetal skull at {weeks} weeks and {day} days, imaged with a pixel spacing of {pixel_spacing} mm/pixel",
]
FPDB_CLASS = {"Fetal abdomen": "abdomen", "Fetal brain": "brain", "Fetal femur": "femur", "Fetal thorax": "heart",
              "Maternal cervix": "cervix", "Trans-thalamic": "trans-thalamic", "Trans-cerebellum": "trans-cerebellum",
              "Trans-ventricular": "trans-ventricular"}  # FETAL_PLANES_DB label -> class of the prompt sets
CLASS_TASKS = dict(planes="plane", brain="brain", classify="label")  # zero-shot task -> key of its records' class
GA_DAYS = np.array([w * 7 + d for w in range(14, 39) for d in range(7)])  # 14w0d..38w6d: FetalCLIP's 175 candidates
TOP_N = 15  # the median of the 15 best candidates, not the argmax: scores of neighbouring days are flat and noisy
HC_WINDOW = (100.0, 342.0)  # mm, the median HC at 14 and at 40 weeks: HC18's younger heads (down to 44 mm) are
#                             outside the ages any candidate states, so they are not scored


# --- progress: done / total, rate and time left on stderr, for anything that can take minutes ---
def progress(what, total=None, every=5.0):
    """-> advance(n): count n more of `total` done. Prints 'what: done/total, rate/s, m:ss left' to stderr at most
    every `every` seconds and once more at the end (only if it printed before: short work stays silent); nothing
    when QUIET. total None (a stream): done and rate only."""
    start = last = time.monotonic()
    done = 0

    def advance(n=1):
        nonlocal done, last
        done += n
        now, finished = time.monotonic(), total is not None and done >= total
        if QUIET or now - last < every and not (finished and last > start):
            return
        last, rate = now, done / max(now - start, 1e-9)
        left = f", {int((total - done) / rate) // 60}:{int((total - done) / rate) % 60:02d} left" if total else ""
        print(f"{what}: {done}/{total or '?'}, {rate:.1f}/s{left}", file=sys.stderr, flush=True)
    return advance


# --- metrics: numpy functions of predictions and labels ---
def class_key(name):
    """The form in which labels meet class names, and metrics are named: NFC, whitespace collapsed, case folded, so a
    CSV's 'Pleural  Effusion' is the prompts' 'pleural effusion' (and two classes that differ only so are refused)."""
    return " ".join(unicodedata.normalize("NFC", str(name)).split()).casefold()


def confusion_counts(pred, targets, num_classes):
    """[C, C] int counts: row = true class, column = predicted class."""
    return np.bincount(np.asarray(targets) * num_classes + np.asarray(pred),
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)


def class_metrics(probs, targets, names, topk=(2, 3, 5)):
    """probs [N, C] over the classifier's C classes, targets [N] class indices. -> acc (fraction of images right),
    top{k} (true class among the k best; k < C only), f1_<class> and acc_<class> (recall, as torchmetrics'
    average='none') for each class present, then over the classes present in targets only (a prediction of an
    absent class is simply a miss, as the paper's protocol): f1 (macro F1) and balanced_acc (mean recall); confusion,
    the [C, C] counts as nested lists (rows: true class) in the order of names."""
    probs, targets = np.asarray(probs), np.asarray(targets)
    cm, present = confusion_counts(probs.argmax(1), targets, probs.shape[1]), np.unique(targets)
    tp, f1 = np.diag(cm), 2 * np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1), 1)  # 2tp / (2tp + fp + fn)
    recall = tp / np.maximum(cm.sum(1), 1)
    key = {c: class_key(names[c]).replace(" ", "_") for c in range(len(names))}  # 'Fetal abdomen' -> fetal_abdomen
    if len(set(key.values())) < len(names):  # one metric would overwrite the other
        raise ValueError(f"class names {list(names)} give two classes one metric name ({sorted(key.values())})")
    out = dict(acc=float(tp.sum() / len(targets)), f1=float(f1[present].mean()),
               balanced_acc=float(recall[present].mean()))
    ranked = np.argsort(-probs, axis=1, kind="stable")
    out.update({f"top{k}": float((ranked[:, :k] == targets[:, None]).any(1).mean()) for k in topk if k < len(names)})
    for c in present:
        out[f"f1_{key[c]}"], out[f"acc_{key[c]}"] = float(f1[c]), float(recall[c])
    return dict(out, confusion=cm.tolist())


def retrieval_metrics(img, txt, owner, ks=(1, 5, 10), chunk=2048):
    """img [M, D], txt [N, D] L2-normalised embeddings (fp16 is enough: they are compared in fp32 blocks), owner [N]
    the image of each caption (an image may have several, as in COCO). -> i2t_r{k}, t2i_r{k} (fraction with the
    true match among the k best), i2t_mean_rank, t2i_mean_rank (1 = first) and mean_recall (of the six recalls, the
    number a caption-only validation selects on). An image ranks by its best caption. A rank counts the wrong
    candidates that score strictly higher, in [chunk, chunk] blocks: memory stays O(chunk^2 K + (M + N) D) (K: the
    most captions of one image), never [M, N], and ties go to the true match: a candidate whose embedding equals the truth's (the same caption text, the
    same image twice) is no wrong candidate, even where two sums of the same products round apart."""
    owner = torch.as_tensor(owner)
    # equal embeddings (a repeated caption, a repeated image) tie exactly, whatever order a matmul summed them in
    caption_id, image_id = (torch.unique(x, dim=0, return_inverse=True)[1] for x in (txt, img))
    count, order = torch.bincount(owner, minlength=len(img)), torch.argsort(owner, stable=True)
    own = torch.full((len(img), int(count.max())), -1, dtype=torch.long)  # [M, K] an image's caption ids, -1 padded
    own[owner[order], torch.arange(len(owner)) - torch.repeat_interleave(count.cumsum(0) - count, count)] = \
        caption_id[order]
    pair = torch.cat([(img[owner[j:j + chunk]].float() * txt[j:j + chunk].float()).sum(-1)  # [N] cosine of each
                      for j in range(0, len(txt), chunk)])  # caption with its own image, in chunks: no [N, D] fp32 copy
    best = torch.full((len(img),), -math.inf).scatter_reduce(0, owner, pair, "amax")  # [M] an image's best caption
    i2t, t2i = torch.zeros(len(img), dtype=torch.long), torch.zeros(len(txt), dtype=torch.long)
    advance = progress("retrieval similarities (images)", len(img))
    for i in range(0, len(img), chunk):
        a = img[i:i + chunk].float()
        for j in range(0, len(txt), chunk):
            sim = a @ txt[j:j + chunk].float().T  # [chunk, chunk]
            rows = torch.arange(i, i + len(a))[:, None]
            wrong_caption = (caption_id[None, j:j + chunk, None] != own[i:i + len(a), None, :]).all(-1)
            wrong_image = image_id[rows] != image_id[owner[None, j:j + chunk]]
            i2t[i:i + len(a)] += ((sim > best[i:i + len(a), None]) & wrong_caption).sum(1)
            t2i[j:j + chunk] += ((sim > pair[None, j:j + chunk]) & wrong_image).sum(0)
        advance(len(a))
    out = {f"{d}_r{k}": float((rank < k).float().mean()) for d, rank in (("i2t", i2t), ("t2i", t2i)) for k in ks}
    return dict(out, mean_recall=float(np.mean(list(out.values()))), i2t_mean_rank=float(i2t.float().mean() + 1),
                t2i_mean_rank=float(t2i.float().mean() + 1))


def class_f1(planes_f1, brain_f1):
    return (5 * planes_f1 + 3 * brain_f1) / 8  # each task weighted by its number of classes


def composite(class_f1_value, validity_percent):
    return (class_f1_value + validity_percent / 100) / 2


def pixel_spacing_text(width, height, input_size, pixel_mm):
    """The spacing a GA prompt states: mm per pixel of the model's input, after padding to a square and resizing."""
    return f"{max(width, height) / input_size * pixel_mm:.2f}"


def median_of_top(scores, n=TOP_N):
    """Index of the predicted candidate: the n best scores, sorted by age, element n // 2."""
    best = np.argsort(-np.asarray(scores), kind="stable")[:n]  # a tie keeps the younger candidate first
    return int(np.sort(best)[n // 2])


def ga_valid(pred_days, hc_mm):
    """P2.5(predicted age) <= true HC <= P97.5(predicted age), boundaries included."""
    weeks, hc_mm = np.asarray(pred_days) / 7, np.asarray(hc_mm)
    return (data.hc_curve(weeks, "p2.5") <= hc_mm) & (hc_mm <= data.hc_curve(weeks, "p97.5"))


def in_hc_window(hc_mm):
    return (HC_WINDOW[0] <= np.asarray(hc_mm)) & (np.asarray(hc_mm) <= HC_WINDOW[1])


def bootstrap_ci(values, n_boot=10_000, seed=42, statistic=None):
    """95% percentile interval of a statistic over n_boot resamples, with replacement, of the N rows of values ([N],
    or a tuple of [N] arrays resampled together). Default statistic: 100 * mean, with the same draws as FetalCLIP's
    script; another, statistic(*arrays), may return NaN where a resample leaves it undefined (that draw is left out)."""
    arrays = tuple(np.asarray(v) for v in (values if isinstance(values, tuple) else (values,)))
    draws = np.random.default_rng(seed).integers(0, len(arrays[0]), (n_boot, len(arrays[0])))
    stats = (arrays[0].astype(float)[draws].mean(1) if statistic is None else
             np.array([statistic(*(a[d] for a in arrays)) for d in draws]))
    return tuple((100 if statistic is None else 1) * float(q) for q in np.nanpercentile(stats, [2.5, 97.5]))


def _ranks(x):
    """1-based ranks; tied values share their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=float)
    order = np.empty(len(x))
    order[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, group, count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=order) / count)[group]


def pearson(x, y):
    x, y = np.ravel(x).astype(float), np.ravel(y).astype(float)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")  # undefined when one side is constant


def spearman(x, y):
    return pearson(_ranks(x), _ranks(y))


def auroc(scores, labels):
    """scores [N], labels [N] (1 / True: positive) -> P(score of a positive > score of a negative), a tie counting one
    half (Mann-Whitney U / n_pos n_neg). Raises ValueError when the labels hold one class only."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if not n_pos or not n_neg:
        raise ValueError(f"AUROC needs positives and negatives: all {len(labels)} labels are "
                         f"{'positive' if n_pos else 'negative'}")
    return float((_ranks(scores)[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ga_metrics(pred_days, hc_mm):
    """Validity % with its bootstrap interval, and Spearman(predicted age, true HC), over images in HC_WINDOW."""
    keep = in_hc_window(hc_mm)
    pred_days, hc_mm = np.asarray(pred_days)[keep], np.asarray(hc_mm, dtype=float)[keep]
    if not keep.any():
        return dict(ga_validity=math.nan, ga_ci_low=math.nan, ga_ci_high=math.nan, ga_spearman=math.nan, ga_n=0)
    valid = ga_valid(pred_days, hc_mm)
    lo, hi = bootstrap_ci(valid)
    return dict(ga_validity=100 * float(valid.mean()), ga_ci_low=lo, ga_ci_high=hi,
                ga_spearman=spearman(pred_days, hc_mm), ga_n=int(keep.sum()))


# --- zero-shot: image embeddings, text classifiers, age scores ---
@torch.no_grad()
def embed_images(model, records, batch_size=64, device="cpu", normalize=False, dtype=torch.float32):
    """Records (a list, or any iterable: a stream of tar samples) of dicts with 'image' (PIL or path) and optionally
    'where' (named if the file cannot be read) -> (image embeddings [N, D] in dtype, raw unless normalize, each
    image's original (W, H)), preprocessed for model."""
    prep = data.Preprocess(model.image_size, model.image_mean, model.image_std)
    feats, sizes, advance = [], [], progress("images", len(records) if hasattr(records, "__len__") else None)
    records = iter(records)
    while batch := list(itertools.islice(records, batch_size)):
        batch = [data.load_image(r["image"], r.get("where", "")) if isinstance(r["image"], (str, Path))
                 else r["image"] for r in batch]
        sizes += [im.size for im in batch]
        x = model.encode_image(torch.stack([prep(im) for im in batch]).to(device), normalize=normalize)
        feats.append(x.float().cpu().to(dtype))
        advance(len(batch))
    if not feats:
        raise ValueError("no images: the data yielded none")
    return torch.cat(feats), sizes


@torch.no_grad()
def encode_texts(model, tokenizer, texts, batch_size=256, device="cpu", dtype=torch.float32):
    """-> normalised text embeddings [len(texts), D] in dtype."""
    parts, advance = [], progress("texts", len(texts))
    for i in range(0, len(texts), batch_size):
        parts.append(F.normalize(model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float(), dim=-1)
                     .cpu().to(dtype))
        advance(len(parts[-1]))
    return torch.cat(parts)


def text_classifier(model, tokenizer, prompts, device="cpu"):
    """{class: [prompts]} -> class embeddings [C, D] = normalise(mean of normalised prompt embeddings)."""
    emb = encode_texts(model, tokenizer, [p for ps in prompts.values() for p in ps], device=device)
    return F.normalize(torch.stack([e.mean(0) for e in emb.split([len(ps) for ps in prompts.values()])]), dim=-1)


def template_prompts(templates):
    """(weeks, days, spacing) -> one prompt per template with {weeks} {day} {pixel_spacing} filled in."""
    return lambda w, d, s: [t.replace("{weeks}", str(w)).replace("{day}", str(d))
                            .replace("{pixel_spacing}", f"{s:.2f}") for t in templates]


def ga_predict(model, tokenizer, feats, spacings, prompt_fn, device="cpu"):
    """feats [N, D] normalised, spacings [N] (2-decimal text) -> predicted age in days [N]. The 175 x P candidate
    prompts depend on the spacing only, so they are encoded once per distinct spacing: that is the cost."""
    pred, advance = np.zeros(len(feats), dtype=int), progress("gestational age (heads)", len(feats))
    for s in sorted(set(spacings)):
        rows = [i for i, x in enumerate(spacings) if x == s]
        texts = [prompt_fn(int(d) // 7, int(d) % 7, float(s)) for d in GA_DAYS]
        emb = encode_texts(model, tokenizer, [p for ps in texts for p in ps], device=device)
        emb = emb.view(len(GA_DAYS), len(texts[0]), -1).mean(1)  # mean of 100*cos over prompts = 100*cos to the mean
        pred[rows] = GA_DAYS[[median_of_top(row) for row in (100 * feats[rows] @ emb.T).numpy()]]  # scores [n, 175]
        advance(len(rows))
    return pred


def check_labels(task, records, prompts):
    """A record's class (under task's CLASS_TASKS key) with no prompts raises ValueError naming each such label and the
    first row it is on."""
    key, names, unknown = CLASS_TASKS[task], list(prompts), {}
    for i, r in enumerate(records):
        if r.get(key) and class_key(r[key]) not in map(class_key, names):
            unknown.setdefault(r[key], r.get("where", f"image {i}"))
    if unknown:
        raise ValueError(f"{task}: no prompts for label(s) " + ", ".join(f"{k!r} ({w})" for k, w in unknown.items())
                         + f"; the prompts name {names}")


def zero_shot(model, tokenizer, records, suite, batch_size=64, device="cpu"):
    """records: dicts of image, a class name (or None) under each CLASS_TASKS key (plane, brain, label), hc_mm (None:
    no age task), pixel_mm, where (optional, named in errors). suite: {'planes' | 'brain' | 'classify': {class:
    [prompts]}, 'ga': prompt_fn}. -> (metrics, outputs per task). A label with no prompts raises, naming its row."""
    feats, sizes = embed_images(model, records, batch_size, device, normalize=True)
    metrics, outputs = {"n_images": len(records)}, {}
    for task, key in CLASS_TASKS.items():
        rows = [i for i, r in enumerate(records) if r.get(key)]
        if not rows:
            continue
        names = list(suite[task])  # task_records has checked that every label has prompts
        index = {class_key(name): c for c, name in enumerate(names)}
        targets = np.array([index[class_key(records[i][key])] for i in rows])
        classes = text_classifier(model, tokenizer, suite[task], device)  # once per call, for every image
        probs = (100 * feats[rows] @ classes.T).softmax(-1).numpy()  # 100: CLIP's fixed zero-shot scale
        metrics.update({f"{task}_{k}": v for k, v in class_metrics(probs, targets, names).items()})
        outputs[task] = dict(probs=probs, targets=targets, names=names, feats=feats[rows].numpy())
    if any(r.get("hc_mm") is not None for r in records):  # heads outside the HC window are not even scored
        rows = [i for i, r in enumerate(records) if r.get("hc_mm") is not None and in_hc_window(r["hc_mm"])]
        spacings = [pixel_spacing_text(*sizes[i], model.image_size, records[i]["pixel_mm"]) for i in rows]
        pred = ga_predict(model, tokenizer, feats[rows], spacings, suite["ga"], device)
        metrics.update(ga_metrics(pred, [records[i]["hc_mm"] for i in rows]))
    if "planes_f1" in metrics and "brain_f1" in metrics:
        metrics["class_f1"] = class_f1(metrics["planes_f1"], metrics["brain_f1"])
        if "ga_validity" in metrics:
            metrics["composite"] = composite(metrics["class_f1"], metrics["ga_validity"])
    return metrics, outputs


def retrieval(model, tokenizer, pairs, batch_size=64, device="cpu"):
    """pairs: dicts of image (PIL or path), caption and optionally key (rows with one key share one image, which is
    embedded once) -> retrieval_* (retrieval_metrics) on L2-normalised fp16 embeddings: 50k pairs take 2 x 50 MB at
    D = 512. Pairs may be a stream (tar shards): it is read once."""
    index, owner, captions = {}, [], []

    def images():  # each distinct image once; every caption and the index of its image on the way
        for i, pair in enumerate(pairs):
            if (key := pair.get("key", i)) not in index:
                index[key] = len(index)
                yield pair
            owner.append(index[key])
            captions.append(pair["caption"])
    img, _ = embed_images(model, images(), batch_size, device, normalize=True, dtype=torch.float16)
    txt = encode_texts(model, tokenizer, captions, device=device, dtype=torch.float16)
    metrics = {f"retrieval_{k}": v for k, v in retrieval_metrics(img, txt, owner).items()}
    # captions that repeat (class-level captions, as 'a photo of a dog') cannot tell their images apart: a caption
    # that m images share finds its own in the top k with chance min(k, m) / m at best (and an image ties with the
    # identical captions of others, counted as found)
    images_of = collections.defaultdict(set)
    for caption, image in zip(captions, owner):
        images_of[class_key(caption)].add(image)
    share = [len(images_of[class_key(c)]) for c in captions]
    caps = {f"retrieval_t2i_r{k}_max": float(np.mean([min(k, m) / m for m in share])) for k in (1, 5, 10)}
    return dict(metrics, **caps, n_images=len(img), n_captions=len(txt), n_distinct_captions=len(images_of))


def retrieval_note(m):
    """One line for a retrieval result whose captions repeat (recall@k capped), else ''."""
    return "" if m.get("retrieval_t2i_r1_max", 1) >= 1 else (
        f"note: {m['n_distinct_captions']} distinct captions of {m['n_captions']} for {m['n_images']} images: a "
        "caption shared by several images cannot tell them apart, so text->image R@1/5/10 is at most "
        + "/".join(f"{m[f'retrieval_t2i_r{k}_max']:.3f}" for k in (1, 5, 10)) + " (retrieval_t2i_r*_max), image->text"
        " counts another image's identical caption as found, and retrieval_mean_recall averages both; classify with "
        "labels instead")


# --- tasks: records from the toy world or from the real files ---
@functools.lru_cache(maxsize=4)  # the same images at every evaluation during training: render them once
def toy_records(split, n=None):
    out = []
    for item in data.ToyWorld(split=split, length=n):
        head = item["brain_plane"] >= 0  # a brain-plane image is a head with a true HC
        out.append(dict(image=item["image"], plane=data.PLANES[item["plane"]], pixel_mm=item["pixel_mm"],
                        brain=data.BRAIN_PLANES[item["brain_plane"]] if head else None,
                        hc_mm=item["hc_mm"] if head else None))
    return out


def planes_records(root, split="all"):
    """FETAL_PLANES_DB, the probe's records (probe_records) in the prompts' class names: 5 planes ("Other" left out)
    and brain sub-planes; split train | test | all."""
    out = [dict(r, plane=FPDB_CLASS.get(r["plane"]), brain=FPDB_CLASS.get(r["brain"])) for r in
           probe_records("planes", root)]
    return [r for r in out if (r["plane"] or r["brain"]) and split in ("all", r["split"])]


def task_records(task, split="val", n=None, root=None, csv=None, prompts=None):
    """-> (records, prompt suite), every class label checked against its prompts. task: toy (a ToyWorld split) |
    planes | brain (root: FETAL_PLANES_DB) | hc18 (root: HC18; its labelled images, whatever the split) | paper (root
    'FPDB,HC18': all three; 'FPDB' alone: planes and brain in one pass) | classify (root: a CSV of image and label) |
    retrieval (root: a caption CSV, or tar shards, streamed). csv: column names and separator (csv_img_key,
    csv_label_key, csv_caption_key, csv_separator; empty: the default). prompts {'planes' | 'brain' | 'classify':
    {class: [prompts]}, 'ga': [templates]} replace the defaults; classify has none. n: at most n per source."""
    records, suite = _task_records(task, split, n, root, csv)
    suite.update({k: template_prompts(v) if k == "ga" else v for k, v in (prompts or {}).items()})
    if task == "classify" and "classify" not in suite:
        raise ValueError("task classify needs class prompts: --prompts=classes.json (data.load_prompts' formats)")
    if isinstance(records, list) and not records:
        raise ValueError(f"no images for task {task!r}, split {split!r} in {root or 'the toy world'}")
    for name in [name for name in CLASS_TASKS if isinstance(records, list) and name in suite]:
        check_labels(name, records, suite[name])
    return records, suite


def _task_records(task, split, n, root, csv):
    if task == "toy":
        return toy_records(split, n), dict(planes=data.TOY_PLANE_PROMPTS, brain=data.TOY_BRAIN_PROMPTS,
                                           ga=data.toy_ga_prompts)
    if task in ("classify", "retrieval") and root:
        if task == "retrieval" and not str(root).lower().endswith((".csv", ".tsv")):
            return itertools.islice(data.TarShards(root), n), {}
        if task == "classify":
            return probe_records(task, root, n, csv), {}
        csv = {k: v for k, v in (csv or {}).items() if v}
        rows = data.read_captions(root, csv.get("csv_img_key", "filepath"), csv.get("csv_caption_key", "title"),
                                  csv.get("csv_separator"))[:n]
        return [dict(image=r["image_path"], caption=r["caption"], key=str(r["image_path"])) for r in rows], {}
    if task not in ("planes", "brain", "hc18", "paper") or not root or task != "paper" and "," in str(root):
        raise ValueError(f"task {task!r} with data {root!r}: use task=toy, or planes | brain | hc18 with data=DIR, "
                         "or paper with data=FETAL_PLANES_DB_DIR[,HC18_DIR], or classify | retrieval with data=CSV")
    fpdb, hc18 = (str(root).split(",") + [None])[:2] if task == "paper" else (root, root)
    records = []
    if task != "hc18":
        if split not in ("train", "test", "all"):  # no validation rows: select checkpoints on train, never on test
            raise ValueError(f"FETAL_PLANES_DB splits are train | test | all (zero-shot papers use all), not {split!r}")
        drop = {"planes": dict(brain=None), "brain": dict(plane=None)}.get(task, {})
        records = [r for r in (dict(r, **drop) for r in planes_records(fpdb, split)) if r["plane"] or r["brain"]][:n]
    if task == "hc18" or task == "paper" and hc18:
        records += [dict(image=r["image_path"], hc_mm=r["hc_mm"], pixel_mm=r["pixel_mm"], where=r["where"])
                    for r in data.read_hc18(hc18)][:n]
    return records, dict(planes=PLANE_PROMPTS, brain=BRAIN_PROMPTS, ga=template_prompts(GA_TEMPLATES))


def evaluate(model, tokenizer, task="toy", split="val", n=None, root=None, prompts=None, batch_size=64, device="cpu",
             csv=None):
    """Zero-shot metrics (train.py calls this): planes_f1, brain_f1, class_f1, ga_validity, composite, classify_*,
    retrieval_* and more. prompts {'planes' | 'brain' | 'classify': {class: [prompts]}, 'ga': [templates]} replaces
    the defaults (classify has none); csv as task_records. The caller's train/eval mode is kept."""
    records, suite = task_records(task, split, n, root, csv, prompts)
    training, t0 = model.training, time.perf_counter()
    try:
        metrics = (retrieval(model.eval(), tokenizer, records, batch_size, device) if task == "retrieval" else
                   zero_shot(model.eval(), tokenizer, records, suite, batch_size, device)[0])
    finally:
        model.train(training)
    return {**metrics, "eval_seconds": time.perf_counter() - t0}


# --- linear probing: one linear layer on frozen image embeddings, as FetalCLIP's released probing scripts ---
PROBE_KEYS = dict(toy=("plane", "brain"), planes=("plane",), brain=("brain",), paper=("plane", "brain"),
                  classify=("label",))  # task -> the record keys probed
PROBE_CLASSES = dict(  # FetalCLIP's class orders; its six-plane probe keeps "Other", unlike its zero-shot task
    plane=("Other", "Fetal abdomen", "Fetal brain", "Maternal cervix", "Fetal femur", "Fetal thorax"),
    brain=data.BRAIN_PLANES)
FETALCLIP_SPLITS = dict(plane="classification_six_fetal_planes", brain="classification_brain_subplanes")
SPLITS = ("train", "val", "test")


def patient_split(patients, val_fraction=0.2, seed=0):
    """patients [N] -> bool mask [N] held out: val_fraction of the patients (at least one), drawn whole."""
    ids = np.unique(np.asarray(patients))
    np.random.default_rng(seed).shuffle(ids)
    return np.isin(patients, ids[:max(1, round(val_fraction * len(ids)))])


def linear_probe(train, val, test, num_classes, epochs=50, lr=3e-4, weight_decay=0.01, batch_size=64, seed=0):
    """train/val/test: (embeddings [N, D], labels [N]). AdamW on shuffled batches, the last partial batch dropped
    when there is a full one (FetalCLIP's loader: drop_last); after each epoch the mean validation cross-entropy,
    and the weights of the first epoch with the lowest one are kept (Lightning's ModelCheckpoint on val_loss).
    -> (test probabilities [N_test, C], validation loss per epoch [epochs], the chosen epoch, 0-based)."""
    torch.manual_seed(seed)
    (x, y), (xv, yv), (xt, _) = [(torch.as_tensor(a).float(), torch.as_tensor(b).long()) for a, b in
                                 (train, val, test)]
    head = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses, best = [], (math.inf, None, -1)
    for epoch in range(epochs):
        batches = torch.randperm(len(x)).split(batch_size)
        for idx in batches[:len(x) // batch_size] or batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(head(xv), yv).item())
        if losses[-1] < best[0]:
            best = (losses[-1], copy.deepcopy(head.state_dict()), epoch)
    head.load_state_dict(best[1])
    with torch.no_grad():
        return head(xt).softmax(-1).numpy(), losses, best[2]


def read_probe_splits(folder, patients):
    """FetalCLIP's split files in folder: test_split.json ["Patient00001", ...] and train_val_split.json {"0":
    [[train ids], [val ids]], ...} (five folds). patients: the data set's ids. -> [(train, val, test) id sets] per
    fold. Raises ValueError naming the file and key: unreadable JSON, another layout, an unknown id, a patient on two
    sides."""
    given = {}
    for name in ("test_split.json", "train_val_split.json"):
        try:
            given[name] = json.loads((Path(folder) / name).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--probe_splits: cannot read {Path(folder) / name}: {e}") from None
    ids = lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v)
    (test, folds), where = given.values(), Path(folder) / "train_val_split.json"
    if not ids(test) or not test or (unknown := sorted(set(test) - patients)):
        raise ValueError(f"{Path(folder) / 'test_split.json'}: " + (f"patient {unknown[0]!r} is not in the data set"
                         if ids(test) and test else "expected a list of patient ids [\"Patient00001\", ...]"))
    if not isinstance(folds, dict) or not folds:
        raise ValueError(f"{where}: expected {{\"0\": [[train patient ids], [val patient ids]], ...}}")
    test = set(test)
    for key, fold in folds.items():
        if not (isinstance(fold, list) and len(fold) == 2 and all(map(ids, fold))):
            raise ValueError(f"{where}, key {key!r}: expected [[train patient ids], [val patient ids]]")
        train, val = map(set, fold)
        for bad, why in ((train & val, "in both train and val"), (train & test, "in train and in test_split.json"),
                         (val & test, "in val and in test_split.json"), ((train | val) - patients, "not in the data")):
            if bad:
                raise ValueError(f"{where}, key {key!r}: patient {sorted(bad)[0]!r} is {why}")
    return [(set(t), set(v), test) for t, v in folds.values()]


def probe_records(task, root, n=None, csv=None):
    """-> the images to probe: dicts with image, where, group (a patient: never on two sides of a split), split
    (train | val | test, or '' for all rows when none is given) and the class of each key in PROBE_KEYS[task].
    FETAL_PLANES_DB: the patient is the image name's prefix, as in FetalCLIP's split files; split from its Train
    column. classify: root a CSV (a 'split' column optional) or train.csv,val.csv,test.csv; the group column
    csv_group_key when the CSV has it, else each row its own group."""
    if task == "toy":
        return [dict(r, split=s, group=f"{s}{i}") for s in SPLITS for i, r in enumerate(toy_records(s, n or 1000))]
    if task != "classify":
        return [dict(image=r["image_path"], where=r["where"], group=r["image_path"].stem.split("_")[0],
                     split=SPLITS[2 - 2 * r["train"]], plane=(data.PLANES + ("Other",))[r["plane"]],
                     brain=data.BRAIN_PLANES[r["brain_plane"]] if r["brain_plane"] >= 0 else None)
                for r in data.read_fetal_planes(str(root).split(",")[0])]
    csv, paths, out = {k: v for k, v in (csv or {}).items() if v}, str(root).split(","), []
    if len(paths) not in (1, 3):
        raise ValueError(f"--data={root}: a probe takes one CSV or three, train.csv,val.csv,test.csv")
    image, label = csv.get("csv_img_key", "filepath"), csv.get("csv_label_key", "label")
    for path, fixed in zip(paths, SPLITS if len(paths) == 3 else ("",)):
        for r in data.read_table(path, (image, label), csv.get("csv_separator"))[:n]:
            split = fixed or (r["split"].lower() or None if "split" in r else "")  # None: an empty cell
            if not data.clean_text(r[label]):  # a row with no class would silently leave the task
                raise ValueError(f"{r['where']}: empty label (column {label!r})")
            out.append(dict(image=Path(path).parent / r[image], where=r["where"], label=r[label], split=split,
                            group=r.get(csv.get("csv_group_key", "patient")) or r["where"]))
    return out


def probe_folds(groups, split, folder="", patients=(), where=""):
    """groups, split [N] -> [(train, val, test) boolean masks [N]] per fold. folder: FetalCLIP's split files (all
    their folds), checked against patients (every id of the data set). Else one fold: the split given, or with none,
    test drawn by group (20% of the groups, seed 0); val, where none is given, drawn likewise from the rest. Raises
    ValueError when a group is on two sides or a side is empty."""
    if folder:
        folds = [tuple(np.isin(groups, list(ids)) for ids in fold) for fold in read_probe_splits(folder, set(patients))]
    else:
        test = split == "test" if (split != "").all() else patient_split(groups)
        val = split == "val" if "val" in split else ~test & np.isin(groups, groups[~test][patient_split(groups[~test])])
        folds = [(~test & ~val, val, test)]
    for fold, masks in enumerate(folds):
        for (a, b), name in zip(itertools.combinations(masks, 2), ("train and val", "train and test", "val and test")):
            if both := sorted(set(groups[a]) & set(groups[b])):
                raise ValueError(f"{where}: group {str(both[0])!r} has rows in {name}: a patient on two sides")
        if empty := [s for s, m in zip(SPLITS, masks) if not m.any()]:
            raise ValueError(f"{where}: no {empty[0]} rows to probe with in fold {fold} ({len(groups)} rows)")
    return folds


def probe(model, task, n=None, root=None, batch_size=64, device="cpu", splits="", csv=None, runs=5, epochs=50):
    """Linear probes as FetalCLIP's (README): `runs` seeds of linear_probe per fold (probe_folds; splits: a folder of
    FetalCLIP's split files, or its probing/ folder) on the raw image embeddings, scored on the test rows by
    class_metrics, for each key: plane (six classes with "Other"), brain, label (classify). -> probe_<key>_<metric>
    and _<metric>_std (mean, sample std over the runs), probe_<key>_runs [{fold, run, n_train, n_val, n_test,
    best_epoch, val_loss [epochs], metrics}]; with two classes auroc (the second positive), auroc_ci_low/high (the mean
    over the runs of their AUROCs on each of 10,000 bootstrap resamples of the test images: the interval of auroc), auroc_positive (its class)."""
    records, out = probe_records(task, root, n, csv), {}
    patients = {r["group"] for r in records}  # a brain split may name a test patient with no brain image
    records = [r for r in records if any(r.get(k) for k in PROBE_KEYS[task])]
    if bad := [r for r in records if r["split"] not in ("", *SPLITS)]:  # zero-shot reads such a column, unchecked
        raise ValueError(f"{bad[0]['where']}: split {bad[0]['split'] or ''!r}: the split column takes train | val | "
                         "test")
    feats = embed_images(model.eval(), records, batch_size, device)[0].numpy()
    for key in PROBE_KEYS[task]:
        keep = [i for i, r in enumerate(records) if r.get(key)]
        names = PROBE_CLASSES[key] if task in ("planes", "brain", "paper") else sorted({records[i][key] for i in keep})
        x, y = feats[keep], np.array([names.index(records[i][key]) for i in keep])
        folder = Path(splits or ".") / FETALCLIP_SPLITS.get(key, "")
        folds = probe_folds(*(np.array([records[i][k] for i in keep]) for k in ("group", "split")),
                            splits and (folder if folder.is_dir() else splits), patients, root or "the toy world")
        test, results, run_probs = folds[0][2], [], []  # the same test rows in every fold
        if len(names) == 2 and len(set(y[test])) < 2:
            raise ValueError(f"{root}: the test rows are all {names[y[test][0]]!r}: AUROC needs both classes")
        for (fold, (train, val, test)), run in itertools.product(enumerate(folds), range(runs)):
            probs, losses, best = linear_probe((x[train], y[train]), (x[val], y[val]), (x[test], y[test]),
                                               len(names), epochs, seed=fold * runs + run)
            m = {k: v for k, v in class_metrics(probs, y[test], names, topk=(2, 3)).items() if k != "confusion"}
            if len(names) == 2:
                m["auroc"] = auroc(probs[:, 1], y[test])
                run_probs.append(probs[:, 1])
            results.append(dict(fold=fold, run=run, n_train=int(train.sum()), n_val=int(val.sum()),
                                n_test=int(test.sum()), best_epoch=best, val_loss=losses, **m))
        for k in ["best_epoch", *m]:
            out[f"probe_{key}_{k}"], out[f"probe_{key}_{k}_std"] = mean_std([r.get(k) for r in results])
        if len(names) == 2:
            mean_auroc = lambda t, *p: np.mean([auroc(s, t) for s in p]) if 0 < t.sum() < len(t) else math.nan
            out[f"probe_{key}_auroc_ci_low"], out[f"probe_{key}_auroc_ci_high"] = bootstrap_ci(
                (y[test], *run_probs), statistic=mean_auroc)  # NaN: a resample of one class, left out
            out[f"probe_{key}_auroc_positive"] = names[1]
        out[f"probe_{key}_runs"] = results
    return out


# --- teacher-student analysis: the same per-image confidence, different confusions? ---
def separation(feats, targets):
    """Mean distance between class centroids / mean distance of an embedding to its own centroid (> 1: separated)."""
    feats, targets = np.asarray(feats, dtype=float), np.asarray(targets)
    classes, inv = np.unique(targets, return_inverse=True)
    cents = np.stack([feats[targets == c].mean(0) for c in classes])
    between = [np.linalg.norm(cents[i] - cents[j]) for i in range(len(classes)) for j in range(i + 1, len(classes))]
    return float(np.mean(between) / np.linalg.norm(feats - cents[inv], axis=1).mean())


def confusion(probs, targets):
    """Row-normalised confusion matrix of argmax predictions: rows = classes present, columns = all classes."""
    present = np.unique(targets)
    cm = confusion_counts(np.asarray(probs).argmax(1), targets, probs.shape[1])[present]
    return cm / cm.sum(1, keepdims=True), present


def teacher_student(t_probs, s_probs, targets, t_feats, s_feats):
    """(a) r of the true-class probability per image; (b) r of the non-target probabilities (every image, every
    class but its own) and of the off-diagonal cells of the two confusion matrices; (c) class separation."""
    rows, targets = np.arange(len(targets)), np.asarray(targets)
    other = np.ones(t_probs.shape, dtype=bool)
    other[rows, targets] = False
    (cm_t, present), (cm_s, _) = confusion(t_probs, targets), confusion(s_probs, targets)
    off = np.ones(cm_t.shape, dtype=bool)
    off[np.arange(len(present)), present] = False
    return dict(true_prob_corr=pearson(t_probs[rows, targets], s_probs[rows, targets]),
                offdiag_prob_corr=pearson(t_probs[other], s_probs[other]), confusion_corr=pearson(cm_t[off], cm_s[off]),
                separation_teacher=separation(t_feats, targets), separation_student=separation(s_feats, targets))


def pyplot(numbers_in="the results JSON"):
    """matplotlib.pyplot, drawing to files only; None, with a message, when it is absent: figures are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no figure: matplotlib is not installed (pip install matplotlib); the numbers are in {numbers_in}")
        return None
    return plt


def plot_teacher_student(path, t_probs, s_probs, targets, names):
    """PNG: teacher vs student true-class probability, and the two confusion matrices side by side."""
    if (plt := pyplot()) is None:
        return None
    t_true, s_true = t_probs[np.arange(len(targets)), targets], s_probs[np.arange(len(targets)), targets]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    ax[0].scatter(t_true, s_true, s=6, alpha=0.5)
    ax[0].plot([0, 1], [0, 1], "k--", lw=1)
    ax[0].set(xlabel="teacher p(true class)", ylabel="student p(true class)",
              title=f"per-image confidence, r = {pearson(t_true, s_true):.2f}")
    for a, probs, who in ((ax[1], t_probs, "teacher"), (ax[2], s_probs, "student")):
        cm, present = confusion(probs, targets)
        a.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        a.set(title=f"{who} confusion (rows: true)", xticks=range(len(names)), yticks=range(len(present)))
        a.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        a.set_yticklabels([names[c] for c in present], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def analysis(teacher, student, task, split, n=None, root=None, out_dir="runs/eval", device="cpu", csv=None,
             prompts=None):
    """teacher, student: (model, tokenizer), on the same images (task_records' arguments) -> ts_planes_*, ts_brain_*,
    ts_classify_*; a PNG of the first of those tasks."""
    records, suite = task_records(task, split, n, root, csv, prompts)
    (_, t), (_, s) = [zero_shot(m.eval(), tok, records, suite, device=device) for m, tok in (teacher, student)]
    out, tasks = {}, [name for name in CLASS_TASKS if name in s]
    for name in tasks:
        ts = teacher_student(t[name]["probs"], s[name]["probs"], s[name]["targets"], t[name]["feats"], s[name]["feats"])
        out.update({f"ts_{name}_{k}": v for k, v in ts.items()})
    if tasks:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if png := plot_teacher_student(Path(out_dir) / f"teacher_student_{task}.png", t[tasks[0]]["probs"],
                                       s[tasks[0]]["probs"], s[tasks[0]]["targets"], s[tasks[0]]["names"]):
            print(f"figure: {png}")
    return out


# --- speed: parameters, counted MACs, CPU latency at batch 1 ---
def count_gmacs(fn, x):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops() / 2 / 1e9  # a multiply-add is two FLOPs


@torch.no_grad()
def latency_ms(fn, x, warmup=3, runs=10):
    """-> (median ms, spread): the spread is the interquartile range over the median, how far runs disagree."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return 1000 * float(median), float((q3 - q1) / median)


NOISY = 0.1  # a spread above 10% means another process shared the CPU: such timings are not comparable


def noise_warning(rows):
    """'\nwarning: ...' to print after timings (speed() rows) too noisy to trust, else ''."""
    worst = max(row["spread"] for row in rows)
    return f"\nwarning: timed runs disagree by up to {worst:.0%} of the median: the CPU was shared, so these timings " \
        "(and folded vs unfolded) are not to be trusted; rerun on an idle machine" if worst > NOISY else ""


def speed(model, runs=10):
    """Params (M), GMACs and median CPU ms at batch 1 of the image tower, multi-branch and folded when it has
    branches, and of the text tower; `spread`, the largest of their latency_ms spreads."""
    model = model.eval()
    image = torch.randn(1, 3, model.image_size, model.image_size)
    vocab = model.config["text_cfg"].get("vocab_size", 49408)
    ids = torch.randint(1, vocab - 1, (1, model.context_length))
    ids[:, -1] = vocab - 1  # end-of-text last: the full context, as an exported text tower runs it
    foldable = any(hasattr(m, "reparameterize") for m in model.visual.modules())
    # train mode runs each branch (eval mode folds them), BatchNorm on running stats (a 1x1 map at batch 1 has none)
    tower = copy.deepcopy(model.visual).train() if foldable else model.visual
    tower.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    (image_ms, a), (text_ms, b) = latency_ms(tower, image, runs=runs), latency_ms(model.encode_text, ids, runs=runs)
    out = dict(params_m=models.count_params(model) / 1e6,
               image_params_m=models.count_params(model.visual) / 1e6, image_gmacs=count_gmacs(tower, image),
               text_gmacs=count_gmacs(model.encode_text, ids), image_ms=image_ms, text_ms=text_ms, spread=max(a, b))
    if foldable:
        folded = models.reparameterize(copy.deepcopy(model.visual))
        (ms, c), gmacs = latency_ms(folded, image, runs=runs), count_gmacs(folded, image)
        out.update(image_ms_folded=ms, image_gmacs_folded=gmacs, spread=max(a, b, c))
    return out


# --- checkpoints, results files, command line ---
def load_model_from_checkpoint(path, model_config=None, bpe_path=None):
    """-> (model in eval mode, tokenizer); load_model_and_tokenizer_kind says which checkpoints. A BPE checkpoint's
    vocabulary: the copy it carries, else bpe_path, else data._find_bpe's places ($DARK_BPE, open_clip's)."""
    model, kind, vocab = load_model_and_tokenizer_kind(path, model_config)
    return model, data.get_tokenizer(kind, model.context_length, vocab or bpe_path)


def load_model_and_tokenizer_kind(path, model_config=None, weights=True):
    """-> (model in eval mode, 'toy' | 'bpe', the BPE merges file's bytes the checkpoint carries or None), no vocabulary
    file needed. A train.py checkpoint carries its config and its tokenizer: {'model': state_dict, 'model_config':
    cfg, 'tokenizer': 'toy' | 'bpe', 'bpe_vocab': bytes of bpe_simple_vocab_16e6.txt.gz} ({'config': {'model':
    cfg}} works too). Raw open_clip weights (FetalCLIP, MobileCLIP2) need model_config: a preset name, an open_clip
    JSON or a dict. weights=False reads no weight and builds the model on the meta device: its sizes and
    preprocessing only."""
    ckpt = models.read_checkpoint(path, mmap=not weights)  # mmap: tensors stay on disk
    cfg = ckpt.get("model_config") or (ckpt.get("config") or {}).get("model") or model_config
    if cfg is None:
        raise ValueError(f"{path} has no 'model_config': raw open_clip weights need their config, a preset "
                         "(fetalclip | mobileclip2-s0) or an open_clip JSON: --model_config= for eval.py and "
                         "export_ios.py, --teacher_config= for train.py's teacher")
    with torch.device("cpu" if weights else "meta"):
        model = models.build_model(cfg)
    if weights:
        models.load_checkpoint(model, ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt)
    kind = ckpt.get("tokenizer") or ("bpe" if model.config["text_cfg"].get("vocab_size", 49408) == 49408 else "toy")
    return model.eval(), kind, ckpt.get("bpe_vocab")


def save_results(path, metrics, meta):
    """{'meta': protocol, date, model, checkpoint, dataset..., 'metrics': ...}; NaN (undefined) is written as null."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    meta = dict(protocol=PROTOCOL, date=time.strftime("%Y-%m-%d %H:%M:%S"), **meta)
    data._write_json(path, json.dumps(dict(meta=meta, metrics=clean), indent=2))  # a full disk: named, no half file
    return path


def markdown_table(rows, columns):
    cell = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] +
                     ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows])


def describe(model):
    """The image tower in a few words: 'fastvit_mci0 @256px', 'MCi layers 1-1-2-1 dims 12-24-48-96 @64px' (a member
    that vision_cfg.mci_cfg resizes), 'ViT 12x768/16 @224px' (layers x width / patch)."""
    v, name = model.config["vision_cfg"], model.config["vision_cfg"].get("timm_model_name")
    arch = {**models.MCI_ARCHS[name], **v.get("mci_cfg", {})} if name else None
    if name is None or arch != models.MCI_ARCHS[name]:
        name = (f"ViT {v['layers']}x{v['width']}/{v['patch_size']}" if name is None else "MCi " + " ".join(
            f"{k} {'-'.join(map(str, arch[k]))}" for k in ("layers", "embed_dims")))
    return f"{name} @{model.image_size}px"


# --- Table 1: a folder of train.py runs -> the paper's table, its Figure 2 and the teacher-student analysis ---
TABLE1_ROWS = ("No KD", "Static logit KD", "Coupled repulsive KD (lambda 1 -> -0.8)", "DARK (beta 2 -> -0.8)")
ANALYSED = ("No KD", "Static logit KD", "DARK (beta 2 -> -0.8)")  # the paper's teacher-student comparison
TABLE1_METRICS = dict(planes_f1=4, brain_f1=4, ga_validity=2, composite=4)  # digits shown: validity is a percent
TABLE_METRICS = dict(toy=TABLE1_METRICS, classify=("classify_f1", "classify_acc"),  # --table's columns by --task
                     retrieval=("retrieval_i2t_r1", "retrieval_t2i_r1", "retrieval_mean_recall"))
TS_COLUMNS = ("true_prob_corr", "offdiag_prob_corr", "confusion_corr", "separation_teacher", "separation_student")
TS_PLANES = [f"ts_planes_{k}" for k in TS_COLUMNS]  # analysis() keys for the 5-plane task


def table1_row(cfg):
    """A run's train config -> (sort key, label). The label names kd and its schedule w0 -> w0 * r (as
    dark.kd_weight_at); other DARK rows are the beta0 ablation. Rows are run_group's; row_labels adds what differs."""
    kd = cfg["kd"]
    w0, r = {"none": (0, 0), "static": (cfg["lambda0"], 1), "coupled": (cfg["lambda0"], cfg["lambda_r"]),
             "dark": (cfg["beta0"], cfg["beta_r"])}[kd]
    label = {"none": "No KD", "static": "Static logit KD" + (f" (lambda {w0:g})" if w0 != 1 else ""),
             "coupled": f"Coupled repulsive KD (lambda {w0:g} -> {w0 * r:g})",
             "dark": f"DARK (beta {w0:g} -> {w0 * r:g})"}[kd]
    if kd == "dark" and label not in TABLE1_ROWS:
        label = f"DARK beta0={w0:g} (-> {w0 * r:g})"
    return (("none", "static", "coupled", "dark").index(kd), label not in TABLE1_ROWS, w0), label


# train.py options that say how a run went, not what it trained (the ones it lets change at a --resume), and what
# each kd mode does not read: runs that differ only there are seeds of one row
HOW_IT_RAN = ("out_dir", "resume", "overwrite", "ckpt_every", "log_every", "workers", "device", "threads")
UNREAD = dict(none=("teacher", "teacher_config", "teacher_cache", "cache_views", "tau", "beta0", "beta_r", "lambda0",
                    "lambda_r"), static=("beta0", "beta_r", "lambda_r"), coupled=("beta0", "beta_r"),
              dark=("lambda0", "lambda_r"))


def run_group(cfg):
    """The row a run belongs to, as JSON: its train config less the seed, HOW_IT_RAN, what its kd does not read and
    where the BPE file lay (there is one CLIP vocabulary, and a checkpoint carries it); of --teacher_cache only
    whether there is one (a cache holds one seed's views, so each seed of a row has its own folder)."""
    group = {k: v for k, v in cfg.items() if k not in ("seed", "bpe", *HOW_IT_RAN, *UNREAD[cfg["kd"]])}
    if "teacher_cache" in group:
        group["teacher_cache"] = bool(group["teacher_cache"])
        group = {k: v for k, v in group.items() if k != "cache_views" or group["teacher_cache"]}  # read from a cache
    return json.dumps(group, sort_keys=True)


def row_labels(configs):
    """{run_group: a run's train config} -> {run_group: label}: table1_row's label, then key=value for each key whose
    value differs between the groups that read it ('DARK (beta 2 -> -0.8) tau=1'). Raises ValueError when two groups
    would still share a label (a key only one of them has, from an older train.py)."""
    read = {g: json.loads(g) for g in configs}
    shown = [k for k in sorted(set().union(*read.values())) if k not in ("kd", "beta0", "beta_r", "lambda0", "lambda_r")
             and len({json.dumps(c[k]) for c in read.values() if k in c}) > 1]
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    labels = {g: " ".join([table1_row(configs[g])[1]] + [f"{k}={fmt(c[k])}" for k in shown if k in c])
              for g, c in read.items()}
    if len(set(labels.values())) < len(labels):
        raise ValueError("runs of different configs would share a row: " + "; ".join(f"{labels[g]}: {g}" for g in read))
    return labels


def mean_std(values):
    """-> (mean, sample std or None for one value); None too where a seed's metric is undefined (saved as null)."""
    v = np.array([math.nan if x is None else x for x in values], dtype=float)
    finite = lambda x: float(x) if math.isfinite(x) else None
    return finite(v.mean()), finite(v.std(ddof=1)) if len(v) > 1 else None


def t_quantile(p, df):
    """Student's t quantile for p in (0.5, 1) with df degrees of freedom: bisection on the CDF, whose density is
    integrated numerically (numpy only, no scipy). t_quantile(0.975, 4) = 2.776, as printed t tables give."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    def cdf(t):
        x = np.linspace(0.0, t, 4001)
        return 0.5 + np.trapezoid(np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df)), x)
    lo, hi = 0.0, 1e3
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) < p else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def paired_difference(a, b, level=0.95):
    """{seed: metric} of two rows -> the difference a - b over the seeds both rows have: dict(seeds, mean, lo, hi),
    lo/hi the two-sided t interval of the mean difference (None with fewer than two seeds, or an undefined metric).
    Pairing by seed removes what the rows share (the same data order and initial weights for one seed)."""
    d = np.array([a[s] - b[s] for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None], float)
    if len(d) < 2:
        return dict(seeds=len(d), mean=float(d.mean()) if len(d) else None, lo=None, hi=None)
    half = t_quantile(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return dict(seeds=len(d), mean=float(d.mean()), lo=float(d.mean() - half), hi=float(d.mean() + half))


def cached(path, sources, meta, compute):
    """compute() -> metrics, saved to path; reused while path is newer than every source file and was written with
    the same meta and protocol, so rerunning the table evaluates only what was retrained."""
    if path.exists() and all(path.stat().st_mtime >= Path(s).stat().st_mtime for s in sources):
        saved = json.loads(path.read_text())
        if saved["meta"]["protocol"] == PROTOCOL and all(saved["meta"].get(k) == v for k, v in meta.items()):
            return saved["metrics"]
    save_results(path, compute(), meta)
    return json.loads(path.read_text())["metrics"]  # NaN read back as None, as from the cache


def dynamics_curves(run_dirs):
    """The log.jsonl of a row's seeds -> (progress, KD weight) of the first seed (every seed has the same schedule),
    (epochs, validation composite averaged over the seeds)."""
    logs = [[json.loads(x) for x in (d / "log.jsonl").read_text().splitlines() if x.strip()] for d in run_dirs]
    steps, val = [r for r in logs[0] if "kd_weight" in r], {}
    for r in (r for log in logs for r in log if "val_composite" in r):
        val.setdefault(r["epoch"], []).append(r["val_composite"])
    # a row logged at `step` carries the weight of optimizer step step - 1, and the last step is always logged
    return ([(r["step"] - 1) / steps[-1]["step"] for r in steps], [r["kd_weight"] for r in steps], sorted(val),
            [float(np.mean(val[e])) for e in sorted(val)])


def plot_dynamics(path, curves):
    """curves {label: dynamics_curves(...)} -> PNG, the paper's Figure 2."""
    if (plt := pyplot("table1.json and the runs' log.jsonl")) is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, (progress, weight, epochs, score) in curves.items():
        left.plot(progress, weight, label=label)
        right.plot(epochs, score, marker="o", label=label)
    left.axhline(0, color="k", lw=0.5)  # below zero the off-diagonal term repels
    left.set(xlabel="training progress (step / total steps)", ylabel="KD weight", title="KD weight schedule")
    right.set(xlabel="epoch", ylabel="validation composite", title="validation composite (mean over seeds)")
    right.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def table1_markdown(result, protocol=PROTOCOL):
    """table1()'s result (or the 'metrics' of its saved table1.json, with its meta's protocol) -> the markdown it
    prints: the rows, the paired differences, the teacher-student analysis."""
    fmt = lambda x, digits: "-" if x is None else f"{x:.{digits}f}"
    interval = lambda d, digits: (f"{fmt(d['mean'], digits)} [{fmt(d['lo'], digits)}, {fmt(d['hi'], digits)}]"
                                  f" (n={d['seeds']})")
    keys = {k: TABLE1_METRICS.get(k, 4) for k in result["teacher"] if k != "path"}  # metric -> digits shown
    lines = [dict(row="Teacher", seeds="-", **{k: fmt(result["teacher"][k], d) for k, d in keys.items()})]
    lines += [dict(row=r["row"], seeds=r["seeds"], **{k: f"{fmt(r[k], d)} +/- {fmt(r[k + '_std'], d)}"
                                                      for k, d in keys.items()}) for r in result["rows"]]
    return (f"Zero-shot on {result.get('scored_on', 'the toy test split')}: mean +/- sample std over seeds "
            f"({protocol})\n\n" + markdown_table(lines, ["row", "seeds", *keys])
           + "\n\nPaired by seed: mean difference [95% t interval over seeds] (seeds paired)\n\n"
           + markdown_table([dict(difference=name, **{k: interval(d[k], keys[k]) for k in keys})
                             for name, d in result["paired"].items()], ["difference", *keys])
           + ("" if "scored_on" in result else "\n\nTeacher-student analysis, 5 planes, lowest seed\n\n"
              + markdown_table([dict(row=label, **a) for label, a in result["analysis"].items()],
                               ["row", "run", *TS_PLANES])) + "\n")


def table1(root, out=None, n=None, device="cpu", task="toy", test_data=None, prompts=None, csv=None):
    """root/<run>/{best.pt, log.jsonl}, one folder per train.py run -> Table 1 on the toy test split (mean and sample
    std over seeds, beside the teacher) in out/table1.md and table1.json (out defaults to root), Figure 2 in
    dynamics.png, the differences DARK - Static KD and DARK - No KD paired by seed with 95% t intervals, and the
    teacher-student analysis of the lowest seed of No KD, Static KD and DARK. -> the JSON. Runs on data of one's own:
    task 'classify' (test_data a labelled CSV, prompts {'classify': {class: [prompts]}}) or 'retrieval' (a caption
    CSV or shards) scores them on test_data instead (TABLE_METRICS; no analysis, no figure). The teacher's own run
    folder, when it lies in root, is the Teacher row, not a run. Each checkpoint's metrics are cached beside it
    (test_metrics.json, analysis.json): a rerun is cheap. Raises ValueError for runs trained on files, scored on
    the toy world."""
    root, out, toy = Path(root), Path(out or root), task == "toy"

    def load(path):
        model, tokenizer = load_model_from_checkpoint(path)
        return model.to(device), tokenizer

    def test(ckpt):
        meta = dict(checkpoint=str(ckpt), split="test", n=n, **({} if toy else dict(task=task, data=str(test_data))))
        return cached(ckpt.parent / "test_metrics.json", [ckpt], meta, lambda: evaluate(
            *load(ckpt), task, "test" if toy else "all", n, test_data, prompts, device=device, csv=csv))

    def run_config(path):  # a cut file, or weights that train.py did not write, refused by name
        cfg = models.read_checkpoint(path, mmap=True).get("config")
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: no run config in it, so not a train.py checkpoint (--table reads train.py runs)")
        return cfg
    runs = [dict(name=p.parent.name, dir=p.parent, cfg=run_config(p)) for p in sorted(root.glob("*/best.pt"))]
    if not runs:
        raise FileNotFoundError(f"no {root}/<run>/best.pt: train each run with python train.py --kd=... --seed=... "
                                f"--out_dir={root}/<run>")
    teachers = {}  # a No KD run never loads its teacher: only distilled runs must agree on it
    for run in [run for run in runs if run["cfg"]["kd"] != "none"] or runs:
        teachers.setdefault(run["cfg"]["teacher"], []).append(run["name"])
    if len(teachers) != 1:
        raise ValueError("one teacher row needs one teacher, but the runs name several: " +
                         "; ".join(f"{t} ({', '.join(names)})" for t, names in teachers.items()))
    teacher = Path(next(iter(teachers)))
    if not teacher.is_file():
        raise FileNotFoundError(f"teacher {teacher}, named by the runs' config, is not there: a relative path is from "
                                "the folder train.py ran in, so run the table from there")
    runs = [run for run in runs if (run["dir"] / "best.pt").resolve() != teacher.resolve()]  # the Teacher row
    if toy and (own := next((run for run in runs if run["cfg"].get("train_data", "toy") != "toy"), None)):
        raise ValueError(f"{root / own['name']} trained on {own['cfg']['train_data']}, not the toy world: score "
                         "the runs on your test set, --table=... --task=classify --data=test.csv "
                         "--prompts=classes.json (or --task=retrieval --data=pairs.csv)")
    groups, curves = {}, {}
    for run in sorted(runs, key=lambda run: run["cfg"]["seed"]):  # lowest seed first: the one analysed
        group = groups.setdefault(run_group(run["cfg"]), [])
        twin = [m["name"] for m in group if m["cfg"]["seed"] == run["cfg"]["seed"]]
        if twin:
            raise ValueError(f"{root / twin[0]} and {root / run['name']} are one run: the same config and seed "
                             f"{run['cfg']['seed']}. Keep one, or train the other with another --seed")
        group.append(run)
    labels = row_labels({g: members[0]["cfg"] for g, members in groups.items()})
    result = dict(teacher=dict(path=str(teacher), **{k: test(teacher)[k] for k in TABLE_METRICS[task]}), rows=[],
                  paired={}, analysis={})
    by_seed = {}  # label -> {seed: test metrics}, for the paired differences
    for label, members in sorted(((labels[g], m) for g, m in groups.items()),
                                 key=lambda x: (table1_row(x[1][0]["cfg"])[0], x[0])):
        row = dict(row=label, seeds=len(members), runs=[m["name"] for m in members])
        by_seed[label] = {m["cfg"]["seed"]: test(m["dir"] / "best.pt") for m in members}
        for k in TABLE_METRICS[task]:
            row[k], row[f"{k}_std"] = mean_std([metrics[k] for metrics in by_seed[label].values()])
        result["rows"].append(row)
        if label in TABLE1_ROWS and toy:
            curves[label] = dynamics_curves([m["dir"] for m in members])
        if label in ANALYSED and toy:
            first, ckpt = members[0], members[0]["dir"] / "best.pt"
            ts = cached(first["dir"] / "analysis.json", [ckpt, teacher], dict(teacher=str(teacher), split="test", n=n),
                        lambda: analysis(load(teacher), load(ckpt), "toy", "test", n, out_dir=first["dir"],
                                         device=device))
            result["analysis"][label] = dict(run=first["name"], **ts)
    dark_row = TABLE1_ROWS[-1]
    for other in (r for r in TABLE1_ROWS[:2] if r in by_seed and dark_row in by_seed):
        result["paired"][f"DARK - {other}"] = {k: paired_difference(
            {s: m[k] for s, m in by_seed[dark_row].items()}, {s: m[k] for s, m in by_seed[other].items()})
            for k in TABLE_METRICS[task]}
    if not toy:
        result["scored_on"] = str(test_data)
    md = table1_markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    data._write_json(out / "table1.md", md)
    save_results(out / "table1.json", result, dict(task="table1", root=str(root), split="test", n=n))
    png = plot_dynamics(out / "dynamics.png", curves) if curves else None
    print(md + f"\nwrote {out / 'table1.md'}, {out / 'table1.json'}" + (f", {png}" if png else ""))
    return result


# --- the command line: python eval.py --key=value (data.parse_flags: the grammar, --help, the checks) ---
OPTIONS = dict(
    checkpoint="",          # a train.py checkpoint, or raw open_clip weights with --model_config
    model_config="",        # for raw weights: a preset name (fetalclip, mobileclip2-s0) or an open_clip JSON
    bpe="",                 # CLIP BPE vocabulary for a checkpoint that carries none (raw weights); else $DARK_BPE
    task="toy",             # --data: planes, brain FETAL_PLANES_DB; hc18 HC18; paper FPDB,HC18; classify, retrieval CSV
    data="",                # the dataset folder(s) of --task, a CSV (classify, retrieval) or tar shards (retrieval)
    split="",               # empty: test for toy, all for FETAL_PLANES_DB (as the zero-shot papers); no val there
    n=0,                    # at most n images per source (0 = all)
    batch_size=64,          # images a forward
    device="cpu",           # where the models run
    prompts="",             # a prompts JSON (data.load_prompts): classify's classes, or replacing planes/brain/hc18's
    out="runs/eval",        # folder for the results JSON (and the analysis figure)
    probe=False,            # also fit a linear probe on the image embeddings, FetalCLIP's protocol
    probe_splits="",        # a folder of FetalCLIP's test_split.json, train_val_split.json (or its probing/ folder)
    probe_runs=5,           # runs (seeds) per fold: FetalCLIP's 5
    probe_epochs=50,        # epochs per run: FetalCLIP's 50, the lowest validation loss's weights kept
    analysis=False,         # also compare with --teacher: per-image agreement, correlations, a figure
    teacher="",             # the teacher checkpoint for --analysis (and --speed)
    teacher_config="",      # for raw teacher weights: a preset name or an open_clip JSON
    speed=False,            # params, GMACs, CPU ms of --teacher and --checkpoint (default: the paper's two models)
    runs=10,                # timed runs per tower for --speed, after 3 warm-up runs
    table="",               # a folder of train.py runs -> Table 1; on your data with --task=classify | retrieval --data
    csv_img_key="filepath",  # classify, retrieval: the CSV's image-path column (relative to the CSV's folder)
    csv_label_key="label",  # classify: the CSV's class-name column
    csv_caption_key="title",  # retrieval: the CSV's caption column
    csv_group_key="patient",  # classify --probe: rows of one group (patient) stay on one side; used when present
    csv_separator="",       # one character, or \t; empty = detected (, ; tab |)
    quiet=False,            # no progress lines on stderr
)
ACCEPTS = dict(task=("toy", "planes", "brain", "hc18", "paper", "classify", "retrieval"),
               split=("", "train", "val", "test", "all"), n="[0, inf)", batch_size="[1, inf)", device=data.pick_device,
               runs="[1, inf)", probe_runs="[1, inf)", probe_epochs="[1, inf)")


def main(argv):
    global QUIET
    opt, _ = data.parse_flags(argv, OPTIONS, ACCEPTS, __doc__, __file__)
    QUIET = opt["quiet"]
    stamp, out = time.strftime("%Y%m%d_%H%M%S"), Path(opt["out"])
    if opt["table"]:  # the toy test split, or a test set of one's own
        if opt["task"] not in TABLE_METRICS or (opt["task"] != "toy") != bool(opt["data"]) or (
                opt["task"] == "classify") != bool(opt["prompts"]):
            sys.exit("eval.py: --table scores the runs on the toy test split, or on --task=classify --data=test.csv "
                     "--prompts=classes.json, or --task=retrieval --data=pairs.csv")
        return table1(opt["table"], n=opt["n"] or None, device=data.pick_device(opt["device"]), task=opt["task"],
                      test_data=opt["data"] or None, csv={k: v for k, v in opt.items() if k.startswith("csv_")},
                      prompts=opt["prompts"] and {"classify": data.load_prompts(opt["prompts"])})
    if opt["speed"]:  # the checkpoints given, else FetalCLIP and MobileCLIP2-S0 with random weights: same speed
        print(f"speed: parameters, GMACs, and the median of {opt['runs']} CPU runs at batch 1 after 3 warm-ups, "
              f"{torch.get_num_threads()} threads (OMP_NUM_THREADS sets them); spread = interquartile range / median")
        rows = []
        for role, src, cfg in (("teacher", opt["teacher"] or "fetalclip", opt["teacher_config"] or None),
                               ("student", opt["checkpoint"] or "mobileclip2-s0", opt["model_config"] or None)):
            # no tokenizer: the text tower is timed on random ids, so no vocabulary file is needed
            model = load_model_and_tokenizer_kind(src, cfg)[0] if Path(src).is_file() else models.build_model(src)
            rows.append(dict(role=role, source=src, **speed(model, opt["runs"])))
        print(markdown_table(rows, list(rows[0]) + ["image_ms_folded", "image_gmacs_folded"]) + noise_warning(rows))
        return save_results(out / f"speed_{stamp}.json", {f"{r['role']}_{k}": v for r in rows for k, v in r.items()
                                                          if k != "role"},
                            dict(task="speed", device="cpu", threads=torch.get_num_threads()))
    for bad, why in ((not opt["checkpoint"], "--checkpoint=PATH is required (or --speed, or --table)"),
                     (opt["analysis"] and not opt["teacher"], "--analysis needs --teacher=PATH"),
                     (opt["task"] in ("classify", "retrieval") and not opt["data"],
                      f"--task={opt['task']} needs --data=CSV" + " (or tar shards)" * (opt["task"] == "retrieval")),
                     (opt["task"] == "classify" and not opt["prompts"] and not opt["probe"],
                      "--task=classify needs --prompts=classes.json (or --probe alone)"),
                     (opt["probe"] and opt["task"] not in PROBE_KEYS,
                      "--probe needs labelled images: --task=toy | planes | brain | paper | classify"),
                     (opt["probe_splits"] and not opt["probe"], "--probe_splits are the splits of --probe"),
                     (opt["analysis"] and opt["task"] in ("hc18", "retrieval"), "--analysis compares classifiers: "
                                                                              "not with --task=hc18 | retrieval")):
        if bad:
            sys.exit(f"eval.py: {why} (--help lists the options)")
    task, n, root, device = opt["task"], opt["n"] or None, opt["data"] or None, data.pick_device(opt["device"])
    model, tokenizer = load_model_from_checkpoint(opt["checkpoint"], opt["model_config"] or None, opt["bpe"] or None)
    model.to(device)
    split = opt["split"] or ("test" if opt["task"] == "toy" else "all")
    prompts = None
    if opt["prompts"]:  # data.load_prompts' formats; for hc18 {anything: [templates]}
        if opt["task"] not in ("planes", "brain", "hc18", "classify"):
            sys.exit("--prompts gives the prompts of one task: use it with --task=classify | planes | brain | hc18")
        given = data.load_prompts(opt["prompts"])
        prompts = {"ga": [p for ps in given.values() for p in ps]} if opt["task"] == "hc18" else {opt["task"]: given}
    csv = {k: v for k, v in opt.items() if k.startswith("csv_")}
    metrics = {} if task == "classify" and not prompts else evaluate(  # zero-shot on the last CSV (a probe's test)
        model, tokenizer, task, split, n, root.split(",")[-1] if task == "classify" else root, prompts,
        opt["batch_size"], device, csv)
    if opt["probe"]:
        metrics.update(probe(model, task, n, root, opt["batch_size"], device, opt["probe_splits"], csv,
                             opt["probe_runs"], opt["probe_epochs"]))
        for key in [k for k in PROBE_KEYS[task] if f"probe_{k}_f1" in metrics]:
            runs = metrics[f"probe_{key}_runs"]
            positive = metrics.get(f"probe_{key}_auroc_positive")
            print(f"linear probe {key}: {len(runs)} runs ({runs[-1]['fold'] + 1} folds), test n={runs[0]['n_test']}"
                  + f"; AUROC's positive class: {positive!r}" * bool(positive))
            print(markdown_table([dict(metric=k, mean=metrics[f"probe_{key}_{k}"], std=metrics[f"probe_{key}_{k}_std"])
                                  for k in runs[0] if isinstance(runs[0][k], float)], ["metric", "mean", "std"]))
    if opt["analysis"]:
        teacher, teacher_tokenizer = load_model_from_checkpoint(opt["teacher"], opt["teacher_config"] or None,
                                                                opt["bpe"] or None)
        ts = analysis((teacher.to(device), teacher_tokenizer), (model, tokenizer), task, split, n, root, out, device,
                      csv, prompts)
        metrics.update(ts)
        print("teacher-student analysis (r: Pearson correlation; separation: between / within class distance)\n" +
              markdown_table([dict(task=t, **{k: ts[f"ts_{t}_{k}"] for k in TS_COLUMNS}) for t in CLASS_TASKS
                              if f"ts_{t}_true_prob_corr" in ts], ["task", *TS_COLUMNS]))
    meta = dict(model=describe(model), checkpoint=opt["checkpoint"], dataset=opt["data"] or "toy world",
                task=opt["task"], split=split)
    path = save_results(out / f"results_{opt['task']}_{split}_{stamp}.json", metrics, meta)
    shown = dict(classify=["classify_acc", "classify_balanced_acc", "classify_f1", "classify_top5"],
                 retrieval=[f"retrieval_{k}" for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "mean_recall")]).get(
        task, ["planes_f1", "brain_f1", "class_f1", "ga_validity", "composite"])
    shown = [k for k in shown + [f"probe_{k}_{m}" for k in PROBE_KEYS.get(task, ()) for m in ("f1", "auroc")]
             if k in metrics]  # what this run measured: a probe without --prompts has no zero-shot columns
    print(markdown_table([dict(meta, protocol=PROTOCOL, **metrics)], ["model", "checkpoint", "dataset", "split",
                                                                      "protocol", *shown]))
    print(f"all {len(metrics)} metrics: {path}" + ("\n" + retrieval_note(metrics)) * bool(retrieval_note(metrics)))
    return path


if __name__ == "__main__":
    data.run_script(main, "eval.py")
