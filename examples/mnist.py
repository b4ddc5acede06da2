"""The PyTorch MNIST example (github.com/pytorch/examples, mnist/main.py), unchanged but for
one line: the model is compiled with coach (``--coach compile``: ``coach_fx.compile``;
``--coach backend``: ``torch.compile(model, backend="coach")``). With ``--synthetic`` (the
default here: nothing is downloaded) the data are images of MNIST's shape, a fixed random
pattern per class under noise; 1000 training samples with batch 64 leave a last batch of 40.

    python examples/mnist.py --coach compile --epochs 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

from coach_line import with_coach  # examples/coach_line.py: the one changed line


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def train(args, model, device, train_loader, optimizer, epoch, losses):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if batch_idx % args.log_interval == 0:
            print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(
                epoch, batch_idx * len(data), len(train_loader.dataset),
                100. * batch_idx / len(train_loader), loss.item()))
            if args.dry_run:
                break


def test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction='sum').item()  # sum up batch loss
            pred = output.argmax(dim=1, keepdim=True)  # get the index of the max log-probability
            correct += pred.eq(target.view_as(pred)).sum().item()

    test_loss /= len(test_loader.dataset)

    print('\nTest set: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)\n'.format(
        test_loss, correct, len(test_loader.dataset),
        100. * correct / len(test_loader.dataset)))
    return test_loss


def synthetic(n: int, seed: int) -> TensorDataset:
    """Images of MNIST's shape, one fixed random pattern per class under noise: something to
    learn in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(patterns[y] + 2.0 * torch.randn(n, 1, 28, 28, generator=g), y)


def main(argv=None):
    parser = argparse.ArgumentParser(description='PyTorch MNIST Example (coach)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--test-batch-size', type=int, default=1000)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--lr', type=float, default=1.0)
    parser.add_argument('--gamma', type=float, default=0.7)
    parser.add_argument('--dry-run', action='store_true')
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--log-interval', type=int, default=10)
    parser.add_argument('--save-model', default=None, help='checkpoint path')
    parser.add_argument('--train-samples', type=int, default=1000)
    parser.add_argument('--coach', choices=('off', 'compile', 'backend'), default='compile')
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    train_loader = DataLoader(synthetic(args.train_samples, 1), batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(synthetic(500, 2), batch_size=args.test_batch_size)

    model = Net().to(device)
    model = with_coach(model, args.coach, next(iter(train_loader))[0])
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)

    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    losses, test_losses = [], []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train(args, model, device, train_loader, optimizer, epoch, losses)
        test_losses.append(test(model, device, test_loader))
        scheduler.step()
    took = time.perf_counter() - started
    print(f"{len(losses)} steps in {took:.2f} s ({took / len(losses) * 1e3:.1f} ms a step, with tests)")
    if args.save_model:
        # safetensors, not torch.save: a checkpoint that is not a pickle
        from safetensors.torch import save_file
        save_file(model.state_dict(), args.save_model)
    return model, losses, test_losses, took


if __name__ == '__main__':
    main()
