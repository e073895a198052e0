"""The results folder's summary: summary.json, summary.md and the figures."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.atomic import write_output_dir
from evaluation.metrics import Agreement, DreamSpread, SuccessSummary, agreement, dream_spread, pair_by_seed, summarize
from evaluation.plots import plot_dream_vs_real, plot_success_rates, plot_trajectories_3d, plot_trajectory_error
from evaluation.records import EpisodeRecord, select

ERROR_STEPS = (10, 50, 100)  # steps at which the markdown table reports dream-vs-real distances


def groups(records: Sequence[EpisodeRecord]) -> list[tuple[str, str, str]]:
    """(policy, task, source) combinations in first-seen order; source = "real", "dream" or "dream@<world model>"."""
    return list(dict.fromkeys((r.policy, r.task, r.source) for r in records))


def summaries_of(records: Sequence[EpisodeRecord]) -> list[SuccessSummary]:
    return [summarize(select(records, policy=p, task=t, source=s)) for p, t, s in groups(records)]


def agreements_of(records: Sequence[EpisodeRecord]) -> list[tuple[str, Agreement]]:
    """(policy, agreement) for every (policy, task, world model) played both in dreams and for real."""
    result = []
    for policy, task, source in groups(records):
        dream = select(records, policy=policy, task=task, source=source, env="dream")
        real = select(records, policy=policy, task=task, env="real")
        if dream and real:
            result.append((policy, agreement(dream, real)))
    return result


def spreads_of(agreements: Sequence[tuple[str, Agreement]]) -> list[DreamSpread]:
    """Per (policy, task) dreamed by several world models: the spread of their dream - real gaps."""
    by_pair: dict[tuple[str, str], list[Agreement]] = {}
    for policy, a in agreements:
        by_pair.setdefault((policy, a.task), []).append(a)
    return [dream_spread(policy, group) for (policy, _), group in by_pair.items() if len(group) > 1]


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def _num(x: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def _pp(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.0f} pp"


def spread_markdown(spreads: Sequence[DreamSpread]) -> list[str]:
    if not spreads:
        return []
    lines = [
        "",
        f"Dream vs real over {len(spreads[0].world_models)} world models that dreamed the same starts "
        f"({', '.join(spreads[0].world_models)}); sd = sample standard deviation over the world models:",
        "",
        "| policy | task | real | dream, per world model | dream - real, per world model | mean dream - real | sd | mean agreement |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for s in spreads:
        dreams = " / ".join(_pct(x) for x in s.dream_success_rates)
        gaps = " / ".join(f"{100 * g:+.0f}" for g in s.gaps)
        lines.append(f"| {s.policy} | {s.task} | {_pct(s.real_success_rate)} | {dreams} | {gaps} | {_pp(s.mean_gap)} "
                     f"| {_num(100 * s.sd_gap, 0)} pp | {_pct(s.mean_agreement)} |")
    return lines


def summary_markdown(summaries: Sequence[SuccessSummary], agreements: Sequence[tuple[str, Agreement]]) -> str:
    lines = [
        "| policy | task | env | episodes | success | 95% CI (Wilson) | mean return | mean length | errors | wall s | steps/s |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        lines.append(
            f"| {s.policy} | {s.task} | {s.source} | {s.episodes} | {s.successes}/{s.episodes} = {_pct(s.success_rate)} "
            f"| [{_pct(s.ci_low)}, {_pct(s.ci_high)}] | {_num(s.mean_return, 2)} | {_num(s.mean_length)} | {s.errors} "
            f"| {_num(s.wall_seconds, 0)} | {_num(s.steps_per_second, 0)} |"
        )
    if agreements:
        cols = " | ".join(f"eef / obj err t={t} (cm)" for t in ERROR_STEPS)
        lines += [
            "",
            "Dream vs real from the same initial states (pairs by seed; errors cm = mean distance at step t over pairs still running):",
            "",
            f"| policy | task | pairs | both succeed | both fail | dream only | real only | agreement | dream - real | {cols} |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(ERROR_STEPS),
        ]
        for policy, a in agreements:
            errors = " | ".join(
                f"{_num(100 * a.error_at(t, 'eef'))} / {_num(100 * a.error_at(t, 'object'))}" for t in ERROR_STEPS
            )
            gap = _pp(a.success_gap)
            name = f"{policy} @ {a.world_model}" if a.world_model else policy
            lines.append(
                f"| {name} | {a.task} | {a.pairs} | {a.both_succeed} | {a.both_fail} | {a.dream_only} | {a.real_only} "
                f"| {_pct(a.agreement_rate)} | {gap} | {errors} |"
            )
    lines += spread_markdown(spreads_of(agreements))
    return "\n".join(lines) + "\n"


def file_part(label: str) -> str:
    """A label as a safe piece of a file name ("dream@wm/s1" -> "dream_wm_s1")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def write_figures(records: Sequence[EpisodeRecord], summaries: Sequence[SuccessSummary],
                  agreements: Sequence[tuple[str, Agreement]], folder: Path, pairs_per_task: int = 2) -> list[Path]:
    figures = folder / "figures"
    paths = []
    for policy, task, source in groups(records):
        ok = [r for r in select(records, policy=policy, task=task, source=source) if r.error is None and r.length > 0]
        if ok:
            title = f"{policy} on {task} ({source}): end-effector and object paths"
            paths.append(plot_trajectories_3d(ok, figures / f"trajectories_{policy}_{task}_{file_part(source)}.png", title))
    for policy, a in agreements:
        dream = select(records, policy=policy, task=a.task, env="dream", world_model=a.world_model)
        real = select(records, policy=policy, task=a.task, env="real")
        suffix = f"_{file_part(a.world_model)}" if a.world_model else ""
        for d, r in pair_by_seed(dream, real)[:pairs_per_task]:
            paths.append(plot_dream_vs_real(d, r, figures / f"dream_vs_real_{policy}_{a.task}_seed{d.seed}{suffix}.png"))
    if summaries:
        paths.append(plot_success_rates(summaries, figures / "success_rates.png"))
    if agreements:
        paths.append(plot_trajectory_error([a for _, a in agreements], figures / "trajectory_error.png"))
    return paths


def json_safe(value: Any) -> Any:
    """NaN (a rate over zero episodes) becomes null so summary.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_summary(records: Sequence[EpisodeRecord], folder: Path, settings: dict, messages: Sequence[str]) -> str:
    """summary.json, summary.md and figures/ for `records`; returns the markdown table."""
    summaries = summaries_of(records)
    agreements = agreements_of(records)
    markdown = summary_markdown(summaries, agreements)
    figures = write_figures(records, summaries, agreements, folder)
    payload = {
        "settings": settings,
        "results": [s.as_dict() for s in summaries],
        "agreement": [{"policy": p, **a.as_dict()} for p, a in agreements],
        "dream_spread": [s.as_dict() for s in spreads_of(agreements)],
        "figures": [str(p.relative_to(folder)) for p in figures],
        "messages": list(messages),
    }
    (folder / "summary.json").write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    notes = "".join(f"* {m}\n" for m in messages)
    (folder / "summary.md").write_text(f"# Rollout results\n\n{markdown}\n{notes}")
    return markdown


def replace_markdown_section(markdown_file: Path, heading: str, section: str) -> None:
    """Put `section` (starting with `heading`, e.g. "## Evaluation") in place of the old one, or append it.

    The benchmarks each own one section of docs/RESULTS.md; the others stay as they are. Atomic write.
    """
    text = markdown_file.read_text() if markdown_file.exists() else "# Results\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = markdown_file.with_name(f".{markdown_file.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, markdown_file)


def publish_benchmark(out: Path, results: dict[str, Any], section: str, figures: dict[str, Any],
                      markdown_name: str, results_md: Path | None, heading: str) -> None:
    """A benchmark's outputs: results.json, its figures (name -> plot(path)) and markdown, swapped in atomically
    as one folder; then, with `results_md`, its section of docs/RESULTS.md replaced."""
    def produce(tmp: Path) -> str:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        for name, plot in figures.items():
            plot(tmp / name)
        (tmp / markdown_name).write_text(section)
        return section

    write_output_dir(out, "benchmark", True, produce)  # replaces a benchmark's earlier folder, nothing else
    print(section)
    if results_md:
        replace_markdown_section(results_md, heading, section)
        print(f"updated {results_md} ({heading})")
    print(f"wrote {out}")
