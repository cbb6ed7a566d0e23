import pytest
import torch
import torch.nn.functional as F

from dark import dark_loss, kd_weight_at


# --- dark.py: the loss ---

def _embeddings(n=6, d=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) for _ in range(4)]
    if grad:
        out[0].requires_grad_(True)
        out[1].requires_grad_(True)
    return out


def _coupled_soft_ce(img, txt, s, t_img, t_txt, t_s, tau):
    """A second computation of the coupled KD term: full-row soft cross-entropy, both directions."""
    def one(a, b, ta, tb):
        p = F.softmax(t_s * ta @ tb.T / tau, dim=1)
        return -(p * F.log_softmax(s * a @ b.T, dim=1)).sum(1).mean()
    return 0.5 * (one(img, txt, t_img, t_txt) + one(txt, img, t_txt, t_img))


def test_diag_plus_off_is_coupled_kd():
    img, txt, t_img, t_txt = _embeddings()
    out = dark_loss(img, txt, torch.tensor(30.0), t_img, t_txt, torch.tensor(50.0), mode="dark", weight=2.0, tau=5.0)
    ref = _coupled_soft_ce(img, txt, 30.0, t_img, t_txt, 50.0, 5.0)
    assert abs(float(out["diag"] + out["off"]) - float(ref)) < 1e-6
    assert float(out["diag"]) > 0 and float(out["off"]) > 0  # both parts carry mass: the split is not trivial
    ref_clip = 0.5 * (F.cross_entropy(30 * img @ txt.T, torch.arange(6)) + F.cross_entropy(30 * txt @ img.T, torch.arange(6)))
    assert abs(float(out["clip"]) - float(ref_clip)) < 1e-6


def test_modes_total():
    img, txt, t_img, t_txt = _embeddings(seed=1)
    kw = dict(scale=torch.tensor(20.0), t_img=t_img, t_txt=t_txt, t_scale=torch.tensor(40.0))
    dark1 = dark_loss(img, txt, mode="dark", weight=1.0, **kw)
    static1 = dark_loss(img, txt, mode="static", weight=1.0, **kw)
    assert abs(float(dark1["total"]) - float(static1["total"])) < 1e-9
    coupled = dark_loss(img, txt, mode="coupled", weight=-0.5, **kw)
    assert abs(float(coupled["total"]) - float(coupled["clip"] - 0.5 * coupled["kd"])) < 1e-9
    none = dark_loss(img, txt, torch.tensor(20.0), mode="none")
    assert float(none["total"]) == float(none["clip"]) and float(none["weight"]) == 0.0
    # open_clip's DistillClipLoss is the coupled soft CE with no temperature and weight 1
    oc = dark_loss(img, txt, mode="static", weight=1.0, tau=1.0, **kw)
    assert abs(float(oc["total"] - oc["clip"]) - float(_coupled_soft_ce(img, txt, 20.0, t_img, t_txt, 40.0, 1.0))) < 1e-9
    with pytest.raises(ValueError, match="unknown KD mode 'dkd'"):
        dark_loss(img, txt, mode="dkd", **kw)


def test_schedule_endpoints_and_zero_crossing():
    assert kd_weight_at(0, 1000, 2.0, -0.4) == 2.0
    assert abs(kd_weight_at(1000, 1000, 2.0, -0.4) - (-0.8)) < 1e-12
    assert abs(kd_weight_at(500, 1000, 2.0, -0.4) - 0.6) < 1e-12           # linear in between
    assert abs(kd_weight_at(1000 / 1.4, 1000, 2.0, -0.4)) < 1e-12          # zero at t/T = 1 / (1 - r)
    assert kd_weight_at(700, 1000, 2.0, -0.4) > 0 > kd_weight_at(720, 1000, 2.0, -0.4)
    assert kd_weight_at(5000, 1000, 2.0, -0.4) == kd_weight_at(1000, 1000, 2.0, -0.4)  # clamped past the end
    assert kd_weight_at(-3, 1000, 2.0, -0.4) == 2.0
    assert abs(kd_weight_at(1000, 1000, 1.0, -0.8) - (-0.8)) < 1e-12        # coupled: 1 -> -0.8


def test_off_diagonal_gradient_flips_to_repulsion():
    def grads(beta):
        img, txt, t_img, t_txt = _embeddings(seed=2, grad=True)
        out = dark_loss(img, txt, torch.tensor(20.0), t_img, t_txt, torch.tensor(60.0), mode="dark", weight=beta)
        out["total"].backward()
        return img.grad.clone(), float(out["off"].detach())
    g0, _ = grads(0.0)
    g_pos, _ = grads(2.0)
    g_neg, _ = grads(-0.8)
    d_pos, d_neg = g_pos - g0, g_neg - g0                  # the off-diagonal term's share of the gradient
    assert d_pos.abs().max() > 1e-4
    assert torch.allclose(d_neg, -0.4 * d_pos, atol=1e-12)  # opposite sign, scaled by beta
    # one small descent step imitates the teacher's non-target structure at beta > 0 and moves away at beta < 0
    img, txt, t_img, t_txt = _embeddings(seed=2)
    off0 = float(dark_loss(img, txt, torch.tensor(20.0), t_img, t_txt, torch.tensor(60.0))["off"])
    for beta, d, sign in ((2.0, d_pos, -1), (-0.8, d_neg, 1)):
        stepped = F.normalize(img - 1e-2 * (g0 + d), dim=-1)
        g_off = float(dark_loss(stepped, txt, torch.tensor(20.0), t_img, t_txt, torch.tensor(60.0))["off"])
        g_off0 = float(dark_loss(F.normalize(img - 1e-2 * g0, dim=-1), txt, torch.tensor(20.0), t_img, t_txt,
                                 torch.tensor(60.0))["off"])
        assert (g_off - g_off0) * sign > 0, (beta, off0, g_off0, g_off)


def test_finite_at_negative_beta_and_scale_100():
    g = torch.Generator().manual_seed(3)
    img, txt, t_img, t_txt = (F.normalize(torch.randn(64, 512, generator=g), dim=-1) for _ in range(4))
    txt = F.normalize(img + 0.01 * txt, dim=-1)            # near-duplicates: the sharpest softmaxes
    img.requires_grad_(True)
    out = dark_loss(img, txt, torch.tensor(100.0), t_img, t_txt, torch.tensor(100.0), mode="dark", weight=-0.8)
    out["total"].backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_batch_of_one():
    img, txt, t_img, t_txt = (t[:1] for t in _embeddings(seed=4))
    img.requires_grad_(True)
    out = dark_loss(img, txt, torch.tensor(100.0), t_img, t_txt, torch.tensor(100.0), mode="dark", weight=-0.8)
    out["total"].backward()
    assert float(out["off"]) == 0.0 and float(out["clip"]) == 0.0   # one column: nothing to contrast against
    assert torch.isfinite(out["total"]) and torch.isfinite(img.grad).all()


@pytest.mark.parametrize("mode", ["none", "static", "coupled", "dark"])
def test_gathered_columns_match_global_batch(mode):
    """Two simulated ranks: each takes its own rows against all gathered columns; the mean equals one process."""
    img, txt, t_img, t_txt = _embeddings(n=8, seed=5)
    kw = dict(scale=torch.tensor(25.0), t_img=t_img, t_txt=t_txt, t_scale=torch.tensor(50.0), mode=mode, weight=-0.6)
    whole = dark_loss(img, txt, **kw)
    ranks = [dark_loss(img, txt, rows=slice(4 * k, 4 * k + 4), **kw) for k in range(2)]
    for key in ("total", "clip", "diag", "off"):
        assert abs(float(whole[key]) - float(ranks[0][key] + ranks[1][key]) / 2) < 1e-9, key
    # and rank 1 alone is not the same as a local-only loss: the offset matters
    local = dark_loss(img[4:], txt[4:], **{**kw, "t_img": t_img[4:], "t_txt": t_txt[4:]})
    assert abs(float(local["total"]) - float(ranks[1]["total"])) > 1e-3
