"""Mutation run, for developers (not collected by pytest, not part of CI): put plausible one-line
bugs into the code one at a time and check that the test suite catches each.

    python tests/mutate.py                 # every mutant: killed by which test, or SURVIVED
    python tests/mutate.py 3 7             # only mutants 3 and 7
    python tests/mutate.py --before        # without the tests written for the survivors
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
     "gathered features in rank order, not image order", "torchrun_probe or shards_are"),
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
     "four_processes"),
    ("train.py",
     "        mine = {r: place for r, place in run.shards[\"positions\"].items() "
     "if r // workers == run.rank}",
     "        mine = run.shards[\"positions\"]",
     "a resumed rank's stale copies of other readers' places are saved", "shards"),
]


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
]


def mutate(index, mutant, tmp, before=False):
    path, original, bug, what, catchers = mutant
    copy = Path(tmp) / f"m{index}"
    ignored = shutil.ignore_patterns("data", "runs", ".git", "__pycache__", "*.pt")
    shutil.copytree(ROOT, copy, ignore=ignored)
    text = (copy / path).read_text()
    if text.count(original) != 1:
        return f"{index:2d} NOT FOUND ({text.count(original)} matches) {what}"
    (copy / path).write_text(text.replace(original, bug))
    pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
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
    before = "--before" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        results = [print(line := mutate(i, MUTANTS[i], tmp, before), flush=True) or line for i in chosen]
    killed = sum("killed" in line for line in results)
    print(f"{killed} of {len(results)} mutants killed")


if __name__ == "__main__":
    main()
