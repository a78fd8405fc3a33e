"""Pretrain VirTex.

    python train.py                                             # demo: toy world, small model, CPU
    torchrun --nproc_per_node=8 train.py --data datasets/coco   # the paper's run
    python train.py --benchmark --batch-size 32                 # speed of the training step

Rerunning the same command with the same --out resumes from its last.pt, exactly.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import probe
import virtex

LOSSES = ("loss", "loss_forward", "loss_backward")
RUNTIME = ("workers", "amp", "channels_last", "compile")  # may change when a run resumes

# The demo: what learns in a few minutes on two CPU cores (README: "The toy world").
TOY = dict(backbone="resnet18", image_size=64, crop_scale=0.5, hidden=256, vocab_size=128,
           batch_size=64, workers=1, optimizer="adamw", lr=1e-3, cnn_lr=1e-3, weight_decay=1e-2,
           warmup=100, iterations=1000, checkpoint_every=500, out="runs/toy")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Without --data (the demo) these replace the defaults: "
                                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in TOY.items()))
    d = virtex.Config()
    io = p.add_argument_group("input and output")
    io.add_argument("--data", help="COCO Captions folder (annotations/, train2017/, val2017/); default: the toy world")
    io.add_argument("--voc", help="VOCdevkit/VOC2007 folder: probe every checkpoint, keep the best as best.pt")
    io.add_argument("--vocab", help="SentencePiece model to use (default: build one from the train captions)")
    io.add_argument("--out", default="runs/virtex", help="output folder (default: runs/virtex, runs/toy for the demo)")
    io.add_argument("--toy-dir", default="data/toy", help="where the toy world is generated (default: data/toy)")
    model = p.add_argument_group("model (the paper's best: R-50, L1 H2048)")
    model.add_argument("--task", default=d.task, choices=virtex.TASKS, help=f"pretraining task (default: {d.task})")
    model.add_argument("--backbone", default=d.backbone, help=f"torchvision ResNet (default: {d.backbone})")
    model.add_argument("--layers", type=int, default=d.layers, help=f"decoder layers (default: {d.layers})")
    model.add_argument("--hidden", type=int, default=d.hidden, help=f"decoder width H (default: {d.hidden})")
    model.add_argument("--heads", type=int, help="attention heads (default: H/64)")
    model.add_argument("--feedforward", type=int, help="feedforward width (default: 4H)")
    model.add_argument("--norm-first", action="store_true", help="pre-norm decoder layers (default: post-norm)")
    model.add_argument("--dropout", type=float, default=d.dropout, help=f"(default: {d.dropout})")
    model.add_argument("--vocab-size", type=int, help=f"(default: {d.vocab_size}, or the size of --vocab)")
    model.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens per caption (default: {d.max_length})")
    data = p.add_argument_group("images and batches")
    data.add_argument("--image-size", type=int, default=d.image_size, help=f"(default: {d.image_size})")
    data.add_argument("--crop-scale", type=float, default=d.crop_scale, help=f"smallest random crop area (default: {d.crop_scale})")
    data.add_argument("--max-images", type=int, help="pretrain on N images only, the same N for every task (default: all)")
    data.add_argument("--batch-size", type=int, default=d.batch_size, help=f"global batch (default: {d.batch_size})")
    data.add_argument("--workers", type=int, default=d.workers, help=f"loader processes per GPU (default: {d.workers})")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"], help=f"inside LookAhead (default: {d.optimizer})")
    opt.add_argument("--lr", type=float, default=d.lr, help=f"LR of the textual head (default: {d.lr})")
    opt.add_argument("--cnn-lr", type=float, default=d.cnn_lr, help=f"LR of the CNN (default: {d.cnn_lr})")
    opt.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default: {d.momentum})")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    opt.add_argument("--lookahead-k", type=int, default=d.lookahead_k, help=f"(default: {d.lookahead_k})")
    opt.add_argument("--lookahead-alpha", type=float, default=d.lookahead_alpha, help=f"(default: {d.lookahead_alpha})")
    opt.add_argument("--clip-grad", type=float, default=d.clip_grad, help=f"max gradient norm (default: {d.clip_grad})")
    opt.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warmup iterations (default: {d.warmup})")
    opt.add_argument("--iterations", type=int, default=d.iterations, help=f"(default: {d.iterations})")
    opt.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    speed = p.add_argument_group("speed (none of these changes the maths beyond rounding)")
    speed.add_argument("--amp", default=d.amp, choices=["bf16", "fp16", "off"], help=f"mixed precision where native (default: {d.amp})")
    speed.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW activations")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    run = p.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=positive, default=2000, help="checkpoint + evaluate (default: 2000)")
    run.add_argument("--log-every", type=positive, default=20, help="(default: 20)")
    run.add_argument("--stop-after", type=positive, help="stop after this iteration as if preempted; rerun to resume")
    run.add_argument("--benchmark", nargs="?", const="step", choices=["step", "loader"],
                     help="time the training step on a synthetic batch, or the data loader, and exit")
    return p


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of iterations >= 1, not {text!r}")
    return int(text)


def parse_args(argv=None):
    """Parse; without --data the toy preset replaces the paper's defaults (explicit flags still win)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.benchmark:
        parser.set_defaults(iterations=20)
    elif args.data is None:
        parser.set_defaults(**TOY)
    return parser.parse_args(argv)


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


# ----------------------------------------------------------------------------------------------
# One training step, and the speed features around it (each says what it buys)

def prepare(model, cfg, device, distributed):
    """The module to train with: channels_last, compiled, DDP-wrapped as configured."""
    if cfg.channels_last:  # NHWC: cuDNN's tensor-core convolutions (and oneDNN's on CPU) run without transposes
        model.to(memory_format=torch.channels_last)
    if cfg.compile:  # fuses the pointwise ops around the matmuls; compiled before DDP so DDP sees the graph
        model = torch.compile(model)
    if distributed:  # every parameter is used in every step: a static graph lets DDP overlap more
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, static_graph=True, gradient_as_bucket_view=True)
    return model


def train_step(model, optimizer, scaler, images, tokens, lengths, step, cfg):
    """One iteration after `step` optimizer steps: (grad norm, losses...) as a tensor, no sync."""
    virtex.set_lr(optimizer, step, cfg)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with virtex.autocast(images.device, cfg.amp):  # bf16: half the memory traffic, the fast units
        output = model(images, tokens, lengths)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(output["loss"]).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad, foreach=True)
    scaler.step(optimizer)  # with fp16, a step with inf/nan gradients is skipped (LookAhead's counter too)
    scaler.update()
    return torch.stack([grad_norm, *(output[k].detach().float() for k in LOSSES if k in output)])


# ----------------------------------------------------------------------------------------------

def main(args):
    # -- processes: plain python, or torchrun (NCCL on GPUs, gloo on CPUs) -----------------------
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    control = dist.new_group(backend="gloo") if distributed else None  # CPU-side: agreeing to stop costs no GPU sync
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest convolution once
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.benchmark:
        return benchmark(args, device)

    # -- data and vocabulary -------------------------------------------------------------------
    demo = args.data is None
    for flag, folder in (("--data", args.data), ("--voc", args.voc)):
        if folder is not None and not Path(folder).is_dir():
            raise SystemExit(f"error: {flag} {folder} is not a folder")
    if demo:
        toy = Path(args.toy_dir)
        if rank == 0:
            virtex.make_toy_world(toy)
        barrier()
        args.data, args.voc = toy / "coco", args.voc or toy / "voc" / "VOCdevkit" / "VOC2007"
    if args.voc:  # fail now, not at the first checkpoint hours later
        probe.read_voc(args.voc, "trainval"), probe.read_voc(args.voc, "test")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = vocabulary(args, out, rank)
    cfg = virtex.Config.from_dict({**vars(args), "vocab_size": len(tokenizer)})
    train_data = virtex.CocoCaptions(args.data, "train", tokenizer, cfg)
    val_data = virtex.CocoCaptions(args.data, "val", tokenizer, cfg, train=False)
    if cfg.task == "multilabel_classification":  # predicts COCO categories, not words
        cfg = dataclasses.replace(cfg, vocab_size=train_data.classes + 1)

    # -- model and optimizer (the same initial weights in every process and every rerun) ---------
    torch.manual_seed(cfg.seed)
    raw_model = virtex.VirTex(cfg).to(device)
    optimizer = virtex.build_optimizer(raw_model, cfg, fused=device.type == "cuda")  # fused: one kernel per step
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.amp == "fp16")
    start, best_map = 0, -1.0
    if (out / "last.pt").exists():
        checkpoint = virtex.load_checkpoint(out / "last.pt")
        missing = [k for k in ("model", "optimizer", "iteration", "config", "vocab") if k not in checkpoint]
        if missing:
            raise SystemExit(f"error: {out}/last.pt is not a train.py checkpoint (no {', '.join(missing)}); use another --out")
        changed = [k for k, v in checkpoint["config"].items() if k not in RUNTIME and getattr(cfg, k, v) != v]
        changed += ["vocabulary"] if checkpoint["vocab"] != tokenizer.model else []
        if changed:
            raise SystemExit(f"error: {out}/last.pt was trained with other settings ({', '.join(changed)}); use another --out")
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint.get("scaler", {}))
        start = checkpoint["iteration"]
        if (out / "best.pt").exists():
            best_map = virtex.load_checkpoint(out / "best.pt")["voc_map"]
        print0(f"resuming {out}/last.pt at iteration {start}")
    stop = min(args.stop_after or cfg.iterations, cfg.iterations)
    if start >= stop:
        return print0(f"{out}/last.pt is at iteration {start}: nothing to do")
    model = prepare(raw_model, cfg, device, distributed)
    loader = torch.utils.data.DataLoader(
        train_data, batch_sampler=virtex.Stream(len(train_data), cfg.batch_size, cfg.seed, start, stop, rank, world),
        num_workers=cfg.workers, collate_fn=virtex.collate, pin_memory=device.type == "cuda",
        worker_init_fn=ignore_interrupts)

    # -- the loop ------------------------------------------------------------------------------
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=cfg.iterations, initial=start, disable=rank != 0, dynamic_ncols=True)
    history, skipped, reported, tick = [], [], set(), time.perf_counter()
    model.train()
    with preemption() as preempted:
        for iteration, (images, tokens, lengths, unreadable) in enumerate(loader, start + 1):
            skipped += unreadable
            images, tokens, lengths = (t.to(device, non_blocking=True) for t in (images, tokens, lengths))
            torch.manual_seed(cfg.seed * 1_000_003 + iteration * 1009 + rank)  # dropout: a function of the step too
            history.append(train_step(model, optimizer, scaler, images, tokens, lengths, iteration - 1, cfg))
            bar.update()

            signalled = any_rank(preempted, control)
            end = iteration == stop or signalled
            checkpoint_now = end or iteration % args.checkpoint_every == 0
            if iteration % args.log_every == 0 or checkpoint_now:
                steps = torch.stack(history).cpu()  # (steps, 1 + losses): one sync per log interval, not per step
                finite = steps.isfinite()
                finite[:, 0] |= scaler.is_enabled()  # fp16: the scaler skips steps with inf gradients, as it should
                if not finite.all():  # a non-finite gradient or loss: stop before it reaches a checkpoint
                    bad = iteration - len(steps) + 1 + int((~finite.all(1)).nonzero()[0])
                    raise SystemExit(f"error: non-finite loss at iteration {bad}; last good checkpoint: {out}/last.pt")
                seconds = time.perf_counter() - tick
                mean = steps.where(steps.isfinite(), torch.nan).nanmean(0).tolist()
                factor = virtex.lr_multiplier(iteration - 1, cfg.warmup, cfg.iterations)
                stats = {"iteration": iteration, **dict(zip(("grad_norm", *LOSSES), mean)),
                         "lr": cfg.lr * factor, "cnn_lr": cfg.cnn_lr * factor,
                         "ms_per_step": 1000 * seconds / len(steps), "img_per_s": cfg.batch_size * len(steps) / seconds,
                         "unreadable_images": len(skipped)}
                for problem in sorted(set(skipped) - reported):
                    tqdm.write(f"warning: {problem} (replaced by another image)")
                reported.update(skipped)
                shown = {"loss": "loss", "loss_forward": "fwd", "loss_backward": "bwd"}
                bar.set_postfix({shown[k]: f"{stats[k]:.3f}" for k in LOSSES if k in stats} | {
                    "lr": f"{stats['lr']:.1e}", "cnn_lr": f"{stats['cnn_lr']:.1e}", "img_s": f"{stats['img_per_s']:.0f}"})
                if log:
                    log.write(json.dumps(stats) + "\n")
                    log.flush()
                history, skipped, tick = [], [], time.perf_counter()
            if checkpoint_now:
                evaluation = save_and_evaluate(raw_model, optimizer, scaler, cfg, tokenizer, iteration, best_map,
                                               args, out, val_data, device, rank, world, log, evaluate=not signalled)
                best_map = max(best_map, evaluation.get("voc_map", -1.0))
                tick = time.perf_counter()
            if end:
                break
    bar.close()
    if signalled:
        print0(f"stopped by a signal after iteration {iteration}; rerun the same command to resume")
    elif iteration < cfg.iterations:
        print0(f"stopped after iteration {iteration} (--stop-after); rerun without it to continue")
    elif demo and rank == 0:
        torch.manual_seed(cfg.seed)
        initial = virtex.VirTex(cfg).to(device)  # the very weights training started from
        random_init = probe.voc07(initial.visual, args.voc, cfg.image_size, device).mean().item()
        print(f"toy VOC07 mAP: pretrained {evaluation['voc_map']:.1f} | random init {random_init:.1f}")
    if distributed:
        dist.destroy_process_group()


def vocabulary(args, out, rank):
    """--vocab, else OUT/vocab.model, built by rank 0 from the train captions on the first run."""
    path = Path(args.vocab) if args.vocab else out / "vocab.model"
    if args.vocab and not path.is_file():
        raise SystemExit(f"error: --vocab {path}: no such file")
    if rank == 0 and not path.exists():
        size = args.vocab_size or virtex.Config.vocab_size
        print0(f"building a {size}-token vocabulary from the {args.data} train captions")
        items = virtex.first_images(virtex.read_captions(args.data, "train"), args.max_images)
        virtex.Tokenizer.train((c for _, captions in items for c in captions), out / "vocab", size)
    barrier()
    tokenizer = virtex.Tokenizer(path)
    if args.vocab_size and len(tokenizer) != args.vocab_size:
        raise SystemExit(f"error: {path} has {len(tokenizer)} tokens, not --vocab-size {args.vocab_size}")
    return tokenizer


@contextlib.contextmanager
def preemption():
    """SIGTERM (a scheduler's preemption) or Ctrl-C: finish the step, write last.pt, exit 0."""
    caught = []
    previous = {s: signal.signal(s, lambda *_: caught.append(s)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def any_rank(flag, group):
    """True on every process if it is true on any (ranks must agree to stop at the same step)."""
    if group is None:
        return bool(flag)
    value = torch.tensor([float(bool(flag))])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value.item() > 0


def ignore_interrupts(_):
    """Loader workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Evaluation and checkpoints

@torch.no_grad()
def validate(model, data, cfg, device, rank, world):
    """Teacher-forced val loss, the whole split sharded across processes."""
    model.eval()
    keys = [(i, i) for i in range(rank, len(data), world)]  # seed = index: the same caption every time
    batches = [keys[i:i + cfg.batch_size // world] for i in range(0, len(keys), cfg.batch_size // world)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=cfg.workers, collate_fn=virtex.collate)
    total = torch.zeros(2, device=device)
    for images, tokens, lengths, _ in loader:
        with virtex.autocast(device, cfg.amp):
            loss = model(images.to(device), tokens.to(device), lengths.to(device))["loss"]
        total += torch.stack([loss.float() * len(images), torch.tensor(len(images), device=device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def val_cider(model, data, tokenizer, cfg, device, images=500):
    """CIDEr of beam-search captions of the first val images against all their captions."""
    model.eval()
    keys = [(i, i) for i in range(min(images, len(data)))]
    loader = torch.utils.data.DataLoader(data, batch_sampler=[keys[i:i + 50] for i in range(0, len(keys), 50)],
                                         num_workers=cfg.workers, collate_fn=virtex.collate)
    with virtex.autocast(device, cfg.amp):
        captions = [c for images, *_ in loader for c in model.caption(images.to(device), max_steps=cfg.max_length)]
    model.train()
    candidates = {i: virtex.caption_words(tokenizer.decode(c)) for i, c in enumerate(captions)}
    references = {i: [virtex.caption_words(c) for c in data.items[i][1]] for i in candidates}
    return virtex.cider(candidates, references)[0]


def save_and_evaluate(model, optimizer, scaler, cfg, tokenizer, iteration, best_map, args, out, val_data, device, rank, world, log,
                      evaluate=True):
    """Write last.pt (full state) and, on schedule, a weights-only snapshot (what probing and downstream
    use: a third of the size); then evaluate and keep the best as best.pt. Saving comes first, and a
    preempted run skips evaluating: a scheduler's grace period is spent on the checkpoint."""
    weights = {"model": model.state_dict(), "iteration": iteration, "config": dataclasses.asdict(cfg), "vocab": tokenizer.model}
    if rank == 0:
        virtex.save_checkpoint(out / "last.pt", {**weights, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
        if iteration % args.checkpoint_every == 0:
            virtex.save_checkpoint(out / f"checkpoint_{iteration}.pt", weights)
    if not evaluate:
        return {}
    record = {"iteration": iteration, "val_loss": validate(model, val_data, cfg, device, rank, world)}
    if rank == 0:
        if cfg.task in ("bicaptioning", "captioning"):
            record["val_cider"] = val_cider(model, val_data, tokenizer, cfg, device)
        if args.voc:
            record["voc_map"] = probe.voc07(model.visual, args.voc, cfg.image_size, device, progress=False).mean().item()
        if record.get("voc_map", -1.0) > best_map:
            virtex.save_checkpoint(out / "best.pt", {**weights, **record})
        log.write(json.dumps(record) + "\n")
        log.flush()
        tqdm.write(" | ".join(f"{k} {v:.4g}" for k, v in record.items()))
    barrier()
    return record


# ----------------------------------------------------------------------------------------------
# --benchmark: the training step on a synthetic batch, or the data loader alone

def benchmark(args, device):
    cfg = virtex.Config.from_dict({**vars(args), "vocab_size": args.vocab_size or virtex.Config.vocab_size})
    if args.benchmark == "loader":
        return benchmark_loader(args, cfg)
    torch.manual_seed(cfg.seed)
    raw_model = virtex.VirTex(cfg).to(device)
    optimizer = virtex.build_optimizer(raw_model, cfg, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.amp == "fp16")
    model = prepare(raw_model, cfg, device, distributed=False).train()
    B, T = cfg.batch_size, cfg.max_length
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(4, cfg.vocab_size, (B, T), device=device)  # full-length captions: no padding to skip
    tokens[:, 0], tokens[:, -1] = virtex.SOS, virtex.EOS
    lengths = torch.full((B,), T, device=device)
    step = lambda i: train_step(model, optimizer, scaler, images, tokens, lengths, cfg.warmup + i, cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for i in range(3):  # warm up: kernels chosen, compiled, allocated
        step(i)
    sync()
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    start = time.perf_counter()
    for i in range(cfg.iterations):
        step(i)
    sync()
    seconds = (time.perf_counter() - start) / cfg.iterations
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[virtex.amp_dtype(device, cfg.amp)]
    print(f"{cfg.backbone} L{cfg.layers} H{cfg.hidden} vocab {cfg.vocab_size}, {cfg.image_size} px, batch {B}, {device}, "
          f"{precision}{', channels_last' if cfg.channels_last else ''}{', compiled' if cfg.compile else ''}: "
          f"{1000 * seconds:.1f} ms/step, {B / seconds:.1f} img/s")
    if device.type == "cpu":
        import resource
        return print(f"peak memory (process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GB")
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step(0)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    a @ a
    sync()
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    sync()
    peak = 20 * 2 * 8192 ** 3 / (time.perf_counter() - start)
    achieved = counter.get_total_flops() / seconds
    print(f"{achieved / 1e12:.1f} TFLOP/s of a measured bf16 matmul peak of {peak / 1e12:.0f}: MFU {100 * achieved / peak:.1f}%")


def benchmark_loader(args, cfg):
    """Images per second out of the training DataLoader (decode, augment, tokenise, collate)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else coco_sized_jpegs(Path(tmp) / "coco")
        captions = (c for _, cs in virtex.read_captions(root, "train")[:5000] for c in cs)
        tokenizer = virtex.Tokenizer(args.vocab) if args.vocab else virtex.Tokenizer.train(captions, vocab_size=128)
        data = virtex.CocoCaptions(root, "train", tokenizer, cfg)
        warmup = 2 * max(1, cfg.workers)  # what the workers prefetch while starting: not steady state
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=virtex.Stream(len(data), cfg.batch_size, 0, 0, warmup + cfg.iterations),
            num_workers=cfg.workers, collate_fn=virtex.collate)
        batches = iter(loader)
        for _ in range(warmup):
            next(batches)
        start = time.perf_counter()
        count = sum(len(b[0]) for b in batches)
        seconds = time.perf_counter() - start
    print(f"loader: {count / seconds:.0f} img/s over {cfg.iterations} batches of {cfg.batch_size} "
          f"({cfg.workers} workers, {cfg.image_size} px crops of {args.data or '640x480 toy JPEGs'})")


def coco_sized_jpegs(root, images=512):
    """A COCO Captions folder of 640x480 toy scenes: JPEGs of COCO's size for timing the loader."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    rng, entries = random.Random(0), []
    for i in range(1, images + 1):
        scene, objects = virtex.toy_scene(rng, 480)
        scene.resize((640, 480)).save(root / "train2017" / f"{i:012d}.jpg", quality=90)
        entries.append((i, virtex.toy_captions(rng, objects)))
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i, _ in entries],
        "annotations": [{"id": 5 * i + k, "image_id": i, "caption": c} for i, cs in entries for k, c in enumerate(cs)]}))
    return root


def cli(argv=None):
    try:
        main(parse_args(argv))
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli()
