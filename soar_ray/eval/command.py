"""`soar-ray eval TARGET --prompts SET --rewards a,b --out DIR`: sample a prompt set with a trained
transformer on the rollout workers of a Ray topology, score it with the reward pool, report.

TARGET is a run folder (its last finished stage output), a checkpoint or stage folder (its
`transformer/`), or a diffusers transformer folder; the rest of the pipeline (VAE, text encoders)
comes from the job: `--job`, else the `config.yaml` of the run folder TARGET is in. SET is a
named public set (`geneval`, `ocr`, `pickscore`, read from `$SOAR_RAY_PROMPTS_DIR` or the
repository's ../shared/data/prompts) or a file: text, GenEval JSONL (.jsonl) or DrawBench CSV
(.csv). Image k of prompt i is `images/<i>_<k>.png` (the `rewards score` naming rule), made from
a seed fixed by (--seed, i, k); a re-run with the same settings makes only the missing images and
scores them all again. Everything is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from soar_ray.config import ConfigError, JobConfig, check_reward, load_job
from soar_ray.data.prompts import PROMPT_KINDS, Prompt, load_prompt_set

PROMPT_SETS = {
    "geneval": ("geneval_test_metadata.jsonl", "geneval"),
    "ocr": ("ocr_test.txt", "ocr"),
    "pickscore": ("pickscore_test.txt", "text"),
}
GENEVAL_REWARDS = frozenset({"geneval", "shapes_geneval"})
"""Rewards that read each prompt's GenEval row."""
PROMPTS_DIR_ENV = "SOAR_RAY_PROMPTS_DIR"
SETTINGS_FILE = "eval.json"
# Settings an image depends on: a folder made under other values cannot be resumed.
IMAGE_SETTINGS = ("transformer", "weights", "model", "prompts", "num_steps", "guidance",
                  "resolution", "seed")  # fmt: skip


def default_prompts_dir() -> Path:
    """`$SOAR_RAY_PROMPTS_DIR`, else ../shared/data/prompts next to the repository."""
    if os.environ.get(PROMPTS_DIR_ENV):
        return Path(os.environ[PROMPTS_DIR_ENV])
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts"


def resolve_prompts(spec: str, kind: str | None) -> tuple[Path, str]:
    """(file, kind) of a named public set or a file (kind from its suffix unless given)."""
    if spec in PROMPT_SETS:
        name, set_kind = PROMPT_SETS[spec]
        path = default_prompts_dir() / name
        if not path.is_file():
            raise FileNotFoundError(
                f"--prompts {spec}: {path} is missing; set {PROMPTS_DIR_ENV} to the folder "
                f"holding {name}, or pass the file's path"
            )
        return path, kind or set_kind
    if spec == "drawbench":
        raise FileNotFoundError(
            "--prompts drawbench: DrawBench is not shipped; pass its CSV (--prompts PATH.csv)"
        )
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: no prompt file {path} (or a set: {list(PROMPT_SETS)})")
    suffix_kind = {".jsonl": "geneval", ".csv": "drawbench"}.get(path.suffix.lower(), "text")
    return path, kind or suffix_kind


def find_transformer(target: Path) -> Path:
    """The diffusers transformer folder TARGET stands for."""
    if (target / "config.json").is_file():
        return target
    if (target / "transformer" / "config.json").is_file():
        return target / "transformer"
    if (target / "config.yaml").is_file():
        names = load_job(target / "config.yaml").stage_names
        for name in reversed(names):
            if (target / name / "transformer" / "config.json").is_file():
                return target / name / "transformer"
        raise FileNotFoundError(
            f"{target}: no stage of this run has finished ({names}); evaluate one of its "
            f"checkpoints (a folder with a transformer/ in it) instead"
        )
    raise FileNotFoundError(
        f"{target}: not a run folder (config.yaml), a checkpoint or stage folder (transformer/) "
        "or a diffusers transformer folder (config.json)"
    )


def find_job(target: Path, job_file: str | None, overrides: list[str]) -> JobConfig:
    """--job, else the config.yaml of the run folder TARGET is (in)."""
    if job_file is not None:
        return load_job(job_file, overrides)
    for folder in (target, *list(target.resolve().parents)[:3]):
        if (folder / "config.yaml").is_file():
            return load_job(folder / "config.yaml", overrides)
    raise ConfigError(
        f"--job: {target} is not inside a run folder (no config.yaml in it or above it); give "
        "the job whose model (preset or pretrained) the transformer belongs to"
    )


def weights_signature(transformer: Path) -> list[list[Any]]:
    """Name, size and modification time of every weights file: a retrained folder differs."""
    files = sorted(p for p in transformer.iterdir() if p.suffix in (".safetensors", ".bin"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def check_resumable(out: Path, settings: dict[str, Any]) -> None:
    """An --out folder made under other image settings is refused, naming the first one."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    for key in IMAGE_SETTINGS:
        if before.get(key) != settings[key]:
            raise ConfigError(
                f"--out: {out} holds images made with another {key} ({before.get(key)!r}, now "
                f"{settings[key]!r}); use another --out folder or delete it"
            )


def parse_rewards(job: JobConfig, spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ConfigError("--rewards: name at least one reward, e.g. --rewards pickscore,clipscore")
    for name in names:
        try:
            check_reward(job.rewards, "--rewards", name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return names


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    """Add `eval` to the `soar-ray` command line."""
    parser = commands.add_parser("eval", help="sample a prompt set with a trained model, score it",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("target", help="run folder, checkpoint folder or transformer folder")
    parser.add_argument("--prompts", required=True,
                        help=f"a set ({', '.join(PROMPT_SETS)}) or a file (txt, .jsonl, .csv)")  # fmt: skip
    parser.add_argument("--kind", choices=PROMPT_KINDS, help="prompt file kind (default: suffix)")
    parser.add_argument("--rewards", required=True, help="comma-separated reward names")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--job", help="job file (default: the run folder's config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field, e.g. rewards.ocr.device=cpu")  # fmt: skip
    parser.add_argument("--limit", type=int, help="the first N prompts only")
    parser.add_argument("--steps", type=int, default=40, help="ODE sampling steps (default 40)")
    parser.add_argument("--cfg", type=float, default=4.5, help="CFG scale (default 4.5)")
    parser.add_argument("--images-per-prompt", type=int,
                        help="default 4 for GenEval sets (its protocol), else 1")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="base seed of the per-image noise")
    parser.add_argument("--resolution", type=int, help="image side (default: model.resolution)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampling call")
    parser.add_argument("--workers", type=int,
                        help="rollout workers (default: the job's, else one per learner)")  # fmt: skip
    parser.set_defaults(func=cmd_eval)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")


def prepare_eval(
    job: JobConfig,
    transformer: Path,
    prompts_path: Path,
    kind: str,
    rewards: str,
    *,
    steps: int,
    cfg: float,
    images_per_prompt: int | None,
    seed: int,
    resolution: int | None,
    limit: int | None = None,
) -> tuple[list[Prompt], dict[str, Any]]:
    """The prompts and the settings record of one evaluation, every input checked."""
    try:
        prompts: list[Prompt] = load_prompt_set(prompts_path, kind)[:limit]
    except ValueError as exc:
        raise ConfigError(f"--prompts: {exc}") from None
    names = parse_rewards(job, rewards)
    for name in set(names) & GENEVAL_REWARDS:
        if any("include" not in p.metadata for p in prompts):
            raise ConfigError(f"--rewards {name}: needs GenEval metadata prompts (a .jsonl set)")
    settings = {
        "transformer": str(transformer.resolve()), "weights": weights_signature(transformer),
        "model": job.model.pretrained or f"preset:{job.model.preset}",
        "prompts": str(prompts_path.resolve()), "kind": kind, "num_steps": steps,
        "guidance": cfg, "resolution": resolution or job.model.resolution, "seed": seed,
        "rewards": names, "num_prompts": len(prompts),
        "images_per_prompt": images_per_prompt or (4 if kind == "geneval" else 1),
    }  # fmt: skip
    return prompts, settings


def cmd_eval(args: argparse.Namespace) -> int:
    """Validate everything, then sample, score and report (soar_ray.eval.runner)."""
    _positive(args, "limit", "steps", "images_per_prompt", "resolution", "batch_size", "workers")
    target = Path(args.target).expanduser()
    transformer = find_transformer(target)
    job = find_job(target, args.job, args.overrides)
    prompts_path, kind = resolve_prompts(args.prompts, args.kind)
    prompts, settings = prepare_eval(
        job, transformer, prompts_path, kind, args.rewards, steps=args.steps, cfg=args.cfg,
        images_per_prompt=args.images_per_prompt, seed=args.seed, resolution=args.resolution,
        limit=args.limit,
    )  # fmt: skip
    out = Path(args.out).expanduser()
    check_resumable(out, settings)
    if job.cluster.address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # as `run`: loopback
    from soar_ray.eval.runner import run_eval

    workers = args.workers or job.cluster.num_rollout_workers or job.cluster.num_learners
    run_eval(job, prompts, settings, out, args.batch_size, workers)
    return 0
