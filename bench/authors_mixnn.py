"""The MixNN authors' released script (MacLLL/MixNN: train_cifar_with_MixNN.py + loss.py), minimally adapted
to train on our prepared shards with our network on the CPU.

    python bench/authors_mixnn.py --authors MIXNN_CHECKOUT --data shards/digits-symmetric0.4-s0-val0.1 \
        --r 0.4 --seed 0 --epochs 60 --warmup 6 --es 10 --lr 0.05 --batch-size 64 --out runs/authors/mixnn-s0

Get their code with `git clone https://github.com/MacLLL/MixNN` (written against commit 99e4b12; nothing of
it is stored here). `--warmup` and `--es` keep the authors' meaning (1-based epochs: warm-up while
`epoch < warmup`, soft-label loss from `epoch >= es`, targets moved when `epoch % 10 == 0`), so
`--warmup 6 --es 10` is our digits schedule of 5 warm-up epochs (`launch/configs/mixnn_authors.yaml` gives
the same schedule in our 0-based terms). Writes OUT/result.json: test accuracy per epoch (their
`test_cleaning`, on our test split), the last, and the label-correction accuracy of their soft labels.
`--print-changes` lists every change made to their two files and why.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from authors_common import (Change, Pairs, apply_changes, base_arguments, finished_or_shown, label_correction,
                            module_from_source, our_network, read_source, run_source, shard_datasets, write_result)

COMMIT = "99e4b12"

TRAIN_CHANGES = [
    Change("from MixNN_Final_Source_Code import resnet\n", "",
           "their ResNet-34 is replaced by our network (model creation below)"),
    Change("from MixNN_Final_Source_Code.dataloader_cifar import cifar_dataloader\n",
           "from mixnn_adapter import cifar_dataloader, authors_model, knn_positions\n",
           "their CIFAR loader is replaced by one over our shards with the same interface (bench/authors_common.py)"),
    Change("from MixNN_Final_Source_Code.loss import", "from mixnn_loss import",
           "their loss.py, loaded from their checkout with its CUDA calls made device-neutral"),
    Change("import nmslib\n", "", "nmslib is not installed here; the in-batch search below is exact"),
    Change("parser.add_argument('--es', default=60, help", "parser.add_argument('--es', default=60, type=int, help",
           "--es, --warmup, --K have no type in their parser (a value from the command line stays a string)"),
    Change("parser.add_argument('--warmup', default=10, help", "parser.add_argument('--warmup', default=10, type=int, help",
           "as above"),
    Change("parser.add_argument('--K', default=2, help", "parser.add_argument('--K', default=2, type=int, help",
           "as above"),
    Change("parser.add_argument('--seed', default=123)", "parser.add_argument('--seed', default=123, type=int)",
           "as above"),
    Change("args = parser.parse_args()\n",
           "args = parser.parse_args(ADAPTER_ARGV)\nargs.gpuid = 'cpu'\n",
           "the adapter's own options are not theirs; everything runs on the CPU"),
    Change("if args.dataset == 'cifar10':\n    print('############## Dataset CIFAR-10 ######################')\n"
           "    num_class = 10\n    _ = datasets.CIFAR10(root=args.data_path, train=True, download=True)\n"
           "    args.data_path = os.path.join(args.data_path, 'cifar-10-batches-py')\n",
           "if args.dataset == 'cifar10':\n    num_class = args.num_class\n",
           "no download: the data are our shards (--data_path), the class count theirs (--num_class)"),
    Change("if args.seed:\n    torch.backends.cudnn.deterministic = True",
           "if args.seed is not None:\n    np.random.seed(args.seed)  # their mixup lambda and the GMM draw from numpy\n"
           "    torch.backends.cudnn.deterministic = True",
           "seed 0 is a seed (theirs skips seeding when it is 0), and numpy is seeded too"),
    Change("index = [item[0][1] for item in re]", "index = knn_positions(x_feature)",
           "exact in-batch nearest neighbour other than the sample itself (their HNSW over one batch, k=2, "
           "second hit: the same on a batch of 64 up to HNSW's misses)"),
    Change("        nn_index = nmslib.init(method='hnsw', space='l2')\n"
           "        feature_np = x_feature.cpu().detach().numpy()\n"
           "        nn_index.addDataPointBatch(feature_np)\n"
           "        nn_index.createIndex({'post': 2}, print_progress=False)\n"
           "        re = nn_index.knnQueryBatch(feature_np, k=2, num_threads=4)\n", "",
           "the nmslib index build that the line above replaces"),
    Change("index = torch.from_numpy(np.array(index)).cuda()", "index = torch.as_tensor(index)", "CPU"),
    Change("lam = lam.float().cuda()", "lam = lam.float()", "CPU"),
    Change("index = torch.randperm(batch_size).cuda()", "index = torch.randperm(batch_size)", "CPU"),
    Change("losses = torch.zeros(50000)", "losses = torch.zeros(len(eval_train_loader.dataset))",
           "the training set's size instead of CIFAR's 50,000"),
    Change("inputs, targets = inputs.cuda(), targets.cuda()", "inputs, targets = inputs, targets", "CPU"),
    Change("exp_path = os.path.join('./',", "exp_path = os.path.join(ADAPTER_OUT,",
           "their checkpoints go into the result folder"),
    Change("num_workers=5,", "num_workers=0,", "the loader runs in the main process (digits is decoded in memory)"),
    Change("if args.model == 'resnet34':\n    model = resnet.ResNet34(num_classes=args.num_class).to(args.gpuid)\n",
           "model = authors_model(args.model, args.num_class)\n", "our network instead of their ResNet-34"),
]

LOSS_CHANGES = [
    Change(".cuda(non_blocking=False)", "", "CPU"),
    Change("lam=lam.cuda()", "lam=lam", "CPU"),
]


def adapter_module(args):
    import types

    train, train_plain, test = shard_datasets(args.data, args.dataset)
    in_chans = int(train[0][0].shape[0])

    class cifar_dataloader:  # noqa: N801 - their class name
        """Their loader's interface (`run('train' | 'test' | 'eval_train')`) over our shards."""

        def __init__(self, dataset, r, noise_mode, batch_size, num_workers, root_dir, noise_file=""):
            self.batch_size, self.num_workers = batch_size, num_workers

        def run(self, mode):
            loader = lambda ds, shuffle: torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle,
                                                                     num_workers=self.num_workers)
            if mode == "test":
                return loader(Pairs(test), False)
            ds, shuffle = (train, True) if mode == "train" else (train_plain, False)
            return loader(ds, shuffle), np.asarray(train.labels), np.asarray(train.true_labels)

    def knn_positions(features):
        from index.knn import knn_in_batch

        return knn_in_batch(features.detach(), 1)[:, 0].numpy()

    module = types.ModuleType("mixnn_adapter")
    module.cifar_dataloader = cifar_dataloader
    module.authors_model = lambda name, classes: our_network(name, classes, in_chans, "logits,features,none")
    module.knn_positions = knn_positions
    return module, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base_arguments(p, window_rate=0.8)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--es", type=int, default=10)
    args = p.parse_args()
    if finished_or_shown(p, args, {"train_cifar_with_MixNN.py": TRAIN_CHANGES, "loss.py": LOSS_CHANGES}):
        return
    read = lambda name: read_source(args.authors / name)  # their files have CRLF line ends
    loss_source = apply_changes(read("loss.py"), LOSS_CHANGES, "loss.py", COMMIT)
    train_source = apply_changes(read("train_cifar_with_MixNN.py"), TRAIN_CHANGES, "train_cifar_with_MixNN.py", COMMIT)
    adapter, train = adapter_module(args)
    loss = module_from_source("mixnn_loss", loss_source, str(args.authors / "loss.py"))
    argv = ["--r", str(args.r), "--noise_mode", "sym", "--num_epochs", str(args.epochs), "--warmup", str(args.warmup),
            "--es", str(args.es), "--lr", str(args.lr), "--batch_size", str(args.batch_size), "--seed", str(args.seed),
            "--model", args.model, "--data_path", str(args.data), "--num_class", str(len(np.unique(train.true_labels)))]
    train_source = f"ADAPTER_ARGV = {argv!r}\nADAPTER_OUT = {str(args.out)!r}\n" + train_source
    done = run_source(train_source, str(args.authors / "train_cifar_with_MixNN.py"), [],
                      {"mixnn_adapter": adapter, "mixnn_loss": loss})
    test = [float(a) for a in done["acc_val_per_epoch_model"]]
    write_result(args.out, {"script": "MacLLL/MixNN train_cifar_with_MixNN.py", "commit": COMMIT, "argv": argv,
                            "test_top1_per_epoch": test, "test_top1": test[-1],
                            "label_correction_accuracy": label_correction(done["criterion"].soft_labels,
                                                                          np.asarray(train.true_labels))})
    print(f"last-epoch test accuracy {test[-1]:.2f}")


if __name__ == "__main__":
    main()
