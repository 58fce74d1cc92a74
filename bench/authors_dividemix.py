"""The DivideMix authors' script (LiJunnan1992/DivideMix: Train_cifar.py), minimally adapted to train on our
prepared shards with our network on the CPU, on our digits schedule.

    python bench/authors_dividemix.py --authors DIVIDEMIX_CHECKOUT --data shards/digits-symmetric0.4-s0-val0.1 \
        --r 0.4 --seed 0 --epochs 60 --warmup 5 --lr 0.05 --batch-size 64 --out runs/authors/dividemix-s0

Get their code with `git clone https://github.com/LiJunnan1992/DivideMix` (written against commit d9d3058;
nothing of it is stored here). Their epochs count from 0 (`epoch < warm_up` is warm-up). Their CIFAR step
schedule (lr / 10 from epoch 150 of 300) is replaced by ours, cosine annealing with warm restarts every 10
epochs down to `--lr-min`, stepped once an epoch as our runs do, so both sides train on one schedule.
Writes OUT/result.json: test accuracy per epoch (their `test`: the sum of both networks' logits, on our test
split) and the last. `--print-changes` lists every change made to their file and why.
"""
from __future__ import annotations

import argparse
import types

import numpy as np
import torch

from authors_common import (Change, Pairs, apply_changes, base_arguments, finished_or_shown, our_network, read_source,
                            run_source, shard_datasets, write_result)

COMMIT = "d9d3058"

CHANGES = [
    Change("from PreResNet import *\n", "", "their PreAct ResNet-18 is replaced by our network (create_model below)"),
    Change("import dataloader_cifar as dataloader\n", "import dividemix_adapter as dataloader\n",
           "their CIFAR loader is replaced by one over our shards with the same interface (this file)"),
    Change("parser.add_argument('--seed', default=123)", "parser.add_argument('--seed', default=123, type=int)\n"
           "parser.add_argument('--warmup', default=10, type=int)\nparser.add_argument('--lr_min', default=1e-4, type=float)",
           "--seed has no type in their parser; their warm-up length is hard-coded per data set (below)"),
    Change("args = parser.parse_args()\n", "args = parser.parse_args(ADAPTER_ARGV)\n",
           "the adapter's own options are not theirs"),
    Change("torch.cuda.set_device(args.gpuid)\n", "", "CPU"),
    Change("torch.cuda.manual_seed_all(args.seed)\n", "np.random.seed(args.seed)  # their Beta draw and the GMM\n",
           "CPU; numpy is seeded too (their mixup lambda and the GMM draw from it)"),
    Change(".cuda()", "", "CPU (every occurrence)", every=True),
    Change("inputs_u, inputs_u2 = unlabeled_train_iter.next()", "inputs_u, inputs_u2 = next(unlabeled_train_iter)",
           "Python 3 DataLoader iterators have no .next() (their bare except would hide it, then fail) - both "
           "occurrences", every=True),
    Change("    acc = 100.*correct/total\n", "    acc = 100.*correct/total\n    TEST_ACC.append(acc)\n",
           "keep each epoch's test accuracy for result.json"),
    Change("losses = torch.zeros(50000)", "losses = torch.zeros(len(eval_loader.dataset))",
           "the training set's size instead of CIFAR's 50,000"),
    Change("    model = ResNet18(num_classes=args.num_class)\n", "    model = authors_model(args.num_class)\n",
           "our network instead of their PreAct ResNet-18"),
    Change("open('./checkpoint/%s_%.1f_%s'%(args.dataset,args.r,args.noise_mode)+'_stats.txt','w')",
           "open(ADAPTER_OUT + '/stats.txt','w')", "their logs go into the result folder"),
    Change("open('./checkpoint/%s_%.1f_%s'%(args.dataset,args.r,args.noise_mode)+'_acc.txt','w')",
           "open(ADAPTER_OUT + '/acc.txt','w')", "as above"),
    Change("if args.dataset=='cifar10':\n    warm_up = 10\nelif args.dataset=='cifar100':\n    warm_up = 30\n",
           "warm_up = args.warmup\n", "the warm-up length from --warmup (theirs: 10 for CIFAR-10, 30 for CIFAR-100)"),
    Change("num_workers=5,", "num_workers=0,", "the loader runs in the main process (digits is decoded in memory)"),
    Change("optimizer2 = optim.SGD(net2.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)\n",
           "optimizer2 = optim.SGD(net2.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)\n"
           "scheduler1 = optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer1, T_0=10, eta_min=args.lr_min)\n"
           "scheduler2 = optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer2, T_0=10, eta_min=args.lr_min)\n",
           "our digits schedule (cosine with warm restarts every 10 epochs) instead of their step at epoch 150"),
    Change("    lr=args.lr\n    if epoch >= 150:\n        lr /= 10\n    for param_group in optimizer1.param_groups:\n"
           "        param_group['lr'] = lr\n    for param_group in optimizer2.param_groups:\n        param_group['lr'] = lr\n",
           "", "their step schedule, replaced by the schedulers above"),
    Change("    test(epoch,net1,net2)\n", "    test(epoch,net1,net2)\n    scheduler1.step()\n    scheduler2.step()\n",
           "the schedulers step once an epoch, as ours"),
    Change("for epoch in range(args.num_epochs+1):", "for epoch in range(args.num_epochs):",
           "--num_epochs epochs (theirs runs num_epochs + 1)"),
]


class Labeled(torch.utils.data.Dataset):
    """Their 'labeled' mode: the selected samples, two augmented views, given label and clean probability."""

    def __init__(self, ds, ids: np.ndarray, prob: np.ndarray):
        self.ds, self.ids, self.prob = ds, ids, prob

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        first, label, _ = self.ds[int(self.ids[i])]
        second = self.ds[int(self.ids[i])][0]
        return first, second, label, float(self.prob[i])


class Unlabeled(Labeled):
    """Their 'unlabeled' mode: two augmented views."""

    def __getitem__(self, i):
        return self.ds[int(self.ids[i])][0], self.ds[int(self.ids[i])][0]


def adapter_module(args):
    train, train_plain, test = shard_datasets(args.data, args.dataset)
    in_chans = int(train[0][0].shape[0])

    class cifar_dataloader:  # noqa: N801 - their class name
        """Their loader's interface (`run('warmup' | 'train' | 'test' | 'eval_train', pred, prob)`) over our shards."""

        def __init__(self, dataset, r, noise_mode, batch_size, num_workers, root_dir, log, noise_file=""):
            self.batch_size, self.num_workers = batch_size, num_workers

        def loader(self, ds, shuffle, batch_size=None):
            return torch.utils.data.DataLoader(ds, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                                               num_workers=self.num_workers)

        def run(self, mode, pred=(), prob=()):
            if mode == "warmup":
                return self.loader(train, True, self.batch_size * 2)
            if mode == "test":
                return self.loader(Pairs(test), False)
            if mode == "eval_train":
                return self.loader(train_plain, False)
            pred, prob = np.asarray(pred), np.asarray(prob)
            labeled, unlabeled = pred.nonzero()[0], (1 - pred).nonzero()[0]
            return (self.loader(Labeled(train, labeled, prob[labeled]), True),
                    self.loader(Unlabeled(train, unlabeled, prob[unlabeled]), True))

    module = types.ModuleType("dividemix_adapter")
    module.cifar_dataloader = cifar_dataloader
    return module, lambda classes: our_network(args.model, classes, in_chans, "logits"), train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base_arguments(p, window_rate=0.9)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lr-min", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=4.0, help="their Beta parameter (their default)")
    args = p.parse_args()
    if finished_or_shown(p, args, {"Train_cifar.py": CHANGES}):
        return
    source = apply_changes(read_source(args.authors / "Train_cifar.py"), CHANGES, "Train_cifar.py", COMMIT)
    adapter, model, train = adapter_module(args)
    argv = ["--r", str(args.r), "--noise_mode", "sym", "--num_epochs", str(args.epochs), "--warmup", str(args.warmup),
            "--lr", str(args.lr), "--lr_min", str(args.lr_min), "--batch_size", str(args.batch_size),
            "--alpha", str(args.alpha), "--seed", str(args.seed), "--data_path", str(args.data),
            "--num_class", str(len(np.unique(train.true_labels)))]
    adapter.authors_model, adapter.TEST_ACC = model, []
    prelude = (f"ADAPTER_ARGV = {argv!r}\nADAPTER_OUT = {str(args.out)!r}\n"
               "from dividemix_adapter import authors_model, TEST_ACC\n")
    first = "from __future__ import print_function\n"  # must stay the file's first statement
    run_source(source.replace(first, first + prelude, 1), str(args.authors / "Train_cifar.py"), [],
               {"dividemix_adapter": adapter})
    test_acc = [float(a) for a in adapter.TEST_ACC]
    write_result(args.out, {"script": "LiJunnan1992/DivideMix Train_cifar.py", "commit": COMMIT, "argv": argv,
                            "test_top1_per_epoch": test_acc, "test_top1": test_acc[-1]})
    print(f"last-epoch test accuracy {test_acc[-1]:.2f}")


if __name__ == "__main__":
    main()
