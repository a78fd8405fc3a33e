"""VirTex in one file: learn a ResNet from image captions by "bicaptioning".

Desai & Johnson, "VirTex: Learning Visual Representations from Textual Annotations",
CVPR 2021 (arXiv 2006.06666); official code: https://github.com/kdexd/virtex.

A ResNet turns an image into a grid of features (7x7x2048 for R-50 at 224 px). A forward
Transformer decoder reads the caption left to right and a backward one right to left, both
attending to the grid; the loss is the sum of their next-token cross-entropies. After
pretraining the heads are thrown away and the ResNet is the product (probe.py judges it).
`Config.parallel` adds CapPa's parallel prediction (Tschannen et al., NeurIPS 2023), off by default.

Deliberate differences from the official code (the README says why):
- the flip augmentation swaps the *words* "left"/"right", not every substring ("bright" stays);
- the LookAhead slow weights and step counter are checkpointed, so a resume is exact;
- data order and augmentation are a function of (seed, iteration, sample), not of process
  history, so a resumed run (or one on another number of GPUs) sees the same batches;
- attention is causal-only (captions are right-padded, so no valid query ever sees padding)
  and output logits are computed only where a target exists: same loss, less work;
- decoding keeps [SOS] in front of the generated tokens at every step, as in training.
"""
import argparse
import collections
import contextlib
import copy
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import tarfile
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

PAD = UNK = 0  # the official vocabulary pads with <unk>: an unknown word is ignored like padding
SOS, EOS, MASK = 1, 2, 3
TASKS = ("bicaptioning", "captioning", "masked_lm", "token_classification", "multilabel_classification")
RESNETS = [name for name in torchvision.models.resnet.__all__ if name[0].islower()]  # resnet50, ...

@dataclass
class Config:
    """Every setting of a run. Defaults are the paper's best model, bicaptioning_R_50_L1_H2048."""
    # model
    task: str = "bicaptioning"
    backbone: str = "resnet50"  # any torchvision ResNet, or a ViT (see vision_transformer)
    layers: int = 1
    hidden: int = 2048
    heads: int = None  # None: hidden // 64, the official convention
    feedforward: int = None  # None: 4 * hidden
    norm_first: bool = False  # the paper's heads are post-norm
    dropout: float = 0.1
    vocab_size: int = 10_000
    max_length: int = 30  # tokens per caption, [SOS] and [EOS] included
    parallel: float = 0.0  # CapPa: probability a caption is predicted from the image alone (0: VirTex)
    # data
    image_size: int = 224
    crop_scale: float = 0.2  # smallest area fraction of the random resized crop
    max_images: int = None  # pretrain on N images only (data-efficiency studies)
    batch_size: int = 256  # global: split across processes
    workers: int = 4  # DataLoader processes per training process
    # optimisation
    optimizer: str = "sgd"  # "adamw" is the official code's other choice
    lr: float = 1e-3  # everything but the backbone
    cnn_lr: float = 0.2  # the backbone (the paper's CNN)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lookahead_k: int = 5
    lookahead_alpha: float = 0.5
    clip_grad: float = 10.0
    warmup: int = 10_000
    iterations: int = 500_000
    seed: int = 0
    # speed: how the maths is run, not what it is (a run may resume with other values)
    amp: str = "bf16"  # autocast where native: "bf16", "fp16" (GPU + GradScaler, the official), "off"
    channels_last: bool = True  # NHWC activations: the faster convolution kernels on GPU and CPU
    compile: bool = False  # torch.compile the model (checkpoints keep the plain module's weights)

    def __post_init__(self):
        self.heads = self.heads or self.hidden // 64 or 1
        self.feedforward = self.feedforward or 4 * self.hidden
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {self.batch_size}")
        if self.amp not in ("bf16", "fp16", "off"):
            raise ValueError(f"amp must be bf16, fp16 or off, not {self.amp!r}")
        if not 0 <= self.parallel <= 1:
            raise ValueError(f"parallel is a probability, in [0, 1], not {self.parallel}")
        if self.parallel and not self.captioning:
            raise ValueError(f"parallel prediction is for captioning and bicaptioning, not {self.task}")

    @property
    def captioning(self):  # a forward captioning head: the model writes captions
        return self.task in ("bicaptioning", "captioning")

    @property
    def classification(self):  # labels predicted from the pooled grid: no decoder
        return self.task.endswith("classification")

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

# ----------------------------------------------------------------------------------------------
# Tokenizer: SentencePiece BPE, trained on normalised COCO captions (spec section 3)

SPECIAL_PIECES = {"<unk>": UNK, "[SOS]": SOS, "[EOS]": EOS, "[MASK]": MASK}

def normalize(text):
    """Lowercase and strip accents: what the official code does to every caption it reads."""
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in text if not unicodedata.combining(c))

class Tokenizer:
    """BPE vocabulary with the official ids: <unk> (= padding) 0, [SOS] 1, [EOS] 2, [MASK] 3. Holds
    the model as bytes, so it pickles into DataLoader workers and travels inside checkpoints."""

    def __init__(self, model):
        name = "vocabulary" if isinstance(model, bytes) else model
        self.model = model if isinstance(model, bytes) else Path(model).read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        except RuntimeError:
            raise ValueError(f"{name}: not a SentencePiece model") from None
        for piece, i in SPECIAL_PIECES.items():  # ids the model is built on: check them by piece
            found = self.sp.piece_to_id(piece)
            if found != i or not (self.sp.is_unknown(i) or self.sp.is_control(i)):
                raise ValueError(f"{name}: {piece} is id {found}, not {i}; build it with Tokenizer.train (unk_id=0 "
                                 "bos_id=-1 eos_id=-1 control_symbols=[SOS],[EOS],[MASK])")

    @classmethod
    def train(cls, captions, prefix=None, vocab_size=10_000):
        """Train on an iterable of captions (the official trainer flags); write PREFIX.model."""
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(normalize(c) for c in captions), model_writer=buffer,
                model_type="bpe", vocab_size=vocab_size, character_coverage=1.0, bos_id=-1,
                eos_id=-1, control_symbols=["[SOS]", "[EOS]", "[MASK]"], minloglevel=2)
        except RuntimeError as e:  # e.g. "Vocabulary size too high (10000). Please set it to..."
            raise ValueError(f"cannot build a {vocab_size}-token vocabulary from these captions: {e}") from None
        if prefix is not None:
            Path(f"{prefix}.model").write_bytes(buffer.getvalue())
        return cls(buffer.getvalue())

    def encode(self, text):
        return self.sp.encode(normalize(text))

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def __len__(self):
        return len(self.sp)

    def __reduce__(self):  # pickled as its model's bytes
        return Tokenizer, (self.model,)

# ----------------------------------------------------------------------------------------------
# Data: images and their captions (COCO Captions, or any source `caption_source` reads: below the
# banner). Samples leave the loader as uint8 images; `to_input` normalises them on the device.

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet

def mix_seed(*parts):
    """One seed from integers (run seed, epoch, position, rank, ...). Every random draw of a run
    is seeded by where it happens, never by process history: a resumed run repeats it exactly."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

def swap_left_right(caption):
    """The flip augmentation's caption edit (paper section 3.2): whole words only, any case."""
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m[0].lower() == "left" else "left", caption, flags=re.I)

class Augmentation(NamedTuple):
    """One sample's draw of the paper's augmentation (section 3.2), in the image's pixels."""
    box: tuple  # (top, left, height, width) of the random resized crop
    flip: bool  # mirror the image (and swap "left" and "right" in its caption)
    jitter: tuple  # (brightness, contrast, saturation, hue) factors, () for no colour jitter
    order: tuple  # the order the four colour adjustments are applied in

def draw_augmentation(width, height, crop_scale, generator, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop(scale=(crop_scale, 1)), a flip with p 0.5 and, with p 0.8,
    ColorJitter(0.4, 0.4, 0.4, 0.1), drawn from `generator` as torchvision draws them."""
    area, log_ratio = width * height, (math.log(ratio[0]), math.log(ratio[1]))
    side = min(width, height)  # fallback: the central square
    box = ((height - side) // 2, (width - side) // 2, side, side)
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (crop_scale + u[0] * (1 - crop_scale))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            box = (top, left, h, w)
            break
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    jitter, order = (), (0, 1, 2, 3)
    if torch.rand(1, generator=generator) < 0.8:
        u = torch.rand(4, generator=generator).tolist()
        jitter = (0.6 + 0.8 * u[0], 0.6 + 0.8 * u[1], 0.6 + 0.8 * u[2], -0.1 + 0.2 * u[3])
        order = tuple(torch.randperm(4, generator=generator).tolist())
    return Augmentation(box, flip, jitter, order)

COLOR_ADJUSTMENTS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)

def augment(image, augmentation, size):
    """Apply a drawn augmentation to a PIL image: a (3, size, size) uint8 tensor."""
    image = TF.resized_crop(image, *augmentation.box, [size, size], antialias=True)
    if augmentation.flip:
        image = TF.hflip(image)
    for i in augmentation.order if augmentation.jitter else ():
        image = COLOR_ADJUSTMENTS[i](image, augmentation.jitter[i])
    return TF.pil_to_tensor(image)

def eval_image(image, resize, size):
    """Short side to `resize`, centre crop `size` (224/224 pretraining val, 256/224 downstream)."""
    return TF.pil_to_tensor(TF.center_crop(TF.resize(image, resize, antialias=True), size))

def to_input(images, device):
    """uint8 images (B, 3, S, S) -> the network's float input on `device`, normalised there."""
    images = images.to(device, non_blocking=True).float().div_(255)
    mean, std = (torch.tensor(v, device=device).view(3, 1, 1) for v in (MEAN, STD))
    return images.sub_(mean).div_(std)

def load_image(source, size=None):
    """Any image PIL reads (greyscale, CMYK, palette, alpha, 16-bit) as 8-bit RGB, from a path or
    what has .read() (a tar member). With `size`, a JPEG decodes at the largest power-of-2
    reduction that keeps both sides >= size (draft mode)."""
    with Image.open(io.BytesIO(source.read()) if hasattr(source, "read") else source) as image:
        if size is not None:
            image.draft("RGB", (size, size))
        if image.mode.startswith("I"):  # 16/32-bit greyscale: keep the top 8 of 16 bits
            image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # -> white
            white = Image.new("RGBA", image.size, "white")
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return image.convert("RGB")

UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

def first_images(items, n):
    """The pretraining subset of --max-images N: the same N images (smallest ids) for every task."""
    return sorted(items, key=lambda item: item[0].name)[:n] if n else items

class CaptioningDataset(torch.utils.data.Dataset):
    """One image and one of its captions, as (uint8 image, [SOS] tokens [EOS]), from the items of
    any source (`caption_source`; a training set: the first --max-images), or a list of categories
    (`read_categories`) as its own target. Indexed by (image index, seed): the seed alone decides
    the caption drawn and the augmentation. train.py's --decode device overrides `open`, `augment`."""

    def __init__(self, items, tokenizer, cfg, train=True):
        self.items = first_images(items, cfg.max_images) if train else items
        self.tokenizer, self.train = tokenizer, train
        self.size, self.crop_scale, self.max_length = cfg.image_size, cfg.crop_scale, cfg.max_length

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        """(image, tokens, [unreadable images met on the way, each replaced by a random other])."""
        index, seed = key
        generator = torch.Generator().manual_seed(seed)
        skipped = []
        while True:
            path, captions = self.items[index]
            try:
                image = self.open(path)
                break
            except UNREADABLE as e:
                skipped.append(f"{path}: {e}")
                if len(skipped) == 100:
                    raise RuntimeError(f"100 unreadable images in a row, e.g. {skipped[0]}") from None
                index = int(torch.randint(len(self.items), (1,), generator=generator))
        return self.sample(image, captions, generator, skipped)

    def sample(self, image, captions, generator, skipped):
        """(view of the image, tokens of one of the captions, skipped), drawn from `generator`."""
        caption = captions[int(torch.randint(len(captions), (1,), generator=generator))]
        if not self.train:
            return eval_image(image, self.size, self.size), self.tokens(caption), skipped
        augmentation = draw_augmentation(*image.size, self.crop_scale, generator)
        return self.augment(image, augmentation), self.tokens(caption, augmentation.flip), skipped

    def open(self, path):  # training crops at scale 0.2 need every pixel; evaluation, draft mode
        return load_image(path, None if self.train else self.size)

    def augment(self, image, augmentation):
        return augment(image, augmentation, self.size)

    def tokens(self, caption, flipped=False):
        if not isinstance(caption, str):  # category indices: multi-label classification
            return torch.tensor(caption)
        # Truncation keeps the first max_length ids: a cut caption has no [EOS], as in the official.
        text = swap_left_right(caption) if flipped else caption
        return torch.tensor([SOS, *self.tokenizer.encode(text), EOS][:self.max_length])

def collate(batch):
    """Stack images (or list them, if not tensors); right-pad token sequences with 0."""
    images, tokens, skipped = zip(*batch)
    lengths = torch.tensor([len(t) for t in tokens])
    padded = nn.utils.rnn.pad_sequence(tokens, batch_first=True)
    images = torch.stack(images) if torch.is_tensor(images[0]) else list(images)
    return images, padded, lengths, sum(skipped, [])

class ResumableSampler(torch.utils.data.Sampler):
    """Endless shuffled passes over `n` images, cut into global batches of `batch_size`. Batch i
    is a pure function of (seed, i): each of `world` processes takes its disjoint slice, and each
    sample a seed of its own, so a run resumed at iteration i sees what the uninterrupted run saw."""

    def __init__(self, n, batch_size, seed, start, stop, rank=0, world=1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._epoch, self._order = None, None

    def order(self, epoch):
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=generator).tolist()
        return self._order

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        per_rank = self.batch_size // self.world
        for i in range(self.start, self.stop):
            first = i * self.batch_size + self.rank * per_rank
            positions = range(first, first + per_rank)  # in the endless sequence of samples
            yield [(self.order(p // self.n)[p % self.n], mix_seed(self.seed, p)) for p in positions]

# ----------------------------------------------------------------------------------------------
# Visual backbone: a torchvision ResNet trained from scratch, its layer4 grid feeds the heads (or a
# ViT's patch tokens, see vision_transformer). The one place that knows which: the rest asks Visual.

class Visual(nn.Module):
    def __init__(self, name="resnet50", image_size=224):
        super().__init__()
        if name not in RESNETS:
            self.vit = vision_transformer(name, image_size)  # not the paper's: below the banner
            self.channels = self.vit.hidden_dim
            return
        if image_size < 32:
            raise ValueError(f"image size {image_size} is too small: a ResNet needs 32 px")
        # zero_init_residual: every residual branch starts as identity (the official setting)
        self.cnn = getattr(torchvision.models, name)(zero_init_residual=True)
        self.channels = self.cnn.fc.in_features
        self.cnn.fc = nn.Identity()  # no fc.* keys, as in the official state dict

    def forward(self, images):  # (B, 3, S, S) -> (B, C, S/32, S/32), or a ViT's (B, D, S/p, S/p)
        if hasattr(self, "vit"):
            return patch_grid(self.vit, images)
        c = self.cnn
        x = c.maxpool(c.relu(c.bn1(c.conv1(images))))
        return c.layer4(c.layer3(c.layer2(c.layer1(x))))

    def no_weight_decay(self, name):
        """A ResNet decays every parameter, BatchNorms too (the official); a ViT: see
        vit_no_weight_decay."""
        return hasattr(self, "vit") and vit_no_weight_decay(name, self.get_parameter(name))

    def torchvision_model(self):  # its classifier removed: what export writes and --init loads
        return self.vit if hasattr(self, "vit") else self.cnn

def pooled(grid):
    """(B, C, h, w) -> (B, C): the global average pool the classification tasks and probes read."""
    return grid.float().mean((2, 3))

# ----------------------------------------------------------------------------------------------
# Textual head: projection of the grid, word + position embedding, Transformer decoder, output.
# Module names mirror the official ones (nn.TransformerDecoder inside), so checkpoints map 1:1.

class Embedding(nn.Module):
    def __init__(self, vocab_size, hidden, max_length, dropout):
        super().__init__()
        self.words = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.positions = nn.Embedding(max_length, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-8)  # the official eps
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens):  # (B, T) -> (B, T, H)
        x = self.words(tokens) + self.positions.weight[:tokens.shape[1]]
        x = self.dropout(self.layer_norm(x))
        return x * (tokens != PAD).unsqueeze(-1)  # padding (and <unk>) positions become zeros

class Attention(nn.Module):
    """nn.MultiheadAttention's parameters (packed q/k/v), computed by scaled_dot_product_attention."""

    def __init__(self, hidden, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden))
        self.out_proj = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, x, memory=None):
        """q from x (B, T, H), k and v from memory (B, N, H) or x: each (B, heads, T or N, H/heads)."""
        hidden = x.shape[-1]
        if memory is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(x, self.in_proj_weight[:hidden], self.in_proj_bias[:hidden])
            kv = F.linear(memory, self.in_proj_weight[hidden:], self.in_proj_bias[hidden:])
            k, v = kv.chunk(2, dim=-1)
        return [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v)]

    def forward(self, x, memory=None, causal=False, mask=None):
        """Self-attention on x, or cross-attention to memory; `mask` (B, 1, 1, T): visible keys."""
        q, k, v = self.project(x, memory)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, T, H)

class DecoderLayer(nn.Module):
    """nn.TransformerDecoderLayer (GELU): self-attention, cross-attention to the grid, MLP."""

    def __init__(self, hidden, heads, feedforward, dropout, norm_first):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(hidden, heads, dropout)
        self.multihead_attn = Attention(hidden, heads, dropout)
        self.linear1, self.linear2 = nn.Linear(hidden, feedforward), nn.Linear(feedforward, hidden)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(hidden) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def block(self, x, norm, f):
        if self.norm_first:
            return x + self.dropout(f(norm(x)))
        return norm(x + self.dropout(f(x)))

    def forward(self, x, memory, causal, mask):
        x = self.block(x, self.norm1, lambda y: self.self_attn(y, causal=causal, mask=mask))
        x = self.block(x, self.norm2, lambda y: self.multihead_attn(y, memory))
        return self.block(x, self.norm3, lambda y: self.linear2(self.dropout(F.gelu(self.linear1(y)))))

class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.hidden, cfg.heads, cfg.feedforward, cfg.dropout, cfg.norm_first)
            for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden) if cfg.norm_first else None  # pre-norm ends with one

    def forward(self, x, memory, causal, mask=None):
        for layer in self.layers:
            x = layer(x, memory, causal, mask)
        return x if self.norm is None else self.norm(x)

def init_weights(module):
    """The official initialisation: N(0, 0.02) weights; biases keep PyTorch's defaults."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, Attention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])

class TextualHead(nn.Module):
    def __init__(self, cfg, visual_channels):
        super().__init__()
        self.visual_projection = nn.Linear(visual_channels, cfg.hidden)
        self.embedding = Embedding(cfg.vocab_size, cfg.hidden, cfg.max_length, cfg.dropout)
        self.transformer = Decoder(cfg)
        with torch.no_grad():
            self.apply(init_weights)
        # Created after the init, so its bias keeps the default uniform(+-1/sqrt(H)), as there.
        self.output = nn.Linear(cfg.hidden, cfg.vocab_size)
        self.output.weight = self.embedding.words.weight  # tied input and output word embeddings

    def project(self, grid):  # (B, C, h, w) -> (B, h*w, H): one visual token per cell, no position
        return self.visual_projection(grid.flatten(2).transpose(1, 2))

    def forward(self, memory, tokens, causal=True, lengths=None, parallel=None):
        """Hidden states (B, T, H) for tokens (B, T) attending to the projected grid `memory`. Causal
        attention needs no padding mask (captions are right-padded, so a real token only sees real
        tokens); bidirectional attention (masked LM) masks keys at or beyond `lengths`. The rows
        marked in `parallel` (B,) attend to every position, the others causally."""
        mask = None
        if not causal:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            mask = (positions < lengths[:, None])[:, None, None]  # (B, 1, 1, T)
        if parallel is not None:
            T = tokens.shape[1]
            earlier = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
            causal, mask = False, earlier | parallel.view(-1, 1, 1, 1)  # (B, 1, T, T)
        return self.transformer(self.embedding(tokens), memory, causal, mask)

# ----------------------------------------------------------------------------------------------
# VirTex: the backbone, the forward head and the backward head (paper section 3.1)

def reverse_captions(tokens, lengths):
    """[SOS] a b [EOS] 0 0 -> [EOS] b a [SOS] 0 0: each row reversed within its length."""
    index = lengths[:, None] - 1 - torch.arange(tokens.shape[1], device=tokens.device)  # (B, T)
    return torch.where(index >= 0, tokens.gather(1, index.clamp(min=0)), PAD)

def lengths_of(tokens):
    """Length = last non-padding position + 1 (an interior <unk> does not end a caption; one cut
    at max_length right after an <unk> cannot be told from padding: train.py passes lengths)."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return ((tokens != PAD) * positions).amax(dim=1)

def mask_tokens(tokens, lengths, vocab_size, p=0.15, mask=0.85, replace=0.10):
    """The official masked-LM corruption: (input, labels). Per caption ceil(p * (T - 2)) positions
    among 1..T-2; each becomes [MASK] (prob. `mask`, or always if it is the only one) and is the
    only kind supervised; else a random id or itself, both unsupervised (unlike BERT)."""
    B, T = tokens.shape
    positions = torch.arange(T, device=tokens.device)
    allowed = (positions >= 1) & (positions < lengths[:, None] - 1)  # (B, T)
    count = (p * (lengths - 2).clamp(min=0)).ceil()[:, None]  # (B, 1)
    rank = torch.rand(B, T, device=tokens.device).masked_fill(~allowed, 2).argsort(1).argsort(1)
    chosen = rank < count  # a uniformly random subset of `count` allowed positions
    u = torch.rand(B, T, device=tokens.device)
    masked = chosen & ((u <= mask) | (count == 1))
    replaced = chosen & ~masked & (u <= mask + replace)
    inputs = torch.where(masked, MASK, torch.where(replaced, torch.randint_like(tokens, vocab_size), tokens))
    return inputs, torch.where(masked, tokens, PAD)

class VirTex(nn.Module):
    """A visual backbone and the textual head of `cfg.task`: the paper's bicaptioning, or one of
    the ablations of section 4.2 (captioning, masked LM, token or multi-label classification)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or Config()
        self.visual = Visual(cfg.backbone, cfg.image_size)
        if cfg.classification:  # one linear layer on the pooled grid, named as the official's
            self.textual = nn.ModuleDict({"output": nn.Linear(self.visual.channels, cfg.vocab_size)})
            return
        self.textual = TextualHead(cfg, self.visual.channels)
        if cfg.task == "bicaptioning":
            # A second decoder for the reversed caption, starting as an exact copy of the first;
            # the projection, the embedding and the output layer are shared (official layout).
            self.backward_textual = copy.deepcopy(self.textual)
            for name in ("visual_projection", "embedding", "output"):
                setattr(self.backward_textual, name, getattr(self.textual, name))

    def forward(self, images, tokens, lengths=None):
        """Training loss for images (B, 3, S, S) and captions (B, T) `[SOS] w.. [EOS] 0..` (or,
        for multi-label classification, the category ids of each image, 0-padded)."""
        if lengths is None:
            lengths = lengths_of(tokens)
        grid = self.visual(images)
        if self.cfg.classification:
            logits = self.textual.output(pooled(grid))  # (B, classes)
            return {"loss": self.classification_loss(logits, tokens, self.cfg.task)}
        memory = self.textual.project(grid)  # (B, h*w, H), shared by both heads
        if self.cfg.task == "masked_lm":
            inputs, labels = mask_tokens(tokens, lengths, self.cfg.vocab_size)
            return {"loss": self.token_loss(self.textual, memory, inputs, labels, False, lengths)}
        if self.training and self.cfg.parallel:
            loss_forward = self.parallel_loss(memory, tokens)
        else:
            loss_forward = self.token_loss(self.textual, memory, tokens[:, :-1], tokens[:, 1:])
        if self.cfg.task == "captioning":
            return {"loss": loss_forward, "loss_forward": loss_forward}
        backward = reverse_captions(tokens, lengths)
        loss_backward = self.token_loss(self.backward_textual, memory, backward[:, :-1], backward[:, 1:])
        return {"loss": loss_forward + loss_backward, "loss_forward": loss_forward,
                "loss_backward": loss_backward}

    def parallel_loss(self, memory, tokens):
        """The forward loss with CapPa's parallel prediction (Tschannen et al., NeurIPS 2023): with
        probability cfg.parallel a caption is predicted from the image alone, all tokens at once:
        each input is [MASK], padding included, and its attention is bidirectional; the other
        captions are teacher-forced. The targets are the same. Captions are padded to max_length,
        so that a parallel one cannot even tell its length from the batch's shape. (Bicaptioning's
        backward head stays teacher-forced on every caption: see the README.)"""
        tokens = F.pad(tokens, (0, self.cfg.max_length - tokens.shape[1]))  # (B, max_length)
        parallel = torch.rand(len(tokens), device=tokens.device) < self.cfg.parallel  # (B,)
        inputs = torch.where(parallel[:, None], MASK, tokens[:, :-1])
        return self.token_loss(self.textual, memory, inputs, tokens[:, 1:], parallel=parallel)

    @staticmethod
    def token_loss(head, memory, inputs, targets, causal=True, lengths=None, parallel=None):
        """Mean cross-entropy over the non-padding targets of the batch. (For captioning the
        inputs stop one short: with causal attention the last token predicts nothing.)"""
        keep = targets != PAD
        hidden = head(memory, inputs, causal, lengths, parallel)[keep]  # (K, H): logits at targets
        return F.cross_entropy(head.output(hidden).float(), targets[keep])

    @staticmethod
    def classification_loss(logits, tokens, task):
        """-mean log-probability of the image's set of targets (caption tokens but the special
        ones, or COCO categories); i.e. cross-entropy to a uniform distribution over the set."""
        targets = torch.zeros_like(logits).scatter_(1, tokens, 1.0)
        ignored = len(SPECIAL_PIECES) if task == "token_classification" else 1  # or only padding
        targets[:, :ignored] = 0
        logp = logits.float().log_softmax(-1)
        return (-(logp * targets).sum(1) / targets.sum(1).clamp(min=1)).mean()

    # -- decoding with the forward head (paper section 4.5) -------------------------------------

    def next_token_logprobs(self, memory, tokens):
        hidden = self.textual(memory, tokens)[:, -1]  # (B, H)
        return self.textual.output(hidden).float().log_softmax(-1)  # (B, V)

    @torch.no_grad()
    def caption(self, images, beam=5, nucleus=None, max_steps=30, generator=None):
        """Token lists (no [SOS]/[EOS]) by beam search, or nucleus sampling if `nucleus` is a p."""
        memory = self.textual.project(self.visual(images))
        if nucleus is None:
            memory = memory.repeat_interleave(beam, dim=0)  # (B*beam, h*w, H)
        # The search itself keeps its few tokens and scores on the CPU.
        logprobs = lambda t: self.next_token_logprobs(memory, t.to(memory.device)).cpu()
        if nucleus is not None:
            return nucleus_sampling(logprobs, len(images), nucleus, max_steps, generator)
        return beam_search(logprobs, len(images), beam, max_steps)

def until_eos(sequence):
    """Generated ids up to (not including) the first [EOS]."""
    return sequence[:sequence.index(EOS)] if EOS in sequence else sequence

def beam_search(logprobs, batch, beam=5, max_steps=30):
    """Highest total log-probability sequences; `logprobs` maps (batch*beam, t) tokens to (.., V)."""
    tokens = torch.full((batch * beam, 1), SOS)
    scores = torch.full((batch, beam), -math.inf)
    scores[:, 0] = 0  # all beams start identical: expand only the first at step 1
    for _ in range(max_steps):
        step = logprobs(tokens)  # (batch*beam, V)
        done = tokens[:, -1] == EOS
        step[done] = -math.inf
        step[done, EOS] = 0  # a finished beam can only repeat [EOS], at no cost
        total = (scores.view(-1, 1) + step).view(batch, -1)  # (batch, beam*V)
        scores, best = total.topk(beam, dim=1)
        rows = (best // step.shape[1] + torch.arange(batch)[:, None] * beam).view(-1)
        tokens = torch.cat([tokens[rows], (best % step.shape[1]).view(-1, 1)], dim=1)
        if (tokens[:, -1] == EOS).all():
            break
    return [until_eos(tokens[b * beam, 1:].tolist()) for b in range(batch)]

def nucleus_sampling(logprobs, batch, p=0.9, max_steps=30, generator=None):
    """Sample from the smallest set of tokens whose probability reaches p (Holtzman et al. 2020)."""
    tokens = torch.full((batch, 1), SOS)
    for _ in range(max_steps):
        probs = logprobs(tokens).exp()  # (batch, V)
        sorted_probs, order = probs.sort(dim=1, descending=True)
        outside = sorted_probs.cumsum(1) - sorted_probs >= p  # after the nucleus is complete
        outside[:, 0] = False  # the most likely token is always in it
        sorted_probs[outside] = 0
        choice = order.gather(1, torch.multinomial(sorted_probs, 1, generator=generator))
        choice[tokens[:, -1] == EOS] = EOS
        tokens = torch.cat([tokens, choice], dim=1)
        if (choice == EOS).all():
            break
    return [until_eos(row[1:].tolist()) for row in tokens]

# ----------------------------------------------------------------------------------------------
# Optimisation: SGD in LookAhead, two learning rates, no decay on the heads' norms and biases

class LookAhead:
    """Zhang et al. 2019: every k steps of the inner optimizer, the weights move back to alpha *
    fast + (1 - alpha) * slow, and that point becomes the new slow weights. Its state dict holds the
    slow weights and the step counter too, so a resume mid-cycle is exact (the official restarts)."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.slow = [p.detach().clone() for p in self.params]
        self.counter = 0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        self.optimizer.step()
        self.counter += 1
        if self.counter == self.k:
            self.counter = 0
            # The official arithmetic, p * alpha + slow * (1 - alpha), one fused op per list.
            torch._foreach_mul_(self.params, self.alpha)
            torch._foreach_add_(self.params, self.slow, alpha=1 - self.alpha)
            torch._foreach_copy_(self.slow, self.params)

    def state_dict(self):
        return {**self.optimizer.state_dict(), "slow": self.slow, "counter": self.counter}

    @torch.no_grad()
    def load_state_dict(self, state):
        state = dict(state)
        slow, self.counter = state.pop("slow"), state.pop("counter")
        self.optimizer.load_state_dict(state)
        for p in self.params:  # in each parameter's layout (a resume may flip channels_last, and
            state = self.optimizer.state[p]  # fused CUDA SGD needs equal strides)
            state.update({k: torch.empty_like(p).copy_(v) for k, v in state.items() if v.shape == p.shape})
        torch._foreach_copy_(self.slow, slow)

def no_weight_decay(name):
    """The official set: LayerNorm weights and all biases of the textual embedding and decoders.
    (CNN BatchNorms, the visual projection bias and the output bias are decayed.)"""
    parts = name.split(".")
    in_heads = "textual" in parts[0] and parts[1] in ("embedding", "transformer")
    return in_heads and ("norm" in name or "bias" in name)

def param_groups(model, cfg):
    """The backbone (model.visual) at cnn_lr, the rest at lr; each split by weight decay (the
    backbone's own rule, Visual.no_weight_decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            backbone = name.startswith("visual.")
            own = name[len("visual."):]
            exempt = model.visual.no_weight_decay(own) if backbone else no_weight_decay(name)
            groups.setdefault((backbone, not exempt), []).append(p)
    return [{"params": params, "lr": cfg.cnn_lr if cnn else cfg.lr,
             "initial_lr": cfg.cnn_lr if cnn else cfg.lr,
             "weight_decay": cfg.weight_decay if decay else 0.0}
            for (cnn, decay), params in groups.items()]

def has_fused_kernels(device):
    """Whether torch has one-kernel-for-all-parameters SGD and AdamW on `device` (on a CPU too:
    there the toy step's optimizer part runs 3x faster)."""
    return device.type in ("cuda", "cpu")

def build_optimizer(model, cfg, fused=None):
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        inner = torch.optim.SGD(groups, momentum=cfg.momentum, fused=fused)
    elif cfg.optimizer == "adamw":
        inner = torch.optim.AdamW(groups, fused=fused)
    else:
        raise ValueError(f"optimizer must be sgd or adamw, not {cfg.optimizer!r}")
    return LookAhead(inner, cfg.lookahead_k, cfg.lookahead_alpha)

def lr_multiplier(step, warmup, total):
    """LR factor after `step` optimizer steps: linear warmup from 0, then cosine to 0 at `total`.
    The official scheduler steps after the optimizer, so iteration 1 runs at factor 0."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return math.cos(math.pi / 2 * progress) ** 2  # cos^2(x/2) = (1 + cos x) / 2

def set_lr(optimizer, step, cfg):
    factor = lr_multiplier(step, cfg.warmup, cfg.iterations)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor

# ----------------------------------------------------------------------------------------------
# Checkpoints: {"model": official key layout, "config", "vocab"} (+ "optimizer", "iteration", ...)

def state_dict_of(checkpoint, path="checkpoint"):
    """The model's state dict inside a checkpoint (ours, the official one) or a bare state dict."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not any(k.startswith("visual.") for k in state):
        raise ValueError(f"{path}: not a VirTex checkpoint (no visual.* weights)")
    return state

def load_weights(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip()
        raise ValueError(f"{path}: its weights do not fit the model it describes ({first})") from None
    return model

def load_model(path, heads=None, task=None):
    """(model, tokenizer or None) from one of our checkpoints or an official one."""
    checkpoint = load_checkpoint(path)
    if "config" not in checkpoint:
        return from_official(path, heads, task), None
    if "task" not in checkpoint["config"]:  # a probe.py last.pt: a classifier's, not a VirTex
        raise ValueError(f"{path}: a probe.py checkpoint (a classifier), not a VirTex model")
    model = VirTex(Config.from_dict(checkpoint["config"]))
    load_weights(model, state_dict_of(checkpoint, path), path)
    return model, Tokenizer(checkpoint["vocab"]) if checkpoint.get("vocab") else None


# ==============================================================================================
# Not the method: caption metrics, official checkpoints and export, files, processes and runs,
# tar shards, the toy world, the command line. A reader of the method can stop here.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Caption evaluation: CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it

def caption_words(text):
    """Lowercase words without punctuation (a stand-in for the PTB tokeniser of the COCO code)."""
    return " ".join(re.sub(r"[^\w\s]", " ", normalize(text)).split())

def ngram_counts(caption, n=4):
    words = caption.split()
    return collections.Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                               for i in range(len(words) - k + 1))

def cider(candidates, references, n=4, sigma=6.0):
    """CIDEr-D of {id: caption} against {id: [captions]} (tokenised, space-separated): the corpus
    score and the per-id scores. tf-idf n-gram vectors (idf over the reference sets), candidate
    weights clipped at the reference's, a Gaussian penalty on the length difference, x10."""
    refs = {i: [ngram_counts(r, n) for r in references[i]] for i in candidates}
    document_frequency = collections.Counter(g for counts in refs.values()
                                             for g in set().union(*counts))
    log_images = math.log(len(candidates))

    def vector(counts):
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_images - math.log(max(1.0, document_frequency[g])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        length = sum(tf for g, tf in counts.items() if len(g) == 2)  # in bigrams, as there
        return vec, norms, length

    scores = {}
    for i, caption in candidates.items():
        vec, norms, length = vector(ngram_counts(caption, n))
        total = 0.0
        for ref_vec, ref_norms, ref_length in map(vector, refs[i]):
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                overlap = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0)
                              for g, w in vec[k].items())
                total += overlap / (norms[k] * ref_norms[k] or 1.0) * penalty / n
        scores[i] = 10.0 * total / len(refs[i])
    return sum(scores.values()) / len(scores), scores

# ----------------------------------------------------------------------------------------------
# After VirTex: a Vision Transformer backbone (Dosovitskiy et al. 2021), what Visual builds for any
# --backbone that is not a ResNet. Its patch tokens are the grid the heads attend to.

VITS = [name for name in torchvision.models.vision_transformer.__all__ if name[0].islower()]
# One the toy world trains in minutes: ViT-Ti's width at half its depth, 8-px patches (8x8 at 64 px)
SMALL_VITS = {"vit_tiny_8": dict(patch_size=8, num_layers=6, num_heads=3, hidden_dim=192,
                                 mlp_dim=768)}
BACKBONES = RESNETS + VITS + list(SMALL_VITS)

def vision_transformer(name, image_size):
    """torchvision's ViT of that name (or SMALL_VITS's) for images of `image_size` px, without its
    classifier."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be a torchvision ResNet or ViT ({', '.join(BACKBONES)}), "
                         f"not {name!r}")
    small = SMALL_VITS.get(name)
    patch = small["patch_size"] if small else int(name.rsplit("_", 1)[1])  # vit_b_16: 16
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not divisible by {name}'s patch size {patch}")
    if small:
        vit = torchvision.models.VisionTransformer(image_size, **small)
    else:
        vit = getattr(torchvision.models, name)(image_size=image_size)
    vit.heads = nn.Identity()  # no heads.* keys (a ResNet: no fc.*): export writes all but these
    return vit

def patch_grid(vit, images):
    """(B, 3, S, S) -> (B, D, S/p, S/p): the last layer's patch tokens in their places. The class
    token attends with them but is left out: the heads read one token per place, as from a
    ResNet."""
    if images.shape[-1] != vit.image_size:  # the position embedding has a place per patch
        raise ValueError(f"this ViT reads {vit.image_size}-px images, not {images.shape[-1]} px")
    x = vit.conv_proj(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
    cls = vit.class_token.expand(len(x), -1, -1)
    x = vit.encoder(torch.cat([cls, x], dim=1))  # (B, 1 + h*w, D)
    side = images.shape[-1] // vit.patch_size
    return x[:, 1:].transpose(1, 2).unflatten(2, (side, side))

def vit_no_weight_decay(name, parameter):
    """The usual ViT rule: no decay on norms and biases (the 1-D parameters), the position
    embedding and the class token."""
    return parameter.ndim == 1 or name.endswith(("pos_embedding", "class_token"))

def vit_image_size(state):
    """The image size a ViT's torchvision state dict was made for (its position embedding has a
    place per patch and one for the class token); None for other weights."""
    if "encoder.pos_embedding" not in state:
        return None
    patches = state["encoder.pos_embedding"].shape[1] - 1
    return state["conv_proj.weight"].shape[-1] * math.isqrt(patches)

# ----------------------------------------------------------------------------------------------
# Official checkpoints: read their configuration off the tensor shapes; export the backbone

COCO_CATEGORIES = 80  # the multi-label ablation predicts these (+ 1 padding class)

@functools.lru_cache(maxsize=None)
def torchvision_shapes(name, image_size):
    """({key: shape} of the backbone's torchvision model, {its classifier: what Visual removes}),
    built once on the meta device; ({}, set()) for a ViT whose patches do not tile the size."""
    try:
        with torch.device("meta"):
            model = Visual(name, image_size).torchvision_model()
    except ValueError:
        return {}, set()
    classifier = {n for n, m in model.named_children() if isinstance(m, nn.Identity)}  # fc, heads
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, classifier

def infer_backbone(state):
    """(name, image size) of the backbone whose torchvision model has exactly the weight shapes of
    `state` (a torchvision state dict, with or without the classifier)."""
    size = vit_image_size(state)
    names = RESNETS if size is None else VITS + list(SMALL_VITS)
    size = size or 224  # a ResNet's weights fit any size: the paper's
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name in names:
        ours, classifier = torchvision_shapes(name, size)
        extra = {k.split(".")[0] for k in shapes.keys() - ours}  # top-level modules
        if ours and ours.items() <= shapes.items() and extra <= classifier:
            return name, size
    raise ValueError("the weights match no torchvision ResNet or ViT")

def visual_from_torchvision(state):
    """(A Visual with the weights of a torchvision ResNet's or ViT's state dict, its image size)."""
    name, size = infer_backbone(state)
    visual = Visual(name, size)
    visual.torchvision_model().load_state_dict(state, strict=False)  # all but the classifier
    return visual, size

def official_config(state, heads=None, task=None):
    """A Config for an official state dict, read off its tensor shapes."""
    # visual.cnn.conv1.weight -> conv1.weight: the torchvision model's keys
    name, image_size = infer_backbone({k.split(".", 2)[2]: v for k, v in state.items()
                                       if k.startswith("visual.")})
    cfg = dict(backbone=name, image_size=image_size)
    if "textual.embedding.words.weight" not in state:  # a classification ablation
        vocab = state["textual.output.weight"].shape[0]
        multilabel = vocab == COCO_CATEGORIES + 1
        default = "multilabel_classification" if multilabel else "token_classification"
        return Config(**cfg, vocab_size=vocab, task=task or default)
    vocab, hidden = state["textual.embedding.words.weight"].shape
    layers = {k.split(".")[3] for k in state if k.startswith("textual.transformer.layers.")}
    bidirectional = any(k.startswith("backward_textual.") for k in state)
    # masked LM and captioning have the same keys: captioning unless told otherwise
    return Config(**cfg, vocab_size=vocab, hidden=hidden, layers=len(layers),
                  heads=heads or hidden // 64,
                  feedforward=state["textual.transformer.layers.0.linear1.weight"].shape[0],
                  max_length=state["textual.embedding.positions.weight"].shape[0],
                  norm_first="textual.transformer.norm.weight" in state,
                  task=task or ("bicaptioning" if bidirectional else "captioning"))

def fill_shared_keys(state):
    """Add the keys of shared tensors that a de-duplicated state dict (one converted to
    safetensors, say) lacks: the tied output weight and the backward head's shared modules."""
    state = dict(state)
    if "textual.embedding.words.weight" in state:
        state.setdefault("textual.output.weight", state["textual.embedding.words.weight"])
    if any(k.startswith("backward_textual.") for k in state):
        shared = ("textual.visual_projection.", "textual.embedding.", "textual.output.")
        for k in [k for k in state if k.startswith(shared)]:
            state.setdefault(f"backward_{k}", state[k])
    return state

def from_official(path, heads=None, task=None):
    """A VirTex loaded from a checkpoint saved by the official code ({"model": ...} or bare)."""
    state = state_dict_of(load_checkpoint(path), path)
    try:  # the configuration is read off the weights: a missing one leaves it unreadable
        cfg = official_config(state, heads, task)
    except KeyError as e:
        raise ValueError(f"{path}: not a whole VirTex state dict (no {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return load_weights(VirTex(cfg), fill_shared_keys(state), path)


DETECTRON2_NAMES = [("layer1", "res2"), ("layer2", "res3"), ("layer3", "res4"), ("layer4", "res5"),
                    ("bn1", "conv1.norm"), ("bn2", "conv2.norm"), ("bn3", "conv3.norm"),
                    ("downsample.0", "shortcut"), ("downsample.1", "shortcut.norm")]

def export_backbone(model, format="torchvision"):
    """The trained backbone alone: torchvision's key names (resnet50() or vit_b_16(image_size=S)
    loads it, its classifier fc or heads aside), or, for a ResNet, detectron2's, renamed the way
    the official export does."""
    state = model.visual.torchvision_model().state_dict()  # conv1.weight, layer1.0.bn1.bias, ...
    if format == "torchvision":
        return state
    if model.cfg.backbone not in RESNETS:
        raise ValueError(f"the detectron2 export is for ResNets (detectron2's backbones), not "
                         f"{model.cfg.backbone}: use --format torchvision")
    renamed = {}
    for key, value in state.items():
        for ours, theirs in DETECTRON2_NAMES:
            key = key.replace(ours, theirs)
        renamed[key if key.startswith("res") else f"stem.{key}"] = value
    return {"model": renamed, "__author__": "virtex.py", "matching_heuristics": True}

# ----------------------------------------------------------------------------------------------
# Files, precision and processes: atomic checkpoints, autocast where native, torchrun, preemption

def save_checkpoint(path, checkpoint):
    """Write atomically: a kill at any moment leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def load_checkpoint(path):
    """Read a checkpoint without running code from it (weights_only: tensors and plain data)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a PyTorch checkpoint that loads safely "
                         f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint

def error_line(error):
    """A bad-input error as one line. One raised in a DataLoader worker arrives with the worker's
    traceback as its message, whose last line is "ValueError: <the message>"."""
    line = str(error).strip().splitlines()[-1]
    return line.removeprefix(f"{type(error).__name__}: ")

def amp_dtype(device, amp="bf16"):
    """The autocast dtype, where the hardware runs it natively: bf16 (no loss scaling needed) on
    GPUs and on CPUs with bf16 units (AVX512-BF16, AMX), fp16 on GPUs; None means fp32."""
    native_bf16 = device.type == "cuda" or getattr(torch.cpu, "_is_avx512_bf16_supported", bool)() \
        or getattr(torch.cpu, "_is_amx_tile_supported", bool)()
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if amp == "bf16" and native_bf16 else None

def autocast(device, amp="bf16"):
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

def loss_scaler(device, amp):
    """fp16 autocast (on GPUs, see amp_dtype) needs its loss scaled; any other precision gets a
    disabled scaler, which passes everything through (and saves an empty state)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)

class Processes(NamedTuple):
    """This process's place in the run, as init_processes finds it."""
    rank: int
    world: int
    device: torch.device
    group: object = None  # gloo: small control messages without a GPU sync (None: one process)

def init_processes():
    """The Processes of this run: torchrun sets RANK and friends; plain python is rank 0 of 1."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return Processes(0, 1, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device, dist.new_group(backend="gloo"))

# DDP otherwise rebuilds its gradient buckets once, in the order gradients arrive, after a
# process's first step (its second with static_graph); until then one bucket holds them all. A
# ring all-reduce of 3+ ranks sums each element in an order set by its place in its bucket, so a
# resumed process, whose first steps are not the run's, would round them differently (two ranks
# hide this: a + b = b + a). With find_unused_parameters DDP never rebuilds: every step of every
# process reduces in one layout. The price (every parameter is used here): one traversal of the
# autograd graph a step, and a warning saying so at the first step, on every rank.
DDP_OPTIONS = dict(find_unused_parameters=True, gradient_as_bucket_view=True)

def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)

def barrier():
    if dist.is_initialized():
        dist.barrier()

def any_rank(flag, group):
    """True on every process if it is true on any (ranks must agree to stop at the same step)."""
    if group is None:
        return bool(flag)
    value = torch.tensor([float(bool(flag))])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value.item() > 0

def broadcast_buffers(module):
    """Rank 0's buffers (BatchNorm statistics) on every rank: what its checkpoint holds. DDP gives
    every rank rank 0's before each training forward, which each rank's own batch then moves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)

@contextlib.contextmanager
def preemption():
    """SIGTERM (a scheduler's preemption) or Ctrl-C: the list it yields becomes non-empty; the
    loop finishes its step, saves and exits 0."""
    caught = []
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda *_: caught.append(s)) for s in signals}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

def ignore_interrupts(_):
    """Loader workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

# ----------------------------------------------------------------------------------------------
# Runs: what train.py and probe.py share. The OUT/last.pt of either holds "model" (the state of
# what the run trains), "optimizer", "scaler", "iteration" and "config" (the settings that made
# it); train.py's adds "vocab" (and "shards"). Rerunning a command resumes from its last.pt; a
# last.pt made otherwise is refused. The loops and the training steps stay in the scripts.

# How a run computes, not what: settings that may change when a run resumes.
RUNTIME = ("workers", "amp", "channels_last", "compile", "stop_after")

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and states every default."""

@contextlib.contextmanager
def one_line_errors():
    """Bad input (FileNotFoundError, ValueError) ends the command with one line, no traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {error_line(e)}") from None

def check_batch(batch_size, world):
    """Each process takes an equal slice of every global batch."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {world} processes")

def resume(path, script, settings, model, optimizer, scaler, needs=()):
    """The checkpoint at `path` (a last.pt of `script`, holding `needs` too), loaded into model,
    optimizer and scaler; None if there is none. Refused if a setting of `settings` ({name:
    value}; RUNTIME ones aside, "vocabulary" is the checkpoint's "vocab") differs or is missing."""
    path = Path(path)
    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "iteration", "config", *needs) if k not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a {script} checkpoint (no {', '.join(missing)}); "
                         "use another --out")
    saved = {**checkpoint["config"], "vocabulary": checkpoint.get("vocab")}
    changed = [k for k, v in settings.items() if k not in RUNTIME and saved.get(k) != v]
    if changed:
        raise ValueError(f"{path}: made with other settings ({', '.join(changed)}); "
                         "use another --out")
    load_weights(model, checkpoint["model"], path)  # a weight missing or one too many: one line
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):  # a bf16 or fp32 run saved a disabled scaler's empty state:
        scaler.load_state_dict(checkpoint["scaler"])  # an fp16 resume starts a fresh loss scale
    print0(f"resuming {path} at iteration {checkpoint['iteration']}")
    return checkpoint

def ddp(model, device):
    """`model` in DistributedDataParallel under torchrun, else itself. Only what has gradients is
    synchronised (the head alone when the backbone is frozen), in one bucket layout (DDP_OPTIONS)."""
    if not dist.is_initialized():
        return model
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, ids, **DDP_OPTIONS)

def resumable_loader(data, settings, start, stop, processes, collate=None):
    """The training batches after iteration `start` up to `stop`, this process's slice of each
    (ResumableSampler; `settings`, a Config or a probe.Recipe, gives the batch size, seed and
    loader workers). A dataset that batches itself (CaptionShards) is endless: the loop stops."""
    if isinstance(data, torch.utils.data.IterableDataset):
        options = dict(batch_size=None)
    else:
        sampler = ResumableSampler(len(data), settings.batch_size, settings.seed, start, stop,
                                   processes.rank, processes.world)
        options = dict(batch_sampler=sampler, collate_fn=collate)
    return torch.utils.data.DataLoader(data, num_workers=settings.workers,
                                       pin_memory=processes.device.type == "cuda",
                                       worker_init_fn=ignore_interrupts, **options)

def stopped_early(iteration, total, signalled):
    """Whether the run stopped before `total` iterations; if so, says why and what to do."""
    if signalled:
        print0(f"stopped by a signal after iteration {iteration}; rerun to resume")
    elif iteration < total:
        print0(f"stopped after iteration {iteration} (--stop-after); rerun without it")
    return signalled or iteration < total

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

# ----------------------------------------------------------------------------------------------
# Beyond COCO: captions streamed from tar shards as img2dataset writes them (KEY.jpg + KEY.txt;
# other members such as KEY.json are ignored). Each (rank, loader worker) reads shards of its
# own, in an order that is a function of (seed, epoch); where each reader stands is saved in
# last.pt, so a resumed run reads on exactly where the interrupted one stopped.

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def expand_braces(pattern):
    """'a/{00000..00002}.tar' -> ['a/00000.tar', 'a/00001.tar', 'a/00002.tar'] (zero-padded)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.groups()
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [path for i in range(int(first), int(last) + 1)
            for path in expand_braces(f"{head}{i:0{len(first)}d}{tail}")]


def expand_shards(data):
    """The sorted shard paths of a brace pattern or of a folder of .tar files; all must exist."""
    folder = Path(data).is_dir()
    paths = sorted(Path(data).glob("*.tar") if folder else map(Path, expand_braces(str(data))))
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(f"{missing[0] if missing else data}: no such shard "
                                f"({len(missing)} of {len(paths)} missing)")
    return paths


class TarMember(NamedTuple):
    """A file inside a tar shard, read by seeking to it: what an image path is in a COCO folder."""
    tar: Path
    name: str
    offset: int
    size: int

    def read(self):
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def __str__(self):
        return f"{self.tar}:{self.name}"


def shard_samples(path):
    """([(key, image member or None, caption member or None)] in the shard's order, [problems]).
    Only the headers are read; a damaged tar yields the samples before the damage."""
    members, problems = {}, []
    try:
        with tarfile.open(path) as tar:
            for info in filter(tarfile.TarInfo.isfile, tar):
                folder, _, name = info.name.rpartition("/")
                stem, _, suffix = name.partition(".")  # webdataset's key: up to the first dot
                key = f"{path}:{folder}/{stem}" if folder else f"{path}:{stem}"
                member = TarMember(Path(path), info.name, info.offset_data, info.size)
                members.setdefault(key, {})[suffix.lower()] = member
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{path}: damaged after {len(members)} samples ({e})")
    samples = [(key, next((m[s] for s in IMAGE_SUFFIXES if s in m), None), m.get("txt"))
               for key, m in members.items()]
    return samples, problems


def read_caption_lines(member):
    """The captions of a KEY.txt: one per non-empty line (img2dataset writes one)."""
    text = member.read().decode("utf-8", errors="replace") if member else ""
    return [line.strip() for line in text.splitlines() if line.strip()]


def shard_captions(shards, limit):
    """Up to `limit` captions, from the first shards on: enough to build a vocabulary quickly."""
    count = 0
    for path in shards:
        for _, _, caption in shard_samples(path)[0]:
            for line in read_caption_lines(caption):
                if count == limit:
                    return
                count += 1
                yield line


def permutation(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class CaptionShards(torch.utils.data.IterableDataset):
    """Endless batches of this rank's samples from tar shards, as (images, tokens, lengths,
    unreadable, (reader, epoch, shard, sample) to resume from). Reader r = rank * W + worker (W
    loader workers, rotated by the starting iteration so that iteration i comes from reader
    i % W of its rank, whatever the resumes) reads its share of a permutation of the shards in
    each epoch, each shard's samples in an order of their own; `samples` (a CaptioningDataset,
    its items unused) makes each sample, as the indexed sources' samples are made."""

    def __init__(self, shards, samples, cfg, rank=0, world=1, start=0, positions=None):
        self.shards, self.samples, self.cfg = shards, samples, cfg
        self.rank, self.world, self.start, self.positions = rank, world, start, positions or {}
        self.workers = max(1, cfg.workers)
        self.readers = world * self.workers
        if len(shards) < self.readers:
            raise ValueError(f"{len(shards)} shards for {world} processes x {self.workers} loader "
                             "workers: each reader needs shards of its own (use fewer --workers or "
                             "more shards)")

    def shards_of(self, reader, epoch):
        """[(shard id, path)]: what `reader` reads in `epoch`."""
        order = permutation(len(self.shards), mix_seed(self.cfg.seed, epoch))[reader::self.readers]
        return [(i, self.shards[i]) for i in order]

    def __iter__(self):
        worker = (torch.utils.data.get_worker_info() or argparse.Namespace(id=0)).id
        reader = self.rank * self.workers + (worker + self.start) % self.workers
        epoch, first_shard, first_sample = self.positions.get(reader, (0, 0, 0))
        per_rank, batch, unreadable = self.cfg.batch_size // self.world, [], []
        while True:
            shards = self.shards_of(reader, epoch)
            for shard in range(first_shard, len(shards)):
                shard_id, path = shards[shard]
                samples, problems = shard_samples(path)
                unreadable += problems
                seed = mix_seed(self.cfg.seed, epoch, shard_id)
                order = permutation(len(samples), seed)
                for index in range(first_sample, len(order)):
                    sample, problem = self.sample(samples[order[index]], mix_seed(seed, order[index]))
                    if problem:
                        unreadable.append(problem)
                        continue
                    batch.append(sample)
                    if len(batch) == per_rank:
                        images, tokens, lengths, _ = collate(batch)
                        yield images, tokens, lengths, unreadable, (reader, epoch, shard, index + 1)
                        batch, unreadable = [], []
                first_sample = 0
            first_shard, epoch = 0, epoch + 1

    def sample(self, sample, seed):
        """(a training sample, None), or (None, why not) for a sample without an image or a
        caption, or whose image does not read."""
        key, image, caption = sample
        captions = read_caption_lines(caption)
        if image is None or not captions:
            return None, f"{key}: no {'image' if image is None else 'caption'}"
        try:
            opened = self.samples.open(image)
        except UNREADABLE as e:
            return None, f"{image}: {e}"
        return self.samples.sample(opened, captions, torch.Generator().manual_seed(seed), []), None


# ----------------------------------------------------------------------------------------------
# Caption sources: what --data and --val name, told apart in `caption_source` alone. A reader per
# kind turns one into items [(image, [captions])], an image's captions in order of first
# appearance; another source is one reader and its line in CAPTION_SOURCES. Files of rows, JSON
# lines or CSV, hold one {image, caption} a row, image paths relative to the file's folder.

def read_json(path, what):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None



def read_captions(root, split):
    """[(image path, [captions])] in order of first appearance, as the official dataset groups
    them. Empty captions are dropped, and images left without one are skipped (and reported)."""
    root = Path(root)
    path = root / "annotations" / f"captions_{split}2017.json"
    data = read_json(path, f"COCO {split} captions")
    try:
        files = {image["id"]: image["file_name"] for image in data["images"]}
        captions = {}
        for ann in data["annotations"]:
            text = ann["caption"].strip() if isinstance(ann["caption"], str) else ""
            captions.setdefault(ann["image_id"], []).extend([text] if text else [])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not COCO Captions (no {e} field)") from None
    unknown = [i for i in captions if i not in files]
    if unknown:
        raise ValueError(f"{path}: captions of image id {unknown[0]}, which is not in its image list")
    images = root / f"{split}2017"
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: missing (the {split} images)")
    items = [(images / files[i], texts) for i, texts in captions.items() if texts]
    if len(items) < len(captions):
        print(f"warning: {path}: {len(captions) - len(items)} images without a non-empty caption "
              "skipped", file=sys.stderr)
    if not items:
        raise ValueError(f"{path}: no captions")
    return items



def read_categories(root, split):
    """([(image path, [[category indices 1..K]])], K) from instances_{split}2017.json, categories
    in file order (0 is padding); images without objects are dropped, as in the official dataset."""
    root = Path(root)
    path = root / "annotations" / f"instances_{split}2017.json"
    data = read_json(path, f"COCO {split} instances (multi-label classification)")
    try:
        index = {c["id"]: i + 1 for i, c in enumerate(data["categories"])}
        files = {image["id"]: image["file_name"] for image in data["images"]}
        labels = {}
        for ann in data["annotations"]:
            labels.setdefault(ann["image_id"], set()).add(index[ann["category_id"]])
    except KeyError as e:
        raise ValueError(f"{path}: not COCO instances (no {e} field or category)") from None
    items = [(root / f"{split}2017" / files[i], [sorted(labels[i])]) for i in files if i in labels]
    return items, len(index)


def read_text(path, what):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    try:
        return path.read_text(encoding="utf-8-sig")  # a CSV saved by a spreadsheet opens with a BOM
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_shards(data, split=None):
    """Tar shards, indexed (for evaluation): every sample with an image and a caption."""
    samples = [s for path in expand_shards(data) for s in shard_samples(path)[0]]
    items = [(image, read_caption_lines(text)) for _, image, text in samples if image]
    items = [(image, captions) for image, captions in items if captions]
    if not items:
        raise ValueError(f"{data}: no sample with an image and a caption")
    return items


def read_json_lines(path, split=None):  # a file is one split
    """A .jsonl file: one {"image": ..., "caption": ...} object a line (other keys are ignored)."""
    lines = enumerate(read_text(path, "JSON lines of image and caption").split("\n"), 1)
    return caption_rows(path, ((n, json_row(path, n, line)) for n, line in lines if line.strip()))


def json_row(path, number, line):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {number}: not JSON ({e.msg})") from None


def read_csv_rows(path, split=None):  # a file is one split
    """A .csv file whose header names its image and caption columns (others are ignored). A caption
    with a comma is quoted, as CSV writers do: a row of more (or fewer) values is refused."""
    reader = csv.reader(io.StringIO(read_text(path, "CSV of image and caption"), newline=""))
    header = next(reader, [])
    missing = [column for column in ("image", "caption") if column not in header]
    if missing:
        raise ValueError(f"{path}: line 1: the header names no {missing[0]} column (image,caption)")
    return caption_rows(path, csv_dicts(path, reader, header))


def csv_dicts(path, reader, header):
    for values in filter(None, reader):  # blank lines are no rows
        if len(values) != len(header):
            raise ValueError(f"{path}: line {reader.line_num}: {len(values)} values for the header's "
                             f"{len(header)} columns (an unquoted comma in a caption?)")
        yield reader.line_num, dict(zip(header, values))


def caption_rows(path, rows):
    """The items of a file's (line number, row) pairs. An empty caption is skipped with a warning,
    as in COCO and shards (an image left without one is dropped): one bad row of millions should
    not stop a run, and it is named. A missing image, or a path outside the file's folder, is
    refused."""
    folder = os.path.abspath(Path(path).parent)
    captions, empty = {}, []
    for line, row in rows:
        where = f"{path}: line {line}"
        image = row_image(where, folder, row)
        if image not in captions and not os.path.isfile(image):  # a look per image, not per row
            raise FileNotFoundError(f"{where}: {row['image']}: no such image")
        text = row["caption"].strip() if isinstance(row["caption"], str) else ""
        captions.setdefault(image, []).extend([text] if text else [])
        empty += [] if text else [line]
    if empty:
        lines = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        print(f"warning: {path}: {len(empty)} empty captions skipped (line {lines})",
              file=sys.stderr)
    items = [(Path(image), texts) for image, texts in captions.items() if texts]
    if not items:
        raise ValueError(f"{path}: no captions")
    return items


def row_image(where, folder, row):
    """The image a row names. The file and its folder are the data set, moved and shared as one, so
    a path that leaves the folder is refused (checked on the path as written: a symlink inside the
    folder may point anywhere)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not an object with image and caption")
    missing = [key for key in ("image", "caption") if key not in row]
    if missing or not isinstance(row["image"], str) or not row["image"].strip():
        raise ValueError(f"{where}: no {missing[0] if missing else 'image'}")
    image = os.path.normpath(os.path.join(folder, row["image"]))  # strings: millions of rows
    if os.path.commonpath([folder, image]) != folder:
        raise ValueError(f"{where}: {row['image']} is outside {folder}, the file's folder")
    return image


CAPTION_SOURCES = {  # kind -> reader: (what --data or --val names, split) -> [(image, [captions])]
    "coco": read_captions,  # a folder: annotations/captions_{split}2017.json + {split}2017/
    "shards": read_shards,  # a brace pattern, a .tar or a folder of them; streamed in training
    ".jsonl": read_json_lines,
    ".csv": read_csv_rows,
}


class Source(NamedTuple):
    """What --data or --val names (`path`), read: `items` [(image, [captions])] to index, or
    `shards` (tar paths) for CaptionShards to stream; `splits`: it holds the other splits too (a
    COCO folder), so --val defaults to it."""
    path: str
    items: list = None
    shards: list = None
    splits: bool = False


def caption_source(data, split, stream=False):
    """The one place that tells sources apart: tar shards (a brace pattern, a .tar or a folder of
    them), a file whose suffix is a key of CAPTION_SOURCES, else a COCO folder. Training from shards
    (`stream`) reads them as it goes; every other source, and shards for evaluation, is indexed."""
    text, suffix = str(data), Path(str(data)).suffix.lower()
    if "{" in text or suffix == ".tar" or any(Path(text).glob("*.tar")):
        kind = "shards"
    else:
        kind = suffix if suffix in CAPTION_SOURCES else "coco"
    if kind == "coco" and not Path(text).is_dir():
        raise FileNotFoundError(f"{data} is not a folder")
    if stream and kind == "shards":
        return Source(data, shards=expand_shards(data))
    return Source(data, CAPTION_SOURCES[kind](data, split), splits=kind == "coco")


# ----------------------------------------------------------------------------------------------
# The toy world: COCO Captions, VOC07, ImageNet and iNaturalist in miniature, in their real layouts.
# Captions name colours, sizes, counts and places; COCO-style categories name only the shapes;
# the 20 VOC classes are colour+shape pairs, so a backbone must learn what the captions say.

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {"red": (215, 35, 35), "green": (35, 170, 50), "blue": (45, 75, 225),
          "yellow": (235, 215, 40)}
TOY_CLASSES = [f"{color}_{shape}" for shape in SHAPES for color in COLORS]
SIZES = {"large": 0.17, "small": 0.1, "tiny": 0.045}  # radius / image size; "tiny": VOC difficult

class ToyObject(NamedTuple):
    color: str
    shape: str
    size: str  # a key of SIZES
    x: float
    y: float
    radius: float

    def overlaps(self, other):
        gap = self.radius + other.radius + 1
        return abs(self.x - other.x) <= gap and abs(self.y - other.y) <= gap

def shape_outline(shape, x, y, r, angle):
    """Polygon corners of a shape of radius r centred at (x, y)."""
    if shape == "star":
        corners = [(math.cos(a) * (1 - 0.58 * (k % 2)), math.sin(a) * (1 - 0.58 * (k % 2)))
                   for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))]
    elif shape == "cross":
        arm = [(-1 / 3, -1), (1 / 3, -1), (1 / 3, -1 / 3), (1, -1 / 3), (1, 1 / 3), (1 / 3, 1 / 3)]
        corners = arm + [(-u, -v) for u, v in arm]
    elif shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    else:
        corners = [(0, -1), (1, 0.85), (-1, 0.85)]  # triangle
    c, s = math.cos(angle), math.sin(angle)
    return [(x + r * (u * c - v * s), y + r * (u * s + v * c)) for u, v in corners]

def toy_background(rng, size):
    """Noise over a random colour, with 0-3 scribbles (in the objects' colours too)."""
    from PIL import ImageDraw
    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    plain = Image.new("RGB", (size, size), tuple(rng.randrange(40, 200) for _ in range(3)))
    image = Image.blend(plain, noise, rng.uniform(0.05, 0.35))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(4)):
        color = rng.choice([*COLORS.values(), tuple(rng.randrange(256) for _ in range(3))])
        points = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(3)]
        draw.line(points, fill=color, width=rng.choice((1, 2)))
    return image, draw

def toy_scene(rng, size, kinds=None):
    """Shapes on a noisy background: (image, [ToyObject]); `kinds` [(color, shape)] or random."""
    image, draw = toy_background(rng, size)
    if kinds is None:
        count = rng.choice((1, 2, 2, 3, 3, 4))
        kinds = [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(count)]
        repeat = lambda i: i and rng.random() < 0.2  # some repeats, so that captions count
        kinds = [kinds[i - 1] if repeat(i) else k for i, k in enumerate(kinds)]
    objects = []
    for color, shape in kinds:
        label = "tiny" if rng.random() < 0.05 else rng.choice(("large", "small"))
        radius = size * SIZES[label] * rng.uniform(0.9, 1.1)
        for _ in range(30):  # find a free place
            x, y = (rng.uniform(radius + 2, size - radius - 2) for _ in range(2))
            new = ToyObject(color, shape, label, x, y, radius)
            if not any(new.overlaps(o) for o in objects):
                objects.append(new)
                fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLORS[color])
                if shape == "circle":
                    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)
                else:
                    angle = rng.uniform(-0.3, 0.3)
                    draw.polygon(shape_outline(shape, x, y, radius, angle), fill=fill)
                break
    return image, objects

def toy_captions(rng, objects, k=5):
    """k captions: the shapes with their counts, sizes and colours, and where they are."""
    groups = {}
    for o in objects:
        groups.setdefault((o.color, o.shape), []).append(o.size)

    def group(color, shape, sizes):
        n = len(sizes)
        noun = shape if n == 1 else shape + ("es" if shape == "cross" else "s")
        size = [sizes[0]] if len(set(sizes)) == 1 else []
        return " ".join([("a", "two", "three", "four")[n - 1], *size, color, noun])

    shuffled = lambda: rng.sample(list(groups.items()), len(groups))
    every = lambda: " and ".join(group(*key, sizes) for key, sizes in shuffled())
    one = lambda o: f"a {o.size} {o.color} {o.shape}"
    captions = [f"{every()}.", f"there {'is' if len(objects) == 1 else 'are'} {every()}.",
                f"a picture of {every()} on a noisy background."]
    for a in objects:
        for b in objects:
            different = (a.color, a.shape) != (b.color, b.shape)
            if different and b.x - a.x > a.radius + b.radius:
                captions += [f"{one(a)} left of {one(b)}.", f"{one(b)} to the right of {one(a)}."]
            if different and b.y - a.y > a.radius + b.radius:
                captions.append(f"{one(a)} above {one(b)}.")
    if len(captions) >= k:
        return rng.sample(captions, k)
    return captions + rng.choices(captions, k=k - len(captions))

def write_toy_coco(root, rng, size, splits):
    """COCO Captions and instances (shape categories) for {split: images}."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": shape, "supercategory": "shape"}
                  for i, shape in enumerate(SHAPES)]
    for split, n in splits.items():
        (root / f"{split}2017").mkdir(exist_ok=True)
        images, captions, instances = [], [], []
        for i in range(1, n + 1):
            image, objects = toy_scene(rng, size)
            images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": size, "height": size})
            image.save(root / f"{split}2017" / images[-1]["file_name"], quality=90)
            captions += [{"id": len(captions) + 1, "image_id": i, "caption": c}
                         for c in toy_captions(rng, objects)]
            for o in objects:
                box = [o.x - o.radius, o.y - o.radius, 2 * o.radius, 2 * o.radius]
                instances.append({"id": len(instances) + 1, "image_id": i, "bbox": box, "iscrowd": 0,
                                  "category_id": SHAPES.index(o.shape) + 1, "area": box[2] * box[3],
                                  "segmentation": []})
        annotations = root / "annotations"
        (annotations / f"captions_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": captions}))
        (annotations / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": instances, "categories": categories}))

def write_toy_voc(root, rng, size, images):
    """VOCdevkit/VOC2007: `images` trainval and `images` test images, 20 colour+shape classes."""
    for d in ("JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for split, first in (("trainval", 0), ("test", images)):
        ids, labels = [f"{i:06d}" for i in range(first, first + images)], []
        for i in ids:
            image, objects = toy_scene(rng, size)
            image.save(root / "JPEGImages" / f"{i}.jpg", quality=90)
            sizes = [{o.size for o in objects if f"{o.color}_{o.shape}" == c} for c in TOY_CLASSES]
            labels.append([-1 if not s else 0 if s == {"tiny"} else 1 for s in sizes])  # 0: difficult
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for c, name in enumerate(TOY_CLASSES):
            (root / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(
                "".join(f"{i} {row[c]:2d}\n" for i, row in zip(ids, labels)))

def write_toy_imagenet(root, rng, size, per_class):
    """An ImageFolder ({split}/{class}/*.jpg) of one-shape images of the 20 VOC classes."""
    for split, n in per_class.items():
        for name in TOY_CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image, _ = toy_scene(rng, size, kinds=[tuple(name.split("_"))])
                image.save(root / split / name / f"{i:04d}.jpg", quality=90)

def write_toy_inaturalist(root, rng, size, per_class):
    """iNaturalist 2018 in miniature: annotations/{split}2018.json (COCO-style images with
    file_name relative to root, annotations, categories with ids 0..19) and the images of both
    splits in train_val2018/<supercategory>/<category id>/<image id>.jpg, as in the real one;
    one-shape images of the 20 VOC classes, each shape a supercategory."""
    categories = [{"id": i, "name": name, "supercategory": name.split("_")[1].title()}
                  for i, name in enumerate(TOY_CLASSES)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id = 0
    for split, n in per_class.items():
        images, annotations = [], []
        for c in categories:
            folder = Path("train_val2018") / c["supercategory"] / str(c["id"])
            (root / folder).mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                image, _ = toy_scene(rng, size, kinds=[tuple(c["name"].split("_"))])
                image.save(root / folder / f"{image_id}.jpg", quality=90)
                images.append({"id": image_id, "file_name": f"{folder.as_posix()}/{image_id}.jpg",
                               "width": size, "height": size})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": c["id"]})
                image_id += 1
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"{split}2018.json").write_text(json.dumps(data))


def write_toy_shards(root, coco, per_shard=1_000):
    """The COCO train split as img2dataset would shard it: KEY.jpg + KEY.txt (its captions, one
    per line) in {00000..}.tar."""
    root.mkdir(parents=True, exist_ok=True)
    items = read_captions(coco, "train")
    for first in range(0, len(items), per_shard):
        with tarfile.open(root / f"{first // per_shard:05d}.tar", "w") as tar:
            for i, (path, captions) in enumerate(items[first:first + per_shard], first):
                for name, data in ((f"{i:09d}.jpg", path.read_bytes()),
                                   (f"{i:09d}.txt", "\n".join(captions).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def make_toy_world(root, size=64, train=10_000, val=500, voc=2_000, seed=0):
    """Write each missing part once: root/coco (COCO Captions + instances), root/voc/VOCdevkit/
    VOC2007 (20 colour+shape classes), root/imagenet (ImageFolder) and root/inaturalist (its 2018
    layout) of the same 20 classes, and root/shards (COCO's train split in 10 tar shards). Each
    part draws from a generator of its own, so a part added later leaves the others as they were."""
    root = Path(root)
    per_class = {"train": 20, "val": 5}
    parts = {
        "coco": lambda rng: write_toy_coco(root / "coco", rng, size, {"train": train, "val": val}),
        "voc": lambda rng: write_toy_voc(root / "voc" / "VOCdevkit" / "VOC2007", rng, size, voc),
        "imagenet": lambda rng: write_toy_imagenet(root / "imagenet", rng, size, per_class),
        "inaturalist": lambda rng: write_toy_inaturalist(root / "inaturalist", rng, size, per_class),
        "shards": lambda _: write_toy_shards(root / "shards", root / "coco", max(1, train // 10)),
    }
    for name, write in parts.items():
        done = root / name / "complete"
        if not done.exists():
            write(random.Random(f"{seed}/{name}"))
            done.write_text("written by virtex.make_toy_world\n")


# ----------------------------------------------------------------------------------------------
# Command line: caption images (with attention pictures), export the backbone

def attention_probabilities(attention, x, memory):
    """(B, heads, T, N): the softmax an Attention module computes for queries x over memory."""
    q, k, _ = attention.project(x, memory)
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)

@torch.no_grad()
def cross_attention(model, images, captions):
    """(B, T, h, w): where the forward head's last layer looked (mean over heads) when it
    predicted each token of `captions` (token lists without [SOS]). A forward hook reads the
    attention's inputs; the model runs as it always does."""
    grid = model.visual(images)
    inputs = [torch.tensor([SOS, *c])[:max(1, len(c))] for c in captions]  # the last is no input
    tokens = nn.utils.rnn.pad_sequence(inputs, batch_first=True).to(images.device)
    attention = model.textual.transformer.layers[-1].multihead_attn
    seen = []
    hook = attention.register_forward_hook(lambda module, args, _: seen.append(args))
    try:
        model.textual(model.textual.project(grid), tokens)
    finally:
        hook.remove()
    return attention_probabilities(attention, *seen[0]).mean(1).unflatten(-1, grid.shape[2:])

def draw_attention(image, words, maps, path, cell=160, per_row=6):
    """The image, then for each word its attention map as a heatmap over the image (dark to
    yellow, relative to the word's most attended cell: a uniform map is uniformly hot)."""
    from PIL import ImageDraw
    image = image.resize((cell, cell))
    hot = [lambda v: min(255, 3 * v), lambda v: min(255, max(0, 3 * v - 255)),
           lambda v: max(0, 3 * v - 510)]
    panels = [(image, "")]
    for word, grid in zip(words, maps):
        heat = (255 * grid / grid.max()).byte()  # (h, w)
        mask = Image.frombytes("L", heat.shape[::-1], bytes(heat.flatten().tolist()))
        mask = mask.resize((cell, cell), Image.BILINEAR)
        heatmap = Image.merge("RGB", [mask.point(f) for f in hot])
        panels.append((Image.blend(image, heatmap, 0.6), word))
    rows = math.ceil(len(panels) / per_row)
    sheet = Image.new("RGB", (cell * min(per_row, len(panels)), rows * (cell + 20)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (panel, word) in enumerate(panels):
        x, y = cell * (k % per_row), (cell + 20) * (k // per_row)
        sheet.paste(panel, (x, y))
        draw.text((x + cell // 2, y + cell + 3), word, fill="black", anchor="mt")
    sheet.save(path)

def caption_command(args):
    model, tokenizer = load_model(args.ckpt)
    if args.vocab:
        tokenizer = Tokenizer(args.vocab)
    if tokenizer is None:
        raise ValueError(f"{args.ckpt} carries no vocabulary: pass --vocab (e.g. coco_10k.model)")
    if len(tokenizer) != model.cfg.vocab_size:
        raise ValueError(f"the vocabulary has {len(tokenizer)} tokens but {args.ckpt} predicts "
                         f"{model.cfg.vocab_size}")
    if not model.cfg.captioning:
        raise ValueError(f"{args.ckpt} was trained for {model.cfg.task}, which does not caption")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    size = model.cfg.image_size
    resize = round(size * 256 / 224)
    pictures = [TF.center_crop(TF.resize(load_image(p), resize), size) for p in args.images]
    images = to_input(torch.stack([TF.pil_to_tensor(p) for p in pictures]), device)
    generator = torch.Generator().manual_seed(args.seed)
    captions = model.caption(images, args.beam, args.nucleus, model.cfg.max_length, generator)
    if args.attention:
        Path(args.attention).mkdir(parents=True, exist_ok=True)
        maps = cross_attention(model, images, captions).cpu()
    for k, (path, tokens) in enumerate(zip(args.images, captions)):
        print(f"{path}: {tokenizer.decode(tokens)}")
        if args.attention:
            words = [tokenizer.sp.id_to_piece(t).replace("\u2581", "") for t in tokens]
            picture = Path(args.attention) / f"{Path(path).stem}.png"
            draw_attention(pictures[k], words, maps[k], picture)

def get_args_parser():
    parser = argparse.ArgumentParser(prog="virtex.py", description="Caption images with a VirTex "
                                     "checkpoint, or export its backbone.")
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", help="print a caption per image")
    caption.add_argument("--ckpt", required=True, help="our checkpoint, or an official one")
    caption.add_argument("images", nargs="+", help="image files")
    caption.add_argument("--beam", type=int, default=5, help="beam size (default: 5)")
    caption.add_argument("--nucleus", type=float, help="sample with this nucleus p (e.g. 0.9)")
    caption.add_argument("--seed", type=int, default=0, help="for nucleus sampling (default: 0)")
    caption.add_argument("--vocab", help="SentencePiece model for official checkpoints")
    caption.add_argument("--attention", help="folder for one attention picture per image")
    export = commands.add_parser("export", help="write the backbone for torchvision or detectron2")
    export.add_argument("--ckpt", required=True, help="our checkpoint, or an official one")
    export.add_argument("--format", choices=["torchvision", "detectron2"], default="torchvision",
                        help="(default: torchvision)")
    export.add_argument("out", help="output file")
    return parser

def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with one_line_errors():
        if args.command == "caption":
            caption_command(args)
        else:
            torch.save(export_backbone(load_model(args.ckpt)[0], args.format), args.out)
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
