"""timm models: local pretrained weights (never downloaded), classifier re-init, embeddings."""
import pytest
import torch
from safetensors.torch import save_file

from train.config import UserError
from train.models import create_model, embed_and_classify


def test_local_weights_load_and_classifier_reinit(tmp_path):
    source = create_model("small_cnn", 5, 1)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        model = create_model("small_cnn", 10, 1, pretrained=str(tmp_path / name))
        assert torch.equal(model.features[0].weight, source.features[0].weight)
        assert model.fc.weight.shape == (10, 128)
    with pytest.raises(UserError, match="never downloaded"):
        create_model("small_cnn", 10, 1, pretrained=str(tmp_path / "absent.pth"))


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
    nhwc = create_model("resnet18", 7, 3, channels_last=True).eval()
    assert nhwc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), nhwc(x), atol=1e-4)
