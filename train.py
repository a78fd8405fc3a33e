"""Pretrain VirTex.

    python train.py                                             # demo: toy world, small model, CPU
    torchrun --nproc_per_node=8 train.py --data datasets/coco   # the paper's run
    python train.py --benchmark --batch-size 32                 # speed of the training step
    python train.py --benchmark demo                            # where the demo's time goes

Rerunning the same command with the same --out resumes from its last.pt, exactly.
"""
import argparse
import collections
import dataclasses
import io
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm import tqdm

import probe
import virtex

LOSSES = ("loss", "loss_forward", "loss_backward")
LONGER = ("iterations",)  # may change on resume, as virtex.RUNTIME: "train it longer"

# The demo: what learns in minutes on two CPU cores (README: "The demo").
TOY = dict(backbone="resnet18", image_size=64, crop_scale=0.5, hidden=256, vocab_size=128,
           batch_size=32, workers=0, optimizer="adamw", lr=2e-3, cnn_lr=2e-3, weight_decay=1e-2,
           warmup=50, iterations=500, checkpoint_every=500, cider_images=100, out="runs/toy")
VOCAB_CAPTIONS = 1_000_000  # captions a vocabulary is built from, at most (shards can hold 12M)


# ----------------------------------------------------------------------------------------------
# Arguments: every model, data and optimisation flag is a field of virtex.Config

def get_args_parser():
    d = virtex.Config()
    toy = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in TOY.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=virtex.HelpFormatter,
                                epilog=f"For the toy world (no --data, or data in --toy-dir): {toy}")
    g = p.add_argument_group("input and output")
    g.add_argument("--data", help="COCO Captions folder (annotations/, train2017/, val2017/), "
                   "tar shards ('DIR/{00000..00999}.tar' or a folder of them), or a .jsonl/.csv "
                   "file of image,caption rows")
    g.add_argument("--val", help="val split: any of --data's kinds (none: --data's, if COCO)")
    g.add_argument("--voc", help="VOCdevkit/VOC2007: probe each checkpoint, keep the best")
    g.add_argument("--vocab", help="SentencePiece model (none: build one from the train captions)")
    g.add_argument("--out", default="runs/virtex", help="output folder")
    g.add_argument("--toy-dir", default="data/toy", help="where the toy world is written")
    g = p.add_argument_group("model (the paper's best: R-50, L1 H2048)")
    g.add_argument("--task", default=d.task, choices=virtex.TASKS, help="pretraining task")
    g.add_argument("--backbone", default=d.backbone,
                   help="torchvision ResNet or ViT (vit_b_16, ...; vit_tiny_8 for the toy)")
    g.add_argument("--layers", type=int, default=d.layers, help="decoder layers")
    g.add_argument("--hidden", type=int, default=d.hidden, help="decoder width H")
    g.add_argument("--heads", type=int, help="attention heads (none: H/64)")
    g.add_argument("--feedforward", type=int, help="feedforward width (none: 4H)")
    g.add_argument("--norm-first", action="store_true", help="pre-norm decoder layers")
    g.add_argument("--dropout", type=float, default=d.dropout, help="in the textual heads")
    g.add_argument("--vocab-size", type=int, help=f"(none: {d.vocab_size}, or the size of --vocab)")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per caption")
    g.add_argument("--parallel", type=float, default=d.parallel, help="CapPa's parallel prediction: "
                   "probability a caption is predicted from the image alone, all tokens at once")
    g = p.add_argument_group("images and batches")
    g.add_argument("--image-size", type=int, default=d.image_size, help="training crop side")
    g.add_argument("--crop-scale", type=float, default=d.crop_scale, help="smallest crop area")
    g.add_argument("--max-images", type=int, help="pretrain on N images, the same for every task")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch")
    g.add_argument("--workers", type=int, default=d.workers, help="loader processes per GPU")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"], help="inner")
    g.add_argument("--lr", type=float, default=d.lr, help="LR of the textual head")
    g.add_argument("--cnn-lr", type=float, default=d.cnn_lr, help="LR of the backbone")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty")
    g.add_argument("--lookahead-k", type=int, default=d.lookahead_k, help="steps per LookAhead")
    g.add_argument("--lookahead-alpha", type=float, default=d.lookahead_alpha, help="step to slow")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup iterations")
    g.add_argument("--iterations", type=int, default=d.iterations, help="cosine decay to 0 by then")
    g.add_argument("--seed", type=int, default=d.seed, help="of weights, data order, augmentation")
    g = p.add_argument_group("speed (none of these changes the maths beyond rounding)")
    g.add_argument("--amp", default=d.amp, choices=["bf16", "fp16", "off"], help="autocast")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW activations")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--decode", default="loader", choices=["loader", "device"],
                   help="where training images are decoded and augmented")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint-every", type=whole_number, default=2000, help="save checkpoints")
    g.add_argument("--eval-every", type=whole_number, help="evaluate (none: at every checkpoint)")
    g.add_argument("--cider-images", type=whole_number, default=500, help="val images captioned")
    g.add_argument("--no-eval-cache", dest="eval_cache", action="store_false",
                   help="decode the evaluation images at every evaluation, not once")
    g.add_argument("--log-every", type=whole_number, default=20, help="iterations per log line")
    g.add_argument("--stop-after", type=whole_number, help="stop there, as if preempted")
    g.add_argument("--benchmark", nargs="?", const="step", choices=["step", "loader", "demo"],
                   help="time the training step (synthetic batch), the data loader or each part "
                   "of the demo, and exit")
    return p


def whole_number(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(text)


def parse_args(argv=None):
    """Parse; for the toy world (no --data, or data inside --toy-dir) the toy preset replaces the
    paper's defaults (flags still win)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    part = toy_part(args)
    if args.benchmark == "demo" and args.data:
        parser.error("--benchmark demo times the demo, on the toy world: no --data")
    if args.benchmark in ("step", "loader"):
        parser.set_defaults(iterations=20)
    elif part:  # the toy COCO's run in runs/toy, its shards' in runs/toy_shards
        parser.set_defaults(**{**TOY, "out": TOY["out"] + ("" if part == "coco" else f"_{part}")})
    args = parser.parse_args(argv)
    if args.eval_every and args.eval_every % args.checkpoint_every:
        parser.error(f"--eval-every {args.eval_every} is not a multiple of --checkpoint-every "
                     f"{args.checkpoint_every}")
    return args


# ----------------------------------------------------------------------------------------------
# Data and vocabulary

def toy_part(args):
    """The part of the toy world --data is in ("coco" without --data), or None: data outside
    --toy-dir, for which the paper's defaults hold."""
    if args.data is None:
        return "coco"
    toy, place = Path(args.toy_dir).resolve(), Path(str(args.data).split("{")[0]).resolve()
    return (place.relative_to(toy).parts + ("coco",))[0] if place.is_relative_to(toy) else None


def read_data(args, rank):
    """(train source, val source or None) of --data and --val, read now: bad input fails here
    rather than at the first checkpoint hours later. The demo's data is the toy world (written by
    rank 0); --val defaults to --data's val split, where it has one (a COCO folder)."""
    if toy_part(args):
        toy = Path(args.toy_dir)
        if rank == 0:
            virtex.make_toy_world(toy)
        virtex.barrier()
        args.data, args.val = args.data or toy / "coco", args.val or toy / "coco"
        args.voc = args.voc or toy / "voc" / "VOCdevkit" / "VOC2007"
    data = read_source("--data", args.data, "train", stream=True)
    val = args.val or (args.data if data.splits else None)
    val = read_source("--val", val, "val") if val else None
    if data.shards and args.max_images:
        raise SystemExit("error: --max-images picks images of an indexed source, not of shards")
    if args.voc:
        if not Path(args.voc).is_dir():
            raise SystemExit(f"error: --voc {args.voc} is not a folder")
        probe.read_voc(args.voc, "trainval"), probe.read_voc(args.voc, "test")
    return data, val


def read_source(flag, value, split, stream=False):
    """virtex.caption_source, its bad input named with the flag that gave it."""
    try:
        return virtex.caption_source(value, split, stream)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {flag} {virtex.error_line(e)}") from None


def vocabulary(args, out, rank, data):
    """--vocab, else OUT/vocab.model, built by rank 0 from the train captions on the first run."""
    path = Path(args.vocab) if args.vocab else out / "vocab.model"
    if args.vocab and not path.is_file():
        raise SystemExit(f"error: --vocab {path}: no such file")
    if rank == 0 and not path.exists():
        size = args.vocab_size or virtex.Config.vocab_size
        virtex.print0(f"building a {size}-token vocabulary from the {args.data} train captions")
        captions = train_captions(data, args.max_images, VOCAB_CAPTIONS)
        virtex.Tokenizer.train(captions, out / "vocab", size)
    virtex.barrier()
    tokenizer = virtex.Tokenizer(path)
    if args.vocab_size and len(tokenizer) != args.vocab_size:
        raise SystemExit(f"error: {path} has {len(tokenizer)} tokens, not --vocab-size "
                         f"{args.vocab_size}")
    return tokenizer


def train_captions(data, max_images, shard_limit):
    """The captions of a train source: an indexed one's (of its first `max_images` images), or the
    first `shard_limit` of streamed shards."""
    if data.shards:
        return virtex.shard_captions(data.shards, shard_limit)
    return (c for _, captions in virtex.first_images(data.items, max_images) for c in captions)


def datasets(args, tokenizer, data, val, rank=0, world=1):
    """(config, train data, val data or None) of the sources `data` and `val`: the config takes the
    vocabulary's size (or, for multi-label classification, the number of COCO categories + 1)."""
    cfg = virtex.Config.from_dict({**vars(args), "vocab_size": len(tokenizer)})
    captions = EncodedCaptions if args.decode == "device" else virtex.CaptioningDataset
    items, val_items = data.items, val and val.items
    if cfg.task == "multilabel_classification":  # the ablation's targets: COCO categories
        items, classes = virtex.read_categories(data.path, "train")
        val_items = val and virtex.read_categories(val.path, "val")[0]
        cfg = dataclasses.replace(cfg, vocab_size=classes + 1)
    if data.shards:  # streamed; `captions` makes each sample
        samples = captions([], tokenizer, cfg)
        train_data = virtex.CaptionShards(data.shards, samples, cfg, rank, world)
    else:
        train_data = captions(items, tokenizer, cfg)
    val_data = virtex.CaptioningDataset(val_items, tokenizer, cfg, train=False) if val else None
    return cfg, train_data, val_data


# ----------------------------------------------------------------------------------------------
# The run: its state, resuming it, one training step, logging, checkpoints and evaluation

@dataclasses.dataclass
class Run:
    """What the loop, the checkpoints and the evaluations of one run share."""
    args: argparse.Namespace
    cfg: virtex.Config
    tokenizer: virtex.Tokenizer
    model: torch.nn.Module  # the plain module: what checkpoints hold
    optimizer: virtex.LookAhead
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int = 0
    world: int = 1
    group: object = None  # a gloo group for control messages and gathers (None: one process)
    start: int = 0  # iterations done before this process started
    best_map: float = -1.0  # best VOC07 mAP of any checkpoint so far
    log: object = None  # log.jsonl, open on rank 0
    reported: set = dataclasses.field(default_factory=set)  # unreadable images named so far
    eval_sets: dict = None  # the evaluation inputs, decoded at the first evaluation
    shards: dict = None  # from shards: {"readers": how many, "positions": {reader: where it is}}

    @property
    def out(self):
        return Path(self.args.out)

    def write(self, record):
        if self.log:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()


def new_model(cfg, device):
    """(model, optimizer, loss scaler): the same initial weights in every process and rerun."""
    torch.manual_seed(cfg.seed)
    model = virtex.VirTex(cfg).to(device)
    if cfg.channels_last:  # NHWC: tensor-core convolutions (cuDNN, oneDNN) without transposes. Set
        model.to(memory_format=torch.channels_last)  # before the optimizer: its state follows
    optimizer = virtex.build_optimizer(model, cfg, fused=virtex.has_fused_kernels(device))
    return model, optimizer, virtex.loss_scaler(device, cfg.amp)


def build(args, cfg, tokenizer, device, rank=0, world=1, group=None):
    """The run, resumed from OUT/last.pt if it exists (refused if other settings made it)."""
    run = Run(args, cfg, tokenizer, *new_model(cfg, device), device, rank, world, group)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LONGER}
    settings["vocabulary"] = tokenizer.model
    checkpoint = virtex.resume(run.out / "last.pt", "train.py", settings, run.model, run.optimizer,
                               run.scaler, needs=("vocab",))
    if checkpoint:
        run.start, run.shards = checkpoint["iteration"], checkpoint.get("shards")
        if (run.out / "best.pt").exists():
            run.best_map = virtex.load_checkpoint(run.out / "best.pt")["voc_map"]
        saved = checkpoint["config"]["iterations"]
        if saved != cfg.iterations:
            virtex.print0(f"--iterations {cfg.iterations}, not {saved}: the LR schedule changes "
                          f"from iteration {run.start} on")
    return run


def prepare(args, rank, world, device, group=None):
    """(run, train data, val data): data read, vocabulary built or read, run resumed."""
    data, val = read_data(args, rank)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tokenizer = vocabulary(args, Path(args.out), rank, data)
    cfg, train_data, val_data = datasets(args, tokenizer, data, val, rank, world)
    run = build(args, cfg, tokenizer, device, rank, world, group)
    readers = train_data.readers if isinstance(train_data, virtex.CaptionShards) else None
    if run.start and readers != (run.shards or {}).get("readers"):
        raise ValueError(f"{run.out}/last.pt read other data (or shards with another number of "
                         "processes x --workers); use another --out")
    if readers:  # each reader goes on from where it stood
        run.shards = run.shards or {"readers": readers, "positions": {}}
        train_data.start, train_data.positions = run.start, run.shards["positions"]
    return run, train_data, val_data


def wrap_for_training(model, cfg, device, distributed):
    """The module the loop calls: DDP-wrapped, then compiled, as configured."""
    if distributed:
        model = virtex.ddp(model, device)
    if cfg.compile:  # fuses the pointwise ops around the matmuls. Compiled after DDP, as PyTorch
        model = torch.compile(model)  # documents: DDP's hooks then overlap the gradient all-reduce
    return model


def on_device(batch, device, decode="loader", size=None):
    """(network input, tokens, lengths) on `device`, and the unreadable images met."""
    if decode == "device":
        batch = decode_on_device(batch, device, size)
    images, tokens, lengths, unreadable = batch
    return virtex.to_input(images, device), tokens.to(device), lengths.to(device), unreadable


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
    scaler.step(optimizer)  # fp16: a step with inf/nan gradients is skipped (LookAhead's too)
    scaler.update()
    return torch.stack([grad_norm, *(output[k].detach().float() for k in LOSSES if k in output)])


def log_steps(run, steps, iteration, seconds, bar):
    """Stop at the first non-finite step (before it reaches a checkpoint); else log the means of
    the interval's (grad norm, losses) rows."""
    finite = steps.isfinite()
    finite[:, 0] |= run.scaler.is_enabled()  # fp16: the scaler skips steps with inf gradients
    if not finite.all():
        bad = iteration - len(steps) + 1 + int((~finite.all(1)).nonzero()[0])
        raise SystemExit(f"error: non-finite loss at iteration {bad}; last good checkpoint: "
                         f"{run.out}/last.pt")
    cfg = run.cfg
    mean = steps.where(steps.isfinite(), torch.nan).nanmean(0).tolist()
    factor = virtex.lr_multiplier(iteration - 1, cfg.warmup, cfg.iterations)
    stats = {"iteration": iteration, **dict(zip(("grad_norm", *LOSSES), mean)),
             "lr": cfg.lr * factor, "cnn_lr": cfg.cnn_lr * factor,
             "ms_per_step": 1000 * seconds / len(steps),
             "img_per_s": cfg.batch_size * len(steps) / seconds}
    shown = {"loss": "loss", "loss_forward": "fwd", "loss_backward": "bwd", "lr": "lr",
             "cnn_lr": "cnn_lr", "img_per_s": "img_s"}
    bar.set_postfix({shown[k]: f"{v:.3g}" for k, v in stats.items() if k in shown})
    return stats


def report(run, unreadable):
    """Name each unreadable image once per run; return how many the interval met."""
    for problem in sorted(set(unreadable) - run.reported):
        tqdm.write(f"warning: {problem} (another sample takes its place)")
    run.reported.update(unreadable)
    return len(unreadable)


def save(run, iteration):
    """last.pt (full state) and, on schedule, a weights-only snapshot: what probing and downstream
    use, a third of the size. Returns the weights-only checkpoint."""
    weights = {"model": run.model.state_dict(), "iteration": iteration,
               "config": dataclasses.asdict(run.cfg), "vocab": run.tokenizer.model}
    state = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict()}
    if run.shards is not None:  # every rank's readers: where each will read on
        workers = run.shards["readers"] // run.world  # reader r is rank r // workers's
        # A resumed rank also holds the others' places of last.pt, which only their own rank updates.
        mine = {r: place for r, place in run.shards["positions"].items() if r // workers == run.rank}
        everyone = [mine]
        if run.group is not None:
            everyone = [None] * run.world
            dist.all_gather_object(everyone, mine, group=run.group)
        merged = {reader: place for positions in everyone for reader, place in positions.items()}
        state["shards"] = {**run.shards, "positions": merged}
    if run.rank == 0:
        virtex.save_checkpoint(run.out / "last.pt", {**weights, **state})
        if iteration % run.args.checkpoint_every == 0:
            virtex.save_checkpoint(run.out / f"checkpoint_{iteration}.pt", weights)
    return weights


def eval_sets(run, val_data):
    """The evaluation inputs, built at the first evaluation: this rank's share of the val split
    (and of VOC07), decoded once and kept unless --no-eval-cache (see virtex.EvalSet)."""
    if run.eval_sets is None:
        args, cfg = run.args, run.cfg
        run.eval_sets = {}
        if val_data is not None:
            keys = [(i, i) for i in range(len(val_data))]  # seed = index: the same caption always
            batches = virtex.shard(keys, run.rank, run.world)
            run.eval_sets["val"] = virtex.EvalSet(val_data, batches, cfg.workers, args.eval_cache,
                                                  virtex.collate)
        if args.voc:
            run.eval_sets["voc"] = probe.VOC07(args.voc, cfg.image_size, run.rank, run.world,
                                               cfg.workers, args.eval_cache)
    return run.eval_sets


@torch.no_grad()
def validate(run, val):
    """Teacher-forced val loss of the whole split, each rank computing its share."""
    model, device = run.model.eval(), run.device
    total = torch.zeros(2, device=device)
    for _, batch in val:
        images, tokens, lengths, unreadable = on_device(batch, device)
        report(run, unreadable)  # each replaced, as in training: a val loss is a mean over images
        with virtex.autocast(device, run.cfg.amp):
            loss = model(images, tokens, lengths)["loss"]
        n = torch.tensor(len(images), device=device)
        total += torch.stack([loss.float() * n, n])  # the batch's mean, weighted by its images
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def val_cider(run, val, data):
    """CIDEr of beam-search captions of the first --cider-images val images against all their
    captions (document frequencies over those images), each rank captioning its share."""
    model, cfg, device, parts = run.model.eval(), run.cfg, run.device, []
    for keys, (images, *_) in val:
        keys = [key for key in keys if key[0] < run.args.cider_images]
        if keys:
            with virtex.autocast(device, cfg.amp):
                images = virtex.to_input(images[:len(keys)], device)
                parts.append((keys, model.caption(images, max_steps=cfg.max_length)))
    model.train()
    captions = virtex.gather(parts, run.group)  # on every rank: each must join the gather
    candidates = {i: virtex.caption_words(run.tokenizer.decode(c))
                  for keys, batch in captions for (i, _), c in zip(keys, batch)}
    references = {i: [virtex.caption_words(c) for c in data.items[i][1]] for i in candidates}
    return virtex.cider(candidates, references)[0] if run.rank == 0 else None


def evaluate(run, iteration, weights, val_data):
    """Val loss, val CIDEr and, with --voc, VOC07 mAP, every rank doing its share (the SVMs run on
    rank 0); the seconds each took and the memory the cached inputs hold; the best mAP so far is
    kept as best.pt."""
    sets, cfg, record, seconds = eval_sets(run, val_data), run.cfg, {"iteration": iteration}, {}
    virtex.broadcast_buffers(run.model)  # every rank evaluates the checkpoint's BatchNorm statistics

    def part(name, compute):
        start = time.perf_counter()
        record[name], seconds[name] = compute(), round(time.perf_counter() - start, 3)

    if "val" in sets:
        part("val_loss", lambda: validate(run, sets["val"]))
    if "val" in sets and cfg.captioning:
        part("val_cider", lambda: val_cider(run, sets["val"], val_data))
    if "voc" in sets:
        def voc_map():  # every rank extracts its share; rank 0 runs the SVMs
            splits = sets["voc"].features(run.model.visual, run.device, cfg.amp, run.group)
            return sets["voc"].evaluate(splits, run.device).mean().item() if run.rank == 0 else None
        part("voc_map", voc_map)
    if run.rank == 0:
        cached = [sets["val"]] if "val" in sets else []
        cached += [s for s, _ in sets["voc"].splits.values()] if "voc" in sets else []
        megabytes = round(sum(s.nbytes() for s in cached) / 2 ** 20, 1)
        if record.get("voc_map", -1.0) > run.best_map:
            virtex.save_checkpoint(run.out / "best.pt", {**weights, **record})
        run.best_map = max(run.best_map, record.get("voc_map", -1.0))
        run.write({**record, "eval_seconds": seconds, "eval_cache_mb": megabytes})
        tqdm.write(" | ".join(f"{k} {v:.4g}" for k, v in record.items())
                   + f" | {sum(seconds.values()):.1f} s, {megabytes} MB of inputs cached")
    virtex.barrier()
    return record


def compare_with_initial_weights(run, record):
    """The demo's last line: the pretrained backbone's toy VOC07 mAP and its initial weights'."""
    initial, _, _ = new_model(run.cfg, run.device)  # the very weights training started from
    voc = run.eval_sets["voc"]
    splits = voc.features(initial.visual, run.device, run.cfg.amp, run.group)
    if run.rank == 0:
        random_init = voc.evaluate(splits, run.device).mean().item()
        print(f"toy VOC07 mAP: pretrained {record['voc_map']:.1f} | random init {random_init:.1f}")



def main(args):
    processes = virtex.init_processes()
    rank, world, device, cpu_group = processes
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: find the fastest kernels once
    virtex.check_batch(args.batch_size, world)
    if args.benchmark:
        return benchmark(args, device)
    demo = args.data is None
    run, train_data, val_data = prepare(args, rank, world, device, cpu_group)
    cfg = run.cfg
    stop = min(args.stop_after or cfg.iterations, cfg.iterations)
    if run.start >= stop:
        return virtex.print0(f"{run.out}/last.pt is at iteration {run.start}: nothing to do")
    model = wrap_for_training(run.model, cfg, device, distributed=dist.is_initialized())
    loader = virtex.resumable_loader(train_data, cfg, run.start, stop, processes, virtex.collate)
    if rank == 0:
        (run.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        run.log = open(run.out / "log.jsonl", "a")
    bar = tqdm(total=cfg.iterations, initial=run.start, disable=rank != 0, dynamic_ncols=True)
    history, unreadable, tick = [], [], time.perf_counter()
    model.train()
    with virtex.preemption() as preempted:
        for iteration, batch in enumerate(loader, run.start + 1):
            torch.manual_seed(virtex.mix_seed(cfg.seed, iteration, rank))  # dropout, as the data
            if run.shards is not None:
                *batch, (reader, *position) = batch
                run.shards["positions"][reader] = tuple(position)
            *batch, skipped = on_device(batch, device, args.decode, cfg.image_size)
            history.append(train_step(model, run.optimizer, run.scaler, *batch, iteration - 1, cfg))
            unreadable += skipped
            bar.update()
            signalled = virtex.any_rank(preempted, cpu_group)
            end = iteration == stop or signalled
            checkpoint = end or iteration % args.checkpoint_every == 0
            if iteration % args.log_every == 0 or checkpoint:  # one sync per interval, not per step
                seconds = time.perf_counter() - tick
                stats = log_steps(run, torch.stack(history).cpu(), iteration, seconds, bar)
                run.write({**stats, "unreadable_images": report(run, unreadable)})
                history, unreadable, tick = [], [], time.perf_counter()
            if checkpoint:  # saving first: a preempted run spends its grace period on that alone
                weights = save(run, iteration)
                due = end or iteration % (args.eval_every or args.checkpoint_every) == 0
                if due and not signalled:
                    record = evaluate(run, iteration, weights, val_data)
                tick = time.perf_counter()
            if end:
                break
    bar.close()
    if not virtex.stopped_early(iteration, cfg.iterations, signalled) and demo:
        compare_with_initial_weights(run, record)
    if dist.is_initialized():
        dist.destroy_process_group()


def cli(argv=None):
    with virtex.one_line_errors():
        main(parse_args(argv))


# ==============================================================================================
# Off the main path: decoding on the device (--decode device) and --benchmark

# ----------------------------------------------------------------------------------------------
# --decode device: the loader's workers only read each JPEG's bytes and draw its augmentation
# (from the generator the loader path draws from); the training process decodes the batch
# (nvJPEG on a GPU) and augments it with batched tensor operations. The data path's speed then
# depends on the accelerator, not on the number of CPU cores.

NEUTRAL = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing
Encoded = collections.namedtuple("Encoded", "path data size jpeg")


class EncodedCaptions(virtex.CaptioningDataset):
    """Training samples whose image is (JPEG bytes, or the pixels of another format, decoded here;
    the drawn augmentation as 13 numbers; the path)."""

    def open(self, path):  # a file, or a tar shard's member
        data = path.read() if hasattr(path, "read") else Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as header:  # parses the header only
            jpeg = header.format == "JPEG" and header.mode in ("RGB", "L")
            return Encoded(path, data, header.size, jpeg)

    def augment(self, image, augmentation):
        if image.jpeg:
            pixels = torch.frombuffer(bytearray(image.data), dtype=torch.uint8)
        else:  # PNG, CMYK, 16-bit...: Pillow handles them, as in the loader path
            pixels = TF.pil_to_tensor(virtex.load_image(io.BytesIO(image.data)))
        jittered = bool(augmentation.jitter)  # else an order of no place (-1): none applies
        jitter, order = (augmentation.jitter, augmentation.order) if jittered else (NEUTRAL, (-1,) * 4)
        numbers = [*augmentation.box, augmentation.flip, *jitter, *order]
        return pixels, torch.tensor(numbers, dtype=torch.float64), str(image.path)


def decode_jpegs(pixels, device):
    """Each image on `device`, the JPEG bytes decoded there; None where they do not decode."""
    jpegs = [p for p in pixels if p.dim() == 1]
    decode = lambda data: torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB,
                                                     device=device)
    try:
        decoded = iter(decode(jpegs) if jpegs else [])
    except RuntimeError:  # a corrupt JPEG fails the whole batch: decode one by one
        decoded = iter([or_none(decode, p) for p in jpegs])
    return [next(decoded) if p.dim() == 1 else p.to(device) for p in pixels]


def or_none(f, x):
    try:
        return f(x)
    except RuntimeError:
        return None


def shift_hue(x, shift):
    """adjust_hue with a shift (in turns; (B, 1, 1, 1)) per image, through HSV as torchvision."""
    value, channel = x.max(1, keepdim=True)  # (B, 1, H, W)
    chroma = value - x.min(1, keepdim=True).values
    r, g, b = x.split(1, dim=1)
    safe = torch.where(chroma > 0, chroma, 1.0)  # grey pixels have no hue, and keep their value
    sectors = torch.cat([(g - b) / safe, 2 + (b - r) / safe, 4 + (r - g) / safe], 1)
    hue = sectors.gather(1, channel) / 6 + shift  # (B, 1, H, W), in turns
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * hue) % 6
    return value - chroma * torch.minimum(k, 4 - k).clamp(0, 1)


def contrast(x, f):
    return (f * x + (1 - f) * TF.rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)


# ColorJitter's four adjustments of images x (B, 3, H, W) in [0, 1] by factors f (B, 1, 1, 1).
ADJUSTMENTS = (lambda x, f: (f * x).clamp(0, 1), contrast,
               lambda x, f: (f * x + (1 - f) * TF.rgb_to_grayscale(x)).clamp(0, 1), shift_hue)


def jitter(x, factors, order):
    """ColorJitter with each image's factors (B, 4) and order (B, 4; -1: no jitter): at each of
    the four places, each adjustment runs once, on the images that drew it there."""
    for place in range(4):
        for kind, adjust in enumerate(ADJUSTMENTS):
            chosen = (order[:, place] == kind).nonzero().squeeze(1)
            if len(chosen):
                x[chosen] = adjust(x[chosen], factors[chosen, kind].view(-1, 1, 1, 1))
    return x


def decode_on_device(batch, device, size):
    """An EncodedCaptions batch -> (uint8 images (B, 3, size, size) on `device`, tokens, lengths,
    unreadable): the loader path's crop + resize, flip and colour jitter, on the device."""
    encoded, tokens, lengths, unreadable = batch
    pixels, numbers, paths = zip(*encoded)
    images, numbers = decode_jpegs(pixels, device), torch.stack(numbers)
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise RuntimeError(f"no image of a batch decodes, e.g. {paths[0]}")
    for i in [i for i, image in enumerate(images) if image is None]:  # replaced by another sample
        j = good[i % len(good)]
        images[i], numbers[i], tokens[i], lengths[i] = images[j], numbers[j], tokens[j], lengths[j]
        unreadable = [*unreadable, f"{paths[i]}: not a JPEG that decodes"]
    boxes = numbers[:, :4].long().tolist()
    x = torch.stack([TF.resized_crop(image, *box, [size, size], antialias=True)
                     for image, box in zip(images, boxes)]).float() / 255
    numbers = numbers.to(device, torch.float32)
    x = torch.where(numbers[:, 4, None, None, None] > 0, x.flip(-1), x)
    x = jitter(x, numbers[:, 5:9], numbers[:, 9:].long())
    return x.mul(255).round().to(torch.uint8), tokens, lengths, unreadable


# ----------------------------------------------------------------------------------------------
# --benchmark: the training step on a synthetic batch, or the data loader alone

def benchmark(args, device):
    vocab_size = args.vocab_size or virtex.Config.vocab_size
    cfg = virtex.Config.from_dict({**vars(args), "vocab_size": vocab_size})
    if args.benchmark == "loader":
        return benchmark_loader(args, cfg, device)
    if args.benchmark == "demo":
        return benchmark_demo(args, device)
    raw_model, optimizer, scaler = new_model(cfg, device)
    model = wrap_for_training(raw_model, cfg, device, distributed=False).train()
    B, T = cfg.batch_size, cfg.max_length
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(4, cfg.vocab_size, (B, T), device=device)  # full length: no padding
    tokens[:, 0], tokens[:, -1] = virtex.SOS, virtex.EOS
    lengths = torch.full((B,), T, device=device)
    batch = images, tokens, lengths
    step = lambda i: train_step(model, optimizer, scaler, *batch, cfg.warmup + i, cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    seconds = timed(step, 3, cfg.iterations, sync)  # warmup: kernels chosen, compiled, allocated
    dtype = virtex.amp_dtype(device, cfg.amp)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]
    layout = ", channels_last" if cfg.channels_last else ""
    print(f"{cfg.backbone} L{cfg.layers} H{cfg.hidden} vocab {cfg.vocab_size}, "
          f"{cfg.image_size} px, batch {B}, {device}, {precision}{layout}"
          f"{', compiled' if cfg.compile else ''}: "
          f"{1000 * seconds:.1f} ms/step, {B / seconds:.1f} img/s")
    if device.type == "cpu":
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        return print(f"peak memory (process): {peak:.2f} GB")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GB")
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step(0)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    peak = 2 * 8192 ** 3 / timed(lambda _: a @ a, 1, 20, sync)
    achieved = counter.get_total_flops() / seconds
    print(f"{achieved / 1e12:.1f} TFLOP/s of a measured bf16 matmul peak of {peak / 1e12:.0f}: "
          f"MFU {100 * achieved / peak:.1f}%")


def timed(step, warmup, repeats, sync):
    """Seconds per call of step(i), after `warmup` calls."""
    for i in range(warmup):
        step(i)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(repeats):
        step(i)
    sync()
    return (time.perf_counter() - start) / repeats


def benchmark_loader(args, cfg, device):
    """Images per second out of the training data path: the DataLoader (read, decode, augment,
    tokenise, collate) and, with --decode device, the decoding and augmentation on `device`."""
    with tempfile.TemporaryDirectory() as tmp:
        args.data = args.data or coco_sized_jpegs(Path(tmp) / "coco")
        source = virtex.caption_source(args.data, "train", stream=True)
        if args.vocab:
            tokenizer = virtex.Tokenizer(args.vocab)
        else:  # a small vocabulary from a sample of the captions: enough to time tokenising
            tokenizer = virtex.Tokenizer.train(train_captions(source, 5000, 5000), vocab_size=128)
        _, data, _ = datasets(args, tokenizer, source, None)
        warmup = 2 * max(1, cfg.workers)  # what the workers prefetch while starting: not steady
        stop, alone = warmup + cfg.iterations, virtex.Processes(0, 1, device)
        loader = virtex.resumable_loader(data, cfg, 0, stop, alone, virtex.collate)
        images = (on_device(b[:4], device, args.decode, cfg.image_size)[0] for b in loader)
        for _ in range(warmup):
            next(images)
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        start = time.perf_counter()
        count = sum(len(next(images)) for _ in range(cfg.iterations))
        sync()
        seconds = time.perf_counter() - start
    print(f"loader: {count / seconds:.0f} img/s over {cfg.iterations} batches of {cfg.batch_size} "
          f"({cfg.workers} workers, --decode {args.decode} on {device}, {cfg.image_size} px crops "
          f"of {args.data})")


def coco_sized_jpegs(root, images=512):
    """A COCO Captions folder of 640x480 toy scenes: JPEGs of COCO's size for timing the loader."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    rng, entries = random.Random(0), []
    for i in range(1, images + 1):
        scene, objects = virtex.toy_scene(rng, 480)
        scene.resize((640, 480)).save(root / "train2017" / f"{i:012d}.jpg", quality=90)
        entries.append((i, virtex.toy_captions(rng, objects)))
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i, _ in entries]
    captions = [{"id": 5 * i + k, "image_id": i, "caption": c}
                for i, cs in entries for k, c in enumerate(cs)]
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": captions}))
    return root


def benchmark_demo(args, device, steps=20):
    """Where the demo's time goes: each part timed (the toy world and the vocabulary, `steps`
    training steps of the real loader after 3, a checkpoint, the first evaluation, the
    random-init floor), then counted as often as the demo runs it. Writes nothing but the toy
    world (--out is a temporary folder)."""
    seconds = {}

    def timed(name, compute):
        start = time.perf_counter()
        result = compute()
        seconds[name] = time.perf_counter() - start
        return result

    with tempfile.TemporaryDirectory() as tmp:
        args.out = tmp
        timed("toy world", lambda: virtex.make_toy_world(args.toy_dir))
        run, train_data, val_data = timed("vocabulary and model", lambda: prepare(args, 0, 1, device))
        cfg = run.cfg
        model = wrap_for_training(run.model, cfg, device, distributed=False).train()
        alone = virtex.Processes(0, 1, device)
        loader = iter(virtex.resumable_loader(train_data, cfg, 0, steps + 3, alone, virtex.collate))
        clock = StepClock(run, model)
        timed("loader start, 3 steps", lambda: [clock.step(loader, i) for i in range(3)])
        parts = sum((collections.Counter(clock.step(loader, i)) for i in range(3, steps + 3)),
                    collections.Counter())
        timed("checkpoint", lambda: save(run, cfg.iterations))
        sets = eval_sets(run, val_data)
        timed("val loss", lambda: validate(run, sets["val"]))
        timed("val CIDEr", lambda: val_cider(run, sets["val"], val_data))
        voc, floor = sets["voc"], new_model(cfg, device)[0].visual
        splits = timed("VOC07 features", lambda: voc.features(run.model.visual, device, cfg.amp))
        timed("VOC07 SVMs", lambda: voc.evaluate(splits, device))
        timed("random-init floor", lambda: voc.evaluate(voc.features(floor, device, cfg.amp), device))
    images = {"val": len(val_data), "voc": sum(len(s.data) for s, _ in voc.splits.values())}
    print_demo_parts(args, cfg, seconds, {k: v / steps for k, v in parts.items()}, images)


class StepClock:
    """The parts of train_step, timed from outside by hooks: forward (the model's forward hooks),
    backward (from the loss's gradient to the last parameter's), optimizer (clipping and the step:
    from there on); and around it, the wait for the loader and the logging."""

    def __init__(self, run, model):
        self.run, self.model, self.marks, self.history = run, model, {}, []
        model.register_forward_pre_hook(lambda *_: self.mark("start"))
        model.register_forward_hook(self.forward_done)
        for p in model.parameters():  # the last one called ends the backward pass
            p.register_post_accumulate_grad_hook(lambda _: self.mark("gradients"))

    def mark(self, name):
        self.marks[name] = time.perf_counter()

    def forward_done(self, module, inputs, output):
        self.mark("forward")
        if output["loss"].requires_grad:  # not in the evaluations, which use the same model
            output["loss"].register_hook(lambda _: self.mark("loss gradient"))

    def step(self, loader, step):
        """Seconds of each part of training step `step`, the next batch of `loader`'s."""
        run, marks, start = self.run, self.marks, time.perf_counter()
        images, tokens, lengths, _ = on_device(next(loader), run.device)
        self.mark("data")
        stats = train_step(self.model, run.optimizer, run.scaler, images, tokens, lengths, step, run.cfg)
        self.history.append(stats.cpu())  # as the loop, one sync per interval: here, per step
        self.mark("step")
        if len(self.history) == run.args.log_every:
            log_steps(run, torch.stack(self.history), step + 1, 1.0, tqdm(disable=True))
            self.history = []
        self.mark("end")
        parts = {"data": marks["data"] - start, "forward": marks["forward"] - marks["start"],
                 "backward": marks["gradients"] - marks["loss gradient"],
                 "optimizer": marks["step"] - marks["gradients"], "logging": marks["end"] - marks["step"]}
        return {**parts, "other": marks["end"] - start - sum(parts.values())}


def print_demo_parts(args, cfg, seconds, step, images):
    """benchmark_demo's table: each part's seconds, how many times the demo runs it, the total."""
    evaluations = math.ceil(cfg.iterations / (args.eval_every or args.checkpoint_every))
    iterations = cfg.iterations - 3
    rows = [("toy world (0 s once written)", seconds["toy world"], 1),
            ("vocabulary and model", seconds["vocabulary and model"], 1),
            ("loader start, first 3 steps", seconds["loader start, 3 steps"], 1),
            ("training step", sum(step.values()), iterations),
            *((f"  {part}", step[part], iterations) for part in step),
            ("checkpoint", seconds["checkpoint"], math.ceil(cfg.iterations / args.checkpoint_every)),
            (f"val loss ({images['val']} images)", seconds["val loss"], evaluations),
            (f"val CIDEr ({min(args.cider_images, images['val'])} images, beam 5)",
             seconds["val CIDEr"], evaluations),
            (f"VOC07 features ({images['voc']} images)", seconds["VOC07 features"], evaluations),
            ("VOC07 SVMs", seconds["VOC07 SVMs"], evaluations),
            ("random-init floor (features, SVMs)", seconds["random-init floor"], 1)]
    precision = "fp32" if virtex.amp_dtype(torch.device("cpu"), cfg.amp) is None else "bf16"
    print(f"the demo, part by part: {cfg.backbone} at {cfg.image_size} px, L{cfg.layers} H{cfg.hidden}, "
          f"batch {cfg.batch_size}, {cfg.iterations} iterations, {cfg.workers} loader workers; "
          f"{precision}, {torch.get_num_threads()} threads")
    print(f"{'part':40} {'each':>10} {'times':>6} {'in all':>9}")
    for name, each, times in rows:
        total = "" if name.startswith("  ") else f"{each * times:7.1f} s"
        print(f"{name:40} {each:8.3f} s {times:6} {total:>9}".rstrip())
    total = sum(each * times for name, each, times in rows if not name.startswith("  "))
    print(f"{'total':40} {'':17} {total:7.1f} s = {total / 60:.1f} min")
    print("(a barely trained model: its captions run to the 30-token limit, the demo's stop near 15, "
          "so val CIDEr here is about twice the demo's)")


if __name__ == "__main__":
    cli()
