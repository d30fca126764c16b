"""Model cards for the checkpoints :class:`~lightning_bridge.callbacks.push_to_hub.PushToHub` publishes.

A card is a ``README.md``: YAML front matter the Hub reads (``base_model``, ``library_name``, ``tags``,
``pipeline_tag``), a training summary (steps, tokens seen, final train/validation loss and perplexity,
the parallel layout, dates) and a training-loss plot stored next to it in the repo::

    summary = TrainingSummary(steps=1000, tokens_seen=4_096_000, train_loss=2.31,
                              parallel={"TP": 2, "PP": 1, "DP": 4}, base_model="meta-llama/Llama-3.2-1B")
    plot = render_loss_plot(steps, losses)            # LossPlot("training_loss.png" or ".svg", bytes)
    text = render_model_card("me/my-model", summary, plot_filename=plot.filename if plot else None)

``base_model``: the Hub validates it as a repo id, so it is set only when the model came from one
(an id such as ``org/name``, or a local folder inside the Hub cache, ``models--org--name/snapshots/..``).
For any other local folder it is left out, and the body names the folder (its last path component,
never the full path) as the starting point.

The plot is a PNG drawn with matplotlib when it is importable (it is not a dependency of this
package: the CPU venv does not have it, the GPU image does), otherwise an SVG this module writes
itself, so a card always has its plot.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape

from lightning_bridge.sources import HFSource

__all__ = ["LossPlot", "TrainingSummary", "adapter_kind", "base_model_for", "card_metadata", "nice_ticks", "render_loss_plot",
           "render_loss_svg", "render_model_card"]

DEFAULT_TAGS = ("lightning-bridge", "megatron-core")
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_CACHE_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]")


@dataclass
class TrainingSummary:
    """What a card says about training; every field is optional (left out of the card when None)."""

    steps: int | None = None  # optimizer steps of the fit
    checkpoint_step: int | None = None  # the step of the published checkpoint, when it differs
    tokens_seen: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None  # as logged; computed from val_loss otherwise
    parallel: dict[str, int] = field(default_factory=dict)  # e.g. {"TP": 2, "PP": 1, "DP": 4}
    base_model: str | None = None  # a Hub repo id (goes into the metadata)
    source_name: str | None = None  # a local folder's name, when the model did not come from the Hub
    model_type: str | None = None  # config.model_type, added to the tags
    architecture: str | None = None
    adapter: str | None = None  # "LoRA" or "DoRA" when the repo holds a PEFT adapter, not full weights
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class LossPlot:
    filename: str  # "training_loss.png" or "training_loss.svg"
    data: bytes


def adapter_kind(folder: str | os.PathLike | None) -> str | None:
    """"LoRA" or "DoRA" when ``folder`` holds a PEFT adapter (its ``adapter_config.json``), else None."""
    if folder is None:
        return None
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "DoRA" if config.get("use_dora") else "LoRA"


def base_model_for(source: Any) -> tuple[str | None, str | None]:
    """``(base_model, source_name)`` for the model a fit started from.

    A Hub id gives ``(id, None)``; a folder in the Hub cache gives the id it caches; any other local
    path gives ``(None, folder name)``; nothing usable gives ``(None, None)``.
    """
    if source is None:
        return None, None
    source = getattr(source, "source", source)  # an AutoBridge: its source
    if isinstance(source, HFSource):
        source = source.name
    if not isinstance(source, (str, Path)):
        return None, None
    text = str(source)
    cached = _CACHE_SNAPSHOT.search(text.replace("\\", "/") + "/")
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}", None
    path = Path(text).expanduser()
    if not path.exists() and _REPO_ID.match(text) and ".." not in text:
        return text, None
    return None, path.name or None


def card_metadata(summary: TrainingSummary, tags: Sequence[str] = ()) -> dict[str, Any]:
    """The card's YAML front matter, as a dict."""
    meta: dict[str, Any] = {}
    if summary.base_model:
        meta["base_model"] = summary.base_model
    meta["library_name"] = "peft" if summary.adapter else "transformers"
    all_tags = list(DEFAULT_TAGS)
    for tag in (summary.model_type, summary.adapter and summary.adapter.lower(), *tags):
        if tag and tag not in all_tags:
            all_tags.append(tag)
    meta["tags"] = all_tags
    meta["pipeline_tag"] = "text-generation"
    return meta


def render_model_card(repo_id: str, summary: TrainingSummary, plot_filename: str | None = None,
                      revision: str | None = None, tags: Sequence[str] = ()) -> str:
    """The ``README.md`` text: front matter, summary table, loss plot and a usage snippet."""
    import yaml  # PyYAML: a dependency of huggingface_hub

    front = yaml.safe_dump(card_metadata(summary, tags), sort_keys=False, allow_unicode=True)
    name = repo_id.rsplit("/", 1)[-1]
    if summary.base_model:
        origin = f" from `{summary.base_model}`"
    elif summary.source_name:
        origin = f" from the local checkpoint `{summary.source_name}`"
    else:
        origin = ""
    exported = (f"a PEFT {summary.adapter} adapter" if summary.adapter
                else "a Hugging Face Transformers checkpoint")
    lines = [f"---\n{front}---", "", f"# {name}", "",
             (f"This model was trained{origin} with lightning-bridge (Megatron-Core parallelism driven by a "
              f"Lightning Trainer) and exported as {exported}."), "",
             "## Training summary", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _summary_rows(summary)]
    if plot_filename:
        lines += ["", "## Training loss", "", f"![Training loss per step]({plot_filename})"]
    revision_arg = f', revision="{revision}"' if revision and revision != "main" else ""
    if summary.adapter:
        base = summary.base_model or summary.source_name or "<the base model>"
        lines += ["", "## Usage", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(base, "{repo_id}"{revision_arg})',
                  f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", ""]
        return "\n".join(lines)
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{revision_arg})',
              f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{revision_arg})', "```", ""]
    return "\n".join(lines)


def _summary_rows(s: TrainingSummary) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if s.base_model or s.source_name:
        rows.append(("Base model", f"`{s.base_model or s.source_name}`"))
    if s.architecture:
        rows.append(("Architecture", f"`{s.architecture}`"))
    if s.checkpoint_step is not None and s.checkpoint_step != s.steps:
        rows.append(("Checkpoint", f"step {s.checkpoint_step:,}"))
    if s.steps is not None:
        rows.append(("Training steps", f"{s.steps:,}"))
    if s.tokens_seen is not None:
        rows.append(("Tokens seen", f"{s.tokens_seen:,}"))
    if s.train_loss is not None:
        rows.append(("Final train loss", _loss_text(s.train_loss, None)))
    if s.val_loss is not None:
        rows.append(("Final validation loss", _loss_text(s.val_loss, s.val_ppl)))
    if s.parallel:
        rows.append(("Parallel layout", ", ".join(f"{k}={v}" for k, v in s.parallel.items())))
    for key, when in (("Training started", s.started_at), ("Training finished", s.finished_at)):
        if when is not None:
            rows.append((key, when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    return rows


def _loss_text(loss: float, ppl: float | None) -> str:
    if not math.isfinite(loss):
        return str(loss)
    if ppl is None:
        ppl = math.exp(loss) if loss < 700 else math.inf
    return f"{loss:.4f} (perplexity {ppl:,.2f})"


# --- the loss plot ----------------------------------------------------------------------------------
def render_loss_plot(steps: Sequence[int], losses: Sequence[float],
                     fmt: Literal["auto", "png", "svg"] = "auto") -> LossPlot | None:
    """The training-loss plot: PNG through matplotlib when importable (``"auto"``), else SVG.

    None when there is no finite loss to draw.
    """
    points = [(int(x), float(y)) for x, y in zip(steps, losses) if math.isfinite(float(y))]
    if not points:
        return None
    if fmt in ("auto", "png"):
        try:
            return LossPlot("training_loss.png", _render_png(points))
        except ImportError:
            if fmt == "png":
                raise
    return LossPlot("training_loss.svg", render_loss_svg([p[0] for p in points], [p[1] for p in points]).encode())


def _render_png(points: list[tuple[int, float]]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no global state, safe in a background thread

    figure = Figure(figsize=(6.4, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs, ys = zip(*points)
    axes.plot(xs, ys, color="#1f77b4", linewidth=1.5, marker="o" if len(points) == 1 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("train loss")
    axes.set_title("Training loss")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


_W, _H = 640, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 32, 44
_MAX_POINTS = 2000


def render_loss_svg(steps: Sequence[int], losses: Sequence[float], title: str = "Training loss") -> str:
    """A self-contained SVG line chart of ``losses`` against ``steps`` (non-finite values skipped)."""
    points = [(float(x), float(y)) for x, y in zip(steps, losses) if math.isfinite(float(y))]
    stride = max(1, math.ceil(len(points) / _MAX_POINTS))
    if stride > 1:
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
    x_ticks = nice_ticks(min(xs), max(xs), integer=True)
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return _TOP + (y1 - y) / (y1 - y0) * plot_h

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
            'font-family="sans-serif" font-size="11">'),
           f'<rect width="{_W}" height="{_H}" fill="white"/>',
           f'<text x="{_W / 2:.1f}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for y in y_ticks:
        out.append(f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_tick_label(y)}</text>')
    for x in x_ticks:
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{_TOP}" y2="{_H - _BOTTOM}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{px(x):.1f}" y="{_H - _BOTTOM + 16}" text-anchor="middle">{_tick_label(x)}</text>')
    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_H - 8}" text-anchor="middle">step</text>')
    out.append(f'<text x="14" y="{_TOP + plot_h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {_TOP + plot_h / 2:.1f})">train loss</text>')
    if len(points) == 1:
        out.append(f'<circle cx="{px(xs[0]):.1f}" cy="{py(ys[0]):.1f}" r="3" fill="#1f77b4"/>')
    elif points:
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{coords}"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [low, high] (at least two, strictly increasing)."""
    if high - low < 1e-12:
        pad = max(abs(low) * 0.05, 1.0 if integer else 1e-3)
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, round(step))
    start = math.floor(low / step) * step
    ticks = [start]
    while ticks[-1] < high - 1e-12 * step:
        ticks.append(start + len(ticks) * step)
    return ticks if len(ticks) > 1 else [start, start + step]


def _tick_label(value: float) -> str:
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


# --- the summary and files of a fit, for PushToHub ------------------------------------------------------
def training_summary(trainer: Any, pl_module: Any, checkpoint_step: int | None, loss_key: str,
                     started_at: datetime | None) -> TrainingSummary:
    """The card's summary of a fit so far: the trainer's metrics, the parallel layout, the model's source."""
    strategy = trainer.strategy
    metrics = trainer.callback_metrics
    source = getattr(strategy, "model_source", None) or getattr(pl_module, "hf_model", None)
    if source is None:
        source = getattr(strategy, "bridge", None)
    base_model, source_name = base_model_for(source)
    config = getattr(getattr(strategy, "bridge", None), "hf_config", None)
    architectures = getattr(config, "architectures", None) or []
    return TrainingSummary(
        steps=int(trainer.global_step), checkpoint_step=checkpoint_step,
        tokens_seen=int_or_none(getattr(pl_module, "tokens_seen", None)),
        train_loss=float_or_none(metrics.get(loss_key)), val_loss=float_or_none(metrics.get("val_loss")),
        val_ppl=float_or_none(metrics.get("val_ppl")), parallel=parallel_layout(trainer),
        base_model=base_model, source_name=source_name, model_type=getattr(config, "model_type", None),
        architecture=architectures[0] if architectures else None, started_at=started_at,
        finished_at=datetime.now(timezone.utc))


def card_files(repo_id: str, summary: TrainingSummary, revision: str, losses: Sequence[tuple[int, float]],
               redact: Callable[[str], str]) -> dict[str, bytes]:
    """``README.md`` (passed through ``redact``) and the loss plot, by file name, for ``revision``."""
    plot: LossPlot | None = render_loss_plot([s for s, _ in losses], [v for _, v in losses])
    card = render_model_card(repo_id, summary, plot_filename=plot.filename if plot else None,
                             revision=revision)
    files = {CARD_NAME: redact(card).encode()}
    if plot is not None:
        files[plot.filename] = plot.data
    return files


def parallel_layout(trainer: Any) -> dict[str, int]:
    """``{"TP": .., "PP": .., "DP": ..}`` (and CP, EP, VPP when above 1) of the trainer's strategy."""
    strategy = trainer.strategy
    sizes = dict(getattr(strategy, "parallel_sizes", None) or {})
    tp = int(sizes.get("tensor_model_parallel_size")
             or getattr(strategy, "tensor_model_parallel_size", 1) or 1)
    pp = int(sizes.get("pipeline_model_parallel_size")
             or getattr(strategy, "pipeline_model_parallel_size", 1) or 1)
    cp = int(sizes.get("context_parallel_size") or 1)
    world = int(getattr(trainer, "world_size", 1) or 1)
    layout = {"TP": tp, "PP": pp, "DP": max(world // (tp * pp * cp), 1)}
    for key, name in (("CP", "context_parallel_size"), ("EP", "expert_model_parallel_size"),
                      ("VPP", "virtual_pipeline_model_parallel_size")):
        if (sizes.get(name) or 1) > 1:
            layout[key] = int(sizes[name])
    return layout


def float_or_none(value: Any) -> float | None:
    """``float(value)``; None for anything that is not a number, and for NaN."""
    try:
        result = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return result if not math.isnan(result) else None


def int_or_none(value: Any) -> int | None:
    """``int(value)``; None for None and anything that is not a number."""
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError, RuntimeError):
        return None
