"""bench/knn_vote.py: the vote against hand-made neighbours, and end to end on a finished digits run."""
import subprocess
import sys

import numpy as np
from conftest import REPO, cpu_env

sys.path.insert(0, str(REPO / "bench"))
from knn_vote import neighbour_votes, vote_table  # noqa: E402


def test_votes_count_given_labels_and_skip_missing_neighbours():
    labels = np.array([0, 1, 1, 2, 2, 2])
    neighbours = np.array([[1, 2, 0], [3, 0, -1], [-1, -1, -1]])
    assert neighbour_votes(labels, neighbours, 1, 3).tolist() == [1, 2, -1]
    assert neighbour_votes(labels, neighbours, 3, 3).tolist() == [1, 0, -1]  # tie 0/2 -> the smaller id


def test_vote_beats_a_wrong_head_when_clean_neighbours_are_right():
    rng = np.random.default_rng(0)
    true = np.repeat([0, 1], 50)
    embeddings = np.where(true[:, None] == 0, -3.0, 3.0) + rng.normal(size=(100, 4))  # two tight clusters
    given = true.copy()
    given[::5] = 1 - true[::5]  # every 5th label flipped ...
    clean = np.where(given == true, 0.9, 0.1)  # ... and a perfect detector
    probs = np.full((100, 2), 0.5)
    probs[:, 0] = np.where(given == 0, 0.9, 0.1)  # a head that memorised the given labels
    probs[:, 1] = 1 - probs[:, 0]
    rows = vote_table(embeddings, probs, given, true, clean, [1, 5])
    assert [r["k"] for r in rows] == [1, 5]
    assert rows[0]["queries"] == 20 and rows[0]["pool"] == 80
    assert rows[0]["argmax"] == 0.0 and rows[0]["vote"] == 1.0 and rows[1]["vote"] == 1.0


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=cpu_env())


def test_end_to_end_on_a_digits_run(tmp_path, digits_shards):
    common = ["train/main.py", "--data", digits_shards, "--output", tmp_path, "--progress", "false",
              "--eval_every", "2"]
    trained = run(*common, "--run_name", "sc", "--method", "select-correct", "--epochs", "2", "--warmup_epochs", "1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run("bench/knn_vote.py", "--run", tmp_path / "sc", "--k", "1,5")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 1 |")
            or line.startswith("| 5 |")]
    assert len(rows) == 2 and rows[0][1] == rows[1][1]  # one argmax column, the same for every k
    assert all(0 <= float(c.strip(" %")) <= 100 for r in rows for c in r[1:])
    header = result.stdout.splitlines()[0]
    pool, queries = int(header.split(": ")[1].split()[0]), int(header.split("), ")[1].split()[0])
    assert pool + queries == 1294  # every training sample is in the pool or a query

    ce = run(*common, "--run_name", "ce", "--method", "ce", "--epochs", "1")
    assert ce.returncode == 0, ce.stderr[-3000:]
    refused = run("bench/knn_vote.py", "--run", tmp_path / "ce")
    assert refused.returncode != 0 and "holds no GMM clean probabilities" in refused.stderr
