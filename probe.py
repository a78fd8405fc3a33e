"""Judge a backbone the way the paper does (section 4.1 and appendix).

    python probe.py --ckpt runs/toy/last.pt                     # VOC07 SVMs on the toy VOC
    python probe.py --ckpt CKPT --voc datasets/VOC2007          # the paper's number (88.7 mAP)
    python probe.py --init random --voc datasets/VOC2007        # the floor
    python probe.py --ckpt CKPT --imagenet datasets/imagenet    # linear evaluation, top-1

VOC07: frozen backbone, global-average-pooled layer4 features, L2-normalised; per class a
linear SVM with its cost picked by 3-fold cross-validated AP on trainval; AP on test.
"""
import argparse
import functools
import importlib.util
import math
import multiprocessing
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import virtex

# ----------------------------------------------------------------------------------------------
# Backbones: ours, the official code's, a torchvision ResNet, or a random initialisation

def load_backbone(init, backbone="resnet50", seed=0):
    """(visual, 224) for --init random (seeded) or --init torchvision:PATH (a ResNet state dict)."""
    if init == "random":
        torch.manual_seed(seed)
        return virtex.Visual(backbone), 224
    if init and init.startswith("torchvision:"):
        path = init.split(":", 1)[1]
        state = {k: v for k, v in virtex.load_checkpoint(path).items() if not k.startswith("fc.")}
        name = virtex.infer_backbone({f"visual.cnn.{k}": v for k, v in state.items()})
        visual = virtex.Visual(name)
        visual.cnn.load_state_dict(state)
        return visual, 224
    raise ValueError(f"--init must be 'random' or 'torchvision:PATH', not {init!r}")


# ----------------------------------------------------------------------------------------------
# Features: short side 256/224 of the image size, centre crop, GAP of layer4, L2-normalised.
# Every rank decodes its share of an evaluation set once; the features are gathered.

class Images(torch.utils.data.Dataset):
    """Evaluation views (uint8): short side 256/224 of the image size, centre crop."""

    def __init__(self, paths, image_size):
        self.paths, self.size = paths, image_size
        self.resize = round(image_size * 256 / 224)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = virtex.load_image(self.paths[i], self.resize)
        return virtex.eval_image(image, self.resize, self.size)


def shard(keys, rank=0, world=1, batch_size=64):
    """This rank's batches of `keys`. The batches are the same whatever the number of processes
    (dealt round-robin), so a sharded evaluation computes what an unsharded one does."""
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    return batches[rank::world]


class EvalSet:
    """Batches of a dataset that never change (no augmentation): this rank's share, decoded once
    with `cache`, its uint8 images then kept in host memory, so that every later evaluation is
    forward passes only. Iterating yields (keys, collated batch)."""

    def __init__(self, data, batches, workers=2, cache=True, collate=None):
        self.data, self.batches, self.workers = data, batches, workers
        self.collate = collate or torch.utils.data.default_collate
        self.cache, self.decoded = cache, None

    def __iter__(self):
        if self.decoded is not None:
            return zip(self.batches, self.decoded)
        loader = torch.utils.data.DataLoader(self.data, batch_sampler=self.batches,
                                             num_workers=self.workers, collate_fn=self.collate)
        if not self.cache:
            return zip(self.batches, loader)
        self.decoded = list(loader)
        return zip(self.batches, self.decoded)

    def nbytes(self):
        """Host memory the decoded batches hold."""
        batches = [batch if isinstance(batch, list) else [batch] for batch in self.decoded or []]
        return sum(t.nbytes for batch in batches for t in batch if torch.is_tensor(t))


def gather(parts, group):
    """Every rank's [(keys, result)], in the order of the keys, on every rank."""
    if group is not None:
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, parts, group=group)
        parts = [part for rank_parts in everyone for part in rank_parts]
    return sorted(parts, key=lambda part: part[0][0])


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
    return torch.cat([x for _, x in gather(parts, group)])


# ----------------------------------------------------------------------------------------------
# The SVMs: scikit-learn's LinearSVC (liblinear) protocol, every problem solved at once in torch

COSTS = (0.01, 0.1, 1.0, 10.0)  # the official sweep of the SVM cost C

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
    y_test = y_test.cpu()
    kept = y_test != -1  # difficult test images are left out
    aps = [average_precision(test_scores[kept[:, c], c], y_test[kept[:, c], c] == 1)
           for c in range(classes)]
    return 100 * torch.tensor(aps)


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


class VOC07:
    """The VOC07 probe of one VOC folder at one image size: per split this rank's evaluation set
    (decoded once, see EvalSet) and the labels; the SVM protocol's costs and folds."""

    def __init__(self, root, image_size, rank=0, world=1, workers=2, cache=True):
        self.root, self.image_size, self.costs, self.folds = Path(root), image_size, COSTS, 3
        self.splits = {}
        for split in ("trainval", "test"):
            paths, labels, self.classes = read_voc(root, split)
            batches = shard(list(range(len(paths))), rank, world)
            self.splits[split] = EvalSet(Images(paths, image_size), batches, workers, cache), labels

    def features(self, visual, device, amp="bf16", group=None, progress=False):
        """{"trainval": (x, y), "test": (x, y)}, every rank extracting its share."""
        bar = lambda split: f"VOC07 {split}" if progress else None
        return {split: (extract(visual, data, device, amp, group, bar(split)), labels)
                for split, (data, labels) in self.splits.items()}

    def cached_features(self, visual, device, path, amp="bf16", group=None):
        """features(), kept in the file `path` to rerun the SVMs in seconds. The file remembers
        the weights, VOC folder and image size it holds, and refuses others."""
        tensors = visual.state_dict().values()
        weights = sum(p.double().sum().item() for p in tensors if p.is_floating_point())
        key = {"voc": str(self.root.resolve()), "image_size": self.image_size,
               "weights": round(weights, 6)}
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
# ImageNet-style linear evaluation (paper appendix): a linear layer on frozen pooled features

def linear_eval(visual, root, image_size, device, epochs=100, batch_size=256, lr=0.3, workers=4):
    """Top-1 (percent) on ROOT/val of a linear classifier trained on ROOT/train (ImageFolder
    layout) over the frozen backbone, BN in eval mode: SGD momentum 0.9, no weight decay,
    cosine decay from `lr`, random resized crops of scale 0.08-1 and flips."""
    import torchvision
    from torchvision import transforms as T
    augment = T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0)),
                         T.RandomHorizontalFlip(), T.PILToTensor()])
    resize = round(image_size * 256 / 224)
    view = functools.partial(virtex.eval_image, resize=resize, size=image_size)
    train = torchvision.datasets.ImageFolder(Path(root) / "train", augment)
    val = torchvision.datasets.ImageFolder(Path(root) / "val", view)
    loader = torch.utils.data.DataLoader(train, batch_size, shuffle=True, num_workers=workers,
                                         drop_last=len(train) > batch_size)
    training = visual.training
    visual.eval()  # frozen, BatchNorm statistics included
    head = torch.nn.Linear(visual.channels, len(train.classes)).to(device)
    torch.nn.init.normal_(head.weight, std=0.01)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr, momentum=0.9, weight_decay=0)
    total, step = epochs * len(loader), 0
    for _ in tqdm(range(epochs), desc="linear eval", dynamic_ncols=True):
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr * virtex.lr_multiplier(step, 0, total)  # cosine, no warmup
            with torch.no_grad():
                x = features(visual, images, device)
            loss = F.cross_entropy(head(x), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(val, batch_size, num_workers=workers):
            predicted = head(features(visual, images, device)).argmax(1).cpu()
            correct += (predicted == labels).sum().item()
    visual.train(training)
    return 100 * correct / len(val)


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


# ----------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and states every default."""


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("backbones")
    g.add_argument("--ckpt", nargs="+", default=[], help="ours or official (several: a table)")
    g.add_argument("--init", help="'random' (the floor) or 'torchvision:PATH' (a ResNet)")
    g.add_argument("--backbone", default="resnet50", help="the ResNet of --init random")
    g.add_argument("--image-size", type=int, help="(none: the checkpoint's, else 224)")
    g = p.add_argument_group("VOC07 SVMs")
    g.add_argument("--voc", help="VOCdevkit/VOC2007 folder (none: the toy world's)")
    g.add_argument("--toy-dir", default="data/toy", help="where the toy world is written")
    g.add_argument("--features", help="cache file: extract once, rerun the SVMs in seconds")
    g.add_argument("--costs", type=float, nargs="+", default=list(COSTS), help="SVM costs C")
    g.add_argument("--folds", type=int, default=3, help="cross-validation folds")
    g.add_argument("--plot", help="PNG of mAP against pretraining images (several --ckpt)")
    g = p.add_argument_group("linear evaluation")
    g.add_argument("--imagenet", help="ImageFolder root (train/, val/): top-1 instead of VOC07")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=int, default=256, help="global batch")
    g.add_argument("--lr", type=float, default=0.3, help="peak LR (cosine decay)")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=2, help="loader processes")
    g.add_argument("--benchmark", action="store_true", help="time the SVMs against scikit-learn")
    g.add_argument("--quick", action="store_true", help="with --benchmark: a small problem")
    return p


def backbones(args):
    """[(name, visual, image size, config or None)] for every --ckpt and --init."""
    found = []
    for path in args.ckpt:
        model, _ = virtex.load_model(path)
        found.append((str(path), model.visual, model.cfg.image_size, model.cfg))
    if args.init:
        visual, size = load_backbone(args.init, args.backbone)
        found.append((args.init, visual, size, None))
    if not found:
        raise ValueError("nothing to probe: give --ckpt and/or --init")
    return [(name, visual, args.image_size or size, cfg) for name, visual, size, cfg in found]


def main(args):
    if args.benchmark:
        return benchmark(args.quick)
    rank, world, device, group = virtex.init_processes()
    found = backbones(args)
    if args.imagenet:
        for name, visual, size, _ in found:
            top1 = linear_eval(visual.to(device), args.imagenet, size, device, args.epochs,
                               args.batch_size, args.lr, args.workers)
            print(f"{name}: top-1 {top1:.2f}")
        return
    if args.voc is None:
        if rank == 0:
            virtex.make_toy_world(args.toy_dir)
        virtex.barrier()
        args.voc = Path(args.toy_dir) / "voc" / "VOCdevkit" / "VOC2007"
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
    if dist.is_initialized():
        dist.destroy_process_group()


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


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None
