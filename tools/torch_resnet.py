#!/usr/bin/env python3
"""The same ResNets in PyTorch, with the same state-dict names, to check resnet-wgpu against.

  python3 tools/torch_resnet.py make --depth 20 --kind preact --shortcut B --classes 10 --n 4 --out DIR
      writes DIR/weights.safetensors (a PyTorch state dict), DIR/batch.safetensors (images f32,
      labels i64) and DIR/torch.safetensors (loss, logits, grad.images, grad.<name>; computed in
      float64 from the same f32 weights)
  resnet-wgpu grad --depth 20 --kind preact --shortcut b --classes 10 \
      --weights DIR/weights.safetensors --batch DIR/batch.safetensors --out DIR/ours.safetensors
  python3 tools/torch_resnet.py compare DIR/torch.safetensors DIR/ours.safetensors [--tol 1e-4]
  python3 tools/torch_resnet.py bench [--depth 20] [--n 128] [--kinds preact,original]
      [--modes fp32,tf32,fp16] [--reps 30]
      on a CUDA GPU: one SGD training step (forward, cross-entropy, backward, update), timed as
      the `net ResNet-20 ... train step` rows of `resnet-wgpu bench`; one JSON line per kind and
      mode: step_ms (CUDA events around the step, the steps queued back to back, median) and
      step_item_ms (wall clock of a step and its loss.item(), as `ResNet::train_step`, median)

Needs torch, and safetensors for make and compare. The architecture follows src/arch.rs: CIFAR stem (3x3 conv), three
stages of basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1, expansion 4) units, pre-activation
(BN-ReLU-conv; the projection shortcut takes ReLU(BN1(x)); a final BN-ReLU) or original
(conv-BN, ReLU between, ReLU after the addition; projection = conv + BN), option A
(subsample + zero channels) or B (1x1 projection) where a unit changes shape.
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# While a list (make --margin), every ReLU appends its smallest |input| to it.
RELU_MARGINS = None


def relu(t):
    if RELU_MARGINS is not None:
        RELU_MARGINS.append(t.detach().abs().min().item())
    return F.relu(t)


class ShortcutA(nn.Module):
    def __init__(self, c_out, stride):
        super().__init__()
        self.c_out, self.stride = c_out, stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.c_out - x.shape[1]))


def layers_of(c_in, c_out, mid, stride, bottleneck):
    if bottleneck:
        return [(c_in, mid, 1, 1), (mid, mid, 3, stride), (mid, c_out, 1, 1)]
    return [(c_in, c_out, 3, stride), (c_out, c_out, 3, 1)]


class Unit(nn.Module):
    def __init__(self, kind, c_in, c_out, mid, stride, bottleneck, option):
        super().__init__()
        self.kind = kind
        self.layers = layers_of(c_in, c_out, mid, stride, bottleneck)
        for i, (ci, co, k, s) in enumerate(self.layers):
            setattr(self, f"conv{i + 1}", nn.Conv2d(ci, co, k, s, k // 2, bias=False))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(ci if kind == "preact" else co))
        self.identity = stride == 1 and c_in == c_out
        self.option = option
        if not self.identity:
            if option == "A":
                self.shortcut = ShortcutA(c_out, stride)
            elif kind == "preact":
                self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        k = len(self.layers)
        if self.kind == "preact":
            h = x
            for i in range(k):
                a = relu(getattr(self, f"bn{i + 1}")(h))
                if i == 0:
                    if self.identity:
                        sc = x
                    elif self.option == "A":
                        sc = self.shortcut(x)
                    else:
                        sc = self.shortcut(a)  # the projection takes the pre-activated input
                h = getattr(self, f"conv{i + 1}")(a)
            return sc + h
        h = x
        for i in range(k):
            h = getattr(self, f"bn{i + 1}")(getattr(self, f"conv{i + 1}")(h))
            if i + 1 < k:
                h = relu(h)
        sc = x if self.identity else self.shortcut(x)
        return relu(sc + h)


class ResNet(nn.Module):
    def __init__(self, depth, kind, bottleneck, option, classes, widths=(16, 32, 64)):
        super().__init__()
        per = 9 if bottleneck else 6
        assert (depth - 2) % per == 0, f"depth {depth} is not {per}n+2"
        n = (depth - 2) // per
        self.kind = kind
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        if kind == "original":
            self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for s in range(3):
            mid, out = widths[s], widths[s] * (4 if bottleneck else 1)
            units = []
            for j in range(n):
                stride = 2 if s > 0 and j == 0 else 1
                units.append(Unit(kind, c, out, mid, stride, bottleneck, option))
                c = out
            setattr(self, f"layer{s + 1}", nn.Sequential(*units))
        if kind == "preact":
            self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.conv1(x)
        if self.kind == "original":
            x = relu(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.kind == "preact":
            x = relu(self.bn(x))
        return self.fc(x.mean(dim=(2, 3)))


def model_and_batch(a, seed):
    torch.manual_seed(seed)
    model = ResNet(a.depth, a.kind, a.bottleneck, a.shortcut, a.classes)
    with torch.no_grad():  # move BN off its defaults so that mix-ups show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.4)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(a.n, 3, a.size, a.size)
    labels = torch.randint(0, a.classes, (a.n,))
    return model, images, labels


def relu_margin(model, images):
    """The smallest |input| of any ReLU in the float64 training-mode forward."""
    global RELU_MARGINS
    RELU_MARGINS = []
    with torch.no_grad():
        copy.deepcopy(model).double().train()(images.double())
    margin, RELU_MARGINS = min(RELU_MARGINS), None
    return margin


def make(a):
    from safetensors.torch import save_file
    # A ReLU input within f32 rounding of zero can flip between PyTorch's float64 and a float32
    # pass and move the gradients of everything before it by ~1e-3; --margin searches seeds from
    # --seed for a batch whose every ReLU input is at least that far from zero.
    seed = a.seed
    while True:
        model, images, labels = model_and_batch(a, seed)
        margin = relu_margin(model, images)
        if margin >= a.margin:
            break
        seed += 1
    print(f"seed {seed}: smallest |ReLU input| {margin:.3e}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    os.makedirs(a.out, exist_ok=True)
    save_file(state, f"{a.out}/weights.safetensors")
    save_file({"images": images, "labels": labels}, f"{a.out}/batch.safetensors")
    model = model.double().train()
    x = images.double().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    out = {"loss": loss.detach().float().reshape(()), "logits": logits.detach().float(), "grad.images": x.grad.float()}
    for name, p in model.named_parameters():
        out[f"grad.{name}"] = p.grad.float()
    save_file({k: v.contiguous() for k, v in out.items()}, f"{a.out}/torch.safetensors")
    print(f"made {len(state)} state tensors, loss {loss.item():.6f}, seed {seed}, smallest |ReLU input| {margin:.3e}")


def compare(a):
    from safetensors.torch import load_file
    want, got = load_file(a.want), load_file(a.got)
    worst = 0.0
    missing = [k for k in want if k not in got]
    extra = sorted(k for k in got if k not in want)
    # The same element order under another shape (a loss of [1] against [], a transposed
    # weight of the same size) would compare equal flattened: shapes must match first.
    reshaped = [k for k in sorted(want) if k in got and tuple(want[k].shape) != tuple(got[k].shape)]
    for k in reshaped:
        print(f"{k:50s} shape {tuple(got[k].shape)}, PyTorch's {tuple(want[k].shape)}")
    for k in sorted(want):
        if k not in got or k in reshaped:
            continue
        w, g = want[k].double().flatten(), got[k].double().flatten()
        rel = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
        # A NaN stays the worst (max(worst, nan) would drop it) and fails the comparison.
        if math.isnan(rel) or rel > worst:
            worst = rel
        print(f"{k:50s} rel L2 {rel:.2e}  max abs {(g - w).abs().max().item():.2e}")
    compared = len(want) - len(missing) - len(reshaped)
    print(f"{compared} tensors compared, worst rel L2 {worst:.2e}; missing: {missing}; "
          f"of another shape: {reshaped}; not PyTorch's: {extra}")
    ok = worst <= a.tol and not missing and not reshaped and not extra  # NaN <= tol is false
    sys.exit(0 if ok else 1)


def median_ms(step, reps):
    """Median CUDA-event milliseconds of `step`, the steps queued back to back after 5 warm-up."""
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        step()
        end[i].record()
    torch.cuda.synchronize()
    # The mean of the middle two for an even count, as resnet-wgpu's medians.
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def bench(a):
    for kind in a.kinds.split(","):
        for mode in a.modes.split(","):
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            torch.backends.cudnn.allow_tf32 = mode == "tf32"
            torch.backends.cudnn.benchmark = True
            torch.manual_seed(0)
            model = ResNet(a.depth, kind, False, "B", a.classes).cuda().train()
            # Learning rate 0, as resnet-wgpu's rows: every kernel of the update runs.
            opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
            half = mode == "fp16"
            # fp16: a static loss scale, as resnet-wgpu's f16 rows (1024, no overflow check).
            # GradScaler's step reads its overflow flag back to the host every step
            # (found_inf.item()), which stalls the queue that the events time.
            scale = 1024.0 if half else 1.0
            params = list(model.parameters())
            images = torch.randn(a.n, 3, 32, 32, device="cuda")
            labels = torch.randint(0, a.classes, (a.n,), device="cuda")

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                    loss = F.cross_entropy(model(images), labels)
                (loss * scale).backward()
                if half:
                    torch._foreach_mul_([p.grad for p in params], 1.0 / scale)
                opt.step()
                return loss

            ms = median_ms(step, a.reps)
            walls = []
            for _ in range(a.reps):
                t = time.perf_counter()
                step().item()
                walls.append((time.perf_counter() - t) * 1e3)
            wall = statistics.median(walls)
            print(json.dumps({
                "peer": "torch", "net": f"resnet{a.depth}", "kind": kind, "mode": mode, "n": a.n,
                "step_ms": round(ms, 4), "step_item_ms": round(wall, 4),
                "images_per_s": round(a.n / (wall * 1e-3)),
                "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            }), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--depth", type=int, default=20)
    m.add_argument("--kind", choices=["preact", "original"], default="preact")
    m.add_argument("--bottleneck", action="store_true")
    m.add_argument("--shortcut", choices=["A", "B"], default="B")
    m.add_argument("--classes", type=int, default=10)
    m.add_argument("--n", type=int, default=4)
    m.add_argument("--size", type=int, default=32)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--margin", type=float, default=0.0, help="smallest |ReLU input| to search seeds for")
    m.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("want")
    c.add_argument("got")
    c.add_argument("--tol", type=float, default=1e-4)
    b = sub.add_parser("bench")
    b.add_argument("--depth", type=int, default=20)
    b.add_argument("--classes", type=int, default=10)
    b.add_argument("--n", type=int, default=128)
    b.add_argument("--kinds", default="preact,original")
    b.add_argument("--modes", default="fp32,tf32,fp16")
    b.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    {"make": make, "compare": compare, "bench": bench}[a.cmd](a)


if __name__ == "__main__":
    main()
