"""export_ios.py: the toy student as Core ML packages (image + zero-shot head, text), checked as the README says."""
import copy
import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval as evaluation
import export_ios
import models


def toy_checkpoint(path, preset="toy-student"):
    """A train.py-style checkpoint whose BatchNorm statistics and layer scales are off their initial values, so a
    wrong fold or a skipped normalisation shows up."""
    torch.manual_seed(0)
    model = models.build_model(preset)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    torch.save({"model": model.state_dict(), "model_config": model.config, "tokenizer": "toy"}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = toy_checkpoint(root / "student.pt")
    results = export_ios.main([f"--checkpoint={ckpt}", f"--out={root / 'ios'}", "--text"])  # the CLI path
    return ckpt, results


def test_packages_have_the_documented_interface(exported):
    _, results = exported
    image, text = results["image"], results["text"]
    n_classes, ctx = len(data.TOY_PLANE_PROMPTS), data.TOY_CONTEXT
    assert image["io"] == {"image": "image RGB 64x64", "embedding": "float32 [1, 128]",
                           "probs": f"float32 [1, {n_classes}]"}
    assert text["io"] == {"input_ids": f"int32 [1, {ctx}]", "embedding": "float32 [1, 128]"}
    for summary in (image, text):
        assert summary["export_error"] <= 1e-5
        assert set(summary["stored"]) == {"FLOAT16"}
        assert 1.9 <= summary["bytes_per_param"] <= 2.2  # fp16 weights, nothing duplicated
        assert set(summary["ops"]) <= export_ios.ALLOWED_OPS and "conv" in image["ops"] and "gather" in text["ops"]
        expect = "ok" if platform.system() == "Darwin" else "skipped"
        assert summary["predict"].startswith(expect)


def test_package_metadata_and_baked_class_embeddings(exported):
    """The package carries the checkpoint's hash and class names, and its class matrix is eval.py's classifier."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil
    ckpt, results = exported
    path = results["image"]["path"]
    mlmodel = ct.models.MLModel(path, skip_model_load=True)
    meta = mlmodel.user_defined_metadata
    assert meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert json.loads(meta["classes"]) == list(data.TOY_PLANE_PROMPTS) and meta["image_size"] == "64"
    spec = mlmodel.get_spec()
    program = load_mil(spec, spec.specificationVersion, f"{path}/Data/com.apple.CoreML/weights")
    model, tokenizer = evaluation.load_model_from_checkpoint(ckpt)
    want = evaluation.text_classifier(model, tokenizer, data.TOY_PLANE_PROMPTS)  # [5, 128]
    baked = [op.val.val for op in program.functions["main"].operations
             if op.op_type == "const" and getattr(op.val.val, "shape", None) == tuple(want.shape)]
    assert len(baked) == 1 and baked[0].dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(baked[0].astype(np.float32)), want, atol=1e-3, rtol=0)


def test_image_wrapper_matches_eval_preprocessing():
    """ImageEncoder on raw pixels (what Core ML hands the graph) of the folded model == eval.py's path: Preprocess
    with the model's mean/std, the unfolded model, softmax(100 * cosine) against text_classifier."""
    torch.manual_seed(0)
    model = models.build_model("toy-student").eval()
    model.image_mean, model.image_std = data.CLIP_MEAN, data.CLIP_STD  # per-channel, so the in-graph division matters
    tokenizer = data.get_tokenizer("toy", model.context_length)
    classes = evaluation.text_classifier(model, tokenizer, data.TOY_PLANE_PROMPTS)
    folded = models.reparameterize(copy.deepcopy(model)).eval()
    image = data.ToyWorld("test", length=1)[0]["image"]
    with torch.no_grad():
        emb, probs = export_ios.ImageEncoder(folded, classes)(export_ios.pixels(export_ios.to_rgb(image, 64)))
        want = F.normalize(model.encode_image(data.Preprocess(64, data.CLIP_MEAN, data.CLIP_STD)(image)[None]), dim=-1)
    torch.testing.assert_close(emb, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs, (100 * want @ classes.t()).softmax(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode,dtype,per_param", [("int8", "INT8", 1.0), ("palettize4", "UINT8", 0.5)])
def test_quantized_export(tmp_path, mode, dtype, per_param):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"head": ["fetal brain."], "belly": ["fetal abdomen."]}))
    summary = export_ios.export(toy_checkpoint(tmp_path / "s.pt"), out=tmp_path, classes=str(prompts),
                                quantize=mode)["image"]
    assert summary["io"]["probs"] == "float32 [1, 2]"
    assert summary["stored"][dtype] > 0.9 * sum(summary["stored"].values())  # most weights compressed
    assert per_param <= summary["bytes_per_param"] <= per_param + 0.2


def test_kmeans_palette_beats_a_uniform_grid():
    w = np.random.default_rng(0).standard_normal(5000).astype(np.float16)
    lut, idx = export_ios.kmeans_palette(w)
    assert lut.shape == (16,) and lut.dtype == np.float16 and idx.dtype == np.uint8 and idx.max() < 16
    grid = np.linspace(w.min(), w.max(), 16, dtype=np.float32)
    uniform_err = np.abs(w[:, None].astype(np.float32) - grid).min(1).mean()
    assert np.abs(lut[idx].astype(np.float32) - w).mean() < 0.7 * uniform_err


def test_check_package_rejects_what_is_not_documented(exported, monkeypatch):
    _, results = exported
    path, image = Path(results["image"]["path"]), results["image"]
    with pytest.raises(export_ios.ExportCheckError, match="documented"):
        export_ios.check_package(path, {**image["io"], "probs": "float32 [1, 9]"}, image["n_params"], "none")
    with pytest.raises(export_ios.ExportCheckError, match="bytes per parameter"):
        export_ios.check_package(path, image["io"], image["n_params"] // 2, "none")
    monkeypatch.setattr(export_ios, "ALLOWED_OPS", export_ios.ALLOWED_OPS - {"gelu"})
    with pytest.raises(export_ios.ExportCheckError, match="gelu"):
        export_ios.check_package(path, image["io"], image["n_params"], "none")


def test_macos_prediction_check(monkeypatch):
    """The macOS branch, with Core ML's predict played by PyTorch: fp16 rounding passes, a wrong embedding or a
    moved zero-shot answer fails."""
    import coremltools as ct
    torch.manual_seed(0)
    model = models.reparameterize(models.build_model("toy-student")).eval()
    classes = F.normalize(torch.randn(5, 128), dim=-1)
    module = export_ios.ImageEncoder(model, classes).eval()
    feeds = [({"image": p}, export_ios.pixels(p))
             for p in [export_ios.to_rgb(data.ToyWorld("test", length=3)[i]["image"], 64) for i in range(3)]]
    damage = {}

    class PlayedByTorch:
        def __init__(self, path):
            pass

        def predict(self, feed):
            with torch.no_grad():
                emb, probs = module(export_ios.pixels(feed["image"]))
            emb, probs = damage.get("embedding", emb.half().float()), damage.get("probs", probs)
            return {"embedding": emb.numpy(), "probs": probs.numpy()}

    monkeypatch.setattr(export_ios.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(ct.models, "MLModel", PlayedByTorch)
    assert export_ios.check_predictions(Path("x.mlpackage"), module, feeds, "none").startswith("ok")
    damage["embedding"] = F.normalize(torch.randn(1, 128), dim=-1)
    with pytest.raises(export_ios.ExportCheckError, match="cosine"):
        export_ios.check_predictions(Path("x.mlpackage"), module, feeds, "none")
    damage.clear()
    with torch.no_grad():
        probs = module(feeds[0][1])[1]
    damage["probs"] = F.one_hot(probs.argmin(-1), 5).float()  # every image answered with the first image's worst class
    with pytest.raises(export_ios.ExportCheckError, match="argmax differs"):
        export_ios.check_predictions(Path("x.mlpackage"), module, feeds, "none")


def test_bad_checkpoints_raise_a_named_error(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(export_ios.CheckpointError, match="corrupt.pt"):
        export_ios.export(corrupt, out=tmp_path)
    teacher = models.build_model("toy-teacher")  # weights of another architecture under the student's config
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"model": teacher.state_dict(), "model_config": models.get_config("toy-student"), "tokenizer": "toy"},
               mismatched)
    with pytest.raises(export_ios.CheckpointError, match="missing: visual.trunk"):
        export_ios.export(mismatched, out=tmp_path)
    with pytest.raises(export_ios.CheckpointError, match="absent.pt"):
        export_ios.export(tmp_path / "absent.pt", out=tmp_path)
