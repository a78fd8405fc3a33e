"""Mutation run, for developers (not collected by pytest, not part of CI): put plausible one-line
bugs into the code one at a time and check that the test suite catches each.

    python tests/mutate.py                 # every mutant: killed by which test, or SURVIVED
    python tests/mutate.py 3 7             # only mutants 3 and 7
    python tests/mutate.py --before        # without the tests written for the survivors
    python tests/mutate.py --quick         # against the quick tier only (-m "not slow")
    python tests/mutate.py --list

Each mutant runs in a copy of the project: first the tests named as its likely catchers, then, if
they all pass, the whole suite; it survives only if the whole suite passes.
"""
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (file, the line as it is, the line with the bug, what the bug is,
#  -k expression of likely catchers)
MUTANTS = [
    ("virtex.py", "backward = reverse_captions(tokens, lengths)", "backward = tokens",
     "backward head trained on the forward caption", "reversed or backward"),
    ("virtex.py", "                                   processes.rank, processes.world)",
     "                                   0, processes.world)",
     "every rank trains on rank 0's slice", "own_slice"),
    ("probe.py", "parts = [(keys, F.normalize(features(visual, images, device, amp), dim=1).cpu())",
     "parts = [(keys, features(visual, images, device, amp).cpu())",
     "probe features not L2-normalised", "unit_norm"),
    ("train.py",
     '            run.best_map = virtex.load_checkpoint(run.out / "best.pt")["voc_map"]',
     "            pass", "a resumed run forgets the best mAP so far", "survives"),
    ("train.py", "    virtex.set_lr(optimizer, step, cfg)",
     "    virtex.set_lr(optimizer, step + 1, cfg)", "each step runs at the next step's LR",
     "scheduled"),
    ("virtex.py", "        target = area * (crop_scale + u[0] * (1 - crop_scale))",
     "        target = area * crop_scale", "random crops always at the smallest scale",
     "crops_span"),
    ("virtex.py", "            torch._foreach_mul_(self.params, self.alpha)",
     "            torch._foreach_mul_(self.params, 0.5)", "LookAhead ignores its alpha",
     "lookahead"),
    ("train.py", "    finite = steps.isfinite()", "    finite = steps[:, :2].isfinite()",
     "non-finite values checked in the first two columns only", "non_finite"),
    ("virtex.py",
     "            yield [(self.order(p // self.n)[p % self.n], mix_seed(self.seed, p)) for p in "
     "positions]",
     "            yield [(self.order(p // self.n)[p % self.n], mix_seed(self.seed, i)) for p in "
     "positions]",
     "every sample of a batch draws the same augmentation", "shards_every or stream or sampler"),
    ("virtex.py", "    return images.sub_(mean).div_(std)", "    return images.sub_(mean)",
     "inputs not divided by the ImageNet std", "normalised_image"),
    ("virtex.py",
     '    return re.sub(r"\\b(left|right)\\b", lambda m: "right" if m[0].lower() == "left" else '
     '"left", caption, flags=re.I)',
     '    return re.sub(r"\\b(left|right)\\b", lambda m: "left" if m[0].lower() == "left" else '
     '"right", caption, flags=re.I)',
     "flips never swap left and right", "flip"),
    ("virtex.py", "    if torch.rand(1, generator=generator) < 0.8:",
     "    if torch.rand(1, generator=generator) < 0.2:", "colour jitter with p 0.2", "crops_span"),
    ("virtex.py",
     "        return x * (tokens != PAD).unsqueeze(-1)  # padding (and <unk>) positions become "
     "zeros",
     "        return x", "padding positions embed to non-zero vectors", "padding"),
    ("virtex.py",
     "        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)",
     "        out = F.scaled_dot_product_attention(q, k, v, mask, dropout)", "attention not causal",
     "cannot_see"),
    ("virtex.py",
     "            mask = (positions < lengths[:, None])[:, None, None]  # (B, 1, 1, T)",
     "            mask = (positions <= lengths[:, None])[:, None, None]  # (B, 1, 1, T)",
     "masked LM attends to one padding position", "masked or mask"),
    ("virtex.py", "    count = (p * (lengths - 2).clamp(min=0)).ceil()[:, None]  # (B, 1)",
     "    count = (p * (lengths - 1).clamp(min=0)).ceil()[:, None]  # (B, 1)",
     "masked LM masks too many tokens", "masked"),
    ("virtex.py",
     '        ignored = len(SPECIAL_PIECES) if task == "token_classification" else 1  # or only '
     "padding",
     "        ignored = 1", "token classification predicts [SOS]/[EOS]", "classification"),
    ("virtex.py", '    return in_heads and ("norm" in name or "bias" in name)',
     '    return in_heads and "norm" in name', "weight decay on the heads' biases", "decay"),
    ("virtex.py", '    return [{"params": params, "lr": cfg.cnn_lr if cnn else cfg.lr,',
     '    return [{"params": params, "lr": cfg.lr if cnn else cfg.cnn_lr,',
     "CNN and head LRs swapped", "param_groups"),
    ("virtex.py", "        return step / warmup", "        return (step + 1) / warmup",
     "warmup off by one", "warms_up or scheduled"),
    ("virtex.py",
     "    scores[:, 0] = 0  # all beams start identical: expand only the first at step 1",
     "    scores[:, :] = 0  # all beams start identical: expand only the first at step 1",
     "beam search starts with identical beams", "beam"),
    ("virtex.py", "        return F.cross_entropy(head.output(hidden).float(), targets[keep])",
     "        return F.cross_entropy(head.output(hidden).float(), targets[keep], "
     "label_smoothing=0.1)",
     "label smoothing in the captioning loss", "logits_only or reversed"),
    ("virtex.py",
     "        return torch.tensor([SOS, *self.tokenizer.encode(text), EOS][:self.max_length])",
     "        return torch.tensor([SOS, *self.tokenizer.encode(text), EOS][:self.max_length - 1])",
     "captions cut one token short", "max_length or long_captions"),
    ("train.py", "        bad = iteration - len(steps) + 1 + int((~finite.all(1)).nonzero()[0])",
     "        bad = iteration - len(steps) + int((~finite.all(1)).nonzero()[0])",
     "non-finite step named one too early", "non_finite"),
    ("train.py",
     "            torch.manual_seed(virtex.mix_seed(cfg.seed, iteration, rank))  # dropout, as "
     "the data",
     "            torch.manual_seed(virtex.mix_seed(cfg.seed, rank))  # dropout, as the data",
     "the same dropout masks at every step", "dropout"),
    ("train.py", '        if record.get("voc_map", -1.0) > run.best_map:',
     '        if record.get("voc_map", -1.0) < run.best_map:', "best.pt keeps the worst checkpoint",
     "survives"),
    ("train.py", "    x = torch.where(numbers[:, 4, None, None, None] > 0, x.flip(-1), x)",
     "    x = torch.where(numbers[:, 4, None, None, None] > 0, x, x.flip(-1))",
     "--decode device flips the wrong images", "decode"),
    ("train.py", "        weights = save(run, iteration)",
     "        weights = save(run, max(1, iteration - 1))",
     "checkpoints record the previous iteration", "resume"),
    ("virtex.py",
     "        reader = self.rank * self.workers + (worker + self.start) % self.workers",
     "        reader = self.rank * self.workers + worker % self.workers",
     "a resumed shard run restarts its readers' rotation", "shards"),
    ("virtex.py", "            first_shard, epoch = 0, epoch + 1", "            first_shard = 0",
     "shards read in the same order every epoch", "shards"),
    ("probe.py", "    precision = tp / (last.nonzero().squeeze(1) + 1)",
     "    precision = tp / (last.nonzero().squeeze(1) + 2)", "AP's precision off by one",
     "average_precision"),
    ("probe.py", "    kept = labels != -1",
     "    kept = labels != 0",
     "difficult test images counted, absent ones dropped", "difficult"),
    ("probe.py", "    weight = torch.where(targets > 0, 2.0, 1.0)",
     "    weight = torch.where(targets > 0, 1.0, 1.0)", "SVM positives not weighted 2", "scikit"),
    ("virtex.py", "    return sorted(parts, key=lambda part: part[0][0])", "    return parts",
     "gathered features in rank order, not image order", "voc07_probe_prints or shards_are"),
    ("probe.py",
     "    best = costs[cv.argmax(1).to(device)]  # the first maximum: ties keep the smaller C",
     "    best = costs[cv.argmin(1).to(device)]  # the first maximum: ties keep the smaller C",
     "SVM cost picked by the worst CV AP", "scikit"),
    ("train.py",
     '            splits = sets["voc"].features(run.model.visual, run.device, cfg.amp, run.group)',
     '            splits = sets["voc"].features(run.model.visual, run.device, group=run.group)',
     "evaluation in bf16 whatever the run's --amp", "precision"),
    ("probe.py", "        return 0.1 ** sum(step >= round(m * total) for m in MILESTONES)",
     "        return 0.1 ** sum(step > round(m * total) for m in MILESTONES)",
     "fine-tuning's LR steps down one iteration late", "schedule or lr"),
    ("probe.py",
     "    visual.train(recipe.finetune).requires_grad_(recipe.finetune)  # frozen: autograd stays "
     "out",
     "    visual.train(True).requires_grad_(recipe.finetune)  # frozen: autograd stays out",
     "linear evaluation updates the frozen backbone's BatchNorm statistics",
     "bit_identical or frozen"),
    ("probe.py",
     "        counts += torch.tensor([hits[:, 0].sum(), hits.any(1).sum(), len(batch)], "
     "device=device)",
     "        counts += torch.tensor([hits.any(1).sum(), hits[:, 0].sum(), len(batch)], "
     "device=device)",
     "top-1 and top-5 swapped", "top or linear"),
    ("virtex.py", "DDP_OPTIONS = dict(find_unused_parameters=True, gradient_as_bucket_view=True)",
     "DDP_OPTIONS = dict(static_graph=True, gradient_as_bucket_view=True)",
     "DDP rebuilds its buckets: a resumed run of 4 processes rounds its first steps differently",
     "four_processes"),
    ("train.py",
     "    virtex.broadcast_buffers(run.model)  # every rank evaluates the checkpoint's BatchNorm "
     "statistics",
     "    pass", "ranks evaluate with the BatchNorm statistics of their own last batch",
     "four_ranks"),
    ("train.py",
     "        mine = {r: place for r, place in run.shards[\"positions\"].items() "
     "if r // workers == run.rank}",
     "        mine = run.shards[\"positions\"]",
     "a resumed rank's stale copies of other readers' places are saved", "shards"),
]

# The second pass: bugs written from the code alone by a reviewer who had not read tests/, each
# named by the property it breaks.
SECOND_PASS = [
    ('virtex.py',
     '        return self.augment(image, augmentation), self.tokens(caption, '
     'augmentation.flip), skipped',
     '        return self.augment(image, augmentation), self.tokens(caption), skipped',
     'a horizontally flipped training image gets its caption with left and right swapped',
     'flip or left or right or swap or augmentation'),
    ('virtex.py',
     '        return torch.tensor([SOS, *self.tokenizer.encode(text), EOS][:self.max_length])',
     '        return torch.tensor([SOS, *self.tokenizer.encode(text), EOS][:self.max_length - '
     '1])',
     'a caption keeps max_length tokens including [SOS] and [EOS] (a caption that fits keeps '
     'its [EOS])',
     'max_length or truncat or tokens or eos or caption'),
    ('virtex.py',
     '            first = i * self.batch_size + self.rank * per_rank',
     '            first = i * self.batch_size + self.rank',
     'each process takes a disjoint slice of every global batch; the slices together are the '
     'one-process batch',
     'sampler or rank or world or disjoint or processes or ddp'),
    ('virtex.py',
     '            yield [(self.order(p // self.n)[p % self.n], mix_seed(self.seed, p)) for p '
     'in positions]',
     '            yield [(self.order(p // self.n)[p % self.n], mix_seed(self.seed, p % '
     'self.n)) for p in positions]',
     'an image seen again in a later epoch gets a fresh augmentation and caption draw (seed '
     'per sample position, not per image)',
     'sampler or epoch or augmentation or seed or different'),
    ('virtex.py',
     '                        yield images, tokens, lengths, unreadable, (reader, epoch, '
     'shard, index + 1)',
     '                        yield images, tokens, lengths, unreadable, (reader, epoch, '
     'shard, index)',
     'a run resumed from tar shards reads on exactly after the last sample used (no sample '
     'repeated)',
     'shards or resume or uninterrupted or tar or stream'),
    ('virtex.py',
     '                seed = mix_seed(self.cfg.seed, epoch, shard_id)',
     '                seed = mix_seed(self.cfg.seed, shard_id)',
     "each epoch over tar shards reads each shard's samples in a new order with new "
     'augmentations',
     'shards or epoch or order or tar or stream'),
    ('virtex.py',
     '        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)',
     '        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=False)',
     "with causal attention a position's output does not depend on later tokens (teacher "
     'forcing cannot peek)',
     'causal or future or mask or attention or peek or decoder'),
    ('virtex.py',
     '            mask = (positions < lengths[:, None])[:, None, None]  # (B, 1, 1, T)',
     '            mask = (positions <= lengths[:, None])[:, None, None]  # (B, 1, 1, T)',
     'bidirectional (masked LM) attention never attends to padding: outputs do not depend on '
     'how much padding follows',
     'masked_lm or padding or bidirectional or mask or attention'),
    ('virtex.py',
     '        parallel = torch.rand(len(tokens), device=tokens.device) < self.cfg.parallel  # '
     '(B,)',
     '        parallel = torch.rand(len(tokens), device=tokens.device) > self.cfg.parallel  # '
     '(B,)',
     'a caption is predicted in parallel (all [MASK] inputs) with probability cfg.parallel: '
     '1.0 means every caption, 0 none',
     'parallel or cappa or probability or mask'),
    ('virtex.py',
     '    return torch.where(index >= 0, tokens.gather(1, index.clamp(min=0)), PAD)',
     '    return torch.where(index > 0, tokens.gather(1, index.clamp(min=0)), PAD)',
     'reversing a caption [SOS] a b [EOS] gives [EOS] b a [SOS] (the backward head predicts '
     '[SOS] last)',
     'reverse or backward or bicaptioning or sos'),
    ('virtex.py',
     '    allowed = (positions >= 1) & (positions < lengths[:, None] - 1)  # (B, T)',
     '    allowed = (positions >= 0) & (positions < lengths[:, None] - 1)  # (B, T)',
     'masked LM never masks [SOS] or [EOS], only positions 1..T-2',
     'masked_lm or mask_tokens or sos or eos or special'),
    ('virtex.py',
     '    return inputs, torch.where(masked, tokens, PAD)',
     '    return inputs, torch.where(chosen, tokens, PAD)',
     'masked LM supervises only the positions replaced by [MASK], not the randomly replaced or '
     'kept ones',
     'masked_lm or mask_tokens or labels or supervised'),
    ('virtex.py',
     '        loss_backward = self.token_loss(self.backward_textual, memory, backward[:, :-1], '
     'backward[:, 1:])',
     '        loss_backward = self.token_loss(self.textual, memory, backward[:, :-1], '
     'backward[:, 1:])',
     'bicaptioning trains a separate backward decoder on reversed captions (it receives '
     'gradients)',
     'bicaptioning or backward or gradient or head'),
    ('virtex.py',
     '            memory = memory.repeat_interleave(beam, dim=0)  # (B*beam, h*w, H)',
     '            memory = memory.repeat(beam, 1, 1)  # (B*beam, h*w, H)',
     'the caption of an image does not depend on the other images in its batch',
     'caption or batch or beam or independent'),
    ('virtex.py',
     '        rows = (best // step.shape[1] + torch.arange(batch)[:, None] * beam).view(-1)',
     '        rows = (best // step.shape[1] + torch.arange(batch)[:, None]).view(-1)',
     'beam search of a batch gives each image the captions it gets alone',
     'beam or batch or caption or independent'),
    ('virtex.py',
     '        if self.counter == self.k:',
     '        if self.counter == self.k - 1:',
     'LookAhead syncs fast and slow weights every k inner steps',
     'lookahead or slow or every_k or optimizer'),
    ('virtex.py',
     '        return {**self.optimizer.state_dict(), "slow": self.slow, "counter": '
     'self.counter}',
     '        return {**self.optimizer.state_dict(), "slow": self.slow, "counter": 0}',
     "LookAhead's step counter is checkpointed, so a resume mid-cycle is exact",
     'lookahead or resume or uninterrupted or counter or state_dict'),
    ('virtex.py',
     '    in_heads = "textual" in parts[0] and parts[1] in ("embedding", "transformer")',
     '    in_heads = "textual" in parts[0] and parts[1] in ("transformer",)',
     "the textual embedding's LayerNorm and biases are exempt from weight decay (the official "
     'set)',
     'weight_decay or decay or param_groups or norm or bias'),
    ('virtex.py',
     '        return step / warmup',
     '        return (step + 1) / warmup',
     'the LR warms up linearly from 0: the first iteration runs at factor 0',
     'warmup or schedule or lr or multiplier'),
    ('virtex.py',
     '    changed = [k for k, v in settings.items() if k not in RUNTIME and saved.get(k) != v]',
     '    changed = [k for k, v in settings.items() if k in RUNTIME and saved.get(k) != v]',
     'resuming with other model/data/optimisation settings is refused; only runtime settings '
     'may change',
     'resume or settings or refused or other or runtime'),
    ('virtex.py',
     '    return sorted(parts, key=lambda part: part[0][0])',
     '    return parts',
     'a sharded evaluation returns results in key order, equal to the unsharded evaluation',
     'gather or sharded or shard or unsharded or distributed or world'),
    ('train.py',
     '    model, device = run.model.eval(), run.device',
     '    model, device = run.model, run.device',
     'the val loss is computed in eval mode (no dropout): deterministic and repeatable',
     'val or validate or eval or deterministic or dropout'),
    ('train.py',
     '        run.best_map = max(run.best_map, record.get("voc_map", -1.0))',
     '        run.best_map = record.get("voc_map", run.best_map)',
     'best.pt holds the checkpoint with the highest VOC07 mAP of the whole run',
     'best or voc_map or checkpoint or keep'),
    ('probe.py',
     '        columns.append([{"1": 1, "-1": 0, "0": -1}[v] for _, v in lines])  # VOC 0 means '
     'difficult',
     '        columns.append([{"1": 1, "-1": -1, "0": 0}[v] for _, v in lines])  # VOC 0 means '
     'difficult',
     'VOC label 0 means difficult (-1 here) and -1 means absent (0 here)',
     'voc or read_voc or difficult or labels'),
    ('probe.py',
     '    train = fold.to(device)[:, c] != f',
     '    train = fold.to(device)[:, c] == f',
     'cross-validation fits each SVM on the other folds and scores the held-out fold',
     'svm or fold or cross or validation or cost'),
    ('probe.py',
     '    parts = [(keys, F.normalize(features(visual, images, device, amp), dim=1).cpu())',
     '    parts = [(keys, F.normalize(features(visual, images, device, amp), dim=0).cpu())',
     "each image's feature is L2-normalised on its own (independent of the batch it is in)",
     'normalize or features or l2 or batch or extract'),
    ('probe.py',
     '    run.trained.train()',
     '    run.model.train()',
     'linear evaluation keeps the frozen backbone in eval mode (its BatchNorm statistics never '
     'change)',
     'linear or frozen or batchnorm or backbone or eval'),
    ('probe.py',
     '            hidden = head(memory.repeat_interleave(len(chunk), 0), rows[:, :-1])  # '
     '(B*c, T-1, H)',
     '            hidden = head(memory.repeat(len(chunk), 1, 1), rows[:, :-1])  # (B*c, T-1, H)',
     'a zero-shot score of (image, class) does not depend on the other images of the batch',
     'zero_shot or likelihood or batch or independent or score'),
    ('probe.py',
     '            parts.append(logp.where(targets != virtex.PAD, 0.0).sum(1).view(B, -1))',
     '            parts.append(logp.where(targets != virtex.PAD, 0.0).mean(1).view(B, -1))',
     "a caption's zero-shot score is the sum of its token log-probabilities (padding excluded)",
     'zero_shot or likelihood or sum or log or score'),
    ('probe.py',
     '        ids = [virtex.SOS, *tokenizer.encode(text), virtex.EOS]',
     '        ids = [virtex.SOS, *tokenizer.encode(text)]',
     'each class caption is [SOS] prompt [EOS]: the score includes ending the caption',
     'zero_shot or class_captions or prompt or eos'),
]
MUTANTS += SECOND_PASS


def run(command, cwd):
    """False when a test fails (or the suite cannot even start); True when none does, including
    when -k selects no test (pytest's exit code 5), which catches nothing."""
    try:
        finished = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=3600)
        return finished.returncode in (0, 5)
    except subprocess.TimeoutExpired:  # a mutant that hangs the suite is caught too
        return False


# The tests written for this run's survivors: --before leaves them out, to see what survived then.
ADDED_FOR_SURVIVORS = [
    "test_backward_loss_is_the_cross_entropy_of_the_reversed_caption", "test_probe_features_have_unit_norm",
    "test_random_crops_span_the_configured_scales_and_aspects_flips_and_jitter_vary",
    "test_the_network_input_is_the_imagenet_normalised_image",
    "test_virtex.py::test_lookahead_equals_hand_computation[3-0.25]",
    "test_one_non_finite_value_in_one_column_stops_the_run_at_its_step",
    "test_each_rank_trains_on_its_own_slice_of_every_global_batch",
    "test_best_pt_survives_a_resume_followed_by_a_worse_checkpoint",
    "test_each_step_runs_at_the_scheduled_learning_rates", "test_dropout_is_drawn_anew_at_every_step",
    "test_masked_lm_attention_does_not_see_padding", "test_every_epoch_reads_the_shards_in_a_new_order",
    "test_top1_and_top5_count_the_best_and_the_five_best_classes",
    "test_best_pt_keeps_the_best_checkpoint_of_the_run_not_the_best_since_the_last",
    "test_voc_labels_read_1_as_present_minus_1_as_absent_and_0_as_difficult",
    "test_a_class_caption_is_the_token_sequence_training_predicts",
]


def mutate(index, mutant, tmp, before=False, quick=False):
    path, original, bug, what, catchers = mutant
    copy = Path(tmp) / f"m{index}"
    ignored = shutil.ignore_patterns("data", "runs", ".git", "__pycache__", "*.pt")
    shutil.copytree(ROOT, copy, ignore=ignored)
    text = (copy / path).read_text()
    if text.count(original) != 1:
        return f"{index:2d} NOT FOUND ({text.count(original)} matches) {what}"
    (copy / path).write_text(text.replace(original, bug))
    pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    if quick:
        pytest += ["-m", "not slow"]
    if before:
        pytest += [f"--deselect=tests/{name}" for name in ADDED_FOR_SURVIVORS if "[" in name]
        pytest += ["-k", " and ".join(f"not {name}" for name in ADDED_FOR_SURVIVORS if "[" not in name)]
    start = time.perf_counter()
    likely = (pytest[:-2] + ["-k", f"({pytest[-1]}) and ({catchers})"] if before
              else pytest + ["-k", catchers])
    killed = not run(likely, copy) or not run(pytest, copy)
    verdict = "killed  " if killed else "SURVIVED"
    shutil.rmtree(copy)
    return f"{index:2d} {verdict} {time.perf_counter() - start:5.0f} s  {path}: {what}"


def main():
    if "--list" in sys.argv:
        return print("\n".join(f"{i:2d} {m[0]}: {m[3]}" for i, m in enumerate(MUTANTS)))
    chosen = [int(a) for a in sys.argv[1:] if re.fullmatch(r"\d+", a)] or range(len(MUTANTS))
    before, quick = "--before" in sys.argv, "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        results = [print(line := mutate(i, MUTANTS[i], tmp, before, quick), flush=True) or line
                   for i in chosen]
    killed = sum("killed" in line for line in results)
    print(f"{killed} of {len(results)} mutants killed")


if __name__ == "__main__":
    main()
