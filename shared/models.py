"""Model registry and the torch <-> wire conversions.

A model is named in the job config as a registry name (``logreg``, ``mlp``, ``cnn``) or as
``package.module:callable``; the callable receives the spec's ``args`` and returns an
``nn.Module``. Custom callables must be importable on every site and on the coordinator: the
site operator installs them, so a broker message can never make a site run code it did not choose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmq.shared.codec import Weights
from fedmq.shared.datasets import fit_to_model
from fedmq.shared.errors import ConfigError
from fedmq.shared.evaluation import TaskKind
from fedmq.shared.plugins import import_callable


def logreg(input_dim: int, num_classes: int, **_: Any) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(input_dim, num_classes))


def mlp(input_dim: int, num_classes: int, hidden: int = 64, layers: int = 1, **_: Any) -> nn.Module:
    mods: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for _i in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, num_classes))
    return nn.Sequential(*mods)


def cnn(input_shape: list[int] | tuple[int, ...], num_classes: int, channels: int = 16, **_: Any) -> nn.Module:
    """Two conv blocks + linear head; works for 1x8x8 digits and 1x28x28 MNIST."""
    shape = tuple(input_shape)
    if len(shape) == 1:
        side = int(math.isqrt(shape[0]))
        if side * side != shape[0]:
            raise ConfigError(f"cnn needs square images; input_dim {shape[0]} is not a square")
        shape = (1, side, side)
    c, h, w = shape
    return nn.Sequential(
        nn.Unflatten(1, (c, h, w)) if len(input_shape) == 1 else nn.Identity(),
        nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, channels * 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * 2 * (h // 4) * (w // 4), num_classes),
    )


REGISTRY: dict[str, Callable[..., nn.Module]] = {"logreg": logreg, "mlp": mlp, "cnn": cnn}


def resolve(name: str) -> Callable[..., nn.Module]:
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise ConfigError(f"model {name!r} is not one of {', '.join(REGISTRY)} nor package.module:callable")
    return import_callable(name, "model")


def build_model(spec: dict[str, Any], *, seed: int | None = None) -> nn.Module:
    """Instantiate the model a ModelVersion's `model` spec names (seeded for a reproducible v0)."""
    fn = resolve(str(spec.get("name", "")))
    args = dict(spec.get("args", {}))
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = fn(**args)
    except TypeError as exc:
        raise ConfigError(f"model {spec.get('name')!r} does not accept args {args}: {exc}") from exc
    except (ValueError, RuntimeError) as exc:  # e.g. a negative layer width in model.args
        raise ConfigError(f"model {spec.get('name')!r} cannot be built with args {args}: "
                          f"{_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec.get('name')!r} returned {type(model).__name__}, not a torch nn.Module")
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@torch.no_grad()
def check_forward(model: nn.Module, x: np.ndarray, num_classes: int, *, source: str) -> None:
    """Run the model on two rows of `x` and require [rows, num_classes] logits, else ConfigError.

    A custom model may ignore the spec's input_dim; this is what tells its operator before the
    job starts instead of the first evaluation or task failing inside torch. Eval mode and no
    grad: the forward pass leaves the weights (batch-norm statistics included) as they were.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(torch.from_numpy(np.ascontiguousarray(x[:2])))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ConfigError(f"{source} does not fit the model: {_first_line(exc)}") from exc
    finally:
        model.train(was_training)
    wanted = (min(len(x), 2), num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != wanted:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = "one value per row (regression)" if num_classes == 1 else f"{num_classes} classes"
        raise ConfigError(f"{source}: the model's output is {got}, expected logits of shape {wanted} "
                          f"({what})")


def model_for_data(name: str, args: dict[str, Any], x: np.ndarray, y: np.ndarray, *, source: str,
                   seed: int | None = None, num_classes: int | None = None,
                   input_shape: tuple[int, ...] | None = None,
                   task: TaskKind = TaskKind.CLASSIFICATION) -> tuple[dict[str, Any], nn.Module, np.ndarray]:
    """The job's model spec, its v0 model and `x` in the model's input shape, for held-out (x, y).

    The number of classes and the input shape come from the data unless given; then the data is
    checked against the model (`fit_to_model`, and a forward pass), so the coordinator and
    ``fedmq init --check`` refuse a job whose test data and model disagree, with one line.
    """
    classes = 1 if task is TaskKind.REGRESSION else num_classes or int(y.max()) + 1
    spec = model_spec(name, input_shape or tuple(x.shape[1:]), classes, task, **args)
    model = build_model(spec, seed=seed)
    fitted = fit_to_model(x, y, spec, source=source)
    check_forward(model, fitted, classes, source=source)
    return spec, model, fitted


def model_spec(name: str, input_shape: tuple[int, ...], num_classes: int, task: TaskKind = TaskKind.CLASSIFICATION,
               **args: Any) -> dict[str, Any]:
    """The spec stored in every ModelVersion: registry name plus the arguments that fix shapes.

    A regression model is built with one output (``num_classes = 1``, so the bundled factories need
    no second signature) and says so in ``task``; a classifier's spec has no ``task`` key, as
    before, so versions of older jobs keep their bytes and hashes."""
    outputs = 1 if task is TaskKind.REGRESSION else int(num_classes)
    full = {"input_dim": int(np.prod(input_shape)), "input_shape": list(input_shape),
            "num_classes": outputs, **args}
    spec: dict[str, Any] = {"name": name, "args": full}
    if task is TaskKind.REGRESSION:
        spec["task"] = task.value
    return spec


def get_weights(model: nn.Module) -> Weights:
    """A copy of the model's state as numpy arrays, in state_dict order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Weights) -> None:
    state = model.state_dict()
    if list(state) != list(weights):
        raise ConfigError(f"weights do not fit the model: {sorted(set(state) ^ set(weights))} differ")
    new = {k: torch.from_numpy(np.array(v, copy=True)).to(state[k].device) for k, v in weights.items()}
    model.load_state_dict(new)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu'/'cuda'/'cuda:1' are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not valid: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here")
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device | None = None,
             batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) on held-out data."""
    device = device or torch.device("cpu")
    model.eval().to(device)
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i:i + batch_size]).to(device)
        yb = torch.from_numpy(y[i:i + batch_size]).to(device)
        out = model(xb)
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return correct / n, loss_sum / n
