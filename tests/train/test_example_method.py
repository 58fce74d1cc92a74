"""The example method of docs/architecture.md ("Adding a method"), run as written: one file's class,
registered in METHODS, trains through train/main.py (the same epoch loop, checkpoint and run log as every
shipped method) and its per-step loss is what it says."""
import csv
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cpu_env


def example_source() -> str:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text[text.index("### Adding a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_loss_bootstraps_from_the_prediction():
    namespace = {}
    exec(compile(example_source(), "docs/architecture.md", "exec"), namespace)
    from train.config import ConfigError, load_config
    from train.methods import METHODS, soft_cross_entropy

    try:
        assert load_config(["--method", "bootstrap", "--bootstrap.bootstrap_beta", "0.9"]).bootstrap_beta == 0.9
        with pytest.raises(ConfigError, match="--bootstrap_beta is a soft bootstrapping setting; it does nothing"):
            load_config(["--method", "ce", "--bootstrap_beta", "0.9"])
        method = METHODS["bootstrap"].from_config(load_config(["--method", "bootstrap"]), None, 3)
        logits, targets = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 1.0, 0.0]])
        p = torch.softmax(logits.detach(), 1)
        expected = soft_cross_entropy(logits.detach(), method.beta * targets + (1 - method.beta) * p)
        assert torch.isclose(method.loss(logits, targets), expected)
        assert method.loss(logits, targets) < soft_cross_entropy(logits.detach(), targets)  # the label pulls less
    finally:
        METHODS.pop("bootstrap", None)


def test_the_example_method_trains_through_main(tmp_path, digits_shards):
    plugin = tmp_path / "bootstrap_method.py"
    plugin.write_text(example_source())
    runner = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(tmp_path)!r}]\n"
              "import bootstrap_method  # registers --method bootstrap\n"
              "from train.main import main\n"
              f"main(['--method', 'bootstrap', '--data', {str(digits_shards)!r}, '--output', {str(tmp_path)!r}, "
              "'--run_name', 'boot', '--epochs', '3', '--warmup_epochs', '1', '--progress', 'false', "
              "'--bootstrap_beta', '0.7'])\n")
    result = subprocess.run([sys.executable, "-c", runner], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env=cpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "boot" / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["bootstrap_beta"] == "" and float(rows[2]["bootstrap_beta"]) == 0.7  # its metrics after warm-up
    assert float(rows[-1]["test_top1"]) > 30
    state = torch.load(tmp_path / "boot" / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and state["config"]["method"] == "bootstrap" and state["method"] == {}
