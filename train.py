"""Pretrain VirTex.

    python train.py                                             # demo: toy world, small model, CPU
    torchrun --nproc_per_node=8 train.py --data datasets/coco   # the paper's run

Rerunning the same command with the same --out resumes from its last.pt, exactly.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import probe
import virtex

LOSSES = ("loss", "loss_forward", "loss_backward")

# The demo: what learns in a few minutes on two CPU cores (README: "The toy world").
TOY = dict(backbone="resnet18", image_size=64, crop_scale=0.5, hidden=256, heads=4, feedforward=1024, vocab_size=128,
           batch_size=64, workers=1, optimizer="adamw", lr=1e-3, cnn_lr=1e-3, weight_decay=1e-2,
           warmup=100, iterations=1500, checkpoint_every=500)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = virtex.Config()
    # data and output
    p.add_argument("--data", help="COCO Captions folder (annotations/, train2017/, val2017/); default: the toy world")
    p.add_argument("--voc", help="VOCdevkit/VOC2007 folder: probe every checkpoint, keep the best as best.pt")
    p.add_argument("--vocab", help="SentencePiece model to use (default: build one from the train captions)")
    p.add_argument("--out", default="runs/virtex", help="output folder (default: runs/virtex, runs/toy for the demo)")
    p.add_argument("--toy-dir", default="data/toy", help="where the toy world is generated (default: data/toy)")
    # model
    p.add_argument("--task", default=d.task, choices=virtex.TASKS, help=f"pretraining task (default: {d.task})")
    p.add_argument("--backbone", default=d.backbone, help=f"torchvision ResNet (default: {d.backbone})")
    p.add_argument("--layers", type=int, default=d.layers, help=f"decoder layers (default: {d.layers})")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"decoder width H (default: {d.hidden})")
    p.add_argument("--heads", type=int, help="attention heads (default: H/64)")
    p.add_argument("--feedforward", type=int, help="feedforward width (default: 4H)")
    p.add_argument("--norm-first", action="store_true", help="pre-norm decoder layers (default: post-norm)")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"(default: {d.dropout})")
    p.add_argument("--vocab-size", type=int, help=f"(default: {d.vocab_size}, or the size of --vocab)")
    p.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens per caption (default: {d.max_length})")
    # data
    p.add_argument("--image-size", type=int, default=d.image_size, help=f"(default: {d.image_size})")
    p.add_argument("--crop-scale", type=float, default=d.crop_scale, help=f"smallest random crop area (default: {d.crop_scale})")
    p.add_argument("--max-images", type=int, help="pretrain on the first N images only (default: all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"global batch (default: {d.batch_size})")
    p.add_argument("--workers", type=int, default=d.workers, help=f"loader processes per GPU (default: {d.workers})")
    # optimisation
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"], help=f"inside LookAhead (default: {d.optimizer})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"LR of the textual head (default: {d.lr})")
    p.add_argument("--cnn-lr", type=float, default=d.cnn_lr, help=f"LR of the CNN (default: {d.cnn_lr})")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default: {d.momentum})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    p.add_argument("--lookahead-k", type=int, default=d.lookahead_k, help=f"(default: {d.lookahead_k})")
    p.add_argument("--lookahead-alpha", type=float, default=d.lookahead_alpha, help=f"(default: {d.lookahead_alpha})")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help=f"max gradient norm (default: {d.clip_grad})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warmup iterations (default: {d.warmup})")
    p.add_argument("--iterations", type=int, default=d.iterations, help=f"(default: {d.iterations})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    # run
    p.add_argument("--checkpoint-every", type=int, default=2000, help="checkpoint + evaluate (default: 2000)")
    p.add_argument("--log-every", type=int, default=20, help="(default: 20)")
    p.add_argument("--stop-after", type=int, help="stop after this iteration as if preempted; rerun to resume")
    return p


def parse_args(argv=None):
    """Parse; without --data the toy preset replaces the paper's defaults (explicit flags still win)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        parser.set_defaults(**TOY, out="runs/toy")
        args = parser.parse_args(argv)
    return args


def config_of(args, **override):
    names = {f.name for f in fields(virtex.Config)}
    return virtex.Config(**{**{k: v for k, v in vars(args).items() if k in names}, **override})


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


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
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")

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
    vocab = Path(args.vocab) if args.vocab else out / "vocab.model"
    if rank == 0 and not vocab.exists():
        size = args.vocab_size or virtex.Config.vocab_size
        print0(f"building a {size}-token vocabulary from the {args.data} train captions")
        items = virtex.read_captions(args.data, "train")[:args.max_images]
        virtex.Tokenizer.train((c for _, captions in items for c in captions), out / "vocab", size)
    barrier()
    tokenizer = virtex.Tokenizer(vocab)
    if args.vocab_size and len(tokenizer) != args.vocab_size:
        raise SystemExit(f"error: {vocab} has {len(tokenizer)} tokens, not --vocab-size {args.vocab_size}")
    cfg = config_of(args, vocab_size=len(tokenizer))
    train_data = virtex.CocoCaptions(args.data, "train", tokenizer, cfg)
    val_data = virtex.CocoCaptions(args.data, "val", tokenizer, cfg, train=False)
    if cfg.task == "multilabel_classification":  # predicts COCO categories, not words
        cfg = dataclasses.replace(cfg, vocab_size=train_data.classes + 1)

    # -- model and optimizer (the same initial weights in every process and every rerun) ---------
    torch.manual_seed(cfg.seed)
    model = virtex.VirTex(cfg).to(device)
    optimizer = virtex.build_optimizer(model, cfg)
    start, best_map = 0, -1.0
    if (out / "last.pt").exists():
        checkpoint = virtex.load_checkpoint(out / "last.pt")
        changed = [k for k, v in checkpoint["config"].items() if k != "workers" and getattr(cfg, k, v) != v]
        if changed:
            raise SystemExit(f"error: {out}/last.pt was trained with other settings ({', '.join(changed)}); use another --out")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start, best_map = checkpoint["iteration"], checkpoint.get("best_map", -1.0)
        print0(f"resuming {out}/last.pt at iteration {start}")
    raw_model = model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    stop = min(args.stop_after or cfg.iterations, cfg.iterations)
    if start >= stop:
        return print0(f"{out}/last.pt is at iteration {start}: nothing to do")
    loader = torch.utils.data.DataLoader(
        train_data, batch_sampler=virtex.Stream(len(train_data), cfg.batch_size, cfg.seed, start, stop, rank, world),
        num_workers=cfg.workers, collate_fn=virtex.collate, pin_memory=device.type == "cuda",
        worker_init_fn=ignore_interrupts)

    # -- the loop ------------------------------------------------------------------------------
    if rank == 0:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=cfg.iterations, initial=start, disable=rank != 0, dynamic_ncols=True)
    losses, skipped, reported, tick = [], [], set(), time.perf_counter()
    model.train()
    with preemption() as preempted:
        for iteration, (images, tokens, lengths, unreadable) in enumerate(loader, start + 1):
            skipped += unreadable
            images, tokens, lengths = (t.to(device, non_blocking=True) for t in (images, tokens, lengths))
            virtex.set_lr(optimizer, iteration - 1, cfg)
            torch.manual_seed(cfg.seed * 1_000_003 + iteration * 1009 + rank)  # dropout: a function of the step too
            with torch.autocast(**amp):
                output = model(images, tokens, lengths)
            optimizer.zero_grad(set_to_none=True)
            output["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            losses.append(torch.stack([grad_norm, *(output[k].detach() for k in LOSSES if k in output)]))
            bar.update()

            end = iteration == stop or any_rank(preempted, control)
            checkpoint_now = end or iteration % args.checkpoint_every == 0
            if iteration % args.log_every == 0 or checkpoint_now:
                steps = torch.stack(losses).float().cpu()  # (steps, 4): one sync per log interval, not per step
                if not steps.isfinite().all():  # a non-finite gradient or loss: stop before it reaches a checkpoint
                    bad = iteration - len(steps) + 1 + int((~steps.isfinite().all(1)).nonzero()[0])
                    raise SystemExit(f"error: non-finite loss at iteration {bad}; last good checkpoint: {out}/last.pt")
                seconds = time.perf_counter() - tick
                mean = steps.mean(0).tolist()
                stats = {"iteration": iteration, **dict(zip(("grad_norm", *LOSSES), mean)),
                         "lr": optimizer.param_groups[-1]["lr"], "cnn_lr": max(g["lr"] for g in optimizer.param_groups),
                         "ms_per_step": 1000 * seconds / len(steps), "img_per_s": cfg.batch_size * len(steps) / seconds,
                         "unreadable_images": len(skipped)}
                for problem in set(skipped) - reported:
                    tqdm.write(f"warning: {problem} (replaced by another image)")
                reported.update(skipped)
                bar.set_postfix(loss=f"{mean[1]:.3f}", lr=f"{stats['lr']:.2e}", img_s=f"{stats['img_per_s']:.0f}")
                if log:
                    log.write(json.dumps(stats) + "\n")
                    log.flush()
                losses, skipped, tick = [], [], time.perf_counter()
            if checkpoint_now:
                evaluation = save_and_evaluate(raw_model, optimizer, cfg, tokenizer, iteration, best_map, args, out,
                                               val_data, device, rank, world, log)
                best_map = max(best_map, evaluation.get("voc_map", -1.0))
                tick = time.perf_counter()
            if end:
                break
    bar.close()
    if preempted:
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


@torch.no_grad()
def validate(model, data, cfg, device, rank, world):
    """Teacher-forced val loss, the whole split sharded across processes."""
    model.eval()
    keys = [(i, i) for i in range(rank, len(data), world)]  # seed = index: the same caption every time
    batches = [keys[i:i + cfg.batch_size // world] for i in range(0, len(keys), cfg.batch_size // world)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=cfg.workers, collate_fn=virtex.collate)
    total = torch.zeros(2, device=device)
    for images, tokens, lengths, _ in loader:
        loss = model(images.to(device), tokens.to(device), lengths.to(device))["loss"]
        total += torch.stack([loss * len(images), torch.tensor(len(images), device=device)])
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
    captions = [c for images, *_ in loader for c in model.caption(images.to(device), max_steps=cfg.max_length)]
    model.train()
    candidates = {i: virtex.caption_words(tokenizer.decode(c)) for i, c in enumerate(captions)}
    references = {i: [virtex.caption_words(c) for c in data.items[i][1]] for i in candidates}
    return virtex.cider(candidates, references)[0]


def save_and_evaluate(model, optimizer, cfg, tokenizer, iteration, best_map, args, out, val_data, device, rank, world, log):
    """Evaluate, then write last.pt (full state), best.pt and, on schedule, a weights-only snapshot."""
    record = {"iteration": iteration, "val_loss": validate(model, val_data, cfg, device, rank, world)}
    if rank == 0:
        if cfg.task in ("bicaptioning", "captioning"):
            record["val_cider"] = val_cider(model, val_data, tokenizer, cfg, device)
        if args.voc:
            aps = probe.voc07(model.visual, args.voc, cfg.image_size, device, progress=False)
            record["voc_map"] = aps.mean().item()
        weights = {"model": model.state_dict(), "iteration": iteration, "config": asdict(cfg), "vocab": tokenizer.model, **record}
        if record.get("voc_map", -1) > best_map:
            virtex.save_checkpoint(out / "best.pt", weights)
        best_map = max(best_map, record.get("voc_map", -1.0))
        virtex.save_checkpoint(out / "last.pt", {**weights, "optimizer": optimizer.state_dict(), "best_map": best_map})
        if iteration % args.checkpoint_every == 0:
            virtex.save_checkpoint(out / f"checkpoint_{iteration}.pt", weights)
        log.write(json.dumps(record) + "\n")
        log.flush()
        tqdm.write(" | ".join(f"{k} {v:.4g}" for k, v in record.items()))
    barrier()
    return record


def cli(argv=None):
    try:
        main(parse_args(argv))
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli()
