"""A ViT backbone: its patch tokens are the grid; it trains, resumes, probes, captions, exports."""
import dataclasses

import pytest
import torch
import torchvision

import probe
import virtex
from conftest import run_probe, run_train, seeded_model

VIT = ["--backbone", "vit_tiny_8"]  # at conftest.TINY's 32 px: 4x4 patches of 8 px


def tiny_vit(cfg):
    return seeded_model(dataclasses.replace(cfg, backbone="vit_tiny_8", image_size=32))


def toy_vision_transformer(image_size):
    """torchvision's own VisionTransformer class, of vit_tiny_8's size."""
    return torchvision.models.VisionTransformer(image_size, **virtex.SMALL_VITS["vit_tiny_8"])


def save(model, path, tokenizer=None):
    config = dataclasses.asdict(model.cfg)
    virtex.save_checkpoint(path, {"model": model.state_dict(), "config": config,
                                  "vocab": tokenizer.model if tokenizer else None})
    return path


def encoder_output(vit, images):
    """What torchvision's own forward computes before it keeps the class token: (B, 1 + h*w, D)."""
    seen = []
    hook = vit.encoder.register_forward_hook(lambda module, args, out: seen.append(out))
    vit(images)
    hook.remove()
    return seen[0]


def tokens_of(grid):  # (B, D, h, w) -> (B, h*w, D), row-major
    return grid.flatten(2).transpose(1, 2)


def test_the_grid_is_torchvisions_patch_tokens_in_their_places_without_the_class_token():
    torch.manual_seed(0)
    visual = virtex.Visual("vit_tiny_8", 32).eval()
    images = torch.randn(2, 3, 32, 32)
    grid = visual(images)
    assert grid.shape == (2, 192, 4, 4) and visual.channels == 192
    tokens = encoder_output(visual.vit, images)
    torch.testing.assert_close(tokens_of(grid), tokens[:, 1:])
    torch.testing.assert_close(virtex.pooled(grid), tokens[:, 1:].mean(1))  # the probes' features


def test_vit_b_16_at_224_px_gives_a_14x14_grid_of_768_channels():
    with torch.device("meta"):
        visual = virtex.Visual("vit_b_16", 224)
        assert visual(torch.empty(1, 3, 224, 224)).shape == (1, 768, 14, 14)


def test_image_sizes_the_patches_do_not_tile_are_one_clear_error(coco, tmp_path):
    with pytest.raises(ValueError,
                       match="image size 100 is not divisible by vit_b_16's patch size 16"):
        virtex.Visual("vit_b_16", 100)
    with pytest.raises(ValueError, match="this ViT reads 32-px images, not 64 px"):
        virtex.Visual("vit_tiny_8", 32)(torch.zeros(1, 3, 64, 64))
    message = "^error: image size 36 is not divisible by vit_tiny_8's patch size 8$"
    with pytest.raises(SystemExit, match=message):
        run_train(tmp_path, "--data", coco, *VIT, "--image-size", "36")


def test_vit_param_groups_put_no_decay_on_norms_biases_position_embedding_or_class_token(cfg):
    model = tiny_vit(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = virtex.param_groups(model, model.cfg)
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    exempt = lambda n: ".ln" in n or n.endswith(("bias", "pos_embedding", "class_token"))
    visual = [f"visual.{n}" for n, _ in model.visual.named_parameters()]
    assert {n for n in visual if n in undecayed} == set(filter(exempt, visual))
    assert {"visual.vit.class_token", "visual.vit.encoder.pos_embedding"} <= undecayed
    heads = [n for n in names.values() if n not in visual]  # the official rule, as for a ResNet
    assert {n for n in heads if n in undecayed} == set(filter(virtex.no_weight_decay, heads))
    for g in groups:
        assert all((names[id(p)] in visual) == (g["lr"] == cfg.cnn_lr) for p in g["params"])


@pytest.mark.slow
def test_a_tiny_vit_overfits_one_batch_by_looking_at_the_images(cfg):
    settings = dict(optimizer="adamw", lr=1e-2, cnn_lr=1e-3, warmup=1, iterations=40, dropout=0.0)
    model = tiny_vit(dataclasses.replace(cfg, **settings))
    optimizer = virtex.build_optimizer(model, model.cfg)
    images = torch.randn(4, 3, 32, 32)
    S, E = virtex.SOS, virtex.EOS
    tokens = torch.tensor([[S, 5, 6, 7, E], [S, 8, 9, E, 0], [S, 10, E, 0, 0], [S, 11, 12, 13, E]])
    losses = []
    for step in range(40):
        virtex.set_lr(optimizer, step + 1, model.cfg)
        loss = model(images, tokens)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]
    with torch.no_grad():  # the captions are told apart by their images: others, a higher loss
        mismatched = model.eval()(images[[1, 2, 3, 0]], tokens)["loss"].item()
        assert model(images, tokens)["loss"].item() < mismatched - 0.5


@pytest.mark.slow
def test_a_tiny_vit_resumed_after_a_stop_equals_the_uninterrupted_run(toy, tmp_path):
    flags = ["--toy-dir", toy, *VIT, "--iterations", "4", "--checkpoint-every", "100"]
    run_train(tmp_path / "a", *flags)
    run_train(tmp_path / "b", *flags, "--stop-after", "2")
    run_train(tmp_path / "b", *flags)
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["iteration"] == b["iteration"] == 4 and a["config"]["backbone"] == "vit_tiny_8"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["slow"], b["optimizer"]["slow"]))
    model, _ = virtex.load_model(tmp_path / "a" / "last.pt")
    assert any(k.startswith("visual.vit.encoder.") for k in model.state_dict())


@pytest.mark.slow
def test_a_tiny_vit_probes_on_the_toy_voc_and_imagenet(cfg, toy, tmp_path, capsys):
    voc = toy / "voc" / "VOCdevkit" / "VOC2007"
    checkpoint = save(tiny_vit(cfg), tmp_path / "vit.pt")
    run_probe("--ckpt", checkpoint, "--voc", voc, "--workers", 0)
    model, _ = virtex.load_model(checkpoint)
    expected = probe.voc07(model.visual, voc, 32, torch.device("cpu"), workers=0).mean()
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"mAP: {expected:.2f}"
    run_probe("--init", "random", *VIT, "--image-size", 32, "--imagenet", toy / "imagenet",
              "--epochs", 1, "--batch-size", 64, "--workers", 0, "--out", tmp_path / "linear")
    assert "random: top-1 " in capsys.readouterr().out and (tmp_path / "linear" / "last.pt").is_file()


def test_a_torchvision_vit_state_dict_probes_at_the_image_size_of_its_position_embedding(tmp_path):
    torch.manual_seed(0)
    vit = toy_vision_transformer(48)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    visual, size = probe.load_backbone(f"torchvision:{tmp_path / 'vit.pth'}")
    assert size == 48 and visual.channels == 192
    ours, theirs = visual.torchvision_model().state_dict(), vit.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items()) and len(ours) == len(theirs) - 2
    fresh, size = probe.load_backbone("random", "vit_tiny_8", image_size=64)
    assert size == 64 and fresh(torch.zeros(1, 3, 64, 64)).shape == (1, 192, 8, 8)


def test_a_vit_export_loads_into_torchvisions_vision_transformer_missing_only_its_heads(
        cfg, tokenizer, tmp_path):
    model = tiny_vit(cfg).eval()
    checkpoint = save(model, tmp_path / "vit.pt", tokenizer)
    virtex.main(["export", "--ckpt", str(checkpoint), str(tmp_path / "vit.pth")])
    vit = toy_vision_transformer(32).eval()
    state = torch.load(tmp_path / "vit.pth", weights_only=True)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    assert missing == ["heads.head.weight", "heads.head.bias"] and unexpected == []
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder_output(vit, images)[:, 1:], tokens_of(model.visual(images)))
    with pytest.raises(SystemExit,
                       match="^error: the detectron2 export is for ResNets .*vit_tiny_8"):
        virtex.main(["export", "--ckpt", str(checkpoint), "--format", "detectron2",
                     str(tmp_path / "d2")])


@pytest.mark.parametrize("name", virtex.BACKBONES)
def test_every_backbone_exports_torchvisions_keys_but_the_classifier_and_is_recognised_by_them(name):
    size = 64 if name in virtex.SMALL_VITS else 224
    with torch.device("meta"):
        builder = getattr(torchvision.models, name, None)
        theirs = (builder() if builder else toy_vision_transformer(size)).state_dict()
    ours, classifier = virtex.torchvision_shapes(name, size)  # Visual(name).torchvision_model()'s
    assert classifier in ({"fc"}, {"heads"})
    assert list(ours) == [k for k in theirs if k.split(".")[0] not in classifier]
    assert all(ours[k] == theirs[k].shape for k in ours)
    exported = {k: v for k, v in theirs.items() if k in ours}
    assert virtex.infer_backbone(theirs) == virtex.infer_backbone(exported) == (name, size)


def test_vit_attention_pictures_have_a_cell_per_patch(cfg, tokenizer, tmp_path):
    from PIL import Image
    model = tiny_vit(cfg).eval()
    maps = virtex.cross_attention(model, torch.randn(2, 3, 32, 32), [[5, 6, 7], [8]])
    assert maps.shape == (2, 3, 4, 4) and torch.allclose(maps.sum((2, 3)), torch.ones(2, 3))
    Image.new("RGB", (90, 70), "red").save(tmp_path / "red.jpg")
    checkpoint = save(model, tmp_path / "vit.pt", tokenizer)
    virtex.main(["caption", "--ckpt", str(checkpoint), "--beam", "2", "--attention",
                 str(tmp_path / "att"), str(tmp_path / "red.jpg")])
    assert (tmp_path / "att" / "red.png").is_file()
