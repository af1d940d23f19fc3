"""`fedmq init`: write a commented starter job.toml; `fedmq init --check FILE` validates one.

`--check` goes as far as it can without a broker: the config, the model it names (imported and
built), the test data (exists, loads, fits the model) and, with ``--data``, site files too.

The starter is generated from the config schema itself (shared.config.JobConfig): every section
and key with its default, the choices of every enum, and the comment the schema's source gives
the field. So the file can never drift from what `load_job_config` accepts, and a key someone
adds to the schema shows up here without touching this module. The file is loaded back before
it is written: `init` never leaves a config the coordinator would refuse.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import textwrap
import typing
from collections.abc import Callable
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared.config import SECTIONS, JobConfig, StrategyName, load_job_config
from fedmq.shared.errors import ConfigError

#: comments for fields the schema's source leaves uncommented
EXTRA_HELP: dict[str, str] = {
    "job": "job id; the --job flag / FEDMQ_JOB override it",
    "seed": "seed of the initial model (v0)",
    "model.args": "keyword arguments of the model factory, e.g. { hidden = 128 }",
    "strategy.name": "aggregation strategy",
    "strategy.staleness": "staleness discount s(tau)",
    "strategy.trim_fraction": "trimmed_mean: share cut at each end per coordinate",
    "training.epochs": "local epochs per task",
    "training.batch_size": "local mini-batch size",
    "training.lr": "local SGD learning rate",
    "coordinator.max_versions": "stop after this many versions",
    "coordinator.max_seconds": "stop after this long (wall clock)",
    "privacy.delta": "DP delta of the per-site budget",
}

HEADER = """\
# fedmq job configuration, written by `fedmq init`.
#
# Precedence: this file < FEDMQ_<SECTION>_<KEY> environment variables < command-line flags
# (e.g. FEDMQ_STRATEGY_BUFFER_SIZE=8 overrides [strategy] buffer_size).
# Use it with:  fedmq coordinator --job ID --config {path}      (or FEDMQ_CONFIG={path})
# Check it with: fedmq init --check {path}
# Every value below is the default unless `fedmq init` was told otherwise.
"""


@cache
def _source_comments(cls: type) -> dict[str, str]:
    """A dataclass's field comments by field name: `name: type = default  # comment`, else the
    `#:` lines above the field."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", source, re.MULTILINE):
        out[m.group(1)] = m.group(2).strip()
    # `#:` lines right above a field document it too (Sphinx style), when it has no trailing comment
    for m in re.finditer(r"((?:^[ \t]+#:.*\n)+)[ \t]+(\w+)\s*:", source, re.MULTILINE):
        text = " ".join(line.strip()[2:].strip() for line in m.group(1).splitlines())
        out.setdefault(m.group(2), text)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, Enum):
        return json.dumps(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def _comment(cls: type, name: str, key: str, typ: Any) -> str:
    parts = [_source_comments(cls).get(name) or EXTRA_HELP.get(key, "")]
    if isinstance(typ, type) and issubclass(typ, Enum):
        parts.append("one of: " + ", ".join(str(m.value) for m in typ))
    text = "; ".join(p for p in parts if p)
    return f"  # {text}" if text else ""


def _key_lines(cls: type, obj: Any, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(hints[f.name]):
            continue  # tables are written after the plain keys
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        comment = _comment(cls, f.name, key, hints[f.name])
        if value is None:
            lines.append(f"# {f.name} ={comment}")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}{comment}")
    return lines


def _section_header(name: str, cls: type) -> list[str]:
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    lines = [""]
    if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses invent a signature docstring
        lines += [f"# {chunk}" for chunk in textwrap.wrap(doc, 98)]
    lines.append(f"# env: FEDMQ_{name.upper()}_<KEY>")
    lines.append(f"[{name}]")
    return lines


def starter_config(cfg: JobConfig, path: str = "job.toml", *, job_commented: bool = True) -> str:
    """The commented TOML text of `cfg` (defaults unless the caller changed some)."""
    lines = HEADER.format(path=path).splitlines()
    lines.append("")
    top = _key_lines(JobConfig, cfg, "")
    if job_commented:
        top = [("# " + line if line.startswith("job = ") else line) for line in top]
    lines += top
    for name, cls in SECTIONS.items():
        lines += _section_header(name, cls)
        lines += _key_lines(cls, getattr(cfg, name), f"{name}.")
    return "\n".join(lines) + "\n"


def _starter(args: argparse.Namespace) -> JobConfig:
    overrides: dict[str, Any] = {"data": {"test": args.test}}
    if args.job:
        overrides["job"] = args.job
    strategy = StrategyName(args.strategy)
    overrides["strategy"] = {"name": strategy.value}
    if strategy is StrategyName.FEDAVG:
        overrides["strategy"]["max_staleness"] = 0  # synchronous rounds: every update from the current version
    return load_job_config(None, overrides=overrides, environ={})


def write_starter(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    text = starter_config(_starter(args), str(out), job_commented=not args.job)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        load_job_config(tmp, environ={})  # the promise: what init writes, the coordinator accepts
        tmp.replace(out)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_job(path: str, site_files: list[str]) -> str:
    """Everything a coordinator would refuse at start, without a broker; returns the summary line.

    The config itself (keys, types, ranges), then what it names: the model callable imports and
    builds, data.test exists, loads and fits the model (feature count, input shape, label range,
    one forward pass), each `site_files` file fits the same model, and the key and registry files
    exist. Each failure is the ConfigError the coordinator or a worker would raise: one line, exit 2.
    """
    from fedmq.shared.datasets import fit_to_model, load_site  # torch: only when checking, not when writing
    from fedmq.shared.evaluation import TaskKind
    from fedmq.shared.models import build_model, check_forward, model_for_data, model_spec

    cfg = load_job_config(path)  # ConfigError names the key
    check_user_strategy(cfg)
    cfg.check_evaluation()
    task = cfg.model.task
    if cfg.data.test:
        x, y = load_site(cfg.data.test, task=task)
        spec, model, _ = model_for_data(cfg.model.name, cfg.model.args, x, y, seed=cfg.seed,
                                        source=f"data.test {cfg.data.test}", task=task,
                                        num_classes=cfg.model.num_classes or None,
                                        input_shape=cfg.model.shape())
        evaluated = f"data.test {cfg.data.test} {len(y)} rows"
    else:
        shape = cfg.model.shape() or ()
        spec = model_spec(cfg.model.name, shape, cfg.model.num_classes, task, **cfg.model.args)
        model = build_model(spec, seed=cfg.seed)
        check_forward(model, np.zeros((2, *shape), np.float32), int(spec["args"]["num_classes"]),
                      source=f"model.input_shape {list(shape)}")
        evaluated = f"federated evaluation ({', '.join(cfg.evaluation.names(task))})"
    classes = int(spec["args"]["num_classes"])
    for f in site_files:
        xs, ys = load_site(f, task=task)
        check_forward(model, fit_to_model(xs, ys, spec, source=f"data file {f}"), classes, source=f"data file {f}")
    _check_named_files(cfg)
    head = "1 output (regression)" if task is TaskKind.REGRESSION else f"{classes} classes"
    return (f"{path}: ok (strategy {cfg.strategy.name.value}, model {cfg.model.name} "
            f"{spec['args']['input_shape']} -> {head}, {evaluated}"
            + (f", {len(site_files)} site files" if site_files else "") + ")")


def check_user_strategy(cfg: JobConfig) -> None:
    """A user strategy (strategy.name = "package.module:callable") imports here, and is not combined
    with what needs a built-in fold (encryption sums ciphertexts; central DP calibrates to a mean)."""
    if not cfg.strategy.name.is_user:
        return
    from fedmq.shared.plugins import import_callable

    import_callable(cfg.strategy.name.value, "strategy.name")
    if cfg.encryption.enabled:
        from fedmq.shared.he import check_strategy

        check_strategy(cfg.strategy)


def _strategy_arg(value: str) -> StrategyName:
    try:
        return StrategyName(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one of {', '.join(s.value for s in StrategyName)} or package.module:callable") from None


def _check_named_files(cfg: JobConfig) -> None:
    """The key and registry files the config names exist (and the registry parses)."""
    for key, value in (("encryption.public_context", cfg.encryption.public_context),
                       ("encryption.secret_context", cfg.encryption.secret_context)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{key}: {value} does not exist (fedmq keys --job ID --out DIR writes it)")
    if cfg.signing.registry:
        from fedmq.shared.signing import load_registry

        load_registry(cfg.signing.registry)


def run(args: argparse.Namespace) -> int:
    if args.check:
        print(check_job(args.check, args.data))
        return 0
    if args.data:
        raise ConfigError("--data is only used with --check FILE")
    print(write_starter(args))
    return 0


def register(sub: Any, add_common: Callable[..., None]) -> None:
    p = sub.add_parser("init", help="write a commented starter job.toml (or --check one)")
    p.add_argument("--out", default="job.toml", help="file to write")
    p.add_argument("--job", help="job id to put in the file (else left commented: --job / FEDMQ_JOB set it)")
    p.add_argument("--test", default="data/test.npz",
                   help="held-out test file the coordinator evaluates on (data.test)")
    p.add_argument("--strategy", default=StrategyName.FEDBUFF.value, type=_strategy_arg,
                   help=f"aggregation strategy (strategy.name): {', '.join(s.value for s in StrategyName)} "
                   "or package.module:callable (your own, docs/tutorial.md)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--check", metavar="FILE", help="validate FILE (with FEDMQ_* env applied) instead of writing: "
                   "its keys, the model, and that data.test loads and fits the model")
    p.add_argument("--data", metavar="SITE_FILE", action="append", default=[],
                   help="with --check: also check that this site's data file fits the model (repeatable)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="log level; logs go to stderr")
    p.set_defaults(run=run)
