"""DivideMix on the shared machinery: co-divide, steps, losses, one optimizer over two networks under DDP,
runs on 1 and 2 CPU ranks with identical divisions, exact resume, standalone evaluation of the pair."""
import csv
import json
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import accelerate_cmd, cpu_env, run_distributed

from train.config import Config, ConfigError, load_config
from train.methods import CoModel, create_run_model
from train.methods.dividemix import division, network_steps, prior_penalty, rampup, sharpen_rows

ARGS = ["--method", "dividemix", "--warmup_epochs", "1", "--progress", "false", "--eval_every", "2"]


def launch(tmp, *args, processes=2):
    cmd = accelerate_cmd("train/main.py", "--output", tmp / "runs", *args, processes=processes)
    result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900, env=cpu_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_each_network_trains_on_the_division_of_the_other():
    clean_per_net = np.array([[0.9, 0.1], [0.9, 0.9], [0.1, 0.9], [0.2, 0.2], [0.6, 0.4], [0.4, 0.6]],
                             dtype=np.float32)
    ids = np.arange(6)
    labelled, unlabelled = division(clean_per_net, ids, net=0, threshold=0.5)  # network 1 uses network 2's column
    assert labelled.tolist() == [1, 2, 5] and unlabelled.tolist() == [0, 3, 4]
    labelled, _ = division(clean_per_net, ids, net=1, threshold=0.5)
    assert labelled.tolist() == [0, 1, 4]


def at(cfg, epoch, labels, world, rank):
    """The parts of an epoch context that network_steps reads."""
    return SimpleNamespace(cfg=cfg, epoch=epoch, world=world, rank=rank,
                           data=SimpleNamespace(train=SimpleNamespace(labels=labels)))


def test_steps_read_each_sample_twice_with_as_many_unlabelled_and_split_over_ranks():
    cfg = Config(batch_size=4)
    labels = np.arange(40) % 4
    labelled, unlabelled = np.arange(0, 40, 2), np.arange(1, 13, 2)
    per_rank = [network_steps(at(cfg, 3, labels, 2, r), 0, labelled, unlabelled) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 5  # 20 labelled / global batch 4
    seen = []
    for rank_steps in per_rank:
        for batch in rank_steps:
            x, x2, u, u2 = np.split(batch, 4)  # 2 labelled + 2 unlabelled per rank, each read twice
            assert (x == x2).all() and (u == u2).all()
            assert np.isin(x, labelled).all() and np.isin(u, unlabelled).all()
            seen += x.tolist()
    assert sorted(seen) == labelled.tolist()  # one pass over the labelled set, shared by the ranks
    other = network_steps(at(cfg, 3, labels, 2, 0), 1, labelled, unlabelled)
    assert not all((a == b).all() for a, b in zip(other, per_rank[0]))  # each network its own order
    warm = network_steps(at(cfg, 0, labels, 1, 0), 0, np.arange(40))
    assert len(warm) == 10 and all(len(b) == 4 for b in warm)  # warm-up: each id once
    assert network_steps(at(cfg, 3, labels, 1, 0), 0, labelled, unlabelled[:0])[0].tolist()[:4] == \
        network_steps(at(cfg, 3, labels, 1, 0), 0, labelled, unlabelled[:0])[0].tolist()[4:]


def test_checkpoints_before_the_method_entry_restore_its_state():
    """A DivideMix checkpoint of a version whose per-network tables sat at the top level (`clean_per_net`, a
    [2, W, N] `loss_history`) restores them into the method, not into the shared tables."""
    from train.checkpoint import method_entry, restore
    from train.methods import DivideMix, Tables
    from train.targets import SoftTargets

    per_net, history = torch.rand(6, 2), torch.rand(2, 1, 6)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    old = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
           "epoch": 3, "step": 0, "targets": SoftTargets(np.zeros(6, dtype=np.int64), 2).state_dict(),
           "clean": per_net.mean(1), "partners": None, "loss_history": history, "clean_per_net": per_net,
           "rng": [torch.get_rng_state()], "best": {"metric": -1.0, "epoch": -1}}
    tables = Tables(SoftTargets(np.zeros(6, dtype=np.int64), 2))

    class OneProcess:
        process_index, num_processes = 0, 1
        unwrap_model = staticmethod(lambda m: m)

    shared, entry = method_entry(old, DivideMix.legacy_keys)  # as train/main.py resumes
    assert "loss_history" not in shared and "clean_per_net" not in shared
    assert restore(shared, model, optimizer, scheduler, tables, OneProcess())[0] == 3
    method = DivideMix()
    method.load_state_dict(entry)
    assert np.array_equal(method.clean_per_net, per_net.numpy()) and np.array_equal(method.loss_history, history)
    assert tables.loss_history is None and np.allclose(tables.clean, per_net.mean(1).numpy())
    assert method_entry({"method": method.state_dict()}, DivideMix.legacy_keys)[1]["clean_per_net"].shape == (6, 2)


def test_losses_and_ramp_follow_the_authors():
    cfg = Config(method="dividemix", warmup_epochs=10, lambda_u=25, rampup_epochs=16)
    assert rampup(cfg, 9.5) == 0 and rampup(cfg, 18) == pytest.approx(12.5) and rampup(cfg, 40) == 25
    uniform = torch.zeros(8, 5)
    assert prior_penalty(uniform) == pytest.approx(0.0, abs=1e-6)
    assert prior_penalty(torch.tensor([[9.0, 0, 0, 0, 0]] * 4)) > 1.0  # one class for everything
    p = torch.tensor([[0.6, 0.4]])
    assert sharpen_rows(p, 0.5)[0].tolist() == pytest.approx([0.36 / 0.52, 0.16 / 0.52])


def _one_step_on_first_network(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from train.optim import create_optimizer

    torch.manual_seed(0)
    co = CoModel(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3))
    model = DDP(co, find_unused_parameters=True)
    optimizer, _ = create_optimizer(Config(lr=0.1, weight_decay=0.1, momentum=0.9), model)
    before = [p.detach().clone() for p in co.parameters()]
    for _ in range(2):  # the second step would show momentum or weight decay on the idle network
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(5, 4) + rank, net=0).sum().backward()
        optimizer.step()
    after = list(co.parameters())
    return [bool(torch.equal(b, a)) for b, a in zip(before, after)], [p.detach().numpy().copy() for p in after]


def test_one_optimizer_under_ddp_leaves_the_idle_network_untouched(tmp_path):
    results = run_distributed(_one_step_on_first_network, 2, tmp_path=tmp_path)
    for unchanged, _ in results:
        assert unchanged == [False, False, True, True]  # net 1's weight and bias moved, net 2's did not
    for a, b in zip(results[0][1], results[1][1]):
        assert np.array_equal(a, b)  # the gradients were averaged over the ranks


def test_dividemix_settings_need_the_method():
    with pytest.raises(ConfigError, match="--lambda_u is a DivideMix setting; it does nothing with --method mixnn"):
        load_config(["--lambda_u", "0"])
    assert load_config(["--method", "dividemix", "--lambda_u", "0"]).lambda_u == 0
    cfg = load_config(["--lr_schedule", "step", "--lr_steps", "150", "--epochs", "300"])
    assert [int(e) for e in cfg.lr_steps] == [150]


def test_step_schedule_divides_at_the_named_epochs():
    from train.optim import create_optimizer

    cfg = load_config(["--lr_schedule", "step", "--lr_steps", "2,4", "--lr", "1.0"])
    optimizer, scheduler = create_optimizer(cfg, torch.nn.Linear(2, 2))
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, digits_shards):
    tmp = tmp_path_factory.mktemp("dm")
    launch(tmp, "--data", digits_shards, "--run_name", "full", "--epochs", "4", *ARGS)
    return tmp / "runs" / "full"


def test_two_ranks_hold_the_same_division_and_log_it(two_rank_run):
    rows = list(csv.DictReader((two_rank_run / "summary.csv").open()))
    assert [r["tables_checked_ranks"] for r in rows] == ["", "2", "2", "2"]  # CRC of both GMMs' tables
    last = rows[-1]
    for key in ("dividemix_labelled_fraction_net1", "dividemix_labelled_fraction_net2",
                "dividemix_division_agreement", "noise_auc_net1", "noise_auc_net2", "noise_precision_net1"):
        assert 0 < float(last[key]) <= 1, key
    assert float(last["noise_auc_net1"]) > 0.8  # 40% symmetric noise on digits: the GMMs find it
    assert float(last["test_top1"]) > 60
    state = torch.load(two_rank_run / "last.pt", weights_only=True)
    assert state["method"]["clean_per_net"].shape == (1294, 2)  # the method's own checkpoint entry
    assert state["clean"].shape == (1294,) and state["loss_history"] is None  # the shared tables hold no history
    assert any(k.startswith("nets.1.") for k in state["model"])
    assert (two_rank_run / "labels.csv").is_file()


def test_resume_gives_the_same_two_networks(two_rank_run, tmp_path, digits_shards):
    launch(tmp_path, "--data", digits_shards, "--run_name", "part", "--epochs", "2", *ARGS)
    part = tmp_path / "runs" / "part"
    launch(tmp_path, "--resume", part, "--epochs", "4")
    resumed = torch.load(part / "last.pt", weights_only=True)
    reference = torch.load(two_rank_run / "last.pt", weights_only=True)
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert torch.equal(reference["method"]["clean_per_net"], resumed["method"]["clean_per_net"])


def test_one_rank_run_and_standalone_evaluation_of_the_pair(tmp_path, digits_shards):
    launch(tmp_path, "--data", digits_shards, "--run_name", "one", "--epochs", "2", *ARGS, "--lambda_u", "0",
           "--warmup_penalty", "true", "--lr_schedule", "step", "--lr_steps", "1", processes=1)
    run = tmp_path / "runs" / "one"
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert float(rows[1]["lr"]) == pytest.approx(0.005)
    cmd = accelerate_cmd("train/evaluate.py", "--run", run, "--checkpoint", "last", "--split", digits_shards / "test")
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=cpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((run / "eval.json").read_text())["results"][str(digits_shards / "test")]
    assert evaluation["top1"] == pytest.approx(json.loads((run / "final.json").read_text())["last"]["test_top1"])
    model = create_run_model(Config(method="dividemix", model="small_cnn"), 10, 1)
    assert isinstance(model, CoModel)
    first, second = model.nets
    assert not torch.equal(next(first.parameters()), next(second.parameters()))  # independent inits
