"""The PyTorch ImageNet example's training loop (github.com/pytorch/examples, imagenet/main.py)
with ``--dummy`` data, on one CPU process, compiled with coach by one line (``--coach
compile`` or ``--coach backend``). Smaller images and batches than ImageNet's by default, so
that a few steps run in seconds here.

    python examples/imagenet.py --dummy -a resnet18 --steps 5 --coach backend
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torchvision.datasets as datasets
import torchvision.models as models
import torchvision.transforms as transforms

from coach_line import with_coach  # examples/coach_line.py: the one changed line


def train(train_loader, model, criterion, optimizer, steps, losses):
    model.train()
    for i, (images, target) in enumerate(train_loader):
        if i >= steps:
            break
        output = model(images)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {i}: loss {loss.item():.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description='PyTorch ImageNet Training (coach)')
    parser.add_argument('-a', '--arch', default='resnet18', choices=sorted(
        name for name in models.__dict__ if name.islower() and not name.startswith("__")
        and callable(models.__dict__[name])))
    parser.add_argument('--dummy', action='store_true', help="use fake data to benchmark")
    parser.add_argument('-b', '--batch-size', default=8, type=int)
    parser.add_argument('--image-size', default=64, type=int)
    parser.add_argument('--lr', '--learning-rate', default=0.1, type=float)
    parser.add_argument('--momentum', default=0.9, type=float)
    parser.add_argument('--wd', '--weight-decay', default=1e-4, type=float)
    parser.add_argument('--steps', default=5, type=int)
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--coach', choices=('off', 'compile', 'backend'), default='compile')
    args = parser.parse_args(argv)
    if not args.dummy:
        parser.error("only --dummy data here: nothing is downloaded")
    torch.manual_seed(args.seed)
    model = models.__dict__[args.arch](num_classes=10)
    train_dataset = datasets.FakeData(args.batch_size * args.steps, (3, args.image_size, args.image_size),
                                      10, transforms.ToTensor(), random_offset=args.seed)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size)
    # the same batch twice: loss must fall on data the model has seen
    first = next(iter(train_loader))
    loader = [first] * args.steps
    model = with_coach(model, args.coach, first[0])
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
    losses = []
    started = time.perf_counter()
    train(loader, model, criterion, optimizer, args.steps, losses)
    took = time.perf_counter() - started
    print(f"{len(losses)} steps in {took:.2f} s ({took / len(losses) * 1e3:.1f} ms a step)")
    return model, losses, took


if __name__ == '__main__':
    main()
