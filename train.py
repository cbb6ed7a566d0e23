"""Distill a CLIP teacher into a small CLIP student with DARK, on one CPU or many GPUs.

    python train.py                                   # toy world, offline: teacher (once), DARK student, both evaluated
    python train.py --kd=static --out_dir=out/static  # one row of the paper's Table 1 (none | static | coupled | dark)
    torchrun --nproc_per_node=8 train.py --teacher=FetalCLIP_weights.pt --teacher_config=fetalclip \\
        --student=mobileclip2-s0 --student_init=mobileclip2_s0.pt --bpe=bpe_simple_vocab_16e6.txt.gz \\
        --train_data='shards/shard_{0000000001..0000000025}.tar' --val_data=FETAL_PLANES_DB
    srun --ntasks=8 python train.py ...               # the same ranks from SLURM (or Open MPI: mpirun -np 8 python ...)

Every default below can be overridden with --key=value; `python train.py --help` lists them. The defaults are the
paper's recipe (8 GPUs, ~50k pairs); --recipe=small (SMALL, below them) is one for a few thousand pairs from scratch on
a CPU, and the toy world takes TOY: a recipe fills every key not given on the command line, and start-up prints it.
"""
import errno
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import dark
import data
import eval as evaluation
import models

# --- I/O ---
out_dir = "out/student"     # ckpt.pt (latest, for --resume), best.pt (best validation composite), log.jsonl
resume = False              # continue out_dir/ckpt.pt where it stopped, with its saved config
overwrite = False           # start afresh in an out_dir that holds another run, replacing its checkpoints and log
ckpt_every = 500            # optimizer steps between checkpoints (one is always written at the end)
log_every = 50              # optimizer steps between log lines
seed = 0                    # data order, augmentation draws, initial weights
# --- data ---
train_data = "toy"          # 'toy' (built-in world) | image-caption .csv/.tsv | tar shards 'dir/shard_{0001..0025}.tar'
toy_train_size = 6000       # toy world: training pairs (rendered once, then kept in memory)
image_root = ""             # prefix for relative image paths in a caption CSV
csv_separator = ""          # caption CSV/TSV: one character, or \t for a tab; empty = detected (, ; tab |)
csv_img_key = "filepath"    # caption CSV/TSV: the image path column (open_clip's --csv-img-key)
csv_caption_key = "title"   # caption CSV/TSV: the caption column (open_clip's --csv-caption-key)
samples_per_epoch = 0       # tar shards: pairs per epoch (0 = count the shard members once at start-up)
skip_bad = False            # skip undecodable images, bad shard samples, cut shards (counted, reported); else stop
bpe = ""                    # CLIP BPE vocabulary file, unless the teacher (or, at a resume, the run) carries one
val_data = ""               # selection: FETAL_PLANES_DB, labelled CSV + val_prompts, or caption CSV/shards (toy: val split)
#                             on class F1 (Train=1 rows only), macro F1, mean retrieval recall; always printed and logged
val_prompts = ""            # a labelled val_data CSV: the classes' prompts JSON (eval.py --prompts' formats)
csv_label_key = "label"     # a labelled val_data CSV: the class-name column (its image column is csv_img_key)
val_every = 1               # epochs between validations; the last epoch is always validated
val_size = 500              # toy: validation images (the report uses the whole test split)
workers = 4                 # DataLoader worker processes for files (the toy world is made in the main process)
augment = True              # one random affine + brightness/contrast draw per pair, shared by both views
teacher_cache = ""          # folder of stored teacher embeddings: filled once (K teacher forwards a pair), then read
cache_views = 5             # K views stored a pair: each replayed 4 times in the paper's 20 epochs, for 1/4 the cost
# --- models ---
teacher = "out/teacher/best.pt"  # a train.py checkpoint or raw open_clip weights; this default: toy, made if missing
teacher_config = ""         # for raw weights: preset name (fetalclip) or open_clip JSON (FetalCLIP_config.json)
student = "toy-student"     # preset name or open_clip JSON of the student
student_init = ""           # initial student weights (MobileCLIP2-S0 in the paper); empty = random init
# --- loss: L = L_CLIP + L_diag + beta(t) L_off ---
kd = "dark"                 # the four rows of the paper's Table 1
beta0, beta_r = 2.0, -0.4   # dark: beta goes 2 -> -0.8, crossing zero at 71% of training
lambda0, lambda_r = 1.0, -0.8  # static: constant lambda0; coupled: lambda goes 1 -> -0.8
tau = 5.0                   # teacher temperature (teacher only): a softer target exposes its non-target structure
max_logit_scale = 100.0     # clamp of the student's exp(logit_scale), as CLIP
# --- optimizer: AdamW, cosine with warm-up ---
recipe = "auto"             # the defaults of keys not given (auto: toy for the toy world, else paper); printed at start
epochs = 20                 # passes over the training pairs
batch_size = 512            # per rank and micro-batch: under torchrun the global batch is batch_size x ranks
grad_accum = 1              # micro-batches per optimizer step
lr = 1e-5                   # peak learning rate (the paper's, fine-tuning pretrained towers), reached after the warm-up
warmup_steps = 500          # optimizer steps of linear warm-up, then a cosine decay to 0 at the last step
weight_decay = 0.1          # not on parameters with ndim < 2 (norms, biases, logit_scale)
adam_beta1, adam_beta2, adam_eps = 0.9, 0.98, 1e-6  # CLIP's AdamW: beta2 0.98, eps 1e-6 (stabler at large batch)
grad_clip = 1.0             # max global gradient norm
# --- system ---
device = "auto"             # auto: cuda when there is one
dtype = "bf16"              # CUDA autocast (fp16 with a GradScaler); the CPU always runs fp32
threads = 0                 # CPU threads (0 = torch's default)

# A few thousand pairs of one's own, towers trained from scratch (no --student_init): batch 64 and lr 1e-3, the toy
# world's order, where the paper's 512 would fit no step into an epoch and its 1e-5 is for fine-tuning pretrained
# towers; 20 warm-up steps fit a run of 20 epochs of 64 pairs or more; images decoded in the main process (workers 0)
# cost less than worker processes started every epoch (measured: 9 s of a 36 s run of 20 one-step epochs).
SMALL = dict(epochs=20, batch_size=64, lr=1e-3, warmup_steps=20, weight_decay=0.05, workers=0, log_every=10)
# The built-in toy world: sized so that `python train.py` finishes in minutes on a laptop CPU.
TOY = dict(epochs=2, batch_size=64, lr=2e-3, warmup_steps=50, weight_decay=0.05, workers=0, ckpt_every=100,
           log_every=25)
# The toy teacher is pretrained by this same loop: CLIP loss only, the teacher preset, its own out_dir, 6,400 pairs
# seen 4 times (400 steps; lr 1e-3 after 100 warm-up steps: planes F1 0.83 at epoch 3 where 2e-3 after 50 had 0.69, one
# run each), validated every other epoch (each validation costs seconds): 6.1 minutes of the default run's 8.7 on a
# shared 2-core CPU (measured; 5.9 of 7.8 on a quiet one, the previous world); a busy host can double it.
TOY_TEACHER = dict(student="toy-teacher", student_init="", kd="none", epochs=4, lr=1e-3, warmup_steps=100,
                   toy_train_size=6400, val_every=2)

RECIPES = dict(paper={}, small=SMALL, toy=TOY)
KEYS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
# what each option accepts, checked before any work (data.parse_flags): a tuple is the closed set, a string the interval
ACCEPTS = dict(ckpt_every="[1, inf)", log_every="[1, inf)", toy_train_size="[1, inf)", samples_per_epoch="[0, inf)",
               val_every="[1, inf)", val_size="[1, inf)", workers="[0, inf)", cache_views="[1, inf)",
               kd=("none", "static", "coupled", "dark"), recipe=("auto", *RECIPES),
               tau="(0, inf)", max_logit_scale="[1, inf)", epochs="[1, inf)", batch_size="[1, inf)",
               grad_accum="[1, inf)", lr="(0, inf)", warmup_steps="[0, inf)", weight_decay="[0, inf)",
               adam_beta1="[0, 1)", adam_beta2="[0, 1)", adam_eps="(0, inf)", grad_clip="(0, inf)",
               device=data.pick_device, dtype=("bf16", "fp16", "fp32"), threads="[0, inf)")
# --resume=true restores the checkpoint's config: these keys may differ from it (how the run goes, not what it trains;
# eval.py --table pools seeds that differ only there, too); so may batch_size where batch_size x ranks stays the
# run's global batch
RESUME_MAY_CHANGE = evaluation.HOW_IT_RAN
# options that name files: at a resume a file moved elsewhere is the same file when its content is (identity())
FILE_KEYS = ("teacher", "teacher_config", "student", "student_init", "teacher_cache", "train_data", "val_data",
             "val_prompts", "bpe")


# --- configuration from the command line ---
def parse_args(argv):
    """--key=value overrides of the defaults above, checked by data.parse_flags (the grammar of every script).
    -> (config, keys given); the recipe (auto: toy for --train_data=toy, else paper) fills the keys not given, and
    config['recipe'] names it."""
    doc = (f"{__doc__}\nSMALL = {SMALL}.\nThe toy teacher's pretraining takes TOY_TEACHER = {TOY_TEACHER}.\n"
           f"--resume=true restores the run's saved config; of the options only {', '.join(RESUME_MAY_CHANGE)} may "
           "change.")
    notes = {k: ", ".join(f"{name}: {r[k]}" for name, r in RECIPES.items() if k in r) for k in {**SMALL, **TOY}}
    cfg, given = data.parse_flags(argv, KEYS, ACCEPTS, doc, __file__, notes=notes)
    if cfg["recipe"] == "auto":
        cfg["recipe"] = "toy" if cfg["train_data"] == "toy" else "paper"
    cfg.update({k: v for k, v in RECIPES[cfg["recipe"]].items() if k not in given})
    return cfg, given


def recipe_line(cfg):
    """What start-up prints: the recipe and the values it decides, as this run has them."""
    shown = ("epochs", "batch_size", "lr", "warmup_steps", "weight_decay")
    return (f"recipe {cfg['recipe']}: " + ", ".join(f"{k}={cfg[k]:g}" for k in shown) + " (--recipe=paper | small | "
            "toy; a flag given overrides it)")


def configure(argv):
    """The run's config from the command line, checked before any work: the flags, the launcher's rendezvous, the
    saved config that --resume=true restores (its files by content, its global batch), an out_dir holding another
    run, tar shard patterns, a teacher that is not there. Raises SystemExit."""
    cfg, given = parse_args(argv)
    out, (launcher, _, _, ranks) = Path(cfg["out_dir"]), launch_info()
    try:
        rendezvous(launcher)
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    if cfg["resume"]:
        if not (out / "ckpt.pt").is_file():
            sys.exit(f"train.py: --resume=true: no checkpoint at {out / 'ckpt.pt'} (is --out_dir the run's folder?)")
        # mmap: only the config is read from disk, not every weight of a large checkpoint
        ckpt = models.read_checkpoint(out / "ckpt.pt", mmap=True)  # a cut file or bare weights: named
        if not isinstance(ckpt.get("config"), dict):
            sys.exit(f"train.py: --resume=true: {out / 'ckpt.pt'} holds no run config: train.py did not write it")
        saved, files, runs = ckpt["config"], ckpt.get("files", {}), ckpt.get("plan", {}).get("ranks", ranks)
        batch, keep = cfg["batch_size"] if "batch_size" in given else saved["batch_size"], saved["batch_size"] * runs
        if batch * ranks != keep:  # the global batch fixes the steps per epoch, hence the schedule
            plural = lambda n: f"{n} rank{'s' * (n != 1)}"
            sys.exit(f"train.py: --resume=true: the run in {out} trained on {plural(runs)} x --batch_size="
                     f"{saved['batch_size']} (global batch {keep}); this launch has {plural(ranks)} x {batch}, "
                     f"which would change its steps and schedule: launch {plural(runs)}"
                     + (f", or give --batch_size={keep // ranks}" if keep % ranks == 0 else ""))
        changed = [f"--{k}={cfg[k]} (the run has {saved[k]})" for k in sorted(given - set(RESUME_MAY_CHANGE))
                   if k in saved and cfg[k] != saved[k] and not (k in files and identity(cfg[k]) == files[k])
                   and k != "batch_size"]
        if changed:
            sys.exit(f"train.py: --resume=true continues the run in {out} as it was trained; {', '.join(changed)} "
                     f"would change it: drop the flag, or start a new run with another --out_dir. Only "
                     f"{', '.join(RESUME_MAY_CHANGE)} may change at a resume")
        cfg = {**cfg, **{k: v for k, v in saved.items() if k in cfg and k not in given}, "resume": True}
    elif not cfg["overwrite"] and any((out / f).exists() for f in ("ckpt.pt", "best.pt")):
        sys.exit(f"train.py: {out} holds another run's checkpoints: continue it with --resume=true, replace it with "
                 f"--overwrite=true, or write this run to a new --out_dir")
    if cfg["train_data"] != "toy" and not cfg["train_data"].lower().endswith((".csv", ".tsv")):  # tar shards
        try:
            shards = data.TarShards(cfg["train_data"]).shards  # a pattern outside the grammar, a URL: refused here
        except ValueError as e:
            sys.exit(f"train.py: --train_data={cfg['train_data']}: {e}")
        if cfg["teacher_cache"] and cfg["kd"] != "none" and any(s.startswith("pipe:") for s in shards):
            sys.exit(f"train.py: --teacher_cache needs local shards, not 'pipe:' streams ({cfg['train_data']!r}): a "
                     "cache knows its shards by name and size, which a stream has not. Copy the shards to disk first")
    if cfg["kd"] != "none" and not Path(cfg["teacher"]).is_file() and (cfg["resume"] or not toy_teacher_missing(cfg)):
        sys.exit(f"train.py: --teacher={cfg['teacher']}: no such file (the toy teacher is pretrained only at the "
                 f"default --teacher={KEYS['teacher']} with --train_data=toy)")
    return cfg


def identity(value):
    """What a path-valued option names, whatever its path: a file's sha256, a --teacher_cache folder's header, else
    the value itself (a preset name, a folder, shard patterns)."""
    if value and Path(value).is_file():
        return f"sha256 {data.sha256_file(value)}"
    if value and Path(value, "header.json").is_file():
        return Path(value, "header.json").read_text()
    return value


def toy_teacher_missing(cfg):
    """The default teacher of a toy run is pretrained here, once, when it is not there yet."""
    return cfg["train_data"] == "toy" and cfg["teacher"] == KEYS["teacher"] and not Path(cfg["teacher"]).is_file()


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
# each launcher's variables for (rank, local rank, world size), as open_clip's world_info_from_env reads them
# srun's step size, not the job's SLURM_NTASKS: an sbatch --ntasks=N script that runs python without srun has that too
LAUNCHERS = dict(torchrun=("RANK", "LOCAL_RANK", "WORLD_SIZE"),
                 srun=("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"),
                 mpirun=("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"))


def launch_info():
    """-> (launcher, rank, local rank, world size) from the environment of torchrun, SLURM's srun or Open MPI's mpirun;
    plain python, or a one-task srun/mpirun, is ('python', 0, 0, 1). torchrun's variables win inside a SLURM job."""
    for name, keys in LAUNCHERS.items():
        if keys[0] in os.environ:
            rank, local, world = (int(os.environ.get(k, 0)) for k in keys)
            if name == "torchrun" or world > 1:
                return name, rank, local, world
    return "python", 0, 0, 1


def rendezvous(launcher):
    """-> init_method where the ranks meet: torchrun's env://; for srun and mpirun MASTER_ADDR and MASTER_PORT, or on
    one node 127.0.0.1 and a port from the SLURM job id (29500 under mpirun), as every rank derives the same. Several
    nodes without MASTER_ADDR raise ValueError naming the variables."""
    if launcher == "torchrun":
        return "env://"
    one_node = (os.environ.get("SLURM_NNODES", "1") == "1" if launcher == "srun" else
                os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == os.environ.get("OMPI_COMM_WORLD_SIZE"))
    if "MASTER_ADDR" not in os.environ and not one_node:
        where = "SLURM_NNODES" if launcher == "srun" else "OMPI_COMM_WORLD_LOCAL_SIZE < OMPI_COMM_WORLD_SIZE"
        raise ValueError(f"{launcher} on several nodes ({where}): set MASTER_ADDR to the first node's host name and "
                         "MASTER_PORT to a free port there, the same for every task (e.g. MASTER_ADDR=$(scontrol show "
                         "hostnames $SLURM_JOB_NODELIST | head -n 1))")
    port = 20000 + int(os.environ.get("SLURM_JOB_ID", 9500)) % 40000  # jobs that share a node: other ports
    return f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', port)}"


def compute_init(cfg):
    """-> (ddp, rank, world_size, device) for the launcher (launch_info); one process is not distributed."""
    launcher, rank, local, world = launch_info()
    want = str(data.pick_device(cfg["device"]))
    if launcher != "python":
        if want.startswith("cuda"):
            want = f"cuda:{local}"
            torch.cuda.set_device(want)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if want.startswith("cuda") else "gloo", init_method=rendezvous(launcher),
                                    rank=rank, world_size=world)
        return True, dist.get_rank(), dist.get_world_size(), torch.device(want)
    return False, 0, 1, torch.device(want)


class AllGather(torch.autograd.Function):
    """All ranks' rows in rank order: [B, D] -> [world * B, D]; a tensor without grad (the teacher's) gathers without
    a graph. Backward: every rank's loss has a gradient for these rows; their sum over ranks (DDP then averages
    parameter gradients over ranks). torch.distributed.nn's all_gather did this, and is deprecated."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce writes in place
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, rank=0, file=None):
    if rank == 0:
        print(*args, flush=True, file=file)


# --- data ---
def make_pairs(cfg, size, rank, world):
    """The training image-caption pairs: the toy world or a caption CSV (map-style), or tar shards (streamed)."""
    if cfg["train_data"] == "toy":
        return data.ToyWorld(split="train", size=size, seed=cfg["seed"], length=cfg["toy_train_size"], cache=True)
    if cfg["train_data"].lower().endswith((".csv", ".tsv")):
        return data.ImageRows(data.read_captions(cfg["train_data"], cfg["csv_img_key"], cfg["csv_caption_key"],
                                                 cfg["csv_separator"] or None, cfg["image_root"] or None),
                              skip_bad=cfg["skip_bad"])
    shards = data.TarShards(cfg["train_data"], skip_bad=cfg["skip_bad"], shuffle=True, seed=cfg["seed"])
    if len(shards.shards) < world * max(1, cfg["workers"]):  # a reader without a shard would wait forever
        raise ValueError(f"{len(shards.shards)} shards in {cfg['train_data']!r} for {world} ranks x "
                         f"{max(1, cfg['workers'])} workers: give every reader a shard (fewer --workers, more shards)")
    return shards.shard_by(rank, world)


def epoch_batches(pairs, collate, cfg, epoch, rank, world, start=0):
    """This rank's micro-batches of one epoch as collate's batch dicts, from micro-batch `start`
    on (for --resume). Map-style data is shuffled by a generator seeded with (seed, epoch) and each global batch is
    cut into per-rank slices: a resumed run sees the same global batches, and so does a run on N ranks at 1/N of the
    batch_size (the global batch is batch_size x world)."""
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
    yield from batches


def plan_steps(n_pairs, cfg, world):
    """-> (optimizer steps per epoch, steps in all) for n_pairs training pairs. A run that cannot train raises
    ValueError with the numbers and what to change: a global batch of one pair (its contrastive loss is 0), fewer
    pairs than one optimizer step takes, or a warm-up longer than the run (the learning rate would never reach lr;
    the paper's batch 512 and 500 warm-up steps on an HC18-sized 716 pairs would peak at 4e-7)."""
    bs, accum, epochs, warmup = cfg["batch_size"], cfg["grad_accum"], cfg["epochs"], cfg["warmup_steps"]
    per_epoch = n_pairs // (bs * world * accum)
    total = per_epoch * epochs
    plan = (f"{n_pairs} pairs, batch {bs} x {world} ranks x {accum} micro-batches: {per_epoch} optimizer steps per "
            f"epoch, {total} in {epochs} epochs")
    small = ", ".join(f"{k}={v:g}" for k, v in SMALL.items())
    other = f" (the paper's recipe, for ~50k pairs; --recipe=small is one for a few thousand: {small})" * (
        cfg["recipe"] == "paper")
    if bs * world < 2:
        raise ValueError(f"{plan}: a global batch of one pair has no negatives (its contrastive loss is 0); set "
                         "--batch_size=2 or more" + other)
    if per_epoch == 0:
        raise ValueError(f"{plan}: no optimizer step fits in an epoch; set --batch_size="
                         f"{max(2, n_pairs // (world * accum))} or less, or give more pairs" + other)
    if warmup > total:
        raise ValueError(f"{plan}, with {warmup} warm-up steps: the learning rate would peak at "
                         f"{lr_at(total - 1, total, cfg['lr'], warmup):.1e}, not --lr={cfg['lr']:g}. Set "
                         f"--warmup_steps={max(1, total // 10)} (a tenth of the run), or train ten times the warm-up: "
                         f"--epochs={math.ceil(10 * warmup / per_epoch)}, or fewer pairs per step (--batch_size)"
                         + other)
    return per_epoch, total


def check_vocabulary(tokenizer, pairs, cfg, rank, n=2000):
    """Toy tokenizer, captions other than the toy world's: print the share of unknown tokens in the first n training
    captions (the same on every rank); refuse a run where most are unknown (they would all train as one token)."""
    captions = [row["caption"] for row in pairs.rows[:n]] if hasattr(pairs, "rows") else pairs.captions(n)
    share = tokenizer.unknown_share(captions)
    print0(f"toy tokenizer: {share:.1%} of the tokens of {len(captions)} training captions are unknown", rank=rank)
    if share > 0.5:
        raise ValueError(f"{cfg['train_data']}: {share:.0%} of the caption tokens are outside the toy vocabulary of "
                         f"--student={cfg['student']}; use BPE models: --student=small-teacher (train a teacher first, "
                         "--kd=none) then --student=small-student, or mobileclip2-s0 or an open_clip JSON, with "
                         "--bpe=bpe_simple_vocab_16e6.txt.gz (README, Porting to your modality)")


# --- models ---
def load_teacher(cfg, device, weights=True):
    """Frozen, eval mode: a train.py checkpoint carries its config; raw weights need --teacher_config. weights=False:
    built on the meta device, its sizes and preprocessing only (a complete --teacher_cache never loads the teacher)."""
    model, _, _ = evaluation.load_model_and_tokenizer_kind(cfg["teacher"], cfg["teacher_config"] or None, weights)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval() if weights else model


def build_student(cfg, config=None):
    """--student initialised from --student_init; at a resume (config: the checkpoint's model_config) the checkpoint's
    architecture, whose weights come next, so that neither file is read again (they may have moved)."""
    model = models.build_model(config or cfg["student"])
    if config:
        return model
    if cfg["student_init"]:
        models.load_checkpoint(model, cfg["student_init"])
    elif tokenizer_kind(model) == "toy":
        init_toy_numbers(model)
    return model


def init_toy_numbers(model, frequencies=4, seed=0):
    """Start a toy text tower's number tokens (ages in weeks, pixel spacings) with embeddings in the order of their
    values, in place: cos and sin of pi * k * v (v the value scaled to [0, 1] within its family; k = 1..K, one
    frequency per 4 values, at most `frequencies`: 4 for the 31 weeks, 1 for the 4 spacings, so that similarity falls
    with distance; 4 puts a week's nearest neighbours at cosine 0.85 and weeks six apart at 0) through a fixed random
    projection [2K, width], scaled to the init's std 0.02. Toy-vocabulary models only. A CLIP text tower
    learns the order of number tokens from co-occurrence alone, far slower than a CPU run allows; FetalCLIP's and
    MobileCLIP2's came pretrained, knowing that 24 is near 25 (measured: toy teacher GA validity 31% -> 68% on the
    validation split, one seed each). Nothing here says what an age looks like: that still comes from the pixels."""
    emb, ids = (model.text if model.custom_text else model).token_embedding.weight, data.ToyTokenizer().ids
    g = torch.Generator().manual_seed(seed)
    for family in (data.TOY_WEEKS, data.TOY_SPACINGS):
        v = torch.tensor([float(w) for w in family], dtype=torch.float64)
        v = (v - v.min()) / (v.max() - v.min())
        k = torch.arange(1, min(frequencies, len(family) // 4) + 1, dtype=torch.float64)
        feats = torch.cat([torch.cos(torch.pi * k * v[:, None]), torch.sin(torch.pi * k * v[:, None])], 1)
        proj = torch.randn(len(feats[0]), emb.shape[1], generator=g, dtype=torch.float64)
        with torch.no_grad():
            emb[[ids[w] for w in family]] = (0.02 * feats @ proj / len(k) ** 0.5).to(emb.dtype)


def make_tokenizer(cfg, student, ckpt=None):
    """The student's tokenizer. A BPE vocabulary: the copy the run's own checkpoint (ckpt, at a resume) or a train.py
    teacher checkpoint carries, else --bpe, else $DARK_BPE or open_clip's (data._find_bpe); the student's checkpoints
    then carry it too. With --kd=none the teacher is not used, yet its copy still serves when --bpe is not given: a
    No KD run needs no flag its distilled sibling does not."""
    vocab = ckpt and ckpt.get("bpe_vocab")
    if (not vocab and tokenizer_kind(student) == "bpe" and Path(cfg["teacher"]).is_file()
            and (cfg["kd"] != "none" or not cfg["bpe"])):
        vocab = models.read_checkpoint(cfg["teacher"], mmap=True)  # the vocabulary only: no config needed
        vocab = vocab.get("bpe_vocab") if isinstance(vocab, dict) else None
    return data.get_tokenizer(tokenizer_kind(student), student.context_length, vocab or cfg["bpe"] or None)


def tokenizer_kind(model):
    return "toy" if model.config["text_cfg"]["vocab_size"] == data.TOY_VOCAB_SIZE else "bpe"


def make_optimizer(model, cfg):
    """AdamW; no weight decay on parameters with ndim < 2 (norms, biases, logit_scale), as open_clip's rule (which
    decays the MCi layer scales, [C, 1, 1], like any weight)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]), eps=cfg["adam_eps"],
                             fused=fused or None)


# --- stored teacher embeddings (--teacher_cache) ---
def cache_header(cfg, spec, pairs):
    """What stored teacher embeddings depend on (a cache made for other values is refused, naming the field). Data:
    the toy world's version and size, a CSV's bytes, or the shards' names and sizes (hashing every image would cost
    a pass)."""
    tar = isinstance(pairs, data.TarShards)
    if tar:
        source = sorted([pairs.names[s], os.path.getsize(s)] for s in pairs.shards)
    elif cfg["train_data"] == "toy":  # the protocol's version names the toy world: a cache of an older one is refused
        source = f"toy world ({evaluation.PROTOCOL}), {len(pairs)} pairs at {pairs.size} px"
    else:
        source = (f"caption CSV sha256 {data.sha256_file(cfg['train_data'])}, images under "
                  f"{cfg['image_root'] or 'its folder'}")
    return dict(format=1, teacher_sha256=data.sha256_file(cfg["teacher"]),
                teacher_config=identity(cfg["teacher_config"]),
                teacher_image_size=spec.image_size, teacher_mean=spec.image_mean, teacher_std=spec.image_std,
                embed_dim=spec.config["embed_dim"], tokenizer=tokenizer_kind(spec), context_length=spec.context_length,
                augment=data.AUGMENT if cfg["augment"] else "off", seed=cfg["seed"], data=source,
                cache_views=cfg["cache_views"] if cfg["augment"] else 1,  # unaugmented views are all the same
                **({} if tar else dict(pairs=len(pairs))))  # tar shards: counted when the cache is made


def fill_cache(cfg, header, view, tokenizer, pairs, rank, world, dev, autocast):
    """Open --teacher_cache and store what it lacks, running the teacher (loaded only then) over every pair, K views
    each, batch_size images a forward; a killed pass resumes where it stopped. Ranks share the pass: rank r stores
    every world-th batch of pairs (of tar shards, every world-th shard) into the same files, then all meet."""
    root, tar = Path(cfg["teacher_cache"]), isinstance(pairs, data.TarShards)
    if rank == 0 and not (root / "header.json").exists():
        data.TeacherCache.create(root, header, pairs.keys() if tar else None)
    barrier()
    cache = data.TeacherCache(root, header)
    k, n = cache.header["cache_views"], len(cache.done)
    if cache.complete:
        print0(f"teacher cache {root}: {n} pairs x {k} views; the teacher is not loaded", rank=rank)
        return cache
    teacher, per_batch = load_teacher(cfg, dev), max(1, cfg["batch_size"] // k)  # a forward of ~batch_size images
    collate = data.Collate(data.DistillTransform(view, augment=cfg["augment"]), tokenizer, (cfg["seed"], None, k))
    # this rank's batches in a fixed order (tar shards unshuffled), so that a resumed pass sees the same batches
    chunks = [range(i, min(i + per_batch, n)) for i in range(rank * per_batch, n, world * per_batch)]
    batching = dict(batch_size=per_batch) if tar else dict(batch_sampler=[c for c in chunks if not cache.done[c].all()])
    reader = data.TarShards(cfg["train_data"], skip_bad=cfg["skip_bad"]).shard_by(rank, world) if tar else pairs
    loader = torch.utils.data.DataLoader(reader, **batching, num_workers=cfg["workers"], collate_fn=collate)
    with torch.no_grad(), autocast:  # the teacher's forward as in an online step
        cache.fill(loader, lambda images, ids: (teacher.encode_image(images.to(dev), normalize=True).float().cpu(),
                                                teacher.encode_text(ids.to(dev), normalize=True).float().cpu()), rank)
    barrier()
    if rank == 0:
        cache.finish(teacher.logit_scale.exp().item())
    barrier()
    return cache


def write_failure(path, e, written=0):
    """Why a write to path failed, for an error message: no space left, or a file too large (ENOSPC and EFBIG; for
    torch.save's zip writer, which says only 'unexpected pos', told apart by the space left and the size limit after
    `written` bytes), else e's own first line."""
    free, code = shutil.disk_usage(Path(path).parent).free, getattr(e, "errno", None)
    limit = -1  # no size limit: RLIM_INFINITY
    if os.name == "posix":
        import resource  # Unix only
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.ENOSPC or code is None and free < 2**20:
        return f"no space left on its disk ({free} bytes free)"
    if code == errno.EFBIG or code is None and 0 <= limit <= written:
        return f"file too large for its file system or the size limit (ulimit -f) after {written} bytes"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def save_atomic(obj, path, step=None, then=""):
    """Write obj (torch.save's; a str as text) to a temp file beside path, then rename: a run killed mid-write never
    leaves a truncated file. A write that fails (a full disk, a file too large) removes the temp file, leaves any
    earlier file at path as it was, and raises OSError naming path, the step, the cause, then `then`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(obj) if isinstance(obj, str) else torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer raises RuntimeError "... unexpected pos ..."
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}" + (f" at step {step}" if step is not None else "") +
                      f": {write_failure(path, e, written)}; any earlier {path.name} is kept. {then}") from e


def val_setup(cfg):
    """-> (eval.evaluate's arguments for the validation data, the metric that picks best.pt); (None, None) when
    nothing validates (best.pt is then the last step)."""
    if cfg["val_prompts"] and (not cfg["val_data"] or Path(cfg["val_data"]).is_dir()):
        raise ValueError(f"--val_prompts is for a labelled CSV --val_data, not {cfg['val_data'] or 'none'!r}")
    if not cfg["val_data"]:
        return (dict(task="toy", split="val", n=cfg["val_size"]), "composite") if cfg["train_data"] == "toy" else (
            None, None)
    if Path(cfg["val_data"]).is_dir():  # FETAL_PLANES_DB's Train=1 rows: never the test rows the paper reports
        return dict(task="paper", split="train", root=cfg["val_data"]), "class_f1"  # planes and brain
    args = dict(root=cfg["val_data"], csv={k: v for k, v in cfg.items() if k.startswith("csv_")})
    if cfg["val_prompts"]:
        return dict(args, task="classify", prompts={"classify": data.load_prompts(cfg["val_prompts"])}), "classify_f1"
    return dict(args, task="retrieval"), "retrieval_mean_recall"


def validate(model, tokenizer, cfg, device):
    """Zero-shot metrics for model selection, on data never reported as a test result."""
    args, _ = val_setup(cfg)
    return evaluation.evaluate(model, tokenizer, **args, device=device) if args else {}


def check_val_data(cfg):
    """Read the validation data now, so that a wrong path or column, a label without prompts, or data without a usable
    row for a task that validate() runs fails before training, not after it."""
    args, _ = val_setup(cfg)
    if args and args["task"] != "toy":
        try:
            records, _ = evaluation.task_records(**args)
        except ValueError as e:  # e.g. a FETAL_PLANES_DB whose rows are all Train=0
            raise ValueError(f"--val_data={args['root']} cannot select the model: {e}"
                             + " (validation uses the Train=1 rows)" * Path(args["root"]).is_dir()) from e
        if not isinstance(records, list) and not data.TarShards(args["root"]).keys():  # shards: streamed later
            raise ValueError(f"--val_data={args['root']}: the shards hold no image-caption pairs")


# --- the loop ---
def train(cfg):
    """One training run (teacher pretraining or distillation). Returns the path of the best checkpoint."""
    ddp, rank, world, dev = compute_init(cfg)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cfg["workers"] > cpus:  # said once here, rather than by torch at every DataLoader
        print0(f"--workers={cfg['workers']}: this process may use {cpus} CPUs, so {cpus} workers", rank=rank)
        cfg = {**cfg, "workers": cpus}
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

    ckpt_path = out / "ckpt.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if cfg["resume"] else None  # it is there
    student = build_student(cfg, ckpt and ckpt["model_config"]).to(dev)
    cached = bool(cfg["teacher_cache"]) and cfg["kd"] != "none"  # then the teacher runs in the caching pass, if at all
    teacher = load_teacher(cfg, dev) if cfg["kd"] != "none" and not cached else None
    spec = load_teacher(cfg, dev, weights=False) if cached else teacher or student  # the teacher's shapes
    tokenizer = make_tokenizer(cfg, student, ckpt)
    if (tokenizer_kind(spec), spec.context_length) != (tokenizer_kind(student), student.context_length):
        raise ValueError(f"teacher ({tokenizer_kind(spec)}, {spec.context_length}) and student ({tokenizer_kind(student)},"
                         f" {student.context_length}) must share the tokenizer and context length: the same ids feed both")
    views = [(m.image_size, m.image_mean, m.image_std) for m in (spec, student)]  # each its own
    roles = (("teacher", spec), ("student" if teacher is not None or cached else "model", student))
    for role, m in roles[spec is student:]:
        print0(f"{role} input: {m.image_size} px, mean {m.image_mean}, std {m.image_std}; images are padded to a "
               "centred black square, then resized (data.pad_square)", rank=rank)  # for training, eval and Core ML
    pairs = make_pairs(cfg, max(student.image_size, spec.image_size), rank, world)
    if tokenizer_kind(student) == "toy" and cfg["train_data"] != "toy":
        check_vocabulary(tokenizer, pairs, cfg, rank)
    # tar shards have no length: --samples_per_epoch, or a count of their pairs from the tar headers
    n_pairs = len(pairs) if hasattr(pairs, "__len__") else cfg["samples_per_epoch"] or len(pairs.keys())
    steps_per_epoch, total_steps = plan_steps(n_pairs, cfg, world)
    plan = dict(ranks=world, batch_size=cfg["batch_size"], pairs=n_pairs, steps_per_epoch=steps_per_epoch,
                total_steps=total_steps)
    was = ckpt.get("plan") if ckpt else None  # configure() checked the global batch; the data may have changed
    if was and (was["pairs"], was["steps_per_epoch"]) != (n_pairs, steps_per_epoch):
        raise ValueError(f"--resume=true: {cfg['train_data']} now gives {n_pairs} pairs, {steps_per_epoch} steps an "
                         f"epoch; the run had {was['pairs']}, {was['steps_per_epoch']}: resume it on the data it "
                         "trained on, or start a new run")
    check_val_data(cfg)
    cache = fill_cache(cfg, cache_header(cfg, spec, pairs), views[0], tokenizer, pairs, rank, world, dev,
                       autocast) if cached else None
    transform = data.DistillTransform(*views[cached:], augment=cfg["augment"])  # cached: the student's view only
    optimizer = make_optimizer(student, cfg)
    model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[dev] if cuda else None) if ddp else student
    gather = AllGather.apply if ddp else (lambda x: x)  # [B, D] -> [world * B, D]

    step, best = 0, -math.inf
    files = {k: identity(cfg[k]) for k in FILE_KEYS} if rank == 0 else None  # what a resume accepts at a new path
    if ckpt is not None:
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
                         bpe_vocab=getattr(tokenizer, "vocab_file", None),  # the checkpoint carries its tokenizer
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, best_val=best, config=cfg,
                         plan=plan, files=files,
                         rng=dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if cuda else None)),
                    path, step, last_good())

    def last_good():  # a non-finite step or a failed write stops the run; what is on disk is what was good
        return f"stopping. The last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none yet'}"

    for stale in ("ckpt.pt", "best.pt", "results.md") if rank == 0 and not cfg["resume"] else ():
        (out / stale).unlink(missing_ok=True)  # a new run, past every start-up check (configure() asked first)
    log = open(out / "log.jsonl", "a" if cfg["resume"] else "w") if rank == 0 else None

    def log_row(row):
        try:
            log.write(json.dumps(row) + "\n")
            log.flush()
        except OSError as e:
            raise OSError(f"cannot write {out / 'log.jsonl'} at step {step}: {write_failure(log.name, e)}; "
                          + last_good()) from e
    n_params = sum(p.numel() for p in student.parameters())
    select_on = val_setup(cfg)[1]
    print0(recipe_line(cfg), rank=rank)
    if cfg["kd"] == "none":  # no teacher: a CLIP model of its own
        print0(f"kd=none: CLIP loss alone, no teacher; this trains a teacher to distil from (--teacher="
               f"{out / 'best.pt'}), or the No KD row", rank=rank)
    print0(f"training {cfg['student']} ({n_params / 1e6:.2f}M params) kd={cfg['kd']} for {total_steps} steps "
           f"({cfg['epochs']} epochs x {steps_per_epoch} from {n_pairs} pairs; {cfg['warmup_steps']} warm-up) on "
           f"{world} x {dev}, global batch {cfg['batch_size']} x {world} ranks x {cfg['grad_accum']} micro-batches; "
           "best.pt: "
           + (f"best validation {select_on}" if select_on else "the last step (no --val_data)"), rank=rank)
    t0, seen = time.time(), 0
    model.train()
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        replay = (cfg["seed"], epoch, cache.header["cache_views"]) if cached else None  # the stored views
        batches = epoch_batches(pairs, data.Collate(transform, tokenizer, replay), cfg, epoch, rank, world,
                                start=first * cfg["grad_accum"])
        for _ in range(first, steps_per_epoch):
            lr, weight = lr_at(step, total_steps, cfg["lr"], cfg["warmup_steps"]), kd_weight(cfg, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg["grad_accum"]):
                batch = next(batches)
                s_view, ids = batch["image"][-1].to(dev, non_blocking=True), batch["ids"].to(dev, non_blocking=True)
                sync = nullcontext() if not ddp or micro == cfg["grad_accum"] - 1 else model.no_sync()
                with sync:
                    with autocast:
                        img, txt, scale = model(s_view, ids)
                        t_img = t_txt = t_scale = None
                        if teacher is not None:
                            with torch.no_grad():
                                t_img, t_txt, t_scale = teacher(batch["image"][0].to(dev, non_blocking=True), ids)
                    if cached:  # the stored view's embeddings, the pair's caption's, the teacher's scale
                        t_img, t_txt, t_scale = (x.to(dev) for x in cache.read(batch))
                    if t_img is not None:  # the teacher's columns are targets: gathered without a graph
                        t_img, t_txt = gather(t_img), gather(t_txt)
                    rows = slice(rank * len(ids), (rank + 1) * len(ids))  # this rank's rows of the global batch
                    losses = dark.dark_loss(gather(img), gather(txt), scale, t_img, t_txt,
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
                    log_row(row)
            end_of_epoch = step % steps_per_epoch == 0
            done = step // steps_per_epoch  # epochs done: validate every val_every of them, and after the last
            if rank == 0 and end_of_epoch and (done % cfg["val_every"] == 0 or done == cfg["epochs"]):
                metrics = validate(student, tokenizer, cfg, dev)
                if metrics:
                    shown = ("planes_f1", "brain_f1", "class_f1", "ga_validity", "composite", "classify_acc",
                             "classify_f1", "retrieval_i2t_r1", "retrieval_t2i_r1", "retrieval_mean_recall")
                    score = metrics[select_on]
                    print0(f"val epoch {done}/{cfg['epochs']} "
                           + " ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics) +
                           f"; best.pt on {select_on} (best so far {max(best, score):.4f})")
                    log_row(dict(step=step, epoch=epoch + 1, select_on=select_on, **{
                        f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}))
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
    barrier()
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
    rows, configs, speeds = [], {}, []
    for name, path in checkpoints:
        configs[name] = models.read_checkpoint(path, mmap=True).get("config")  # the run's recipe (raw weights: none)
        raw_config = cfg["teacher_config"] if path == cfg["teacher"] else None  # a teacher of raw (or jit) weights
        model, tokenizer = evaluation.load_model_from_checkpoint(path, raw_config or None)
        metrics = evaluation.evaluate(model, tokenizer, task="toy", split="test")
        speeds.append(speed := evaluation.speed(model, runs=10))
        rows.append(dict(model=name, params_M=sum(p.numel() for p in model.parameters()) / 1e6,
                         image_params_M=sum(p.numel() for p in model.visual.parameters()) / 1e6,
                         image_ms=speed.get("image_ms_folded", speed["image_ms"]), **{k: metrics[k] for k in (
                             "planes_f1", "brain_f1", "ga_validity", "composite")}))
    base = trivial(cfg)
    rows.append(dict(model="no image: uniform guess, median age", **base, composite=evaluation.composite(
        evaluation.class_f1(base["planes_f1"], base["brain_f1"]), base["ga_validity"])))
    table = evaluation.markdown_table(rows, list(rows[0]))
    print("\nzero-shot on the toy test split (image_ms: CPU, batch 1, reparameterized where foldable)\n" + table +
          f"\nthe median age at each stated pixel spacing, no image: validity {base['ga_validity_spacing_only']:.2f}%"
          + evaluation.noise_warning(speeds))
    for name, text in (("results.md", table), ("results.json", json.dumps(dict(rows=rows, configs=configs), indent=1))):
        save_atomic(text + "\n", Path(cfg["out_dir"], name), then=f"The checkpoints in {cfg['out_dir']} are kept")
    return rows


def interrupted(run, cfg):
    """The one line that Ctrl-C leaves: the last checkpoint and the command that resumes it."""
    if run is not cfg:
        return "interrupted while pretraining the toy teacher: only a finished one is kept, so run the same command"
    ckpt = Path(cfg["out_dir"]) / "ckpt.pt"
    if not ckpt.is_file():
        return f"interrupted before the first checkpoint in {cfg['out_dir']}: nothing to resume; run the same " \
               "command with --overwrite=true"
    name, _, _, world = launch_info()
    launcher = dict(torchrun=f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE')}",
                    srun=f"srun --ntasks={world} python", mpirun=f"mpirun -np {world} python").get(name, "python")
    return f"interrupted. The last checkpoint is {ckpt}; resume with: {launcher} train.py --resume=true " \
           f"--out_dir={cfg['out_dir']}"


def main(argv):
    rank = launch_info()[1]  # under a launcher every rank runs this; rank 0 does the talking
    try:
        cfg = configure(argv)
    except SystemExit as e:
        sys.exit(e.code if rank == 0 else 1)
    t0, run = time.time(), cfg
    try:
        if cfg["kd"] != "none" and toy_teacher_missing(cfg):
            # the same loop pretrains the toy teacher: CLIP loss only, teacher preset, its own folder; only a finished
            # pretraining becomes --teacher, so a run killed half-way starts it again instead of reusing a weak one
            print0(f"no teacher at {cfg['teacher']}: pretraining the toy teacher first", rank=rank)
            run = {**cfg, **TOY_TEACHER, "out_dir": str(Path(cfg["teacher"]).parent / "pretrain"), "resume": False}
            built = train(run)
            if rank == 0:
                os.replace(built, cfg["teacher"])
            barrier()
        run = cfg
        best = train(cfg)
        if rank == 0 and cfg["train_data"] == "toy":
            report([("teacher", cfg["teacher"])] * (cfg["kd"] != "none") + [(f"student ({cfg['kd']})", best)], cfg)
    except KeyboardInterrupt:  # each rank gets the signal; rank 0 says it once, without a traceback
        sys.exit(interrupted(run, cfg) if rank == 0 else 130)
    except (OSError, FloatingPointError) as e:  # a full disk, a non-finite step: the message names the last good file
        print0(f"train.py: {e}", rank=rank, file=sys.stderr)
        sys.exit(2)
    print0(f"done in {(time.time() - t0) / 60:.1f} min", rank=rank)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    data.run_script(main, "train.py")
