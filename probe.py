"""Judge a backbone the way the paper does (section 4.1 and appendix).

    python probe.py --ckpt runs/toy/last.pt                     # VOC07 SVMs on the toy VOC
    python probe.py --ckpt CKPT --voc datasets/VOC2007          # the paper's number (88.7 mAP)
    python probe.py --init random --voc datasets/VOC2007        # the floor
    torchrun --nproc_per_node=8 probe.py --ckpt CKPT --imagenet datasets/imagenet --out DIR
    torchrun --nproc_per_node=8 probe.py --ckpt CKPT --inaturalist datasets/inaturalist --finetune

VOC07: frozen backbone, global-average-pooled layer4 features, L2-normalised; per class a
linear SVM with its cost picked by 3-fold cross-validated AP on trainval; AP on test.
Classification: a linear layer on the frozen backbone (the ImageNet recipe), or with --finetune
the whole network (the iNaturalist 2018 recipe), on either dataset; top-1 and top-5 on val.
Rerunning the same command with the same --out resumes from its last.pt, exactly.
"""
import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import multiprocessing
import re
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import virtex

# ----------------------------------------------------------------------------------------------
# Backbones: ours, the official code's, a torchvision ResNet or ViT, or a random initialisation

def load_backbone(init, backbone="resnet50", seed=0, image_size=224):
    """(visual, image size) for --init random (seeded) or --init torchvision:PATH (the state dict
    of a torchvision ResNet or ViT, which the ViT's image size is read from)."""
    if init == "random":
        torch.manual_seed(seed)
        return virtex.Visual(backbone, image_size), image_size
    if init and init.startswith("torchvision:"):
        path = init.split(":", 1)[1]
        try:
            return virtex.visual_from_torchvision(virtex.load_checkpoint(path))
        except ValueError as e:  # a weight missing or one too many, or another model's
            raise ValueError(f"{path}: {e}") from None
    raise ValueError(f"--init must be 'random' or 'torchvision:PATH', not {init!r}")


# ----------------------------------------------------------------------------------------------
# PASCAL VOC 2007: ROOT/JPEGImages/*.jpg, ROOT/ImageSets/Main/<class>_{trainval,test}.txt

def read_voc(root, split):
    """(image paths, labels (N, classes) with 1 present / 0 absent / -1 difficult, class names)."""
    root = Path(root)
    main = root / "ImageSets" / "Main"
    if not main.is_dir():
        raise FileNotFoundError(f"{main}: missing (is {root} a VOCdevkit/VOC2007 folder?)")
    # The classes of both splits, so that trainval and test cannot disagree on them.
    classes = sorted({p.name[:-len(f"_{s}.txt")] for s in ("trainval", "test")
                      for p in main.glob(f"*_{s}.txt")})
    if not classes:
        raise FileNotFoundError(f"{main}/<class>_{split}.txt: missing")
    columns, ids = [], None
    for c in classes:
        path = main / f"{c}_{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the other split has class {c})")
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if any(len(line) != 2 or line[1] not in ("1", "-1", "0") for line in lines):
            raise ValueError(f"{path}: not VOC labels (lines of an image id and 1, -1 or 0)")
        if ids is not None and [i for i, _ in lines] != ids:
            raise ValueError(f"{path}: lists other images than {classes[0]}_{split}.txt")
        ids = [i for i, _ in lines]
        columns.append([{"1": 1, "-1": 0, "0": -1}[v] for _, v in lines])  # VOC 0 means difficult
    paths = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (listed in {main}/{classes[0]}_{split}.txt)")
    return paths, torch.tensor(columns).T, classes


# ----------------------------------------------------------------------------------------------
# Features: short side 256/224 of the image size, centre crop, GAP of layer4, L2-normalised.
# Every rank decodes its share of an evaluation set once; the features are gathered.

def read(path, size=None):
    """An image of an evaluation or a classification set, which cannot be left out or replaced
    (every image counts): unreadable, it stops the run with its name (last.pt keeps the epochs
    trained, and an epoch's evaluation comes after its save)."""
    try:
        return virtex.load_image(path, size)
    except virtex.UNREADABLE as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


class Images(torch.utils.data.Dataset):
    """Evaluation views (uint8): short side 256/224 of the image size, centre crop."""

    def __init__(self, paths, image_size):
        self.paths, self.size = paths, image_size
        self.resize = round(image_size * 256 / 224)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return virtex.eval_image(read(self.paths[i], self.resize), self.resize, self.size)


def checksum(module):
    """A fingerprint that tells one set of weights from another (what a cache or last.pt was made
    of): a hash of their bytes, so the same numbers in other places are other weights too."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in module.state_dict().values():
        if tensor.is_floating_point():
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def features(visual, images, device, amp="bf16"):
    """(B, C) pooled layer4 features of uint8 images, through the training step's autocast and
    channels_last paths."""
    images = virtex.to_input(images, device).contiguous(memory_format=torch.channels_last)
    with virtex.autocast(device, amp):
        return virtex.pooled(visual(images))


@torch.no_grad()
def extract(visual, evalset, device, amp="bf16", group=None, desc=None):
    """(N, C) L2-normalised pooled features of a whole evaluation set (each rank extracts its
    share; every rank gets all), the backbone in eval mode."""
    training = visual.training
    visual.eval()
    parts = [(keys, F.normalize(features(visual, images, device, amp), dim=1).cpu())
             for keys, images in tqdm(evalset, desc=desc, total=len(evalset.batches), leave=False,
                                      dynamic_ncols=True, disable=desc is None)]
    visual.train(training)
    return torch.cat([x for _, x in virtex.gather(parts, group)])


# ----------------------------------------------------------------------------------------------
# The SVMs: scikit-learn's LinearSVC (liblinear) protocol, every problem solved at once in torch

COSTS = (0.01, 0.1, 1.0, 10.0)  # the official sweep of the SVM cost C

# The protocol, class by class (evaluate_svms solves every class, cost and fold at once):
#   for each class, labels +1 (present) or -1 (absent or difficult), positives weighted 2:
#     for each cost C: mean AP on each of 3 folds of trainval of an L2-loss linear SVM(C)
#                      fitted on the other two folds
#     C* = the cost with the best mean (the smaller on ties)
#     AP on test (difficult images left out) of the SVM(C*) fitted on all of trainval

def average_precision(scores, targets):
    """Non-interpolated AP, sum_n (R_n - R_n-1) P_n over the distinct score thresholds (tied
    scores enter together): scikit-learn's average_precision_score. 0 without positives."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    hits = torch.as_tensor(targets).bool().double()
    order = scores.argsort(descending=True)
    scores, true_positives = scores[order], hits[order].cumsum(0)
    if len(hits) == 0 or true_positives[-1] == 0:
        return 0.0
    last = torch.ones_like(scores, dtype=torch.bool)  # the last position of each run of ties
    last[:-1] = scores[1:] != scores[:-1]
    tp = true_positives[last]
    precision = tp / (last.nonzero().squeeze(1) + 1)
    return float((torch.diff(tp, prepend=tp.new_zeros(1)) * precision).sum() / tp[-1])


def stratified_folds(y, folds=3):
    """Fold of each sample as in scikit-learn's StratifiedKFold(folds, shuffle=False): samples
    sorted by class (classes by first appearance) are dealt round-robin, which fixes how many of
    each class a fold gets; each class then fills the folds in data order."""
    _, label = torch.unique(torch.as_tensor(y), return_inverse=True)
    index = torch.arange(len(label))
    first = torch.full((int(label.max()) + 1,), len(label)).scatter_reduce(0, label, index, "amin")
    fold, ids, start = torch.empty_like(label), torch.arange(folds), 0
    for k in first.argsort().tolist():
        members = (label == k).nonzero().squeeze(1)
        end = start + len(members)
        per_fold = (end + folds - 1 - ids) // folds - (start + folds - 1 - ids) // folds  # dealt
        fold[members] = torch.repeat_interleave(ids, per_fold)
        start = end
    return fold


@torch.no_grad()
def evaluate_svms(x_train, y_train, x_test, y_test, costs=COSTS, folds=3):
    """Per-class test AP (percent) of the paper's protocol: for each class LinearSVC(C, squared
    hinge, L2, class_weight {1: 2, -1: 1}) with C picked by `folds`-fold cross-validated AP on the
    training set, refit on all of it. Labels: 1 present, 0 absent, -1 difficult (a negative in
    training, left out at test)."""
    device = x_train.device
    y_train, y_test = y_train.to(device), y_test.to(device)
    classes = y_train.shape[1]
    # liblinear's intercept: a constant feature 1 whose weight is regularised like the others.
    x = torch.cat([x_train.float(), x_train.new_ones(len(x_train), 1, dtype=torch.float)], 1)
    # Solve in the eigenbasis of x^T x (an orthogonal change of variables: same problems): there
    # the Hessians are nearly diagonal, so the diagonal preconditioner works (6x fewer products).
    rotation = torch.linalg.eigh(x.T @ x)[1]
    z = x @ rotation
    targets = torch.where(y_train == 1, 1.0, -1.0)
    weight = torch.where(targets > 0, 2.0, 1.0)
    fold = torch.stack([stratified_folds(targets[:, c].cpu(), folds) for c in range(classes)], 1)
    costs = torch.tensor(costs, device=device)

    # Cross-validation: one problem per (class, cost, held-out fold), all at once.
    problems = torch.cartesian_prod(*map(torch.arange, (classes, len(costs), folds)))
    c, k, f = problems.to(device).unbind(1)
    train = fold.to(device)[:, c] != f
    scores = (z @ solve_svms(z, targets[:, c], costs[k] * weight[:, c] * train).T).cpu()
    held_out, positive = ~train.cpu(), targets.cpu() > 0
    cv = torch.tensor([average_precision(scores[held_out[:, p], p], positive[held_out[:, p], c[p]])
                       for p in range(len(c))]).view(classes, len(costs), folds).mean(2)
    best = costs[cv.argmax(1).to(device)]  # the first maximum: ties keep the smaller C

    w = solve_svms(z, targets, best * weight) @ rotation.T  # (classes, D + 1)
    test_scores = (x_test.to(device).float() @ w[:, :-1].T + w[:, -1]).cpu()
    return voc07_aps(test_scores, y_test.cpu())


def voc07_aps(scores, labels):
    """Per-class AP (percent) of test scores (N, classes); difficult images are left out."""
    kept = labels != -1
    return 100 * torch.tensor([average_precision(scores[kept[:, c], c], labels[kept[:, c], c] == 1)
                               for c in range(labels.shape[1])])


# ==============================================================================================
# Speed: the solver evaluate_svms calls, every (class, cost, fold) problem at once

def solve_svms(z, y, cost, tol=1e-4, max_newton=50, max_cg=250):
    """For every column p of y (+-1) and cost (N, P), the w_p (rows of (P, D)) minimising
        0.5 ||w||^2 + sum_i cost_ip * max(0, 1 - y_ip * z_i.w)^2      (L2-loss SVM primal).
    Newton-CG as in liblinear's TRON: CG on the generalised Hessian I + 2 z^T diag(active) z to
    10% residual, preconditioned by its diagonal, then an exact line search. Stops at liblinear's
    rule: |grad| <= tol * max(min(#pos, #neg), 1) / #samples * |grad(0)|. Finished problems drop
    out, so the batch (and every matmul) shrinks as they converge."""
    used = cost > 0
    positives, total = (used & (y > 0)).sum(0), used.sum(0).clamp(min=1)
    rel_tol = tol * torch.minimum(positives, total - positives).clamp(min=1) / total
    w = z.new_zeros(y.shape[1], z.shape[1])
    live, w_live = torch.arange(y.shape[1], device=z.device), w
    out = z.new_zeros(y.shape)  # z @ w_live.T
    stop = None
    for _ in range(max_newton):
        hinge = (1 - y * out).clamp(min=0)
        grad = w_live - 2 * (cost * y * hinge).T @ z  # (P, D)
        norm = grad.norm(dim=1)
        stop = rel_tol * norm if stop is None else stop
        done = norm <= stop
        w[live[done]] = w_live[done]
        keep = (~done).nonzero().squeeze(1)
        live, w_live, grad, stop = live[keep], w_live[keep], grad[keep], stop[keep]
        y, cost, out, hinge = (t[:, keep] for t in (y, cost, out, hinge))
        if len(live) == 0:
            break
        active = cost * (hinge > 0)
        step = conjugate_gradients(z, active, -grad, 1 + 2 * active.T @ (z * z), max_cg)
        step_out = z @ step.T
        t = line_search(w_live, grad, step, y * out, y * step_out, cost)
        w_live, out = w_live + t[:, None] * step, out + t * step_out
    w[live] = w_live
    return w


def conjugate_gradients(z, active, b, diagonal, max_iter, rtol=0.1):
    """Rows x of (P, D) with (I + 2 z^T diag(active_p) z) x = b_p, to relative residual rtol;
    converged rows drop out."""
    x, live = torch.zeros_like(b), torch.arange(len(b), device=b.device)
    x_live, r, target = x.clone(), b, rtol * b.norm(dim=1)
    s = r / diagonal
    d, rs = s, (r * s).sum(1)
    for _ in range(max_iter):
        done = r.norm(dim=1) <= target
        x[live[done]] = x_live[done]
        keep = (~done).nonzero().squeeze(1)
        live, x_live, r, d = live[keep], x_live[keep], r[keep], d[keep]
        rs, target, diagonal = rs[keep], target[keep], diagonal[keep]
        active = active[:, keep]
        if len(live) == 0:
            return x
        hd = d + 2 * (active * (z @ d.T)).T @ z
        alpha = (rs / (d * hd).sum(1))[:, None]
        x_live, r = x_live + alpha * d, r - alpha * hd
        s = r / diagonal
        rs, previous = (r * s).sum(1), rs
        d = s + (rs / previous)[:, None] * d
    x[live] = x_live
    return x


def line_search(w, grad, step, y_out, y_step, cost, rtol=1e-2, max_iter=20):
    """t minimising the objective along w + t * step (y_out, y_step: the margins y * z.w and
    y * z.step): its slope in t is increasing and piecewise linear, so Newton steps (bisecting
    when one leaves the bracket) land on its root."""
    ws, ss, target = (w * step).sum(1), (step * step).sum(1), rtol * (grad * step).sum(1).abs()
    t, lo, hi = torch.ones_like(ws), torch.zeros_like(ws), torch.full_like(ws, math.inf)
    for _ in range(max_iter):
        hinge = (1 - y_out - t * y_step).clamp(min=0)
        slope = ws + t * ss - 2 * (cost * y_step * hinge).sum(0)
        if (slope.abs() <= target).all():
            break
        curvature = ss + 2 * (cost * y_step * y_step * (hinge > 0)).sum(0)
        lo, hi = torch.where(slope < 0, t, lo), torch.where(slope > 0, t, hi)
        newton = t - slope / curvature
        bisect = torch.where(hi.isinf(), 2 * t, (lo + hi) / 2)
        newton = torch.where((newton <= lo) | (newton >= hi), bisect, newton)
        t = torch.where(slope.abs() <= target, t, newton)
    return t


# end of the speed section


# ----------------------------------------------------------------------------------------------
# The VOC07 probe of a VOC folder: its evaluation sets, their features, the SVMs

class VOC07:
    """The VOC07 probe of one VOC folder at one image size: per split this rank's evaluation set
    (decoded once, see virtex.EvalSet) and the labels; the SVM protocol's costs and folds."""

    def __init__(self, root, image_size, rank=0, world=1, workers=2, cache=True):
        self.root, self.image_size, self.costs, self.folds = Path(root), image_size, COSTS, 3
        self.splits = {}
        for split in ("trainval", "test"):
            paths, labels, self.classes = read_voc(root, split)
            batches = virtex.shard(list(range(len(paths))), rank, world)
            evalset = virtex.EvalSet(Images(paths, image_size), batches, workers, cache)
            self.splits[split] = evalset, labels

    def features(self, visual, device, amp="bf16", group=None, progress=False):
        """{"trainval": (x, y), "test": (x, y)}, every rank extracting its share."""
        bar = lambda split: f"VOC07 {split}" if progress else None
        return {split: (extract(visual, data, device, amp, group, bar(split)), labels)
                for split, (data, labels) in self.splits.items()}

    def cached_features(self, visual, device, path, amp="bf16", group=None):
        """features(), kept in the file `path` to rerun the SVMs in seconds. The file remembers
        the weights, VOC folder and image size it holds, and refuses others."""
        key = {"voc": str(self.root.resolve()), "image_size": self.image_size,
               "weights": checksum(visual)}
        if Path(path).exists():
            saved = torch.load(path, weights_only=True)
            if saved["key"] != key:
                raise ValueError(f"{path}: features of {saved['key']}, not {key}; delete it or "
                                 "pick another --features file")
            return saved["splits"]
        splits = self.features(visual, device, amp, group, progress=True)
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save({"key": key, "splits": splits}, path)
        return splits

    def evaluate(self, splits, device):
        """Per-class test AP (percent) of the SVM protocol on extracted features."""
        (x_train, y_train), (x_test, y_test) = splits["trainval"], splits["test"]
        return evaluate_svms(x_train.to(device), y_train, x_test.to(device), y_test, self.costs,
                             self.folds)


def voc07(visual, root, image_size, device, amp="bf16", workers=2):
    """Per-class test AP (percent) of the VOC07 linear-SVM protocol, in one process."""
    voc = VOC07(root, image_size, workers=workers, cache=False)
    return voc.evaluate(voc.features(visual, device, amp), device)


# ----------------------------------------------------------------------------------------------
# Classification (paper appendix): a linear layer on the frozen backbone (ImageNet) or the whole
# network fine-tuned (iNaturalist 2018); under torchrun or in one process, resumable exactly

# The official recipes (configs/downstream/{imagenet,inaturalist}_clf.yaml): SGD with momentum
# 0.9, global batch 256, 100 epochs, no warmup; cos^2 decay and fp32 ("AMP: false") for linear
# evaluation, a step decay and mixed precision (bf16 here, as in pretraining) for fine-tuning.
RECIPES = {"linear": dict(lr=0.3, weight_decay=0.0, amp="off"),
           "finetune": dict(lr=0.025, weight_decay=1e-4, amp="bf16")}
MILESTONES = (0.7, 0.9)  # x0.1 at epochs 70 and 90 of 100 (iterations 119,700, 153,900 of 171,000)


class Splits(NamedTuple):
    train: list  # [(image path, label)]
    val: list
    classes: list  # names; a label indexes them


def read_image_folder(root, split):
    """([(path, label)], class names) of ROOT/split/<class>/*, as torchvision's ImageFolder."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing (an ImageFolder root holds train/ and val/)")
    data = torchvision.datasets.ImageFolder(folder)  # lists the files, opens none
    return [(Path(path), label) for path, label in data.samples], data.classes


def read_inaturalist(root, split):
    """([(path, label)], class names) from ROOT/annotations/{split}2018.json as the official reads
    it: COCO-style images (file_name relative to ROOT) and annotations (image_id, category_id);
    the category id is the label (0..8141 in iNaturalist 2018)."""
    root = Path(root)
    path = root / "annotations" / f"{split}2018.json"
    data = virtex.read_json(path, f"iNaturalist 2018 {split} annotations")
    try:
        files = {image["id"]: root / image["file_name"] for image in data["images"]}
        names = {c["id"]: c["name"] for c in data["categories"]}
        labels = [(a["image_id"], a["category_id"]) for a in data["annotations"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not COCO-style images, annotations and categories "
                         f"({type(e).__name__}: {e})") from None
    if not all(isinstance(i, int) and i >= 0 for i in names):
        raise ValueError(f"{path}: category ids are not whole numbers (they are the labels)")
    unknown = [i for i, c in labels if i not in files or c not in names]
    if unknown:
        raise ValueError(f"{path}: an annotation of image {unknown[0]} names an image or category "
                         "that is not listed")
    if not labels:
        raise ValueError(f"{path}: no annotations")
    first = files[labels[0][0]]
    if not first.is_file():
        raise FileNotFoundError(f"{first}: missing (file_name in {path} is relative to {root})")
    return [(files[i], c) for i, c in labels], [names.get(i, "") for i in range(max(names) + 1)]


# --flag -> the reader of a classification dataset: ([(path, label)], class names) of (root, split)
CLASSIFICATION_DATA = {"imagenet": read_image_folder, "inaturalist": read_inaturalist}


def classification_data(args):
    """(root, reader) of the classification dataset the flags name (--imagenet, ...), or None."""
    return next(((getattr(args, flag), read) for flag, read in CLASSIFICATION_DATA.items()
                 if getattr(args, flag)), None)


def read_splits(root, read=read_image_folder):
    (train, classes), (val, val_classes) = read(root, "train"), read(root, "val")
    if val_classes != classes:
        raise ValueError(f"{root}: val has other classes than train ({len(val_classes)} vs "
                         f"{len(classes)})")
    return Splits(train, val, classes)


class TrainViews(torch.utils.data.Dataset):
    """(uint8 image, label) for a key (index, seed): a random resized crop of scale 0.08-1 and a
    flip, drawn from the seed alone; no colour jitter, as in the official downstream transforms."""

    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key
        path, label = self.items[index]
        image = read(path)  # crops of 8% of the image need every pixel
        drawn = virtex.draw_augmentation(*image.size, 0.08, torch.Generator().manual_seed(seed))
        return virtex.augment(image, drawn._replace(jitter=()), self.size), label


class Classifier(torch.nn.Module):
    """The backbone's pooled layer4 into a linear layer (the official `cnn.fc`): N(0, 0.01), 0."""

    def __init__(self, visual, classes):
        super().__init__()
        self.visual, self.fc = visual, torch.nn.Linear(visual.channels, classes)
        torch.nn.init.normal_(self.fc.weight, std=0.01)
        torch.nn.init.zeros_(self.fc.bias)

    def forward(self, images):  # (B, 3, S, S) -> (B, classes)
        return self.fc(virtex.pooled(self.visual(images)))


@dataclasses.dataclass
class Recipe:
    """A classification run's settings; None takes the official recipe's value (RECIPES)."""
    finetune: bool = False  # train the whole network, not a linear layer on frozen features
    epochs: int = 100
    batch_size: int = 256  # global
    lr: float = None
    weight_decay: float = None
    amp: str = None
    seed: int = 0  # of the head, data order and augmentation
    workers: int = 2  # loader processes per GPU
    stop_after: int = None  # iterations: stop there, as if preempted

    def __post_init__(self):
        for key, value in RECIPES["finetune" if self.finetune else "linear"].items():
            setattr(self, key, value if getattr(self, key) is None else getattr(self, key))


def lr_factor(step, total, finetune):
    """LR factor after `step` of `total` optimizer steps (the official schedulers step after the
    optimizer): linear evaluation decays by cos^2 to 0, fine-tuning x0.1 at each milestone."""
    if finetune:
        return 0.1 ** sum(step >= round(m * total) for m in MILESTONES)
    return virtex.lr_multiplier(step, 0, total)


@dataclasses.dataclass
class Run:
    """What the loop, the checkpoints and the evaluations of one classification run share."""
    recipe: Recipe
    settings: dict  # what made it (last.pt's "config"): a resumed run shares all but virtex.RUNTIME
    model: Classifier  # the plain module
    trained: torch.nn.Module  # what learns and last.pt holds: model.fc, or model when fine-tuning
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    out: Path
    processes: virtex.Processes
    start: int = 0  # iterations done before this process started
    top: tuple = None  # (top-1, top-5) of the last evaluation
    evaluated: int = -1  # the iteration it followed


def start_run(visual, splits, image_size, out, recipe, processes):
    """The model (the same head in every process and every rerun) and its optimizer, resumed from
    OUT/last.pt if it exists; a last.pt of other settings or another backbone is refused."""
    device = processes.device
    torch.manual_seed(recipe.seed)
    model = Classifier(visual, len(splits.classes)).to(device)
    trained = model if recipe.finetune else model.fc
    fused = virtex.has_fused_kernels(device)
    optimizer = torch.optim.SGD(trained.parameters(), recipe.lr, momentum=0.9,
                                weight_decay=recipe.weight_decay, fused=fused)
    scaler = virtex.loss_scaler(device, recipe.amp)
    settings = dict(**dataclasses.asdict(recipe), image_size=image_size,
                    classes=len(splits.classes), images=len(splits.train), backbone=checksum(visual))
    run = Run(recipe, settings, model, trained, optimizer, scaler, Path(out), processes)
    checkpoint = virtex.resume(run.out / "last.pt", "probe.py", settings, trained, optimizer,
                               scaler)
    run.start = checkpoint["iteration"] if checkpoint else 0
    return run


def train_step(run, net, images, labels, step, total):
    """One iteration after `step` optimizer steps: its loss as a tensor, no sync."""
    recipe, device = run.recipe, run.processes.device
    for group in run.optimizer.param_groups:
        group["lr"] = recipe.lr * lr_factor(step, total, recipe.finetune)
    with virtex.autocast(device, recipe.amp):
        logits = net(virtex.to_input(images, device))
    loss = F.cross_entropy(logits.float(), labels.to(device, non_blocking=True))
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)  # fp16: a step with inf/nan gradients is skipped
    run.scaler.update()
    return loss.detach()


@torch.no_grad()
def evaluate(run, val, image_size):
    """(top-1, top-5) in percent on `val`, sharded across processes, the network in eval mode."""
    rank, world, device, _ = run.processes
    virtex.broadcast_buffers(run.model)  # fine-tuned BatchNorm: what last.pt holds, on every rank
    labels = torch.tensor([label for _, label in val])
    batches = virtex.shard(list(range(len(val))), rank, world)
    images = virtex.EvalSet(Images([path for path, _ in val], image_size), batches,
                            run.recipe.workers, cache=False)
    run.model.eval()
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for keys, batch in images:
        with virtex.autocast(device, run.recipe.amp):
            logits = run.model(virtex.to_input(batch, device))
        best = logits.topk(min(5, logits.shape[1])).indices.cpu()  # (B, 5)
        hits = best == labels[keys, None]
        counts += torch.tensor([hits[:, 0].sum(), hits.any(1).sum(), len(batch)], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    run.trained.train()
    return tuple((100 * counts[:2] / counts[2]).tolist())


def save(run, iteration):
    if run.processes.rank == 0:
        virtex.save_checkpoint(run.out / "last.pt", {
            "model": run.trained.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "iteration": iteration, "config": run.settings})


def log_epoch(run, epoch, iteration, losses, seconds, bar):
    """The epoch's record (mean loss over processes, LR, img/s, val top-1 and top-5) into
    OUT/log.jsonl and the progress bar."""
    recipe, world = run.recipe, run.processes.world
    loss = torch.stack(losses).mean()
    if dist.is_initialized():
        dist.all_reduce(loss)
    record = {"epoch": epoch, "iteration": iteration,
              "loss": loss.item() / world, "lr": run.optimizer.param_groups[0]["lr"],
              "img_per_s": recipe.batch_size * len(losses) / seconds,
              "top1": run.top[0], "top5": run.top[1]}
    bar.set_postfix(loss=f"{record['loss']:.3g}", lr=f"{record['lr']:.3g}",
                    img_s=f"{record['img_per_s']:.3g}", top1=f"{run.top[0]:.2f}")
    if run.processes.rank == 0:
        with open(run.out / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")


def train_epochs(run, data, val, image_size, total):
    """Iterations from run.start + 1 to `total`, --stop-after or a signal, evaluating at the end
    of each epoch and saving OUT/last.pt then and when stopping. True when it reached `total`."""
    recipe, processes = run.recipe, run.processes
    stop = min(recipe.stop_after or total, total)
    net = virtex.ddp(run.model, processes.device)  # frozen: only the head is synchronised
    loader = virtex.resumable_loader(data, recipe, run.start, stop, processes)
    desc = "fine-tuning" if recipe.finetune else "linear evaluation"
    bar = tqdm(total=total, initial=run.start, desc=desc, disable=processes.rank != 0,
               dynamic_ncols=True)
    per_epoch, losses, tick = total // recipe.epochs, [], time.perf_counter()
    iteration, signalled = run.start, False
    with virtex.preemption() as preempted:
        for iteration, (images, labels) in enumerate(loader, run.start + 1):
            losses.append(train_step(run, net, images, labels, iteration - 1, total))
            bar.update()
            signalled = virtex.any_rank(preempted, processes.group)
            epoch_end, seconds = iteration % per_epoch == 0, time.perf_counter() - tick
            if epoch_end or signalled or iteration == stop:  # saving first: neither a failed
                save(run, iteration)  # evaluation nor a preemption's grace period costs training
            if epoch_end and not signalled:
                run.top, run.evaluated = evaluate(run, val, image_size), iteration
                log_epoch(run, iteration // per_epoch, iteration, losses, seconds, bar)
                losses, tick = [], time.perf_counter()
            if signalled or iteration == stop:
                break
    bar.close()
    return not virtex.stopped_early(iteration, total, signalled)


def classify(visual, splits, image_size, out, recipe, processes):
    """(top-1, top-5) in percent on splits.val after training on splits.train: a linear layer on
    the frozen backbone (eval mode: BatchNorm statistics stay), or with recipe.finetune the whole
    network (`visual` in place, BatchNorm per process in training mode, as the official). Resumes
    from OUT/last.pt; None when stopped early (--stop-after, a signal)."""
    virtex.check_batch(recipe.batch_size, processes.world)
    if processes.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
    mode, grads = visual.training, [p.requires_grad for p in visual.parameters()]
    visual.train(recipe.finetune).requires_grad_(recipe.finetune)  # frozen: autograd stays out
    try:
        run = start_run(visual, splits, image_size, out, recipe, processes)
        data = TrainViews(splits.train, image_size)
        # Epochs of whole batches, as the official: 5,005 iterations on ImageNet, 1,710 on iNat.
        total = recipe.epochs * math.ceil(len(data) / recipe.batch_size)
        if run.start >= total:
            virtex.print0(f"{run.out}/last.pt is at iteration {run.start}: nothing to train")
        elif not train_epochs(run, data, splits.val, image_size, total):
            return None
        return run.top if run.evaluated == total else evaluate(run, splits.val, image_size)
    finally:
        visual.train(mode)
        for p, g in zip(visual.parameters(), grads):
            p.requires_grad_(g)


# ----------------------------------------------------------------------------------------------
# Zero-shot classification by captions, as CapPa's scoring classifier (Tschannen et al. 2023):
# an image's score for a class is the log-likelihood of a caption naming it ("a picture of a red
# circle") under the captioning heads. Nothing is trained; the labels only grade the answers.

PROMPT = "a picture of a {}"
SPELLED_OUT = {"diningtable": "dining table", "pottedplant": "potted plant",
               "tvmonitor": "tv monitor"}  # VOC07's class names that are not words
PAIRS = 1024  # (image, caption) pairs per decoder call
BOTH, FORWARD = "forward + backward, sum", "forward, sum"  # the default scorings


def class_words(name):
    """A class name as a caption says it: VOC07's run-together names spelled out, '_' a space."""
    return SPELLED_OUT.get(name, name).replace("_", " ")


def class_captions(tokenizer, classes, prompt, max_length):
    """(C, T) `[SOS] prompt [EOS]` of each class name, right-padded."""
    if prompt.count("{}") != 1:
        raise ValueError(f"--prompt {prompt!r} must hold {{}} once: the class name goes there")
    rows = []
    for name in classes:
        text = prompt.format(class_words(name))
        ids = [virtex.SOS, *tokenizer.encode(text), virtex.EOS]
        if len(ids) > max_length:
            raise ValueError(f"class {name!r}: {text!r} is {len(ids)} tokens, more than the "
                             f"{max_length} the model reads")
        if virtex.UNK in ids:
            virtex.print0(f"warning: class {name!r}: {text!r} has pieces outside the vocabulary, "
                          "which are not scored")
        rows.append(torch.tensor(ids))
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def caption_log_likelihoods(model, images, captions, pairs=PAIRS):
    """[(B, C) forward, and for bicaptioning backward] log p(caption | image) of every image and
    every caption (C, T): the sum over the tokens after [SOS] of log p(token | image, the tokens
    before it), the backward head reading the caption reversed. The grid is computed once per
    image; the decoders score `pairs` (image, caption) pairs per call."""
    memory = model.textual.project(model.visual(images))  # (B, h*w, H)
    heads = [(model.textual, captions)]
    if model.cfg.task == "bicaptioning":
        reversed_ = virtex.reverse_captions(captions, virtex.lengths_of(captions))
        heads.append((model.backward_textual, reversed_))
    B, per_call, scores = len(images), max(1, pairs // len(images)), []
    for head, tokens in heads:
        parts = []
        for chunk in tokens.split(per_call):  # (c, T): c captions for each of the B images
            rows = chunk.repeat(B, 1)  # (B*c, T): image b's captions are rows b*c...b*c+c-1
            hidden = head(memory.repeat_interleave(len(chunk), 0), rows[:, :-1])  # (B*c, T-1, H)
            targets = rows[:, 1:]
            logp = head.output(hidden).float().log_softmax(-1).gather(2, targets[..., None])[..., 0]
            parts.append(logp.where(targets != virtex.PAD, 0.0).sum(1).view(B, -1))
        scores.append(torch.cat(parts, 1))
    return scores


@torch.no_grad()
def zero_shot_scores(model, evalset, captions, device, amp="bf16", group=None, desc=None):
    """(heads, N, C) caption log-likelihoods of a whole evaluation set (each rank scores its
    share; every rank gets all), the model in eval mode."""
    training = model.training
    model.eval()
    parts = []
    for keys, images in tqdm(evalset, desc=desc, total=len(evalset.batches), leave=False,
                             dynamic_ncols=True, disable=desc is None):
        images = virtex.to_input(images, device).contiguous(memory_format=torch.channels_last)
        with virtex.autocast(device, amp):
            scores = caption_log_likelihoods(model, images, captions.to(device))
        parts.append((keys, torch.stack(scores).float().cpu()))
    model.train(training)
    return torch.cat([x for _, x in virtex.gather(parts, group)], dim=1)


def scorings(scores, captions):
    """{scoring: (N, C)}: the sum of the token log-probabilities (big_vision's CapPa) or their
    mean (length-normalised), of the forward head and, with two heads, of both together."""
    tokens = (captions[:, 1:] != virtex.PAD).sum(1)  # scored per caption and head
    ways = {FORWARD: scores[0], "forward, mean": scores[0] / tokens}
    if len(scores) == 2:
        ways.update({BOTH: scores.sum(0), "forward + backward, mean": scores.sum(0) / (2 * tokens)})
    return ways


def grade(scores, labels):
    """(top-1, top-5) in percent for labels (N,), or (mAP,) for VOC07 labels (N, classes)."""
    if labels.dim() == 1:
        return top1_top5(scores, labels)
    return (voc07_aps(scores, labels).mean().item(),)


def top1_top5(scores, labels):
    best = scores.topk(min(5, scores.shape[1])).indices  # (N, 5)
    hits = best == labels[:, None]
    return 100 * hits[:, 0].double().mean().item(), 100 * hits.any(1).double().mean().item()


def captioners(args):
    """[(name, model, tokenizer)] of every --ckpt and, with --init random, of its initial weights
    (its config and seed, as train.py starts from them: the floor)."""
    if args.init not in (None, "random"):
        raise ValueError(f"--zero-shot takes --init random (each --ckpt at its initial weights), "
                         f"not {args.init!r}")
    found = []
    for path in args.ckpt:
        model, tokenizer = virtex.load_model(path)
        tokenizer = virtex.Tokenizer(args.vocab) if args.vocab else tokenizer
        if not model.cfg.captioning:
            raise ValueError(f"{path} was trained for {model.cfg.task}, which does not caption")
        if tokenizer is None or len(tokenizer) != model.cfg.vocab_size:
            raise ValueError(f"{path}: give --vocab, the {model.cfg.vocab_size}-token vocabulary "
                             "it was trained with (coco_10k.model for the official checkpoints)")
        found.append((Path(path).parent.name or str(path), model, tokenizer))
        if args.init:
            torch.manual_seed(model.cfg.seed)
            found.append((f"{found[-1][0]} at init", virtex.VirTex(model.cfg), tokenizer))
    if not found:
        raise ValueError("--zero-shot needs a captioning or bicaptioning --ckpt")
    return found


def zero_shot_set(args, rank):
    """(image paths, labels, class names): val of --imagenet/--inaturalist ((N,) labels) or the
    VOC07 test split ((N, classes) labels: 1 present, 0 absent, -1 difficult)."""
    data = classification_data(args)
    if data is None:
        return read_voc(voc_root(args, rank), "test")
    root, read = data
    items, classes = read(root, "val")
    if args.class_names:
        lines = Path(args.class_names).read_text().splitlines()
        classes = [line.strip() for line in lines if line.strip()]
        if len(classes) != max(label for _, label in items) + 1:
            raise ValueError(f"{args.class_names}: {len(classes)} names for the classes of {root}")
    elif any(re.fullmatch(r"n\d{8}", name) for name in classes):
        raise ValueError(f"{root}: the classes are WordNet ids (n01440764...), not words: give "
                         "--class-names FILE, one name a line in the order of the sorted folders")
    unnamed = [i for i, name in enumerate(classes) if not name]
    if unnamed:
        raise ValueError(f"{root}: category {unnamed[0]} has no name to caption")
    return [path for path, _ in items], torch.tensor([label for _, label in items]), classes


def zero_shot(args, processes):
    """--zero-shot: top-1 and top-5 (--imagenet, --inaturalist) or VOC07 mAP of every captioner
    and scoring, a table of them, the default scoring's number last."""
    rank, world, device, group = processes
    paths, labels, classes = zero_shot_set(args, rank)
    found, sets, results = captioners(args), {}, {}
    for name, model, tokenizer in found:
        size = args.image_size or model.cfg.image_size
        if size not in sets:  # several captioners of one image size decode the images once
            batches = virtex.shard(list(range(len(paths))), rank, world)
            sets[size] = virtex.EvalSet(Images(paths, size), batches, args.workers, cache=len(found) > 1)
        captions = class_captions(tokenizer, classes, args.prompt, model.cfg.max_length)
        scores = zero_shot_scores(model.to(device), sets[size], captions, device, model.cfg.amp,
                                  group, desc=f"zero-shot {name}" if rank == 0 else None)
        model.cpu()
        results[name] = {way: grade(s, labels) for way, s in scorings(scores, captions).items()}
    if rank == 0:
        zero_shot_report(results, "top-1" if labels.dim() == 1 else "mAP")


def zero_shot_report(results, measure):
    """A row per scoring, a column per captioner (top-1 / top-5, or mAP); last, the default
    scoring's (both heads summed for bicaptioning, else the forward sum)."""
    print(f"\n| zero-shot scoring | {' | '.join(results)} |\n|---|" + "---|" * len(results))
    for way in dict.fromkeys(way for table in results.values() for way in table):
        cells = [" / ".join(f"{v:.2f}" for v in table.get(way, ())) for table in results.values()]
        print(f"| {way} | " + " | ".join(cells) + " |")
    default = {name: table.get(BOTH, table[FORWARD])[0] for name, table in results.items()}
    if len(default) == 1:
        return print(f"zero-shot {measure}: {next(iter(default.values())):.2f}")
    print(f"zero-shot {measure}: " + " | ".join(f"{name} {v:.2f}" for name, v in default.items()))


# ----------------------------------------------------------------------------------------------
# Command line


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=virtex.HelpFormatter)
    g = p.add_argument_group("backbones")
    g.add_argument("--ckpt", nargs="+", default=[], help="ours or official (several: a table)")
    g.add_argument("--init", help="'random' (the floor) or 'torchvision:PATH' (a ResNet or ViT)")
    g.add_argument("--backbone", help="the ResNet or ViT of --init random (none: resnet50, or on "
                   "the toy VOC the demo's)")
    g.add_argument("--image-size", type=int, help="(none: the checkpoint's, else 224, or on the "
                   "toy VOC the demo's)")
    g = p.add_argument_group("VOC07 SVMs")
    g.add_argument("--voc", help="VOCdevkit/VOC2007 folder (none: the toy world's)")
    g.add_argument("--toy-dir", default="data/toy", help="where the toy world is written")
    g.add_argument("--features", help="cache file: extract once, rerun the SVMs in seconds")
    g.add_argument("--costs", type=float, nargs="+", default=list(COSTS), help="SVM costs C")
    g.add_argument("--folds", type=int, default=3, help="cross-validation folds")
    g.add_argument("--plot", help="PNG of mAP against pretraining images (several --ckpt)")
    g = p.add_argument_group("classification: top-1 instead of VOC07 (torchrun: one process a GPU)")
    data = g.add_mutually_exclusive_group()
    data.add_argument("--imagenet", help="ImageFolder root (train/<class>/*, val/<class>/*)")
    data.add_argument("--inaturalist", help="iNaturalist 2018 root (annotations/*2018.json)")
    g.add_argument("--finetune", action="store_true", help="train the whole network (iNaturalist "
                   "recipe), not a linear layer on the frozen backbone (ImageNet recipe)")
    g.add_argument("--out", default="runs/probe", help="last.pt and log.jsonl; rerun to resume")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=int, default=256, help="global batch")
    g.add_argument("--lr", type=float, help="(none: 0.3, or 0.025 with --finetune)")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"], help="autocast (none: off, or bf16 "
                   "with --finetune, as the official's fp32 and AMP)")
    g.add_argument("--seed", type=int, default=0, help="of the head, data order, augmentation")
    g.add_argument("--stop-after", type=int, help="stop at this iteration, as if preempted")
    g = p.add_argument_group("zero-shot: classify by captions (--imagenet, --inaturalist, --voc)")
    g.add_argument("--zero-shot", action="store_true", help="score a caption per class with a "
                   "captioning --ckpt (--init random: the --ckpt at its initial weights)")
    g.add_argument("--prompt", default=PROMPT, help="the caption, {} for the class name")
    g.add_argument("--class-names", help="file of class names, one a line (none: folder or "
                   "category names, '_' read as a space)")
    g.add_argument("--vocab", help="SentencePiece model of a --ckpt without one (official ones)")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=2, help="loader processes (per GPU)")
    g.add_argument("--benchmark", action="store_true", help="time the SVMs against scikit-learn "
                   "(with --zero-shot: time scoring captions)")
    g.add_argument("--quick", action="store_true", help="with --benchmark: a small problem")
    return p


def backbones(args):
    """[(name, visual, image size, config or None)] for every --ckpt and --init. On the toy VOC
    (no --voc, --imagenet or --inaturalist) --init is probed as the demo probes its floor: the
    toy preset's backbone and image size, unless given."""
    found = []
    for path in args.ckpt:
        model, _ = virtex.load_model(path)
        found.append((str(path), model.visual, model.cfg.image_size, model.cfg))
    if args.init:
        import train  # here, not at the top: train imports this module
        toy = args.voc is None and classification_data(args) is None
        backbone = args.backbone or (train.TOY["backbone"] if toy else "resnet50")
        size = args.image_size or (train.TOY["image_size"] if toy else 224)
        visual, size = load_backbone(args.init, backbone, image_size=size)
        found.append((args.init, visual, size, None))
    if not found:
        raise ValueError("nothing to probe: give --ckpt and/or --init")
    return [(name, visual, args.image_size or size, cfg) for name, visual, size, cfg in found]


def voc_root(args, rank):
    """--voc, or the toy world's VOC07 (written by rank 0 if missing)."""
    if args.voc is None:
        if rank == 0:
            virtex.make_toy_world(args.toy_dir)
        virtex.barrier()
        return Path(args.toy_dir) / "voc" / "VOCdevkit" / "VOC2007"
    return args.voc


def voc07_table(args, found, processes):
    """--voc (or the toy VOC): every backbone's per-class APs, a table of them, the mAP last."""
    rank, world, device, group = processes
    args.voc = voc_root(args, rank)
    if args.features and len(found) > 1:
        raise ValueError("--features caches one backbone's features: probe one at a time")
    vocs, results = {}, []  # several backbones of one image size decode VOC07 once
    for name, visual, size, cfg in found:
        start = time.perf_counter()
        if size not in vocs:
            vocs[size] = VOC07(args.voc, size, rank, world, args.workers, cache=len(found) > 1)
        voc, amp, visual = vocs[size], cfg.amp if cfg else "bf16", visual.to(device)
        voc.costs, voc.folds = tuple(args.costs), args.folds
        if args.features:
            splits = voc.cached_features(visual, device, args.features, amp, group)
        else:
            splits = voc.features(visual, device, amp, group, progress=rank == 0)
        if rank == 0:
            results.append((name, cfg, voc.evaluate(splits, device)))
            seconds = time.perf_counter() - start
            print(f"{name}: VOC07 mAP {results[-1][2].mean():.2f} ({seconds:.0f} s)")
    if rank == 0:
        report(results, voc.classes, args.plot)


def report(results, classes, plot_to=None):
    """The per-class table, the plot if asked, and the mAP line last."""
    names = [Path(name).parent.name or name for name, *_ in results]
    print(f"\n| class | {' | '.join(names)} |\n|---|" + "---|" * len(results))
    for c, name in enumerate(classes):
        print(f"| {name} | " + " | ".join(f"{aps[c]:.1f}" for *_, aps in results) + " |")
    if plot_to:
        plot(results, plot_to)
    if len(results) == 1:
        return print(f"mAP: {results[0][2].mean():.2f}")
    print("mAP: " + " | ".join(f"{name} {aps.mean():.2f}" for name, _, aps in results))


def plot(results, path, width=640, height=420):
    """mAP against the number of pretraining images, one line per task (Pillow only)."""
    from PIL import Image, ImageDraw
    points = {}
    for name, cfg, aps in results:
        if cfg is not None:
            points.setdefault(cfg.task, []).append((cfg.max_images, aps.mean().item()))
    xs = [x for line in points.values() for x, _ in line]
    ys = [y for line in points.values() for _, y in line]
    if None in xs or not xs:
        raise ValueError("--plot needs checkpoints trained with --max-images")
    lo, hi = math.log(min(xs)), math.log(max(xs)) + 1e-9
    y0, y1 = min(ys) - 2, max(ys) + 2
    at = lambda x, y: (60 + (math.log(x) - lo) / (hi - lo) * (width - 180),
                       height - 40 - (y - y0) / (y1 - y0) * (height - 70))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(60, 30), (60, height - 40), (width - 100, height - 40)], fill="black")
    for y in range(math.ceil(y0), math.floor(y1) + 1, max(1, round((y1 - y0) / 6))):
        draw.text((55, at(min(xs), y)[1]), f"{y}", fill="black", anchor="rm")
    for x in sorted(set(xs)):
        draw.text((at(x, y0)[0], height - 35), f"{x}", fill="black", anchor="mt")
    draw.text((width // 2 - 40, height - 18), "pretraining images", fill="black", anchor="mt")
    draw.text((10, 12), "toy VOC07 mAP", fill="black")
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    for (task, line), color in zip(sorted(points.items()), colors):
        line = [at(x, y) for x, y in sorted(line)]
        draw.line(line, fill=color, width=3)
        for x, y in line:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        draw.text((line[-1][0] + 8, line[-1][1]), task, fill=color, anchor="lm")
    image.save(path)


def classification(args, found, processes):
    """--imagenet or --inaturalist: train and test every backbone (each in OUT/<its name> when
    there are several); a table of them, and the top-1 last."""
    if processes.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: the fastest convolutions
    splits = read_splits(*classification_data(args))
    recipe = Recipe(args.finetune, args.epochs, args.batch_size, args.lr, amp=args.amp,
                    seed=args.seed, workers=args.workers, stop_after=args.stop_after)
    results = []
    for name, visual, size, _ in found:
        out = Path(args.out) / (re.sub(r"[^\w.-]+", "_", name) if len(found) > 1 else "")
        top = classify(visual, splits, size, out, recipe, processes)
        if top is not None:
            results.append((name, *top))
            virtex.print0(f"{name}: top-1 {top[0]:.2f}, top-5 {top[1]:.2f}")
    if len(results) > 1:
        virtex.print0("\n| backbone | top-1 | top-5 |\n|---|---|---|")
        for name, top1, top5 in results:
            virtex.print0(f"| {Path(name).parent.name or name} | {top1:.2f} | {top5:.2f} |")
    if len(results) == 1:
        virtex.print0(f"top-1: {results[0][1]:.2f}")
    elif results:
        virtex.print0("top-1: " + " | ".join(f"{name} {top1:.2f}" for name, top1, _ in results))


def main(args):
    if args.benchmark:
        return benchmark_zero_shot(args.quick) if args.zero_shot else benchmark(args.quick)
    processes = virtex.init_processes()
    if args.zero_shot:
        zero_shot(args, processes)
    elif classification_data(args):
        classification(args, backbones(args), processes)
    else:
        voc07_table(args, backbones(args), processes)
    if dist.is_initialized():
        dist.destroy_process_group()


# ==============================================================================================
# Off the main path: --benchmark

# ----------------------------------------------------------------------------------------------
# Benchmark: our SVMs against the scikit-learn protocol on VOC07-sized features

def synthetic_features(n_train=5011, n_test=4952, dim=2048, classes=20, seed=0):
    """Stand-in VOC07 features: non-negative, a shared mean direction, 1-3 classes per image,
    weak instances marked difficult, L2-normalised. (x_train, y_train, x_test, y_test)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    prototypes = (torch.randn(classes, dim, generator=g) - 0.5).relu()
    present = torch.zeros(n, classes)
    for i, k in enumerate(torch.randint(1, 4, (n,), generator=g).tolist()):
        present[i, torch.randperm(classes, generator=g)[:k]] = 1
    strength = present * torch.rand(n, classes, generator=g)
    noise = torch.rand(dim, generator=g) + torch.randn(n, dim, generator=g)
    x = F.normalize((0.5 * strength @ prototypes + noise).relu(), dim=1)
    y = torch.where(strength > 0.1, 1, torch.where(present > 0, -1, 0))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def sklearn_voc07(x_train, y_train, x_test, y_test, processes=2):
    """Per-class test AP of the official script's scikit-learn calls, a class per process."""
    data = tuple(t.numpy() for t in (x_train, y_train, x_test, y_test))
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        aps = pool.map(functools.partial(sklearn_class, data), range(y_train.shape[1]))
    return torch.tensor(aps)


def sklearn_class(data, c):
    """The official script's steps for class c: LinearSVC per cost, 3-fold CV AP, refit, test AP."""
    import numpy as np
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import LinearSVC
    x_train, y_train, x_test, y_test = data
    y = np.where(y_train[:, c] == 1, 1, -1)
    best_ap, best = 0.0, None
    for cost in (0.01, 0.1, 1.0, 10.0):
        svm = LinearSVC(C=cost, penalty="l2", loss="squared_hinge", class_weight={1: 2, -1: 1},
                        max_iter=2000)
        ap = cross_val_score(svm, x_train, y, cv=3, scoring="average_precision").mean()
        svm.fit(x_train, y)
        best_ap, best = (ap, svm) if ap > best_ap else (best_ap, best)
    keep = y_test[:, c] != -1
    return 100 * average_precision_score(y_test[keep, c] == 1, best.decision_function(x_test[keep]))


def benchmark(quick=False):
    sizes = dict(n_train=1000, n_test=1000, dim=256) if quick else {}
    x_train, y_train, x_test, y_test = synthetic_features(**sizes)
    print(f"features: trainval {tuple(x_train.shape)}, test {tuple(x_test.shape)}, "
          f"{torch.get_num_threads()} threads")
    start = time.perf_counter()
    ours = evaluate_svms(x_train, y_train, x_test, y_test).mean().item()
    seconds = time.perf_counter() - start
    print(f"torch (all problems batched): {seconds:7.2f} s  mAP {ours:.3f}")
    if importlib.util.find_spec("sklearn") is None:
        return print("scikit-learn not installed: skipping the reference protocol")
    start = time.perf_counter()
    reference = sklearn_voc07(x_train, y_train, x_test, y_test).mean().item()
    sk_seconds = time.perf_counter() - start
    print(f"scikit-learn (Pool(2), a class per process): {sk_seconds:7.2f} s  mAP {reference:.3f}")
    print(f"difference {ours - reference:+.3f} mAP, speed-up {sk_seconds / seconds:.1f}x")


def benchmark_zero_shot(quick=False, images=4, classes=32, tokens=10):
    """Zero-shot caption scores (image, class) per second of the paper's model (R-50 at 224 px,
    H2048 bicaptioning, 10k vocabulary; the demo's with --quick) here, both heads, and the FLOPs
    of a score; then what ImageNet's 1,000 classes x 50,000 images take at that rate."""
    demo = dict(backbone="resnet18", hidden=256, vocab_size=128, image_size=64)
    cfg = virtex.Config(**(demo if quick else {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = virtex.VirTex(cfg).to(device).eval()
    pictures = torch.randint(0, 256, (images, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    first = len(virtex.SPECIAL_PIECES)
    captions = torch.randint(first, cfg.vocab_size, (classes, tokens), device=device)
    captions[:, 0], captions[:, -1] = virtex.SOS, virtex.EOS  # "[SOS] a picture of a ... [EOS]"
    run = lambda: caption_log_likelihoods(model, virtex.to_input(pictures, device), captions)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), virtex.autocast(device, cfg.amp):
        run()  # warmup
        sync()
        start = time.perf_counter()
        run()
        sync()
        seconds = time.perf_counter() - start
        with FlopCounterMode(display=False) as counter:
            run()
    scores = images * classes
    rate, flops = scores / seconds, counter.get_total_flops() / scores
    print(f"{cfg.backbone} {cfg.task} L{cfg.layers} H{cfg.hidden} vocab {cfg.vocab_size}, "
          f"{cfg.image_size} px, {images} images x {classes} captions of {tokens} tokens, "
          f"{device}, {torch.get_num_threads()} threads: {rate:.1f} scores/s, {flops / 1e9:.2f} "
          "GFLOP a score (the grid included, once per image)")
    print(f"ImageNet at this rate (an extrapolation: 1,000 classes x 50,000 images = 5e7 scores, "
          f"{5e7 * flops / 1e15:.0f} PFLOP): {5e7 / rate / 3600:.1f} hours")


def cli(argv=None):
    with virtex.one_line_errors():
        main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
