"""Distill a CLIP teacher into a small CLIP student with DARK, on one CPU or many GPUs.

    python train.py                                   # toy world, offline: teacher (once), DARK student, both evaluated
    python train.py --kd=static --out_dir=out/static  # one row of the paper's Table 1 (none | static | coupled | dark)
    torchrun --nproc_per_node=8 train.py --teacher=FetalCLIP_weights.pt --teacher_config=fetalclip \\
        --student=mobileclip2-s0 --student_init=mobileclip2_s0.pt --bpe=bpe_simple_vocab_16e6.txt.gz \\
        --train_data='shards/shard_{0000000001..0000000025}.tar' --val_data=FETAL_PLANES_DB

Every default below can be overridden with --key=value; `python train.py --help` lists them. The defaults are the
paper's recipe; with train_data='toy' the TOY overrides (below them) apply to every key not given on the command line.
"""
import json
import math
import os
import sys
import tarfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # all_gather with gradient
import torch.nn.functional as F

import dark
import data
import eval as evaluation
import models

# --- I/O ---
out_dir = "out/student"     # ckpt.pt (latest, for --resume), best.pt (best validation composite), log.jsonl
resume = False              # continue out_dir/ckpt.pt where it stopped
ckpt_every = 500            # optimizer steps between checkpoints (one is always written at the end)
log_every = 50              # optimizer steps between log lines
seed = 0
# --- data ---
train_data = "toy"          # 'toy' (built-in world) | image-caption .csv/.tsv | tar shards 'dir/shard_{0001..0025}.tar'
toy_train_size = 6000       # toy world: training pairs (rendered once, then kept in memory)
image_root = ""             # prefix for relative image paths in a caption CSV
samples_per_epoch = 0       # tar shards: pairs per epoch (0 = count the shard members once at start-up)
skip_bad = False            # tar shards: skip unreadable samples (counted and reported) instead of stopping
bpe = ""                    # CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for the real models
val_data = ""               # model selection: toy -> toy val split; else a FETAL_PLANES_DB folder (Train=1 rows only)
val_every = 1               # epochs between validations
val_size = 500              # toy: validation images (the report uses the whole test split)
workers = 4                 # DataLoader worker processes for files (the toy world is made in the main process)
augment = True              # one random affine + brightness/contrast draw per pair, shared by both views
# --- models ---
teacher = "out/teacher/best.pt"  # a train.py checkpoint or raw open_clip weights; toy: pretrained here when missing
teacher_config = ""         # for raw weights: preset name (fetalclip) or open_clip JSON (FetalCLIP_config.json)
student = "toy-student"     # preset name or open_clip JSON of the student
student_init = ""           # initial student weights (MobileCLIP2-S0 in the paper); empty = random init
# --- loss: L = L_CLIP + L_diag + beta(t) L_off ---
kd = "dark"                 # none | static | coupled | dark: the four rows of the paper's Table 1
beta0, beta_r = 2.0, -0.4   # dark: beta goes 2 -> -0.8, crossing zero at 71% of training
lambda0, lambda_r = 1.0, -0.8  # static: constant lambda0; coupled: lambda goes 1 -> -0.8
tau = 5.0                   # teacher temperature (teacher only): a softer target exposes its non-target structure
max_logit_scale = 100.0     # clamp of the student's exp(logit_scale), as CLIP
# --- optimizer: AdamW, cosine with warm-up ---
epochs = 20
batch_size = 512            # per device and micro-batch; contrastive negatives come from the gathered micro-batch
grad_accum = 1              # micro-batches per optimizer step
lr = 1e-5
warmup_steps = 500
weight_decay = 0.1          # not on parameters with ndim < 2 (norms, biases, logit_scale)
adam_beta1, adam_beta2, adam_eps = 0.9, 0.98, 1e-6
grad_clip = 1.0
# --- system ---
device = "auto"             # auto | cpu | cuda | cuda:N
dtype = "bf16"              # CUDA autocast: bf16 | fp16 (with a GradScaler) | fp32; the CPU always runs fp32
threads = 0                 # CPU threads (0 = torch's default)

# The built-in toy world: sized so that `python train.py` finishes in minutes on a laptop CPU.
TOY = dict(epochs=4, batch_size=64, lr=2e-3, warmup_steps=50, weight_decay=0.05, workers=0, ckpt_every=100,
           log_every=25)
# The toy teacher is pretrained by this same loop: CLIP loss only, the teacher preset, its own out_dir, 7,200 pairs
# seen 4 times: about 6 of the 10 minutes a 2-core CPU gets for the whole run.
TOY_TEACHER = dict(student="toy-teacher", student_init="", kd="none", epochs=4, lr=2e-3, toy_train_size=7200)

KEYS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


# --- configuration from the command line ---
def parse_args(argv, base=KEYS):
    """--key=value overrides of the defaults above, type-checked. Returns (config, keys given)."""
    cfg, given = dict(base), set()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\n" + "\n".join(f"  --{k}={v!r}" for k, v in base.items()) +
                  f"\nwith --train_data=toy, keys not given take TOY = {TOY}\nand the toy teacher's pretraining "
                  f"takes TOY_TEACHER = {TOY_TEACHER}")
            sys.exit(0)
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or key not in base:
            sys.exit(f"train.py: bad argument {arg!r}; use --key=value with key one of: {', '.join(base)}")
        kind = type(base[key])
        try:
            cfg[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
            if kind is bool and value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ValueError(value)
        except ValueError:
            sys.exit(f"train.py: --{key} takes a {kind.__name__} (default {base[key]!r}), got {value!r}")
        given.add(key)
    if cfg["train_data"] == "toy":
        cfg.update({k: v for k, v in TOY.items() if k not in given})
    return cfg, given


# --- schedules: pure functions of the optimizer step ---
def lr_at(step, total_steps, peak, warmup):
    """Linear warm-up to peak over `warmup` steps, then cosine decay to 0 at total_steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * frac))


def kd_weight(cfg, step, total_steps):
    """The KD weight of each Table 1 row at this optimizer step."""
    if cfg["kd"] == "dark":
        return dark.kd_weight_at(step, total_steps, cfg["beta0"], cfg["beta_r"])
    if cfg["kd"] == "coupled":
        return dark.kd_weight_at(step, total_steps, cfg["lambda0"], cfg["lambda_r"])
    return cfg["lambda0"] if cfg["kd"] == "static" else 0.0


# --- distributed ---
def compute_init(cfg):
    """-> (ddp, rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is one process."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    want = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        if want.startswith("cuda"):
            want = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(want)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
        return True, dist.get_rank(), dist.get_world_size(), torch.device(want)
    return False, 0, 1, torch.device(want)


def gather(x, ddp, grad):
    """All ranks' rows, in rank order: [B, D] -> [world * B, D]. With grad, each rank's slice keeps its graph."""
    if not ddp:
        return x
    if grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


def print0(*args, rank=0):
    if rank == 0:
        print(*args, flush=True)


# --- data ---
def make_pairs(cfg, size, rank, world):
    """The training image-caption pairs: the toy world or a caption CSV (map-style), or tar shards (streamed)."""
    if cfg["train_data"] == "toy":
        return data.ToyWorld(split="train", size=size, seed=cfg["seed"], length=cfg["toy_train_size"], cache=True)
    if cfg["train_data"].endswith((".csv", ".tsv")):
        return data.ImageRows(data.read_captions(cfg["train_data"], root=cfg["image_root"] or None))
    shards = data.TarShards(cfg["train_data"], skip_bad=cfg["skip_bad"], shuffle=True, seed=cfg["seed"])
    if len(shards.shards) < world * max(1, cfg["workers"]):  # a reader without a shard would wait forever
        raise ValueError(f"{len(shards.shards)} shards in {cfg['train_data']!r} for {world} ranks x "
                         f"{max(1, cfg['workers'])} workers: give every reader a shard (fewer --workers, more shards)")
    return shards.shard_by(rank, world)


def epoch_batches(pairs, collate, cfg, epoch, rank, world, start=0):
    """This rank's micro-batches of one epoch as (teacher view, student view, token ids), from micro-batch `start`
    on (for --resume). Map-style data is shuffled by a generator seeded with (seed, epoch) and each global batch is
    cut into per-rank slices, so a resumed run, and a run on any number of ranks, sees the same global batches."""
    bs, g = cfg["batch_size"], torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
    # the loader gets its own generator: it draws worker seeds from one, and the global RNG belongs to --resume
    if isinstance(pairs, torch.utils.data.IterableDataset):
        # shards are dealt to ranks, then to workers, so ranks see different counts: each rank's stream runs on into
        # the next pass (a new shard order) and the step count, the same on every rank, ends the epoch
        def endless(p=0):
            while True:
                pairs.set_epoch(epoch * 1000 + p)
                yield from torch.utils.data.DataLoader(pairs, batch_size=bs, num_workers=cfg["workers"],
                                                       drop_last=True, collate_fn=collate, generator=g)
                p += 1
        batches = (b for i, b in enumerate(endless()) if i >= start)
    else:
        order = torch.randperm(len(pairs), generator=g)
        n = len(order) // (bs * world)
        mine = order[:n * bs * world].view(n, world, bs)[start:, rank]  # [micro-batches, B]: rank's rows of each
        batches = torch.utils.data.DataLoader(pairs, batch_sampler=mine.tolist(), num_workers=cfg["workers"],
                                              collate_fn=collate, generator=g)
    for batch in batches:
        yield (*batch["image"], batch["ids"])


def micro_batches_per_epoch(pairs, cfg, world):
    """Tar shards have no length: --samples_per_epoch, or one pass that counts the captions."""
    n = len(pairs) if hasattr(pairs, "__len__") else cfg["samples_per_epoch"] or count_shard_pairs(pairs)
    return n // (cfg["batch_size"] * world)


def count_shard_pairs(shards):
    return sum(name.endswith(".txt") for shard in shards.shards for name in tarfile.open(shard).getnames())


# --- models ---
def load_teacher(cfg, device):
    """Frozen, eval mode: a train.py checkpoint carries its config; raw weights need --teacher_config."""
    model, _ = evaluation.load_model_from_checkpoint(cfg["teacher"], cfg["teacher_config"] or None, cfg["bpe"] or None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def build_student(cfg):
    model = models.build_model(cfg["student"])
    if cfg["student_init"]:
        models.load_checkpoint(model, cfg["student_init"])
    return model


def tokenizer_kind(model):
    return "toy" if model.config["text_cfg"]["vocab_size"] == data.TOY_VOCAB_SIZE else "bpe"


def make_optimizer(model, cfg):
    """AdamW; no weight decay on parameters with ndim < 2 (norms, biases, logit_scale, layer scales)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]), eps=cfg["adam_eps"],
                             fused=fused or None)


def save_atomic(obj, path):
    """Write to a temp file, then rename: a run killed mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def validate(model, tokenizer, cfg, device):
    """Zero-shot metrics for model selection, on data never reported as a test result."""
    if cfg["train_data"] == "toy" and not cfg["val_data"]:
        return evaluation.evaluate(model, tokenizer, task="toy", split="val", n=cfg["val_size"], device=device)
    if cfg["val_data"]:  # FETAL_PLANES_DB's Train=1 rows: never the test rows the paper reports
        planes, brain = (evaluation.evaluate(model, tokenizer, task=task, split="train", root=cfg["val_data"],
                                             device=device) for task in ("planes", "brain"))
        return {**planes, **brain, "class_f1": evaluation.class_f1(planes["planes_f1"], brain["brain_f1"])}
    return {}


SELECT_ON = ("composite", "class_f1")  # the first one validation reports picks best.pt


# --- the loop ---
def train(cfg):
    """One training run (teacher pretraining or distillation). Returns the path of the best checkpoint."""
    ddp, rank, world, dev = compute_init(cfg)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"] + rank)
    out = Path(cfg["out_dir"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    cuda = dev.type == "cuda"
    ptdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg["dtype"]]
    autocast = torch.autocast("cuda", dtype=ptdtype) if cuda and ptdtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and ptdtype == torch.float16)

    student = build_student(cfg).to(dev)
    teacher = load_teacher(cfg, dev) if cfg["kd"] != "none" else None
    tokenizer = data.get_tokenizer(tokenizer_kind(student), student.context_length, cfg["bpe"] or None)
    if teacher is not None and (tokenizer_kind(teacher), teacher.context_length) != (tokenizer_kind(student),
                                                                                     student.context_length):
        raise ValueError("teacher and student must share the tokenizer and context length (the same token ids "
                         f"feed both): teacher {tokenizer_kind(teacher)}/{teacher.context_length}, "
                         f"student {tokenizer_kind(student)}/{student.context_length}")
    views = [(m.image_size, m.image_mean, m.image_std) for m in (teacher or student, student)]  # each its own
    collate = data.Collate(data.DistillTransform(*views, augment=cfg["augment"]), tokenizer)
    pairs = make_pairs(cfg, max(student.image_size, (teacher or student).image_size), rank, world)
    steps_per_epoch = micro_batches_per_epoch(pairs, cfg, world) // cfg["grad_accum"]
    total_steps = steps_per_epoch * cfg["epochs"]
    if total_steps == 0:
        raise ValueError(f"no optimizer step fits in an epoch: fewer pairs than batch {cfg['batch_size']} x {world} "
                         f"ranks x {cfg['grad_accum']} micro-batches")
    if cfg["val_data"]:  # a wrong path fails now, not after the first epoch
        data.read_fetal_planes(cfg["val_data"])
    optimizer = make_optimizer(student, cfg)
    model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[dev] if cuda else None) if ddp else student

    step, best, ckpt_path = 0, -math.inf, out / "ckpt.pt"
    if cfg["resume"]:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (is --out_dir the run's folder?)")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best = ckpt["step"], ckpt["best_val"]
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if cuda and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        print0(f"resumed {ckpt_path} at step {step}", rank=rank)

    def checkpoint(path):
        save_atomic(dict(model=student.state_dict(), model_config=student.config, tokenizer=tokenizer_kind(student),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, best_val=best,
                         config=cfg,
                         rng=dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if cuda else None)),
                    path)

    def last_good():  # a non-finite step stops the run before anything is written
        return f"stopping. The last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none yet'}"

    log = open(out / "log.jsonl", "a" if cfg["resume"] else "w") if rank == 0 else None
    n_params = sum(p.numel() for p in student.parameters())
    print0(f"training {cfg['student']} ({n_params / 1e6:.2f}M params) kd={cfg['kd']} for {total_steps} steps "
           f"({cfg['epochs']} epochs x {steps_per_epoch}) on {world} x {dev}", rank=rank)
    t0, seen = time.time(), 0
    model.train()
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        batches = epoch_batches(pairs, collate, cfg, epoch, rank, world, start=first * cfg["grad_accum"])
        for _ in range(first, steps_per_epoch):
            lr, weight = lr_at(step, total_steps, cfg["lr"], cfg["warmup_steps"]), kd_weight(cfg, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg["grad_accum"]):
                t_view, s_view, ids = (x.to(dev, non_blocking=True) for x in next(batches))
                sync = nullcontext() if not ddp or micro == cfg["grad_accum"] - 1 else model.no_sync()
                with sync:
                    with autocast:
                        img, txt, scale = model(s_view, ids)
                        t_img = t_txt = t_scale = None
                        if teacher is not None:
                            with torch.no_grad():
                                t_img, t_txt, t_scale = teacher(t_view, ids)
                    if teacher is not None:  # the teacher's columns are targets: gathered without a graph
                        t_img, t_txt = gather(t_img, ddp, False), gather(t_txt, ddp, False)
                    rows = slice(rank * len(ids), (rank + 1) * len(ids))  # this rank's rows of the global batch
                    losses = dark.dark_loss(gather(img, ddp, True), gather(txt, ddp, True), scale, t_img, t_txt,
                                            t_scale, mode=cfg["kd"], weight=weight, tau=cfg["tau"], rows=rows)
                    if not torch.isfinite(losses["total"]):
                        terms = {k: round(v.item(), 4) for k, v in losses.items()}
                        raise FloatingPointError(f"loss is {losses['total'].item()} at step {step} ({terms}); "
                                                 + last_good())
                    scaler.scale(losses["total"] / cfg["grad_accum"]).backward()
                seen += len(ids) * world
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg["grad_clip"])
            if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16's scaler skips such steps itself
                raise FloatingPointError(f"gradient norm is {grad_norm.item()} at step {step}; " + last_good())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # CLIP's clamp: a logit scale above 100 destabilises training
                student.logit_scale.clamp_(0, math.log(cfg["max_logit_scale"]))
            step += 1

            if step % cfg["log_every"] == 0 or step == total_steps:
                names = ("total", "clip", "diag", "off")
                terms = torch.stack([losses[k].detach() for k in names])
                if ddp:  # each rank holds its rows' mean; the mean over ranks is the global batch's loss
                    dist.all_reduce(terms)
                    terms /= world
                rate, t0, seen = seen / (time.time() - t0), time.time(), 0  # over the last log interval
                row = dict(step=step, epoch=epoch, lr=lr, kd_weight=weight, **dict(zip(names, terms.tolist())),
                           grad_norm=grad_norm.item(), scale=scale.item(),
                           t_scale=t_scale.item() if t_scale is not None else None, samples_per_s=round(rate, 1),
                           cuda_gb=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None)
                eta = (total_steps - step) * cfg["batch_size"] * cfg["grad_accum"] * world / max(rate, 1e-9)
                print0(f"step {step}/{total_steps} lr {lr:.2e} w {weight:+.3f} loss {row['total']:.4f} (clip "
                       f"{row['clip']:.4f} diag {row['diag']:.4f} off {row['off']:.4f}) scale {row['scale']:.1f} "
                       f"{rate:.0f} samples/s eta {eta / 60:.1f} min" + (f" {row['cuda_gb']} GB" if cuda else ""),
                       rank=rank)
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            end_of_epoch = step % steps_per_epoch == 0
            if rank == 0 and end_of_epoch and (step // steps_per_epoch) % cfg["val_every"] == 0:
                metrics = validate(student, tokenizer, cfg, dev)
                if metrics:
                    shown = ("planes_f1", "brain_f1", "class_f1", "ga_validity", "composite")
                    print0("val " + " ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics))
                    log.write(json.dumps(dict(step=step, epoch=epoch + 1, **{f"val_{k}": v for k, v in metrics.items()
                                                                               if isinstance(v, (int, float))})) + "\n")
                    log.flush()
                    score = next(metrics[k] for k in SELECT_ON if k in metrics)
                    if score > best:
                        best = score
                        checkpoint(out / "best.pt")
            if rank == 0 and (step % cfg["ckpt_every"] == 0 or step == total_steps):
                checkpoint(ckpt_path)
            if end_of_epoch:
                break
    if rank == 0 and best == -math.inf:  # nothing validated: the last step is the model
        checkpoint(out / "best.pt")
    if log:
        log.close()
    if ddp:
        dist.barrier()
    return out / "best.pt"


# --- the embedded story: teacher, student, both evaluated ---
def trivial(cfg):
    """What the test split gives away without an image: the expected macro F1 of guessing a class uniformly at random,
    the validity of calling every head the median age of the training heads, and of the median age at its stated
    pixel spacing (a field of view is chosen to fit the head, so the spacing alone hints at the age)."""
    records = evaluation.toy_records("test")
    f1 = lambda labels: np.mean([2 * (n / len(c)) / (n + len(labels) / len(c))
                                 for c in [sorted(set(labels))] for n in np.unique(labels, return_counts=True)[1]])
    world = data.ToyWorld("train", seed=cfg["seed"], length=cfg["toy_train_size"])
    heads = [f for f in map(world.facts, range(len(world))) if f["plane"] == 1]
    median = lambda fov=None: np.median([f["days"] for f in heads if fov in (None, f["fov"])])
    scored = [r for r in records if r["hc_mm"] is not None and evaluation.in_hc_window(r["hc_mm"])]
    hc = [r["hc_mm"] for r in scored]
    valid = lambda days: 100 * float(evaluation.ga_valid(days, hc).mean())
    by_spacing = [median(round(r["pixel_mm"] * 64)) for r in scored]
    return dict(planes_f1=f1([r["plane"] for r in records]), brain_f1=f1([r["brain"] for r in records if r["brain"]]),
                ga_validity=valid(median()), ga_validity_spacing_only=valid(by_spacing))


def report(checkpoints, cfg):
    """Zero-shot on the toy test split (never used for selection) plus size and speed, as a markdown table, then the
    trivial answers; the rows also go to results.json."""
    rows, configs = [], {}
    for name, path in checkpoints:
        configs[name] = torch.load(path, map_location="cpu", weights_only=True).get("config")  # the run's recipe
        model, tokenizer = evaluation.load_model_from_checkpoint(path)
        metrics = evaluation.evaluate(model, tokenizer, task="toy", split="test")
        speed = evaluation.speed(model, runs=10)
        rows.append(dict(model=name, params_M=sum(p.numel() for p in model.parameters()) / 1e6,
                         image_params_M=sum(p.numel() for p in model.visual.parameters()) / 1e6,
                         image_ms=speed.get("image_ms_folded", speed["image_ms"]), **{k: metrics[k] for k in (
                             "planes_f1", "brain_f1", "ga_validity", "composite")}))
    base = trivial(cfg)
    rows.append(dict(model="no image: uniform guess, median age", **base, composite=evaluation.composite(
        evaluation.class_f1(base["planes_f1"], base["brain_f1"]), base["ga_validity"])))
    table = evaluation.markdown_table(rows, list(rows[0]))
    print("\nzero-shot on the toy test split (image_ms: CPU, batch 1, reparameterized where foldable)\n" + table +
          f"\nthe median age at each stated pixel spacing, no image: validity {base['ga_validity_spacing_only']:.2f}%")
    Path(cfg["out_dir"], "results.md").write_text(table + "\n")
    Path(cfg["out_dir"], "results.json").write_text(json.dumps(dict(rows=rows, configs=configs), indent=1) + "\n")
    return rows


def main(argv):
    cfg, _ = parse_args(argv)
    t0 = time.time()
    if cfg["train_data"] == "toy" and cfg["kd"] != "none" and not Path(cfg["teacher"]).exists():
        # the same loop pretrains the toy teacher: CLIP loss only, teacher preset, its own folder; only a finished
        # pretraining becomes --teacher, so a run killed half-way starts it again instead of reusing a weak teacher
        print(f"no teacher at {cfg['teacher']}: pretraining the toy teacher first")
        built = train({**cfg, **TOY_TEACHER, "out_dir": str(Path(cfg["teacher"]).parent / "pretrain"), "resume": False})
        if int(os.environ.get("RANK", 0)) == 0:
            os.replace(built, cfg["teacher"])
        if dist.is_initialized():
            dist.barrier()
    best = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0 and cfg["train_data"] == "toy":
        report([("teacher", cfg["teacher"])] * (cfg["kd"] != "none") + [(f"student ({cfg['kd']})", best)], cfg)
    print(f"done in {(time.time() - t0) / 60:.1f} min")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
