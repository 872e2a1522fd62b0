"""Both synthetic kinds are learnable by a tiny CNN on CPU through the real loader. The gratings
(the smoke run's default data) are learnt well above chance without being solved at once; the
"scenes" (the dev set) are above chance but clearly harder: the same network, trained the same
way, falls well short of what it reaches on gratings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from data import DataConfig, make_train_loader, make_val_loader, normalize, write_synthetic
from orchestrator.evaluation import evaluate

CLASSES = 10
EPOCHS = 3


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))


def _train(tmp_path, kind: str) -> tuple[float, list[float]]:
    """(first-epoch train accuracy, val accuracy after each epoch) of the tiny CNN on `kind`."""
    manifest = write_synthetic(tmp_path / kind, classes=CLASSES, train=2000, val=500, size=32,
                               seed=0, shard_size=500, kind=kind)
    cfg = DataConfig(train=str(manifest), val=str(manifest), image_size=32, transform="cifar",
                     batch_size=50, num_workers=0, shuffle_buffer=500)
    train, val = make_train_loader(cfg, 0, 1), make_val_loader(cfg, 0, 1)
    torch.manual_seed(0)
    model = _tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first_epoch_train_acc, accuracies = None, []
    for epoch in range(EPOCHS):
        train.set_epoch(epoch)
        model.train()
        correct = seen = 0
        for images, labels in train:
            logits = model(normalize(images, cfg.mean, cfg.std))
            loss = nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct, seen = correct + int((logits.argmax(1) == labels).sum()), seen + len(labels)
        first_epoch_train_acc = first_epoch_train_acc or correct / seen
        accuracies.append(evaluate(model, val, cfg.mean, cfg.std)["top1"])
    return first_epoch_train_acc, accuracies


@pytest.mark.slow
def test_tiny_cnn_learns_both_kinds_and_finds_scenes_harder(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine one thread is faster than two fighting
    try:
        scenes_first, scenes = _train(tmp_path, "scenes")
        gratings_first, gratings = _train(tmp_path, "grating")
    finally:
        torch.set_num_threads(threads)
    print(f"scenes: first-epoch train acc {scenes_first:.3f}, val {scenes}; "
          f"gratings: first-epoch train acc {gratings_first:.3f}, val {gratings}")
    assert gratings_first < 0.9, "gratings solved in the first epoch: too easy to tell methods apart"
    assert max(gratings) > 0.6, f"gratings val accuracy {gratings} is not clearly above chance (0.1)"
    assert scenes_first < 0.6, "scenes solved in the first epoch: too easy to tell methods apart"
    assert max(scenes) > 0.2, f"scenes val accuracy {scenes} is not clearly above chance (0.1)"
    assert max(scenes) < max(gratings) - 0.15, f"scenes {scenes} are not clearly harder than gratings {gratings}"
