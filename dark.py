"""DARK: Diagonal-Anchored Repulsive Knowledge distillation for CLIP-style models (the loss only).

    from dark import dark_loss, kd_weight_at      # train.py calls these; python train.py runs the whole story

L = L_CLIP + L_diag + beta(t) * L_off

The teacher's batch similarity matrix is turned into a row-wise soft target for the student. Its cross-entropy is
split into matched pairs (the diagonal, image i with caption i: weight fixed at 1, the "anchor") and non-target pairs
(everything off the diagonal: weight beta(t)). beta falls linearly from beta0 to beta0 * r < 0, so late in training
the student is pushed *away* from the teacher's confusions instead of imitating them.

Conventions (each one changes the numbers, so here they are in one place):
- Temperature on the teacher only: P = softmax(s_T * cos_T / tau), log Q = log_softmax(s_S * cos_S), tau = 5. A
  softer teacher spreads mass over the non-target pairs, which is what the off-diagonal term works on; the student
  keeps its own learned scale (as in the paper's code).
- Soft cross-entropy -sum_j P_ij log Q_ij, not KL(P || Q). The gradient w.r.t. the student is identical; the logged
  value is larger by the teacher's entropy, which is constant for the student.
- No tau^2 factor (Hinton et al. scale the KL by tau^2 when both sides share tau; here the student is not softened).
- Both directions (image->text rows and text->image rows); each term is averaged over rows, then over directions.
  L_diag + L_off equals the coupled soft cross-entropy L_KD exactly.
- The schedule is a pure function of the *optimizer* step (not micro-batches: the paper's code counted micro-batches
  and overshot its end value under gradient accumulation).
- Distributed: rows are this rank's local batch, columns are the batch gathered from every rank (all_gather with
  gradient), so the matched column of local row i is offset + i, offset = rank * B_local. The mean of the per-rank
  losses equals the single-process loss on the global batch. B = 1 has no off-diagonal: L_off = 0, finite.
- Not Decoupled KD (Zhao et al., CVPR 2022): DKD splits a KL into a binary target-vs-rest term and a KL over the
  *renormalised* non-target classes. DARK splits the unnormalised soft cross-entropy by masking, so the two parts
  add up to the coupled loss and only the non-target part changes sign.
- Not open_clip's DistillClipLoss: that is the coupled soft cross-entropy with no temperature, no split and a fixed
  weight of 1 (mode 'static' with tau = 1 and weight 1 reproduces it).
"""
import torch
import torch.nn.functional as F

MODES = ("none", "static", "coupled", "dark")  # the four rows of the paper's Table 1


def kd_weight_at(step, total_steps, w0, r):
    """w(t) = w0 * (1 - (t/T) * (1 - r)), t/T clamped to [0, 1]: w0 at the start, w0 * r at the end.
    DARK: beta0 = 2, r = -0.4 (2 -> -0.8, zero at t/T = 1 / (1 - r) ~ 0.714). Coupled: lambda0 = 1, r = -0.8."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return w0 * (1.0 - frac * (1.0 - r))


def _fp32(x):
    """Similarities and the loss in (at least) fp32, also when the encoders ran under bf16/fp16 autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _soft_ce_parts(logits_s, logits_t, offset):
    """logits_s, logits_t: [B, N]; the matched column of row i is offset + i.
    Returns (diag, off): row-wise -sum_j P_ij log Q_ij restricted to j == match and j != match, mean over rows."""
    p = logits_t.softmax(dim=1)                          # [B, N] teacher distribution
    ce = -p * logits_s.log_softmax(dim=1)                # [B, N] per-pair contribution
    rows = torch.arange(ce.shape[0], device=ce.device)
    diag = ce[rows, rows + offset]                       # [B]
    off = ce.sum(dim=1) - diag                           # [B]; 0 when N == 1
    return diag.mean(), off.mean()


def dark_loss(img, txt, scale, t_img=None, t_txt=None, t_scale=None, mode="dark", weight=1.0, tau=5.0, rows=None):
    """CLIP loss plus the chosen teacher-to-student term.

    img, txt:     [N, D] L2-normalised student embeddings, N = global batch (all ranks gathered, or just this batch)
    scale:        student exp(logit_scale), scalar tensor
    t_img, t_txt: [N, D] L2-normalised teacher embeddings of the same pairs (None for mode 'none')
    t_scale:      teacher exp(logit_scale)
    mode:         'none' | 'static' | 'coupled' | 'dark'; weight is lambda (static, coupled) or beta (dark)
    rows:         slice of this rank's rows in the global batch (default: all rows)
    Returns a dict of scalar tensors: total, clip, diag, off, kd (= diag + off), weight.
    """
    if mode not in MODES:
        raise ValueError(f"unknown KD mode {mode!r}; expected one of {MODES}")
    rows = rows if rows is not None else slice(0, img.shape[0])
    offset = rows.start or 0
    img, txt = _fp32(img), _fp32(txt)
    i2t = scale * img[rows] @ txt.T                      # [B, N] local images vs all captions
    t2i = scale * txt[rows] @ img.T                      # [B, N] local captions vs all images
    labels = torch.arange(i2t.shape[0], device=img.device) + offset
    clip = 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels))

    zero = clip.new_zeros(())
    diag = off = zero
    if mode != "none":
        t_img, t_txt = _fp32(t_img), _fp32(t_txt)
        t_i2t = (t_scale / tau) * t_img[rows] @ t_txt.T  # temperature on the teacher only
        t_t2i = (t_scale / tau) * t_txt[rows] @ t_img.T
        d1, o1 = _soft_ce_parts(i2t, t_i2t, offset)
        d2, o2 = _soft_ce_parts(t2i, t_t2i, offset)
        diag, off = 0.5 * (d1 + d2), 0.5 * (o1 + o2)

    if mode == "dark":
        total = clip + diag + weight * off               # the diagonal is anchored at weight 1
    elif mode in ("static", "coupled"):
        total = clip + weight * (diag + off)             # static: constant lambda; coupled: scheduled lambda
    else:
        total = clip
    return dict(total=total, clip=clip, diag=diag, off=off, kd=diag + off,
                weight=torch.as_tensor(float(weight) if mode != "none" else 0.0))
