"""Torch module factories for the export tests (loaded by path, as `onnxq export FILE.py:FACTORY` does)."""

import torch


class TokenNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, ids, x):
        return self.fc(self.emb(ids)) + x.mean()


def token_net():
    torch.manual_seed(0)
    return TokenNet().eval()


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def mlp():
    torch.manual_seed(0)
    return Mlp()


class Noisy(torch.nn.Module):
    def forward(self, x):  # ONNX RandomUniformLike draws other numbers than torch
        return x + torch.rand_like(x)


def noisy():
    return Noisy()


def broken():
    raise RuntimeError("checkpoint weights.pt not found")


def not_a_module():
    return 42


class BranchOnBatch(torch.nn.Module):
    def forward(self, x):  # code that depends on the size: torch specializes an example size of 1
        return x * 2 if x.shape[0] == 1 else x * 3


def branch_on_batch():
    return BranchOnBatch().eval()
