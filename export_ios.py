"""Export a trained student as Core ML packages for an iPhone app. The only file that imports coremltools.

    python export_ios.py --checkpoint=out/student.pt                    # image encoder + planes zero-shot head
    python export_ios.py --checkpoint=out/student.pt --classes=brain --text --quantize=int8
    python export_ios.py --checkpoint=out/student.pt --classes=my_prompts.json --target=iOS18 --out=ios/
    python export_ios.py --checkpoint=mobileclip2_s0.pt --model_config=mobileclip2-s0   # raw open_clip weights

What it writes (the README documents these names; every run checks them on the saved files):
- <out>/<name>Image.mlpackage: input `image`, an RGB image of the model's size (pixels / 255 by Core ML); output
  `embedding` float32 [1, D], L2-normalised; with a zero-shot head (the default) also `probs` float32 [1, K] =
  softmax(100 * cosine) against K class embeddings computed here in PyTorch and stored in the package, so the app
  gets class probabilities from one call and needs no text encoder. The class names are in the metadata (`classes`).
- <out>/<name>Text.mlpackage (--text): input `input_ids` int32 [1, context], output `embedding` float32 [1, D]. The
  app must tokenize exactly as training did (the checkpoint's tokenizer: CLIP BPE, or the toy word tokenizer).
Both are ML programs with fp16 weights and fp16 compute, for iOS 17 and later unless --target says otherwise
(iOS 15 at the oldest, iOS 16 with --quantize: older targets are refused before any work).

How: reparameterize a copy of the student (every multi-branch block folded), wrap it (the per-channel mean/std goes
inside the graph: ImageType has one scale for all channels), torch.export(...).run_decompositions({}), coremltools.
Not torch.jit.trace: coremltools 9's trace frontend fails on shape-derived ints with numpy >= 2.4; the export frontend
works with any numpy. Checked on every run: the exported program equals the eager model (1e-5); the saved package
reloads; inputs, outputs and shapes are as documented; weights are stored as fp16 (about 2 bytes per parameter) or as
int8 / 4-bit with --quantize; every op is in ALLOWED_OPS. On macOS also MLModel.predict against PyTorch.
"""
import collections
import copy
import json
import math
import platform
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as evaluation
import models

# MIL ops that the toy models and MobileCLIP2-S0 convert to (targets iOS 15-18). Anything else means a layer took a
# conversion path nobody has looked at (a decomposed op, a fallback, an int64 detour): look before adding it here.
ALLOWED_OPS = frozenset("""
const cast add sub mul real_div maximum abs conv linear matmul reshape transpose squeeze expand_dims tile split concat
slice_by_index gather gather_nd reduce_mean reduce_max reduce_l2_norm reduce_argmax layer_norm batch_norm softmax gelu
relu sigmoid stack select greater_equal scaled_dot_product_attention
constexpr_affine_dequantize constexpr_blockwise_shift_scale constexpr_lut_to_dense
""".split())  # scaled_dot_product_attention: one fused op from iOS 18 on; the last line: weight decompression
# Per --quantize: the dtypes weight.bin may hold (4-bit indices are packed bytes up to iOS 17, uint4 from iOS 18);
# weight.bin bytes per parameter (int8 and 4-bit leave tensors of 2048 values or fewer, biases and norms, in fp16:
# hence the loose upper bounds); the least cosine Core ML vs PyTorch on macOS (compression costs accuracy, to be
# judged with eval.py: these bounds only catch a broken export).
QUANTIZE = {"none": dict(stored={"FLOAT16"}, bytes=(1.9, 2.2), cosine=0.999),
            "int8": dict(stored={"FLOAT16", "INT8"}, bytes=(0.95, 1.5), cosine=0.99),
            "palettize4": dict(stored={"FLOAT16", "UINT8", "UINT4"}, bytes=(0.45, 1.2), cosine=0.95)}
N_CHECK = 4  # images (and prompts) that macOS runs through Core ML and PyTorch
N_COST = 200  # toy test images on which --quantize's accuracy cost is estimated (out of domain for a real model)
ZERO_SHOT_SCALE = 100.0  # CLIP's fixed zero-shot scale, as eval.py scores every model (not the learned logit_scale)


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or its weights do not fit its own model_config."""


class ExportCheckError(RuntimeError):
    """An exported program or a saved package differs from what this file documents."""


# --- checkpoint -> eager modules to export ---
def load_student(path, model_config=None):
    """-> (model, tokenizer kind 'toy' | 'bpe', the BPE vocabulary the checkpoint carries or None, sha256 of the
    file), through eval.py's loader (train.py's checkpoint layout, or raw open_clip weights with model_config), every
    failure raised as a CheckpointError naming the file."""
    try:
        model, kind, vocab = evaluation.load_model_and_tokenizer_kind(path, model_config)
    except Exception as e:  # torch.load raises pickle, zip and runtime errors alike for a damaged file
        raise CheckpointError(f"cannot export {path}: {type(e).__name__}: {e}") from e
    return model, kind, vocab, data.sha256_file(path)


def class_prompts(classes, kind):
    """'planes' | 'brain' | 'none' | a prompts JSON (data.load_prompts: {class: [prompts]} or {"templates": [...],
    "classes": [...]}) -> {class: [prompts]} (None for no head). The defaults are eval.py's: for a toy-tokenizer
    model (kind 'toy') the toy world's wording, five planes; otherwise FetalCLIP's nine plane classes."""
    if classes == "none":
        return None
    if classes in ("planes", "brain"):
        toy = kind == "toy"
        return {"planes": data.TOY_PLANE_PROMPTS if toy else evaluation.PLANE_PROMPTS,
                "brain": data.TOY_BRAIN_PROMPTS if toy else evaluation.BRAIN_PROMPTS}[classes]
    return data.load_prompts(classes)  # the same file, and the same reading of it, as eval.py --prompts


def l2_normalize(x):
    """x / ||x|| over the last axis [B, D], safe where Core ML computes it, in fp16: the sum of squares overflows fp16
    (largest value 65504) once ||x|| passes 256, so x is first divided by its largest |value| (the direction stays;
    the clamp keeps an all-zero row finite)."""
    return F.normalize(x / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4), dim=-1)


class ImageEncoder(nn.Module):
    """RGB pixels in [0, 1] [B, 3, S, S] (Core ML's ImageType has divided by 255) -> L2-normalised embedding [B, D];
    with class embeddings [K, D] also probabilities [B, K] = softmax(100 * cosine)."""

    def __init__(self, model, classes=None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(model.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.image_std).view(1, 3, 1, 1))
        self.register_buffer("classes", classes)  # None: no zero-shot head

    def forward(self, image):
        emb = l2_normalize(self.model.encode_image((image - self.mean) / self.std))
        if self.classes is None:
            return emb
        return emb, (ZERO_SHOT_SCALE * emb @ self.classes.t()).softmax(dim=-1)


class TextEncoder(nn.Module):
    """int32 token ids [B, context] (Core ML inputs have no int64) -> L2-normalised embedding [B, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return l2_normalize(self.model.encode_text(input_ids.long()))


def as_tuple(x):
    return (x,) if torch.is_tensor(x) else tuple(x)


def export_program(module, example, tol=1e-5):
    """torch.export, decomposed to the core ATen ops coremltools reads; checked against eager -> (program, error)."""
    program = torch.export.export(module, (example,)).run_decompositions({})
    for node in [n for n in program.graph.nodes if n.target == torch.ops.aten.alias.default]:
        node.replace_all_uses_with(node.args[0])  # coremltools 9 has no aten.alias, the no-op view that a full
        program.graph.erase_node(node)  # slice exports to (a causal text tower's attn_mask[:L, :L])
    program.graph_module.recompile()
    with torch.no_grad():
        err = max((w - g).abs().max().item() for w, g in zip(as_tuple(module(example)),
                                                             as_tuple(program.module()(example))))
    if err > tol:
        raise ExportCheckError(f"the exported program differs from the eager model by {err:.2e} > {tol:.0e}")
    return program, err


def n_weights(program):
    """Number of float values the program reads from parameters, buffers and constants (unused ones not counted)."""
    sig, tensors = program.graph_signature, {**program.state_dict, **program.constants}
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    used = [lifted[n.name] for n in program.graph.nodes if n.op == "placeholder" and n.name in lifted and n.users]
    return sum(tensors[k].numel() for k in used if tensors[k].is_floating_point())


# --- coremltools: convert, compress, describe ---
def kmeans_palette(weight, nbits=4, iters=12):
    """16-entry LUT and indices for one weight tensor by 1-D k-means (Lloyd, from quantiles). coremltools' own
    'kmeans' mode needs scikit-learn, which this project does not install."""
    flat = weight.astype(np.float32).ravel()
    lut = np.quantile(flat, (np.arange(2 ** nbits) + 0.5) / 2 ** nbits)
    for _ in range(iters):
        idx = np.searchsorted((lut[1:] + lut[:-1]) / 2, flat)  # the nearest entry of the sorted LUT
        count = np.bincount(idx, minlength=lut.size)
        lut = np.where(count > 0, np.bincount(idx, flat, minlength=lut.size) / np.maximum(count, 1), lut)
    return lut.astype(weight.dtype), idx.astype(np.uint8)


def int8_scale_underflows(weight):
    """True if an output channel (axis 0) of weight [C, ...] would get a per-channel int8 scale, max |w| / 127, that
    fp16 (where Core ML stores it) holds with fewer significant bits than int8 itself: below 2^-17, where fp16's
    spacing is 2^-24, and below 2^-25 it is rounded to zero (a channel folded with a tiny layer scale or BatchNorm
    gain)."""
    if weight.ndim < 2:
        return False
    scale = np.abs(weight.astype(np.float32).reshape(len(weight), -1)).max(1) / 127
    return bool(((scale > 0) & (scale < 2.0 ** -17)).any())


def compressible(weight):
    """True for the tensors coremltools' weight compression touches: more than its weight_threshold (2048) values,
    and never a 1-D one (coremltools 9 skips them)."""
    return weight.ndim > 1 and weight.size > 2048


def compressed_copy(model, quantize):
    """A copy of model whose image-tower weights are what --quantize stores, for PyTorch to run (Core ML runs only
    on macOS): fp16, and with int8 or palettize4 the tensors that to_coreml compresses (compressible), quantized
    per channel or palettized per tensor by kmeans_palette. An estimate: Core ML compresses its own graph's
    constants, after fusions of its own (a layer scale folded into the conv before it)."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for t in [t for t in copied.visual.state_dict().values() if t.is_floating_point()]:
            w = t.numpy().astype(np.float16)
            if quantize == "palettize4" and compressible(w):
                lut, idx = kmeans_palette(w)
                w = lut[idx].reshape(w.shape)
            elif quantize == "int8" and compressible(w) and not int8_scale_underflows(w):
                scale = np.abs(w.reshape(len(w), -1)).max(1).astype(np.float32) / 127
                scale = scale.astype(np.float16).astype(np.float32).reshape(-1, *[1] * (w.ndim - 1))
                w = (np.round(w / np.maximum(scale, 1e-30)).clip(-127, 127) * scale).astype(np.float16)
            t.copy_(torch.from_numpy(w.astype(np.float32)))
    return copied


def compression_cost(module, quantize, images):
    """ImageEncoder with --quantize's weights vs with fp16 weights, in PyTorch, on RGB images [N, 3, S, S] in
    [0, 1] -> a line for the summary: embedding cosine (mean, least) and how often the zero-shot answer agrees."""
    with torch.no_grad():
        ref, got = (as_tuple(ImageEncoder(compressed_copy(module.model, q), module.classes)(images))
                    for q in ("none", quantize))
    cos = (ref[0] * got[0]).sum(-1)
    agree = "" if len(ref) == 1 else (f", zero-shot argmax agrees on "
                                      f"{(ref[1].argmax(-1) == got[1].argmax(-1)).float().mean():.1%}")
    return (f"{quantize} vs fp16 weights (PyTorch, {len(images)} toy ultrasound test images whatever the model: out "
            "of domain for another modality): embedding cosine mean "
            f"{cos.mean():.4f}, least {cos.min():.4f}{agree}")


def to_coreml(program, ct_input, outputs, target, quantize):
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    mlmodel = ct.convert(program, inputs=[ct_input], outputs=[ct.TensorType(name=n, dtype=np.float32) for n in outputs],
                         convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                         minimum_deployment_target=getattr(ct.target, target))
    if quantize == "none":
        return mlmodel
    config = cto.OpLinearQuantizerConfig() if quantize == "int8" else cto.OpPalettizerConfig(  # int8: per channel
        mode="custom", lut_function=kmeans_palette)  # 4-bit: one 16-entry LUT per tensor (finer LUTs need iOS 18)
    # every compressible tensor except those holding -inf (a causal attention mask), or, for int8, a channel whose
    # scale would underflow fp16 (a folded channel with a tiny BatchNorm gain: stored as scale 0, it reads as zeros)
    keep = {op.name: None for op in mlmodel._mil_program.functions["main"].operations if op.op_type == "const"
            and isinstance(op.val.val, np.ndarray) and (not np.isfinite(op.val.val).all()
                                                         or quantize == "int8" and int8_scale_underflows(op.val.val))}
    config = cto.OptimizationConfig(global_config=config, op_name_configs=keep)
    return (cto.linear_quantize_weights if quantize == "int8" else cto.palettize_weights)(mlmodel, config)


def describe(mlmodel, meta, docs):
    """Xcode shows these in the model's General and Predictions tabs; apps read meta via modelDescription.metadata."""
    mlmodel.author, mlmodel.license, mlmodel.version = meta["author"], meta["license"], meta["version"]
    mlmodel.short_description = meta["description"]
    mlmodel.user_defined_metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()
                                          if k not in ("author", "license", "version", "description")})
    for name, text in docs.items():
        (mlmodel.input_description if name in ("image", "input_ids") else mlmodel.output_description)[name] = text


# --- checks on the saved package ---
def feature(desc):
    """A spec's input or output -> 'image RGB 256x256' | 'float32 [1, 512]', the notation of the README."""
    if desc.type.WhichOneof("Type") == "imageType":
        return f"image RGB {desc.type.imageType.height}x{desc.type.imageType.width}"
    array = desc.type.multiArrayType
    return f"{array.ArrayDataType.Name(array.dataType).lower()} {list(array.shape)}"


def check_package(path, io, n_params, quantize, target):
    """Reload the package -> summary dict. Raises ExportCheckError where its interface or target is not as stated."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if spec.specificationVersion != getattr(ct.target, target).value:  # what a device checks before loading it
        raise ExportCheckError(f"{path.name}: Core ML specification {spec.specificationVersion}, but --target={target} "
                               f"is {getattr(ct.target, target).value}")
    got = {d.name: feature(d) for d in [*spec.description.input, *spec.description.output]}
    if got != io:
        raise ExportCheckError(f"{path.name}: inputs/outputs {got}, documented {io}")
    ops, stored, fp32_ops = collections.Counter(), collections.Counter(), collections.Counter()
    graph_inputs = {d.name for d in spec.description.input}  # ImageType's 1/255 runs in fp32 on the input itself
    for block in [b for f in spec.mlProgram.functions.values() for b in f.block_specializations.values()]:
        for op in block.operations:
            ops[op.type] += 1
            args = [a for arg in op.inputs.values() for a in arg.arguments]  # names, or values inline (iOS 18)
            for value in [*op.attributes.values(), *(a.value for a in args if a.HasField("value"))]:
                if value.WhichOneof("value") == "blobFileValue":  # in weight.bin: consts, quantized data, LUTs
                    tensor = value.type.tensorType
                    n = math.prod(d.constant.size for d in tensor.dimensions)
                    stored[MIL_pb2.DataType.Name(tensor.dataType)] += n
            if op.type not in ("const", "cast") and not graph_inputs & {a.name for a in args} \
                    and op.outputs[0].type.tensorType.dataType == MIL_pb2.FLOAT32:
                fp32_ops[op.type] += 1
    rule = QUANTIZE[quantize]
    if set(ops) - ALLOWED_OPS:
        raise ExportCheckError(f"{path.name}: ops outside ALLOWED_OPS: {sorted(set(ops) - ALLOWED_OPS)}")
    if set(stored) - rule["stored"] or fp32_ops:
        raise ExportCheckError(f"{path.name}: weights stored as {dict(stored)} and fp32 compute in {dict(fp32_ops)}; "
                               f"expected {sorted(rule['stored'])} weights and fp16 compute")
    weight_bytes = (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    (lo, hi), per_param = rule["bytes"], weight_bytes / n_params
    if not lo <= per_param <= hi:
        raise ExportCheckError(f"{path.name}: weight.bin holds {per_param:.2f} bytes per parameter ({weight_bytes} B "
                               f"/ {n_params}), expected {lo}..{hi} with --quantize={quantize}")
    return dict(io=got, ops=dict(ops.most_common()), stored=dict(stored), weight_bytes=weight_bytes,
                n_params=n_params, bytes_per_param=per_param,
                package_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))


def check_predictions(path, module, feeds, quantize):
    """macOS only: Core ML against PyTorch on (Core ML input dict, torch input) pairs -> a line for the summary."""
    if platform.system() != "Darwin":
        return ("skipped: only macOS can run a Core ML model (coremltools on Linux converts and saves, but its "
                "runtime, libcoremlpython, ships for macOS only); rerun there to compare predictions")
    import coremltools as ct
    mlmodel, worst, least, moved = ct.models.MLModel(str(path)), 1.0, QUANTIZE[quantize]["cosine"], 0
    for feed, x in feeds:
        with torch.no_grad():
            want = as_tuple(module(x))
        got = mlmodel.predict(feed)
        worst = min(worst, torch.cosine_similarity(torch.from_numpy(got["embedding"]).float(), want[0]).item())
        moved += len(want) > 1 and int(np.argmax(got["probs"])) != int(want[1].argmax())
    if worst < least or (moved and quantize == "none"):  # fp16 alone must not move a zero-shot answer
        raise ExportCheckError(f"{path.name}: Core ML vs PyTorch: cosine {worst:.5f} (>= {least} required), "
                               f"zero-shot argmax differs on {moved} of {len(feeds)} inputs")
    return f"ok on {len(feeds)} inputs: cosine >= {worst:.5f}, zero-shot argmax differs on {moved}"


def print_summary(summary, target):
    print(f"{summary['path']}: {summary['package_bytes'] / 1e6:.2f} MB for {summary['n_params'] / 1e6:.2f}M params "
          f"({summary['bytes_per_param']:.2f} B/param, weights {summary['stored']}), {target}, compute fp16")
    for name, text in summary["io"].items():
        print(f"  {name:10s} {text}")
    print("  ops:", ", ".join(f"{k} {v}" for k, v in summary["ops"].items()))
    print(f"  torch.export vs eager: max |diff| {summary['export_error']:.1e}")
    print(f"  Core ML predict: {summary['predict']}")


def save_package(mlmodel, path):
    """mlmodel.save(path); a failed save (a full disk: shutil.Error lists every file it could not copy) removes what
    it wrote, which would pass for a package (and stop the next run without --overwrite), and raises OSError naming
    path and the cause; Ctrl-C during the save removes it too."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mlmodel.save(str(path))
    except (OSError, KeyboardInterrupt) as e:
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise
        why = re.search(r"\[Errno \d+\] ([^:'\]]+)", str(e))
        raise OSError(f"cannot write {path}: {why[1] if why else e}; nothing of it is kept") from e


# --- the whole export ---
def build_package(path, module, example, ct_input, io, docs, feeds, meta, target, quantize):
    """Export, convert, describe, save, check -> summary (also printed)."""
    program, err = export_program(module, example)
    mlmodel = to_coreml(program, ct_input, list(io)[1:], target, quantize)
    describe(mlmodel, meta, docs)
    save_package(mlmodel, path)
    summary = check_package(path, io, n_weights(program), quantize, target)
    summary.update(path=str(path), target=target, export_error=err,
                   predict=check_predictions(path, module, feeds, quantize))
    print_summary(summary, target)
    return summary


def import_coremltools():
    """coremltools, with the warnings it logs at its first import (about a dozen: an untested torch version, one per
    Core ML runtime class missing off macOS) said once, each kind in one line."""
    import logging.handlers
    log, kept = logging.getLogger("coremltools"), logging.handlers.BufferingHandler(capacity=1000)
    log.addHandler(kept)  # a logger with a handler of its own: Python's last-resort stderr printing stays quiet
    try:
        import coremltools as ct
    finally:
        log.removeHandler(kept)
    said = dict.fromkeys(re.sub(r"^Failed to load \w+", "The Core ML runtime is absent", r.getMessage())
                         for r in kept.buffer)
    if said:
        print(f"coremltools {ct.__version__} at start-up (predictions need macOS; every other check runs here):\n  "
              + "\n  ".join(said))
    return ct


def export(checkpoint, out="out/ios", name="MobileFetalCLIP", classes="planes", text=False, quantize="none",
           target="iOS17", model_config=None, author="DARK export_ios.py", license="the licence of the checkpoint",
           overwrite=False, bpe=None):
    """Write the packages -> {'image': summary, 'text': summary}. Raises CheckpointError, ExportCheckError; before
    any work, FileExistsError when a package of that name is in `out` and overwrite is False, ValueError for a
    quantize or target check_target refuses; for a BPE checkpoint with a head or --text, FileNotFoundError without a
    vocabulary (the checkpoint's own copy, else bpe, else $DARK_BPE or open_clip's)."""
    there = [str(p) for p in (Path(out) / f"{name}{part}.mlpackage" for part in ("Image", "Text")[:1 + text])
             if p.exists()]
    if there and not overwrite:
        raise FileExistsError(f"{', '.join(there)} exists: replace it with --overwrite=true, or give another --out "
                              "or --name")
    ct = import_coremltools()
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {list(QUANTIZE)}; got {quantize!r}")
    check_target(target, quantize)
    model, kind, vocab, sha = load_student(checkpoint, model_config)
    model = models.reparameterize(copy.deepcopy(model)).eval()
    prompts = class_prompts(classes, kind)
    if classes in ("planes", "brain"):  # the default: fetal classes, whatever the model was trained on
        print(f"zero-shot head: --classes={classes}, eval.py's {len(prompts)} fetal {classes} classes; for a model of "
              "your own pass --classes=classes.json (its prompts), or --classes=none")
    # the tokenizer (for BPE, its vocabulary file) only where text is encoded: a head's prompts, or --text
    tokenizer = data.get_tokenizer(kind, model.context_length, vocab or bpe) if prompts or text else None
    tokenizer_name = (data.ToyTokenizer if kind == "toy" else data.SimpleTokenizer).__name__
    names, size, dim = list(prompts or ()), model.image_size, model.config["embed_dim"]
    class_emb = evaluation.text_classifier(model, tokenizer, prompts) if prompts else None
    meta = dict(author=author, license=license, version=Path(checkpoint).name, checkpoint_sha256=sha,
                image_size=size, image_mean=list(model.image_mean), image_std=list(model.image_std),
                context_length=model.context_length, tokenizer=tokenizer_name, classes=names,
                zero_shot="probs = softmax(100 * cosine(embedding, class embedding))", quantize=quantize,
                model_config=model.config)
    out, results = Path(out), {}
    pictures = [to_rgb(data.ToyWorld("test", size=size, length=N_CHECK)[i]["image"], size) for i in range(N_CHECK)]
    io = {"image": f"image RGB {size}x{size}", "embedding": f"float32 [1, {dim}]"}
    docs = {"image": f"RGB image {size}x{size}: pad to a centred black square, then resize",
            "embedding": "L2-normalised image embedding"}
    if names:
        io["probs"] = f"float32 [1, {len(names)}]"
        docs["probs"] = f"softmax(100 * cosine) over the classes: {', '.join(names)} (metadata 'classes')"
    results["image"] = build_package(
        out / f"{name}Image.mlpackage", ImageEncoder(model, class_emb).eval(),
        torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)),
        ct.ImageType(name="image", shape=(1, 3, size, size), scale=1 / 255, color_layout=ct.colorlayout.RGB),
        io, docs, [({"image": p}, pixels(p)) for p in pictures],
        dict(meta, description=f"{name} image encoder (DARK student), batch 1"), target, quantize)
    if quantize != "none":  # what compression costs, beside what it saves
        toy = torch.cat([pixels(to_rgb(item["image"], size)) for item in data.ToyWorld("test", size, length=N_COST)])
        results["image"]["compression"] = compression_cost(ImageEncoder(model, class_emb).eval(), quantize, toy)
        print(f"  {results['image']['compression']}")
    if text:
        ids = tokenizer([p for ps in (prompts or {}).values() for p in ps][:N_CHECK] or ["fetal ultrasound"]).int()
        results["text"] = build_package(
            out / f"{name}Text.mlpackage", TextEncoder(model).eval(), ids[:1],
            ct.TensorType(name="input_ids", shape=(1, model.context_length), dtype=np.int32),
            {"input_ids": f"int32 [1, {model.context_length}]", "embedding": f"float32 [1, {dim}]"},
            {"input_ids": f"token ids from {tokenizer_name} (the training tokenizer), zero-padded",
             "embedding": "L2-normalised text embedding"},
            [({"input_ids": ids[i:i + 1].numpy()}, ids[i:i + 1]) for i in range(len(ids))],
            dict(meta, description=f"{name} text encoder (DARK student), batch 1"), target, quantize)
    return results


def to_rgb(image, size):
    """A PIL image or uint8 array -> RGB PIL image of the model's size (a square toy image needs no padding)."""
    from PIL import Image
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


def pixels(image):
    """RGB PIL image -> [1, 3, S, S] in [0, 1]: what ImageType(scale=1/255) hands the graph."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


# --- the command line: python export_ios.py --key=value (data.parse_flags: the grammar, --help, the checks) ---
OPTIONS = dict(
    checkpoint="",          # a checkpoint written by train.py (or raw open_clip weights with --model_config)
    model_config="",        # for raw weights only: a preset name or an open_clip JSON
    bpe="",                 # CLIP BPE vocabulary for a checkpoint that carries none (raw weights); else $DARK_BPE
    out="out/ios",          # folder for the .mlpackage files
    name="MobileFetalCLIP",  # package prefix; Xcode names the Swift class after it
    classes="planes",       # the zero-shot head: planes | brain (eval.py's prompts) | none | a prompts JSON, as eval.py's
    text=False,             # also export the text encoder
    quantize="none",        # weight compression
    target="iOS17",         # minimum deployment target
    author="DARK export_ios.py",  # the packages' author metadata, shown in Xcode
    license="the licence of the checkpoint",  # the packages' licence metadata
    overwrite=False,        # replace packages of the same --name in --out
)


def check_classes(classes):
    """planes | brain | none | an existing JSON file"""  # --help shows the docstring as the rule
    if classes not in ("planes", "brain", "none") and not Path(classes).is_file():
        raise ValueError(f"takes {check_classes.__doc__}; there is no file {classes}")


def check_target(target, quantize="none"):
    """a coremltools ct.target name from iOS15 | macOS12 | watchOS8 | tvOS15 on (with --quantize from iOS16 | macOS13 |
    watchOS9 | tvOS16): iOS17 | iOS18 | macOS14 | ..."""
    ct = import_coremltools()
    names = [t for t in vars(ct.target) if not t.startswith("_")]
    version, family = (lambda t: getattr(ct.target, t).value), (lambda t: re.match(r"[a-zA-Z]+", t)[0])
    if target not in names:
        raise ValueError(f"takes one of {', '.join(names)}")
    # Core ML specification versions: an ML program needs 6; compressed weights (constexpr ops) need 7, and
    # coremltools would otherwise raise the package's version above the target without saying so
    need = 6 if quantize == "none" else 7
    if version(target) < need:
        oldest = min((t for t in names if family(t) == family(target) and version(t) >= need), key=version)
        raise ValueError(f"{target} is older than {oldest}, the first {family(target)} that reads "
                         + (f"--quantize={quantize}'s compressed weights" if need == 7 else "an ML program")
                         + f": give --target={oldest} or later" + (" or --quantize=none" if need == 7 else ""))


ACCEPTS = dict(classes=check_classes, quantize=tuple(QUANTIZE), target=check_target)


def main(argv=None):
    opt, _ = data.parse_flags(sys.argv[1:] if argv is None else argv, OPTIONS, ACCEPTS, __doc__, __file__)
    # torch's own deprecation inside torch.export's tree handling, once per run: nothing this file can change
    warnings.filterwarnings("ignore", re.escape("`isinstance(treespec, LeafSpec)`"), FutureWarning)
    if not opt["checkpoint"]:
        sys.exit("export_ios.py: --checkpoint=PATH is required (--help lists the options)")
    try:  # the flag check saw --target alone
        check_target(opt["target"], opt["quantize"])
    except ValueError as e:
        sys.exit(f"export_ios.py: --target={opt['target']}: {e}")
    try:
        return export(**{**opt, "model_config": opt["model_config"] or None, "bpe": opt["bpe"] or None})
    except FileExistsError as e:
        sys.exit(f"export_ios.py: {e}")


if __name__ == "__main__":
    data.run_script(main, "export_ios.py")
