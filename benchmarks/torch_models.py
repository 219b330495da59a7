"""PyTorch copies of the Flax LeNet and pre-activation ResNet, with their weights.

For the benchmarks against PyTorch and torchattacks (optional dependencies, not
runtime ones). The modules take NCHW images in [0, 1], as torchattacks wants, and
compute what `models.LeNet` / `models.ResNet` compute (normalisation inside, SAME
padding as TensorFlow/Flax, BatchNorm in inference mode with epsilon 1e-3).
"""

import jax
import numpy as np

from propmaps_jax import models


def _torch_modules():
    import torch
    from torch import nn

    class TorchLeNet(nn.Module):
        """models.LeNet in PyTorch: input NCHW in [0, 1], as torchattacks wants."""

        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
            self.fc1, self.fc2 = nn.Linear(400, 120), nn.Linear(120, 84)
            self.logits = nn.Linear(84, 10)

        def forward(self, x):
            x = (x * 255.0 - self.mean) / self.std
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = x.permute(0, 2, 3, 1).flatten(1)  # Flax/Keras (H, W, C) order
            x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
            return self.logits(x)

    def bn(width):
        return nn.BatchNorm2d(width, eps=1e-3)

    class SameConv(nn.Conv2d):
        """Conv with TensorFlow/Flax SAME padding (stride 2: one row/col at the end)."""

        def forward(self, x):
            k, s = self.kernel_size[0], self.stride[0]
            total = max((-(-x.shape[-1] // s) - 1) * s + k - x.shape[-1], 0)
            x = nn.functional.pad(x, (total // 2, total - total // 2) * 2)
            return super().forward(x)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.bn1, self.bn2 = bn(cin), bn(cout)
            self.conv1 = SameConv(cin, cout, 3, stride)
            self.conv2 = SameConv(cout, cout, 3)
            self.shortcut = (
                SameConv(cin, cout, 1, stride) if stride != 1 or cin != cout else None
            )

        def forward(self, x):
            y = self.conv1(torch.relu(self.bn1(x)))
            y = self.conv2(torch.relu(self.bn2(y)))
            return (x if self.shortcut is None else self.shortcut(x)) + y

    class TorchResNet(nn.Module):
        def __init__(self, mean, std, blocks, widths):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
            self.stem = SameConv(3, widths[0], 3)
            layers, cin = [], widths[0]
            for stage, width in enumerate(widths):
                for block in range(blocks):
                    stride = 2 if stage > 0 and block == 0 else 1
                    layers.append(Block(cin, width, stride))
                    cin = width
            self.blocks = nn.Sequential(*layers)
            self.bn_final = bn(cin)
            self.logits = nn.Linear(cin, 10)

        def forward(self, x):
            x = self.stem((x * 255.0 - self.mean) / self.std)
            x = torch.relu(self.bn_final(self.blocks(x)))
            return self.logits(x.mean((2, 3)))

    return TorchLeNet, TorchResNet


def to_torch(config: models.ModelConfig, variables):
    """The PyTorch module of a Flax model, with its weights copied."""
    import torch

    lenet_cls, resnet_cls = _torch_modules()
    module = models.create_model(config)
    mean, std = [float(v) for v in module.mean], [float(v) for v in module.std]
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    stats = jax.tree_util.tree_map(np.asarray, variables.get("batch_stats", {}))
    if isinstance(module, models.LeNet):
        net = lenet_cls(mean, std)
    else:
        net = resnet_cls(mean, std, module.blocks_per_stage, tuple(module.widths))

    def conv(dst, src):
        dst.weight.data = torch.from_numpy(src["kernel"].transpose(3, 2, 0, 1).copy())
        dst.bias.data = torch.from_numpy(src["bias"].copy())

    def dense(dst, src):
        dst.weight.data = torch.from_numpy(src["kernel"].T.copy())
        dst.bias.data = torch.from_numpy(src["bias"].copy())

    def batch_norm(dst, src, stat):
        dst.weight.data = torch.from_numpy(src["scale"].copy())
        dst.bias.data = torch.from_numpy(src["bias"].copy())
        dst.running_mean.data = torch.from_numpy(stat["mean"].copy())
        dst.running_var.data = torch.from_numpy(stat["var"].copy())

    if isinstance(module, models.LeNet):
        for layer in ("conv1", "conv2"):
            conv(getattr(net, layer), params[layer])
        for layer in ("fc1", "fc2", "logits"):
            dense(getattr(net, layer), params[layer])
    else:
        conv(net.stem, params["stem"])
        names = [k for k in params if k.startswith("stage")]
        names.sort(key=lambda k: tuple(int(p) for p in k[5:].split("_block")))
        for block, key in zip(net.blocks, names, strict=True):
            for part in ("conv1", "conv2", "shortcut"):
                if part in params[key]:
                    conv(getattr(block, part), params[key][part])
            for part in ("bn1", "bn2"):
                batch_norm(getattr(block, part), params[key][part], stats[key][part])
        batch_norm(net.bn_final, params["bn_final"], stats["bn_final"])
        dense(net.logits, params["logits"])
    return net.eval()
