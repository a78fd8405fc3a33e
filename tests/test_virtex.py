"""virtex.py: tokenizer, data, model, decoding, optimisation and checkpoints behave like the paper's code."""
import dataclasses
import json
import math
import pickle
import re

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import virtex
from conftest import write_coco

HEAD_KEYS = ["visual_projection.weight", "visual_projection.bias", "embedding.words.weight",
             "embedding.positions.weight", "embedding.layer_norm.weight", "embedding.layer_norm.bias"] + [
    f"transformer.layers.0.{name}" for name in (
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
        "self_attn.out_proj.bias", "multihead_attn.in_proj_weight", "multihead_attn.in_proj_bias",
        "multihead_attn.out_proj.weight", "multihead_attn.out_proj.bias",
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias")] + [
    "output.weight", "output.bias"]


def official_keys():
    """The 370 state-dict keys of the official bicaptioning_R_50_L1_H2048 checkpoints, in order."""
    cnn = [f"visual.cnn.{k}" for k in torchvision.models.resnet50().state_dict()
           if not k.startswith("fc.")]
    return cnn + [f"textual.{k}" for k in HEAD_KEYS] + [f"backward_textual.{k}" for k in HEAD_KEYS]


# -- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_has_the_official_special_ids(tokenizer):
    assert [tokenizer.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "[SOS]", "[EOS]", "[MASK]"]
    assert len(tokenizer) == 64


def test_tokenizer_round_trips_and_normalises_like_training(tokenizer):
    ids = tokenizer.encode("A Large RED circle left of a blue square")
    assert min(ids) >= 4 and virtex.SOS not in ids and virtex.EOS not in ids
    assert tokenizer.decode(ids) == "a large red circle left of a blue square"
    assert tokenizer.encode("a réd círcle") == tokenizer.encode("a red circle")
    assert tokenizer.decode([virtex.SOS, *ids, virtex.EOS]) == tokenizer.decode(ids)


def test_tokenizer_pickles_for_dataloader_workers(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("two small green triangles") == tokenizer.encode("two small green triangles")


def test_a_vocabulary_with_other_special_ids_is_refused_by_piece(tmp_path):
    import io
    import sentencepiece as spm
    from conftest import CAPTIONS
    buffer = io.BytesIO()  # SentencePiece's defaults: <unk> 0, <s> 1, </s> 2, no [SOS]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_writer=buffer,
                                   vocab_size=30,
                                   minloglevel=2)
    (tmp_path / "other.model").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError,
                       match=r"other.model: \[SOS\] is id 0, not 1; build it with Tokenizer.train"):
        virtex.Tokenizer(tmp_path / "other.model")


def test_tokenizer_reports_a_vocabulary_too_large_for_the_corpus():
    with pytest.raises(ValueError, match="5000-token vocabulary"):
        virtex.Tokenizer.train(["a red circle", "a blue square"], vocab_size=5000)


# -- data --------------------------------------------------------------------------------------

def test_flip_swaps_left_and_right_words_only():
    assert virtex.swap_left_right("a bright car left of a tree, right?") == "a bright car right of a tree, left?"
    assert virtex.swap_left_right("upright leftover") == "upright leftover"


def test_a_flipped_image_gets_the_mirrored_caption(tmp_path, tokenizer, cfg):
    (tmp_path / "train2017").mkdir(), (tmp_path / "annotations").mkdir()
    image = Image.new("RGB", (80, 60), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 60))  # red left half, blue right half
    image.save(tmp_path / "train2017" / "1.jpg")
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "A red circle Left of a blue circle"}]}))
    data = virtex.CaptioningDataset(virtex.read_captions(tmp_path, "train"), tokenizer,
                                    dataclasses.replace(cfg, crop_scale=1.0))
    seen = set()
    for seed in range(20):
        image, tokens, _ = data[(0, seed)]
        # blue on the left
        flipped = bool(image[2, :, :16].float().mean() > image[0, :, :16].float().mean())
        text = tokenizer.decode(tokens.tolist())
        assert text == ("a red circle right of a blue circle" if flipped else "a red circle left of a blue circle")
        seen.add(flipped)
    assert seen == {True, False}


def test_random_crops_span_the_configured_scales_and_aspects_flips_and_jitter_vary():
    drawn = [virtex.draw_augmentation(640, 480, 0.2, torch.Generator().manual_seed(s))
             for s in range(400)]
    for a in drawn:
        top, left, h, w = a.box
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
    areas = [a.box[2] * a.box[3] / (640 * 480) for a in drawn]
    aspects = [a.box[3] / a.box[2] for a in drawn]
    assert min(areas) < 0.25 and max(areas) > 0.9 and min(aspects) < 0.8 and max(aspects) > 1.25
    assert 160 < sum(a.flip for a in drawn) < 240 and 290 < sum(bool(a.jitter) for a in drawn) < 350
    # brightness, contrast, saturation, hue
    factors = torch.tensor([a.jitter for a in drawn if a.jitter])
    assert (factors[:, :3].min(0).values < 0.65).all() and (factors[:, :3].max(0).values > 1.35).all()
    assert factors[:, 3].min() < -0.09 and factors[:, 3].max() > 0.09
    assert len({a.order for a in drawn if a.jitter}) == 24  # every order of the four adjustments


def test_the_network_input_is_the_imagenet_normalised_image():
    import torchvision.transforms.functional as TF
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = TF.normalize(images.float() / 255, virtex.MEAN, virtex.STD)
    torch.testing.assert_close(virtex.to_input(images, torch.device("cpu")), expected)


def test_dataset_groups_captions_and_pads_batches(coco, tokenizer, cfg):
    data = virtex.CaptioningDataset(virtex.read_captions(coco, "train"), tokenizer, cfg)
    assert len(data) == 12 and all(len(caps) == 3 for _, caps in data.items)
    image, tokens, skipped = data[(0, 123)]
    assert image.shape == (3, 64, 64)
    assert tokens[0] == virtex.SOS and tokens[-1] == virtex.EOS
    images, padded, lengths, skipped = virtex.collate([data[(i, i)] for i in range(4)])
    assert images.shape == (4, 3, 64, 64) and padded.shape == (4, lengths.max()) and skipped == []
    assert all((padded[i, lengths[i]:] == 0).all() and padded[i, lengths[i] - 1] == virtex.EOS for i in range(4))


def test_samples_are_a_function_of_their_seed(coco, tokenizer, cfg):
    data = virtex.CaptioningDataset(virtex.read_captions(coco, "train"), tokenizer, cfg)
    a, b, c = data[(3, 7)], data[(3, 7)], data[(3, 8)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_long_captions_are_cut_to_max_length_without_eos(tmp_path, tokenizer, cfg):
    write_coco(tmp_path, "val", 1)
    data = virtex.CaptioningDataset(virtex.read_captions(tmp_path, "val"), tokenizer, cfg, False)
    data.items[0] = (data.items[0][0], [" ".join(["red circle"] * 40)])
    tokens = data[(0, 0)][1]
    assert len(tokens) == 30 and tokens[0] == virtex.SOS and virtex.EOS not in tokens.tolist()


def test_stream_shards_every_global_batch_disjointly_and_resumes():
    full = list(virtex.ResumableSampler(10, 4, seed=0, start=0, stop=6))
    ranks = [list(virtex.ResumableSampler(10, 4, seed=0, start=0, stop=6, rank=r, world=2))
             for r in range(2)]
    for i, batch in enumerate(full):
        assert ranks[0][i] + ranks[1][i] == batch
    assert list(virtex.ResumableSampler(10, 4, seed=0, start=3, stop=6)) == full[3:]
    first_pass = [index for batch in full[:2] for index, _ in batch] + [index for index, _ in full[2][:2]]
    assert sorted(first_pass) == list(range(10))  # one full pass before any image repeats
    assert list(virtex.ResumableSampler(10, 4, seed=1, start=0, stop=6)) != full
    assert len({seed for batch in full for _, seed in batch}) == 24  # every sample draws on its own


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        virtex.read_captions(tmp_path, "train")


# -- model -------------------------------------------------------------------------------------

def captions(*rows):
    """Right-padded [SOS] .. [EOS] batch from lists of word ids."""
    seqs = [torch.tensor([virtex.SOS, *r, virtex.EOS]) for r in rows]
    return nn.utils.rnn.pad_sequence(seqs, batch_first=True)


def test_the_grid_has_512_channels_and_the_loss_sums_both_heads(model, cfg):
    images = torch.randn(2, 3, 64, 64)
    assert model.visual(images).shape == (2, 512, 2, 2)
    out = model(images, captions([5, 6, 7], [8]))
    assert set(out) == {"loss", "loss_forward", "loss_backward"} and out["loss"].shape == ()
    assert torch.allclose(out["loss"], out["loss_forward"] + out["loss_backward"])


def test_reversed_captions_start_with_eos_and_keep_padding():
    tokens = captions([5, 6, 7], [8])
    reversed_ = virtex.reverse_captions(tokens, virtex.lengths_of(tokens))
    assert reversed_.tolist() == [[2, 7, 6, 5, 1], [2, 8, 1, 0, 0]]


def test_backward_loss_is_the_cross_entropy_of_the_reversed_caption(model):
    model.eval()
    images, tokens = torch.randn(2, 3, 64, 64), captions([5, 6, 7], [8])
    memory = model.textual.project(model.visual(images))
    # by hand
    reversed_ = torch.tensor([[virtex.EOS, 7, 6, 5, virtex.SOS], [virtex.EOS, 8, virtex.SOS, 0, 0]])
    logits = model.backward_textual.output(model.backward_textual(memory, reversed_[:, :-1]))
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), reversed_[:, 1:].flatten(),
                                           ignore_index=0)
    torch.testing.assert_close(model(images, tokens)["loss_backward"], expected)


def test_backward_head_shares_all_but_its_decoder(model):
    f, b = model.textual, model.backward_textual
    assert b.embedding is f.embedding and b.visual_projection is f.visual_projection and b.output is f.output
    assert f.output.weight is f.embedding.words.weight
    assert all(torch.equal(p, q) and p is not q for p, q in zip(f.transformer.parameters(),
                                                                b.transformer.parameters()))


def hidden_states(head, model, images, tokens):
    return head(head.project(model.visual(images)), tokens)


def test_forward_head_cannot_see_later_words(model):
    model.eval()
    images = torch.randn(1, 3, 64, 64)
    a, b = captions([5, 6, 7, 8]), captions([5, 6, 9, 10])  # differ from position 3 on
    ha = hidden_states(model.textual, model, images, a)
    hb = hidden_states(model.textual, model, images, b)
    assert torch.allclose(ha[:, :3], hb[:, :3], atol=1e-6)
    assert not torch.allclose(ha[:, 3:], hb[:, 3:], atol=1e-3)


def test_backward_head_cannot_see_earlier_words(model):
    model.eval()
    images = torch.randn(1, 3, 64, 64)
    a, b = captions([5, 6, 7, 8]), captions([9, 10, 7, 8])  # differ before position 3
    rev = lambda t: virtex.reverse_captions(t, virtex.lengths_of(t))  # [EOS] 8 7 w2 w1 [SOS]
    ha, hb = (hidden_states(model.backward_textual, model, images, rev(t)) for t in (a, b))
    assert torch.allclose(ha[:, :3], hb[:, :3], atol=1e-6)
    assert not torch.allclose(ha[:, 3:], hb[:, 3:], atol=1e-3)


def test_padding_does_not_change_the_loss(model):
    model.eval()
    images = torch.randn(1, 3, 64, 64)
    alone = model(images, captions([5, 6]))["loss"]
    padded = model(images, torch.cat([captions([5, 6]), torch.zeros(1, 7, dtype=torch.long)], 1))["loss"]
    torch.testing.assert_close(alone, padded)


def test_masked_lm_attention_does_not_see_padding(cfg):
    model = virtex.VirTex(dataclasses.replace(cfg, task="masked_lm")).eval()
    memory = model.textual.project(model.visual(torch.randn(1, 3, 64, 64)))
    alone = captions([5, 6, 7])  # length 5
    padded = torch.cat([alone, torch.zeros(1, 3, dtype=torch.long)], 1)
    lengths = torch.tensor([5])
    expected = model.textual(memory, alone, causal=False, lengths=lengths)
    torch.testing.assert_close(model.textual(memory, padded, causal=False, lengths=lengths)[:, :5],
                               expected)


def test_padding_and_unknown_positions_embed_to_zero(model):
    tokens = torch.tensor([[virtex.SOS, 5, virtex.UNK, 6, virtex.EOS, 0, 0]])
    x = model.textual.embedding(tokens)
    assert (x[0, [2, 5, 6]] == 0).all() and (x[0, [0, 1, 3, 4]] != 0).any(-1).all()


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_decoder_layer_equals_torch_transformer_decoder_layer():
    """The official heads are nn.TransformerDecoderLayer: ours must compute the same function."""
    torch.manual_seed(0)
    for norm_first in (False, True):
        theirs = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, activation="gelu",
                                            batch_first=True, norm_first=norm_first).eval()
        ours = virtex.DecoderLayer(32, 4, 64, 0.1, norm_first).eval()
        ours.load_state_dict(theirs.state_dict())
        x, memory = torch.randn(3, 6, 32), torch.randn(3, 5, 32)
        lengths = torch.tensor([6, 4, 2])
        padding = torch.arange(6)[None] >= lengths[:, None]
        expected = theirs(x, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(6),
                          tgt_key_padding_mask=padding)
        got = ours(x, memory, causal=True, mask=None)
        for i, n in enumerate(lengths):  # positions beyond a caption's length are never used
            torch.testing.assert_close(got[i, :n], expected[i, :n], atol=1e-5, rtol=1e-5)


def test_one_batch_overfits(model, cfg):
    torch.manual_seed(0)
    images, tokens = torch.randn(4, 3, 32, 32), captions([5, 6, 7], [8, 9], [10, 11, 12, 13], [14])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # 4x faster on a CPU
    first = None
    for _ in range(40):
        loss = model(images, tokens)["loss"]
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first


# -- decoding ----------------------------------------------------------------------------------

def table_scorer(table, vocab=6):
    """A hand-made model: log-probs of the next token given the previous one."""
    def logprobs(tokens):
        out = torch.full((len(tokens), vocab), -20.0)
        for row, prev in enumerate(tokens[:, -1].tolist()):
            for tok, p in table.get(prev, {virtex.EOS: 1.0}).items():
                out[row, tok] = torch.tensor(p).log()
        return out
    return logprobs


def test_beam_search_finds_the_best_sequence_greedy_misses():
    # Greedy takes 4 (0.6) then anything at 0.34; beam search finds 5 -> 5-chain at 0.4 * 1.0.
    table = {virtex.SOS: {4: 0.6, 5: 0.4}, 4: {virtex.EOS: 0.34, 4: 0.33, 5: 0.33},
             5: {virtex.EOS: 1.0}}
    assert virtex.beam_search(table_scorer(table), 1, beam=1) == [[4]]
    assert virtex.beam_search(table_scorer(table), 1, beam=2) == [[5]]


def test_nucleus_sampling_with_tiny_p_is_greedy(model):
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    greedy = model.caption(images, beam=1, max_steps=8)
    assert model.caption(images, nucleus=1e-6, max_steps=8) == greedy


# -- optimisation ------------------------------------------------------------------------------

@pytest.mark.parametrize("k, alpha", [(2, 0.5), (3, 0.25)])
def test_lookahead_equals_hand_computation(k, alpha):
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = virtex.LookAhead(torch.optim.SGD([w], lr=0.1), k=k, alpha=alpha)
    expected, slow = torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0])
    for step in range(1, 8):
        w.grad = torch.tensor([0.5, 1.0]) * step
        opt.step()
        expected = expected - 0.1 * torch.tensor([0.5, 1.0]) * step
        if step % k == 0:
            expected = slow = alpha * expected + (1 - alpha) * slow
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)


def run_lookahead(steps, resume_at=None):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    make = lambda: virtex.LookAhead(torch.optim.SGD([w], lr=0.1, momentum=0.9), k=5, alpha=0.5)
    opt = make()
    for step in range(steps):
        if step == resume_at:
            state = opt.state_dict()
            opt = make()  # a fresh process: new optimizer, same weights
            opt.load_state_dict(state)
        w.grad = torch.sin(w.detach() * (step + 1))
        opt.step()
    return w.detach().clone()


def test_lookahead_resumes_exactly_mid_cycle():
    assert torch.equal(run_lookahead(13, resume_at=7), run_lookahead(13))


def test_lr_warms_up_linearly_then_decays_to_zero():
    m = lambda s: virtex.lr_multiplier(s, 10_000, 500_000)
    assert m(0) == 0 and m(5_000) == 0.5 and m(10_000) == 1.0
    assert m(255_000) == pytest.approx(0.5) and m(500_000) == pytest.approx(0.0, abs=1e-12)


def test_no_decay_set_equals_official_regex_on_official_keys():
    official = re.compile(r".*textual.(embedding|transformer).*(norm.*|bias)")
    keys = [k for k in official_keys() if not k.endswith(("running_mean", "running_var",
                                                          "num_batches_tracked"))]
    assert [k for k in keys if virtex.no_weight_decay(k)] == [k for k in keys if official.match(k)]
    # embedding LN + decoder norms/biases, both heads
    assert sum(map(virtex.no_weight_decay, keys)) == 2 + 2 * 12 + 2


def test_param_groups_split_cnn_and_decay(model, cfg):
    groups = virtex.param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert (g["lr"] == cfg.cnn_lr) == ("cnn" in names[id(p)])
            assert (g["weight_decay"] == 0) == virtex.no_weight_decay(names[id(p)])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_autocast_runs_bf16_only_where_native_and_fp16_only_on_gpus(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert virtex.amp_dtype(gpu, "bf16") == torch.bfloat16 and virtex.amp_dtype(gpu, "fp16") == torch.float16
    assert virtex.amp_dtype(gpu, "off") is None and virtex.amp_dtype(cpu, "fp16") is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        assert virtex.amp_dtype(cpu, "bf16") == (torch.bfloat16 if native else None)
        with virtex.autocast(cpu, "bf16"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
        with virtex.autocast(cpu, "off"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# -- checkpoints -------------------------------------------------------------------------------

def test_state_dict_has_the_official_layout():
    with torch.device("meta"):  # the layout alone: no weights drawn
        assert list(virtex.VirTex().state_dict()) == official_keys()


def test_official_checkpoint_loads_with_from_official(tmp_path, model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = model.state_dict()
    torch.save({"model": state, "optimizer": {}, "iteration": 10}, tmp_path / "official.pth")
    loaded = virtex.from_official(tmp_path / "official.pth", heads=2)
    assert loaded.cfg.backbone == "resnet18" and loaded.cfg.hidden == 32 and loaded.cfg.vocab_size == 64
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)
    tied = ("backward_textual.embedding", "textual.output.weight")
    deduplicated = {k: v for k, v in state.items() if not k.startswith(tied)}
    torch.save(deduplicated, tmp_path / "bare.pth")
    assert torch.equal(virtex.from_official(tmp_path / "bare.pth", heads=2).textual.output.weight,
                       state["textual.output.weight"])


def test_saved_checkpoint_round_trips_with_its_vocabulary(tmp_path, model, tokenizer, cfg):
    virtex.save_checkpoint(tmp_path / "ckpt.pt",
                           {"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                            "vocab": tokenizer.model})
    loaded, tok = virtex.load_model(tmp_path / "ckpt.pt")
    assert loaded.cfg == cfg and tok.encode("a red circle") == tokenizer.encode("a red circle")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ValueError, match="notes.pt"):
        virtex.load_model(tmp_path / "notes.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a VirTex checkpoint"):
        virtex.load_model(tmp_path / "other.pt")


# -- tasks (paper section 4.2 ablations) -------------------------------------------------------

def test_masked_lm_masks_the_official_fraction_never_the_ends():
    torch.manual_seed(0)
    # T = 22: ceil(0.15 * 20) = 3 chosen
    tokens = torch.tensor([[virtex.SOS, *range(4, 24), virtex.EOS]] * 2000)
    inputs, labels = virtex.mask_tokens(tokens, virtex.lengths_of(tokens), 10_000)
    assert (labels[:, [0, -1]] == 0).all() and (inputs[:, [0, -1]] == tokens[:, [0, -1]]).all()
    supervised = labels != 0
    assert (inputs[supervised] == virtex.MASK).all() and (labels[supervised] == tokens[supervised]).all()
    assert supervised.sum(1).float().mean().item() == pytest.approx(3 * 0.85, abs=0.05)
    changed = (inputs != tokens).sum(1).float().mean().item()
    assert 3 * 0.85 < changed < 3 * 0.95 + 0.01


def test_a_single_masked_position_is_always_masked():
    tokens = torch.tensor([[virtex.SOS, 7, 8, virtex.EOS]] * 200)  # ceil(0.15 * 2) = 1
    inputs, labels = virtex.mask_tokens(tokens, virtex.lengths_of(tokens), 10_000)
    assert ((labels != 0).sum(1) == 1).all() and ((inputs == virtex.MASK).sum(1) == 1).all()


def test_classification_targets_are_the_right_sets():
    logits = torch.zeros(1, 10, requires_grad=True)
    tokens = torch.tensor([[virtex.SOS, 5, 7, 5, virtex.EOS, 0]])
    virtex.VirTex.classification_loss(logits, tokens, "token_classification").backward()
    # special ids and repeats are not targets
    assert (logits.grad[0] < 0).nonzero().flatten().tolist() == [5, 7]
    logits.grad = None
    virtex.VirTex.classification_loss(logits, torch.tensor([[1, 3, 0]]),
                                      "multilabel_classification").backward()
    # categories 1..K, 0 is padding
    assert (logits.grad[0] < 0).nonzero().flatten().tolist() == [1, 3]


@pytest.mark.parametrize("task", ["captioning", "masked_lm", "token_classification"])
def test_each_task_has_the_official_key_layout(task, cfg):
    with torch.device("meta"):
        keys = set(virtex.VirTex(dataclasses.replace(cfg, task=task)).state_dict())
    assert not any(k.startswith("backward_textual") for k in keys)
    heads = {k for k in keys if k.startswith("textual.")}
    assert heads == ({"textual.output.weight", "textual.output.bias"} if task.endswith("classification")
                     else {f"textual.{k}" for k in HEAD_KEYS})


def test_multilabel_dataset_reads_coco_instances(tmp_path, tokenizer, cfg):
    write_coco(tmp_path, "train", 3)
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
        "categories": [{"id": 17, "name": "cat"}, {"id": 3, "name": "car"}],
        "annotations": [{"image_id": 1, "category_id": 3}, {"image_id": 1, "category_id": 17},
                        {"image_id": 1, "category_id": 3}, {"image_id": 3, "category_id": 17}]}))
    items, classes = virtex.read_categories(tmp_path, "train")
    data = virtex.CaptioningDataset(items, tokenizer, cfg)  # a list of categories is its own target
    assert classes == 2 and len(data) == 2  # image 2 has no objects
    assert data[(0, 0)][1].tolist() == [1, 2] and data[(1, 0)][1].tolist() == [1]


def test_max_images_is_the_same_train_subset_for_every_task(coco, tokenizer, cfg):
    path = coco / "annotations" / "captions_train2017.json"
    captions = json.loads(path.read_text())
    # the captions file meets images in another order than its image list
    captions["annotations"].reverse()
    path.write_text(json.dumps(captions))
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": captions["images"], "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"image_id": i["id"], "category_id": 1} for i in captions["images"]]}))
    five = dataclasses.replace(cfg, max_images=5)
    tasks = virtex.read_captions(coco, "train"), virtex.read_categories(coco, "train")[0]
    subsets = [[p.name for p, _ in virtex.CaptioningDataset(items, tokenizer, five).items]
               for items in tasks]
    assert subsets[0] == subsets[1] == [f"{i:012d}.jpg" for i in range(1, 6)]
    two = dataclasses.replace(cfg, max_images=2)
    assert len(virtex.CaptioningDataset(virtex.read_captions(coco, "val"), tokenizer, two,
                                        train=False)) == 4


# -- captioning you can see --------------------------------------------------------------------

def test_cider_matches_hand_computed_values():
    references = {1: ["w x y z"], 2: ["a"]}
    # Image 1: every n-gram of the candidate is in its reference: 1 per n, x10.
    # Image 2: "b" is in no reference, so nothing overlaps.
    score, per_image = virtex.cider({1: "w x y z", 2: "b"}, references)
    assert per_image == pytest.approx({1: 10.0, 2: 0.0}) and score == pytest.approx(5.0)
    # A two-word exact match has only uni- and bigrams: (1 + 1 + 0 + 0) / 4 x 10.
    scores = virtex.cider({1: "w x", 2: "a"}, {1: ["w x"], 2: ["a"]})[1]
    assert scores == pytest.approx({1: 5.0, 2: 2.5})
    # Length differences are penalised by exp(-d^2 / 72), d counted in bigrams.
    short = virtex.cider({1: "w x y z", 2: "a"}, {1: ["w x y z q r s"], 2: ["a"]})[1][1]
    assert short < 10.0 * math.exp(-9 / 72) + 1e-9


def test_cider_equals_the_coco_reference_implementation():
    scorer = pytest.importorskip("pycocoevalcap.cider.cider_scorer")
    import random
    rng = random.Random(0)
    words = "a red blue circle square left of two and small the".split()
    candidates = {i: " ".join(rng.choices(words, k=rng.randint(1, 8))) for i in range(15)}
    references = {i: [" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(3)]
                  for i in range(15)}
    reference = scorer.CiderScorer(n=4, sigma=6.0)
    for i in candidates:
        reference += (candidates[i], references[i])
    assert virtex.cider(candidates, references)[0] == pytest.approx(reference.compute_score()[0],
                                                                    rel=1e-12)


def test_caption_words_lowercases_and_drops_punctuation():
    assert virtex.caption_words("A man, riding a Horse!  ") == "a man riding a horse"


def test_attention_probabilities_reproduce_the_module_output(model):
    model.eval()
    attention = model.textual.transformer.layers[0].multihead_attn
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    p = virtex.attention_probabilities(attention, x, memory)  # (B, heads, T, N)
    _, _, v = attention.project(x, memory)
    torch.testing.assert_close(attention(x, memory),
                               attention.out_proj((p @ v).transpose(1, 2).flatten(2)))


def test_attention_pictures_read_the_last_layer_and_the_picture_is_written(tmp_path, model,
                                                                           tokenizer, cfg):
    from PIL import Image
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    maps = virtex.cross_attention(model, images, [[5, 6, 7], [8]])
    assert maps.shape == (2, 3, 2, 2)
    layer, head = model.textual.transformer.layers[-1], model.textual
    assert not layer.multihead_attn._forward_hooks  # the hook is gone afterwards
    memory = head.project(model.visual(images))
    tokens = torch.tensor([[virtex.SOS, 5, 6], [virtex.SOS, 0, 0]])
    x = head.embedding(tokens)
    x = layer.norm1(x + layer.self_attn(x, causal=True))  # the cross-attention's input (post-norm)
    expected = virtex.attention_probabilities(layer.multihead_attn, x, memory)
    expected = expected.mean(1).unflatten(-1, (2, 2))
    torch.testing.assert_close(maps[0], expected[0])
    torch.testing.assert_close(maps[1, :1], expected[1, :1])  # the one word of the second caption
    virtex.save_checkpoint(tmp_path / "m.pt",
                           {"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                            "vocab": tokenizer.model})
    Image.new("RGB", (90, 70), "red").save(tmp_path / "red.jpg")
    virtex.main(["caption", "--ckpt", str(tmp_path / "m.pt"), "--beam", "2",
                 "--attention", str(tmp_path / "att"), str(tmp_path / "red.jpg")])
    picture = Image.open(tmp_path / "att" / "red.png")
    assert picture.width >= 160 and picture.height >= 180


def test_export_round_trips_into_torchvision_resnet50(cfg, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = virtex.VirTex(dataclasses.replace(cfg, backbone="resnet50"))
    virtex.save_checkpoint(tmp_path / "m.pt",
                           {"model": model.state_dict(), "config": dataclasses.asdict(model.cfg),
                            "vocab": tokenizer.model})
    virtex.main(["export", "--ckpt", str(tmp_path / "m.pt"), str(tmp_path / "resnet.pth")])
    state = torch.load(tmp_path / "resnet.pth", weights_only=True)
    resnet = torchvision.models.resnet50()
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    resnet.fc = nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    model.eval(), resnet.eval()
    torch.testing.assert_close(resnet(images), model.visual(images).mean((2, 3)))
    detectron2 = virtex.export_backbone(model, "detectron2")["model"]
    assert {"stem.conv1.weight", "stem.conv1.norm.weight", "res2.0.conv1.norm.bias",
            "res3.0.shortcut.weight",
            "res3.0.shortcut.norm.running_var"} <= set(detectron2) and len(detectron2) == len(state)
