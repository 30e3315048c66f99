"""training.loop's moving average of the weights (LoopSettings.weight_average_decay): the bundles get the average,
the training goes on from its own weights, and a resumed run keeps the average its checkpoint holds."""

from pathlib import Path

import pytest
import torch

from cellseg.errors import CellsegError
from cellseg.training import LoopSettings, run_training

DECAY = 0.8


class _LineTask:
    """A linear model fitted to a fixed line, one batch a step drawn from the step's own seed (a resumed run sees
    what an uninterrupted one would); its bundle is the model's state dict as it stands, and every step records the
    weights it starts from."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.seen: list[torch.Tensor] = []

    def batches(self, first_step: int):
        step = first_step
        while True:
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 3, generator=g)
            yield x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
            step += 1

    def losses(self, batch):
        self.seen.append(torch.cat([p.detach().reshape(-1).clone() for p in self.model.parameters()]))
        x, y = batch
        return {"mse": ((self.model(x) - y) ** 2).mean()}

    def write_bundle(self, folder: Path, state, finished: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.clone() for k, v in self.model.state_dict().items()}, folder / "weights.pt")


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([state["weight"].reshape(-1), state["bias"].reshape(-1)])


def _train(out: Path, steps: int, decay: float | None, resume: bool = False, snapshots: dict | None = None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    task = _LineTask(model)
    # a flat schedule (the cosine ends at the peak): a run of 12 steps resumed to 30 is one run of 30
    settings = LoopSettings(steps=steps, lr=0.05, warmup=1, final_lr_fraction=1.0, checkpoint_every=5, clip_grad_norm=None,
                            weight_average_decay=decay, snapshot_every=10 if snapshots is not None else None)
    optim = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    on_snapshot = None
    if snapshots is not None:
        def on_snapshot(folder: Path, step: int) -> None:
            snapshots[step] = _flat(torch.load(folder / "weights.pt", weights_only=True))
    run_training(task, model, optim, settings, out, resume=resume, progress=False, on_snapshot=on_snapshot)
    return task, model


def _average(weights: list[torch.Tensor], decay: float) -> torch.Tensor:
    """The moving average after each of these steps' weights: the first copied, then decay x old + rest x new."""
    average = weights[0].clone()
    for w in weights[1:]:
        average = decay * average + (1 - decay) * w
    return average


def test_the_bundles_get_the_moving_average_and_the_training_goes_on_from_its_own_weights(tmp_path):
    plain_task, plain = _train(tmp_path / "plain", 30, None)
    after_each_step = plain_task.seen[1:] + [_flat(plain.state_dict())]     # the weights after steps 1..30
    snapshots: dict[int, torch.Tensor] = {}
    _, averaged = _train(tmp_path / "averaged", 30, DECAY, snapshots=snapshots)
    # writing snapshots with the average in the model never disturbs the training: the same last weights
    assert torch.equal(_flat(averaged.state_dict()), _flat(plain.state_dict()))
    bundle = _flat(torch.load(tmp_path / "averaged" / "weights.pt", weights_only=True))
    assert torch.allclose(bundle, _average(after_each_step, DECAY), atol=1e-6)
    assert not torch.allclose(bundle, _flat(plain.state_dict()), atol=1e-3)     # an average, not the last step
    assert torch.equal(snapshots[0], plain_task.seen[0])      # step 0: the starting weights
    assert torch.allclose(snapshots[10], _average(after_each_step[:10], DECAY), atol=1e-6)
    assert torch.allclose(snapshots[20], _average(after_each_step[:20], DECAY), atol=1e-6)


def test_a_resumed_run_keeps_the_average_its_checkpoint_holds(tmp_path):
    _train(tmp_path / "whole", 30, DECAY)
    _train(tmp_path / "split", 12, DECAY)
    assert "average" in torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    _train(tmp_path / "split", 30, DECAY, resume=True)
    whole = torch.load(tmp_path / "whole" / "weights.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "weights.pt", weights_only=True)
    assert torch.allclose(_flat(split), _flat(whole), atol=1e-6)


def test_a_run_without_an_average_resumed_with_one_starts_it_there(tmp_path):
    """A long run that kept no average, resumed with one: the average starts from the first resumed step's weights."""
    _train(tmp_path / "run", 12, None)
    task, model = _train(tmp_path / "run", 20, DECAY, resume=True)
    after_each_step = task.seen[1:] + [_flat(model.state_dict())]     # the weights after steps 13..20
    bundle = _flat(torch.load(tmp_path / "run" / "weights.pt", weights_only=True))
    assert torch.allclose(bundle, _average(after_each_step, DECAY), atol=1e-6)


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_a_decay_outside_0_to_1_is_refused_in_one_line(decay):
    with pytest.raises(CellsegError, match="weight-average decay between 0 and 1"):
        LoopSettings(weight_average_decay=decay)
