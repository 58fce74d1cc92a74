"""timm models: local pretrained weights (never downloaded), classifier re-init, embeddings."""
import pytest
import torch
from safetensors.torch import save_file

from train.config import UserError
from train.models import channels_last, create_model, embed_and_classify


def test_local_weights_load_and_classifier_reinit(tmp_path):
    source = create_model("small_cnn", 5, 1)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        model = create_model("small_cnn", 10, 1, pretrained=str(tmp_path / name))
        assert torch.equal(model.features[0].weight, source.features[0].weight)
        assert model.fc.weight.shape == (10, 128)
    assert create_model("small_cnn", 10, 1, pretrained="none").fc.weight.shape == (10, 128)  # from scratch
    with pytest.raises(UserError, match="never downloaded"):
        create_model("small_cnn", 10, 1, pretrained=str(tmp_path / "absent.pth"))


def test_weights_that_do_not_fit_or_are_not_weights_are_one_error(tmp_path):
    from timm.models import create_model as timm_model

    wide = timm_model("small_cnn", num_classes=10, in_chans=1, width=16)  # another width: every conv differs
    torch.save(wide.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(UserError, match=r"does not fit SmallCNN \(other shape: features.0.weight"):
        create_model("small_cnn", 10, 1, pretrained=str(tmp_path / "narrow.pth"))
    loose = create_model("small_cnn", 10, 1, pretrained=str(tmp_path / "narrow.pth"), pretrained_strict=False)
    assert loose.features[0].weight.shape == (32, 1, 3, 3)  # left as initialised
    torch.save(create_model("resnet18", 10, 1).state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="missing: .*unexpected: "):
        create_model("small_cnn", 10, 1, pretrained=str(tmp_path / "other.pth"))
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    torch.save({"model": {"x": object}}, tmp_path / "pickle.pth")  # weights_only refuses Python objects
    for name, reader in (("notes.pth", "PyTorch"), ("bad.safetensors", "safetensors"), ("pickle.pth", "PyTorch")):
        with pytest.raises(UserError, match=rf"--pretrained .*{name}: cannot be read as {reader} weights"):
            create_model("small_cnn", 10, 1, pretrained=str(tmp_path / name))


def test_embeddings_are_penultimate_features_of_a_timm_resnet():
    model = create_model("resnet18", 7, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb, logits = embed_and_classify(model, x)
        assert emb.shape == (2, 512) and torch.allclose(logits, model(x), atol=1e-5)


def test_channels_last_weights_give_the_same_outputs():
    torch.manual_seed(0)
    plain = create_model("resnet18", 7, 3).eval()
    torch.manual_seed(0)
    nhwc = channels_last(create_model("resnet18", 7, 3)).eval()
    assert nhwc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), nhwc(x), atol=1e-4)


def test_small_mlp_embeds_any_image_size_and_memorises_random_labels():
    torch.manual_seed(0)
    model = create_model("small_mlp", 10, 1)
    for size in (8, 28):
        with torch.no_grad():
            emb, logits = embed_and_classify(model.eval(), torch.randn(3, 1, size, size))
        assert emb.shape == (3, 1024) and logits.shape == (3, 10)
    # the point of the model: it can fit labels that carry no signal (what CE does to mislabelled samples)
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    opt = torch.optim.Adam(model.train().parameters(), 1e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
    assert (model.eval()(x).argmax(1) == y).float().mean() > 0.95


@pytest.mark.parametrize("name, weights", [("cifar_resnet34", 21_282_122), ("preact_resnet18", 11_172_170)])
def test_cifar_backbones_keep_a_4x4_map_on_32x32(name, weights):
    model = create_model(name, 10, 3).eval()
    assert sum(p.numel() for p in model.parameters()) == weights  # the standard CIFAR ResNet-34 / PreAct-18
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 512, 4, 4)
        emb, logits = embed_and_classify(model, x)
        assert emb.shape == (2, 512) and torch.allclose(logits, model(x), atol=1e-5)
    # timm's ImageNet-stem resnet34 shrinks 32x32 to 1x1: the defect the CIFAR configs had
    assert create_model("resnet34", 10, 3).forward_features(x).shape == (2, 512, 1, 1)
