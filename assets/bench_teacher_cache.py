"""Benchmark of train.py --teacher_cache at the paper's sizes, on the CPU (a script to run, not a test).

    python assets/bench_teacher_cache.py --bpe=bpe_simple_vocab_16e6.txt.gz [--threads=1] [--rounds=5] [--pairs=8]

A `fetalclip` teacher (random weights: they do not change the timings) and a `mobileclip2-s0` student (random init),
batch 8, context 117. Two figures:
1. the caching pass's one-off cost per pair and view: train.fill_cache over toy images rendered at 256 px;
2. one DARK step (student forward and backward, loss, AdamW) with the teacher's embeddings computed online or read
   from that cache, on the same batch and the same views. The two variants alternate within each round, the first
   one switching every round, so load from other processes on a shared machine falls on both alike; medians of the
   wall time and of the process's CPU time (all threads), which a busy machine disturbs less.
"""
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dark  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402


def main(argv):
    opt, _ = data.parse_flags(argv, dict(bpe="", threads=1, rounds=5, pairs=8, views=2), dict(pairs="[8, inf)"), __doc__)
    torch.set_num_threads(opt["threads"])
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    teacher = models.build_model("fetalclip")
    torch.save(dict(model=teacher.state_dict(), model_config=teacher.config, tokenizer="bpe"), tmp / "fetalclip.pt")
    del teacher
    cfg, _ = train.parse_args([f"--teacher={tmp / 'fetalclip.pt'}", "--student=mobileclip2-s0", f"--bpe={opt['bpe']}",
                               f"--toy_train_size={opt['pairs']}", "--batch_size=8", f"--teacher_cache={tmp / 'cache'}",
                               f"--cache_views={opt['views']}", "--workers=0"])
    student = train.build_student(cfg)
    spec = train.load_teacher(cfg, "cpu", weights=False)
    tokenizer = data.get_tokenizer("bpe", student.context_length, cfg["bpe"])
    views = [(m.image_size, m.image_mean, m.image_std) for m in (spec, student)]
    pairs = data.ToyWorld("train", max(spec.image_size, student.image_size), length=opt["pairs"], cache=True)
    for i in range(len(pairs)):  # rendered before the clock starts, as a file reader's decoding is not timed either
        pairs[i]

    start, cpu = time.perf_counter(), time.process_time()
    cache = train.fill_cache(cfg, train.cache_header(cfg, spec, pairs), views[0], tokenizer, pairs, 0, 1, "cpu",
                             nullcontext())
    per_view = [(now - then) / (opt["pairs"] * opt["views"])
                for now, then in ((time.perf_counter(), start), (time.process_time(), cpu))]

    teacher = train.load_teacher(cfg, "cpu")
    batch = data.Collate(data.DistillTransform(*views), tokenizer, (cfg["seed"], 0, opt["views"]))(
        [pairs[i] for i in range(8)])
    t_view, s_view = batch["image"]
    ids = batch["ids"]
    optimizer = train.make_optimizer(student, cfg)
    student.train()

    def online():
        with torch.no_grad():
            return teacher(t_view, ids)

    def step(targets):  # -> (wall s, CPU s)
        t0, c0 = time.perf_counter(), time.process_time()
        img, txt, scale = student(s_view, ids)
        loss = dark.dark_loss(img, txt, scale, *targets(), mode="dark", weight=1.0, tau=5.0)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    times = {"online": [], "cached": []}
    variants = {"online": online, "cached": lambda: cache.read(batch)}
    step(online), step(variants["cached"])  # warm-up
    for r in range(opt["rounds"]):
        for name in (("online", "cached") if r % 2 == 0 else ("cached", "online")):
            times[name].append(step(variants[name]))
        print(f"round {r + 1}: " + ", ".join(f"{name} {times[name][-1][0]:.2f} s wall {times[name][-1][1]:.2f} s CPU"
                                             for name in times), flush=True)
    print(f"\nthreads {opt['threads']}, batch 8, context {student.context_length}, {opt['rounds']} rounds, medians:")
    for i, what in enumerate(("wall", "CPU")):
        on, ca = (statistics.median(t[i] for t in times[name]) for name in ("online", "cached"))
        print(f"step, {what}: teacher online {on:.2f} s, from the cache {ca:.2f} s: {on / ca:.2f}x faster")
    print(f"caching pass: {per_view[0]:.2f} s wall, {per_view[1]:.2f} s CPU per pair and view ({opt['pairs']} pairs "
          f"x {opt['views']} views, teacher forwards of {8 // opt['views'] * opt['views']} images)")
    print(f"cache size: {sum(f.stat().st_size for f in (tmp / 'cache').iterdir())} bytes in {tmp / 'cache'}")


if __name__ == "__main__":
    main(sys.argv[1:])
